// A worker's Prometheus metrics (services/worker/worker_metrics.h): the mapping of every Load
// field, the values a scrape shows before and after a turn through the router and during a
// drain, and the `kls worker|serve` flags that expose them (--metrics-listen, --backend).
#include "services/worker/worker_metrics.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "common/file_util.h"
#include "engine/backend/factory.h"
#include "services/common/metrics_exporter.h"
#include "tests/services/common/http_get.h"
#include "tests/services/integration/cluster.h"
#include "tests/test_util.h"

namespace kls::testing {
namespace {

using services::MetricSample;
using services::MetricsExporter;
using services::MetricType;

const MetricSample* Find(const std::vector<MetricSample>& samples, const std::string& name) {
  for (const MetricSample& sample : samples) {
    if (sample.name == name) return &sample;
  }
  return nullptr;
}

TEST(WorkerLoadMetricsTest, ExportsEveryLoadFieldUnderItsName) {
  kls::v1::Load load;
  load.set_active_turns(1);
  load.set_queued_turns(2);
  load.set_hot_sessions(3);
  load.set_hot_bytes(uint64_t{5} << 40);  // beyond 32 bits
  load.set_budget_bytes(uint64_t{6} << 40);
  load.set_draining(true);
  load.set_model_fingerprint("f00d");
  load.set_turns_total(8);
  load.set_restores_total(9);
  load.set_rebuilds_total(10);
  load.set_evictions_total(11);
  load.set_commits_total(12);
  load.set_commit_failures_total(13);
  const std::vector<MetricSample> samples = worker::WorkerLoadMetrics(load);

  // Every numeric field of Load, present and future, is exported as kls_worker_<field>: a field
  // added to the proto without a metric fails here.
  const google::protobuf::Descriptor* descriptor = kls::v1::Load::descriptor();
  const google::protobuf::Reflection* reflection = kls::v1::Load::GetReflection();
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* field = descriptor->field(i);
    if (field->name() == "model_fingerprint") continue;
    const MetricSample* sample = Find(samples, "kls_worker_" + field->name());
    ASSERT_NE(sample, nullptr) << "no metric for Load." << field->name();
    double expected = 0;
    switch (field->cpp_type()) {
      case google::protobuf::FieldDescriptor::CPPTYPE_UINT32:
        expected = reflection->GetUInt32(load, field);
        break;
      case google::protobuf::FieldDescriptor::CPPTYPE_UINT64:
        expected = static_cast<double>(reflection->GetUInt64(load, field));
        break;
      case google::protobuf::FieldDescriptor::CPPTYPE_BOOL:
        expected = reflection->GetBool(load, field) ? 1 : 0;
        break;
      default:
        FAIL() << "Load." << field->name() << " has a type the test does not know";
    }
    EXPECT_EQ(sample->value, expected) << field->name();
    EXPECT_EQ(sample->type,
              absl::EndsWith(field->name(), "_total") ? MetricType::kCounter : MetricType::kGauge)
        << field->name();
    EXPECT_FALSE(sample->help.empty()) << field->name();
  }
  const MetricSample* info = Find(samples, "kls_worker_info");
  ASSERT_NE(info, nullptr);
  EXPECT_EQ(info->value, 1);
  ASSERT_EQ(info->labels.size(), 1u);
  EXPECT_EQ(info->labels[0].first, "model_fingerprint");
  EXPECT_EQ(info->labels[0].second, "f00d");
  EXPECT_EQ(samples.size(), static_cast<size_t>(descriptor->field_count()));  // + info - fp
}

// Scrapes until `done(body)` holds or 20 s pass; returns the last body.
std::string ScrapeUntil(int port, const std::function<bool(const std::string&)>& done) {
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  std::string body;
  while (absl::Now() < deadline) {
    absl::StatusOr<HttpResponse> response = HttpGet(port, "/metrics");
    if (response.ok() && response->status == 200) {
      body = response->body;
      if (done(body)) return body;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  ADD_FAILURE() << "metrics never reached the expected values; last scrape:\n" << body;
  return body;
}

TEST(WorkerMetricsTest, ScrapesFollowTurnsAndDrain) {
  const std::string data_dir = MakeTempDir();
  worker::WorkerOptions options;
  options.data_dir = data_dir;
  options.engine.hot_budget_bytes = int64_t{64} << 20;
  std::unique_ptr<ServedWorker> served = StartWorker(options);
  ASSERT_NE(served, nullptr);
  // Destroyed before `served`: the collector reads the worker's engine.
  absl::StatusOr<std::unique_ptr<MetricsExporter>> exporter = MetricsExporter::Start(
      "127.0.0.1:0", worker::WorkerMetricsCollector(&served->worker->engine()));
  ASSERT_TRUE(exporter.ok()) << exporter.status();
  const int port = (*exporter)->port();

  std::string body = ScrapeUntil(port, [](const std::string&) { return true; });
  EXPECT_EQ(SampleValue(body, "kls_worker_turns_total"), 0) << body;
  EXPECT_EQ(SampleValue(body, "kls_worker_hot_sessions"), 0) << body;
  EXPECT_EQ(SampleValue(body, "kls_worker_draining"), 0) << body;
  EXPECT_EQ(SampleValue(body, "kls_worker_budget_bytes"), 64 << 20) << body;
  EXPECT_NE(body.find("# TYPE kls_worker_queued_turns gauge"), std::string::npos) << body;
  EXPECT_NE(body.find("# TYPE kls_worker_turns_total counter"), std::string::npos) << body;
  const std::string fingerprint = served->worker->engine().GetLoad().model_fingerprint();
  ASSERT_FALSE(fingerprint.empty());
  EXPECT_EQ(SampleValue(body, "kls_worker_info{model_fingerprint=\"" + fingerprint + "\"}"), 1)
      << body;

  std::unique_ptr<ServedRouter> router = StartRouter({served->address});
  ASSERT_TRUE(CreateSession(router->client.get(), "metrics-1").ok());
  for (uint64_t turn = 1; turn <= 2; ++turn) {
    TurnResult result =
        RunTurn(router->client.get(), TokensTurn("metrics-1", InputTokens(8, turn), 4));
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
    EXPECT_EQ(result.final.version(), turn);
  }
  body = ScrapeUntil(port, [](const std::string& b) {
    return SampleValue(b, "kls_worker_turns_total") == 2 &&
           SampleValue(b, "kls_worker_active_turns") == 0;
  });
  EXPECT_EQ(SampleValue(body, "kls_worker_queued_turns"), 0) << body;
  EXPECT_EQ(SampleValue(body, "kls_worker_hot_sessions"), 1) << body;
  EXPECT_GT(SampleValue(body, "kls_worker_hot_bytes").value_or(0), 0) << body;
  EXPECT_GE(SampleValue(body, "kls_worker_commits_total").value_or(0), 2) << body;  // SYNC
  EXPECT_EQ(SampleValue(body, "kls_worker_commit_failures_total"), 0) << body;
  // The scrape and GetLoad are one snapshot source: they agree once the worker is idle.
  const kls::v1::Load load = served->worker->engine().GetLoad();
  EXPECT_EQ(SampleValue(body, "kls_worker_hot_bytes"), static_cast<double>(load.hot_bytes()));
  EXPECT_EQ(SampleValue(body, "kls_worker_commits_total"),
            static_cast<double>(load.commits_total()));

  ASSERT_TRUE(served->worker->Drain(absl::Seconds(30)).ok());
  body = ScrapeUntil(
      port, [](const std::string& b) { return SampleValue(b, "kls_worker_draining") == 1; });
  exporter->reset();
  router.reset();
  served.reset();
  RemoveTree(data_dir);
}

// ---- the kls program -------------------------------------------------------------------------

std::string KlsBinary() { return BinaryDir() + "/services/cli/kls"; }

// `kls ARGS...` as a child process with stdout and stderr in `log`.
class KlsProcess {
 public:
  KlsProcess(std::vector<std::string> args, const std::string& log) : log_(log) {
    args.insert(args.begin(), KlsBinary());
    pid_ = fork();
    if (pid_ == 0) {
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
  }
  ~KlsProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      Wait();
    }
  }
  void Signal(int signal) { kill(pid_, signal); }
  // The exit code, or -1 if it was killed by a signal.
  int Wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  std::string Log() const {
    absl::StatusOr<std::string> text = ReadFileToString(log_);
    return text.ok() ? *text : "";
  }

 private:
  std::string log_;
  pid_t pid_ = -1;
};

struct RunResult {
  int code;
  std::string output;
};

RunResult RunKls(const std::vector<std::string>& args) {
  const std::string dir = ScratchDir();
  KlsProcess process(args, dir + "/out.log");
  const int code = process.Wait();
  return {code, process.Log()};
}

// Without a usable CUDA backend (a CPU-only build, or no GPU visible) `--backend cuda` stops at
// start-up and says why; with one, it takes the CUDA path (a missing model is then the error).
TEST(KlsServerFlagsTest, CudaBackendNeedsACudaBuildAndAGpu) {
  for (const char* role : {"worker", "serve"}) {
    if (!engine::CudaBackendUsable()) {
      const RunResult run = RunKls({role, "--backend", "cuda", "--model", TinyModelDir(),
                                    "--data-dir", ScratchDir(), "--listen", "127.0.0.1:0"});
      EXPECT_EQ(run.code, 1) << role << ": " << run.output;
      EXPECT_TRUE(absl::StrContains(run.output, engine::CudaBackendBuilt()
                                                    ? "no CUDA device is visible"
                                                    : "this build has no CUDA backend"))
          << role << ": " << run.output;
    } else {
      const RunResult run = RunKls({role, "--backend", "cuda", "--model", ScratchDir() + "/none",
                                    "--data-dir", ScratchDir(), "--listen", "127.0.0.1:0"});
      EXPECT_EQ(run.code, 1) << role << ": " << run.output;
      EXPECT_FALSE(absl::StrContains(run.output, "CUDA")) << role << ": " << run.output;
    }
  }
}

TEST(KlsServerFlagsTest, UnknownBackendIsRejectedWithTheAllowedValues) {
  for (const char* role : {"worker", "serve"}) {
    const RunResult run = RunKls({role, "--backend", "rocm"});
    EXPECT_EQ(run.code, 2) << role << ": " << run.output;
    EXPECT_TRUE(absl::StrContains(run.output, "--backend")) << run.output;
    EXPECT_TRUE(absl::StrContains(run.output, "rocm")) << run.output;
    EXPECT_TRUE(absl::StrContains(run.output, "cpu")) << run.output;
    EXPECT_TRUE(absl::StrContains(run.output, "cuda")) << run.output;
  }
}

TEST(KlsServerFlagsTest, BadMetricsAddressFailsBeforeTheModelLoads) {
  // The model directory does not exist: the address must be refused first.
  const RunResult run = RunKls({"worker", "--metrics-listen", "localhost:9090", "--model",
                                "/nonexistent/model", "--listen", "127.0.0.1:0"});
  EXPECT_EQ(run.code, 1) << run.output;
  EXPECT_TRUE(absl::StrContains(run.output, "--metrics-listen")) << run.output;
  EXPECT_TRUE(absl::StrContains(run.output, "'localhost:9090'")) << run.output;
  EXPECT_FALSE(absl::StrContains(run.output, "/nonexistent/model")) << run.output;
}

TEST(KlsServerFlagsTest, WorkerProcessServesMetricsUntilItDrains) {
  const std::string dir = ScratchDir();
  KlsProcess worker({"worker", "--model", TinyModelDir(), "--data-dir", dir + "/data", "--listen",
                     "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--backend", "cpu"},
                    dir + "/worker.log");
  // "kls worker: metrics on 127.0.0.1:0, port N (GET /metrics)"
  const std::regex announce("metrics on 127\\.0\\.0\\.1:0, port ([0-9]+)");
  int port = 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (port == 0 && absl::Now() < deadline) {
    std::smatch match;
    const std::string log = worker.Log();
    if (std::regex_search(log, match, announce)) {
      port = std::stoi(match[1]);
    } else {
      absl::SleepFor(absl::Milliseconds(20));
    }
  }
  ASSERT_GT(port, 0) << worker.Log();
  const std::string body = ScrapeUntil(
      port, [](const std::string& b) { return SampleValue(b, "kls_worker_draining").has_value(); });
  EXPECT_EQ(SampleValue(body, "kls_worker_draining"), 0) << body;
  EXPECT_EQ(SampleValue(body, "kls_worker_turns_total"), 0) << body;
  EXPECT_EQ(SampleValue(body, "kls_worker_budget_bytes"), 2048.0 * (1 << 20)) << body;
  worker.Signal(SIGTERM);
  EXPECT_EQ(worker.Wait(), 0) << worker.Log();
  // The endpoint went away with the process.
  EXPECT_FALSE(HttpGet(port, "/metrics").ok());
}

}  // namespace
}  // namespace kls::testing

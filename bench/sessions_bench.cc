// Session benchmarks on the CPU backend, through the real services in one process (router →
// worker → embedded RocksDB store, gRPC on loopback):
//   resume    a session of --context tokens: time to first token of a 1-token turn when the
//             session is hot, when it is restored from the store by a freshly started worker,
//             and when the same history is re-prefilled into a new session
//   throughput  --tokens greedy tokens per turn from N concurrent sessions, N in --sessions
// One JSON line per measurement on stdout, then a short table on stderr.
//
//   sessions_bench --model models/tiny [--context 3000] [--tokens 128] [--sessions 1,8,32]
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "kls/v1/sessions.grpc.pb.h"
#include "services/router/router.h"
#include "services/worker/worker.h"

namespace kls::bench {
namespace {

struct Served {
  std::unique_ptr<worker::Worker> worker;
  std::unique_ptr<grpc::Server> worker_server;
  std::unique_ptr<router::Router> router;
  std::unique_ptr<grpc::Server> router_server;
  std::unique_ptr<kls::v1::Sessions::Stub> client;

  ~Served() {
    if (router_server) router_server->Shutdown(gpr_now(GPR_CLOCK_REALTIME));
    if (router) router->Shutdown();
    if (worker_server) worker_server->Shutdown(gpr_now(GPR_CLOCK_REALTIME));
  }
};

std::unique_ptr<Served> Start(const std::string& model, const std::string& data_dir) {
  auto s = std::make_unique<Served>();
  worker::WorkerOptions options;
  options.model_dir = model;
  options.data_dir = data_dir;
  options.gc_interval = absl::ZeroDuration();
  options.engine.max_tokens_limit = 1 << 16;
  absl::StatusOr<std::unique_ptr<worker::Worker>> w = worker::Worker::Create(options);
  if (!w.ok()) {
    std::fprintf(stderr, "worker: %s\n", std::string(w.status().message()).c_str());
    return nullptr;
  }
  s->worker = *std::move(w);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder worker_builder;
  worker_builder.RegisterService(s->worker->service());
  s->worker_server = worker_builder.BuildAndStart();
  s->worker->AttachHealth(s->worker_server->GetHealthCheckService());
  router::RouterOptions router_options;
  router_options.worker_channels.push_back(
      {"local", s->worker_server->InProcessChannel(grpc::ChannelArguments())});
  router_options.health_interval = absl::Milliseconds(50);
  absl::StatusOr<std::unique_ptr<router::Router>> r = router::Router::Create(router_options);
  if (!r.ok() || !(*r)->WaitForReady(absl::Seconds(30)).ok()) return nullptr;
  s->router = *std::move(r);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(s->router->service());
  s->router_server = builder.BuildAndStart();
  s->client = kls::v1::Sessions::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  return s;
}

std::vector<uint32_t> RandomTokens(int n, uint64_t seed) {
  std::vector<uint32_t> out;
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    out.push_back(static_cast<uint32_t>(32 + x % 90));
  }
  return out;
}

struct Turn {
  bool ok = false;
  std::string error;
  double wall_ms = 0;
  int tokens = 0;
  kls::v1::GenerateResponse final;
};

Turn RunTurn(kls::v1::Sessions::Stub* client, const std::string& id,
             const std::vector<uint32_t>& input, int max_tokens) {
  kls::v1::GenerateRequest request;
  request.set_session_id(id);
  for (uint32_t t : input) request.add_input_tokens(t);
  request.mutable_sampling()->set_temperature(0);
  request.mutable_sampling()->set_max_tokens(max_tokens);
  request.mutable_sampling()->set_ignore_eos(true);
  Turn turn;
  const auto t0 = std::chrono::steady_clock::now();
  grpc::ClientContext context;
  auto reader = client->Generate(&context, request);
  kls::v1::GenerateResponse response;
  while (reader->Read(&response)) {
    turn.tokens += response.token_ids_size();
    turn.final = response;
  }
  grpc::Status status = reader->Finish();
  turn.wall_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  turn.ok = status.ok();
  turn.error = status.error_message();
  return turn;
}

bool Create(kls::v1::Sessions::Stub* client, const std::string& id) {
  grpc::ClientContext context;
  kls::v1::CreateSessionRequest request;
  request.set_session_id(id);
  kls::v1::Session session;
  return client->CreateSession(&context, request, &session).ok();
}

int Main(int argc, char** argv) {
  std::string model = "models/tiny";
  int context = 3000, tokens = 128;
  std::vector<int> sessions = {1, 8, 32};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--model") {
      model = value;
    } else if (flag == "--context") {
      context = std::stoi(value);
    } else if (flag == "--tokens") {
      tokens = std::stoi(value);
    } else if (flag == "--sessions") {
      sessions.clear();
      for (absl::string_view s : absl::StrSplit(value, ','))
        sessions.push_back(std::stoi(std::string(s)));
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  char pattern[] = "/tmp/kls_bench_XXXXXX";
  const std::string dir = mkdtemp(pattern);

  // Resume vs re-prefill.
  std::vector<uint32_t> history = RandomTokens(context, 1);
  double hot_ttft = 0, restore_ttft = 0, restore_ms = 0, reprefill_ttft = 0;
  {
    std::unique_ptr<Served> s = Start(model, dir + "/a");
    if (s == nullptr || !Create(s->client.get(), "long")) return 1;
    Turn fill = RunTurn(s->client.get(), "long", history, 1);
    if (!fill.ok) return std::fprintf(stderr, "fill: %s\n", fill.error.c_str()), 1;
    history.insert(history.end(), fill.final.token_ids().begin(), fill.final.token_ids().end());
    Turn hot = RunTurn(s->client.get(), "long", {65}, 1);
    hot_ttft = hot.final.timings().ttft_ms();
    history.push_back(65);
    history.insert(history.end(), hot.final.token_ids().begin(), hot.final.token_ids().end());
  }
  {
    std::unique_ptr<Served> s = Start(model, dir + "/a");  // a fresh worker: nothing hot
    if (s == nullptr) return 1;
    Turn restored = RunTurn(s->client.get(), "long", {66}, 1);
    if (!restored.ok) return std::fprintf(stderr, "restore: %s\n", restored.error.c_str()), 1;
    restore_ttft = restored.final.timings().ttft_ms();
    restore_ms = restored.final.timings().restore_ms();
    history.push_back(66);
    if (!Create(s->client.get(), "again")) return 1;
    Turn again = RunTurn(s->client.get(), "again", history, 1);
    if (!again.ok) return std::fprintf(stderr, "re-prefill: %s\n", again.error.c_str()), 1;
    reprefill_ttft = again.final.timings().ttft_ms();
  }
  std::printf(
      "{\"bench\":\"resume\",\"backend\":\"cpu\",\"context_tokens\":%zu,\"hot_ttft_ms\":%.3f,"
      "\"restore_ttft_ms\":%.3f,\"restore_ms\":%.3f,\"reprefill_ttft_ms\":%.3f,"
      "\"speedup\":%.1f}\n",
      history.size(), hot_ttft, restore_ttft, restore_ms, reprefill_ttft,
      reprefill_ttft / restore_ttft);

  // Throughput with N concurrent sessions.
  std::vector<std::pair<int, double>> rates;
  {
    std::unique_ptr<Served> s = Start(model, dir + "/b");
    if (s == nullptr) return 1;
    for (int n : sessions) {
      for (int i = 0; i < n; ++i)
        Create(s->client.get(), "t" + std::to_string(n) + "_" + std::to_string(i));
      std::vector<Turn> turns(n);
      std::vector<std::thread> threads;
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < n; ++i) {
        threads.emplace_back([&, i] {
          turns[i] = RunTurn(s->client.get(), "t" + std::to_string(n) + "_" + std::to_string(i),
                             RandomTokens(16, 100 + i), tokens);
        });
      }
      for (std::thread& t : threads) t.join();
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      int total = 0;
      for (const Turn& t : turns) {
        if (!t.ok) return std::fprintf(stderr, "turn: %s\n", t.error.c_str()), 1;
        total += t.tokens;
      }
      rates.push_back({n, total / seconds});
      std::printf(
          "{\"bench\":\"throughput\",\"backend\":\"cpu\",\"sessions\":%d,\"tokens_per_turn\":%d,"
          "\"generated\":%d,\"seconds\":%.3f,\"tokens_per_second\":%.1f}\n",
          n, tokens, total, seconds, total / seconds);
    }
  }
  std::fprintf(stderr,
               "\nresume at %zu tokens: hot %.2f ms, restored %.2f ms (restore %.2f ms), "
               "re-prefill %.2f ms -> %.1fx\n",
               history.size(), hot_ttft, restore_ttft, restore_ms, reprefill_ttft,
               reprefill_ttft / restore_ttft);
  for (auto [n, rate] : rates) std::fprintf(stderr, "%2d sessions: %.0f tokens/s\n", n, rate);
  std::filesystem::remove_all(dir);
  return 0;
}

}  // namespace
}  // namespace kls::bench

int main(int argc, char** argv) { return kls::bench::Main(argc, argv); }

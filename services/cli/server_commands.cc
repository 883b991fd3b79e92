// The server roles of `kls`: serve (all in one), router, worker, store. Each builds its gRPC
// server(s) with the health service and reflection, runs until SIGTERM or SIGINT, then drains
// (workers finish running turns and write back hot sessions) and exits 0.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "services/cli/commands.h"
#include "services/common/metrics_exporter.h"
#include "services/router/http_api.h"
#include "services/router/router.h"
#include "services/store/rocksdb_shard.h"
#include "services/store/store_service.h"
#include "services/worker/worker.h"
#include "services/worker/worker_metrics.h"

namespace kls::cli {
namespace {

// Blocks SIGTERM and SIGINT in this thread and every thread it starts later, so WaitForSignal
// receives them synchronously. Call before any server thread exists.
void BlockTerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int signal = 0;
  sigwait(&set, &signal);
  return signal;
}

// A worker whose backend fails for good drains and exits non-zero (ARCHITECTURE.md §8): its
// failure wakes the signal wait like a SIGTERM would.
void ExitOnBackendFailure(worker::Worker* worker) {
  worker->SetFatalHandler([] { kill(getpid(), SIGTERM); });
}

// The exit code after a drain: non-zero when the backend failed.
int ExitCode(worker::Worker* worker, int drain_code) {
  if (const absl::Status failure = worker->backend_failure(); !failure.ok()) {
    KLS_LOG(ERROR) << "exiting after a backend failure: " << failure;
    return 1;
  }
  return drain_code;
}

// Prints the error and returns the exit code.
int Fail(const absl::Status& status, int code) {
  std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
  return code;
}

std::vector<std::string> SplitList(const std::string& s) {
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipWhitespace())) {
    out.emplace_back(part.data(), part.size());
  }
  return out;
}

// A server on `listen` (empty: in-process only) with health and reflection.
std::unique_ptr<grpc::Server> BuildServer(const std::string& listen,
                                          const std::vector<grpc::Service*>& services,
                                          int* bound_port) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!listen.empty()) {
    builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), bound_port);
  }
  // Snapshot streams and long prompts: allow large messages (pieces are 1 MiB anyway).
  builder.SetMaxReceiveMessageSize(64 << 20);
  for (grpc::Service* service : services) builder.RegisterService(service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || (!listen.empty() && *bound_port == 0)) {
    std::fprintf(stderr, "error: cannot listen on %s\n", listen.c_str());
    return nullptr;
  }
  return server;
}

struct WorkerFlags {
  std::string model = "models/tiny";
  std::string data_dir = "kls-data";
  std::string store;  // comma-separated shard addresses; empty: embedded
  int store_replication = 1;
  double hot_budget_mb = 2048;
  int max_running_turns = 64;
  int max_tokens_limit = 8192;
  double drain_timeout_s = 60;
  double gc_interval_s = 300;
  std::string backend = "auto";  // auto | cpu | cuda
  int cuda_device = 0;
  int gpu_max_sessions = 64;
  std::string metrics_listen;  // IP:PORT of the Prometheus /metrics endpoint; empty: off
};

void AddWorkerFlags(CLI::App* cmd, WorkerFlags* f, bool with_store) {
  cmd->add_option("--model", f->model, "Model directory")->capture_default_str();
  cmd->add_option("--data-dir", f->data_dir, "Directory of the embedded store")
      ->capture_default_str();
  if (with_store) {
    cmd->add_option("--store", f->store,
                    "Store shards HOST:PORT,HOST:PORT (kls store); empty: embedded RocksDB");
    cmd->add_option("--store-replication", f->store_replication, "Copies of every key (R)")
        ->capture_default_str();
  }
  cmd->add_option("--hot-budget-mb", f->hot_budget_mb, "Session state held in memory (MiB)")
      ->capture_default_str();
  cmd->add_option("--max-running-turns", f->max_running_turns, "Turns batched together")
      ->capture_default_str();
  cmd->add_option("--max-tokens-limit", f->max_tokens_limit, "Largest max_tokens a turn may ask")
      ->capture_default_str();
  cmd->add_option("--drain-timeout", f->drain_timeout_s, "Seconds to drain on SIGTERM")
      ->capture_default_str();
  cmd->add_option("--gc-interval", f->gc_interval_s, "Seconds between store garbage collections")
      ->capture_default_str();
  AddBackendFlags(cmd, &f->backend, &f->cuda_device);
  cmd->add_option("--gpu-max-sessions", f->gpu_max_sessions,
                  "cuda: sessions held on the GPU at once (KDA state slots: two per session)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--metrics-listen", f->metrics_listen,
                  "Prometheus /metrics on IP:PORT (e.g. 0.0.0.0:9090); empty: off");
}

absl::StatusOr<std::unique_ptr<worker::Worker>> MakeWorker(const WorkerFlags& f) {
  // Flags that need no model are checked before the (slow) model load.
  KLS_RETURN_IF_ERROR(engine::CheckBackendAvailable(f.backend));
  if (!f.metrics_listen.empty()) {
    if (absl::Status valid = services::ValidateMetricsAddress(f.metrics_listen); !valid.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--metrics-listen: ", valid.message()));
    }
  }
  worker::WorkerOptions options;
  options.model_dir = f.model;
  options.data_dir = f.data_dir;
  options.store_targets = SplitList(f.store);
  options.store_replication = f.store_replication;
  options.engine.hot_budget_bytes = static_cast<int64_t>(f.hot_budget_mb * (1 << 20));
  options.engine.max_running_turns = f.max_running_turns;
  options.engine.max_tokens_limit = f.max_tokens_limit;
  options.gc_interval = absl::Seconds(f.gc_interval_s);
  options.backend.kind = f.backend;
  options.backend.cuda_device = f.cuda_device;
  options.backend.cuda_max_sessions = f.gpu_max_sessions;
  return worker::Worker::Create(options);
}

// The worker's Prometheus endpoint (see worker_metrics.h) when --metrics-listen is set, else
// null. UNAVAILABLE if it cannot listen. The exporter must be destroyed before the worker.
absl::StatusOr<std::unique_ptr<services::MetricsExporter>> StartWorkerMetrics(
    const WorkerFlags& f, worker::Worker* worker, const char* role) {
  if (f.metrics_listen.empty()) return nullptr;
  KLS_ASSIGN_OR_RETURN(std::unique_ptr<services::MetricsExporter> exporter,
                       services::MetricsExporter::Start(
                           f.metrics_listen, worker::WorkerMetricsCollector(&worker->engine())));
  std::fprintf(stderr, "kls %s: metrics on %s, port %d (GET /metrics)\n", role,
               f.metrics_listen.c_str(), exporter->port());
  return exporter;
}

// The HTTP API's flags, the same for `kls serve` and `kls router` but for the listen default.
struct HttpFlags {
  std::string listen;
  std::string model_name;
  int max_inflight = router::HttpApiOptions().max_inflight;
  double turn_timeout_s = absl::ToDoubleSeconds(router::HttpApiOptions().rpc_timeout);
};

void AddHttpFlags(CLI::App* cmd, HttpFlags* f, const char* listen_help, const char* name_help) {
  cmd->add_option("--http-listen", f->listen, listen_help)->capture_default_str();
  cmd->add_option("--served-model-name", f->model_name, name_help);
  cmd->add_option("--http-max-inflight", f->max_inflight,
                  "HTTP API requests running turns at once; more get 429")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--http-turn-timeout", f->turn_timeout_s,
                  "Seconds a non-streamed HTTP API turn may take (prefill and generation); "
                  "longer ones get 504")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
}

// The OpenAI-compatible HTTP API on flags.listen (empty: off, null) serving `model_name`, talking
// to the router's own Sessions service on `server` through an in-process channel.
absl::StatusOr<std::unique_ptr<router::HttpApi>> StartHttpApi(
    const HttpFlags& flags, const std::string& model_name, grpc::Server* server,
    router::Router* router, absl::Duration stop_grace, const char* role) {
  if (flags.listen.empty()) return nullptr;
  router::HttpApiOptions options;
  options.listen = flags.listen;
  options.model_name = model_name;
  options.max_inflight = flags.max_inflight;
  options.rpc_timeout = absl::Seconds(flags.turn_timeout_s);
  options.stop_grace = stop_grace;
  options.ready = [router] { return router->WaitForReady(absl::ZeroDuration()).ok(); };
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  KLS_ASSIGN_OR_RETURN(std::unique_ptr<router::HttpApi> http,
                       router::HttpApi::Start(options, server->InProcessChannel(args),
                                              router->sessions().api_keys()));
  std::fprintf(stderr, "kls %s: OpenAI-compatible HTTP API on %s, port %d (model \"%s\")\n", role,
               flags.listen.c_str(), http->port(), model_name.c_str());
  return http;
}

// Drains the worker (if any), then stops the servers. Exit code 0 unless the drain timed out.
int Shutdown(worker::Worker* worker, double drain_timeout_s,
             const std::vector<grpc::Server*>& servers) {
  int code = 0;
  if (worker != nullptr) {
    absl::Status drained = worker->Drain(absl::Seconds(drain_timeout_s));
    if (!drained.ok()) {
      KLS_LOG(ERROR) << "drain: " << drained;
      code = 1;
    }
  }
  for (grpc::Server* server : servers) {
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  }
  KLS_LOG(INFO) << "stopped";
  return code;
}

}  // namespace

std::function<int()> AddServeCommand(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand(
      "serve", "Router + one worker + an embedded store in one process (the quick start)");
  auto flags = std::make_shared<WorkerFlags>();
  auto listen = std::make_shared<std::string>("127.0.0.1:50051");
  auto api_keys = std::make_shared<std::string>();
  auto http_flags = std::make_shared<HttpFlags>();
  http_flags->listen = "127.0.0.1:8080";
  AddWorkerFlags(cmd, flags.get(), /*with_store=*/false);
  cmd->add_option("--listen", *listen, "gRPC address of kls.v1.Sessions")->capture_default_str();
  cmd->add_option("--api-keys", *api_keys, "File of \"<key> <tenant>\" lines; none: open");
  AddHttpFlags(cmd, http_flags.get(), "OpenAI-compatible HTTP API on HOST:PORT; empty: off",
               "Model name of the HTTP API (default: the --model directory's name)");
  return [flags, listen, api_keys, http_flags]() -> int {
    BlockTerminationSignals();
    absl::StatusOr<std::unique_ptr<worker::Worker>> worker = MakeWorker(*flags);
    if (!worker.ok()) {
      return Fail(worker.status(), 1);
    }
    // Declared after the worker, so destroyed before it.
    absl::StatusOr<std::unique_ptr<services::MetricsExporter>> metrics =
        StartWorkerMetrics(*flags, worker->get(), "serve");
    if (!metrics.ok()) return Fail(metrics.status(), 1);
    // The worker is reached through an in-process channel: no port, no TCP.
    int unused = 0;
    std::unique_ptr<grpc::Server> worker_server = BuildServer("", {(*worker)->service()}, &unused);
    if (worker_server == nullptr) return 1;
    (*worker)->AttachHealth(worker_server->GetHealthCheckService());
    router::RouterOptions router_options;
    router_options.worker_channels.push_back(
        {"local", worker_server->InProcessChannel(grpc::ChannelArguments())});
    router_options.health_interval = absl::Milliseconds(500);
    router_options.api_keys_file = *api_keys;
    absl::StatusOr<std::unique_ptr<router::Router>> router = router::Router::Create(router_options);
    if (!router.ok()) {
      return Fail(router.status(), 2);
    }
    int port = 0;
    std::unique_ptr<grpc::Server> server = BuildServer(*listen, {(*router)->service()}, &port);
    if (server == nullptr) return 1;
    if (absl::Status ready = (*router)->WaitForReady(absl::Seconds(30)); !ready.ok()) {
      std::fprintf(stderr, "error: the worker did not become ready: %s\n",
                   std::string(ready.message()).c_str());
      return 1;
    }
    const std::string served_name =
        !http_flags->model_name.empty()
            ? http_flags->model_name
            : std::filesystem::path(flags->model).lexically_normal().filename().string();
    absl::StatusOr<std::unique_ptr<router::HttpApi>> http =
        StartHttpApi(*http_flags, served_name.empty() ? "kls" : served_name, server.get(),
                     router->get(), absl::Seconds(flags->drain_timeout_s), "serve");
    if (!http.ok()) return Fail(http.status(), 1);
    std::fprintf(stderr, "kls serve: listening on %s (model %s, data %s)\n", listen->c_str(),
                 flags->model.c_str(), flags->data_dir.c_str());
    ExitOnBackendFailure(worker->get());
    const int signal = WaitForSignal();
    KLS_LOG(INFO) << "signal " << signal << ": draining";
    // HTTP first: no new requests; its running turns finish (or are cancelled after the drain
    // timeout) while the worker still serves them.
    if (*http != nullptr) (*http)->Stop();
    const int code = Shutdown(worker->get(), flags->drain_timeout_s, {server.get()});
    (*router)->Shutdown();
    worker_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    return ExitCode(worker->get(), code);
  };
}

std::function<int()> AddWorkerCommand(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("worker", "A worker: the engine behind kls.v1.Worker");
  auto flags = std::make_shared<WorkerFlags>();
  auto listen = std::make_shared<std::string>("127.0.0.1:50061");
  AddWorkerFlags(cmd, flags.get(), /*with_store=*/true);
  cmd->add_option("--listen", *listen, "gRPC address of kls.v1.Worker")->capture_default_str();
  return [flags, listen]() -> int {
    BlockTerminationSignals();
    absl::StatusOr<std::unique_ptr<worker::Worker>> worker = MakeWorker(*flags);
    if (!worker.ok()) {
      return Fail(worker.status(), 1);
    }
    // Declared after the worker, so destroyed before it.
    absl::StatusOr<std::unique_ptr<services::MetricsExporter>> metrics =
        StartWorkerMetrics(*flags, worker->get(), "worker");
    if (!metrics.ok()) return Fail(metrics.status(), 1);
    int port = 0;
    std::unique_ptr<grpc::Server> server = BuildServer(*listen, {(*worker)->service()}, &port);
    if (server == nullptr) return 1;
    (*worker)->AttachHealth(server->GetHealthCheckService());
    std::fprintf(stderr, "kls worker: listening on %s\n", listen->c_str());
    ExitOnBackendFailure(worker->get());
    WaitForSignal();
    return ExitCode(worker->get(), Shutdown(worker->get(), flags->drain_timeout_s, {server.get()}));
  };
}

std::function<int()> AddRouterCommand(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("router", "A router: kls.v1.Sessions over workers");
  auto listen = std::make_shared<std::string>("127.0.0.1:50051");
  auto workers = std::make_shared<std::string>();
  auto api_keys = std::make_shared<std::string>();
  cmd->add_option("--listen", *listen, "gRPC address of kls.v1.Sessions")->capture_default_str();
  cmd->add_option("--workers", *workers, "Workers: HOST:PORT,... or dns:///NAME:PORT (re-resolved)")
      ->required();
  cmd->add_option("--api-keys", *api_keys, "File of \"<key> <tenant>\" lines; none: open");
  auto http_flags = std::make_shared<HttpFlags>();
  http_flags->model_name = "kls";
  AddHttpFlags(cmd, http_flags.get(),
               "OpenAI-compatible HTTP API on HOST:PORT; empty (default): off",
               "Model name of the HTTP API (default: kls)");
  return [listen, workers, api_keys, http_flags]() -> int {
    BlockTerminationSignals();
    router::RouterOptions options;
    options.workers = SplitList(*workers);
    options.api_keys_file = *api_keys;
    absl::StatusOr<std::unique_ptr<router::Router>> router = router::Router::Create(options);
    if (!router.ok()) {
      return Fail(router.status(), 2);
    }
    int port = 0;
    std::unique_ptr<grpc::Server> server = BuildServer(*listen, {(*router)->service()}, &port);
    if (server == nullptr) return 1;
    absl::StatusOr<std::unique_ptr<router::HttpApi>> http =
        StartHttpApi(*http_flags, http_flags->model_name, server.get(), router->get(),
                     absl::Seconds(10), "router");
    if (!http.ok()) return Fail(http.status(), 1);
    std::fprintf(stderr, "kls router: listening on %s\n", listen->c_str());
    WaitForSignal();
    if (*http != nullptr) (*http)->Stop();
    const int code = Shutdown(nullptr, 0, {server.get()});
    (*router)->Shutdown();
    return code;
  };
}

std::function<int()> AddStoreCommand(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("store", "A store shard: one RocksDB as kls.v1.StateStore");
  auto listen = std::make_shared<std::string>("127.0.0.1:50071");
  auto data_dir = std::make_shared<std::string>("kls-store");
  cmd->add_option("--listen", *listen, "gRPC address of kls.v1.StateStore")->capture_default_str();
  cmd->add_option("--data-dir", *data_dir, "RocksDB directory")->capture_default_str();
  return [listen, data_dir]() -> int {
    BlockTerminationSignals();
    store::RocksDbShardOptions options;
    options.dir = *data_dir;
    std::error_code error;
    std::filesystem::create_directories(options.dir, error);
    if (error) {
      std::fprintf(stderr, "error: cannot create %s: %s\n", options.dir.c_str(),
                   error.message().c_str());
      return 1;
    }
    absl::StatusOr<std::unique_ptr<store::RocksDbShard>> shard = store::RocksDbShard::Open(options);
    if (!shard.ok()) {
      return Fail(shard.status(), 1);
    }
    store::StateStoreService service(shard->get(), store::StateStoreServiceOptions());
    int port = 0;
    std::unique_ptr<grpc::Server> server = BuildServer(*listen, {&service}, &port);
    if (server == nullptr) return 1;
    std::fprintf(stderr, "kls store: listening on %s (data %s)\n", listen->c_str(),
                 data_dir->c_str());
    WaitForSignal();
    return Shutdown(nullptr, 0, {server.get()});
  };
}

}  // namespace kls::cli

// In-process kls clusters on loopback for integration tests: workers (each with an embedded
// store or remote store shards), store shard servers, a router, and a Sessions client. Plus the
// uninterrupted reference run that turn-by-turn results are compared against.
#ifndef KLS_TESTS_SERVICES_INTEGRATION_CLUSTER_H_
#define KLS_TESTS_SERVICES_INTEGRATION_CLUSTER_H_

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kls/v1/sessions.grpc.pb.h"
#include "services/router/router.h"
#include "services/store/rocksdb_shard.h"
#include "services/store/store_service.h"
#include "services/worker/worker.h"
#include "tests/engine/tiny_model.h"

namespace kls::testing {

// The tiny model's directory, written once per test binary.
inline const std::string& TinyModelDir() {
  static const std::string* dir = new std::string(WriteModel("tiny", 7));
  return *dir;
}

struct ServedWorker {
  std::unique_ptr<worker::Worker> worker;
  std::unique_ptr<grpc::Server> server;
  std::string address;

  ~ServedWorker() { Stop(); }
  void Stop() {
    if (server != nullptr) server->Shutdown(gpr_now(GPR_CLOCK_REALTIME));
    server.reset();
    worker.reset();
  }
};

inline std::unique_ptr<ServedWorker> StartWorker(worker::WorkerOptions options) {
  auto served = std::make_unique<ServedWorker>();
  if (options.model_dir.empty()) options.model_dir = TinyModelDir();
  options.gc_interval = absl::ZeroDuration();
  absl::StatusOr<std::unique_ptr<worker::Worker>> w = worker::Worker::Create(options);
  EXPECT_TRUE(w.ok()) << w.status();
  if (!w.ok()) return nullptr;
  served->worker = *std::move(w);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(served->worker->service());
  served->server = builder.BuildAndStart();
  EXPECT_NE(served->server, nullptr);
  served->address = "127.0.0.1:" + std::to_string(port);
  served->worker->AttachHealth(served->server->GetHealthCheckService());
  return served;
}

struct ServedStoreShard {
  std::unique_ptr<store::RocksDbShard> shard;
  std::unique_ptr<store::StateStoreService> service;
  std::unique_ptr<grpc::Server> server;
  std::string address;
  ~ServedStoreShard() {
    if (server != nullptr) server->Shutdown(gpr_now(GPR_CLOCK_REALTIME));
  }
};

struct ServedRouter {
  std::unique_ptr<router::Router> router;
  std::unique_ptr<grpc::Server> server;
  std::string address;
  std::unique_ptr<kls::v1::Sessions::Stub> client;
  ~ServedRouter() {
    if (server != nullptr) server->Shutdown(gpr_now(GPR_CLOCK_REALTIME));
    if (router != nullptr) router->Shutdown();
  }
};

inline std::unique_ptr<ServedRouter> StartRouter(const std::vector<std::string>& workers,
                                                 const std::string& api_keys_file = "") {
  auto served = std::make_unique<ServedRouter>();
  router::RouterOptions options;
  options.workers = workers;
  options.api_keys_file = api_keys_file;
  options.health_interval = absl::Milliseconds(50);
  absl::StatusOr<std::unique_ptr<router::Router>> router = router::Router::Create(options);
  EXPECT_TRUE(router.ok()) << router.status();
  served->router = *std::move(router);
  EXPECT_TRUE(served->router->WaitForReady(absl::Seconds(10)).ok());
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(served->router->service());
  served->server = builder.BuildAndStart();
  served->address = "127.0.0.1:" + std::to_string(port);
  served->client = kls::v1::Sessions::NewStub(
      grpc::CreateChannel(served->address, grpc::InsecureChannelCredentials()));
  return served;
}

// The outcome of one Generate call as a client sees it.
struct TurnResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  kls::v1::GenerateResponse final;  // the last message
  int messages = 0;
};

inline TurnResult RunTurn(kls::v1::Sessions::Stub* client, const kls::v1::GenerateRequest& request,
                          int cancel_after_tokens = -1) {
  TurnResult result;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  std::unique_ptr<grpc::ClientReader<kls::v1::GenerateResponse>> reader =
      client->Generate(&context, request);
  kls::v1::GenerateResponse response;
  while (reader->Read(&response)) {
    ++result.messages;
    result.tokens.insert(result.tokens.end(), response.token_ids().begin(),
                         response.token_ids().end());
    result.text += response.text();
    result.final = response;
    if (cancel_after_tokens >= 0 && static_cast<int>(result.tokens.size()) >= cancel_after_tokens) {
      context.TryCancel();
    }
  }
  result.status = reader->Finish();
  return result;
}

inline kls::v1::GenerateRequest TokensTurn(const std::string& session_id,
                                           const std::vector<int32_t>& input, int max_tokens,
                                           const std::string& request_id = "") {
  kls::v1::GenerateRequest request;
  request.set_session_id(session_id);
  for (int32_t id : input) request.add_input_tokens(static_cast<uint32_t>(id));
  request.mutable_sampling()->set_temperature(0);
  request.mutable_sampling()->set_max_tokens(max_tokens);
  request.mutable_sampling()->set_ignore_eos(true);  // fixed-length turns
  request.set_request_id(request_id);
  return request;
}

inline absl::StatusOr<kls::v1::Session> CreateSession(kls::v1::Sessions::Stub* client,
                                                      const std::string& id,
                                                      const std::string& system_prompt = "") {
  grpc::ClientContext context;
  kls::v1::CreateSessionRequest request;
  request.set_session_id(id);
  request.set_system_prompt(system_prompt);
  kls::v1::Session session;
  grpc::Status status = client->CreateSession(&context, request, &session);
  if (!status.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  }
  return session;
}

// The reference: all of `history` fed at once into a fresh state, then `max_tokens` greedy
// tokens (no stop token), as one uninterrupted run.
inline std::vector<int32_t> UninterruptedRun(const std::vector<int32_t>& history, int max_tokens) {
  const engine::LoadedModel& model = TinyModel();
  absl::StatusOr<std::unique_ptr<engine::CpuBackend>> backend =
      engine::CpuBackend::Create(model.weights);
  EXPECT_TRUE(backend.ok());
  absl::StatusOr<std::unique_ptr<engine::BackendState>> state = (*backend)->NewState();
  EXPECT_TRUE(state.ok()) << state.status();
  if (!state.ok()) return {};
  engine::GenerateOptions options;
  options.sampler.temperature = 0;
  options.max_tokens = max_tokens;
  absl::StatusOr<engine::GenerateResult> result =
      engine::Generate(**backend, state->get(), history, options);
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? result->tokens : std::vector<int32_t>();
}

// Deterministic pseudo-random input tokens (ordinary byte tokens, no specials).
inline std::vector<int32_t> InputTokens(int n, uint64_t seed) {
  std::vector<int32_t> out;
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    out.push_back(static_cast<int32_t>(32 + x % 90));  // printable ASCII bytes
  }
  return out;
}

}  // namespace kls::testing

#endif  // KLS_TESTS_SERVICES_INTEGRATION_CLUSTER_H_

// The router end to end on loopback: fake kls.v1.Worker services on ephemeral ports, a router
// server in process, and a kls.v1.Sessions client.
#include "services/router/router.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/file_util.h"
#include "common/rendezvous.h"
#include "kls/v1/sessions.grpc.pb.h"
#include "kls/v1/worker.grpc.pb.h"
#include "services/common/session_ids.h"
#include "tests/test_util.h"

namespace kls::router {
namespace {

using kls::v1::GenerateResponse;

// What a fake worker's Generate does.
enum class StreamMode {
  kTokens,                  // `chunks` responses (the last one final, version 7), then OK
  kUnavailableFirst,        // UNAVAILABLE before any response
  kUnavailableAfterTokens,  // two non-final responses, then UNAVAILABLE
  kUnavailableAfterFinal,   // a response, the final one (version 7), then UNAVAILABLE
  kHoldUntilCancel,         // one response, then nothing until the call is cancelled
  kStatus,                  // finishes at once with `status`
};

constexpr uint64_t kFinalVersion = 7;

// A kls.v1.Worker that records what it was asked and answers as configured. Every reply names
// the worker (Session.metadata["worker"], GenerateResponse.text "<worker>:<i>").
class FakeWorker final : public kls::v1::Worker::CallbackService {
 public:
  struct Call {
    std::string method;
    std::string tenant;
    std::string session_id;
    std::chrono::system_clock::time_point deadline;
  };

  void set_name(std::string name) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    name_ = std::move(name);
  }
  void set_unary_status(grpc::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    unary_status_ = std::move(status);
  }
  void set_stream(StreamMode mode, int chunks = 3, grpc::Status status = grpc::Status::OK)
      ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    mode_ = mode;
    chunks_ = chunks;
    stream_status_ = std::move(status);
  }
  void set_draining(bool draining) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    draining_ = draining;
  }

  int Count(const std::string& method) const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    int n = 0;
    for (const Call& call : calls_) n += call.method == method ? 1 : 0;
    return n;
  }
  std::vector<Call> calls() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return calls_;
  }
  int cancellations() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return cancellations_;
  }

  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* context,
                                          const kls::v1::WorkerCreateSessionRequest* request,
                                          kls::v1::Session* response) override {
    const std::string& id = request->request().session_id();
    return Unary(context, "CreateSession", request->tenant(), id, [&](const std::string& name) {
      response->set_session_id(id);
      (*response->mutable_metadata())["worker"] = name;
    });
  }
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* context,
                                       const kls::v1::WorkerGetSessionRequest* request,
                                       kls::v1::Session* response) override {
    const std::string& id = request->request().session_id();
    return Unary(context, "GetSession", request->tenant(), id, [&](const std::string& name) {
      response->set_session_id(id);
      (*response->mutable_metadata())["worker"] = name;
    });
  }
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* context,
                                         const kls::v1::WorkerListSessionsRequest* request,
                                         kls::v1::ListSessionsResponse* response) override {
    return Unary(context, "ListSessions", request->tenant(), "", [&](const std::string& name) {
      (*response->add_sessions()->mutable_metadata())["worker"] = name;
    });
  }
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* context,
                                          const kls::v1::WorkerDeleteSessionRequest* request,
                                          kls::v1::DeleteSessionResponse*) override {
    return Unary(context, "DeleteSession", request->tenant(), request->request().session_id(),
                 [](const std::string&) {});
  }
  grpc::ServerUnaryReactor* ForkSession(grpc::CallbackServerContext* context,
                                        const kls::v1::WorkerForkSessionRequest* request,
                                        kls::v1::Session* response) override {
    const kls::v1::ForkSessionRequest& fork = request->request();
    return Unary(context, "ForkSession", request->tenant(), fork.session_id(),
                 [&](const std::string& name) {
                   response->set_session_id(fork.new_session_id());
                   response->set_parent_session_id(fork.session_id());
                   (*response->mutable_metadata())["worker"] = name;
                 });
  }
  grpc::ServerUnaryReactor* GetLoad(grpc::CallbackServerContext* context,
                                    const kls::v1::GetLoadRequest*,
                                    kls::v1::Load* response) override {
    {
      absl::MutexLock lock(&mu_);
      response->set_draining(draining_);
    }
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerWriteReactor<GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const kls::v1::WorkerGenerateRequest* request) override;

 private:
  class Stream;

  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* context, std::string method,
                                  const std::string& tenant, const std::string& session_id,
                                  const std::function<void(const std::string&)>& fill) {
    grpc::Status status;
    std::string name;
    {
      absl::MutexLock lock(&mu_);
      calls_.push_back({std::move(method), tenant, session_id, context->deadline()});
      status = unary_status_;
      name = name_;
    }
    if (status.ok()) fill(name);
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(status);
    return reactor;
  }

  void RecordCancel() ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    ++cancellations_;
  }

  mutable absl::Mutex mu_;
  std::string name_ ABSL_GUARDED_BY(mu_);
  grpc::Status unary_status_ ABSL_GUARDED_BY(mu_);
  StreamMode mode_ ABSL_GUARDED_BY(mu_) = StreamMode::kTokens;
  int chunks_ ABSL_GUARDED_BY(mu_) = 3;
  grpc::Status stream_status_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<Call> calls_ ABSL_GUARDED_BY(mu_);
  int cancellations_ ABSL_GUARDED_BY(mu_) = 0;
};

class FakeWorker::Stream final : public grpc::ServerWriteReactor<GenerateResponse> {
 public:
  Stream(FakeWorker* worker, std::string name, std::string session_id, StreamMode mode, int chunks,
         grpc::Status status)
      : worker_(worker),
        name_(std::move(name)),
        session_id_(std::move(session_id)),
        mode_(mode),
        status_(std::move(status)) {
    switch (mode_) {
      case StreamMode::kTokens:
        total_ = chunks;
        break;
      case StreamMode::kUnavailableAfterTokens:
      case StreamMode::kUnavailableAfterFinal:
        total_ = 2;
        break;
      case StreamMode::kHoldUntilCancel:
        total_ = 1;
        break;
      case StreamMode::kUnavailableFirst:
      case StreamMode::kStatus:
        total_ = 0;
        break;
    }
    absl::MutexLock lock(&mu_);
    Next();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok || cancelled_) {
      FinishOnce(grpc::Status::CANCELLED);
      return;
    }
    ++sent_;
    Next();
  }

  void OnCancel() override {
    worker_->RecordCancel();
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
    if (!writing_) FinishOnce(grpc::Status::CANCELLED);
  }

  void OnDone() override { delete this; }

 private:
  void Next() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (sent_ < total_) {
      const bool final_message =
          sent_ + 1 == total_ &&
          (mode_ == StreamMode::kTokens || mode_ == StreamMode::kUnavailableAfterFinal);
      response_.Clear();
      response_.add_token_ids(static_cast<uint32_t>(sent_));
      response_.set_text(absl::StrCat(name_, ":", sent_));
      response_.set_session_id(session_id_);
      if (final_message) {
        response_.set_finish_reason(kls::v1::FINISH_REASON_STOP);
        response_.set_version(kFinalVersion);
      }
      writing_ = true;
      StartWrite(&response_);
      return;
    }
    switch (mode_) {
      case StreamMode::kTokens:
        FinishOnce(grpc::Status::OK);
        break;
      case StreamMode::kUnavailableFirst:
        FinishOnce(grpc::Status(grpc::StatusCode::UNAVAILABLE, "worker is draining"));
        break;
      case StreamMode::kUnavailableAfterTokens:
      case StreamMode::kUnavailableAfterFinal:
        FinishOnce(grpc::Status(grpc::StatusCode::UNAVAILABLE, "engine failed"));
        break;
      case StreamMode::kHoldUntilCancel:
        break;  // OnCancel finishes
      case StreamMode::kStatus:
        FinishOnce(status_);
        break;
    }
  }

  void FinishOnce(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  FakeWorker* const worker_;
  const std::string name_;
  const std::string session_id_;
  const StreamMode mode_;
  const grpc::Status status_;
  int total_ = 0;

  absl::Mutex mu_;
  GenerateResponse response_ ABSL_GUARDED_BY(mu_);
  int sent_ ABSL_GUARDED_BY(mu_) = 0;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

grpc::ServerWriteReactor<GenerateResponse>* FakeWorker::Generate(
    grpc::CallbackServerContext* context, const kls::v1::WorkerGenerateRequest* request) {
  std::string name;
  StreamMode mode;
  int chunks;
  grpc::Status status;
  {
    absl::MutexLock lock(&mu_);
    calls_.push_back(
        {"Generate", request->tenant(), request->request().session_id(), context->deadline()});
    name = name_;
    mode = mode_;
    chunks = chunks_;
    status = stream_status_;
  }
  return new Stream(this, std::move(name), request->request().session_id(), mode, chunks,
                    std::move(status));
}

// A fake worker process: the service, its server on 127.0.0.1:<ephemeral> and grpc.health.v1.
struct WorkerProcess {
  FakeWorker service;
  std::unique_ptr<grpc::Server> server;
  std::string address;

  void SetServing(bool serving) { server->GetHealthCheckService()->SetServingStatus("", serving); }
  void Kill() {
    server->Shutdown(std::chrono::system_clock::now());
    server->Wait();
  }
  ~WorkerProcess() {
    if (server != nullptr) Kill();
  }
};

std::unique_ptr<WorkerProcess> StartWorker() {
  grpc::EnableDefaultHealthCheckService(true);
  auto worker = std::make_unique<WorkerProcess>();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&worker->service);
  worker->server = builder.BuildAndStart();
  EXPECT_NE(worker->server, nullptr);
  EXPECT_GT(port, 0);
  worker->address = absl::StrCat("127.0.0.1:", port);
  worker->service.set_name(worker->address);
  return worker;
}

::testing::AssertionResult WaitUntil(const std::function<bool()>& condition,
                                     absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() > deadline) {
      return ::testing::AssertionFailure() << "condition not met within " << timeout;
    }
    absl::SleepFor(absl::Milliseconds(2));
  }
  return ::testing::AssertionSuccess();
}

// A router on 127.0.0.1:<ephemeral> and a client stub for it.
class RouterProcess {
 public:
  explicit RouterProcess(const RouterOptions& options) {
    absl::StatusOr<std::unique_ptr<Router>> router = Router::Create(options);
    EXPECT_TRUE(router.ok()) << router.status();
    if (!router.ok()) return;
    router_ = std::move(*router);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(router_->service());
    server_ = builder.BuildAndStart();
    EXPECT_NE(server_, nullptr);
    stub_ = kls::v1::Sessions::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }
  ~RouterProcess() {
    if (server_ != nullptr) {
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
      server_->Wait();
    }
    if (router_ != nullptr) router_->Shutdown();
  }

  Router& router() { return *router_; }
  kls::v1::Sessions::Stub& stub() { return *stub_; }

  EndpointStatus Status(const std::string& name) {
    for (const EndpointStatus& status : router_->pool().Endpoints()) {
      if (status.name == name) return status;
    }
    return EndpointStatus();
  }
  bool IsReady(const std::string& name) { return Status(name).ready; }
  ::testing::AssertionResult WaitReady(const std::string& name, bool ready = true) {
    return WaitUntil([&] { return IsReady(name) == ready; });
  }

 private:
  std::unique_ptr<Router> router_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<kls::v1::Sessions::Stub> stub_;
};

RouterOptions FastOptions(const std::vector<std::unique_ptr<WorkerProcess>>& workers) {
  RouterOptions options;
  for (const auto& worker : workers) options.workers.push_back(worker->address);
  options.health_interval = absl::Milliseconds(50);
  options.health_timeout = absl::Milliseconds(500);
  return options;
}

std::vector<std::unique_ptr<WorkerProcess>> StartWorkers(int n) {
  std::vector<std::unique_ptr<WorkerProcess>> workers;
  for (int i = 0; i < n; ++i) workers.push_back(StartWorker());
  return workers;
}

// The worker rendezvous hashing puts first for (tenant, session_id).
std::string FirstOwner(const std::vector<std::unique_ptr<WorkerProcess>>& workers,
                       const std::string& tenant, const std::string& session_id) {
  std::vector<std::string> names;
  for (const auto& worker : workers) names.push_back(worker->address);
  return names[RendezvousRank(services::PlacementKey(tenant, session_id), names, 1)[0]];
}

// A session id (prefix + number) whose first rendezvous owner is `owner`.
std::string SessionOwnedBy(const std::vector<std::unique_ptr<WorkerProcess>>& workers,
                           const std::string& owner, const std::string& prefix,
                           const std::string& tenant = kDefaultTenant) {
  for (int i = 0; i < 10000; ++i) {
    std::string id = absl::StrCat(prefix, i);
    if (FirstOwner(workers, tenant, id) == owner) return id;
  }
  ADD_FAILURE() << "no session id with prefix " << prefix << " lands on " << owner;
  return "";
}

struct StreamResult {
  std::vector<GenerateResponse> responses;
  grpc::Status status;
};

StreamResult RunGenerate(kls::v1::Sessions::Stub& stub, const std::string& session_id,
                         grpc::ClientContext* context = nullptr) {
  grpc::ClientContext local;
  if (context == nullptr) context = &local;
  kls::v1::GenerateRequest request;
  request.set_session_id(session_id);
  request.add_input_tokens(1);
  StreamResult result;
  std::unique_ptr<grpc::ClientReader<GenerateResponse>> reader = stub.Generate(context, request);
  GenerateResponse response;
  while (reader->Read(&response)) result.responses.push_back(response);
  result.status = reader->Finish();
  return result;
}

// Starts Generate on `session_id` (no input needed by the fake workers) and reads the first
// response into *first; the caller finishes the stream.
std::unique_ptr<grpc::ClientReader<GenerateResponse>> OpenStream(kls::v1::Sessions::Stub& stub,
                                                                 const std::string& session_id,
                                                                 grpc::ClientContext* context,
                                                                 GenerateResponse* first) {
  kls::v1::GenerateRequest request;
  request.set_session_id(session_id);
  std::unique_ptr<grpc::ClientReader<GenerateResponse>> reader = stub.Generate(context, request);
  EXPECT_TRUE(reader->Read(first)) << "no first response";
  return reader;
}

// "<worker>" of the first response's text "<worker>:<i>".
std::string StreamWorker(const StreamResult& result) {
  if (result.responses.empty()) return "";
  const std::string& text = result.responses.front().text();
  return text.substr(0, text.rfind(':'));
}

grpc::Status GetSession(kls::v1::Sessions::Stub& stub, const std::string& session_id,
                        kls::v1::Session* session, grpc::ClientContext* context = nullptr) {
  grpc::ClientContext local;
  kls::v1::GetSessionRequest request;
  request.set_session_id(session_id);
  return stub.GetSession(context != nullptr ? context : &local, request, session);
}

TEST(RouterTest, CreateRejectsBadOptions) {
  RouterOptions options;
  options.max_attempts = 0;
  EXPECT_EQ(Router::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.max_attempts = 3;
  options.api_keys_file = "/nonexistent/kls/api_keys";
  EXPECT_EQ(Router::Create(options).status().code(), absl::StatusCode::kNotFound);
  options.api_keys_file.clear();
  options.workers = {"dns:///no-port"};
  EXPECT_EQ(Router::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RouterTest, PlacementIsDeterministicAcrossRoutersAndStable) {
  auto workers = StartWorkers(3);
  RouterProcess a(FastOptions(workers));
  RouterOptions reversed = FastOptions(workers);
  std::swap(reversed.workers.front(), reversed.workers.back());
  RouterProcess b(reversed);
  for (const auto& worker : workers) {
    ASSERT_TRUE(a.WaitReady(worker->address));
    ASSERT_TRUE(b.WaitReady(worker->address));
  }
  std::map<std::string, int> per_worker;
  for (int i = 0; i < 24; ++i) {
    const std::string id = absl::StrCat("placed-", i);
    const std::string expected = FirstOwner(workers, kDefaultTenant, id);
    grpc::ClientContext context;
    kls::v1::CreateSessionRequest create;
    create.set_session_id(id);
    kls::v1::Session session;
    ASSERT_TRUE(a.stub().CreateSession(&context, create, &session).ok());
    EXPECT_EQ(session.metadata().at("worker"), expected) << id;
    // The other router (no affinity, workers listed in another order) agrees; repeats stay.
    kls::v1::Session again;
    ASSERT_TRUE(GetSession(b.stub(), id, &again).ok());
    EXPECT_EQ(again.metadata().at("worker"), expected) << id;
    ASSERT_TRUE(GetSession(a.stub(), id, &again).ok());
    EXPECT_EQ(again.metadata().at("worker"), expected) << id;
    EXPECT_EQ(StreamWorker(RunGenerate(a.stub(), id)), expected) << id;
    ++per_worker[expected];
  }
  EXPECT_EQ(per_worker.size(), 3u) << "24 sessions should spread over all 3 workers";
}

TEST(RouterTest, NotServingAndDrainingWorkersAreSkipped) {
  auto workers = StartWorkers(2);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  ASSERT_TRUE(router.WaitReady(workers[1]->address));
  const std::string id = SessionOwnedBy(workers, workers[0]->address, "skip-");

  workers[0]->SetServing(false);
  ASSERT_TRUE(router.WaitReady(workers[0]->address, false));
  kls::v1::Session session;
  ASSERT_TRUE(GetSession(router.stub(), id, &session).ok());
  EXPECT_EQ(session.metadata().at("worker"), workers[1]->address);
  EXPECT_EQ(workers[0]->service.Count("GetSession"), 0);

  // Draining (from GetLoad) counts as not ready even while health says SERVING.
  workers[0]->SetServing(true);
  workers[0]->service.set_draining(true);
  const std::string other = SessionOwnedBy(workers, workers[0]->address, "drain-");
  ASSERT_TRUE(WaitUntil([&] {
    EndpointStatus status = router.Status(workers[0]->address);
    return status.serving && status.draining;
  }));
  ASSERT_FALSE(router.IsReady(workers[0]->address));
  ASSERT_TRUE(GetSession(router.stub(), other, &session).ok());
  EXPECT_EQ(session.metadata().at("worker"), workers[1]->address);
  EXPECT_EQ(workers[0]->service.Count("GetSession"), 0);

  // Nothing ready: UNAVAILABLE without touching a worker.
  workers[1]->SetServing(false);
  ASSERT_TRUE(router.WaitReady(workers[1]->address, false));
  grpc::Status status = GetSession(router.stub(), id, &session);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(status.error_message(), "no ready worker");
  StreamResult stream = RunGenerate(router.stub(), id);
  EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(stream.responses.empty());
}

TEST(RouterTest, AffinityKeepsSessionOnItsWorker) {
  auto workers = StartWorkers(2);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  ASSERT_TRUE(router.WaitReady(workers[1]->address));
  const std::string id = SessionOwnedBy(workers, workers[0]->address, "sticky-");

  // Its rendezvous owner is down, so the session lands on the other worker...
  workers[0]->SetServing(false);
  ASSERT_TRUE(router.WaitReady(workers[0]->address, false));
  EXPECT_EQ(StreamWorker(RunGenerate(router.stub(), id)), workers[1]->address);

  // ...and stays there when the owner comes back, because it is hot there now.
  workers[0]->SetServing(true);
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  EXPECT_EQ(StreamWorker(RunGenerate(router.stub(), id)), workers[1]->address);
  kls::v1::Session session;
  ASSERT_TRUE(GetSession(router.stub(), id, &session).ok());
  EXPECT_EQ(session.metadata().at("worker"), workers[1]->address);

  // A router without that affinity uses rendezvous order.
  RouterProcess fresh(FastOptions(workers));
  ASSERT_TRUE(fresh.WaitReady(workers[0]->address));
  ASSERT_TRUE(GetSession(fresh.stub(), id, &session).ok());
  EXPECT_EQ(session.metadata().at("worker"), workers[0]->address);

  // An affinity worker that stops being ready is bypassed.
  workers[1]->SetServing(false);
  ASSERT_TRUE(router.WaitReady(workers[1]->address, false));
  EXPECT_EQ(StreamWorker(RunGenerate(router.stub(), id)), workers[0]->address);
}

TEST(RouterTest, UnavailableBeforeFirstResponseRetriesOnNextWorker) {
  auto workers = StartWorkers(2);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  ASSERT_TRUE(router.WaitReady(workers[1]->address));
  const std::string id = SessionOwnedBy(workers, workers[0]->address, "retry-");
  workers[0]->service.set_stream(StreamMode::kUnavailableFirst);

  StreamResult result = RunGenerate(router.stub(), id);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  ASSERT_EQ(result.responses.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(result.responses[i].text(), absl::StrCat(workers[1]->address, ":", i));
  }
  EXPECT_EQ(result.responses.back().version(), kFinalVersion);
  EXPECT_EQ(workers[0]->service.Count("Generate"), 1);
  EXPECT_EQ(workers[1]->service.Count("Generate"), 1);
  EXPECT_EQ(router.router().sessions().affinity().Get(services::PlacementKey(kDefaultTenant, id)),
            workers[1]->address);

  // Unary calls retry the same way.
  workers[0]->SetServing(true);
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  workers[0]->service.set_unary_status(grpc::Status(grpc::StatusCode::UNAVAILABLE, "draining"));
  const std::string other = SessionOwnedBy(workers, workers[0]->address, "unary-retry-");
  kls::v1::Session session;
  ASSERT_TRUE(GetSession(router.stub(), other, &session).ok());
  EXPECT_EQ(session.metadata().at("worker"), workers[1]->address);
  EXPECT_EQ(workers[0]->service.Count("GetSession"), 1);
}

TEST(RouterTest, DeadWorkerProcessIsRetriedAndMarkedUnavailable) {
  auto workers = StartWorkers(2);
  RouterOptions options = FastOptions(workers);
  options.health_interval = absl::Hours(1);  // only the start-up probe: the call finds the death
  RouterProcess router(options);
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  ASSERT_TRUE(router.WaitReady(workers[1]->address));
  const std::string id = SessionOwnedBy(workers, workers[0]->address, "dead-");
  workers[0]->Kill();
  workers[0]->server.reset();

  StreamResult result = RunGenerate(router.stub(), id);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  ASSERT_EQ(result.responses.size(), 3u);
  EXPECT_EQ(StreamWorker(result), workers[1]->address);
  EXPECT_FALSE(router.IsReady(workers[0]->address));
  EXPECT_TRUE(router.IsReady(workers[1]->address));
}

TEST(RouterTest, UnavailableAfterStreamingEndsStreamWithoutRetry) {
  auto workers = StartWorkers(2);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  ASSERT_TRUE(router.WaitReady(workers[1]->address));
  const std::string id = SessionOwnedBy(workers, workers[0]->address, "midway-");

  workers[0]->service.set_stream(StreamMode::kUnavailableAfterTokens);
  StreamResult result = RunGenerate(router.stub(), id);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(absl::StrContains(result.status.error_message(), "turn not committed"))
      << result.status.error_message();
  EXPECT_TRUE(absl::StrContains(result.status.error_message(), workers[0]->address))
      << result.status.error_message();
  ASSERT_EQ(result.responses.size(), 2u);
  EXPECT_EQ(StreamWorker(result), workers[0]->address);
  EXPECT_EQ(workers[1]->service.Count("Generate"), 0);

  // When the final message got through, the error names the committed version.
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  workers[0]->service.set_stream(StreamMode::kUnavailableAfterFinal);
  result = RunGenerate(router.stub(), id);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(absl::StrContains(result.status.error_message(),
                                absl::StrCat("committed version ", kFinalVersion)))
      << result.status.error_message();
  EXPECT_EQ(result.responses.size(), 2u);
  EXPECT_EQ(workers[1]->service.Count("Generate"), 0);
}

TEST(RouterTest, LongStreamArrivesCompleteAndInOrder) {
  auto workers = StartWorkers(1);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  workers[0]->service.set_stream(StreamMode::kTokens, 2000);
  StreamResult result = RunGenerate(router.stub(), "long");
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  ASSERT_EQ(result.responses.size(), 2000u);
  for (uint32_t i = 0; i < 2000; ++i) {
    ASSERT_EQ(result.responses[i].token_ids_size(), 1);
    ASSERT_EQ(result.responses[i].token_ids(0), i);
  }
  EXPECT_EQ(result.responses.back().finish_reason(), kls::v1::FINISH_REASON_STOP);
}

TEST(RouterTest, ConcurrentStreamsSurviveCancellationAtAnyPoint) {
  auto workers = StartWorkers(2);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  ASSERT_TRUE(router.WaitReady(workers[1]->address));
  static constexpr int kChunks = 300;
  for (const auto& worker : workers) worker->service.set_stream(StreamMode::kTokens, kChunks);
  std::vector<std::thread> clients;
  for (int t = 0; t < 8; ++t) {
    clients.emplace_back([&router, t] {
      for (int i = 0; i < 6; ++i) {
        grpc::ClientContext context;
        kls::v1::GenerateRequest request;
        request.set_session_id(absl::StrCat("stress-", t, "-", i));
        auto reader = router.stub().Generate(&context, request);
        // Cancel after a varying number of reads; -1 reads everything.
        const int cancel_after = (t + i) % 3 == 0 ? -1 : (t * 37 + i * 11) % kChunks;
        GenerateResponse response;
        int read = 0;
        while (reader->Read(&response)) {
          EXPECT_EQ(response.token_ids(0), static_cast<uint32_t>(read));
          if (++read == cancel_after) context.TryCancel();
        }
        grpc::Status status = reader->Finish();
        if (cancel_after < 0) {
          EXPECT_TRUE(status.ok()) << status.error_message();
          EXPECT_EQ(read, kChunks);
        } else {
          EXPECT_TRUE(status.ok() || status.error_code() == grpc::StatusCode::CANCELLED)
              << status.error_message();
        }
      }
    });
  }
  for (std::thread& client : clients) client.join();
}

TEST(RouterTest, ClientCancellationReachesWorker) {
  auto workers = StartWorkers(1);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  workers[0]->service.set_stream(StreamMode::kHoldUntilCancel);

  grpc::ClientContext context;
  GenerateResponse response;
  auto reader = OpenStream(router.stub(), "cancel-me", &context, &response);
  EXPECT_EQ(response.text(), absl::StrCat(workers[0]->address, ":0"));
  EXPECT_EQ(workers[0]->service.cancellations(), 0);
  context.TryCancel();
  EXPECT_TRUE(WaitUntil([&] { return workers[0]->service.cancellations() == 1; }));
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

// A proxied call holds its worker endpoints until its last callback; WaitForProxiedCalls (and
// so Router::Shutdown) waits for that, so the pool frees the workers' channels, never a callback.
TEST(RouterTest, ProxiedCallsHoldTheirWorkersUntilTheirLastCallback) {
  auto workers = StartWorkers(1);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  router.router().pool().Shutdown();  // no probe round holds the endpoint from here on
  RouterService& sessions = router.router().sessions();
  std::vector<EndpointPtr> ranked = router.router().pool().Rank("any");
  ASSERT_EQ(ranked.size(), 1u);
  const EndpointPtr endpoint = ranked[0];
  ranked.clear();
  constexpr long kIdleHolders = 2;  // the pool and this test
  EXPECT_EQ(endpoint.use_count(), kIdleHolders);
  EXPECT_TRUE(sessions.WaitForProxiedCalls(absl::ZeroDuration()).ok());

  workers[0]->service.set_stream(StreamMode::kHoldUntilCancel);
  grpc::ClientContext context;
  GenerateResponse response;
  auto reader = OpenStream(router.stub(), "held", &context, &response);
  EXPECT_EQ(sessions.proxied_calls(), 1);
  EXPECT_GT(endpoint.use_count(), kIdleHolders);
  const absl::Status waited = sessions.WaitForProxiedCalls(absl::Milliseconds(50));
  EXPECT_EQ(waited.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(waited.message(), "1 proxied calls")) << waited;

  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(sessions.WaitForProxiedCalls(absl::Seconds(10)).ok());
  EXPECT_EQ(sessions.proxied_calls(), 0);
  EXPECT_EQ(endpoint.use_count(), kIdleHolders);

  // Unary calls too (a proxy may still be finishing after its answer arrived: wait for it).
  kls::v1::Session session;
  EXPECT_TRUE(GetSession(router.stub(), "held", &session).ok());
  EXPECT_TRUE(sessions.WaitForProxiedCalls(absl::Seconds(10)).ok());
  EXPECT_EQ(endpoint.use_count(), kIdleHolders);
}

TEST(RouterTest, ClientDeadlinePropagatesToWorker) {
  auto workers = StartWorkers(1);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));

  const auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(30);
  grpc::ClientContext stream_context;
  stream_context.set_deadline(deadline);
  ASSERT_TRUE(RunGenerate(router.stub(), "timed", &stream_context).status.ok());
  grpc::ClientContext unary_context;
  unary_context.set_deadline(deadline);
  kls::v1::Session session;
  ASSERT_TRUE(GetSession(router.stub(), "timed", &session, &unary_context).ok());
  // And no deadline stays no deadline.
  ASSERT_TRUE(GetSession(router.stub(), "untimed", &session).ok());

  std::vector<FakeWorker::Call> calls = workers[0]->service.calls();
  ASSERT_EQ(calls.size(), 3u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(calls[i].session_id, "timed");
    // Deadlines travel as timeouts, so allow for the hops' latency.
    EXPECT_LE(calls[i].deadline, deadline + std::chrono::seconds(1)) << calls[i].method;
    EXPECT_GE(calls[i].deadline, deadline - std::chrono::seconds(5)) << calls[i].method;
  }
  EXPECT_GT(calls[2].deadline, std::chrono::system_clock::now() + std::chrono::hours(24 * 365));
}

TEST(RouterTest, WorkerStatusPassesThroughUnchanged) {
  auto workers = StartWorkers(2);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  ASSERT_TRUE(router.WaitReady(workers[1]->address));
  const std::string id = SessionOwnedBy(workers, workers[0]->address, "status-");

  workers[0]->service.set_unary_status(
      grpc::Status(grpc::StatusCode::NOT_FOUND, "session \"" + id + "\" not found"));
  kls::v1::Session session;
  grpc::Status status = GetSession(router.stub(), id, &session);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(status.error_message(), "session \"" + id + "\" not found");

  workers[0]->service.set_stream(
      StreamMode::kStatus, 0,
      grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "sampling.top_p 2 is not in (0, 1]"));
  StreamResult result = RunGenerate(router.stub(), id);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(result.status.error_message(), "sampling.top_p 2 is not in (0, 1]");
  EXPECT_TRUE(result.responses.empty());

  workers[0]->service.set_stream(
      StreamMode::kStatus, 0,
      grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "no state slot free"));
  result = RunGenerate(router.stub(), id);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(result.status.error_message(), "no state slot free");
  // Only UNAVAILABLE moves a call to another worker.
  EXPECT_EQ(workers[1]->service.Count("GetSession"), 0);
  EXPECT_EQ(workers[1]->service.Count("Generate"), 0);
}

TEST(RouterTest, ApiKeysAuthenticateAndNameTheTenant) {
  auto workers = StartWorkers(1);
  const std::string dir = kls::testing::MakeTempDir();
  const std::string keys_path = dir + "/api_keys";
  ASSERT_TRUE(WriteStringToFile(keys_path,
                                "# kls API keys\n"
                                "key-alpha tenant-a\n"
                                "\n"
                                "key-beta\ttenant-b   # the beta team\n")
                  .ok());
  RouterOptions options = FastOptions(workers);
  options.api_keys_file = keys_path;
  RouterProcess router(options);
  ASSERT_TRUE(router.WaitReady(workers[0]->address));

  kls::v1::Session session;
  grpc::Status status = GetSession(router.stub(), "s1", &session);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer key-gamma");
    status = GetSession(router.stub(), "s1", &session, &context);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_FALSE(absl::StrContains(status.error_message(), "key-gamma"));
  }
  {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Basic key-alpha");
    EXPECT_EQ(GetSession(router.stub(), "s1", &session, &context).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    StreamResult result = RunGenerate(router.stub(), "s1", &context);
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  EXPECT_TRUE(workers[0]->service.calls().empty());

  {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer key-beta");
    ASSERT_TRUE(GetSession(router.stub(), "s1", &session, &context).ok());
  }
  {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "bearer key-alpha");
    ASSERT_TRUE(RunGenerate(router.stub(), "s1", &context).status.ok());
  }
  std::vector<FakeWorker::Call> calls = workers[0]->service.calls();
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0].tenant, "tenant-b");
  EXPECT_EQ(calls[1].tenant, "tenant-a");
  kls::testing::RemoveTree(dir);
}

TEST(RouterTest, WithoutKeysEveryCallerIsTheDefaultTenant) {
  auto workers = StartWorkers(1);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Bearer whatever");
  kls::v1::Session session;
  ASSERT_TRUE(GetSession(router.stub(), "s1", &session, &context).ok());
  ASSERT_EQ(workers[0]->service.calls().size(), 1u);
  EXPECT_EQ(workers[0]->service.calls()[0].tenant, kDefaultTenant);
}

TEST(RouterTest, NoWorkersMeansUnavailable) {
  RouterOptions options;
  options.health_interval = absl::Milliseconds(50);
  RouterProcess router(options);
  EXPECT_EQ(router.router().WaitForReady(absl::Milliseconds(20)).code(),
            absl::StatusCode::kDeadlineExceeded);
  grpc::ClientContext context;
  kls::v1::Session session;
  grpc::Status status =
      router.stub().CreateSession(&context, kls::v1::CreateSessionRequest(), &session);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(status.error_message(), "no ready worker");
  StreamResult result = RunGenerate(router.stub(), "s1");
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(result.status.error_message(), "no ready worker");
  grpc::ClientContext list_context;
  kls::v1::ListSessionsResponse list;
  EXPECT_EQ(
      router.stub().ListSessions(&list_context, kls::v1::ListSessionsRequest(), &list).error_code(),
      grpc::StatusCode::UNAVAILABLE);
}

TEST(RouterTest, ForkGoesToSourceWorkerAndTheForkStaysThere) {
  auto workers = StartWorkers(3);
  RouterProcess router(FastOptions(workers));
  for (const auto& worker : workers) ASSERT_TRUE(router.WaitReady(worker->address));
  const std::string source = "fork-source";
  const std::string home = FirstOwner(workers, kDefaultTenant, source);
  std::string fork_id;
  for (int i = 0; i < 100 && fork_id.empty(); ++i) {
    std::string candidate = absl::StrCat("fork-", i);
    if (FirstOwner(workers, kDefaultTenant, candidate) != home) fork_id = candidate;
  }
  ASSERT_FALSE(fork_id.empty());

  grpc::ClientContext context;
  kls::v1::ForkSessionRequest fork;
  fork.set_session_id(source);
  fork.set_new_session_id(fork_id);
  kls::v1::Session forked;
  ASSERT_TRUE(router.stub().ForkSession(&context, fork, &forked).ok());
  EXPECT_EQ(forked.session_id(), fork_id);
  EXPECT_EQ(forked.parent_session_id(), source);
  EXPECT_EQ(forked.metadata().at("worker"), home);
  // The fork's own rendezvous owner is elsewhere, but its state is hot on `home`.
  EXPECT_EQ(StreamWorker(RunGenerate(router.stub(), fork_id)), home);
  kls::v1::Session session;
  ASSERT_TRUE(GetSession(router.stub(), fork_id, &session).ok());
  EXPECT_EQ(session.metadata().at("worker"), home);

  // Without new_session_id the router names the fork.
  grpc::ClientContext unnamed_context;
  fork.clear_new_session_id();
  ASSERT_TRUE(router.stub().ForkSession(&unnamed_context, fork, &forked).ok());
  EXPECT_EQ(forked.session_id().size(), 32u);
  EXPECT_TRUE(services::ValidateSessionId("id", forked.session_id()).ok());
  EXPECT_NE(forked.session_id(), fork_id);
}

TEST(RouterTest, CreateNamesSessionsAndDeleteForgetsAffinity) {
  auto workers = StartWorkers(2);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  ASSERT_TRUE(router.WaitReady(workers[1]->address));

  grpc::ClientContext context;
  kls::v1::CreateSessionRequest create;
  create.set_system_prompt("be brief");
  kls::v1::Session created;
  ASSERT_TRUE(router.stub().CreateSession(&context, create, &created).ok());
  const std::string id = created.session_id();
  ASSERT_EQ(id.size(), 32u);
  EXPECT_EQ(id.find_first_not_of("0123456789abcdef"), std::string::npos) << id;
  EXPECT_EQ(created.metadata().at("worker"), FirstOwner(workers, kDefaultTenant, id));
  const std::string key = services::PlacementKey(kDefaultTenant, id);
  EXPECT_EQ(router.router().sessions().affinity().Get(key), created.metadata().at("worker"));

  grpc::ClientContext delete_context;
  kls::v1::DeleteSessionRequest remove;
  remove.set_session_id(id);
  kls::v1::DeleteSessionResponse removed;
  ASSERT_TRUE(router.stub().DeleteSession(&delete_context, remove, &removed).ok());
  EXPECT_FALSE(router.router().sessions().affinity().Get(key).has_value());
  int deletes = 0;
  for (const auto& worker : workers) deletes += worker->service.Count("DeleteSession");
  EXPECT_EQ(deletes, 1);

  grpc::ClientContext list_context;
  kls::v1::ListSessionsResponse list;
  ASSERT_TRUE(
      router.stub().ListSessions(&list_context, kls::v1::ListSessionsRequest(), &list).ok());
  ASSERT_EQ(list.sessions_size(), 1);
}

TEST(RouterTest, MalformedIdsAreRejectedBeforeAnyWorker) {
  auto workers = StartWorkers(1);
  RouterProcess router(FastOptions(workers));
  ASSERT_TRUE(router.WaitReady(workers[0]->address));
  kls::v1::Session session;
  grpc::Status status = GetSession(router.stub(), "../etc/passwd", &session);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "session_id")) << status.error_message();
  EXPECT_EQ(GetSession(router.stub(), "", &session).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(RunGenerate(router.stub(), "has space").status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  {
    grpc::ClientContext context;
    kls::v1::CreateSessionRequest create;
    create.set_session_id(std::string(129, 'a'));
    EXPECT_EQ(router.stub().CreateSession(&context, create, &session).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    grpc::ClientContext context;
    kls::v1::ForkSessionRequest fork;
    fork.set_session_id("ok");
    fork.set_new_session_id("not/ok");
    status = router.stub().ForkSession(&context, fork, &session);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_TRUE(absl::StrContains(status.error_message(), "new_session_id"));
  }
  EXPECT_TRUE(workers[0]->service.calls().empty());
}

}  // namespace
}  // namespace kls::router

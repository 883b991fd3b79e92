#include "services/router/router_service.h"

#include <grpcpp/client_context.h>
#include <grpcpp/support/client_callback.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <random>
#include <string_view>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "kls/v1/worker.grpc.pb.h"
#include "services/common/grpc_status.h"
#include "services/common/session_ids.h"

namespace kls::router {
namespace {

using kls::v1::GenerateResponse;
using WorkerAsync = kls::v1::Worker::StubInterface::async_interface;

grpc::Status NoReadyWorker() {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE, "no ready worker");
}

// Finishes a unary call at once (authentication or validation failed).
grpc::ServerUnaryReactor* Reject(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(services::ToGrpcStatus(status));
  return reactor;
}

// Finishes a Generate stream at once, with no message.
class RejectedStream final : public grpc::ServerWriteReactor<GenerateResponse> {
 public:
  explicit RejectedStream(const absl::Status& status) { Finish(services::ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

// Proxies one unary call to the first candidate worker, moving on to the next candidate when a
// worker answers UNAVAILABLE. The server reactor finishes from the worker call's callback, so
// no thread waits. Deletes itself in OnDone; Finish is always the last thing it does outside
// OnCancel, so nothing touches the service after the server may have shut down.
template <typename WorkerRequest, typename Response>
class UnaryProxy final : public grpc::ServerUnaryReactor {
 public:
  using Method = void (WorkerAsync::*)(grpc::ClientContext*, const WorkerRequest*, Response*,
                                       std::function<void(grpc::Status)>);
  // Runs on success, before the reply is sent (e.g. to update affinity).
  using SuccessHook = std::function<void(const WorkerEndpoint&)>;

  UnaryProxy(RouterService* service, grpc::CallbackServerContext* server_context, WorkerPool* pool,
             std::vector<EndpointPtr> candidates, WorkerRequest request, Response* response,
             Method method, SuccessHook on_success)
      : call_ref_(service),
        server_context_(server_context),
        pool_(pool),
        candidates_(std::move(candidates)),
        request_(std::move(request)),
        response_(response),
        method_(method),
        on_success_(std::move(on_success)) {}

  // Starts the first attempt. Called once, by the handler that created the proxy.
  void Start() { StartNextAttempt(); }

  void OnCancel() override {
    grpc::ClientContext* current;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      current = current_;
    }
    // The context stays alive until OnDone, which gRPC runs after OnCancel returns.
    if (current != nullptr) current->TryCancel();
  }

  void OnDone() override { delete this; }

 private:
  void StartNextAttempt() {
    grpc::ClientContext* context = nullptr;
    const WorkerEndpoint* endpoint = nullptr;
    grpc::Status finish;
    {
      absl::MutexLock lock(&mu_);
      if (cancelled_) {
        finish = grpc::Status::CANCELLED;
      } else if (next_candidate_ >= candidates_.size()) {
        finish = contexts_.empty() ? NoReadyWorker() : last_status_;
      } else {
        endpoint = candidates_[next_candidate_++].get();
        contexts_.push_back(std::make_unique<grpc::ClientContext>());
        context = contexts_.back().get();
        current_ = context;
      }
    }
    if (endpoint == nullptr) {
      Finish(finish);
      return;
    }
    context->set_deadline(server_context_->deadline());
    response_->Clear();
    (endpoint->stub()->async()->*method_)(
        context, &request_, response_,
        [this, endpoint](grpc::Status status) { OnAttemptDone(*endpoint, std::move(status)); });
  }

  void OnAttemptDone(const WorkerEndpoint& endpoint, grpc::Status status) {
    if (status.ok()) {
      if (on_success_) on_success_(endpoint);
      Finish(status);
      return;
    }
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
      pool_->MarkUnavailable(endpoint.name());
      {
        absl::MutexLock lock(&mu_);
        last_status_ = status;
      }
      StartNextAttempt();  // finishes with `status` when no candidate is left
      return;
    }
    Finish(status);  // the worker's answer, unchanged
  }

  const RouterService::CallRef call_ref_;  // first: released after the endpoints below
  grpc::CallbackServerContext* const server_context_;
  WorkerPool* const pool_;
  const std::vector<EndpointPtr> candidates_;
  const WorkerRequest request_;
  Response* const response_;  // owned by gRPC until OnDone
  const Method method_;
  const SuccessHook on_success_;

  absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  size_t next_candidate_ ABSL_GUARDED_BY(mu_) = 0;
  // One per attempt, kept until OnDone so OnCancel can always reach the current one.
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts_ ABSL_GUARDED_BY(mu_);
  grpc::ClientContext* current_ ABSL_GUARDED_BY(mu_) = nullptr;
  grpc::Status last_status_ ABSL_GUARDED_BY(mu_);
};

template <typename WorkerRequest, typename Response>
grpc::ServerUnaryReactor* StartUnary(
    RouterService* service, grpc::CallbackServerContext* context, WorkerPool* pool,
    std::vector<EndpointPtr> candidates, WorkerRequest request, Response* response,
    typename UnaryProxy<WorkerRequest, Response>::Method method,
    typename UnaryProxy<WorkerRequest, Response>::SuccessHook on_success) {
  auto* proxy = new UnaryProxy<WorkerRequest, Response>(service, context, pool,
                                                        std::move(candidates), std::move(request),
                                                        response, method, std::move(on_success));
  proxy->Start();
  return proxy;
}

// The Generate proxy: a ServerWriteReactor towards the client fed by a ClientReadReactor (one
// Attempt per worker tried) towards the worker.
//
// Flow control: at most one StartWrite is outstanding (`writing_`); a response that arrives
// meanwhile waits in `queue_`, and the attempt's next StartRead is held back until the queue is
// empty again. A paused attempt holds a gRPC "hold" so its OnDone cannot run before the router
// resumes reading.
//
// Lifetime: one reference for the server side (dropped in OnDone) and one per attempt (dropped
// at the end of its OnDone); the last one deletes the proxy. The proxy calls Finish only once
// no attempt is running, so after Finish nothing touches the pool or the affinity map.
class GenerateProxy final : public grpc::ServerWriteReactor<GenerateResponse> {
 public:
  GenerateProxy(RouterService* service, grpc::CallbackServerContext* server_context,
                WorkerPool* pool, AffinityMap* affinity, std::string placement_key,
                std::vector<EndpointPtr> candidates, kls::v1::WorkerGenerateRequest request)
      : call_ref_(service),
        server_context_(server_context),
        pool_(pool),
        affinity_(affinity),
        placement_key_(std::move(placement_key)),
        candidates_(std::move(candidates)),
        request_(std::move(request)) {}

  void Start() { StartNextAttempt(); }

  void OnWriteDone(bool ok) override {
    Attempt* cancel = nullptr;
    Attempt* resume = nullptr;
    bool write = false;
    {
      absl::MutexLock lock(&mu_);
      write_in_flight_ = false;
      if (!ok) {
        // The client is gone (OnCancel follows); stop the worker too.
        cancelled_ = true;
        queue_.clear();
        cancel = current_;
      } else if (!queue_.empty()) {
        writing_ = std::move(queue_.front());
        queue_.pop_front();
        write_in_flight_ = true;
        write = true;
      }
      if (queue_.empty() && read_paused_) {
        read_paused_ = false;
        resume = current_;
      }
    }
    if (cancel != nullptr) cancel->context.TryCancel();
    if (write) StartWrite(&writing_);
    if (resume != nullptr) resume->StartRead(&resume->response);
    MaybeFinish();
  }

  void OnCancel() override {
    Attempt* current;
    Attempt* resume = nullptr;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      queue_.clear();
      current = current_;
      if (read_paused_) {
        read_paused_ = false;
        resume = current_;
      }
      if (current_ == nullptr && !final_status_.has_value())
        final_status_ = grpc::Status::CANCELLED;
    }
    if (current != nullptr) current->context.TryCancel();
    // A paused attempt must read to its end (failing fast after TryCancel) to drop its hold.
    if (resume != nullptr) resume->StartRead(&resume->response);
    MaybeFinish();
  }

  void OnDone() override { Unref(); }

 private:
  class Attempt final : public grpc::ClientReadReactor<GenerateResponse> {
   public:
    Attempt(GenerateProxy* proxy, EndpointPtr endpoint)
        : proxy_(proxy), endpoint_(std::move(endpoint)) {}
    void OnReadDone(bool ok) override { proxy_->OnWorkerRead(this, ok); }
    void OnDone(const grpc::Status& status) override { proxy_->OnWorkerDone(this, status); }
    const WorkerEndpoint& endpoint() const { return *endpoint_; }

    grpc::ClientContext context;
    GenerateResponse response;  // the read target

   private:
    GenerateProxy* const proxy_;
    const EndpointPtr endpoint_;
  };

  void StartNextAttempt() {
    Attempt* attempt = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (cancelled_) {
        final_status_ = grpc::Status::CANCELLED;
      } else if (next_candidate_ >= candidates_.size()) {
        final_status_ = attempts_.empty() ? NoReadyWorker() : last_status_;
      } else {
        attempts_.push_back(std::make_unique<Attempt>(this, candidates_[next_candidate_++]));
        attempt = attempts_.back().get();
        current_ = attempt;
        refs_.fetch_add(1, std::memory_order_relaxed);
      }
    }
    if (attempt == nullptr) {
      MaybeFinish();
      return;
    }
    attempt->context.set_deadline(server_context_->deadline());
    attempt->endpoint().stub()->async()->Generate(&attempt->context, &request_, attempt);
    attempt->AddHold();  // released when the stream has been read to its end
    attempt->StartRead(&attempt->response);
    attempt->StartCall();
  }

  void OnWorkerRead(Attempt* attempt, bool ok) {
    if (!ok) {
      attempt->RemoveHold();  // end of stream: OnDone may run now
      return;
    }
    bool write = false;
    bool read = false;
    {
      absl::MutexLock lock(&mu_);
      if (cancelled_) {
        read = true;  // drain to the end; nothing more goes to the client
      } else {
        forwarded_ = true;
        if (attempt->response.finish_reason() != kls::v1::FINISH_REASON_UNSPECIFIED) {
          committed_version_ = attempt->response.version();
        }
        queue_.push_back(std::move(attempt->response));
        if (!write_in_flight_) {
          writing_ = std::move(queue_.front());
          queue_.pop_front();
          write_in_flight_ = true;
          write = true;
        }
        if (queue_.empty()) {
          read = true;
        } else {
          read_paused_ = true;
        }
      }
    }
    attempt->response.Clear();
    if (write) StartWrite(&writing_);
    if (read) attempt->StartRead(&attempt->response);
  }

  void OnWorkerDone(Attempt* attempt, const grpc::Status& status) {
    bool retry = false;
    bool mark_unavailable = false;
    bool succeeded = false;
    {
      absl::MutexLock lock(&mu_);
      current_ = nullptr;
      read_paused_ = false;
      if (cancelled_) {
        final_status_ = grpc::Status::CANCELLED;
      } else if (status.ok()) {
        succeeded = true;
        final_status_ = status;
      } else if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
        mark_unavailable = true;
        if (!forwarded_) {
          last_status_ = status;
          retry = true;
        } else {
          final_status_ = grpc::Status(
              grpc::StatusCode::UNAVAILABLE,
              absl::StrCat("worker ", attempt->endpoint().name(), " failed mid-stream (",
                           status.error_message(), "); ",
                           committed_version_.has_value()
                               ? absl::StrCat("the turn committed version ", *committed_version_)
                               : std::string("turn not committed")));
        }
      } else {
        final_status_ = status;  // the worker's answer, unchanged
      }
    }
    if (mark_unavailable) pool_->MarkUnavailable(attempt->endpoint().name());
    if (succeeded) affinity_->Put(placement_key_, attempt->endpoint().name());
    if (retry) {
      StartNextAttempt();
    } else {
      MaybeFinish();
    }
    Unref();
  }

  // Finishes once the outcome is known, no attempt is running and every response was written.
  void MaybeFinish() {
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      if (finish_called_ || !final_status_.has_value() || current_ != nullptr || write_in_flight_ ||
          !queue_.empty()) {
        return;
      }
      finish_called_ = true;
      status = *final_status_;
    }
    Finish(status);
  }

  void Unref() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  const RouterService::CallRef call_ref_;  // first: released after the attempts and endpoints
  grpc::CallbackServerContext* const server_context_;
  WorkerPool* const pool_;
  AffinityMap* const affinity_;
  const std::string placement_key_;
  const std::vector<EndpointPtr> candidates_;
  const kls::v1::WorkerGenerateRequest request_;

  std::atomic<int> refs_{1};
  GenerateResponse writing_;  // the one outstanding write; touched only by its owner

  absl::Mutex mu_;
  std::vector<std::unique_ptr<Attempt>> attempts_ ABSL_GUARDED_BY(mu_);  // freed with the proxy
  Attempt* current_ ABSL_GUARDED_BY(mu_) = nullptr;
  size_t next_candidate_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<GenerateResponse> queue_ ABSL_GUARDED_BY(mu_);
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool read_paused_ ABSL_GUARDED_BY(mu_) = false;
  bool forwarded_ ABSL_GUARDED_BY(mu_) = false;  // a response reached the queue: no retry
  std::optional<uint64_t> committed_version_ ABSL_GUARDED_BY(mu_);
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status last_status_ ABSL_GUARDED_BY(mu_);
  std::optional<grpc::Status> final_status_ ABSL_GUARDED_BY(mu_);
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace

RouterService::RouterService(WorkerPool* pool, std::unique_ptr<const ApiKeys> api_keys,
                             RouterServiceOptions options)
    : pool_(pool),
      api_keys_(std::move(api_keys)),
      options_(options),
      affinity_(options.affinity_capacity) {}

RouterService::~RouterService() {
  // Router::Shutdown waits for these; a count here means the service is going away under them.
  if (const int calls = proxied_calls(); calls != 0) {
    KLS_LOG(ERROR) << "RouterService destroyed with " << calls
                   << " proxied calls still running (shut the server and the Router down first)";
  }
}

absl::StatusOr<std::string> RouterService::Authenticate(
    const grpc::CallbackServerContext& context) const {
  if (api_keys_ == nullptr) return std::string(kDefaultTenant);
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  std::optional<std::string_view> value;
  if (it != metadata.end()) value = std::string_view(it->second.data(), it->second.size());
  return api_keys_->Authenticate(value);
}

RouterService::CallRef::CallRef(RouterService* service) : service_(service) {
  absl::MutexLock lock(&service_->calls_mu_);
  ++service_->proxied_calls_;
}

RouterService::CallRef::~CallRef() {
  absl::MutexLock lock(&service_->calls_mu_);
  --service_->proxied_calls_;
}

absl::Status RouterService::WaitForProxiedCalls(absl::Duration timeout) {
  absl::MutexLock lock(&calls_mu_);
  auto none = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(calls_mu_) { return proxied_calls_ == 0; };
  if (calls_mu_.AwaitWithTimeout(absl::Condition(&none), timeout)) return absl::OkStatus();
  return absl::DeadlineExceededError(absl::StrCat(proxied_calls_, " proxied calls still hold ",
                                                  "worker endpoints after ",
                                                  absl::FormatDuration(timeout)));
}

int RouterService::proxied_calls() const {
  absl::MutexLock lock(&calls_mu_);
  return proxied_calls_;
}

std::vector<EndpointPtr> RouterService::SessionCandidates(const std::string& placement_key) {
  std::vector<EndpointPtr> ranked = pool_->Rank(placement_key);
  if (std::optional<std::string> sticky = affinity_.Get(placement_key); sticky.has_value()) {
    auto it = std::find_if(ranked.begin(), ranked.end(),
                           [&](const EndpointPtr& e) { return e->name() == *sticky; });
    if (it != ranked.end()) std::rotate(ranked.begin(), it, it + 1);
  }
  if (ranked.size() > static_cast<size_t>(options_.max_attempts)) {
    ranked.resize(options_.max_attempts);
  }
  return ranked;
}

std::vector<EndpointPtr> RouterService::AnyCandidates() {
  // A random key spreads requests that any worker can serve over all of them.
  thread_local std::mt19937_64 engine{std::random_device{}()};
  return SessionCandidates(std::to_string(engine()));
}

grpc::ServerUnaryReactor* RouterService::CreateSession(grpc::CallbackServerContext* context,
                                                       const kls::v1::CreateSessionRequest* request,
                                                       kls::v1::Session* response) {
  absl::StatusOr<std::string> tenant = Authenticate(*context);
  if (!tenant.ok()) return Reject(context, tenant.status());
  kls::v1::WorkerCreateSessionRequest worker_request;
  worker_request.set_tenant(*tenant);
  *worker_request.mutable_request() = *request;
  if (request->session_id().empty()) {
    worker_request.mutable_request()->set_session_id(services::NewSessionId());
  } else if (absl::Status s = services::ValidateSessionId("session_id", request->session_id());
             !s.ok()) {
    return Reject(context, s);
  }
  std::string key = services::PlacementKey(*tenant, worker_request.request().session_id());
  std::vector<EndpointPtr> candidates = SessionCandidates(key);
  return StartUnary(
      this, context, pool_, std::move(candidates), std::move(worker_request), response,
      &WorkerAsync::CreateSession,
      [this, key](const WorkerEndpoint& worker) { affinity_.Put(key, worker.name()); });
}

grpc::ServerUnaryReactor* RouterService::GetSession(grpc::CallbackServerContext* context,
                                                    const kls::v1::GetSessionRequest* request,
                                                    kls::v1::Session* response) {
  absl::StatusOr<std::string> tenant = Authenticate(*context);
  if (!tenant.ok()) return Reject(context, tenant.status());
  if (absl::Status s = services::ValidateSessionId("session_id", request->session_id()); !s.ok()) {
    return Reject(context, s);
  }
  kls::v1::WorkerGetSessionRequest worker_request;
  worker_request.set_tenant(*tenant);
  *worker_request.mutable_request() = *request;
  std::string key = services::PlacementKey(*tenant, request->session_id());
  std::vector<EndpointPtr> candidates = SessionCandidates(key);
  return StartUnary(this, context, pool_, std::move(candidates), std::move(worker_request),
                    response, &WorkerAsync::GetSession, [this, key](const WorkerEndpoint& worker) {
                      affinity_.Put(key, worker.name());
                    });
}

grpc::ServerUnaryReactor* RouterService::ListSessions(grpc::CallbackServerContext* context,
                                                      const kls::v1::ListSessionsRequest* request,
                                                      kls::v1::ListSessionsResponse* response) {
  absl::StatusOr<std::string> tenant = Authenticate(*context);
  if (!tenant.ok()) return Reject(context, tenant.status());
  kls::v1::WorkerListSessionsRequest worker_request;
  worker_request.set_tenant(*tenant);
  *worker_request.mutable_request() = *request;
  return StartUnary(this, context, pool_, AnyCandidates(), std::move(worker_request), response,
                    &WorkerAsync::ListSessions, nullptr);
}

grpc::ServerUnaryReactor* RouterService::DeleteSession(grpc::CallbackServerContext* context,
                                                       const kls::v1::DeleteSessionRequest* request,
                                                       kls::v1::DeleteSessionResponse* response) {
  absl::StatusOr<std::string> tenant = Authenticate(*context);
  if (!tenant.ok()) return Reject(context, tenant.status());
  if (absl::Status s = services::ValidateSessionId("session_id", request->session_id()); !s.ok()) {
    return Reject(context, s);
  }
  kls::v1::WorkerDeleteSessionRequest worker_request;
  worker_request.set_tenant(*tenant);
  *worker_request.mutable_request() = *request;
  std::string key = services::PlacementKey(*tenant, request->session_id());
  std::vector<EndpointPtr> candidates = SessionCandidates(key);
  return StartUnary(this, context, pool_, std::move(candidates), std::move(worker_request),
                    response, &WorkerAsync::DeleteSession,
                    [this, key](const WorkerEndpoint&) { affinity_.Erase(key); });
}

grpc::ServerUnaryReactor* RouterService::ForkSession(grpc::CallbackServerContext* context,
                                                     const kls::v1::ForkSessionRequest* request,
                                                     kls::v1::Session* response) {
  absl::StatusOr<std::string> tenant = Authenticate(*context);
  if (!tenant.ok()) return Reject(context, tenant.status());
  if (absl::Status s = services::ValidateSessionId("session_id", request->session_id()); !s.ok()) {
    return Reject(context, s);
  }
  kls::v1::WorkerForkSessionRequest worker_request;
  worker_request.set_tenant(*tenant);
  *worker_request.mutable_request() = *request;
  if (request->new_session_id().empty()) {
    worker_request.mutable_request()->set_new_session_id(services::NewSessionId());
  } else if (absl::Status s =
                 services::ValidateSessionId("new_session_id", request->new_session_id());
             !s.ok()) {
    return Reject(context, s);
  }
  std::string source_key = services::PlacementKey(*tenant, request->session_id());
  std::string new_key = services::PlacementKey(*tenant, worker_request.request().new_session_id());
  std::vector<EndpointPtr> candidates = SessionCandidates(source_key);
  return StartUnary(this, context, pool_, std::move(candidates), std::move(worker_request),
                    response, &WorkerAsync::ForkSession,
                    [this, source_key, new_key](const WorkerEndpoint& worker) {
                      // The fork's state was just built on this worker: keep both hot there.
                      affinity_.Put(source_key, worker.name());
                      affinity_.Put(new_key, worker.name());
                    });
}

grpc::ServerWriteReactor<GenerateResponse>* RouterService::Generate(
    grpc::CallbackServerContext* context, const kls::v1::GenerateRequest* request) {
  absl::StatusOr<std::string> tenant = Authenticate(*context);
  if (!tenant.ok()) return new RejectedStream(tenant.status());
  if (absl::Status s = services::ValidateSessionId("session_id", request->session_id()); !s.ok()) {
    return new RejectedStream(s);
  }
  kls::v1::WorkerGenerateRequest worker_request;
  worker_request.set_tenant(*tenant);
  *worker_request.mutable_request() = *request;
  std::string key = services::PlacementKey(*tenant, request->session_id());
  std::vector<EndpointPtr> candidates = SessionCandidates(key);
  auto* proxy = new GenerateProxy(this, context, pool_, &affinity_, std::move(key),
                                  std::move(candidates), std::move(worker_request));
  proxy->Start();
  return proxy;
}

}  // namespace kls::router

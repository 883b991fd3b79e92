// RouterService: the public kls.v1.Sessions API, served by the router (ARCHITECTURE.md §1).
// Per RPC it authenticates the caller (API key -> tenant), validates what needs no model,
// places the session on a worker and forwards the call as the matching kls.v1.Worker RPC with
// the tenant attached; the worker's status comes back unchanged (HOUSE_STYLE.md H9).
//
// Placement: the session's affinity entry (the worker that last served it successfully) while
// that worker is ready, else the first ready worker in rendezvous order of
// "<tenant>/<session_id>". ForkSession goes to the source session's worker, which also becomes
// the new session's. ListSessions goes to any ready worker.
//
// Retries: a call that ends with UNAVAILABLE before anything was forwarded to the client marks
// that worker unavailable and is retried on the next worker in rank, at most max_attempts
// workers in all. Once Generate has forwarded a response it is never retried: the stream ends
// with UNAVAILABLE naming the committed version if the final message was seen, else saying the
// turn was not committed.
//
// Generate is a streaming proxy with flow control: at most one write towards the client is in
// flight; while a response waits behind it, no read is started on the worker stream. The
// client's deadline and cancellation propagate to the worker call.
#ifndef KLS_SERVICES_ROUTER_ROUTER_SERVICE_H_
#define KLS_SERVICES_ROUTER_ROUTER_SERVICE_H_

#include <grpcpp/server_context.h>
#include <grpcpp/support/server_callback.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kls/v1/sessions.grpc.pb.h"
#include "services/router/affinity_map.h"
#include "services/router/api_keys.h"
#include "services/router/worker_pool.h"

namespace kls::router {

// The tenant of every caller when no API keys are configured.
inline constexpr char kDefaultTenant[] = "default";

struct RouterServiceOptions {
  int max_attempts = 3;               // workers tried per call (>= 1)
  size_t affinity_capacity = 100000;  // sessions remembered (LRU)
};

// Thread-safe: gRPC calls the handlers concurrently. Handlers and reactor callbacks never block
// (they take short internal mutexes only); worker calls use the callback client API. The pool
// must outlive this service and every call it proxies (see WaitForProxiedCalls), and the service
// must outlive the grpc::Server it is registered on (Shutdown and Wait the server first).
class RouterService final : public kls::v1::Sessions::CallbackService {
 public:
  // `pool` is not owned. `api_keys` null: no authentication, every caller is kDefaultTenant.
  RouterService(WorkerPool* pool, std::unique_ptr<const ApiKeys> api_keys,
                RouterServiceOptions options);
  ~RouterService() override;  // logs an error if proxied calls are still running
  RouterService(const RouterService&) = delete;
  RouterService& operator=(const RouterService&) = delete;

  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* context,
                                          const kls::v1::CreateSessionRequest* request,
                                          kls::v1::Session* response) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* context,
                                       const kls::v1::GetSessionRequest* request,
                                       kls::v1::Session* response) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* context,
                                         const kls::v1::ListSessionsRequest* request,
                                         kls::v1::ListSessionsResponse* response) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* context,
                                          const kls::v1::DeleteSessionRequest* request,
                                          kls::v1::DeleteSessionResponse* response) override;
  grpc::ServerUnaryReactor* ForkSession(grpc::CallbackServerContext* context,
                                        const kls::v1::ForkSessionRequest* request,
                                        kls::v1::Session* response) override;
  grpc::ServerWriteReactor<kls::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const kls::v1::GenerateRequest* request) override;

  // The workers a call for the session with `placement_key` (see services::PlacementKey) would try,
  // in order: its affinity worker if ready, then the other ready workers in rendezvous order; at
  // most max_attempts. Empty when no worker is ready.
  std::vector<EndpointPtr> SessionCandidates(const std::string& placement_key);

  // The session -> worker affinity map (entries keyed by services::PlacementKey).
  AffinityMap& affinity() { return affinity_; }

  // The API keys callers are checked against; null when the router is open.
  const ApiKeys* api_keys() const { return api_keys_.get(); }

  // OK once every call this service proxied has released its worker endpoints; else
  // DEADLINE_EXCEEDED after `timeout`, saying how many have not. A call's last gRPC callback may
  // run after the server's Shutdown returned, and the pool must outlive it: a call holding the
  // last reference to a worker's grpc::Channel would destroy it on a gRPC callback thread,
  // which gRPC 1.51 answers by freeing the completion queue that thread still polls.
  absl::Status WaitForProxiedCalls(absl::Duration timeout) ABSL_LOCKS_EXCLUDED(calls_mu_);

  // Proxied calls that still hold worker endpoints.
  int proxied_calls() const ABSL_LOCKS_EXCLUDED(calls_mu_);

  // Held by each proxied call from its creation until its worker endpoints are released
  // (declared first among the call's members, so destroyed last).
  class CallRef {
   public:
    explicit CallRef(RouterService* service);
    ~CallRef();
    CallRef(const CallRef&) = delete;
    CallRef& operator=(const CallRef&) = delete;

   private:
    RouterService* const service_;
  };

 private:
  // The caller's tenant: kDefaultTenant without keys; else from "authorization: Bearer <key>"
  // (UNAUTHENTICATED on a missing or unknown key).
  absl::StatusOr<std::string> Authenticate(const grpc::CallbackServerContext& context) const;
  std::vector<EndpointPtr> AnyCandidates();

  WorkerPool* const pool_;
  const std::unique_ptr<const ApiKeys> api_keys_;
  const RouterServiceOptions options_;
  AffinityMap affinity_;

  mutable absl::Mutex calls_mu_;
  int proxied_calls_ ABSL_GUARDED_BY(calls_mu_) = 0;
};

}  // namespace kls::router

#endif  // KLS_SERVICES_ROUTER_ROUTER_SERVICE_H_

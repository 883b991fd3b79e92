// The kls router (ARCHITECTURE.md §1): authenticates callers, places sessions on workers and
// proxies kls.v1.Sessions to them. Stateless beyond a session -> worker affinity cache, so any
// number of replicas can run side by side. Typical use:
//
//   RouterOptions options;
//   options.workers = {"dns:///kls-worker.kls.svc.cluster.local:50052"};
//   KLS_ASSIGN_OR_RETURN(std::unique_ptr<Router> router, Router::Create(options));
//   grpc::ServerBuilder builder;
//   builder.RegisterService(router->service());
//   ... start, serve ...
//   server->Shutdown(); server->Wait(); router->Shutdown();
#ifndef KLS_SERVICES_ROUTER_ROUTER_H_
#define KLS_SERVICES_ROUTER_ROUTER_H_

#include <grpcpp/impl/codegen/service_type.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/router/router_service.h"
#include "services/router/worker_pool.h"

namespace kls::router {

struct RouterOptions {
  // "host:port" or "dns:///name:port" (each resolved address is a worker; see WorkerPool).
  std::vector<std::string> workers;
  // Channels made by the caller (the all-in-one `kls serve` worker); names must be unique.
  std::vector<NamedChannel> worker_channels;
  absl::Duration health_interval = absl::Seconds(1);
  absl::Duration health_timeout = absl::Milliseconds(500);
  absl::Duration dns_refresh_interval = absl::Seconds(5);
  // Lines "<key> <tenant>" (see api_keys.h). Empty: no authentication, tenant "default".
  std::string api_keys_file;
  int max_attempts = 3;               // workers tried per call, >= 1
  size_t affinity_capacity = 100000;  // sessions remembered, >= 1
};

// Thread-safe. service() is served concurrently by gRPC; pool() may be used from any thread.
// Destroy the Router only after the server it is registered on has shut down.
class Router {
 public:
  // Loads the API keys and starts watching the workers. INVALID_ARGUMENT for bad options
  // (naming the value), the errors of ApiKeys::Load for a bad keys file. Returns before any
  // worker is known to be ready: see WaitForReady.
  static absl::StatusOr<std::unique_ptr<Router>> Create(const RouterOptions& options);
  ~Router();  // Shutdown()
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  // The kls.v1.Sessions service, to register on the caller's grpc::ServerBuilder. Owned by
  // the Router.
  grpc::Service* service() { return service_.get(); }

  // OK once some worker is ready; DEADLINE_EXCEEDED after `timeout`. Blocks; for start-up and
  // readiness probes, never from a gRPC callback.
  absl::Status WaitForReady(absl::Duration timeout) const { return pool_->WaitForReady(timeout); }

  WorkerPool& pool() { return *pool_; }
  RouterService& sessions() { return *service_; }

  // Stops the health watcher (waiting at most one probe round), then waits until every proxied
  // call has released its worker endpoints (RouterService::WaitForProxiedCalls), so the workers'
  // channels are destroyed with the Router, never on a gRPC callback thread. Call it after the
  // server has shut down: calls still being served keep it waiting. Idempotent.
  void Shutdown();

 private:
  Router(std::unique_ptr<WorkerPool> pool, std::unique_ptr<RouterService> service)
      : pool_(std::move(pool)), service_(std::move(service)) {}

  std::unique_ptr<WorkerPool> pool_;
  std::unique_ptr<RouterService> service_;  // points into pool_
};

}  // namespace kls::router

#endif  // KLS_SERVICES_ROUTER_ROUTER_H_

// WorkerPool: the workers a router places sessions on, and which of them are ready.
//
// Endpoints come from three sources: static "host:port" targets (one endpoint each, resolved by
// gRPC); "dns:///name:port" targets, re-resolved with getaddrinfo on the first probe round after
// each dns_refresh_interval, where each address becomes an endpoint named "ip:port" and
// addresses that disappear are dropped (a Kubernetes headless Service gives one per worker pod);
// and pre-made channels (`kls serve`, which runs its worker in the same process). A watcher
// thread probes every endpoint each health_interval with grpc.health.v1 Check (service "") and
// Worker.GetLoad; an endpoint is *ready* when it reports SERVING and is not draining. Rank()
// orders the ready endpoints by rendezvous hashing (common/rendezvous.h), so every router
// replica agrees on placement without sharing state.
#ifndef KLS_SERVICES_ROUTER_WORKER_POOL_H_
#define KLS_SERVICES_ROUTER_WORKER_POOL_H_

#include <grpcpp/channel.h>
#include <grpcpp/security/credentials.h>

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "kls/v1/worker.grpc.pb.h"

namespace kls::router {

// A channel the caller made, e.g. an in-process channel to an embedded worker.
struct NamedChannel {
  std::string name;  // unique among all endpoints; used for rendezvous hashing and logs
  std::shared_ptr<grpc::Channel> channel;
};

struct WorkerPoolOptions {
  // "host:port" (any target gRPC accepts, one endpoint) or "dns:///name:port" (one endpoint per
  // resolved address). No authority in dns: targets ("dns://8.8.8.8/..." is refused).
  std::vector<std::string> targets;
  std::vector<NamedChannel> channels;
  absl::Duration health_interval = absl::Seconds(1);        // between probe rounds
  absl::Duration health_timeout = absl::Milliseconds(500);  // deadline of each probe
  absl::Duration dns_refresh_interval = absl::Seconds(5);
  // Credentials for channels the pool creates; null means insecure.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Test hook: replaces getaddrinfo for dns: targets. Returns the "ip:port" names of
  // (host, port); an error keeps the last known set, as a failed lookup does.
  std::function<absl::StatusOr<std::set<std::string>>(const std::string& host,
                                                      const std::string& port)>
      TEST_resolver;
};

// One worker: its name and stubs. Immutable; the stubs are thread-safe. Shared by the pool and
// by in-flight calls, so an endpoint dropped from the pool stays valid until its calls end.
// Never drop the last reference on a gRPC callback thread: the channel's destructor would then
// join that thread with itself and free the completion queue it polls (gRPC 1.51's callback
// API on Linux). The router waits for its calls before the pool goes (Router::Shutdown).
class WorkerEndpoint {
 public:
  WorkerEndpoint(std::string name, std::shared_ptr<grpc::Channel> channel);
  WorkerEndpoint(const WorkerEndpoint&) = delete;
  WorkerEndpoint& operator=(const WorkerEndpoint&) = delete;

  const std::string& name() const { return name_; }
  kls::v1::Worker::Stub* stub() const { return stub_.get(); }
  grpc::health::v1::Health::Stub* health_stub() const { return health_stub_.get(); }

 private:
  const std::string name_;
  const std::shared_ptr<grpc::Channel> channel_;
  const std::unique_ptr<kls::v1::Worker::Stub> stub_;
  const std::unique_ptr<grpc::health::v1::Health::Stub> health_stub_;
};

using EndpointPtr = std::shared_ptr<const WorkerEndpoint>;

// What the pool knows of one endpoint (for status pages, metrics and tests).
struct EndpointStatus {
  std::string name;
  bool probed = false;     // at least one probe round finished since it joined
  bool serving = false;    // the last health Check said SERVING
  bool draining = false;   // the last GetLoad said draining
  bool ready = false;      // serving, not draining, and not marked unavailable since
  kls::v1::Load load;      // from the last successful GetLoad
  std::string last_error;  // of the last failed probe; empty after a clean one
};

// Thread-safe: every public method may be called from any thread, including gRPC reactor
// callbacks (Rank, MarkUnavailable and Endpoints only take the internal mutex briefly).
class WorkerPool {
 public:
  // Validates the options and starts the watcher thread; the first probe round (and DNS
  // resolution) runs at once on that thread, so no endpoint is ready when Create returns — use
  // WaitForReady. INVALID_ARGUMENT (naming the value) for a malformed or duplicate target,
  // a channel without name or channel, or a non-positive interval. No endpoints at all is
  // allowed: every Rank() is then empty.
  static absl::StatusOr<std::unique_ptr<WorkerPool>> Create(WorkerPoolOptions options);
  // Stops the watcher (see Shutdown).
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // The ready endpoints, best first in rendezvous order for `key`; empty if none is ready.
  std::vector<EndpointPtr> Rank(std::string_view key) const ABSL_LOCKS_EXCLUDED(mu_);

  // Takes `name` out of Rank() after a failed call, until a probe round that starts after this
  // call finds it ready again. No-op for an unknown name.
  void MarkUnavailable(const std::string& name) ABSL_LOCKS_EXCLUDED(mu_);

  // Blocks until at least one endpoint is ready: OK, or DEADLINE_EXCEEDED after `timeout`
  // (naming the endpoints and their last errors). For start-up only; never call it from a
  // reactor callback.
  absl::Status WaitForReady(absl::Duration timeout) const ABSL_LOCKS_EXCLUDED(mu_);

  // Every known endpoint, by name.
  std::vector<EndpointStatus> Endpoints() const ABSL_LOCKS_EXCLUDED(mu_);

  // Stops the watcher thread and waits for it (at most one probe round or DNS lookup). The
  // last known state stays: Rank() keeps answering. Idempotent.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_);

  // Runs one DNS refresh and one probe round on the calling thread, serialized with the
  // watcher's rounds. For tests that need a round at a known point in time.
  void TEST_RunProbeRound() ABSL_LOCKS_EXCLUDED(mu_, round_mu_);

 private:
  struct DnsTarget {
    std::string target;  // as given
    std::string host;
    std::string port;
  };
  struct EndpointState {
    std::shared_ptr<WorkerEndpoint> endpoint;
    EndpointStatus status;
    // Probe rounds that started before this instant cannot make the endpoint ready again.
    absl::Time unavailable_since = absl::InfinitePast();
  };

  explicit WorkerPool(WorkerPoolOptions options);
  absl::Status AddStaticEndpoints() ABSL_LOCKS_EXCLUDED(mu_);
  std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target) const;
  void WatchLoop() ABSL_LOCKS_EXCLUDED(mu_);
  void RunRound(bool refresh_dns) ABSL_LOCKS_EXCLUDED(mu_, round_mu_);
  void RefreshDns() ABSL_EXCLUSIVE_LOCKS_REQUIRED(round_mu_) ABSL_LOCKS_EXCLUDED(mu_);
  void ProbeAll() ABSL_EXCLUSIVE_LOCKS_REQUIRED(round_mu_) ABSL_LOCKS_EXCLUDED(mu_);
  void SetReadyLocked(EndpointState& state, bool ready) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const WorkerPoolOptions options_;
  std::vector<DnsTarget> dns_targets_;  // set in Create, then read-only

  // Serializes probe rounds and DNS refreshes (the watcher's and TEST_RunProbeRound's).
  absl::Mutex round_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  // Endpoints that left DNS while calls may still hold them; dropped by the round that finds
  // them unshared, or with the pool.
  std::vector<std::shared_ptr<WorkerEndpoint>> retired_ ABSL_GUARDED_BY(round_mu_);
  absl::Time next_dns_refresh_ ABSL_GUARDED_BY(round_mu_) = absl::InfinitePast();

  mutable absl::Mutex mu_;
  std::map<std::string, EndpointState> endpoints_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> static_names_ ABSL_GUARDED_BY(mu_);  // never dropped by DNS
  std::map<std::string, std::set<std::string>> dns_members_ ABSL_GUARDED_BY(mu_);  // per target
  size_t num_ready_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;

  std::once_flag shutdown_once_;
  std::thread watcher_;
};

}  // namespace kls::router

#endif  // KLS_SERVICES_ROUTER_WORKER_POOL_H_

// A worker process's parts, wired together: the model, the state store (embedded RocksDB or
// remote `kls store` shards), the engine and the kls.v1.Worker service; plus store garbage
// collection and the drain on shutdown (ARCHITECTURE.md §1, §8).
#ifndef KLS_SERVICES_WORKER_WORKER_H_
#define KLS_SERVICES_WORKER_WORKER_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "engine/backend/factory.h"
#include "services/store/session_store.h"
#include "services/worker/engine.h"
#include "services/worker/worker_service.h"

namespace kls::worker {

inline engine::BackendChoice CpuBackendChoice() {
  engine::BackendChoice choice;
  choice.kind = "cpu";
  return choice;
}

struct WorkerOptions {
  std::string model_dir;
  EngineOptions engine;
  // The compute backend; "cpu" unless told otherwise (the CLI's default is "auto").
  engine::BackendChoice backend = CpuBackendChoice();
  // The store: remote shards ("host:port" of `kls store` processes) when given, else one
  // embedded RocksDB under data_dir/store.
  std::vector<std::string> store_targets;
  int store_replication = 1;
  std::string data_dir = "kls-data";
  absl::Duration gc_interval = absl::Minutes(5);  // <= 0: no garbage collection
  absl::Duration gc_block_grace = absl::Minutes(10);
};

// Thread-safe after Create. Destroying it stops garbage collection and the engine (running
// turns end with UNAVAILABLE); call Drain first for a graceful stop.
class Worker {
 public:
  // Loads the model, opens the store, starts the engine thread. Errors name the file or flag.
  static absl::StatusOr<std::unique_ptr<Worker>> Create(const WorkerOptions& options);
  ~Worker();

  grpc::Service* service() { return service_.get(); }
  Engine& engine() { return *engine_; }
  store::SessionStore& store() { return *store_; }

  // Reports readiness through `health` (service "" and "kls.v1.Worker"): SERVING now,
  // NOT_SERVING once Drain starts. The server owning `health` must outlive the worker's use.
  void AttachHealth(grpc::HealthCheckServiceInterface* health);

  // Graceful stop (SIGTERM): NOT_SERVING, no new turns, running turns finish and commit, dirty
  // sessions are written back. DEADLINE_EXCEEDED if that takes longer than `timeout`.
  absl::Status Drain(absl::Duration timeout);

  // The backend's fatal failure (a sticky GPU error; ARCHITECTURE.md §8), OK while healthy. The
  // worker then reports NOT_SERVING, refuses turns with UNAVAILABLE and calls `on_fatal` once
  // (the kls program drains and exits non-zero). Thread-safe.
  absl::Status backend_failure() const;
  void SetFatalHandler(std::function<void()> on_fatal);

 private:
  Worker() = default;
  void GcLoop(absl::Duration interval, absl::Duration grace);

  std::unique_ptr<store::SessionStore> store_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<WorkerService> service_;
  // Sets the health status of service "" and "kls.v1.Worker" (no-op before AttachHealth).
  void SetServing(bool serving);
  void RecordBackendFailure(const absl::Status& status);

  mutable absl::Mutex failure_mu_;
  absl::Status backend_failure_ ABSL_GUARDED_BY(failure_mu_);
  std::function<void()> on_fatal_ ABSL_GUARDED_BY(failure_mu_);

  std::atomic<grpc::HealthCheckServiceInterface*> health_{nullptr};
  absl::Notification stop_gc_;
  std::thread gc_thread_;
};

}  // namespace kls::worker

#endif  // KLS_SERVICES_WORKER_WORKER_H_

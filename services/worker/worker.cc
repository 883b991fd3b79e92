#include "services/worker/worker.h"

#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "services/store/remote_shard.h"
#include "services/store/rocksdb_shard.h"

namespace kls::worker {

absl::StatusOr<std::unique_ptr<Worker>> Worker::Create(const WorkerOptions& options) {
  std::unique_ptr<Worker> worker(new Worker());

  std::vector<std::unique_ptr<store::Shard>> shards;
  if (options.store_targets.empty()) {
    store::RocksDbShardOptions shard_options;
    shard_options.dir = absl::StrCat(options.data_dir, "/store");
    std::error_code error;
    std::filesystem::create_directories(shard_options.dir, error);
    if (error) {
      return absl::FailedPreconditionError(absl::StrCat("cannot create the data directory ",
                                                        shard_options.dir, ": ", error.message()));
    }
    KLS_ASSIGN_OR_RETURN(std::unique_ptr<store::RocksDbShard> shard,
                         store::RocksDbShard::Open(shard_options));
    shards.push_back(std::move(shard));
  } else {
    for (const std::string& target : options.store_targets) {
      KLS_ASSIGN_OR_RETURN(std::unique_ptr<store::RemoteShard> shard,
                           store::RemoteShard::Create(target, store::RemoteShardOptions()));
      shards.push_back(std::move(shard));
    }
  }
  store::SessionStoreOptions store_options;
  store_options.replication = options.store_replication;
  KLS_ASSIGN_OR_RETURN(worker->store_,
                       store::SessionStore::Create(std::move(shards), store_options));

  KLS_ASSIGN_OR_RETURN(engine::ModelAndBackend loaded,
                       engine::LoadModelAndBackend(options.model_dir, options.backend));
  KLS_LOG(INFO) << "worker: model " << options.model_dir << " on the " << loaded.backend->name()
                << " backend";
  EngineOptions engine_options = options.engine;
  engine_options.on_backend_failure = [w = worker.get()](const absl::Status& status) {
    w->RecordBackendFailure(status);
  };
  KLS_ASSIGN_OR_RETURN(worker->engine_,
                       Engine::Create(engine_options, std::move(loaded.model),
                                      std::move(loaded.backend), worker->store_.get()));
  worker->service_ = std::make_unique<WorkerService>(worker->engine_.get());
  if (options.gc_interval > absl::ZeroDuration()) {
    worker->gc_thread_ =
        std::thread([w = worker.get(), interval = options.gc_interval,
                     grace = options.gc_block_grace] { w->GcLoop(interval, grace); });
  }
  return worker;
}

Worker::~Worker() {
  stop_gc_.Notify();
  if (gc_thread_.joinable()) gc_thread_.join();
  service_.reset();  // the service points at the engine
  engine_.reset();   // before the store it uses
}

void Worker::AttachHealth(grpc::HealthCheckServiceInterface* health) {
  health_.store(health);
  SetServing(true);
}

void Worker::RecordBackendFailure(const absl::Status& status) {
  KLS_LOG(ERROR) << "worker: the backend failed for good (" << status
                 << "); reporting NOT_SERVING so the router moves sessions elsewhere";
  SetServing(false);
  std::function<void()> on_fatal;
  {
    absl::MutexLock lock(&failure_mu_);
    if (!backend_failure_.ok()) return;
    backend_failure_ = status;
    on_fatal = on_fatal_;
  }
  if (on_fatal) on_fatal();
}

absl::Status Worker::backend_failure() const {
  absl::MutexLock lock(&failure_mu_);
  return backend_failure_;
}

void Worker::SetFatalHandler(std::function<void()> on_fatal) {
  absl::MutexLock lock(&failure_mu_);
  on_fatal_ = std::move(on_fatal);
}

void Worker::SetServing(bool serving) {
  grpc::HealthCheckServiceInterface* health = health_.load();
  if (health == nullptr) return;
  health->SetServingStatus("", serving);
  health->SetServingStatus("kls.v1.Worker", serving);
}

absl::Status Worker::Drain(absl::Duration timeout) {
  SetServing(false);
  KLS_LOG(INFO) << "draining: finishing running turns and writing back hot sessions";
  return engine_->Drain(timeout);
}

void Worker::GcLoop(absl::Duration interval, absl::Duration grace) {
  while (!stop_gc_.WaitForNotificationWithTimeout(interval)) {
    absl::StatusOr<store::GcStats> stats = store_->CollectGarbage(absl::Now(), grace);
    if (!stats.ok()) {
      KLS_LOG(WARNING) << "store garbage collection failed: " << stats.status();
    } else if (stats->sessions_expired > 0 || stats->blocks_deleted > 0) {
      KLS_LOG(INFO) << "store garbage collection: " << stats->sessions_expired
                    << " expired sessions, " << stats->blocks_deleted << " of "
                    << stats->blocks_scanned << " blocks deleted";
    }
  }
}

}  // namespace kls::worker

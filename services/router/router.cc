#include "services/router/router.h"

#include <utility>

#include "absl/memory/memory.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace kls::router {

absl::StatusOr<std::unique_ptr<Router>> Router::Create(const RouterOptions& options) {
  if (options.max_attempts < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_attempts must be >= 1, got ", options.max_attempts));
  }
  if (options.affinity_capacity < 1) {
    return absl::InvalidArgumentError("affinity_capacity must be >= 1, got 0");
  }
  std::unique_ptr<const ApiKeys> api_keys;
  if (!options.api_keys_file.empty()) {
    KLS_ASSIGN_OR_RETURN(ApiKeys keys, ApiKeys::Load(options.api_keys_file));
    api_keys = std::make_unique<const ApiKeys>(std::move(keys));
  }
  WorkerPoolOptions pool_options;
  pool_options.targets = options.workers;
  pool_options.channels = options.worker_channels;
  pool_options.health_interval = options.health_interval;
  pool_options.health_timeout = options.health_timeout;
  pool_options.dns_refresh_interval = options.dns_refresh_interval;
  KLS_ASSIGN_OR_RETURN(std::unique_ptr<WorkerPool> pool, WorkerPool::Create(pool_options));
  RouterServiceOptions service_options;
  service_options.max_attempts = options.max_attempts;
  service_options.affinity_capacity = options.affinity_capacity;
  auto service = std::make_unique<RouterService>(pool.get(), std::move(api_keys), service_options);
  return absl::WrapUnique(new Router(std::move(pool), std::move(service)));
}

Router::~Router() { Shutdown(); }

void Router::Shutdown() {
  pool_->Shutdown();
  // With the server shut down, what is left are the final callbacks of worker calls: short.
  for (;;) {
    absl::Status released = service_->WaitForProxiedCalls(absl::Seconds(10));
    if (released.ok()) return;
    KLS_LOG(WARNING) << "router shutdown: " << released.message();
  }
}

}  // namespace kls::router

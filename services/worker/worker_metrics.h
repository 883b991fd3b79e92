// The Prometheus view of a worker (docs/kubernetes.md: the autoscaler's custom metric): every
// field of its kls.v1.Load, under the names below, for services::MetricsExporter.
//
//   gauges    kls_worker_active_turns, kls_worker_queued_turns, kls_worker_hot_sessions,
//             kls_worker_hot_bytes, kls_worker_budget_bytes, kls_worker_draining (0 or 1),
//             kls_worker_info{model_fingerprint="..."} (always 1)
//   counters  kls_worker_turns_total, kls_worker_restores_total, kls_worker_rebuilds_total,
//             kls_worker_evictions_total, kls_worker_commits_total,
//             kls_worker_commit_failures_total
#ifndef KLS_SERVICES_WORKER_WORKER_METRICS_H_
#define KLS_SERVICES_WORKER_WORKER_METRICS_H_

#include <vector>

#include "kls/v1/worker.pb.h"
#include "services/common/metrics_exporter.h"

namespace kls::worker {

class Engine;

// The samples of one Load snapshot. Pure; never fails.
std::vector<services::MetricSample> WorkerLoadMetrics(const kls::v1::Load& load);

// A collector for MetricsExporter that reads `engine`'s load through Engine::GetLoad (the same
// snapshot of atomics kls.v1.Worker/GetLoad returns, so it never touches engine-thread data).
// `engine` is not owned and must outlive the exporter.
services::MetricsExporter::Collector WorkerMetricsCollector(const Engine* engine);

}  // namespace kls::worker

#endif  // KLS_SERVICES_WORKER_WORKER_METRICS_H_

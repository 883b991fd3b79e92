#include "services/worker/worker_metrics.h"

#include <string>

#include "services/worker/engine.h"

namespace kls::worker {
namespace {

services::MetricSample Gauge(std::string name, std::string help, double value) {
  return {std::move(name), std::move(help), services::MetricType::kGauge, value, {}};
}

services::MetricSample Counter(std::string name, std::string help, double value) {
  return {std::move(name), std::move(help), services::MetricType::kCounter, value, {}};
}

}  // namespace

std::vector<services::MetricSample> WorkerLoadMetrics(const kls::v1::Load& load) {
  std::vector<services::MetricSample> samples = {
      Gauge("kls_worker_active_turns", "Turns running in the engine.", load.active_turns()),
      Gauge("kls_worker_queued_turns", "Turns admitted and waiting for the engine.",
            load.queued_turns()),
      Gauge("kls_worker_hot_sessions", "Sessions whose state is held in memory.",
            load.hot_sessions()),
      Gauge("kls_worker_hot_bytes", "Bytes of session state held in memory.",
            static_cast<double>(load.hot_bytes())),
      Gauge("kls_worker_budget_bytes", "Memory budget for hot session state (--hot-budget-mb).",
            static_cast<double>(load.budget_bytes())),
      Gauge("kls_worker_draining", "1 once the worker drains (SIGTERM): it admits no new turns.",
            load.draining() ? 1 : 0),
      Counter("kls_worker_turns_total", "Turns finished, under any commit policy.",
              static_cast<double>(load.turns_total())),
      Counter("kls_worker_restores_total", "Sessions loaded from the store.",
              static_cast<double>(load.restores_total())),
      Counter("kls_worker_rebuilds_total",
              "Session states rebuilt from the token history (corrupt or missing snapshot).",
              static_cast<double>(load.rebuilds_total())),
      Counter("kls_worker_evictions_total", "Hot sessions dropped under the memory budget.",
              static_cast<double>(load.evictions_total())),
      Counter("kls_worker_commits_total", "Snapshots the store acknowledged.",
              static_cast<double>(load.commits_total())),
      Counter("kls_worker_commit_failures_total", "Snapshots the store refused or could not take.",
              static_cast<double>(load.commit_failures_total())),
  };
  services::MetricSample info = Gauge("kls_worker_info", "The served model; always 1.", 1);
  info.labels.emplace_back("model_fingerprint", load.model_fingerprint());
  samples.push_back(std::move(info));
  return samples;
}

services::MetricsExporter::Collector WorkerMetricsCollector(const Engine* engine) {
  return [engine] { return WorkerLoadMetrics(engine->GetLoad()); };
}

}  // namespace kls::worker

// A Prometheus scrape endpoint: `GET /metrics` over HTTP in the text exposition format
// (prometheus-cpp's serializer), served by cpp-httplib on its own port. The values are produced by
// a callback at scrape time, so they are exactly what the process already publishes elsewhere (a
// worker's kls.v1.Worker/GetLoad snapshot): nothing is counted twice and nothing is added to the
// hot path.
//
//   KLS_ASSIGN_OR_RETURN(std::unique_ptr<MetricsExporter> metrics,
//                        MetricsExporter::Start("0.0.0.0:9090", [&] { return Samples(); }));
#ifndef KLS_SERVICES_COMMON_METRICS_EXPORTER_H_
#define KLS_SERVICES_COMMON_METRICS_EXPORTER_H_

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kls::services {

enum class MetricType { kGauge, kCounter };

// One sample. Samples that share a name form one metric family (one HELP and TYPE line, taken
// from the first of them); they must then differ in their labels.
struct MetricSample {
  std::string name;  // [a-zA-Z_:][a-zA-Z0-9_:]*; counters end in "_total"
  std::string help;
  MetricType type = MetricType::kGauge;
  double value = 0;
  std::vector<std::pair<std::string, std::string>> labels;  // name -> value
};

// Checks a listen address for the exporter: "IP:PORT" with an IPv4 literal or a bracketed IPv6
// literal ("[::]:9090") and a port in [0, 65535] (0: any free port). INVALID_ARGUMENT naming the
// address otherwise (names are not resolved: the exporter binds exactly what it is given).
absl::Status ValidateMetricsAddress(const std::string& address);

// Thread-safe. The collector runs on the exporter's HTTP threads, possibly two at once, so it
// must be thread-safe and must not block for long. Destroying the exporter stops the server and
// waits for running scrapes, so whatever the collector reads has to outlive the exporter.
class MetricsExporter {
 public:
  using Collector = std::function<std::vector<MetricSample>()>;

  // Starts serving `GET /metrics` on `address` (see ValidateMetricsAddress). INVALID_ARGUMENT for
  // a bad address or a null collector, UNAVAILABLE (naming the address) if it cannot listen, e.g.
  // because the port is taken. Samples with an invalid metric or label name are left out of a
  // scrape (and logged once per name) instead of failing it.
  static absl::StatusOr<std::unique_ptr<MetricsExporter>> Start(const std::string& address,
                                                                Collector collector);
  ~MetricsExporter();
  MetricsExporter(const MetricsExporter&) = delete;
  MetricsExporter& operator=(const MetricsExporter&) = delete;

  // The port it listens on (the chosen one when the address asked for port 0).
  int port() const { return port_; }

 private:
  struct Impl;
  explicit MetricsExporter(std::unique_ptr<Impl> impl, int port);

  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace kls::services

#endif  // KLS_SERVICES_COMMON_METRICS_EXPORTER_H_

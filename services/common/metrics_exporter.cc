#include "services/common/metrics_exporter.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <netinet/in.h>
#include <prometheus/check_names.h>
#include <prometheus/client_metric.h>
#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <chrono>
#include <thread>

#include "absl/algorithm/container.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "services/common/http_socket.h"

namespace kls::services {
namespace {

// Scrapes are small and rare (one every few seconds per Prometheus replica); two threads keep one
// slow client from blocking the next scrape, and the timeout bounds how long it can hold one.
constexpr size_t kServerThreads = 2;
constexpr time_t kRequestTimeoutSeconds = 10;

// Adapts the collector to prometheus-cpp: samples grouped into families, in first-seen order.
class CallbackCollectable : public prometheus::Collectable {
 public:
  explicit CallbackCollectable(MetricsExporter::Collector collector)
      : collector_(std::move(collector)) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> families;
    absl::flat_hash_map<std::string, size_t> index;
    for (MetricSample& sample : collector_()) {
      if (!Valid(sample)) continue;
      auto [it, added] = index.try_emplace(sample.name, families.size());
      if (added) {
        prometheus::MetricFamily family;
        family.name = sample.name;
        family.help = sample.help;
        family.type = sample.type == MetricType::kCounter ? prometheus::MetricType::Counter
                                                          : prometheus::MetricType::Gauge;
        families.push_back(std::move(family));
      }
      prometheus::MetricFamily& family = families[it->second];
      prometheus::ClientMetric metric;
      for (auto& [name, value] : sample.labels) {
        metric.label.push_back({std::move(name), std::move(value)});
      }
      if (family.type == prometheus::MetricType::Counter) {
        metric.counter.value = sample.value;
      } else {
        metric.gauge.value = sample.value;
      }
      family.metric.push_back(std::move(metric));
    }
    return families;
  }

 private:
  // False (logged once per metric name) for a name Prometheus would reject.
  bool Valid(const MetricSample& sample) const {
    bool ok = prometheus::CheckMetricName(sample.name);
    for (const auto& label : sample.labels) ok = ok && prometheus::CheckLabelName(label.first);
    if (!ok) {
      absl::MutexLock lock(&mu_);
      if (reported_.insert(sample.name).second) {
        KLS_LOG(WARNING) << "metrics: sample '" << sample.name
                         << "' has an invalid metric or label name; left out";
      }
    }
    return ok;
  }

  const MetricsExporter::Collector collector_;
  mutable absl::Mutex mu_;
  mutable absl::flat_hash_set<std::string> reported_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::Status ValidateMetricsAddress(const std::string& address) {
  const auto bad = [&](const char* why) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics address '", address, "': ", why,
                     " (want IP:PORT, e.g. 0.0.0.0:9090 or [::]:9090)"));
  };
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return bad("no port");
  const std::string host = address.substr(0, colon);
  const std::string port = address.substr(colon + 1);
  int port_number = -1;
  if (port.empty() || port.size() > 5 || !absl::c_all_of(port, absl::ascii_isdigit) ||
      !absl::SimpleAtoi(port, &port_number) || port_number > 65535) {
    return bad("the port must be a number in [0, 65535]");
  }
  unsigned char buffer[sizeof(in6_addr)];
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    if (inet_pton(AF_INET6, host.substr(1, host.size() - 2).c_str(), buffer) == 1) {
      return absl::OkStatus();
    }
    return bad("not an IPv6 address in brackets");
  }
  if (inet_pton(AF_INET, host.c_str(), buffer) != 1) {
    return bad("the host must be an IPv4 address or a bracketed IPv6 address");
  }
  return absl::OkStatus();
}

struct MetricsExporter::Impl {
  std::shared_ptr<CallbackCollectable> collectable;
  httplib::Server server;
  std::thread thread;  // runs the server's accept loop

  ~Impl() {
    server.stop();
    if (thread.joinable()) thread.join();
  }
};

MetricsExporter::MetricsExporter(std::unique_ptr<Impl> impl, int port)
    : impl_(std::move(impl)), port_(port) {}

MetricsExporter::~MetricsExporter() = default;

absl::StatusOr<std::unique_ptr<MetricsExporter>> MetricsExporter::Start(const std::string& address,
                                                                        Collector collector) {
  if (absl::Status valid = ValidateMetricsAddress(address); !valid.ok()) return valid;
  if (collector == nullptr) return absl::InvalidArgumentError("metrics: no collector");
  auto impl = std::make_unique<Impl>();
  impl->collectable = std::make_shared<CallbackCollectable>(std::move(collector));
  impl->server.new_task_queue = [] { return new httplib::ThreadPool(kServerThreads); };
  impl->server.set_socket_options(ExclusivePortSocketOptions);
  impl->server.set_read_timeout(kRequestTimeoutSeconds, 0);
  impl->server.set_write_timeout(kRequestTimeoutSeconds, 0);
  CallbackCollectable* collectable = impl->collectable.get();
  impl->server.Get("/metrics", [collectable](const httplib::Request&, httplib::Response& res) {
    res.set_content(prometheus::TextSerializer().Serialize(collectable->Collect()),
                    "text/plain; version=0.0.4");
  });
  const size_t colon = address.rfind(':');
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  int port = 0;
  absl::SimpleAtoi(address.substr(colon + 1), &port);  // validated above
  if (port == 0) {
    port = impl->server.bind_to_any_port(host);
  } else if (!impl->server.bind_to_port(host, port)) {
    port = -1;
  }
  if (port <= 0) {
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot listen on ", address, " (port taken?)"));
  }
  impl->thread = std::thread([server = &impl->server] { server->listen_after_bind(); });
  // httplib 0.11's stop() is a no-op until the accept loop runs, so Start returns only once it
  // does (a destructor right after Start must not wait forever).
  while (!impl->server.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return std::unique_ptr<MetricsExporter>(new MetricsExporter(std::move(impl), port));
}

}  // namespace kls::services

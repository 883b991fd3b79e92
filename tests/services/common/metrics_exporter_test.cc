// MetricsExporter: a real HTTP server on an ephemeral loopback port, scraped with a plain socket.
#include "services/common/metrics_exporter.h"

#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "tests/services/common/http_get.h"

namespace kls::services {
namespace {

using ::kls::testing::HttpGet;
using ::kls::testing::HttpResponse;
using ::kls::testing::SampleValue;

std::unique_ptr<MetricsExporter> StartOrDie(MetricsExporter::Collector collector) {
  absl::StatusOr<std::unique_ptr<MetricsExporter>> exporter =
      MetricsExporter::Start("127.0.0.1:0", std::move(collector));
  EXPECT_TRUE(exporter.ok()) << exporter.status();
  return exporter.ok() ? *std::move(exporter) : nullptr;
}

std::string Scrape(const MetricsExporter& exporter) {
  absl::StatusOr<HttpResponse> response = HttpGet(exporter.port(), "/metrics");
  EXPECT_TRUE(response.ok()) << response.status();
  if (!response.ok()) return "";
  EXPECT_EQ(response->status, 200) << response->headers;
  EXPECT_NE(response->headers.find("text/plain"), std::string::npos) << response->headers;
  return response->body;
}

TEST(MetricsExporterTest, ServesTheCollectorsValuesAtScrapeTime) {
  std::atomic<int> queued{3};
  std::atomic<int> collections{0};
  std::unique_ptr<MetricsExporter> exporter = StartOrDie([&] {
    ++collections;
    return std::vector<MetricSample>{
        {"kls_test_queued", "Queued things.", MetricType::kGauge, double(queued.load()), {}},
        {"kls_test_done_total", "Finished things.", MetricType::kCounter, 41, {}},
    };
  });
  ASSERT_NE(exporter, nullptr);
  EXPECT_GT(exporter->port(), 0);
  EXPECT_EQ(collections.load(), 0);  // nothing is collected until a scrape

  std::string body = Scrape(*exporter);
  EXPECT_NE(body.find("# HELP kls_test_queued Queued things.\n"), std::string::npos) << body;
  EXPECT_NE(body.find("# TYPE kls_test_queued gauge\n"), std::string::npos) << body;
  EXPECT_NE(body.find("# TYPE kls_test_done_total counter\n"), std::string::npos) << body;
  EXPECT_EQ(SampleValue(body, "kls_test_queued"), 3) << body;
  EXPECT_EQ(SampleValue(body, "kls_test_done_total"), 41) << body;
  EXPECT_EQ(collections.load(), 1);

  queued = 0;
  body = Scrape(*exporter);
  EXPECT_EQ(SampleValue(body, "kls_test_queued"), 0) << body;
  EXPECT_EQ(collections.load(), 2);
}

TEST(MetricsExporterTest, GroupsSamplesIntoFamiliesAndEscapesLabelValues) {
  std::unique_ptr<MetricsExporter> exporter = StartOrDie([] {
    return std::vector<MetricSample>{
        {"kls_test_workers", "Workers by state.", MetricType::kGauge, 2, {{"state", "ready"}}},
        {"kls_test_workers",
         "(ignored: the first help wins)",
         MetricType::kGauge,
         1,
         {{"state", "draining"}}},
        {"kls_test_info", "Odd label values.", MetricType::kGauge, 1, {{"v", "a\"b\\c\nd"}}},
    };
  });
  ASSERT_NE(exporter, nullptr);
  const std::string body = Scrape(*exporter);
  size_t types = 0;
  for (size_t at = body.find("# TYPE kls_test_workers "); at != std::string::npos;
       at = body.find("# TYPE kls_test_workers ", at + 1)) {
    ++types;
  }
  EXPECT_EQ(types, 1u) << body;
  EXPECT_EQ(body.find("ignored"), std::string::npos) << body;
  EXPECT_EQ(SampleValue(body, "kls_test_workers{state=\"ready\"}"), 2) << body;
  EXPECT_EQ(SampleValue(body, "kls_test_workers{state=\"draining\"}"), 1) << body;
  EXPECT_EQ(SampleValue(body, "kls_test_info{v=\"a\\\"b\\\\c\\nd\"}"), 1) << body;
}

TEST(MetricsExporterTest, LeavesOutSamplesWithInvalidNames) {
  std::unique_ptr<MetricsExporter> exporter = StartOrDie([] {
    return std::vector<MetricSample>{
        {"kls bad name", "", MetricType::kGauge, 1, {}},
        {"kls_test_bad_label", "", MetricType::kGauge, 1, {{"0label", "x"}}},
        {"kls_test_good", "", MetricType::kGauge, 5, {}},
    };
  });
  ASSERT_NE(exporter, nullptr);
  for (int i = 0; i < 2; ++i) {  // logged once, left out every time
    const std::string body = Scrape(*exporter);
    EXPECT_EQ(body.find("bad"), std::string::npos) << body;
    EXPECT_EQ(SampleValue(body, "kls_test_good"), 5) << body;
  }
}

TEST(MetricsExporterTest, OtherPathsAreNotFound) {
  std::unique_ptr<MetricsExporter> exporter =
      StartOrDie([] { return std::vector<MetricSample>{}; });
  ASSERT_NE(exporter, nullptr);
  absl::StatusOr<HttpResponse> response = HttpGet(exporter->port(), "/nope");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 404);
  // An empty collection is valid: an empty exposition.
  const std::string body = Scrape(*exporter);
  EXPECT_EQ(body.find("kls_"), std::string::npos) << body;
  EXPECT_EQ(body.find("# TYPE"), std::string::npos) << body;
}

TEST(MetricsExporterTest, ConcurrentScrapesAllSucceed) {
  std::atomic<int> collections{0};
  std::unique_ptr<MetricsExporter> exporter = StartOrDie([&] {
    const int n = ++collections;
    return std::vector<MetricSample>{{"kls_test_n", "", MetricType::kGauge, double(n), {}}};
  });
  ASSERT_NE(exporter, nullptr);
  constexpr int kThreads = 4, kScrapes = 10;
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kScrapes; ++i) {
        absl::StatusOr<HttpResponse> response = HttpGet(exporter->port(), "/metrics");
        if (response.ok() && response->status == 200 &&
            SampleValue(response->body, "kls_test_n").has_value()) {
          ++ok;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(ok.load(), kThreads * kScrapes);
  EXPECT_EQ(collections.load(), kThreads * kScrapes);
}

TEST(MetricsExporterTest, StopsServingWhenDestroyed) {
  std::unique_ptr<MetricsExporter> exporter =
      StartOrDie([] { return std::vector<MetricSample>{}; });
  ASSERT_NE(exporter, nullptr);
  const int port = exporter->port();
  exporter.reset();
  EXPECT_EQ(HttpGet(port, "/metrics").status().code(), absl::StatusCode::kUnavailable);
}

TEST(MetricsExporterTest, PortInUseIsUnavailableAndNamesTheAddress) {
  std::unique_ptr<MetricsExporter> first = StartOrDie([] { return std::vector<MetricSample>{}; });
  ASSERT_NE(first, nullptr);
  const std::string address = "127.0.0.1:" + std::to_string(first->port());
  absl::StatusOr<std::unique_ptr<MetricsExporter>> second =
      MetricsExporter::Start(address, [] { return std::vector<MetricSample>{}; });
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find(address), absl::string_view::npos) << second.status();
}

TEST(MetricsExporterTest, NullCollectorIsInvalid) {
  EXPECT_EQ(MetricsExporter::Start("127.0.0.1:0", nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

class MetricsAddressTest : public ::testing::TestWithParam<std::pair<std::string, bool>> {};

TEST_P(MetricsAddressTest, AcceptsOnlyIpAndPort) {
  const auto& [address, valid] = GetParam();
  const absl::Status status = ValidateMetricsAddress(address);
  EXPECT_EQ(status.ok(), valid) << address << ": " << status;
  if (!valid) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(status.message().find("'" + address + "'"), absl::string_view::npos) << status;
    // A bad address never starts a server.
    EXPECT_EQ(
        MetricsExporter::Start(address, [] { return std::vector<MetricSample>{}; }).status().code(),
        absl::StatusCode::kInvalidArgument);
  }
}

INSTANTIATE_TEST_SUITE_P(Addresses, MetricsAddressTest,
                         ::testing::Values(std::pair<std::string, bool>{"0.0.0.0:9090", true},
                                           std::pair<std::string, bool>{"127.0.0.1:0", true},
                                           std::pair<std::string, bool>{"[::]:9090", true},
                                           std::pair<std::string, bool>{"[::1]:65535", true},
                                           std::pair<std::string, bool>{"", false},
                                           std::pair<std::string, bool>{"9090", false},
                                           std::pair<std::string, bool>{":9090", false},
                                           std::pair<std::string, bool>{"localhost:9090", false},
                                           std::pair<std::string, bool>{"0.0.0.0:", false},
                                           std::pair<std::string, bool>{"0.0.0.0:65536", false},
                                           std::pair<std::string, bool>{"0.0.0.0:-1", false},
                                           std::pair<std::string, bool>{"0.0.0.0:9090s", false},
                                           std::pair<std::string, bool>{"0.0.0.0:+80", false},
                                           std::pair<std::string, bool>{"1.2.3:80", false},
                                           std::pair<std::string, bool>{"::1:9090", false},
                                           std::pair<std::string, bool>{"[zz]:9090", false},
                                           std::pair<std::string, bool>{"[::1]", false}));

}  // namespace
}  // namespace kls::services

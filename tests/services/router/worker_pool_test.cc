// WorkerPool against fake workers on loopback: readiness from grpc.health.v1 and GetLoad,
// rendezvous ranking, MarkUnavailable, DNS membership and pre-made channels.
#include "services/router/worker_pool.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/channel_arguments.h>
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/rendezvous.h"
#include "kls/v1/worker.grpc.pb.h"

namespace kls::router {
namespace {

// Answers GetLoad only (the pool calls nothing else).
class LoadOnlyWorker final : public kls::v1::Worker::CallbackService {
 public:
  void set_draining(bool draining) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    draining_ = draining;
  }
  grpc::ServerUnaryReactor* GetLoad(grpc::CallbackServerContext* context,
                                    const kls::v1::GetLoadRequest*,
                                    kls::v1::Load* response) override {
    {
      absl::MutexLock lock(&mu_);
      response->set_draining(draining_);
      response->set_active_turns(3);
    }
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

struct FakeWorkerProcess {
  LoadOnlyWorker service;
  std::unique_ptr<grpc::Server> server;
  std::string address;
  int port = 0;

  void SetServing(bool serving) { server->GetHealthCheckService()->SetServingStatus("", serving); }
  ~FakeWorkerProcess() {
    server->Shutdown(std::chrono::system_clock::now());
    server->Wait();
  }
};

std::unique_ptr<FakeWorkerProcess> StartWorker() {
  grpc::EnableDefaultHealthCheckService(true);
  auto worker = std::make_unique<FakeWorkerProcess>();
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &worker->port);
  builder.RegisterService(&worker->service);
  worker->server = builder.BuildAndStart();
  EXPECT_NE(worker->server, nullptr);
  worker->address = absl::StrCat("127.0.0.1:", worker->port);
  return worker;
}

// Options whose watcher probes once at start and then (for the test's lifetime) never again,
// so tests decide when rounds run with TEST_RunProbeRound.
WorkerPoolOptions ManualOptions(std::vector<std::string> targets) {
  WorkerPoolOptions options;
  options.targets = std::move(targets);
  options.health_interval = absl::Hours(1);
  options.dns_refresh_interval = absl::Hours(1);
  return options;
}

std::unique_ptr<WorkerPool> MakePool(WorkerPoolOptions options) {
  absl::StatusOr<std::unique_ptr<WorkerPool>> pool = WorkerPool::Create(std::move(options));
  EXPECT_TRUE(pool.ok()) << pool.status();
  return pool.ok() ? std::move(*pool) : nullptr;
}

std::vector<std::string> Names(const std::vector<EndpointPtr>& endpoints) {
  std::vector<std::string> names;
  for (const EndpointPtr& endpoint : endpoints) names.push_back(endpoint->name());
  return names;
}

// A DNS name whose addresses the test sets; records each lookup as "<host> <port>".
class FakeDns {
 public:
  void Answer(absl::StatusOr<std::set<std::string>> answer) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    answer_ = std::move(answer);
  }
  std::vector<std::string> asked() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return asked_;
  }
  // Options for a pool over one dns: target, resolved here (see ManualOptions).
  static WorkerPoolOptions Options(std::shared_ptr<FakeDns> dns) {
    WorkerPoolOptions options = ManualOptions({"dns:///kls-worker.kls.svc:50052"});
    options.TEST_resolver = [dns](const std::string& host, const std::string& port) {
      absl::MutexLock lock(&dns->mu_);
      dns->asked_.push_back(absl::StrCat(host, " ", port));
      return dns->answer_;
    };
    return options;
  }

 private:
  mutable absl::Mutex mu_;
  absl::StatusOr<std::set<std::string>> answer_ ABSL_GUARDED_BY(mu_) = std::set<std::string>{};
  std::vector<std::string> asked_ ABSL_GUARDED_BY(mu_);
};

EndpointStatus StatusOf(const WorkerPool& pool, const std::string& name) {
  for (const EndpointStatus& status : pool.Endpoints()) {
    if (status.name == name) return status;
  }
  ADD_FAILURE() << "no endpoint " << name;
  return EndpointStatus();
}

TEST(WorkerPoolTest, CreateRejectsMalformedOptions) {
  const std::vector<std::string> bad_targets = {
      "",
      "dns:///no-port",
      "dns://8.8.8.8/workers:50051",
      "dns:///workers:0",
      "dns:///workers:65536",
      "dns:///workers:grpc",
      "dns:///[::1:50051",
      "dns:///:50051",
  };
  for (const std::string& target : bad_targets) {
    absl::StatusOr<std::unique_ptr<WorkerPool>> pool = WorkerPool::Create(ManualOptions({target}));
    EXPECT_EQ(pool.status().code(), absl::StatusCode::kInvalidArgument) << target;
  }
  absl::StatusOr<std::unique_ptr<WorkerPool>> pool =
      WorkerPool::Create(ManualOptions({"dns:///no-port"}));
  EXPECT_TRUE(absl::StrContains(pool.status().message(), "dns:///no-port")) << pool.status();

  EXPECT_EQ(WorkerPool::Create(ManualOptions({"a:1", "a:1"})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WorkerPool::Create(ManualOptions({"dns:///a:1", "dns:///a:1"})).status().code(),
            absl::StatusCode::kInvalidArgument);
  WorkerPoolOptions options = ManualOptions({"a:1"});
  options.channels.push_back(
      {"a:1", grpc::CreateChannel("a:1", grpc::InsecureChannelCredentials())});
  EXPECT_EQ(WorkerPool::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = ManualOptions({});
  options.channels.push_back({"no-channel", nullptr});
  EXPECT_EQ(WorkerPool::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = ManualOptions({"a:1"});
  options.health_interval = absl::ZeroDuration();
  EXPECT_EQ(WorkerPool::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = ManualOptions({"a:1"});
  options.health_timeout = -absl::Seconds(1);
  EXPECT_EQ(WorkerPool::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  // IPv6 literals and plain names are fine (resolved by a stub: no real DNS traffic here).
  options = ManualOptions({"dns:///[::1]:50051", "dns:///w.svc:1"});
  options.TEST_resolver = [](const std::string&, const std::string&) {
    return absl::StatusOr<std::set<std::string>>(std::set<std::string>{});
  };
  EXPECT_TRUE(WorkerPool::Create(options).ok());
}

TEST(WorkerPoolTest, RankIsRendezvousOrderOverReadyEndpoints) {
  std::vector<std::unique_ptr<FakeWorkerProcess>> workers;
  std::vector<std::string> names;
  for (int i = 0; i < 4; ++i) {
    workers.push_back(StartWorker());
    names.push_back(workers.back()->address);
  }
  std::unique_ptr<WorkerPool> pool = MakePool(ManualOptions(names));
  std::vector<std::string> reversed(names.rbegin(), names.rend());
  std::unique_ptr<WorkerPool> other = MakePool(ManualOptions(reversed));
  ASSERT_NE(pool, nullptr);
  ASSERT_NE(other, nullptr);
  pool->TEST_RunProbeRound();
  other->TEST_RunProbeRound();
  ASSERT_TRUE(pool->WaitForReady(absl::Seconds(5)).ok());

  for (int k = 0; k < 50; ++k) {
    const std::string key = absl::StrCat("tenant/session-", k);
    std::vector<std::string> expected;
    for (size_t index : RendezvousRank(key, names, names.size())) {
      expected.push_back(names[index]);
    }
    EXPECT_EQ(Names(pool->Rank(key)), expected) << key;
    EXPECT_EQ(Names(other->Rank(key)), expected) << key;
  }
  for (const std::string& name : names) {
    EndpointStatus status = StatusOf(*pool, name);
    EXPECT_TRUE(status.probed && status.serving && status.ready) << name;
    EXPECT_FALSE(status.draining);
    EXPECT_EQ(status.load.active_turns(), 3u);
    EXPECT_EQ(status.last_error, "");
  }

  // Dropping one worker from the ready set moves only the keys it owned.
  workers[1]->SetServing(false);
  pool->TEST_RunProbeRound();
  for (int k = 0; k < 50; ++k) {
    const std::string key = absl::StrCat("tenant/session-", k);
    std::vector<std::string> expected;
    for (size_t index : RendezvousRank(key, names, names.size())) {
      if (names[index] != names[1]) expected.push_back(names[index]);
    }
    EXPECT_EQ(Names(pool->Rank(key)), expected) << key;
  }
}

TEST(WorkerPoolTest, NotServingAndDrainingLeaveAndReturn) {
  auto worker = StartWorker();
  std::unique_ptr<WorkerPool> pool = MakePool(ManualOptions({worker->address}));
  ASSERT_NE(pool, nullptr);
  pool->TEST_RunProbeRound();
  ASSERT_EQ(pool->Rank("k").size(), 1u);

  worker->SetServing(false);
  pool->TEST_RunProbeRound();
  EXPECT_TRUE(pool->Rank("k").empty());
  EndpointStatus status = StatusOf(*pool, worker->address);
  EXPECT_FALSE(status.serving);
  EXPECT_FALSE(status.ready);
  EXPECT_TRUE(absl::StrContains(status.last_error, "NOT_SERVING")) << status.last_error;

  worker->SetServing(true);
  pool->TEST_RunProbeRound();
  EXPECT_EQ(pool->Rank("k").size(), 1u);

  worker->service.set_draining(true);
  pool->TEST_RunProbeRound();
  EXPECT_TRUE(pool->Rank("k").empty());
  status = StatusOf(*pool, worker->address);
  EXPECT_TRUE(status.serving);
  EXPECT_TRUE(status.draining);
  EXPECT_TRUE(status.load.draining());
  EXPECT_EQ(status.last_error, "draining");

  worker->service.set_draining(false);
  pool->TEST_RunProbeRound();
  EXPECT_EQ(pool->Rank("k").size(), 1u);
}

TEST(WorkerPoolTest, MarkUnavailableHoldsUntilTheNextProbeRound) {
  auto a = StartWorker();
  auto b = StartWorker();
  std::unique_ptr<WorkerPool> pool = MakePool(ManualOptions({a->address, b->address}));
  ASSERT_NE(pool, nullptr);
  pool->TEST_RunProbeRound();
  ASSERT_EQ(pool->Rank("k").size(), 2u);

  pool->MarkUnavailable(a->address);
  pool->MarkUnavailable("10.9.9.9:1");  // unknown: no-op
  EXPECT_EQ(Names(pool->Rank("k")), std::vector<std::string>{b->address});
  EXPECT_FALSE(StatusOf(*pool, a->address).ready);

  pool->TEST_RunProbeRound();
  EXPECT_EQ(pool->Rank("k").size(), 2u);
  EXPECT_TRUE(StatusOf(*pool, a->address).ready);
}

TEST(WorkerPoolTest, UnreachableEndpointIsNeverReady) {
  std::unique_ptr<WorkerPool> pool = MakePool(ManualOptions({"127.0.0.1:1"}));
  ASSERT_NE(pool, nullptr);
  pool->TEST_RunProbeRound();
  EXPECT_TRUE(pool->Rank("k").empty());
  EndpointStatus status = StatusOf(*pool, "127.0.0.1:1");
  EXPECT_TRUE(status.probed);
  EXPECT_FALSE(status.ready);
  EXPECT_FALSE(status.last_error.empty());
  absl::Status wait = pool->WaitForReady(absl::Milliseconds(20));
  EXPECT_EQ(wait.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(wait.message(), "127.0.0.1:1")) << wait;
}

TEST(WorkerPoolTest, PreMadeChannelJoinsThePool) {
  auto worker = StartWorker();
  WorkerPoolOptions options = ManualOptions({});
  options.channels.push_back(
      {"in-process", worker->server->InProcessChannel(grpc::ChannelArguments())});
  std::unique_ptr<WorkerPool> pool = MakePool(options);
  ASSERT_NE(pool, nullptr);
  ASSERT_TRUE(pool->WaitForReady(absl::Seconds(5)).ok());
  EXPECT_EQ(Names(pool->Rank("k")), std::vector<std::string>{"in-process"});
}

TEST(WorkerPoolTest, DnsMembersJoinAndLeave) {
  auto a = StartWorker();
  auto b = StartWorker();
  auto dns = std::make_shared<FakeDns>();
  dns->Answer(std::set<std::string>{a->address, b->address});
  std::unique_ptr<WorkerPool> pool = MakePool(FakeDns::Options(dns));
  ASSERT_NE(pool, nullptr);
  pool->TEST_RunProbeRound();
  ASSERT_FALSE(dns->asked().empty());
  EXPECT_EQ(dns->asked().front(), "kls-worker.kls.svc 50052");
  std::vector<EndpointPtr> ranked = pool->Rank("k");
  ASSERT_EQ(ranked.size(), 2u);
  const EndpointPtr held = ranked[0];

  // b's pod went away: it leaves the pool (in-flight holders keep a valid endpoint).
  dns->Answer(std::set<std::string>{a->address});
  pool->TEST_RunProbeRound();
  EXPECT_EQ(Names(pool->Rank("k")), std::vector<std::string>{a->address});
  EXPECT_EQ(pool->Endpoints().size(), 1u);
  EXPECT_FALSE(held->name().empty());

  // A failed lookup keeps the last known members.
  dns->Answer(absl::UnavailableError("resolver unreachable"));
  pool->TEST_RunProbeRound();
  EXPECT_EQ(Names(pool->Rank("k")), std::vector<std::string>{a->address});

  // A name with no addresses empties the pool; a new address joins.
  dns->Answer(std::set<std::string>{});
  pool->TEST_RunProbeRound();
  EXPECT_TRUE(pool->Endpoints().empty());
  dns->Answer(std::set<std::string>{b->address});
  pool->TEST_RunProbeRound();
  EXPECT_EQ(Names(pool->Rank("k")), std::vector<std::string>{b->address});
}

// A call that outlives its endpoint's DNS membership does not free it (its channel) when it
// lets go: that may happen on a gRPC callback thread. The pool's next round frees it.
TEST(WorkerPoolTest, EndpointThatLeftIsFreedByTheNextRoundNotByItsLastCall) {
  auto a = StartWorker();
  auto dns = std::make_shared<FakeDns>();
  dns->Answer(std::set<std::string>{a->address});
  std::unique_ptr<WorkerPool> pool = MakePool(FakeDns::Options(dns));
  ASSERT_NE(pool, nullptr);
  pool->Shutdown();  // the watcher's start-up round is over: only the rounds below reap
  pool->TEST_RunProbeRound();
  std::vector<EndpointPtr> ranked = pool->Rank("k");
  ASSERT_EQ(ranked.size(), 1u);
  EndpointPtr held = ranked[0];  // what an in-flight call holds
  ranked.clear();
  const std::weak_ptr<const WorkerEndpoint> watch = held;

  dns->Answer(std::set<std::string>{});
  pool->TEST_RunProbeRound();
  EXPECT_TRUE(pool->Endpoints().empty());
  EXPECT_FALSE(watch.expired());  // the call still uses it
  held.reset();                   // the call ends
  EXPECT_FALSE(watch.expired());  // ... without destroying the channel on its thread
  pool->TEST_RunProbeRound();
  EXPECT_TRUE(watch.expired());
}

TEST(WorkerPoolTest, RealDnsResolvesEachAddress) {
  auto worker = StartWorker();
  std::unique_ptr<WorkerPool> pool =
      MakePool(ManualOptions({absl::StrCat("dns:///localhost:", worker->port)}));
  ASSERT_NE(pool, nullptr);
  pool->TEST_RunProbeRound();
  // localhost may also resolve to ::1, where nothing listens; 127.0.0.1 must be there and ready.
  EXPECT_EQ(StatusOf(*pool, worker->address).ready, true);
  EXPECT_EQ(Names(pool->Rank("k")), std::vector<std::string>{worker->address});
}

TEST(WorkerPoolTest, WatcherProbesOnItsOwnAndShutdownKeepsState) {
  auto worker = StartWorker();
  WorkerPoolOptions options = ManualOptions({worker->address});
  options.health_interval = absl::Milliseconds(20);
  std::unique_ptr<WorkerPool> pool = MakePool(options);
  ASSERT_NE(pool, nullptr);
  ASSERT_TRUE(pool->WaitForReady(absl::Seconds(5)).ok());
  worker->SetServing(false);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!pool->Rank("k").empty() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(2));
  EXPECT_TRUE(pool->Rank("k").empty());
  worker->SetServing(true);
  ASSERT_TRUE(pool->WaitForReady(absl::Seconds(10)).ok());
  pool->Shutdown();
  pool->Shutdown();
  EXPECT_EQ(pool->Rank("k").size(), 1u);
}

TEST(WorkerPoolTest, EmptyPoolRanksNothing) {
  std::unique_ptr<WorkerPool> pool = MakePool(ManualOptions({}));
  ASSERT_NE(pool, nullptr);
  EXPECT_TRUE(pool->Rank("k").empty());
  EXPECT_TRUE(pool->Endpoints().empty());
  EXPECT_EQ(pool->WaitForReady(absl::Milliseconds(10)).code(), absl::StatusCode::kDeadlineExceeded);
}

}  // namespace
}  // namespace kls::router

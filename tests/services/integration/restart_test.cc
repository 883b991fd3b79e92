// Real processes, real SIGKILLs: `kls serve` killed between turns and restarted on the same data
// directory; the multi-process layout (kls store ×2, kls worker ×2, kls router) with the worker
// holding a session killed between turns and in the middle of a turn. Every turn afterwards must
// equal the uninterrupted run over the same tokens.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <thread>

#include "common/file_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "kls/v1/worker.grpc.pb.h"
#include "tests/services/integration/cluster.h"

namespace kls::testing {
namespace {

constexpr int kTurnTokens = 8;

std::string KlsBinary() { return BinaryDir() + "/services/cli/kls"; }

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// A child process; killed with SIGKILL when destroyed.
class Process {
 public:
  Process(std::vector<std::string> args, const std::string& log) {
    pid_ = fork();
    if (pid_ == 0) {
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      const char message[] = "restart_test: execv failed: ";
      (void)!write(2, message, sizeof(message) - 1);
      (void)!write(2, argv[0], strlen(argv[0]));
      (void)!write(2, "\n", 1);
      _exit(127);
    }
  }
  ~Process() { Kill(SIGKILL); }
  void Kill(int signal) {
    if (pid_ <= 0) return;
    kill(pid_, signal);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

std::string Tail(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (!text.ok()) return "(no log at " + path + ")";
  return text->size() > 3000 ? text->substr(text->size() - 3000) : *text;
}

// Waits until `address` answers grpc.health.v1 with SERVING.
bool WaitHealthy(const std::string& address, absl::Duration timeout) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    if (stub->Check(&context, request, &response).ok() &&
        response.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
      return true;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  return false;
}

std::unique_ptr<kls::v1::Sessions::Stub> Client(const std::string& address) {
  return kls::v1::Sessions::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

// Runs a turn of fresh tokens and checks it against the uninterrupted run.
void ExactTurn(kls::v1::Sessions::Stub* client, const std::string& id,
               std::vector<int32_t>* history, uint64_t seed, uint64_t expected_version) {
  const std::vector<int32_t> input = InputTokens(6 + seed % 5, seed);
  TurnResult turn = RunTurn(client, TokensTurn(id, input, kTurnTokens));
  ASSERT_TRUE(turn.status.ok()) << turn.status.error_message();
  EXPECT_EQ(turn.final.version(), expected_version);
  history->insert(history->end(), input.begin(), input.end());
  EXPECT_EQ(turn.tokens, UninterruptedRun(*history, kTurnTokens)) << "turn " << expected_version;
  history->insert(history->end(), turn.tokens.begin(), turn.tokens.end());
}

// `kls serve` on one data directory, started as often as a test needs.
class ServeProcess {
 public:
  ServeProcess()
      : dir_(ScratchDir()),
        address_("127.0.0.1:" + std::to_string(FreePort())),
        args_({KlsBinary(), "serve", "--model", TinyModelDir(), "--data-dir", dir_ + "/data",
               "--listen", address_, "--http-listen", "127.0.0.1:0"}) {}

  // Starts it and waits for SERVING; the returned client talks to it.
  std::unique_ptr<kls::v1::Sessions::Stub> Start() {
    const std::string log = dir_ + "/serve" + std::to_string(++starts_) + ".log";
    process_ = std::make_unique<Process>(args_, log);
    EXPECT_TRUE(WaitHealthy(address_, absl::Seconds(60))) << Tail(log);
    return Client(address_);
  }
  void Kill(int signal) { process_->Kill(signal); }

 private:
  const std::string dir_, address_;
  const std::vector<std::string> args_;
  int starts_ = 0;
  std::unique_ptr<Process> process_;
};

TEST(RestartTest, ServeKilledBetweenTurnsResumesExactly) {
  ServeProcess serve;
  std::vector<int32_t> history;
  auto client = serve.Start();
  ASSERT_TRUE(CreateSession(client.get(), "durable").ok());
  ExactTurn(client.get(), "durable", &history, 1, 1);
  ExactTurn(client.get(), "durable", &history, 2, 2);
  serve.Kill(SIGKILL);
  client = serve.Start();
  ExactTurn(client.get(), "durable", &history, 3, 3);
  ExactTurn(client.get(), "durable", &history, 4, 4);
}

TEST(RestartTest, SigtermDrainsAndWritesBackEphemeralTurns) {
  ServeProcess serve;
  std::vector<int32_t> history;
  auto client = serve.Start();
  ASSERT_TRUE(CreateSession(client.get(), "lazy").ok());
  // A NONE turn is written back by the drain, not by the turn.
  const std::vector<int32_t> input = InputTokens(7, 1);
  kls::v1::GenerateRequest request = TokensTurn("lazy", input, kTurnTokens);
  request.set_commit(kls::v1::COMMIT_POLICY_NONE);
  TurnResult turn = RunTurn(client.get(), request);
  ASSERT_TRUE(turn.status.ok()) << turn.status.error_message();
  history.insert(history.end(), input.begin(), input.end());
  history.insert(history.end(), turn.tokens.begin(), turn.tokens.end());
  serve.Kill(SIGTERM);  // waits for the process: a graceful drain
  client = serve.Start();
  ExactTurn(client.get(), "lazy", &history, 2, 2);
}

class MultiProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ScratchDir();
    for (int i = 0; i < 2; ++i) {
      stores_.push_back("127.0.0.1:" + std::to_string(FreePort()));
      store_procs_.push_back(std::make_unique<Process>(
          std::vector<std::string>{KlsBinary(), "store", "--listen", stores_[i], "--data-dir",
                                   dir_ + "/store" + std::to_string(i)},
          dir_ + "/store" + std::to_string(i) + ".log"));
    }
    for (int i = 0; i < 2; ++i) {
      workers_.push_back("127.0.0.1:" + std::to_string(FreePort()));
      worker_procs_.push_back(std::make_unique<Process>(
          std::vector<std::string>{KlsBinary(), "worker", "--listen", workers_[i], "--model",
                                   TinyModelDir(), "--store", stores_[0] + "," + stores_[1]},
          dir_ + "/worker" + std::to_string(i) + ".log"));
    }
    router_ = "127.0.0.1:" + std::to_string(FreePort());
    router_proc_ = std::make_unique<Process>(
        std::vector<std::string>{KlsBinary(), "router", "--listen", router_, "--workers",
                                 workers_[0] + "," + workers_[1]},
        dir_ + "/router.log");
    for (const std::string& a : stores_) ASSERT_TRUE(WaitHealthy(a, absl::Seconds(60)));
    for (const std::string& a : workers_) ASSERT_TRUE(WaitHealthy(a, absl::Seconds(60)));
    ASSERT_TRUE(WaitHealthy(router_, absl::Seconds(60)));
    client_ = Client(router_);
    // The router may not have probed the workers yet.
    absl::Time deadline = absl::Now() + absl::Seconds(20);
    while (!CreateSession(client_.get(), "roaming").ok() && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(100));
    }
  }

  // The worker holding `roaming` hot.
  int Holder() {
    for (int i = 0; i < 2; ++i) {
      auto stub = kls::v1::Worker::NewStub(
          grpc::CreateChannel(workers_[i], grpc::InsecureChannelCredentials()));
      grpc::ClientContext context;
      kls::v1::Load load;
      if (stub->GetLoad(&context, kls::v1::GetLoadRequest(), &load).ok() &&
          load.hot_sessions() > 0) {
        return i;
      }
    }
    return -1;
  }

  uint64_t Version() {
    grpc::ClientContext context;
    kls::v1::GetSessionRequest request;
    request.set_session_id("roaming");
    kls::v1::Session session;
    EXPECT_TRUE(client_->GetSession(&context, request, &session).ok());
    return session.version();
  }

  std::string dir_, router_;
  std::vector<std::string> stores_, workers_;
  std::vector<std::unique_ptr<Process>> store_procs_, worker_procs_;
  std::unique_ptr<Process> router_proc_;
  std::unique_ptr<kls::v1::Sessions::Stub> client_;
};

TEST_F(MultiProcessTest, WorkerKilledBetweenTurnsRestoresOnTheOtherWorker) {
  std::vector<int32_t> history;
  ExactTurn(client_.get(), "roaming", &history, 1, 1);
  ExactTurn(client_.get(), "roaming", &history, 2, 2);
  const int holder = Holder();
  ASSERT_GE(holder, 0);
  worker_procs_[holder]->Kill(SIGKILL);
  ExactTurn(client_.get(), "roaming", &history, 3, 3);
  ExactTurn(client_.get(), "roaming", &history, 4, 4);
  EXPECT_EQ(Holder(), 1 - holder);
}

TEST_F(MultiProcessTest, WorkerKilledMidTurnLeavesThePreviousVersion) {
  std::vector<int32_t> history;
  ExactTurn(client_.get(), "roaming", &history, 1, 1);
  const int holder = Holder();
  ASSERT_GE(holder, 0);
  // A long turn; kill its worker once tokens flow.
  std::thread killer;
  TurnResult killed;
  {
    grpc::ClientContext context;
    auto reader = client_->Generate(&context, TokensTurn("roaming", InputTokens(5, 77), 8000));
    kls::v1::GenerateResponse response;
    int tokens = 0;
    while (reader->Read(&response)) {
      tokens += response.token_ids_size();
      if (tokens >= 5 && !killer.joinable()) {
        killer = std::thread([&] { worker_procs_[holder]->Kill(SIGKILL); });
      }
    }
    killed.status = reader->Finish();
  }
  ASSERT_TRUE(killer.joinable()) << "the turn ended before the worker was killed: "
                                 << killed.status.error_message();
  killer.join();
  EXPECT_EQ(killed.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << killed.status.error_message();
  EXPECT_EQ(Version(), 1u);
  ExactTurn(client_.get(), "roaming", &history, 2, 2);
}

}  // namespace
}  // namespace kls::testing

// The sessions contract end to end on loopback, in one process: router → worker(s) → store.
// Every multi-turn result is compared token for token with one uninterrupted run over the same
// token sequence (greedy), which is what "the state carried between turns is exact" means.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <thread>

#include "common/file_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "services/store/remote_shard.h"
#include "tests/services/integration/cluster.h"

namespace kls::testing {
namespace {

constexpr int kTurnTokens = 8;

class SessionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_dir_ = ScratchDir();
    worker::WorkerOptions options;
    options.data_dir = data_dir_;
    worker_ = StartWorker(options);
    ASSERT_NE(worker_, nullptr);
    router_ = StartRouter({worker_->address});
    client_ = router_->client.get();
  }

  // Runs a turn of fresh input tokens and checks it against the uninterrupted run over
  // `history` + input; appends input and output to `history`.
  TurnResult ExactTurn(const std::string& session_id, std::vector<int32_t>* history, uint64_t seed,
                       const std::string& request_id = "") {
    const std::vector<int32_t> input = InputTokens(5 + seed % 7, seed);
    TurnResult turn = RunTurn(client_, TokensTurn(session_id, input, kTurnTokens, request_id));
    EXPECT_TRUE(turn.status.ok()) << turn.status.error_message();
    history->insert(history->end(), input.begin(), input.end());
    EXPECT_EQ(turn.tokens, UninterruptedRun(*history, kTurnTokens)) << "seed " << seed;
    history->insert(history->end(), turn.tokens.begin(), turn.tokens.end());
    return turn;
  }

  kls::v1::Session Get(const std::string& id, bool history = false) {
    grpc::ClientContext context;
    kls::v1::GetSessionRequest request;
    request.set_session_id(id);
    request.set_include_history(history);
    kls::v1::Session session;
    grpc::Status status = client_->GetSession(&context, request, &session);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return session;
  }

  std::string data_dir_;
  std::unique_ptr<ServedWorker> worker_;
  std::unique_ptr<ServedRouter> router_;
  kls::v1::Sessions::Stub* client_ = nullptr;
};

TEST_F(SessionsTest, FourTurnsEqualOneUninterruptedRun) {
  ASSERT_TRUE(CreateSession(client_, "four").ok());
  std::vector<int32_t> history;
  for (uint64_t turn = 1; turn <= 4; ++turn) {
    TurnResult result = ExactTurn("four", &history, turn);
    EXPECT_EQ(result.final.version(), turn);
    EXPECT_EQ(result.final.finish_reason(), kls::v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(result.final.usage().completion_tokens(), static_cast<uint32_t>(kTurnTokens));
  }
  const kls::v1::Session session = Get("four", /*history=*/true);
  EXPECT_EQ(session.version(), 4u);
  EXPECT_EQ(session.num_tokens(), history.size());
  EXPECT_EQ(std::vector<int32_t>(session.history_tokens().begin(), session.history_tokens().end()),
            history);
}

TEST_F(SessionsTest, ChatMessagesAndSystemPromptStreamText) {
  ASSERT_TRUE(CreateSession(client_, "chat", "You are terse.").ok());
  kls::v1::GenerateRequest request;
  request.set_session_id("chat");
  kls::v1::Message* m = request.add_messages();
  m->set_role("user");
  m->set_content("Hello, kls! ✓");
  request.mutable_sampling()->set_temperature(0.8f);
  request.mutable_sampling()->set_seed(42);
  request.mutable_sampling()->set_max_tokens(16);
  TurnResult first = RunTurn(client_, request);
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  EXPECT_GE(first.tokens.size(), 1u);
  EXPECT_EQ(first.final.version(), 1u);
  EXPECT_EQ(first.final.usage().seed(), 42u);
  // The system prompt (rendered at creation) was fed in the first turn.
  EXPECT_GT(first.final.usage().prompt_tokens(), 20u);
  const kls::v1::Session session = Get("chat", true);
  EXPECT_NE(session.history_text().find("You are terse."), std::string::npos);
  EXPECT_NE(session.history_text().find("Hello, kls! ✓"), std::string::npos);
}

TEST_F(SessionsTest, CancelledTurnLeavesTheSessionUnchanged) {
  ASSERT_TRUE(CreateSession(client_, "cancel").ok());
  std::vector<int32_t> history;
  ExactTurn("cancel", &history, 1);
  TurnResult cancelled =
      RunTurn(client_, TokensTurn("cancel", InputTokens(9, 99), 4000), /*cancel_after_tokens=*/3);
  EXPECT_EQ(cancelled.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(Get("cancel").version(), 1u);
  // The next turn continues from version 1 exactly, as if the cancelled turn never happened.
  TurnResult next = ExactTurn("cancel", &history, 2);
  EXPECT_EQ(next.final.version(), 2u);
}

TEST_F(SessionsTest, RetriedRequestIdIsNotAppliedTwice) {
  ASSERT_TRUE(CreateSession(client_, "idem").ok());
  std::vector<int32_t> history;
  TurnResult first = ExactTurn("idem", &history, 1, "req-1");
  TurnResult retry = RunTurn(client_, TokensTurn("idem", InputTokens(6, 1), kTurnTokens, "req-1"));
  ASSERT_TRUE(retry.status.ok());
  EXPECT_TRUE(retry.final.replayed());
  EXPECT_EQ(retry.tokens, first.tokens);
  EXPECT_EQ(retry.final.version(), 1u);
  EXPECT_EQ(Get("idem").version(), 1u);
  EXPECT_EQ(ExactTurn("idem", &history, 2, "req-2").final.version(), 2u);
}

TEST_F(SessionsTest, ForkedBranchesAreIndependentAndShareBlocks) {
  ASSERT_TRUE(CreateSession(client_, "parent").ok());
  std::vector<int32_t> parent_history;
  ExactTurn("parent", &parent_history, 1);
  ExactTurn("parent", &parent_history, 2);
  absl::StatusOr<store::StoreStats> before = worker_->worker->store().Stats();
  ASSERT_TRUE(before.ok());

  grpc::ClientContext context;
  kls::v1::ForkSessionRequest fork;
  fork.set_session_id("parent");
  fork.set_new_session_id("child");
  kls::v1::Session child;
  const grpc::Status forked = client_->ForkSession(&context, fork, &child);
  ASSERT_TRUE(forked.ok()) << forked.error_message();
  EXPECT_EQ(child.version(), 2u);
  EXPECT_EQ(child.parent_session_id(), "parent");

  // Shared, not copied: the child lists the parent's blocks and the store holds no new ones.
  absl::StatusOr<store::StoreStats> after = worker_->worker->store().Stats();
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->blocks, before->blocks);
  absl::StatusOr<kls::v1::SessionRecord> parent_record =
      worker_->worker->store().GetRecord("default", "parent");
  absl::StatusOr<kls::v1::SessionRecord> child_record =
      worker_->worker->store().GetRecord("default", "child");
  ASSERT_TRUE(parent_record.ok() && child_record.ok());
  ASSERT_GT(parent_record->block_keys_size(), 0);
  EXPECT_EQ(std::vector<std::string>(child_record->block_keys().begin(),
                                     child_record->block_keys().end()),
            std::vector<std::string>(parent_record->block_keys().begin(),
                                     parent_record->block_keys().end()));

  std::vector<int32_t> child_history = parent_history;
  ExactTurn("child", &child_history, 30);
  ExactTurn("parent", &parent_history, 40);
  ExactTurn("child", &child_history, 31);
  EXPECT_EQ(Get("parent").version(), 3u);
  EXPECT_EQ(Get("child").version(), 4u);

  // A fork at an older version starts from that version's history.
  grpc::ClientContext old_context;
  fork.set_new_session_id("old-branch");
  fork.set_version(1);
  kls::v1::Session old_branch;
  ASSERT_TRUE(client_->ForkSession(&old_context, fork, &old_branch).ok());
  EXPECT_EQ(old_branch.version(), 1u);
  const kls::v1::Session v1 = Get("old-branch", true);
  std::vector<int32_t> old_history(v1.history_tokens().begin(), v1.history_tokens().end());
  ASSERT_LT(old_history.size(), parent_history.size());
  EXPECT_TRUE(std::equal(old_history.begin(), old_history.end(), parent_history.begin()));
  ExactTurn("old-branch", &old_history, 50);
}

TEST_F(SessionsTest, CorruptStateChunkIsRebuiltFromTheTokenHistory) {
  ASSERT_TRUE(CreateSession(client_, "corrupt").ok());
  std::vector<int32_t> history;
  ExactTurn("corrupt", &history, 1);
  ExactTurn("corrupt", &history, 2);
  router_.reset();
  worker_.reset();
  {
    // Flip bytes in the stored state chunk behind the store's back.
    store::RocksDbShardOptions options;
    options.dir = data_dir_ + "/store";
    absl::StatusOr<std::unique_ptr<store::RocksDbShard>> shard = store::RocksDbShard::Open(options);
    ASSERT_TRUE(shard.ok()) << shard.status();
    int flipped = 0;
    std::vector<store::WriteOp> ops;
    ASSERT_TRUE((*shard)
                    ->Scan(kls::v1::COLUMN_FAMILY_STATE, "corrupt/", "", 0, false,
                           [&](std::string_view key, std::string_view value) {
                             std::string bad(value);
                             bad[bad.size() / 2] ^= 0x5a;
                             ops.push_back({kls::v1::COLUMN_FAMILY_STATE, std::string(key), false,
                                            std::move(bad)});
                             ++flipped;
                             return true;
                           })
                    .ok());
    ASSERT_GT(flipped, 0);
    store::WriteBatchSpec batch;
    batch.ops = std::move(ops);
    ASSERT_TRUE((*shard)->Write(batch).ok());
  }
  worker::WorkerOptions options;
  options.data_dir = data_dir_;
  worker_ = StartWorker(options);
  router_ = StartRouter({worker_->address});
  client_ = router_->client.get();
  TurnResult rebuilt = ExactTurn("corrupt", &history, 3);
  EXPECT_TRUE(rebuilt.final.timings().rebuilt());
  EXPECT_EQ(worker_->worker->engine().GetLoad().rebuilds_total(), 1u);
  EXPECT_EQ(rebuilt.final.version(), 3u);
  // The rebuilt state was committed: the next turn restores normally.
  EXPECT_EQ(ExactTurn("corrupt", &history, 4).final.version(), 4u);
}

TEST_F(SessionsTest, SnapshotOfAnotherModelIsRefused) {
  ASSERT_TRUE(CreateSession(client_, "model-a").ok());
  std::vector<int32_t> history;
  ExactTurn("model-a", &history, 1);
  router_.reset();
  worker_.reset();
  worker::WorkerOptions options;
  options.data_dir = data_dir_;
  options.model_dir = WriteModel("tiny", 8);  // same shapes, other weights
  worker_ = StartWorker(options);
  router_ = StartRouter({worker_->address});
  TurnResult refused =
      RunTurn(router_->client.get(), TokensTurn("model-a", InputTokens(5, 2), kTurnTokens));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(refused.status.error_message().find("model"), std::string::npos);
}

TEST_F(SessionsTest, ThirtyTwoConcurrentSessionsThreeTurnsEach) {
  constexpr int kSessions = 32;
  std::vector<std::vector<int32_t>> histories(kSessions);
  std::vector<std::vector<std::vector<int32_t>>> outputs(kSessions);
  std::vector<std::string> errors(kSessions);
  std::vector<std::thread> threads;
  for (int s = 0; s < kSessions; ++s) {
    threads.emplace_back([&, s] {
      const std::string id = "c" + std::to_string(s);
      if (!CreateSession(client_, id).ok()) {
        errors[s] = "create failed";
        return;
      }
      for (int t = 0; t < 3; ++t) {
        const std::vector<int32_t> input = InputTokens(4 + (s + t) % 5, 1000 + s * 10 + t);
        TurnResult turn = RunTurn(client_, TokensTurn(id, input, kTurnTokens));
        if (!turn.status.ok() || turn.final.version() != static_cast<uint64_t>(t + 1)) {
          errors[s] = turn.status.error_message();
          return;
        }
        histories[s].insert(histories[s].end(), input.begin(), input.end());
        outputs[s].push_back(turn.tokens);
        histories[s].insert(histories[s].end(), turn.tokens.begin(), turn.tokens.end());
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int s = 0; s < kSessions; ++s) {
    ASSERT_EQ(errors[s], "") << "session " << s;
    // Check every turn against its uninterrupted run.
    std::vector<int32_t> prefix;
    size_t offset = 0;
    for (int t = 0; t < 3; ++t) {
      const size_t input_len = 4 + (s + t) % 5;
      prefix.assign(histories[s].begin(), histories[s].begin() + offset + input_len);
      EXPECT_EQ(outputs[s][t], UninterruptedRun(prefix, kTurnTokens)) << "session " << s;
      offset += input_len + kTurnTokens;
    }
  }
}

TEST_F(SessionsTest, BadInputGetsTheRightCodeAndTheServerKeepsServing) {
  ASSERT_TRUE(CreateSession(client_, "ok").ok());
  auto expect_code = [&](kls::v1::GenerateRequest request, grpc::StatusCode code,
                         const std::string& needle) {
    TurnResult r = RunTurn(client_, request);
    EXPECT_EQ(r.status.error_code(), code) << needle << ": " << r.status.error_message();
    EXPECT_NE(r.status.error_message().find(needle), std::string::npos) << r.status.error_message();
  };
  expect_code(TokensTurn("nope", {65}, 4), grpc::StatusCode::NOT_FOUND, "nope");
  expect_code(TokensTurn("ok", {}, 4), grpc::StatusCode::INVALID_ARGUMENT, "empty");
  expect_code(TokensTurn("ok", std::vector<int32_t>(70000, 65), 4),
              grpc::StatusCode::INVALID_ARGUMENT, "context limit");
  expect_code(TokensTurn("ok", {100000}, 4), grpc::StatusCode::INVALID_ARGUMENT, "vocabulary");
  // Invalid UTF-8 in a proto3 string field never reaches kls: protobuf's parser refuses the
  // message on the wire (ValidateGenerateRequest's own check is unit-tested). It must still
  // fail cleanly and change nothing.
  kls::v1::GenerateRequest utf8 = TokensTurn("ok", {}, 4);
  kls::v1::Message* m = utf8.add_messages();
  m->set_role("user");
  m->set_content(std::string("bad \xff\xfe bytes"));
  EXPECT_FALSE(RunTurn(client_, utf8).status.ok());
  kls::v1::GenerateRequest role = TokensTurn("ok", {}, 4);
  m = role.add_messages();
  m->set_role("wizard");
  m->set_content("hi");
  expect_code(role, grpc::StatusCode::INVALID_ARGUMENT, "role");
  kls::v1::GenerateRequest request = TokensTurn("ok", {65}, 4);
  request.mutable_sampling()->set_temperature(-1);
  expect_code(request, grpc::StatusCode::INVALID_ARGUMENT, "temperature");
  request = TokensTurn("ok", {65}, 4);
  request.mutable_sampling()->set_top_p(std::numeric_limits<float>::quiet_NaN());
  expect_code(request, grpc::StatusCode::INVALID_ARGUMENT, "top_p");
  request = TokensTurn("ok", {65}, 4);
  request.mutable_sampling()->set_top_k(-3);
  expect_code(request, grpc::StatusCode::INVALID_ARGUMENT, "top_k");
  expect_code(TokensTurn("ok", {65}, 0), grpc::StatusCode::INVALID_ARGUMENT, "max_tokens");
  expect_code(TokensTurn("ok", {65}, -5), grpc::StatusCode::INVALID_ARGUMENT, "max_tokens");
  expect_code(TokensTurn("ok", {65}, 1 << 30), grpc::StatusCode::INVALID_ARGUMENT, "max_tokens");
  expect_code(TokensTurn("bad id!", {65}, 4), grpc::StatusCode::INVALID_ARGUMENT, "session_id");
  // Nothing changed, and a good turn still works.
  EXPECT_EQ(Get("ok").version(), 0u);
  std::vector<int32_t> history;
  EXPECT_EQ(ExactTurn("ok", &history, 1).final.version(), 1u);
  // Unknown sessions in the other RPCs.
  grpc::ClientContext context;
  kls::v1::GetSessionRequest get;
  get.set_session_id("missing");
  kls::v1::Session session;
  EXPECT_EQ(client_->GetSession(&context, get, &session).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(SessionsTest, ListAndDeleteSessions) {
  for (const char* id : {"b", "a", "c"}) ASSERT_TRUE(CreateSession(client_, id).ok());
  EXPECT_EQ(CreateSession(client_, "a").status().code(), absl::StatusCode::kAlreadyExists);
  grpc::ClientContext list_context;
  kls::v1::ListSessionsRequest list;
  kls::v1::ListSessionsResponse listed;
  ASSERT_TRUE(client_->ListSessions(&list_context, list, &listed).ok());
  ASSERT_EQ(listed.sessions_size(), 3);
  EXPECT_EQ(listed.sessions(0).session_id(), "a");
  grpc::ClientContext delete_context;
  kls::v1::DeleteSessionRequest del;
  del.set_session_id("b");
  kls::v1::DeleteSessionResponse deleted;
  ASSERT_TRUE(client_->DeleteSession(&delete_context, del, &deleted).ok());
  TurnResult gone = RunTurn(client_, TokensTurn("b", {65}, 2));
  EXPECT_EQ(gone.status.error_code(), grpc::StatusCode::NOT_FOUND);
}

// With API keys, a session belongs to its tenant: another tenant sees NOT_FOUND for every
// operation, exactly as if it did not exist, and may create its own session under the same id.
TEST(TenantTest, AnotherTenantsSessionIsNotFound) {
  const std::string dir = ScratchDir();
  ASSERT_TRUE(WriteStringToFile(dir + "/keys", "key-a alice\nkey-b bob\n").ok());
  worker::WorkerOptions options;
  options.data_dir = dir;
  std::unique_ptr<ServedWorker> worker = StartWorker(options);
  ASSERT_NE(worker, nullptr);
  std::unique_ptr<ServedRouter> router = StartRouter({worker->address}, dir + "/keys");
  auto call = [&](const std::string& key, auto rpc) {
    grpc::ClientContext context;
    if (!key.empty()) context.AddMetadata("authorization", "Bearer " + key);
    return rpc(&context);
  };
  kls::v1::CreateSessionRequest create;
  create.set_session_id("shared-name");
  kls::v1::Session session;
  EXPECT_EQ(call("", [&](auto* c) { return router->client->CreateSession(c, create, &session); })
                .error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  ASSERT_TRUE(call("key-a", [&](auto* c) {
                return router->client->CreateSession(c, create, &session);
              }).ok());
  kls::v1::GetSessionRequest get;
  get.set_session_id("shared-name");
  EXPECT_EQ(call("key-b", [&](auto* c) { return router->client->GetSession(c, get, &session); })
                .error_code(),
            grpc::StatusCode::NOT_FOUND);
  kls::v1::DeleteSessionRequest del;
  del.set_session_id("shared-name");
  kls::v1::DeleteSessionResponse deleted;
  EXPECT_EQ(call("key-b", [&](auto* c) { return router->client->DeleteSession(c, del, &deleted); })
                .error_code(),
            grpc::StatusCode::NOT_FOUND);
  {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer key-b");
    auto reader = router->client->Generate(&context, TokensTurn("shared-name", {65}, 2));
    kls::v1::GenerateResponse response;
    while (reader->Read(&response)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
  // Bob's own session of the same name is independent.
  EXPECT_TRUE(call("key-b", [&](auto* c) {
                return router->client->CreateSession(c, create, &session);
              }).ok());
  EXPECT_TRUE(
      call("key-a", [&](auto* c) { return router->client->GetSession(c, get, &session); }).ok());
}

// With a hot budget too small for one session, every idle session is evicted (written back
// first when dirty) and every turn restores from the store — still exactly.
TEST(EvictionTest, SessionsEvictedUnderTheBudgetRestoreExactly) {
  worker::WorkerOptions options;
  options.data_dir = ScratchDir();
  options.engine.hot_budget_bytes = 1;
  std::unique_ptr<ServedWorker> worker = StartWorker(options);
  ASSERT_NE(worker, nullptr);
  std::unique_ptr<ServedRouter> router = StartRouter({worker->address});
  std::vector<std::vector<int32_t>> histories(3);
  for (int turn = 1; turn <= 3; ++turn) {
    for (int s = 0; s < 3; ++s) {
      const std::string id = "evict" + std::to_string(s);
      if (turn == 1) {
        ASSERT_TRUE(CreateSession(router->client.get(), id).ok());
      }
      const std::vector<int32_t> input = InputTokens(6, 100 * s + turn);
      kls::v1::GenerateRequest request = TokensTurn(id, input, kTurnTokens);
      // NONE turns are written back when evicted; the next turn must still see them.
      if (turn == 2) request.set_commit(kls::v1::COMMIT_POLICY_NONE);
      TurnResult result = RunTurn(router->client.get(), request);
      ASSERT_TRUE(result.status.ok()) << result.status.error_message();
      histories[s].insert(histories[s].end(), input.begin(), input.end());
      EXPECT_EQ(result.tokens, UninterruptedRun(histories[s], kTurnTokens));
      histories[s].insert(histories[s].end(), result.tokens.begin(), result.tokens.end());
      if (turn > 1) {
        EXPECT_TRUE(result.final.timings().restored()) << "turn " << turn;
      }
      // Let the write-back of a NONE turn land before the next session's turn.
      const absl::Time deadline = absl::Now() + absl::Seconds(10);
      while (worker->worker->engine().GetLoad().hot_sessions() > 0 && absl::Now() < deadline) {
        absl::SleepFor(absl::Milliseconds(5));
      }
    }
  }
}

// A backend whose state memory runs out before the hot budget in bytes does (the CUDA backend's
// slots): the engine evicts idle, durable sessions to make room, and every turn stays exact.
TEST(EvictionTest, BackendOutOfStateSlotsEvictsIdleSessions) {
  worker::WorkerOptions options;
  options.data_dir = ScratchDir();
  options.backend.cpu.max_states = 3;  // fewer than the 4 sessions
  std::unique_ptr<ServedWorker> worker = StartWorker(options);
  ASSERT_NE(worker, nullptr);
  std::unique_ptr<ServedRouter> router = StartRouter({worker->address});
  std::vector<std::vector<int32_t>> histories(4);
  for (int turn = 1; turn <= 2; ++turn) {
    for (int s = 0; s < 4; ++s) {
      const std::string id = "slots" + std::to_string(s);
      if (turn == 1) {
        ASSERT_TRUE(CreateSession(router->client.get(), id).ok());
      }
      const std::vector<int32_t> input = InputTokens(5, 10 * s + turn);
      TurnResult result = RunTurn(router->client.get(), TokensTurn(id, input, kTurnTokens));
      ASSERT_TRUE(result.status.ok())
          << id << " turn " << turn << ": " << result.status.error_message();
      histories[s].insert(histories[s].end(), input.begin(), input.end());
      EXPECT_EQ(result.tokens, UninterruptedRun(histories[s], kTurnTokens));
      histories[s].insert(histories[s].end(), result.tokens.begin(), result.tokens.end());
    }
  }
  EXPECT_GT(worker->worker->engine().GetLoad().evictions_total(), 0u);
  EXPECT_LE(worker->worker->engine().GetLoad().hot_sessions(), 3u);  // max_states
}

// A backend that fails for good (a sticky GPU error; ARCHITECTURE.md §8): the turn in flight
// fails with UNAVAILABLE (the router retries it elsewhere), the worker reports NOT_SERVING and
// calls its fatal handler once (kls then drains and exits non-zero), and later turns are refused
// with UNAVAILABLE instead of touching the broken backend.
TEST(BackendFailureTest, StickyFailureTakesTheWorkerOutOfService) {
  worker::WorkerOptions options;
  options.data_dir = ScratchDir();
  options.backend.cpu.fail_after_forwards = 2;  // the first turn's two steps succeed
  std::unique_ptr<ServedWorker> worker = StartWorker(options);
  ASSERT_NE(worker, nullptr);
  std::atomic<int> fatal_calls{0};
  worker->worker->SetFatalHandler([&fatal_calls] { fatal_calls.fetch_add(1); });
  auto channel = grpc::CreateChannel(worker->address, grpc::InsecureChannelCredentials());
  std::unique_ptr<ServedRouter> router = StartRouter({worker->address});
  ASSERT_TRUE(CreateSession(router->client.get(), "doomed").ok());
  kls::v1::GenerateRequest first = TokensTurn("doomed", InputTokens(4, 2), 2);
  first.set_commit(kls::v1::COMMIT_POLICY_NONE);  // held in memory, not yet durable
  ASSERT_TRUE(RunTurn(router->client.get(), first).status.ok());
  const TurnResult failed =
      RunTurn(router->client.get(), TokensTurn("doomed", InputTokens(4, 1), 16));
  EXPECT_EQ(failed.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << failed.status.error_message();
  EXPECT_FALSE(worker->worker->backend_failure().ok());
  EXPECT_EQ(fatal_calls.load(), 1);
  grpc::health::v1::HealthCheckRequest health_request;
  grpc::health::v1::HealthCheckResponse health;
  grpc::ClientContext context;
  ASSERT_TRUE(
      grpc::health::v1::Health::NewStub(channel)->Check(&context, health_request, &health).ok());
  EXPECT_EQ(health.status(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  // The worker refuses further turns without touching the backend.
  const TurnResult refused = RunTurn(router->client.get(), TokensTurn("doomed", {65}, 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(fatal_calls.load(), 1);
  // The drain does not wait for write-backs a failed backend cannot make; it says what is lost.
  const absl::Time start = absl::Now();
  const absl::Status drained = worker->worker->Drain(absl::Seconds(20));
  EXPECT_TRUE(absl::IsDataLoss(drained)) << drained;
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

// Drain writes back NONE turns; when the store is gone it keeps retrying and then says how many
// sessions it could not write instead of claiming success.
TEST(DrainTest, ReportsSessionsItCouldNotWriteBack) {
  auto shard_server = std::make_unique<ServedStoreShard>();
  store::RocksDbShardOptions shard_options;
  shard_options.dir = ScratchDir() + "/shard";
  absl::StatusOr<std::unique_ptr<store::RocksDbShard>> shard =
      store::RocksDbShard::Open(shard_options);
  ASSERT_TRUE(shard.ok()) << shard.status();
  shard_server->shard = *std::move(shard);
  shard_server->service = std::make_unique<store::StateStoreService>(
      shard_server->shard.get(), store::StateStoreServiceOptions());
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(shard_server->service.get());
  shard_server->server = builder.BuildAndStart();
  worker::WorkerOptions options;
  options.store_targets = {"127.0.0.1:" + std::to_string(port)};
  std::unique_ptr<ServedWorker> worker = StartWorker(options);
  ASSERT_NE(worker, nullptr);
  std::unique_ptr<ServedRouter> router = StartRouter({worker->address});
  ASSERT_TRUE(CreateSession(router->client.get(), "unsaved").ok());
  kls::v1::GenerateRequest request = TokensTurn("unsaved", InputTokens(5, 3), kTurnTokens);
  request.set_commit(kls::v1::COMMIT_POLICY_NONE);
  ASSERT_TRUE(RunTurn(router->client.get(), request).status.ok());
  shard_server.reset();  // the store goes away
  const absl::Status drained = worker->worker->Drain(absl::Seconds(2));
  EXPECT_EQ(drained.code(), absl::StatusCode::kDeadlineExceeded) << drained;
  EXPECT_NE(std::string(drained.message()).find("1 hot sessions"), std::string::npos) << drained;
}

// Two workers over two remote store shards: the worker holding a session goes away and the
// next turn restores on the other one, exactly.
TEST(MultiWorkerTest, NextTurnRestoresOnTheOtherWorker) {
  std::vector<std::unique_ptr<ServedStoreShard>> shards;
  std::vector<std::string> shard_addresses;
  for (int i = 0; i < 2; ++i) {
    auto served = std::make_unique<ServedStoreShard>();
    store::RocksDbShardOptions options;
    options.dir = ScratchDir() + "/shard" + std::to_string(i);
    absl::StatusOr<std::unique_ptr<store::RocksDbShard>> shard = store::RocksDbShard::Open(options);
    ASSERT_TRUE(shard.ok()) << shard.status();
    served->shard = *std::move(shard);
    served->service = std::make_unique<store::StateStoreService>(served->shard.get(),
                                                                 store::StateStoreServiceOptions());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(served->service.get());
    served->server = builder.BuildAndStart();
    served->address = "127.0.0.1:" + std::to_string(port);
    shard_addresses.push_back(served->address);
    shards.push_back(std::move(served));
  }
  std::vector<std::unique_ptr<ServedWorker>> workers;
  std::vector<std::string> worker_addresses;
  for (int i = 0; i < 2; ++i) {
    worker::WorkerOptions options;
    options.store_targets = shard_addresses;
    workers.push_back(StartWorker(options));
    ASSERT_NE(workers.back(), nullptr);
    worker_addresses.push_back(workers.back()->address);
  }
  std::unique_ptr<ServedRouter> router = StartRouter(worker_addresses);
  ASSERT_TRUE(CreateSession(router->client.get(), "moving").ok());
  std::vector<int32_t> history;
  for (uint64_t t = 1; t <= 2; ++t) {
    const std::vector<int32_t> input = InputTokens(7, t);
    TurnResult turn = RunTurn(router->client.get(), TokensTurn("moving", input, kTurnTokens));
    ASSERT_TRUE(turn.status.ok()) << turn.status.error_message();
    history.insert(history.end(), input.begin(), input.end());
    history.insert(history.end(), turn.tokens.begin(), turn.tokens.end());
  }
  // Stop whichever worker holds the session (the other one has never seen it).
  int holder = -1;
  for (int i = 0; i < 2; ++i) {
    if (workers[i]->worker->engine().GetLoad().hot_sessions() > 0) holder = i;
  }
  ASSERT_GE(holder, 0);
  workers[holder]->Stop();
  for (uint64_t t = 3; t <= 4; ++t) {
    const std::vector<int32_t> input = InputTokens(7, t);
    TurnResult turn = RunTurn(router->client.get(), TokensTurn("moving", input, kTurnTokens));
    ASSERT_TRUE(turn.status.ok()) << turn.status.error_message();
    history.insert(history.end(), input.begin(), input.end());
    EXPECT_EQ(turn.tokens, UninterruptedRun(history, kTurnTokens));
    if (t == 3) {
      EXPECT_TRUE(turn.final.timings().restored());
    }
    history.insert(history.end(), turn.tokens.begin(), turn.tokens.end());
  }
}

}  // namespace
}  // namespace kls::testing

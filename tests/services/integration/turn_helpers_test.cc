// The Sessions API's conversation helpers (the HTTP API builds on them), end to end through a
// router and a worker: expected_version, turn metadata merged at commit and the session's
// metadata bounds, special_tokens_in_text, and include_turns.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "tests/services/integration/cluster.h"

namespace kls::testing {
namespace {

class TurnHelpersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    worker::WorkerOptions options;
    options.data_dir = ScratchDir();
    worker_ = StartWorker(options);
    ASSERT_NE(worker_, nullptr);
    router_ = StartRouter({worker_->address});
    client_ = router_->client.get();
  }

  kls::v1::Session Get(const std::string& id, bool turns = false) {
    grpc::ClientContext context;
    kls::v1::GetSessionRequest request;
    request.set_session_id(id);
    request.set_include_turns(turns);
    kls::v1::Session session;
    grpc::Status status = client_->GetSession(&context, request, &session);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return session;
  }

  static std::map<std::string, std::string> Metadata(const kls::v1::Session& s) {
    return {s.metadata().begin(), s.metadata().end()};
  }

  // A two-token turn of fresh input carrying `metadata`.
  static kls::v1::GenerateRequest Turn(const std::string& session_id,
                                       const std::map<std::string, std::string>& metadata = {},
                                       uint64_t seed = 1) {
    kls::v1::GenerateRequest request = TokensTurn(session_id, InputTokens(4, seed), 2);
    for (const auto& [key, value] : metadata) (*request.mutable_metadata())[key] = value;
    return request;
  }

  std::unique_ptr<ServedWorker> worker_;
  std::unique_ptr<ServedRouter> router_;
  kls::v1::Sessions::Stub* client_ = nullptr;
};

TEST_F(TurnHelpersTest, ExpectedVersionMismatchIsAbortedAndChangesNothing) {
  ASSERT_TRUE(CreateSession(client_, "ev").ok());
  kls::v1::GenerateRequest first = Turn("ev", {{"k", "1"}});
  first.set_expected_version(0);
  ASSERT_TRUE(RunTurn(client_, first).status.ok());
  const kls::v1::Session before = Get("ev");
  ASSERT_EQ(before.version(), 1u);

  for (uint64_t stale : {uint64_t{0}, uint64_t{2}, uint64_t{99}}) {
    kls::v1::GenerateRequest request = Turn("ev", {{"k", "stale"}, {"new", "x"}}, 2);
    request.set_expected_version(stale);
    request.set_request_id("stale-" + std::to_string(stale));
    const TurnResult result = RunTurn(client_, request);
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::ABORTED) << stale;
    EXPECT_NE(
        result.status.error_message().find("not the expected version " + std::to_string(stale)),
        std::string::npos)
        << result.status.error_message();
    EXPECT_TRUE(result.tokens.empty());
  }
  // Nothing changed: version, tokens, metadata, recorded turns.
  const kls::v1::Session after = Get("ev", /*turns=*/true);
  EXPECT_EQ(after.version(), 1u);
  EXPECT_EQ(after.num_tokens(), before.num_tokens());
  EXPECT_EQ(Metadata(after), (std::map<std::string, std::string>{{"k", "1"}}));
  EXPECT_EQ(after.recent_turns_size(), 0);
  // The matching version runs.
  kls::v1::GenerateRequest next = Turn("ev", {}, 3);
  next.set_expected_version(1);
  const TurnResult ok = RunTurn(client_, next);
  ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.final.version(), 2u);
}

TEST_F(TurnHelpersTest, MetadataIsMergedAndErasedOnlyWhenATurnCommits) {
  {
    grpc::ClientContext context;
    kls::v1::CreateSessionRequest request;
    request.set_session_id("meta");
    (*request.mutable_metadata())["a"] = "1";
    (*request.mutable_metadata())["b"] = "2";
    kls::v1::Session session;
    ASSERT_TRUE(client_->CreateSession(&context, request, &session).ok());
  }
  // An empty value erases, others are set or replaced, untouched keys stay.
  ASSERT_TRUE(RunTurn(client_, Turn("meta", {{"a", "x"}, {"b", ""}, {"c", "3"}})).status.ok());
  const std::map<std::string, std::string> merged = {{"a", "x"}, {"c", "3"}};
  EXPECT_EQ(Metadata(Get("meta")), merged);
  // A cancelled turn commits nothing, metadata included.
  kls::v1::GenerateRequest long_turn = TokensTurn("meta", InputTokens(4, 5), 4000);
  (*long_turn.mutable_metadata())["d"] = "4";
  (*long_turn.mutable_metadata())["a"] = "";
  const TurnResult cancelled = RunTurn(client_, long_turn, /*cancel_after_tokens=*/2);
  EXPECT_EQ(cancelled.status.error_code(), grpc::StatusCode::CANCELLED);
  // A refused turn neither.
  kls::v1::GenerateRequest refused = Turn("meta", {{"e", "5"}});
  refused.set_expected_version(7);
  EXPECT_EQ(RunTurn(client_, refused).status.error_code(), grpc::StatusCode::ABORTED);
  // The session is free again once the cancelled turn unwound; poll for it.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  TurnResult last;
  do {
    last = RunTurn(client_, Turn("meta", {{"f", "6"}}, 9));
  } while (last.status.error_code() == grpc::StatusCode::ABORTED && absl::Now() < deadline);
  ASSERT_TRUE(last.status.ok()) << last.status.error_message();
  EXPECT_EQ(last.final.version(), 2u);
  EXPECT_EQ(Metadata(Get("meta")),
            (std::map<std::string, std::string>{{"a", "x"}, {"c", "3"}, {"f", "6"}}));
}

TEST_F(TurnHelpersTest, SessionMetadataIsBoundedInEntriesAndBytes) {
  ASSERT_TRUE(CreateSession(client_, "many").ok());
  auto entries = [](int from, int n, size_t value_bytes) {
    std::map<std::string, std::string> m;
    for (int i = from; i < from + n; ++i)
      m["key" + std::to_string(i)] = std::string(value_bytes, 'v');
    return m;
  };
  // 128 entries fit (two turns of the per-turn maximum, 64).
  ASSERT_TRUE(RunTurn(client_, Turn("many", entries(0, 64, 1))).status.ok());
  ASSERT_TRUE(RunTurn(client_, Turn("many", entries(64, 64, 1))).status.ok());
  // One more is refused, naming the limit, and changes nothing.
  const TurnResult over = RunTurn(client_, Turn("many", entries(128, 1, 1)));
  EXPECT_EQ(over.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(over.status.error_message().find("at most 128 entries"), std::string::npos)
      << over.status.error_message();
  EXPECT_NE(over.status.error_message().find("129 metadata entries"), std::string::npos)
      << over.status.error_message();
  kls::v1::Session session = Get("many");
  EXPECT_EQ(session.version(), 2u);
  EXPECT_EQ(session.metadata_size(), 128);
  // Replacing a key, or erasing one to add another, stays within the bound.
  std::map<std::string, std::string> swap = {{"key0", ""}, {"key128", "v"}, {"key1", "w"}};
  ASSERT_TRUE(RunTurn(client_, Turn("many", swap)).status.ok());
  session = Get("many");
  EXPECT_EQ(session.metadata_size(), 128);
  EXPECT_EQ(session.metadata().at("key1"), "w");
  EXPECT_EQ(session.metadata().count("key0"), 0u);

  // Bytes: 17 values of 4000 bytes (every one within the per-turn limit) exceed 64 KiB.
  ASSERT_TRUE(CreateSession(client_, "big").ok());
  ASSERT_TRUE(RunTurn(client_, Turn("big", entries(0, 16, 4000))).status.ok());
  const TurnResult too_big = RunTurn(client_, Turn("big", entries(16, 1, 4000)));
  EXPECT_EQ(too_big.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(too_big.status.error_message().find("65536 bytes"), std::string::npos)
      << too_big.status.error_message();
  EXPECT_EQ(Get("big").version(), 1u);
  // Erasing makes room again.
  std::map<std::string, std::string> room = entries(16, 1, 4000);
  room["key0"] = "";
  EXPECT_TRUE(RunTurn(client_, Turn("big", room)).status.ok());
  EXPECT_EQ(Get("big").metadata_size(), 16);

  // Creating a session (or forking one) with too much metadata is refused as well.
  grpc::ClientContext context;
  kls::v1::CreateSessionRequest create;
  create.set_session_id("crowded");
  for (const auto& [key, value] : entries(0, 129, 1)) (*create.mutable_metadata())[key] = value;
  kls::v1::Session created;
  const grpc::Status status = client_->CreateSession(&context, create, &created);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  grpc::ClientContext fork_context;
  kls::v1::ForkSessionRequest fork;
  fork.set_session_id("big");
  for (const auto& [key, value] : entries(0, 17, 4000)) (*fork.mutable_metadata())[key] = value;
  EXPECT_EQ(client_->ForkSession(&fork_context, fork, &created).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

// The same sampled turn on two fresh sessions, with and without special_tokens_in_text.
TEST_F(TurnHelpersTest, SpecialTokensInTextSpellsMarkersButNeverTheStopToken) {
  const engine::Tokenizer& tokenizer = *TinyModel().tokenizer;
  auto sampled = [&](const std::string& id, bool special, bool stop_at_special) {
    EXPECT_TRUE(CreateSession(client_, id).ok());
    kls::v1::GenerateRequest request = TokensTurn(id, InputTokens(6, 11), 48);
    request.mutable_sampling()->set_temperature(1);
    request.mutable_sampling()->set_seed(1234);
    request.set_special_tokens_in_text(special);
    if (stop_at_special) {
      for (int32_t t = 0; t < tokenizer.vocab_size(); ++t) {
        if (tokenizer.IsSpecial(t)) request.mutable_sampling()->add_stop_token_ids(t);
      }
    }
    TurnResult result = RunTurn(client_, request);
    EXPECT_TRUE(result.status.ok()) << result.status.error_message();
    return result;
  };
  auto decode = [&](const std::vector<int32_t>& ids, bool skip_special) {
    engine::StreamingDecoder decoder(tokenizer, skip_special);
    std::string text;
    for (int32_t id : ids) text += decoder.Push(id).value_or("");
    return text + decoder.Flush();
  };
  const TurnResult spelled = sampled("spelled", /*special=*/true, /*stop_at_special=*/false);
  const TurnResult plain = sampled("plain", /*special=*/false, /*stop_at_special=*/false);
  ASSERT_EQ(spelled.tokens, plain.tokens);  // same seed, same tokens
  std::vector<std::string> markers;
  for (int32_t id : spelled.tokens) {
    if (tokenizer.IsSpecial(id)) markers.emplace_back(tokenizer.TokenBytes(id).value());
  }
  ASSERT_FALSE(markers.empty()) << "the sampled turn has no special token to spell";
  EXPECT_EQ(spelled.text, decode(spelled.tokens, /*skip_special=*/false));
  EXPECT_EQ(plain.text, decode(plain.tokens, /*skip_special=*/true));
  for (const std::string& marker : markers) {
    EXPECT_NE(spelled.text.find(marker), std::string::npos) << marker;
    EXPECT_EQ(plain.text.find(marker), std::string::npos) << marker;
  }

  // Every special token stops this turn: the stop token is generated but has no text.
  const TurnResult stopped = sampled("stopped", /*special=*/true, /*stop_at_special=*/true);
  ASSERT_EQ(stopped.final.finish_reason(), kls::v1::FINISH_REASON_STOP);
  ASSERT_FALSE(stopped.tokens.empty());
  EXPECT_TRUE(tokenizer.IsSpecial(stopped.tokens.back()));
  const std::vector<int32_t> before_stop(stopped.tokens.begin(), stopped.tokens.end() - 1);
  EXPECT_EQ(stopped.text, decode(before_stop, /*skip_special=*/false));
  EXPECT_EQ(stopped.text.find(std::string(tokenizer.TokenBytes(stopped.tokens.back()).value())),
            std::string::npos);
  // The recorded text of a turn with a request_id follows the same rule.
  EXPECT_TRUE(CreateSession(client_, "recorded").ok());
  kls::v1::GenerateRequest request = TokensTurn("recorded", InputTokens(6, 11), 48, "req");
  request.mutable_sampling()->set_temperature(1);
  request.mutable_sampling()->set_seed(1234);
  request.set_special_tokens_in_text(true);
  for (int32_t t = 0; t < tokenizer.vocab_size(); ++t) {
    if (tokenizer.IsSpecial(t)) request.mutable_sampling()->add_stop_token_ids(t);
  }
  ASSERT_TRUE(RunTurn(client_, request).status.ok());
  const kls::v1::Session session = Get("recorded", /*turns=*/true);
  ASSERT_EQ(session.recent_turns_size(), 1);
  EXPECT_EQ(session.recent_turns(0).text(), stopped.text);
}

TEST_F(TurnHelpersTest, IncludeTurnsReturnsTheLastSixteenOldestFirst) {
  ASSERT_TRUE(CreateSession(client_, "turns").ok());
  std::vector<std::string> texts;
  for (int i = 1; i <= 20; ++i) {
    const std::string request_id = "req-" + std::to_string(i);
    const TurnResult result =
        RunTurn(client_, TokensTurn("turns", InputTokens(3, i), 2 + i % 3, request_id));
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
    texts.push_back(result.text);
  }
  // A turn without a request_id is not recorded.
  ASSERT_TRUE(RunTurn(client_, Turn("turns", {}, 77)).status.ok());
  EXPECT_EQ(Get("turns").recent_turns_size(), 0);  // only with include_turns
  const kls::v1::Session session = Get("turns", /*turns=*/true);
  EXPECT_EQ(session.version(), 21u);
  ASSERT_EQ(session.recent_turns_size(), 16);
  for (int k = 0; k < 16; ++k) {
    const int i = k + 5;  // turns 5..20
    const kls::v1::TurnResult& turn = session.recent_turns(k);
    EXPECT_EQ(turn.request_id(), "req-" + std::to_string(i));
    EXPECT_EQ(turn.version(), static_cast<uint64_t>(i));
    EXPECT_EQ(turn.text(), texts[i - 1]);
    EXPECT_EQ(turn.completion_tokens(), static_cast<uint32_t>(2 + i % 3));
    EXPECT_EQ(turn.finish_reason(), kls::v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(turn.prompt_tokens(), 3u + (i == 1 ? 0u : 1u));  // + the previous turn's last token
  }
}

}  // namespace
}  // namespace kls::testing

#include "services/store/session_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/rendezvous.h"
#include "services/store/rocksdb_shard.h"
#include "tests/services/store/store_test_util.h"
#include "tests/test_util.h"

namespace kls::store {
namespace {

using kls::v1::SessionRecord;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

// A shard that can be switched off: every call is UNAVAILABLE while down. Forwards otherwise.
class SwitchableShard final : public Shard {
 public:
  explicit SwitchableShard(std::unique_ptr<RocksDbShard> inner) : inner_(std::move(inner)) {}

  void set_down(bool down) { down_ = down; }
  RocksDbShard& inner() { return *inner_; }

  const std::string& name() const override { return inner_->name(); }
  absl::Status Write(const WriteBatchSpec& batch) override {
    if (down_) return Down();
    return inner_->Write(batch);
  }
  absl::StatusOr<std::vector<std::optional<std::string>>> Read(
      Family family, const std::vector<std::string>& keys) override {
    if (down_) return Down();
    return inner_->Read(family, keys);
  }
  absl::Status Scan(Family family, std::string_view prefix, std::string_view start_after,
                    uint32_t limit, bool keys_only,
                    const std::function<bool(std::string_view, std::string_view)>& visit) override {
    if (down_) return Down();
    return inner_->Scan(family, prefix, start_after, limit, keys_only, visit);
  }

 private:
  absl::Status Down() const { return absl::UnavailableError(absl::StrCat(name(), " is down")); }

  std::unique_ptr<RocksDbShard> inner_;
  std::atomic<bool> down_{false};
};

// A 16-byte block key.
std::string BlockKey(int i) { return absl::StrFormat("block-%010d", i); }

std::string StateKey(std::string_view session_id, uint64_t version, uint32_t chunk) {
  return absl::StrFormat("%s/%020d/%06d", std::string(session_id), version, chunk);
}

class SessionStoreTest : public ::testing::Test {
 protected:
  void TearDown() override {
    store_.reset();
    testing::RemoveTree(dir_);
  }

  // S shards (names shard-0..), replication R.
  void MakeStore(int num_shards, int replication) {
    dir_ = testing::MakeTempDir();
    std::vector<std::unique_ptr<Shard>> shards;
    for (int i = 0; i < num_shards; ++i) {
      RocksDbShardOptions options;
      options.dir = absl::StrCat(dir_, "/shard-", i);
      options.name = absl::StrCat("shard-", i);
      options.write_buffer_bytes = 8 << 20;
      options.block_cache_bytes = 8 << 20;
      absl::StatusOr<std::unique_ptr<RocksDbShard>> shard = RocksDbShard::Open(options);
      ASSERT_TRUE(shard.ok()) << shard.status();
      auto switchable = std::make_unique<SwitchableShard>(std::move(*shard));
      shards_.push_back(switchable.get());
      names_.push_back(switchable->name());
      shards.push_back(std::move(switchable));
    }
    SessionStoreOptions options;
    options.replication = replication;
    absl::StatusOr<std::unique_ptr<SessionStore>> store =
        SessionStore::Create(std::move(shards), options);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
  }

  // Shard indices owning `key`, best first (the store's placement).
  std::vector<size_t> Owners(std::string_view key) const {
    return RendezvousRank(key, names_, static_cast<size_t>(store_->replication()));
  }

  // A consistent commit of `version` of tenant/session with `chunks` state chunks, `num_tokens`
  // tokens, and blocks `block_ids` (written and referenced).
  CommitRequest MakeCommit(const std::string& tenant, const std::string& session_id,
                           uint64_t version, std::optional<uint64_t> expected, int chunks = 2,
                           int num_tokens = 10, std::vector<int> block_ids = {}) {
    CommitRequest request;
    SessionRecord& record = request.record;
    record.set_format_version(1);
    record.set_tenant(tenant);
    record.set_session_id(session_id);
    record.set_version(version);
    record.set_num_history_tokens(num_tokens);
    record.set_state_chunks(chunks);
    record.set_update_time_ms(absl::ToUnixMillis(absl::Now()));
    for (int i = 0; i < chunks; ++i) {
      request.state_chunks.push_back(
          absl::StrCat(session_id, "/v", version, "/c", i, "/", RandomBytes(64, version * 31 + i)));
    }
    for (int i = 0; i < num_tokens; ++i) {
      request.tokens.push_back(static_cast<int32_t>(version * 1000 + i));
    }
    for (int id : block_ids) {
      record.add_block_keys(BlockKey(id));
      request.blocks.emplace_back(BlockKey(id), absl::StrCat("mla-block-", id));
    }
    request.expected_version = expected;
    return request;
  }

  // The record version stored on one shard, bypassing the store; nullopt when absent.
  std::optional<uint64_t> StoredVersion(size_t shard, const std::string& key) {
    absl::StatusOr<std::vector<std::optional<std::string>>> values =
        shards_[shard]->inner().Read(kls::v1::COLUMN_FAMILY_SESSIONS, {key});
    EXPECT_TRUE(values.ok()) << values.status();
    if (!values.ok() || !(*values)[0].has_value()) return std::nullopt;
    SessionRecord record;
    EXPECT_TRUE(record.ParseFromString(*(*values)[0]));
    return record.version();
  }

  StoreStats Stats() {
    absl::StatusOr<StoreStats> stats = store_->Stats();
    EXPECT_TRUE(stats.ok()) << stats.status();
    return stats.ok() ? *stats : StoreStats();
  }

  std::string dir_;
  std::vector<SwitchableShard*> shards_;  // owned by store_
  std::vector<std::string> names_;
  std::unique_ptr<SessionStore> store_;
};

TEST_F(SessionStoreTest, CommitThenReadEveryPart) {
  MakeStore(1, 1);
  CommitRequest v0 = MakeCommit("acme", "s1", 0, std::nullopt, 3, 12, {1, 2});
  ASSERT_TRUE(store_->Commit(v0).ok());

  absl::StatusOr<SessionRecord> record = store_->GetRecord("acme", "s1");
  ASSERT_TRUE(record.ok()) << record.status();
  EXPECT_EQ(record->SerializeAsString(), v0.record.SerializeAsString());
  absl::StatusOr<std::vector<std::string>> chunks = store_->GetStateChunks("s1", 0, 3);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  EXPECT_EQ(*chunks, v0.state_chunks);
  absl::StatusOr<std::vector<int32_t>> tokens = store_->GetTokens("s1");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(*tokens, v0.tokens);
  absl::StatusOr<std::vector<std::string>> blocks =
      store_->GetBlocks({BlockKey(2), BlockKey(1), BlockKey(2)});
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  EXPECT_THAT(*blocks, ElementsAre("mla-block-2", "mla-block-1", "mla-block-2"));
  absl::StatusOr<std::vector<std::string>> none = store_->GetStateChunks("s1", 0, 0);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());

  // The next turn drops version 0's chunks in the same batch.
  CommitRequest v1 = MakeCommit("acme", "s1", 1, 0, 2, 20);
  v1.drop_state_versions.emplace_back(0, 3);
  ASSERT_TRUE(store_->Commit(std::move(v1)).ok());
  EXPECT_EQ(store_->GetRecord("acme", "s1")->version(), 1u);
  EXPECT_EQ(store_->GetStateChunks("s1", 0, 3).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store_->GetStateChunks("s1", 1, 2).ok());
  EXPECT_EQ(store_->GetTokens("s1")->size(), 20u);
  StoreStats stats = Stats();
  EXPECT_EQ(stats.sessions, 1u);
  EXPECT_EQ(stats.state_chunks, 2u);
  EXPECT_EQ(stats.blocks, 2u);
  EXPECT_EQ(stats.token_histories, 1u);

  // Another tenant's id is not found, exactly as a missing one.
  EXPECT_EQ(store_->GetRecord("other", "s1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->GetRecord("acme", "nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->GetTokens("nope").status().code(), absl::StatusCode::kNotFound);
  absl::Status missing_block = store_->GetBlocks({BlockKey(1), BlockKey(9)}).status();
  EXPECT_EQ(missing_block.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing_block.message(), HasSubstr("block 1 of 2"));
}

TEST_F(SessionStoreTest, VersionConflictIsAbortedAndWritesNothing) {
  MakeStore(1, 1);
  ASSERT_TRUE(store_->Commit(MakeCommit("t", "s", 0, std::nullopt)).ok());
  CommitRequest winner = MakeCommit("t", "s", 1, 0, 2, 10);
  ASSERT_TRUE(store_->Commit(winner).ok());
  const StoreStats before = Stats();

  // A second worker, also at version 0, with different chunks and tokens.
  CommitRequest loser = MakeCommit("t", "s", 1, 0, 2, 11);
  loser.state_chunks = {"loser-0", "loser-1"};
  absl::Status status = store_->Commit(loser);
  EXPECT_EQ(status.code(), absl::StatusCode::kAborted) << status;
  EXPECT_EQ(*store_->GetStateChunks("s", 1, 2), winner.state_chunks);
  EXPECT_EQ(store_->GetTokens("s")->size(), 10u);

  // A "new" session whose record exists.
  EXPECT_EQ(store_->Commit(MakeCommit("t", "s", 0, std::nullopt)).code(),
            absl::StatusCode::kAborted);
  // Expecting a version the store has not reached.
  EXPECT_EQ(store_->Commit(MakeCommit("t", "s", 8, 7)).code(), absl::StatusCode::kAborted);
  // Expecting a version of a session that does not exist.
  EXPECT_EQ(store_->Commit(MakeCommit("t", "new", 2, 1)).code(), absl::StatusCode::kAborted);
  const StoreStats after = Stats();
  EXPECT_EQ(after.sessions, before.sessions);
  EXPECT_EQ(after.state_chunks, before.state_chunks);
  EXPECT_EQ(after.token_histories, before.token_histories);
}

TEST_F(SessionStoreTest, InconsistentCommitsAreInvalid) {
  MakeStore(1, 1);
  CommitRequest chunks = MakeCommit("t", "s", 0, std::nullopt);
  chunks.state_chunks.pop_back();
  EXPECT_EQ(store_->Commit(chunks).code(), absl::StatusCode::kInvalidArgument);
  CommitRequest tokens = MakeCommit("t", "s", 0, std::nullopt);
  tokens.tokens.push_back(1);
  EXPECT_EQ(store_->Commit(tokens).code(), absl::StatusCode::kInvalidArgument);
  CommitRequest block = MakeCommit("t", "s", 0, std::nullopt, 1, 1, {1});
  block.blocks[0].first = "short";
  EXPECT_EQ(store_->Commit(block).code(), absl::StatusCode::kInvalidArgument);
  CommitRequest tenant = MakeCommit("a/b", "s", 0, std::nullopt);
  absl::Status status = store_->Commit(tenant);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("a/b"));
  EXPECT_EQ(store_->Commit(MakeCommit("t", "", 0, std::nullopt)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->Commit(MakeCommit("t", "s", 3, 4)).code(), absl::StatusCode::kInvalidArgument);
  CommitRequest drop = MakeCommit("t", "s", 0, std::nullopt);
  drop.drop_state_versions.emplace_back(0, 2);
  EXPECT_EQ(store_->Commit(drop).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Stats().sessions, 0u);
  EXPECT_EQ(store_->GetRecord("t", "").status().code(), absl::StatusCode::kInvalidArgument);

  EXPECT_EQ(SessionStore::Create({}, SessionStoreOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SessionStoreTest, CreateRejectsBadReplicationAndDuplicateNames) {
  MakeStore(1, 1);
  auto open = [&](const std::string& subdir, const std::string& name) {
    RocksDbShardOptions options;
    options.dir = absl::StrCat(dir_, "/", subdir);
    options.name = name;
    absl::StatusOr<std::unique_ptr<RocksDbShard>> shard = RocksDbShard::Open(options);
    EXPECT_TRUE(shard.ok()) << shard.status();
    return std::unique_ptr<Shard>(std::move(*shard));
  };
  {
    std::vector<std::unique_ptr<Shard>> shards;
    shards.push_back(open("x0", "a"));
    shards.push_back(open("x1", "b"));
    SessionStoreOptions options;
    options.replication = 3;
    EXPECT_EQ(SessionStore::Create(std::move(shards), options).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  {
    std::vector<std::unique_ptr<Shard>> shards;
    shards.push_back(open("y0", "same"));
    shards.push_back(open("y1", "same"));
    absl::Status status = SessionStore::Create(std::move(shards), SessionStoreOptions()).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(status.message(), HasSubstr("duplicate shard name same"));
  }
}

TEST_F(SessionStoreTest, ReplicatedStoreServesAndCommitsWithAnyOneShardDown) {
  MakeStore(3, 2);
  // Enough sessions and blocks that every shard owns some.
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(absl::StrCat("sess-", i));
  for (size_t i = 0; i < ids.size(); ++i) {
    ASSERT_TRUE(store_
                    ->Commit(MakeCommit("t", ids[i], 0, std::nullopt, 2, 5,
                                        {static_cast<int>(2 * i), static_cast<int>(2 * i + 1)}))
                    .ok());
  }
  uint64_t version = 0;
  for (size_t down = 0; down < shards_.size(); ++down) {
    shards_[down]->set_down(true);
    for (size_t i = 0; i < ids.size(); ++i) {
      SCOPED_TRACE(absl::StrCat("shard ", down, " down, ", ids[i]));
      absl::StatusOr<SessionRecord> record = store_->GetRecord("t", ids[i]);
      ASSERT_TRUE(record.ok()) << record.status();
      EXPECT_EQ(record->version(), version);
      EXPECT_TRUE(store_->GetStateChunks(ids[i], version, 2).ok());
      EXPECT_TRUE(store_->GetTokens(ids[i]).ok());
      absl::StatusOr<std::vector<std::string>> blocks = store_->GetBlocks(
          {BlockKey(static_cast<int>(2 * i)), BlockKey(static_cast<int>(2 * i + 1))});
      ASSERT_TRUE(blocks.ok()) << blocks.status();
      EXPECT_EQ((*blocks)[1], absl::StrCat("mla-block-", 2 * i + 1));
      absl::Status commit = store_->Commit(MakeCommit("t", ids[i], version + 1, version));
      EXPECT_TRUE(commit.ok()) << commit;
    }
    shards_[down]->set_down(false);
    ++version;
    // Read repair catches the replica up before the next one fails (else the next failure would
    // take down the only current copy).
    for (const std::string& id : ids) {
      ASSERT_EQ(store_->GetRecord("t", id)->version(), version);
      for (size_t shard : Owners(id)) EXPECT_EQ(StoredVersion(shard, "t/" + id), version);
    }
  }
  // Every live replica got every commit; the replica that was down is caught up on read.
  for (const std::string& id : ids) {
    EXPECT_EQ(store_->GetRecord("t", id)->version(), version);
    for (size_t shard : Owners(id)) EXPECT_EQ(StoredVersion(shard, "t/" + id), version);
  }
}

TEST_F(SessionStoreTest, StaleReplicaIsRepairedOnRead) {
  MakeStore(3, 2);
  ASSERT_TRUE(store_->Commit(MakeCommit("t", "s", 0, std::nullopt, 2, 5)).ok());
  const std::vector<size_t> owners = Owners("s");
  ASSERT_EQ(owners.size(), 2u);
  const size_t stale = owners[1];
  shards_[stale]->set_down(true);
  CommitRequest v1 = MakeCommit("t", "s", 1, 0, 3, 9);
  ASSERT_TRUE(store_->Commit(v1).ok());
  shards_[stale]->set_down(false);
  EXPECT_EQ(StoredVersion(stale, "t/s"), 0u);

  absl::StatusOr<SessionRecord> record = store_->GetRecord("t", "s");
  ASSERT_TRUE(record.ok()) << record.status();
  EXPECT_EQ(record->version(), 1u);
  EXPECT_EQ(StoredVersion(stale, "t/s"), 1u);  // repaired: record, tokens and state
  shards_[owners[0]]->set_down(true);
  EXPECT_EQ(store_->GetRecord("t", "s")->version(), 1u);
  EXPECT_EQ(*store_->GetStateChunks("s", 1, 3), v1.state_chunks);
  EXPECT_EQ(*store_->GetTokens("s"), v1.tokens);
}

TEST_F(SessionStoreTest, StaleFirstReplicaCatchesUpOnTheNextCommit) {
  MakeStore(3, 2);
  ASSERT_TRUE(store_->Commit(MakeCommit("t", "s", 0, std::nullopt)).ok());
  const std::vector<size_t> owners = Owners("s");
  shards_[owners[0]]->set_down(true);
  ASSERT_TRUE(store_->Commit(MakeCommit("t", "s", 1, 0)).ok());
  shards_[owners[0]]->set_down(false);
  // The first-ranked replica still holds version 0; the commit of 2 over 1 must go through.
  ASSERT_EQ(StoredVersion(owners[0], "t/s"), 0u);
  absl::Status status = store_->Commit(MakeCommit("t", "s", 2, 1));
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(StoredVersion(owners[0], "t/s"), 2u);
  EXPECT_EQ(StoredVersion(owners[1], "t/s"), 2u);
  // A writer still at version 0 loses on the stale-looking path too.
  EXPECT_EQ(store_->Commit(MakeCommit("t", "s", 1, 0)).code(), absl::StatusCode::kAborted);
}

TEST_F(SessionStoreTest, SingleReplicaOwnerDownFailsTheCommitWithNothingWritten) {
  MakeStore(2, 1);
  const size_t owner = Owners("s")[0];
  shards_[owner]->set_down(true);
  absl::Status status = store_->Commit(MakeCommit("t", "s", 0, std::nullopt, 2, 4));
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_EQ(store_->GetRecord("t", "s").status().code(), absl::StatusCode::kUnavailable);
  shards_[owner]->set_down(false);
  EXPECT_EQ(store_->GetRecord("t", "s").status().code(), absl::StatusCode::kNotFound);
  const StoreStats stats = Stats();
  EXPECT_EQ(stats.sessions, 0u);
  EXPECT_EQ(stats.state_chunks, 0u);
  EXPECT_EQ(stats.token_histories, 0u);

  // A block whose only owner is down fails the commit too, before any record is written.
  int block = 0;
  while (Owners(BlockKey(block))[0] == Owners("s2")[0]) ++block;
  shards_[Owners(BlockKey(block))[0]]->set_down(true);
  EXPECT_EQ(store_->Commit(MakeCommit("t", "s2", 0, std::nullopt, 1, 1, {block})).code(),
            absl::StatusCode::kUnavailable);
  shards_[Owners(BlockKey(block))[0]]->set_down(false);
  EXPECT_EQ(store_->GetRecord("t", "s2").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SessionStoreTest, ConcurrentCommitsOfOneVersionHaveOneWinnerOnEveryReplica) {
  MakeStore(3, 2);
  ASSERT_TRUE(store_->Commit(MakeCommit("t", "s", 0, std::nullopt)).ok());
  constexpr int kWriters = 6;
  std::vector<absl::Status> results(kWriters);
  std::vector<CommitRequest> requests;
  for (int w = 0; w < kWriters; ++w) {
    requests.push_back(MakeCommit("t", "s", 1, 0, 1, 3));
    requests.back().state_chunks[0] = absl::StrCat("writer-", w);
  }
  std::vector<std::thread> threads;
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] { results[w] = store_->Commit(requests[w]); });
  }
  for (std::thread& thread : threads) thread.join();
  int winner = -1;
  for (int w = 0; w < kWriters; ++w) {
    if (results[w].ok()) {
      EXPECT_EQ(winner, -1) << "two winners";
      winner = w;
    } else {
      EXPECT_EQ(results[w].code(), absl::StatusCode::kAborted) << results[w];
    }
  }
  ASSERT_NE(winner, -1);
  for (size_t shard : Owners("s")) {
    absl::StatusOr<std::vector<std::optional<std::string>>> chunk =
        shards_[shard]->inner().Read(kls::v1::COLUMN_FAMILY_STATE, {StateKey("s", 1, 0)});
    ASSERT_TRUE(chunk.ok());
    EXPECT_EQ((*chunk)[0], absl::StrCat("writer-", winner)) << "shard " << shard;
  }
}

TEST_F(SessionStoreTest, ExpiredSessionsAreNotFound) {
  MakeStore(1, 1);
  CommitRequest old = MakeCommit("t", "old", 0, std::nullopt);
  old.record.set_update_time_ms(absl::ToUnixMillis(absl::Now() - absl::Seconds(10)));
  old.record.set_ttl_seconds(5);
  ASSERT_TRUE(store_->Commit(old).ok());
  CommitRequest alive = MakeCommit("t", "alive", 0, std::nullopt);
  alive.record.set_ttl_seconds(3600);
  ASSERT_TRUE(store_->Commit(alive).ok());
  EXPECT_EQ(store_->GetRecord("t", "old").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store_->GetRecord("t", "alive").ok());
  EXPECT_EQ(store_->DeleteSession("t", "old").code(), absl::StatusCode::kNotFound);
  absl::StatusOr<ListPage> page = store_->ListSessions("t", 10, "");
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(page->records.size(), 1u);
  EXPECT_EQ(page->records[0].session_id(), "alive");
}

TEST_F(SessionStoreTest, ListSessionsPagesThroughReplicasInOrder) {
  MakeStore(3, 2);
  std::mt19937_64 rng(5);
  std::set<std::string> expected;
  for (int i = 0; i < 23; ++i) {
    const std::string id = absl::StrFormat("s%04d", static_cast<int>(rng() % 10000));
    if (!expected.insert(id).second) continue;
    CommitRequest request = MakeCommit("t1", id, 0, std::nullopt, 1, 1);
    if (i % 5 == 4) {  // expired: must be skipped, even when a whole round is expired
      request.record.set_update_time_ms(1000);
      request.record.set_ttl_seconds(1);
      expected.erase(id);
    }
    ASSERT_TRUE(store_->Commit(request).ok());
  }
  ASSERT_TRUE(store_->Commit(MakeCommit("t2", "s0001", 0, std::nullopt, 1, 1)).ok());
  ASSERT_TRUE(store_->Commit(MakeCommit("t10", "a", 0, std::nullopt, 1, 1)).ok());
  // A newer version on one replica only: the list shows the newest.
  const std::string updated = *expected.begin();
  shards_[Owners(updated)[1]]->set_down(true);
  ASSERT_TRUE(store_->Commit(MakeCommit("t1", updated, 1, 0, 1, 1)).ok());
  shards_[Owners(updated)[1]]->set_down(false);

  for (int page_size : {1, 3, 7, 1000}) {
    SCOPED_TRACE(absl::StrCat("page_size ", page_size));
    std::vector<std::string> listed;
    std::string token;
    int pages = 0;
    do {
      absl::StatusOr<ListPage> page = store_->ListSessions("t1", page_size, token);
      ASSERT_TRUE(page.ok()) << page.status();
      EXPECT_LE(page->records.size(), static_cast<size_t>(page_size));
      for (const SessionRecord& record : page->records) {
        EXPECT_EQ(record.tenant(), "t1");
        if (record.session_id() == updated) {
          EXPECT_EQ(record.version(), 1u);
        }
        listed.push_back(record.session_id());
      }
      token = page->next_page_token;
      ASSERT_LT(++pages, 100);
    } while (!token.empty());
    EXPECT_THAT(listed, ElementsAreArray(expected.begin(), expected.end()));
  }

  absl::StatusOr<ListPage> first = store_->ListSessions("t1", 2, "");
  ASSERT_TRUE(first.ok());
  ASSERT_FALSE(first->next_page_token.empty());
  EXPECT_EQ(store_->ListSessions("t2", 2, first->next_page_token).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->ListSessions("t1", 2, "not a token!").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->ListSessions("t1", 0, "").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->ListSessions("t1", 1001, "").status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<ListPage> t2 = store_->ListSessions("t2", 10, "");
  ASSERT_TRUE(t2.ok());
  EXPECT_EQ(t2->records.size(), 1u);
  EXPECT_TRUE(t2->next_page_token.empty());
  EXPECT_TRUE(store_->ListSessions("nobody", 10, "")->records.empty());
}

TEST_F(SessionStoreTest, DeleteSessionRemovesItsKeysAndNeedsEveryReplica) {
  MakeStore(3, 2);
  CommitRequest v0 = MakeCommit("t", "s", 0, std::nullopt, 2, 4, {1});
  ASSERT_TRUE(store_->Commit(v0).ok());
  CommitRequest v1 = MakeCommit("t", "s", 1, 0, 2, 6, {2});
  kls::v1::StateRef* retained = v1.record.add_retained_states();
  retained->set_version(0);
  retained->set_chunks(2);
  ASSERT_TRUE(store_->Commit(v1).ok());

  shards_[Owners("s")[1]]->set_down(true);
  EXPECT_EQ(store_->DeleteSession("t", "s").code(), absl::StatusCode::kUnavailable);
  shards_[Owners("s")[1]]->set_down(false);
  EXPECT_TRUE(store_->GetRecord("t", "s").ok());

  ASSERT_TRUE(store_->DeleteSession("t", "s").ok());
  EXPECT_EQ(store_->GetRecord("t", "s").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->GetTokens("s").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->GetStateChunks("s", 1, 2).status().code(), absl::StatusCode::kNotFound);
  const StoreStats stats = Stats();
  EXPECT_EQ(stats.sessions, 0u);
  EXPECT_EQ(stats.state_chunks, 0u);
  EXPECT_EQ(stats.token_histories, 0u);
  EXPECT_EQ(stats.blocks, 4u);  // 2 blocks x 2 replicas: garbage collection's job
  EXPECT_EQ(store_->DeleteSession("t", "s").code(), absl::StatusCode::kNotFound);
}

TEST_F(SessionStoreTest, GarbageCollectionSweepsOnlyOldUnreferencedBlocks) {
  MakeStore(3, 2);
  // a: v0 references blocks 1, 2; v1 references 1, 3 and retains v0 (so 2 stays referenced).
  ASSERT_TRUE(store_->Commit(MakeCommit("t", "a", 0, std::nullopt, 1, 1, {1, 2})).ok());
  CommitRequest a1 = MakeCommit("t", "a", 1, 0, 1, 1, {3});
  a1.record.add_block_keys(BlockKey(1));
  kls::v1::StateRef* retained = a1.record.add_retained_states();
  retained->set_version(0);
  retained->set_chunks(1);
  retained->add_block_keys(BlockKey(2));
  ASSERT_TRUE(store_->Commit(a1).ok());
  // b: deleted, so block 4 is unreferenced.
  ASSERT_TRUE(store_->Commit(MakeCommit("t", "b", 0, std::nullopt, 1, 1, {4})).ok());
  ASSERT_TRUE(store_->DeleteSession("t", "b").ok());
  // c: expired, with block 5.
  CommitRequest c = MakeCommit("t", "c", 0, std::nullopt, 2, 1, {5});
  c.record.set_update_time_ms(absl::ToUnixMillis(absl::Now() - absl::Hours(2)));
  c.record.set_ttl_seconds(60);
  ASSERT_TRUE(store_->Commit(c).ok());

  // Everything is fresh: nothing is swept, but the expired session goes.
  absl::StatusOr<GcStats> fresh = store_->CollectGarbage(absl::Now(), absl::Minutes(10));
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->sessions_expired, 1u);
  EXPECT_EQ(fresh->blocks_scanned, 10u);  // 5 blocks x 2 replicas
  EXPECT_EQ(fresh->blocks_referenced, 6u);
  EXPECT_EQ(fresh->blocks_deleted, 0u);
  EXPECT_EQ(store_->GetRecord("t", "c").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Stats().sessions, 2u);  // a on two replicas

  // An hour later the unreferenced blocks 4 and 5 are old enough.
  absl::StatusOr<GcStats> later =
      store_->CollectGarbage(absl::Now() + absl::Hours(1), absl::Minutes(10));
  ASSERT_TRUE(later.ok()) << later.status();
  EXPECT_EQ(later->sessions_expired, 0u);
  EXPECT_EQ(later->blocks_scanned, 10u);
  EXPECT_EQ(later->blocks_referenced, 6u);
  EXPECT_EQ(later->blocks_deleted, 4u);
  EXPECT_TRUE(store_->GetBlocks({BlockKey(1), BlockKey(2), BlockKey(3)}).ok());
  EXPECT_EQ(store_->GetBlocks({BlockKey(4)}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->GetBlocks({BlockKey(5)}).status().code(), absl::StatusCode::kNotFound);
  const StoreStats stats = Stats();
  EXPECT_EQ(stats.blocks, 6u);
  EXPECT_EQ(stats.state_chunks, 4u);  // a: v0 and v1, one chunk each, two replicas
  EXPECT_EQ(stats.token_histories, 2u);

  // A shard that cannot be scanned might hold the only reference: nothing is swept.
  shards_[0]->set_down(true);
  EXPECT_EQ(store_->CollectGarbage(absl::Now() + absl::Hours(1), absl::Minutes(10)).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(SessionStoreTest, CorruptTokenHistoryIsDataLoss) {
  MakeStore(1, 1);
  WriteBatchSpec batch;
  batch.ops.push_back(WriteOp{kls::v1::COLUMN_FAMILY_TOKENS, "s", false, "12345"});
  ASSERT_TRUE(shards_[0]->inner().Write(batch).ok());
  EXPECT_EQ(store_->GetTokens("s").status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(SessionStoreTest, LargeCommitRoundTrips) {
  MakeStore(2, 2);
  CommitRequest request = MakeCommit("t", "big", 0, std::nullopt, 0, 100000);
  for (int i = 0; i < 5; ++i) request.state_chunks.push_back(RandomBytes(4 << 20, 100 + i));
  request.record.set_state_chunks(5);
  for (int i = 0; i < 4; ++i) {
    request.blocks.emplace_back(BlockKey(100 + i), RandomBytes(2 << 20, 200 + i));
    request.record.add_block_keys(BlockKey(100 + i));
  }
  const CommitRequest copy = request;
  ASSERT_TRUE(store_->Commit(std::move(request)).ok());
  absl::StatusOr<std::vector<std::string>> chunks = store_->GetStateChunks("big", 0, 5);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  EXPECT_TRUE(*chunks == copy.state_chunks);
  std::vector<std::string> keys;
  for (int i = 0; i < 4; ++i) keys.push_back(BlockKey(100 + i));
  absl::StatusOr<std::vector<std::string>> blocks = store_->GetBlocks(keys);
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  for (int i = 0; i < 4; ++i) EXPECT_TRUE((*blocks)[i] == copy.blocks[i].second) << i;
  EXPECT_EQ(*store_->GetTokens("big"), copy.tokens);
}

}  // namespace
}  // namespace kls::store

#include "services/store/rocksdb_shard.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "rocksdb/status.h"
#include "tests/services/store/store_test_util.h"
#include "tests/test_util.h"

namespace kls::store {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Optional;

class RocksDbShardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir();
    Reopen();
  }
  void TearDown() override {
    shard_.reset();
    testing::RemoveTree(dir_);
  }

  void Reopen() {
    shard_.reset();
    RocksDbShardOptions options;
    options.dir = dir_ + "/db";
    options.write_buffer_bytes = 8 << 20;
    absl::StatusOr<std::unique_ptr<RocksDbShard>> shard = RocksDbShard::Open(options);
    ASSERT_TRUE(shard.ok()) << shard.status();
    shard_ = std::move(*shard);
  }

  std::optional<std::string> Get(Family family, const std::string& key) {
    absl::StatusOr<std::vector<std::optional<std::string>>> values = shard_->Read(family, {key});
    EXPECT_TRUE(values.ok()) << values.status();
    if (!values.ok() || values->size() != 1) return std::nullopt;
    return (*values)[0];
  }

  std::vector<std::string> ScanKeys(Family family, std::string_view prefix,
                                    std::string_view start_after, uint32_t limit) {
    std::vector<std::string> keys;
    absl::Status status = shard_->Scan(family, prefix, start_after, limit, /*keys_only=*/true,
                                       [&](std::string_view key, std::string_view value) {
                                         EXPECT_TRUE(value.empty());
                                         keys.emplace_back(key);
                                         return true;
                                       });
    EXPECT_TRUE(status.ok()) << status;
    return keys;
  }

  std::string dir_;
  std::unique_ptr<RocksDbShard> shard_;
};

TEST_F(RocksDbShardTest, PutReadDeleteInEveryFamily) {
  WriteBatchSpec batch;
  for (Family family : {kSessions, kState, kBlocks, kTokens}) {
    batch.ops.push_back(Put(family, "k", absl::StrCat("value-", static_cast<int>(family))));
  }
  batch.ops.push_back(Put(kState, "empty", ""));
  ASSERT_TRUE(shard_->Write(batch).ok());
  for (Family family : {kSessions, kState, kBlocks, kTokens}) {
    EXPECT_THAT(Get(family, "k"), Optional(absl::StrCat("value-", static_cast<int>(family))));
  }
  EXPECT_THAT(Get(kState, "empty"), Optional(std::string()));
  EXPECT_EQ(Get(kState, "missing"), std::nullopt);

  absl::StatusOr<std::vector<std::optional<std::string>>> values =
      shard_->Read(kBlocks, {"missing", "k", "k"});
  ASSERT_TRUE(values.ok());
  EXPECT_THAT(*values, ElementsAre(std::nullopt, Optional(std::string("value-3")),
                                   Optional(std::string("value-3"))));

  ASSERT_TRUE(shard_->Write(Batch({Delete(kBlocks, "k")})).ok());
  EXPECT_EQ(Get(kBlocks, "k"), std::nullopt);
  EXPECT_THAT(Get(kTokens, "k"), Optional(std::string("value-4")));  // other family untouched
  EXPECT_EQ(shard_->name(), "local:" + dir_ + "/db");
}

TEST_F(RocksDbShardTest, LargeValueRoundTripsWithSync) {
  const std::string value = RandomBytes(20 << 20, 7);
  WriteBatchSpec batch;
  batch.sync = true;
  batch.ops.push_back(Put(kState, "big", value));
  ASSERT_TRUE(shard_->Write(batch).ok());
  std::optional<std::string> got = Get(kState, "big");
  ASSERT_TRUE(got.has_value());
  EXPECT_TRUE(*got == value);
}

TEST_F(RocksDbShardTest, BadBatchesAreInvalidAndApplyNothing) {
  WriteBatchSpec unknown_family;
  unknown_family.ops.push_back(Put(kState, "a", "1"));
  unknown_family.ops.push_back(Put(static_cast<Family>(9), "b", "2"));
  absl::Status status = shard_->Write(unknown_family);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("unknown column family 9"));

  WriteBatchSpec empty_key;
  empty_key.ops.push_back(Put(kState, "a", "1"));
  empty_key.ops.push_back(Put(kTokens, "", "2"));
  EXPECT_EQ(shard_->Write(empty_key).code(), absl::StatusCode::kInvalidArgument);

  WriteBatchSpec delete_with_value;
  delete_with_value.ops.push_back(WriteOp{kState, "a", true, "x"});
  EXPECT_EQ(shard_->Write(delete_with_value).code(), absl::StatusCode::kInvalidArgument);

  WriteBatchSpec unspecified;
  unspecified.ops.push_back(Put(kls::v1::COLUMN_FAMILY_UNSPECIFIED, "a", "1"));
  EXPECT_EQ(shard_->Write(unspecified).code(), absl::StatusCode::kInvalidArgument);

  EXPECT_EQ(Get(kState, "a"), std::nullopt);
  EXPECT_EQ(shard_->Read(static_cast<Family>(0), {"a"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(shard_
                ->Scan(static_cast<Family>(5), "", "", 0, true,
                       [](std::string_view, std::string_view) { return true; })
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(RocksDbShardTest, ScanHonorsPrefixStartAfterLimitAndEarlyStop) {
  WriteBatchSpec batch;
  for (const char* key : {"a/1", "a/2", "a/3", "a0", "b/1", "a/"}) {
    batch.ops.push_back(Put(kSessions, key, absl::StrCat("v", key)));
  }
  // Prefix ending in 0xff: the upper bound must roll over correctly.
  batch.ops.push_back(Put(kBlocks, std::string("\x01\xff", 2), "x"));
  batch.ops.push_back(Put(kBlocks, std::string("\x01\xff\x00", 3), "y"));
  batch.ops.push_back(Put(kBlocks, std::string("\x02", 1), "z"));
  ASSERT_TRUE(shard_->Write(batch).ok());

  EXPECT_THAT(ScanKeys(kSessions, "a/", "", 0), ElementsAre("a/", "a/1", "a/2", "a/3"));
  EXPECT_THAT(ScanKeys(kSessions, "a/", "a/1", 0), ElementsAre("a/2", "a/3"));
  EXPECT_THAT(ScanKeys(kSessions, "a/", "a/1", 1), ElementsAre("a/2"));
  EXPECT_THAT(ScanKeys(kSessions, "a/", "a/15", 0), ElementsAre("a/2", "a/3"));  // absent key
  EXPECT_THAT(ScanKeys(kSessions, "a/", "a/3", 0), ElementsAre());
  EXPECT_THAT(ScanKeys(kSessions, "a/", "0", 0), ElementsAre("a/", "a/1", "a/2", "a/3"));
  EXPECT_THAT(ScanKeys(kSessions, "", "", 0), ElementsAre("a/", "a/1", "a/2", "a/3", "a0", "b/1"));
  EXPECT_THAT(ScanKeys(kSessions, "c", "", 0), ElementsAre());
  EXPECT_THAT(ScanKeys(kBlocks, std::string("\x01\xff", 2), "", 0),
              ElementsAre(std::string("\x01\xff", 2), std::string("\x01\xff\x00", 3)));

  std::vector<std::pair<std::string, std::string>> seen;
  ASSERT_TRUE(shard_
                  ->Scan(kSessions, "a/", "", 0, /*keys_only=*/false,
                         [&](std::string_view key, std::string_view value) {
                           seen.emplace_back(key, value);
                           return seen.size() < 2;
                         })
                  .ok());
  EXPECT_THAT(seen, ElementsAre(std::pair<std::string, std::string>("a/", "va/"),
                                std::pair<std::string, std::string>("a/1", "va/1")));
}

TEST_F(RocksDbShardTest, RecordCheckIsCompareAndSet) {
  WriteBatchSpec create;
  create.expect_no_record = true;
  create.ops.push_back(Put(kSessions, "t/s", RecordValue(0)));
  ASSERT_TRUE(shard_->Write(create).ok());
  absl::Status again = shard_->Write(create);
  EXPECT_EQ(again.code(), absl::StatusCode::kAborted);
  EXPECT_THAT(again.message(), HasSubstr("exists (version 0)"));

  WriteBatchSpec update;
  update.expected_record_version = 0;
  update.ops.push_back(Put(kState, "s/1/0", "chunk-a"));
  update.ops.push_back(Put(kSessions, "t/s", RecordValue(1)));
  ASSERT_TRUE(shard_->Write(update).ok());

  // A stale writer: nothing of its batch lands.
  WriteBatchSpec stale;
  stale.expected_record_version = 0;
  stale.ops.push_back(Put(kState, "s/1/0", "chunk-b"));
  stale.ops.push_back(Put(kTokens, "s", "tokens-b"));
  stale.ops.push_back(Put(kSessions, "t/s", RecordValue(1)));
  absl::Status status = shard_->Write(stale);
  EXPECT_EQ(status.code(), absl::StatusCode::kAborted);
  EXPECT_THAT(status.message(), HasSubstr("has version 1, expected version 0"));
  EXPECT_THAT(Get(kState, "s/1/0"), Optional(std::string("chunk-a")));
  EXPECT_EQ(Get(kTokens, "s"), std::nullopt);

  // Checks against an absent record.
  WriteBatchSpec absent;
  absent.expected_record_version = 3;
  absent.ops.push_back(Put(kSessions, "t/other", RecordValue(4)));
  EXPECT_EQ(shard_->Write(absent).code(), absl::StatusCode::kAborted);

  // A checked delete.
  WriteBatchSpec remove;
  remove.expected_record_version = 1;
  remove.ops.push_back(Delete(kSessions, "t/s"));
  ASSERT_TRUE(shard_->Write(remove).ok());
  EXPECT_EQ(Get(kSessions, "t/s"), std::nullopt);

  // Malformed checks.
  WriteBatchSpec two_records;
  two_records.expected_record_version = 0;
  two_records.ops.push_back(Put(kSessions, "t/a", RecordValue(1)));
  two_records.ops.push_back(Put(kSessions, "t/b", RecordValue(1)));
  EXPECT_EQ(shard_->Write(two_records).code(), absl::StatusCode::kInvalidArgument);
  WriteBatchSpec no_record;
  no_record.expect_no_record = true;
  no_record.ops.push_back(Put(kState, "x", "y"));
  EXPECT_EQ(shard_->Write(no_record).code(), absl::StatusCode::kInvalidArgument);
  WriteBatchSpec both;
  both.expect_no_record = true;
  both.expected_record_version = 1;
  both.ops.push_back(Put(kSessions, "t/a", RecordValue(1)));
  EXPECT_EQ(shard_->Write(both).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(RocksDbShardTest, UnparsableStoredRecordFailsTheCheckWithDataLoss) {
  ASSERT_TRUE(shard_->Write(Batch({Put(kSessions, "t/s", "\xff\xff\xff not a proto")})).ok());
  WriteBatchSpec update;
  update.expected_record_version = 0;
  update.ops.push_back(Put(kSessions, "t/s", RecordValue(1)));
  EXPECT_EQ(shard_->Write(update).code(), absl::StatusCode::kDataLoss);
}

TEST_F(RocksDbShardTest, ConcurrentCompareAndSetHasOneWinner) {
  WriteBatchSpec create;
  create.expect_no_record = true;
  create.ops.push_back(Put(kSessions, "t/s", RecordValue(1)));
  ASSERT_TRUE(shard_->Write(create).ok());

  constexpr int kWriters = 8;
  std::atomic<int> winners{0};
  std::atomic<int> aborted{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      WriteBatchSpec update;
      update.sync = true;
      update.expected_record_version = 1;
      update.ops.push_back(Put(kState, "s/2/0", absl::StrCat("writer-", w)));
      update.ops.push_back(Put(kSessions, "t/s", RecordValue(2)));
      absl::Status status = shard_->Write(update);
      if (status.ok()) {
        ++winners;
      } else if (absl::IsAborted(status)) {
        ++aborted;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(winners.load(), 1);
  EXPECT_EQ(aborted.load(), kWriters - 1);
}

TEST_F(RocksDbShardTest, ReopenKeepsCommittedData) {
  const std::string value = RandomBytes(3 << 20, 11);
  WriteBatchSpec batch;
  batch.sync = true;
  batch.ops.push_back(Put(kState, "s/1/0", value));
  batch.ops.push_back(Put(kSessions, "t/s", RecordValue(1)));
  ASSERT_TRUE(shard_->Write(batch).ok());
  Reopen();
  EXPECT_THAT(Get(kSessions, "t/s"), Optional(RecordValue(1)));
  std::optional<std::string> got = Get(kState, "s/1/0");
  ASSERT_TRUE(got.has_value());
  EXPECT_TRUE(*got == value);
  // Flushed to SST and reopened again: still there.
  ASSERT_TRUE(shard_->Flush().ok());
  Reopen();
  EXPECT_THAT(Get(kSessions, "t/s"), Optional(RecordValue(1)));
}

TEST_F(RocksDbShardTest, OpenErrors) {
  RocksDbShardOptions missing;
  missing.dir = dir_ + "/absent";
  missing.create_if_missing = false;
  absl::StatusOr<std::unique_ptr<RocksDbShard>> shard = RocksDbShard::Open(missing);
  EXPECT_EQ(shard.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(shard.status().message(), HasSubstr(missing.dir));

  EXPECT_EQ(RocksDbShard::Open(RocksDbShardOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);

  // The database is locked by shard_.
  RocksDbShardOptions same;
  same.dir = dir_ + "/db";
  EXPECT_EQ(RocksDbShard::Open(same).status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(RocksDbShardTest, CorruptSstFileIsDataLossNotACrash) {
  const std::string value = RandomBytes(1 << 20, 3);
  ASSERT_TRUE(shard_->Write(Batch({Put(kState, "s/1/0", value)}, /*sync=*/true)).ok());
  ASSERT_TRUE(shard_->Flush().ok());
  shard_.reset();

  // Flip bytes in the middle of the largest table file: inside the value's data block.
  std::filesystem::path largest;
  uintmax_t largest_size = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir_ + "/db")) {
    if (entry.path().extension() == ".sst" && entry.file_size() > largest_size) {
      largest = entry.path();
      largest_size = entry.file_size();
    }
  }
  ASSERT_GT(largest_size, value.size());
  {
    std::fstream file(largest, std::ios::in | std::ios::out | std::ios::binary);
    ASSERT_TRUE(file.is_open());
    const std::streamoff offset = static_cast<std::streamoff>(largest_size / 2);
    std::string bytes(64, '\0');
    file.seekg(offset);
    file.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    for (char& c : bytes) c = static_cast<char>(~c);
    file.seekp(offset);
    file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }

  Reopen();
  absl::StatusOr<std::vector<std::optional<std::string>>> values = shard_->Read(kState, {"s/1/0"});
  EXPECT_EQ(values.status().code(), absl::StatusCode::kDataLoss) << values.status();
  absl::Status scan = shard_->Scan(kState, "", "", 0, /*keys_only=*/false,
                                   [](std::string_view, std::string_view) { return true; });
  EXPECT_EQ(scan.code(), absl::StatusCode::kDataLoss) << scan;
}

TEST(RocksDbStatusTest, MapsEveryKindOnce) {
  EXPECT_TRUE(FromRocksDbStatus(rocksdb::Status::OK(), "x").ok());
  EXPECT_EQ(FromRocksDbStatus(rocksdb::Status::Corruption("bad block"), "x").code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(FromRocksDbStatus(rocksdb::Status::IOError("disk"), "x").code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(FromRocksDbStatus(rocksdb::Status::NoSpace("full"), "x").code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(FromRocksDbStatus(rocksdb::Status::InvalidArgument("arg"), "x").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FromRocksDbStatus(rocksdb::Status::NotFound("k"), "x").code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(FromRocksDbStatus(rocksdb::Status::Busy(), "x").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(FromRocksDbStatus(rocksdb::Status::NotSupported(), "x").code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(FromRocksDbStatus(rocksdb::Status::Incomplete(), "x").code(),
            absl::StatusCode::kInternal);
  absl::Status status = FromRocksDbStatus(rocksdb::Status::Corruption("bad block"), "reading k");
  EXPECT_THAT(status.message(), HasSubstr("reading k: Corruption: bad block"));
}

}  // namespace
}  // namespace kls::store

// RocksDbShard: one shard of the state store as an embedded RocksDB (ARCHITECTURE.md §4) with the
// column families "sessions", "state", "blocks" and "tokens" (plus RocksDB's "default").
//
// Tuning for the 4 MiB values of the `state` and `blocks` families: large memtables, no
// compression (fp32/bf16 state compresses poorly), reads that bypass the block cache, and plain
// SST values rather than BlobDB — Debian builds RocksDB PORTABLE, so blob reads checksum with
// software CRC32c at about 1 GiB/s while SST blocks use XXH3 (shared/docs/DEPENDENCIES.md §6).
// The small `sessions` and `tokens` families get LZ4, bloom filters and the block cache.
#ifndef KLS_SERVICES_STORE_ROCKSDB_SHARD_H_
#define KLS_SERVICES_STORE_ROCKSDB_SHARD_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "services/store/shard.h"

namespace rocksdb {
class ColumnFamilyHandle;
class DB;
class Status;
}  // namespace rocksdb

namespace kls::store {

struct RocksDbShardOptions {
  std::string dir;                               // the database directory
  bool create_if_missing = true;                 // else NOT_FOUND when `dir` holds no database
  size_t block_cache_bytes = size_t{256} << 20;  // shared LRU cache (sessions, tokens, indexes)
  // Memtable size of the `state` and `blocks` families (the small families use a quarter).
  size_t write_buffer_bytes = size_t{128} << 20;
  // Verify every SST block read against its checksum and check files on open; a mismatch is
  // DATA_LOSS, never a crash.
  bool paranoid_checks = true;
  std::string name;  // for logs and rendezvous hashing; empty: "local:<dir>"
};

// Maps a RocksDB status to absl: Corruption -> DATA_LOSS, IOError (including no space) /
// Busy / TimedOut / TryAgain / ShutdownInProgress -> UNAVAILABLE (the shard cannot serve, so
// replicas take over), InvalidArgument -> INVALID_ARGUMENT, NotFound -> NOT_FOUND,
// NotSupported -> UNIMPLEMENTED, Aborted -> ABORTED, others -> INTERNAL. The message is
// "<context>: <rocksdb message>".
absl::Status FromRocksDbStatus(const rocksdb::Status& status, std::string_view context);

// Thread-safe: any number of threads may call any method concurrently. Writes that touch the
// `sessions` family serialize per record key (striped mutexes held across read-check-write, so
// expected_record_version is a real compare-and-set); other writes and all reads take no lock of
// ours. Destroying the shard closes the database; no call may be in flight then.
class RocksDbShard final : public Shard {
 public:
  // Opens (or creates) the database in options.dir with the four families. NOT_FOUND if it is
  // absent and !create_if_missing; DATA_LOSS if RocksDB finds corruption; UNAVAILABLE if the
  // directory is locked by another process or on I/O errors. Messages name the directory.
  static absl::StatusOr<std::unique_ptr<RocksDbShard>> Open(const RocksDbShardOptions& options);

  ~RocksDbShard() override;
  RocksDbShard(const RocksDbShard&) = delete;
  RocksDbShard& operator=(const RocksDbShard&) = delete;

  const std::string& name() const override { return name_; }
  // A record check (expected_record_version or expect_no_record, not both) needs exactly one
  // `sessions` op in the batch (a put, or a delete); otherwise INVALID_ARGUMENT. Empty keys and
  // unknown families are INVALID_ARGUMENT. A stored record that does not parse fails the check with
  // DATA_LOSS.
  absl::Status Write(const WriteBatchSpec& batch) override;
  absl::StatusOr<std::vector<std::optional<std::string>>> Read(
      Family family, const std::vector<std::string>& keys) override;
  absl::Status Scan(Family family, std::string_view prefix, std::string_view start_after,
                    uint32_t limit, bool keys_only,
                    const std::function<bool(std::string_view, std::string_view)>& visit) override;

  // Flushes every family's memtable to SST files and waits. For tests and clean shutdowns.
  absl::Status Flush();

  const std::string& dir() const { return dir_; }

 private:
  static constexpr size_t kNumRecordStripes = 64;

  RocksDbShard(std::string dir, std::string name);

  // The handle of a kls family; INVALID_ARGUMENT naming it when unknown.
  absl::StatusOr<rocksdb::ColumnFamilyHandle*> Handle(Family family) const;
  // Checks the stored record `key` (the batch's one sessions-family op) against the batch's
  // expected_record_version / expect_no_record: ABORTED on a mismatch. Caller holds the key's
  // stripe.
  absl::Status CheckRecord(const std::string& key, const WriteBatchSpec& batch);

  std::string dir_;
  std::string name_;
  std::unique_ptr<rocksdb::DB> db_;
  // Index = kls::v1::ColumnFamily number (1..4); [0] is RocksDB's default family.
  std::array<rocksdb::ColumnFamilyHandle*, 5> handles_{};
  // Other families found in an existing database (opened because RocksDB requires it).
  std::vector<rocksdb::ColumnFamilyHandle*> extra_handles_;
  // Writes touching a record key hold its stripe (hash of the key) across read-check-write.
  // Several stripes are locked in increasing index order.
  std::array<absl::Mutex, kNumRecordStripes> record_stripes_;
};

}  // namespace kls::store

#endif  // KLS_SERVICES_STORE_ROCKSDB_SHARD_H_

// One shard of the state store: a key-value store with the four column families of
// ARCHITECTURE.md §4 and atomic batches. Implemented by RocksDbShard (embedded, in-process) and
// RemoteShard (a `kls store` process over gRPC kls.v1.StateStore); SessionStore builds the
// schema, sharding and replication on top.
#ifndef KLS_SERVICES_STORE_SHARD_H_
#define KLS_SERVICES_STORE_SHARD_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kls/v1/store.pb.h"

namespace kls::store {

using Family = kls::v1::ColumnFamily;

// Wire protocol of kls.v1.StateStore: values travel in pieces of at most this many bytes per
// message, so any value fits gRPC's default 4 MiB message limit.
inline constexpr size_t kMaxValuePieceBytes = size_t{1} << 20;

struct WriteOp {
  Family family = kls::v1::COLUMN_FAMILY_UNSPECIFIED;
  std::string key;
  bool is_delete = false;
  std::string value;  // puts only; may be many MiB
};

struct WriteBatchSpec {
  std::vector<WriteOp> ops;
  bool sync = false;  // fsync the WAL before returning
  // Compare-and-set on the batch's one sessions-family put (store.proto WriteRequest): it
  // applies only over an existing record of this version (when set), or only where no record
  // exists (expect_no_record); else ABORTED, nothing written.
  std::optional<uint64_t> expected_record_version;
  bool expect_no_record = false;
};

// Thread-safe: any number of threads may call any method concurrently.
class Shard {
 public:
  virtual ~Shard() = default;

  // A short name for logs and rendezvous hashing (e.g. the address or "local:<dir>"). Stable.
  virtual const std::string& name() const = 0;

  // Applies every op atomically. UNAVAILABLE when the shard cannot be reached, ABORTED on a
  // version-check failure, INVALID_ARGUMENT for an unknown family; nothing applied on error.
  virtual absl::Status Write(const WriteBatchSpec& batch) = 0;

  // The values of `keys` in order; nullopt where absent. DATA_LOSS if the shard detects
  // corruption (RocksDB checksum), UNAVAILABLE if unreachable.
  virtual absl::StatusOr<std::vector<std::optional<std::string>>> Read(
      Family family, const std::vector<std::string>& keys) = 0;

  // Calls `visit(key, value)` for keys with `prefix` after `start_after` (exclusive), in key
  // order, at most `limit` (0: all). value is empty with keys_only. Stops early (OK) when visit
  // returns false.
  virtual absl::Status Scan(
      Family family, std::string_view prefix, std::string_view start_after, uint32_t limit,
      bool keys_only, const std::function<bool(std::string_view, std::string_view)>& visit) = 0;
};

}  // namespace kls::store

#endif  // KLS_SERVICES_STORE_SHARD_H_

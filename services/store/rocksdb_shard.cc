#include "services/store/rocksdb_shard.h"

#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "rocksdb/cache.h"
#include "rocksdb/db.h"
#include "rocksdb/filter_policy.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/status.h"
#include "rocksdb/table.h"
#include "rocksdb/write_batch.h"

namespace kls::store {
namespace {

// RocksDB family names, indexed by kls::v1::ColumnFamily.
constexpr std::array<const char*, 5> kFamilyNames = {"default", "sessions", "state", "blocks",
                                                     "tokens"};

bool IsLargeValueFamily(Family family) {
  return family == kls::v1::COLUMN_FAMILY_STATE || family == kls::v1::COLUMN_FAMILY_BLOCKS;
}

// Abseil 20220623's string_view is not std::string_view.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// A key for error messages: binary keys (block hashes) escaped, long ones cut.
std::string PrintableKey(std::string_view key) {
  std::string escaped = absl::CHexEscape(Av(key));
  if (escaped.size() > 120) escaped = absl::StrCat(escaped.substr(0, 120), "...");
  return escaped;
}

// The smallest string greater than every string with `prefix`; empty if there is none.
std::string PrefixSuccessor(std::string_view prefix) {
  std::string upper(prefix);
  while (!upper.empty() && static_cast<unsigned char>(upper.back()) == 0xff) upper.pop_back();
  if (!upper.empty())
    upper.back() = static_cast<char>(static_cast<unsigned char>(upper.back()) + 1);
  return upper;
}

rocksdb::ColumnFamilyOptions FamilyOptions(bool large_values, const RocksDbShardOptions& options,
                                           const std::shared_ptr<rocksdb::Cache>& cache) {
  rocksdb::ColumnFamilyOptions cf;
  rocksdb::BlockBasedTableOptions table;
  table.block_cache = cache;
  table.cache_index_and_filter_blocks = true;
  table.pin_l0_filter_and_index_blocks_in_cache = true;
  table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  cf.level_compaction_dynamic_level_bytes = true;
  if (large_values) {
    // A 4 MiB value is one data block of its own; a large memtable keeps flushes (and L0
    // compactions) few, and compression would only burn CPU on fp32/bf16 state.
    cf.write_buffer_size = options.write_buffer_bytes;
    cf.max_write_buffer_number = 3;
    cf.compression = rocksdb::kNoCompression;
    cf.target_file_size_base = 128ull << 20;
    cf.max_bytes_for_level_base = 1ull << 30;
    table.block_size = 64 << 10;
  } else {
    cf.write_buffer_size = std::max<size_t>(options.write_buffer_bytes / 4, 4 << 20);
    cf.compression = rocksdb::kLZ4Compression;
    table.block_size = 16 << 10;
  }
  cf.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  return cf;
}

// Locks the stripes of a batch's record keys in increasing order; unlocks on destruction.
class StripeLock {
 public:
  explicit StripeLock(std::vector<absl::Mutex*> mutexes) ABSL_NO_THREAD_SAFETY_ANALYSIS
      : mutexes_(std::move(mutexes)) {
    for (absl::Mutex* mu : mutexes_) mu->Lock();
  }
  ~StripeLock() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    for (auto it = mutexes_.rbegin(); it != mutexes_.rend(); ++it) (*it)->Unlock();
  }
  StripeLock(const StripeLock&) = delete;
  StripeLock& operator=(const StripeLock&) = delete;

 private:
  std::vector<absl::Mutex*> mutexes_;
};

}  // namespace

absl::Status FromRocksDbStatus(const rocksdb::Status& status, std::string_view context) {
  if (status.ok()) return absl::OkStatus();
  std::string message = absl::StrCat(Av(context), ": ", status.ToString());
  if (status.IsCorruption()) return absl::DataLossError(message);
  if (status.IsIOError() || status.IsBusy() || status.IsTimedOut() || status.IsTryAgain() ||
      status.IsShutdownInProgress()) {
    return absl::UnavailableError(message);
  }
  if (status.IsInvalidArgument()) return absl::InvalidArgumentError(message);
  if (status.IsNotFound()) return absl::NotFoundError(message);
  if (status.IsNotSupported()) return absl::UnimplementedError(message);
  if (status.IsAborted()) return absl::AbortedError(message);
  return absl::InternalError(message);
}

absl::StatusOr<std::unique_ptr<RocksDbShard>> RocksDbShard::Open(
    const RocksDbShardOptions& options) {
  if (options.dir.empty()) return absl::InvalidArgumentError("RocksDbShardOptions.dir is empty");
  const bool exists = FileExists(options.dir + "/CURRENT");
  if (!exists && !options.create_if_missing) {
    return absl::NotFoundError(
        absl::StrCat("no RocksDB database in ", options.dir, " (create_if_missing is false)"));
  }

  rocksdb::DBOptions db_options;
  db_options.create_if_missing = options.create_if_missing;
  db_options.create_missing_column_families = true;
  db_options.paranoid_checks = options.paranoid_checks;
  db_options.max_background_jobs = 4;
  // Smooth write-back instead of multi-GiB bursts at flush time.
  db_options.bytes_per_sync = 1 << 20;
  // The small families flush rarely; without a cap their live WAL data would pin every WAL file.
  db_options.max_total_wal_size = 4 * options.write_buffer_bytes;
  db_options.keep_log_file_num = 10;
  db_options.avoid_unnecessary_blocking_io = true;

  std::shared_ptr<rocksdb::Cache> cache = rocksdb::NewLRUCache(options.block_cache_bytes);
  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  for (size_t i = 0; i < kFamilyNames.size(); ++i) {
    const bool large = IsLargeValueFamily(static_cast<Family>(i));
    descriptors.emplace_back(kFamilyNames[i], FamilyOptions(large, options, cache));
  }
  if (exists) {
    // RocksDB refuses to open a database without all of its families.
    std::vector<std::string> names;
    KLS_RETURN_IF_ERROR(
        FromRocksDbStatus(rocksdb::DB::ListColumnFamilies(db_options, options.dir, &names),
                          absl::StrCat("listing the column families of ", options.dir)));
    for (const std::string& name : names) {
      if (std::find(kFamilyNames.begin(), kFamilyNames.end(), name) == kFamilyNames.end()) {
        descriptors.emplace_back(name, FamilyOptions(false, options, cache));
      }
    }
  }

  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw_db = nullptr;
  KLS_RETURN_IF_ERROR(
      FromRocksDbStatus(rocksdb::DB::Open(db_options, options.dir, descriptors, &handles, &raw_db),
                        absl::StrCat("opening RocksDB in ", options.dir)));

  std::string name = options.name.empty() ? absl::StrCat("local:", options.dir) : options.name;
  std::unique_ptr<RocksDbShard> shard(new RocksDbShard(options.dir, std::move(name)));
  shard->db_.reset(raw_db);
  for (size_t i = 0; i < handles.size(); ++i) {
    if (i < kFamilyNames.size()) {
      shard->handles_[i] = handles[i];
    } else {
      shard->extra_handles_.push_back(handles[i]);
    }
  }
  return shard;
}

RocksDbShard::RocksDbShard(std::string dir, std::string name)
    : dir_(std::move(dir)), name_(std::move(name)) {}

RocksDbShard::~RocksDbShard() {
  if (db_ == nullptr) return;
  for (rocksdb::ColumnFamilyHandle* handle : handles_) {
    if (handle != nullptr) db_->DestroyColumnFamilyHandle(handle).PermitUncheckedError();
  }
  for (rocksdb::ColumnFamilyHandle* handle : extra_handles_) {
    db_->DestroyColumnFamilyHandle(handle).PermitUncheckedError();
  }
  rocksdb::Status status = db_->Close();
  if (!status.ok()) KLS_LOG(ERROR) << "closing RocksDB in " << dir_ << ": " << status.ToString();
  db_.reset();
}

absl::StatusOr<rocksdb::ColumnFamilyHandle*> RocksDbShard::Handle(Family family) const {
  const int index = static_cast<int>(family);
  if (index < 1 || index > 4) {
    return absl::InvalidArgumentError(absl::StrCat("unknown column family ", index));
  }
  return handles_[index];
}

absl::Status RocksDbShard::CheckRecord(const std::string& key, const WriteBatchSpec& batch) {
  std::string value;
  rocksdb::Status status =
      db_->Get(rocksdb::ReadOptions(), handles_[kls::v1::COLUMN_FAMILY_SESSIONS], key, &value);
  std::optional<uint64_t> current;
  if (status.ok()) {
    kls::v1::SessionRecord record;
    if (!record.ParseFromString(value)) {
      return absl::DataLossError(absl::StrCat("shard ", name_, ": stored session record ",
                                              PrintableKey(key), " does not parse (", value.size(),
                                              " bytes)"));
    }
    current = record.version();
  } else if (!status.IsNotFound()) {
    return FromRocksDbStatus(status,
                             absl::StrCat("shard ", name_, ": reading record ", PrintableKey(key)));
  }
  if (batch.expect_no_record && current.has_value()) {
    return absl::AbortedError(absl::StrCat("shard ", name_, ": session record ", PrintableKey(key),
                                           " exists (version ", *current, "), expected none"));
  }
  if (batch.expected_record_version.has_value() && current != batch.expected_record_version) {
    return absl::AbortedError(absl::StrCat(
        "shard ", name_, ": session record ", PrintableKey(key), " has ",
        current.has_value() ? absl::StrCat("version ", *current) : std::string("no version"),
        ", expected version ", *batch.expected_record_version));
  }
  return absl::OkStatus();
}

absl::Status RocksDbShard::Write(const WriteBatchSpec& batch) {
  size_t reserve = 0;
  const WriteOp* record_op = nullptr;
  size_t record_ops = 0;
  std::vector<size_t> stripes;
  for (const WriteOp& op : batch.ops) {
    KLS_RETURN_IF_ERROR(Handle(op.family).status());
    if (op.key.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("empty key in family ", kFamilyNames[op.family]));
    }
    if (op.is_delete && !op.value.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("delete of ", kFamilyNames[op.family], "/",
                                                     PrintableKey(op.key), " carries a value"));
    }
    reserve += op.key.size() + op.value.size() + 16;
    if (op.family == kls::v1::COLUMN_FAMILY_SESSIONS) {
      record_op = &op;
      ++record_ops;
      stripes.push_back(std::hash<std::string_view>()(op.key) % kNumRecordStripes);
    }
  }
  const bool checked = batch.expected_record_version.has_value() || batch.expect_no_record;
  if (batch.expected_record_version.has_value() && batch.expect_no_record) {
    return absl::InvalidArgumentError(
        "expected_record_version and expect_no_record are mutually exclusive");
  }
  if (checked && record_ops != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a record check needs exactly one sessions-family op; the batch has ", record_ops));
  }

  // Built outside the lock: copying multi-MiB values is the slow part.
  rocksdb::WriteBatch write_batch(reserve);
  for (const WriteOp& op : batch.ops) {
    rocksdb::ColumnFamilyHandle* handle = handles_[op.family];
    rocksdb::Status status = op.is_delete ? write_batch.Delete(handle, op.key)
                                          : write_batch.Put(handle, op.key, op.value);
    KLS_RETURN_IF_ERROR(FromRocksDbStatus(
        status, absl::StrCat("batching ", kFamilyNames[op.family], "/", PrintableKey(op.key))));
  }

  std::sort(stripes.begin(), stripes.end());
  stripes.erase(std::unique(stripes.begin(), stripes.end()), stripes.end());
  std::vector<absl::Mutex*> mutexes;
  mutexes.reserve(stripes.size());
  for (size_t stripe : stripes) mutexes.push_back(&record_stripes_[stripe]);
  StripeLock lock(std::move(mutexes));
  if (checked) KLS_RETURN_IF_ERROR(CheckRecord(record_op->key, batch));
  rocksdb::WriteOptions write_options;
  write_options.sync = batch.sync;
  return FromRocksDbStatus(
      db_->Write(write_options, &write_batch),
      absl::StrCat("shard ", name_, ": writing a batch of ", batch.ops.size(), " ops"));
}

absl::StatusOr<std::vector<std::optional<std::string>>> RocksDbShard::Read(
    Family family, const std::vector<std::string>& keys) {
  KLS_ASSIGN_OR_RETURN(rocksdb::ColumnFamilyHandle * handle, Handle(family));
  rocksdb::ReadOptions read_options;
  read_options.verify_checksums = true;
  // Multi-MiB values would evict the small hot entries (records, indexes) from the cache.
  read_options.fill_cache = !IsLargeValueFamily(family);
  std::vector<std::optional<std::string>> values;
  values.reserve(keys.size());
  for (const std::string& key : keys) {
    std::string value;
    rocksdb::Status status = db_->Get(read_options, handle, key, &value);
    if (status.IsNotFound()) {
      values.emplace_back(std::nullopt);
      continue;
    }
    KLS_RETURN_IF_ERROR(FromRocksDbStatus(
        status,
        absl::StrCat("shard ", name_, ": reading ", kFamilyNames[family], "/", PrintableKey(key))));
    values.emplace_back(std::move(value));
  }
  return values;
}

absl::Status RocksDbShard::Scan(
    Family family, std::string_view prefix, std::string_view start_after, uint32_t limit,
    bool keys_only, const std::function<bool(std::string_view, std::string_view)>& visit) {
  KLS_ASSIGN_OR_RETURN(rocksdb::ColumnFamilyHandle * handle, Handle(family));
  rocksdb::ReadOptions read_options;
  read_options.verify_checksums = true;
  read_options.fill_cache = !IsLargeValueFamily(family);
  const std::string upper = PrefixSuccessor(prefix);
  rocksdb::Slice upper_slice(upper);
  if (!upper.empty()) read_options.iterate_upper_bound = &upper_slice;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(read_options, handle));

  const rocksdb::Slice prefix_slice(prefix.data(), prefix.size());
  if (!start_after.empty() && start_after >= prefix) {
    const rocksdb::Slice after(start_after.data(), start_after.size());
    it->Seek(after);
    if (it->Valid() && it->key() == after) it->Next();
  } else {
    it->Seek(prefix_slice);
  }
  uint32_t visited = 0;
  for (; it->Valid(); it->Next()) {
    const rocksdb::Slice key = it->key();
    if (!key.starts_with(prefix_slice)) break;
    std::string_view value;
    if (!keys_only) value = std::string_view(it->value().data(), it->value().size());
    ++visited;
    if (!visit(std::string_view(key.data(), key.size()), value)) break;
    if (limit != 0 && visited >= limit) break;
  }
  return FromRocksDbStatus(
      it->status(), absl::StrCat("shard ", name_, ": scanning ", kFamilyNames[family], " from ",
                                 PrintableKey(prefix)));
}

absl::Status RocksDbShard::Flush() {
  std::vector<rocksdb::ColumnFamilyHandle*> handles(handles_.begin(), handles_.end());
  rocksdb::FlushOptions flush_options;
  flush_options.wait = true;
  return FromRocksDbStatus(db_->Flush(flush_options, handles),
                           absl::StrCat("shard ", name_, ": flushing"));
}

}  // namespace kls::store

#include "services/store/session_store.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <thread>
#include <unordered_set>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/hash.h"
#include "common/logging.h"
#include "common/rendezvous.h"
#include "common/status_macros.h"

namespace kls::store {
namespace {

using kls::v1::SessionRecord;

constexpr Family kSessions = kls::v1::COLUMN_FAMILY_SESSIONS;
constexpr Family kState = kls::v1::COLUMN_FAMILY_STATE;
constexpr Family kBlocks = kls::v1::COLUMN_FAMILY_BLOCKS;
constexpr Family kTokens = kls::v1::COLUMN_FAMILY_TOKENS;

constexpr size_t kBlockKeyBytes = 16;
constexpr size_t kBlockTimeBytes = 8;  // the write-time prefix of a stored block
// Most threads one call fans out to (commit block writes, block fetches, GC sweeps).
constexpr size_t kMaxParallel = 8;
// Blocks per shard read in GetBlocks: several reads per shard keep a fast disk busy.
constexpr size_t kBlocksPerRead = 16;
// Blocks GC reads (for their write time) per shard call.
constexpr size_t kGcReadBatch = 16;
constexpr size_t kGcDeleteBatch = 256;
constexpr int kCasAttempts = 3;

static_assert(std::endian::native == std::endian::little,
              "the store's token and block-time encodings are little-endian");

absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

std::string RecordKey(std::string_view tenant, std::string_view session_id) {
  return absl::StrCat(Av(tenant), "/", Av(session_id));
}
std::string StateKey(std::string_view session_id, uint64_t version, uint32_t chunk) {
  return absl::StrFormat("%s/%020d/%06d", Av(session_id), version, chunk);
}
std::string BlockName(std::string_view key) { return absl::BytesToHexString(Av(key)); }
std::string VersionName(std::optional<uint64_t> version) {
  return version.has_value() ? absl::StrCat("version ", *version) : std::string("no record");
}

// The record version a shard holds; nullopt when it holds none (which orders below every
// version, as std::optional compares).
using StoredVersion = std::optional<uint64_t>;

// Makes `batch` check the stored record against `version` (nullopt: must be absent).
void SetRecordCheck(WriteBatchSpec& batch, StoredVersion version) {
  batch.expected_record_version = version;
  batch.expect_no_record = !version.has_value();
}

// Tenants and session ids become key prefixes ("<tenant>/..."), so neither may hold a '/'.
absl::Status CheckId(std::string_view what, std::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError(absl::StrCat("empty ", Av(what)));
  if (id.find('/') != std::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(Av(what), " \"", Av(id), "\" contains '/'"));
  }
  return absl::OkStatus();
}

bool IsExpired(const SessionRecord& record, int64_t now_ms) {
  if (record.ttl_seconds() <= 0) return false;
  const int64_t update = record.update_time_ms();
  if (record.ttl_seconds() >
      (std::numeric_limits<int64_t>::max() - std::max<int64_t>(update, 0)) / 1000) {
    return false;  // beyond int64 milliseconds: never
  }
  return update + record.ttl_seconds() * 1000 < now_ms;
}

std::string EncodeTokens(const std::vector<int32_t>& tokens) {
  std::string bytes(tokens.size() * sizeof(int32_t), '\0');
  if (!tokens.empty()) std::memcpy(bytes.data(), tokens.data(), bytes.size());
  return bytes;
}

// Runs fn(i) for every i in [0, n) on up to kMaxParallel threads (the caller's among them).
void ParallelFor(size_t n, const std::function<void(size_t)>& fn) {
  if (n == 1) fn(0);
  if (n <= 1) return;
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  };
  std::vector<std::thread> threads;
  const size_t num_threads = std::min(n, kMaxParallel);
  threads.reserve(num_threads - 1);
  for (size_t t = 1; t < num_threads; ++t) threads.emplace_back(worker);
  worker();
  for (std::thread& thread : threads) thread.join();
}

// The record stored under `key` on one shard; nullopt when absent.
absl::StatusOr<std::optional<SessionRecord>> ReadRecord(Shard& shard, const std::string& key) {
  KLS_ASSIGN_OR_RETURN(std::vector<std::optional<std::string>> values,
                       shard.Read(kSessions, {key}));
  if (values.size() != 1) {
    return absl::InternalError(absl::StrCat("shard ", shard.name(), " returned ", values.size(),
                                            " values for record ", key));
  }
  if (!values[0].has_value()) return std::optional<SessionRecord>();
  SessionRecord record;
  if (!record.ParseFromString(*values[0])) {
    return absl::DataLossError(absl::StrCat("shard ", shard.name(), ": session record ", key,
                                            " does not parse (", values[0]->size(), " bytes)"));
  }
  return std::optional<SessionRecord>(std::move(record));
}

// Status of a call that reached no replica.
absl::Status NoLiveReplica(std::string_view what, const std::vector<absl::Status>& errors) {
  std::string message = absl::StrCat("no live store replica for ", Av(what));
  for (const absl::Status& error : errors) absl::StrAppend(&message, "; ", error.message());
  return absl::UnavailableError(message);
}

// Ops deleting every state chunk a record references (current version and retained ones).
void AppendStateDeletes(const SessionRecord& record, std::set<std::string>& keys) {
  for (uint32_t i = 0; i < record.state_chunks(); ++i) {
    keys.insert(StateKey(record.session_id(), record.version(), i));
  }
  for (const kls::v1::StateRef& ref : record.retained_states()) {
    for (uint32_t i = 0; i < ref.chunks(); ++i) {
      keys.insert(StateKey(record.session_id(), ref.version(), i));
    }
  }
}

// The batch that deletes one replica's copy of a session: record (CAS on the replica's version),
// tokens and the state chunks of `records`.
WriteBatchSpec DeleteBatch(const std::string& record_key, const std::string& session_id,
                           StoredVersion replica_version,
                           const std::vector<const SessionRecord*>& records) {
  std::set<std::string> state_keys;
  for (const SessionRecord* record : records) AppendStateDeletes(*record, state_keys);
  WriteBatchSpec batch;
  batch.sync = true;
  SetRecordCheck(batch, replica_version);
  batch.ops.reserve(state_keys.size() + 2);
  for (const std::string& key : state_keys) {
    batch.ops.push_back(WriteOp{kState, key, /*is_delete=*/true, {}});
  }
  batch.ops.push_back(WriteOp{kTokens, session_id, /*is_delete=*/true, {}});
  batch.ops.push_back(WriteOp{kSessions, record_key, /*is_delete=*/true, {}});
  return batch;
}

absl::Status ValidateCommit(const CommitRequest& request) {
  const SessionRecord& record = request.record;
  KLS_RETURN_IF_ERROR(CheckId("tenant", record.tenant()));
  KLS_RETURN_IF_ERROR(CheckId("session id", record.session_id()));
  const std::string name = RecordKey(record.tenant(), record.session_id());
  if (request.expected_version.has_value() && record.version() < *request.expected_version) {
    return absl::InvalidArgumentError(absl::StrCat("commit of ", name, ": record version ",
                                                   record.version(), " is below expected ",
                                                   *request.expected_version));
  }
  if (request.state_chunks.size() != record.state_chunks()) {
    return absl::InvalidArgumentError(
        absl::StrCat("commit of ", name, ": ", request.state_chunks.size(),
                     " state chunks, the record says ", record.state_chunks()));
  }
  if (request.tokens.size() != record.num_history_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("commit of ", name, ": ", request.tokens.size(),
                                                   " tokens, the record says ",
                                                   record.num_history_tokens()));
  }
  if (record.ttl_seconds() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("commit of ", name, ": negative ttl_seconds ", record.ttl_seconds()));
  }
  for (const std::string& key : record.block_keys()) {
    if (key.size() != kBlockKeyBytes) {
      return absl::InvalidArgumentError(absl::StrCat("commit of ", name, ": record block key ",
                                                     BlockName(key), " is not 16 bytes"));
    }
  }
  for (const auto& [key, value] : request.blocks) {
    if (key.size() != kBlockKeyBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("commit of ", name, ": block key ", BlockName(key), " is not 16 bytes"));
    }
  }
  for (const auto& [version, chunks] : request.drop_state_versions) {
    if (version == record.version()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "commit of ", name, ": drop_state_versions contains the new version ", version));
    }
  }
  return absl::OkStatus();
}

// Page tokens: web-safe base64 of "1:<xxh3 of tenant, hex>:<last session id>".
std::string TenantTag(std::string_view tenant) { return absl::StrFormat("%016x", Xxh3_64(tenant)); }
std::string EncodePageToken(std::string_view tenant, std::string_view last_session_id) {
  return absl::WebSafeBase64Escape(absl::StrCat("1:", TenantTag(tenant), ":", Av(last_session_id)));
}
absl::StatusOr<std::string> DecodePageToken(std::string_view tenant, std::string_view token) {
  std::string payload;
  const absl::Status invalid =
      absl::InvalidArgumentError(absl::StrCat("malformed page token \"", Av(token), "\""));
  if (!absl::WebSafeBase64Unescape(Av(token), &payload)) return invalid;
  std::vector<std::string> parts = absl::StrSplit(payload, absl::MaxSplits(':', 2));
  if (parts.size() != 3 || parts[0] != "1" || parts[2].empty() ||
      parts[2].find('/') != std::string::npos) {
    return invalid;
  }
  if (parts[1] != TenantTag(tenant)) {
    return absl::InvalidArgumentError(
        absl::StrCat("page token \"", Av(token), "\" belongs to another tenant"));
  }
  return parts[2];
}

}  // namespace

absl::StatusOr<std::unique_ptr<SessionStore>> SessionStore::Create(
    std::vector<std::unique_ptr<Shard>> shards, const SessionStoreOptions& options) {
  if (shards.empty()) return absl::InvalidArgumentError("SessionStore needs at least one shard");
  if (options.replication < 1 || options.replication > static_cast<int>(shards.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("replication ", options.replication, " is not in [1, ", shards.size(), "]"));
  }
  std::set<std::string> names;
  for (const std::unique_ptr<Shard>& shard : shards) {
    if (shard == nullptr) return absl::InvalidArgumentError("null shard");
    // Equal names would make placement depend on list order between processes.
    if (!names.insert(shard->name()).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate shard name ", shard->name()));
    }
  }
  return std::unique_ptr<SessionStore>(new SessionStore(std::move(shards), options));
}

SessionStore::SessionStore(std::vector<std::unique_ptr<Shard>> shards,
                           const SessionStoreOptions& options)
    : shards_(std::move(shards)), options_(options) {
  for (const std::unique_ptr<Shard>& shard : shards_) shard_names_.push_back(shard->name());
}

int SessionStore::num_shards() const { return static_cast<int>(shards_.size()); }
int SessionStore::replication() const { return options_.replication; }

std::vector<size_t> SessionStore::Replicas(std::string_view placement_key) const {
  return RendezvousRank(placement_key, shard_names_, static_cast<size_t>(options_.replication));
}

absl::Status SessionStore::Commit(const CommitRequest& request) {
  CommitRequest copy = request;
  return Commit(std::move(copy));
}

absl::Status SessionStore::Commit(CommitRequest&& request) {
  KLS_RETURN_IF_ERROR(ValidateCommit(request));
  const SessionRecord& record = request.record;
  const std::string& session_id = record.session_id();
  const std::string record_key = RecordKey(record.tenant(), session_id);
  const std::vector<size_t> replicas = Replicas(session_id);

  // (1) Blocks: content-addressed, so rewriting one is harmless; a failed commit leaves only
  // unreferenced blocks, which garbage collection removes.
  if (!request.blocks.empty()) {
    KLS_RETURN_IF_ERROR(WriteBlocks(std::move(request.blocks), request.sync, replicas));
  }

  // (2) Everything session-scoped in one atomic batch per replica, the record last. The state
  // chunks ride in the checked batch too: a commit that loses the version race must not
  // overwrite the winner's chunks under the same <session_id>/<version> keys.
  WriteBatchSpec batch;
  batch.sync = request.sync;
  SetRecordCheck(batch, request.expected_version);
  size_t num_drops = 0;
  for (const auto& [version, chunks] : request.drop_state_versions) num_drops += chunks;
  batch.ops.reserve(request.state_chunks.size() + num_drops + 2);
  for (size_t i = 0; i < request.state_chunks.size(); ++i) {
    batch.ops.push_back(WriteOp{kState,
                                StateKey(session_id, record.version(), static_cast<uint32_t>(i)),
                                false, std::move(request.state_chunks[i])});
  }
  for (const auto& [version, chunks] : request.drop_state_versions) {
    for (uint32_t i = 0; i < chunks; ++i) {
      batch.ops.push_back(WriteOp{kState, StateKey(session_id, version, i), true, {}});
    }
  }
  batch.ops.push_back(WriteOp{kTokens, session_id, false, EncodeTokens(request.tokens)});
  batch.ops.push_back(WriteOp{kSessions, record_key, false, record.SerializeAsString()});
  return WriteSessionBatch(replicas, batch, record_key, request.expected_version, record.version());
}

absl::Status SessionStore::WriteBlocks(std::vector<std::pair<std::string, std::string>> blocks,
                                       bool sync, const std::vector<size_t>& session_replicas) {
  const uint64_t now_ms = static_cast<uint64_t>(absl::ToUnixMillis(absl::Now()));
  char time_bytes[kBlockTimeBytes];
  std::memcpy(time_bytes, &now_ms, kBlockTimeBytes);

  // Blocks with the same owner set share one batch, written to each owner: no value is copied
  // per replica.
  std::map<std::vector<size_t>, WriteBatchSpec> groups;
  for (auto& [key, value] : blocks) {
    std::vector<size_t> owners = Replicas(key);
    std::sort(owners.begin(), owners.end());
    std::string stored;
    stored.reserve(kBlockTimeBytes + value.size());
    stored.append(time_bytes, kBlockTimeBytes).append(value);
    value = std::string();  // free as we go
    groups[std::move(owners)].ops.push_back(
        WriteOp{kBlocks, std::move(key), false, std::move(stored)});
  }
  struct Task {
    WriteBatchSpec* batch;
    size_t shard;
  };
  std::vector<Task> tasks;
  for (auto& [owners, batch] : groups) {
    // A session replica gets its WAL synced by the record batch that follows.
    batch.sync = sync && std::any_of(owners.begin(), owners.end(), [&](size_t shard) {
                   return std::find(session_replicas.begin(), session_replicas.end(), shard) ==
                          session_replicas.end();
                 });
    for (size_t shard : owners) tasks.push_back(Task{&batch, shard});
  }
  std::vector<absl::Status> results(tasks.size());
  ParallelFor(tasks.size(),
              [&](size_t i) { results[i] = shards_[tasks[i].shard]->Write(*tasks[i].batch); });

  // Every group needs one live owner; any error other than UNAVAILABLE fails the commit.
  std::map<const WriteBatchSpec*, std::vector<absl::Status>> unavailable;
  std::map<const WriteBatchSpec*, bool> written;
  for (size_t i = 0; i < tasks.size(); ++i) {
    const absl::Status& status = results[i];
    if (status.ok()) {
      written[tasks[i].batch] = true;
    } else if (absl::IsUnavailable(status)) {
      unavailable[tasks[i].batch].push_back(status);
    } else {
      return status;
    }
  }
  for (const auto& [owners, batch] : groups) {
    if (!written[&batch]) {
      return NoLiveReplica(absl::StrCat("MLA block ", BlockName(batch.ops.front().key)),
                           unavailable[&batch]);
    }
  }
  return absl::OkStatus();
}

absl::Status SessionStore::WriteSessionBatch(const std::vector<size_t>& replicas,
                                             const WriteBatchSpec& batch,
                                             const std::string& record_key,
                                             std::optional<uint64_t> expected_version,
                                             uint64_t new_version) {
  // Writes `batch` (checked against expected_version) to one shard. When the check fails:
  //  - the shard holds expected_version after all (a racing delete or repair): retry;
  //  - it holds more than expected, or new_version already: on the deciding replica (the first
  //    live one) the race is lost, ABORTED; elsewhere a newer commit is in place, skip;
  //  - it holds less (it was down during earlier commits): write over its own version; on the
  //    deciding replica only if another live replica holds expected_version and none holds more.
  auto write_one = [&](size_t shard_index, bool decides) -> absl::Status {
    Shard& shard = *shards_[shard_index];
    std::optional<WriteBatchSpec> stale_batch;  // a copy, made only on the rare stale path
    absl::Status status = shard.Write(batch);
    for (int attempt = 0; attempt < kCasAttempts && absl::IsAborted(status); ++attempt) {
      KLS_ASSIGN_OR_RETURN(std::optional<SessionRecord> stored, ReadRecord(shard, record_key));
      const StoredVersion current =
          stored.has_value() ? StoredVersion(stored->version()) : std::nullopt;
      if (current == expected_version) {
        status = shard.Write(batch);
        continue;
      }
      if (current > expected_version || current >= StoredVersion(new_version)) {
        if (decides) {
          return absl::AbortedError(absl::StrCat("session ", record_key, " has ",
                                                 VersionName(current), " in the store, expected ",
                                                 VersionName(expected_version)));
        }
        KLS_LOG(WARNING) << "store replica " << shard.name() << " already holds " << record_key
                         << " " << VersionName(current) << " (committing " << new_version
                         << "); not written";
        return absl::OkStatus();
      }
      if (decides) {
        // Only a live replica holding exactly expected_version shows that this one is stale
        // rather than the writer wrong.
        bool confirmed = false;
        for (size_t other : replicas) {
          if (other == shard_index) continue;
          absl::StatusOr<std::optional<SessionRecord>> record =
              ReadRecord(*shards_[other], record_key);
          if (!record.ok() || !record->has_value()) continue;
          const StoredVersion version = (*record)->version();
          if (version > expected_version) {
            return absl::AbortedError(
                absl::StrCat("session ", record_key, " has ", VersionName(version), " on ",
                             shards_[other]->name(), ", expected ", VersionName(expected_version)));
          }
          confirmed = confirmed || version == expected_version;
        }
        if (!confirmed) {
          return absl::AbortedError(absl::StrCat("session ", record_key, " has ",
                                                 VersionName(current), " in the store, expected ",
                                                 VersionName(expected_version)));
        }
      }
      if (!stale_batch.has_value()) stale_batch = batch;
      SetRecordCheck(*stale_batch, current);
      status = shard.Write(*stale_batch);
    }
    return status;
  };

  // The first live replica decides the commit, so two racing writers cannot each win on a
  // different replica. The other replicas follow in parallel.
  std::vector<absl::Status> unavailable;
  size_t position = 0;
  for (; position < replicas.size(); ++position) {
    absl::Status status = write_one(replicas[position], /*decides=*/true);
    if (status.ok()) break;
    if (!absl::IsUnavailable(status)) return status;
    unavailable.push_back(std::move(status));
  }
  if (position == replicas.size()) {
    return NoLiveReplica(absl::StrCat("session ", record_key), unavailable);
  }
  std::vector<size_t> followers(replicas.begin() + position + 1, replicas.end());
  std::vector<absl::Status> results(followers.size());
  ParallelFor(followers.size(),
              [&](size_t i) { results[i] = write_one(followers[i], /*decides=*/false); });
  for (size_t i = 0; i < followers.size(); ++i) {
    if (results[i].ok()) continue;
    if (absl::IsUnavailable(results[i])) {
      KLS_LOG(WARNING) << "store replica down during the commit of " << record_key
                       << " (read repair will catch it up): " << results[i].message();
      continue;
    }
    return absl::Status(
        results[i].code(),
        absl::StrCat(results[i].message(), " (the commit of ", record_key, " version ", new_version,
                     " is on ", shards_[replicas[position]]->name(), ")"));
  }
  return absl::OkStatus();
}

void SessionStore::Repair(const SessionRecord& record, size_t source, size_t target,
                          std::optional<uint64_t> target_version) {
  const std::string& session_id = record.session_id();
  std::vector<std::string> chunk_keys;
  for (uint32_t i = 0; i < record.state_chunks(); ++i) {
    chunk_keys.push_back(StateKey(session_id, record.version(), i));
  }
  absl::StatusOr<std::vector<std::optional<std::string>>> tokens =
      shards_[source]->Read(kTokens, {session_id});
  absl::StatusOr<std::vector<std::optional<std::string>>> chunks =
      chunk_keys.empty() ? std::vector<std::optional<std::string>>()
                         : shards_[source]->Read(kState, chunk_keys);
  const std::string record_key = RecordKey(record.tenant(), session_id);
  if (!tokens.ok() || !chunks.ok() || tokens->size() != 1 || !(*tokens)[0].has_value()) {
    KLS_LOG(WARNING) << "read repair of " << record_key << " on " << shards_[target]->name()
                     << " skipped: source " << shards_[source]->name() << " lacks its data";
    return;
  }
  WriteBatchSpec batch;
  batch.sync = true;
  SetRecordCheck(batch, target_version);
  for (size_t i = 0; i < chunk_keys.size(); ++i) {
    if (!(*chunks)[i].has_value()) {
      KLS_LOG(WARNING) << "read repair of " << record_key << ": chunk " << chunk_keys[i]
                       << " missing on " << shards_[source]->name() << "; skipped";
      return;
    }
    batch.ops.push_back(WriteOp{kState, chunk_keys[i], false, std::move(*(*chunks)[i])});
  }
  batch.ops.push_back(WriteOp{kTokens, session_id, false, std::move(*(*tokens)[0])});
  batch.ops.push_back(WriteOp{kSessions, record_key, false, record.SerializeAsString()});
  absl::Status status = shards_[target]->Write(batch);
  if (!status.ok()) {
    // ABORTED: the replica moved on meanwhile (a commit reached it), which is fine.
    KLS_LOG(WARNING) << "read repair of " << record_key << " on " << shards_[target]->name() << ": "
                     << status.message();
  }
}

absl::StatusOr<SessionRecord> SessionStore::GetRecord(std::string_view tenant,
                                                      std::string_view session_id) {
  KLS_RETURN_IF_ERROR(CheckId("tenant", tenant));
  KLS_RETURN_IF_ERROR(CheckId("session id", session_id));
  const std::string key = RecordKey(tenant, session_id);
  const std::vector<size_t> replicas = Replicas(session_id);
  std::vector<absl::StatusOr<std::optional<SessionRecord>>> results(replicas.size());
  ParallelFor(replicas.size(),
              [&](size_t i) { results[i] = ReadRecord(*shards_[replicas[i]], key); });

  std::optional<size_t> best;  // index into results
  std::vector<absl::Status> unavailable;
  absl::Status error;  // the first error other than UNAVAILABLE
  for (size_t i = 0; i < results.size(); ++i) {
    if (!results[i].ok()) {
      if (absl::IsUnavailable(results[i].status())) {
        unavailable.push_back(results[i].status());
      } else if (error.ok()) {
        error = results[i].status();
      }
      continue;
    }
    const std::optional<SessionRecord>& record = *results[i];
    if (record.has_value() &&
        (!best.has_value() || record->version() > (*results[*best])->version())) {
      best = i;
    }
  }
  if (!best.has_value()) {
    if (!error.ok()) return error;
    if (unavailable.size() == replicas.size()) return NoLiveReplica(key, unavailable);
    return absl::NotFoundError(absl::StrCat("session ", key, " not found"));
  }
  SessionRecord record = **results[*best];
  if (IsExpired(record, absl::ToUnixMillis(absl::Now()))) {
    return absl::NotFoundError(absl::StrCat("session ", key, " not found (expired)"));
  }
  for (size_t i = 0; i < results.size(); ++i) {
    if (!results[i].ok()) continue;  // down, or unreadable: a write would not fix it
    const StoredVersion version =
        results[i]->has_value() ? StoredVersion((*results[i])->version()) : std::nullopt;
    if (version < StoredVersion(record.version())) {
      Repair(record, replicas[*best], replicas[i], version);
    }
  }
  return record;
}

absl::StatusOr<std::vector<std::string>> SessionStore::GetStateChunks(std::string_view session_id,
                                                                      uint64_t version,
                                                                      uint32_t chunks) {
  KLS_RETURN_IF_ERROR(CheckId("session id", session_id));
  std::vector<std::string> keys;
  keys.reserve(chunks);
  for (uint32_t i = 0; i < chunks; ++i) keys.push_back(StateKey(session_id, version, i));
  if (keys.empty()) return std::vector<std::string>();

  // Replicas in rank order; the first with every chunk wins, so a stale or damaged replica
  // falls back to the next one.
  std::vector<absl::Status> unavailable;
  absl::Status error;
  for (size_t shard : Replicas(session_id)) {
    absl::StatusOr<std::vector<std::optional<std::string>>> values =
        shards_[shard]->Read(kState, keys);
    if (!values.ok()) {
      if (absl::IsUnavailable(values.status())) {
        unavailable.push_back(values.status());
      } else if (error.ok()) {
        error = values.status();
      }
      continue;
    }
    auto missing = std::find(values->begin(), values->end(), std::nullopt);
    if (missing != values->end()) {
      if (error.ok()) {
        error = absl::NotFoundError(absl::StrCat("state chunk ", keys[missing - values->begin()],
                                                 " not found on ", shards_[shard]->name()));
      }
      continue;
    }
    std::vector<std::string> out;
    out.reserve(values->size());
    for (std::optional<std::string>& value : *values) out.push_back(std::move(*value));
    return out;
  }
  if (!error.ok()) return error;
  return NoLiveReplica(absl::StrCat("state of session ", Av(session_id)), unavailable);
}

absl::StatusOr<std::vector<std::string>> SessionStore::GetBlocks(
    const std::vector<std::string>& keys) {
  std::vector<std::optional<std::string>> found(keys.size());
  // Per key: the most telling failure so far (DATA_LOSS etc. > NOT_FOUND > UNAVAILABLE).
  std::vector<absl::Status> failure(keys.size());
  auto note = [&](size_t i, const absl::Status& status) {
    const auto rank = [](const absl::Status& s) {
      return s.ok() ? 0 : absl::IsUnavailable(s) ? 1 : absl::IsNotFound(s) ? 2 : 3;
    };
    if (rank(status) > rank(failure[i])) failure[i] = status;
  };
  std::vector<std::vector<size_t>> owners(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) owners[i] = Replicas(keys[i]);

  std::vector<size_t> pending(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) pending[i] = i;
  for (int rank = 0; rank < options_.replication && !pending.empty(); ++rank) {
    // Group the pending keys by their rank-th owner, in reads of at most kBlocksPerRead keys.
    std::map<size_t, std::vector<size_t>> by_shard;
    for (size_t i : pending) by_shard[owners[i][rank]].push_back(i);
    struct ReadTask {
      size_t shard;
      std::vector<size_t> indices;
    };
    std::vector<ReadTask> tasks;
    for (auto& [shard, indices] : by_shard) {
      for (size_t begin = 0; begin < indices.size(); begin += kBlocksPerRead) {
        const size_t end = std::min(indices.size(), begin + kBlocksPerRead);
        tasks.push_back(ReadTask{shard, {indices.begin() + begin, indices.begin() + end}});
      }
    }
    ParallelFor(tasks.size(), [&](size_t t) {
      ReadTask& task = tasks[t];
      std::vector<std::string> task_keys;
      task_keys.reserve(task.indices.size());
      for (size_t i : task.indices) task_keys.push_back(keys[i]);
      absl::StatusOr<std::vector<std::optional<std::string>>> values =
          shards_[task.shard]->Read(kBlocks, task_keys);
      for (size_t j = 0; j < task.indices.size(); ++j) {
        const size_t i = task.indices[j];  // each index is in exactly one task
        if (!values.ok()) {
          note(i, values.status());
        } else if (!(*values)[j].has_value()) {
          note(i, absl::NotFoundError(absl::StrCat("MLA block ", BlockName(keys[i]),
                                                   " not found on ", shards_[task.shard]->name())));
        } else if ((*values)[j]->size() < kBlockTimeBytes) {
          note(i, absl::DataLossError(absl::StrCat("MLA block ", BlockName(keys[i]), " on ",
                                                   shards_[task.shard]->name(), " has ",
                                                   (*values)[j]->size(), " bytes")));
        } else {
          std::string value = std::move(*(*values)[j]);
          value.erase(0, kBlockTimeBytes);  // in place: no second buffer
          found[i] = std::move(value);
        }
      }
    });
    std::vector<size_t> still;
    for (size_t i : pending) {
      if (!found[i].has_value()) still.push_back(i);
    }
    pending = std::move(still);
  }
  if (!pending.empty()) {
    const size_t i = pending.front();
    const absl::Status& status = failure[i];
    return absl::Status(status.code(),
                        absl::StrCat("block ", i, " of ", keys.size(), ": ", status.message()));
  }
  std::vector<std::string> out;
  out.reserve(keys.size());
  for (std::optional<std::string>& value : found) out.push_back(std::move(*value));
  return out;
}

absl::StatusOr<std::vector<int32_t>> SessionStore::GetTokens(std::string_view session_id) {
  KLS_RETURN_IF_ERROR(CheckId("session id", session_id));
  const std::string key(session_id);
  const std::vector<size_t> replicas = Replicas(session_id);
  std::vector<absl::StatusOr<std::vector<std::optional<std::string>>>> results(replicas.size());
  ParallelFor(replicas.size(),
              [&](size_t i) { results[i] = shards_[replicas[i]]->Read(kTokens, {key}); });
  // Histories only grow, so the longest copy is the newest (a stale replica has a prefix).
  const std::string* best = nullptr;
  std::vector<absl::Status> unavailable;
  absl::Status error;
  for (auto& result : results) {
    if (!result.ok()) {
      if (absl::IsUnavailable(result.status())) {
        unavailable.push_back(result.status());
      } else if (error.ok()) {
        error = result.status();
      }
      continue;
    }
    if (result->size() == 1 && (*result)[0].has_value() &&
        (best == nullptr || (*result)[0]->size() > best->size())) {
      best = &*(*result)[0];
    }
  }
  if (best == nullptr) {
    if (!error.ok()) return error;
    if (unavailable.size() == replicas.size()) {
      return NoLiveReplica(absl::StrCat("tokens of session ", key), unavailable);
    }
    return absl::NotFoundError(absl::StrCat("token history of session ", key, " not found"));
  }
  if (best->size() % sizeof(int32_t) != 0) {
    return absl::DataLossError(absl::StrCat("token history of session ", key, " has ", best->size(),
                                            " bytes, not a multiple of 4"));
  }
  std::vector<int32_t> tokens(best->size() / sizeof(int32_t));
  if (!tokens.empty()) std::memcpy(tokens.data(), best->data(), best->size());
  return tokens;
}

absl::Status SessionStore::DeleteSession(std::string_view tenant, std::string_view session_id) {
  KLS_RETURN_IF_ERROR(CheckId("tenant", tenant));
  KLS_RETURN_IF_ERROR(CheckId("session id", session_id));
  const std::string key = RecordKey(tenant, session_id);
  const std::vector<size_t> replicas = Replicas(session_id);
  std::vector<absl::StatusOr<std::optional<SessionRecord>>> records(replicas.size());
  ParallelFor(replicas.size(),
              [&](size_t i) { records[i] = ReadRecord(*shards_[replicas[i]], key); });
  // Every replica must be reachable: one that missed the delete would bring the session back
  // (reads take the highest version).
  const SessionRecord* best = nullptr;
  for (size_t i = 0; i < records.size(); ++i) {
    if (!records[i].ok()) {
      return absl::Status(
          records[i].status().code(),
          absl::StrCat("cannot delete session ", key, ": ", records[i].status().message()));
    }
    if (records[i]->has_value() &&
        (best == nullptr || (*records[i])->version() > best->version())) {
      best = &**records[i];
    }
  }
  if (best == nullptr || IsExpired(*best, absl::ToUnixMillis(absl::Now()))) {
    return absl::NotFoundError(absl::StrCat("session ", key, " not found"));
  }
  std::vector<absl::Status> results(replicas.size());
  ParallelFor(replicas.size(), [&](size_t i) {
    std::vector<const SessionRecord*> known = {best};
    StoredVersion version;
    if (records[i]->has_value()) {
      known.push_back(&**records[i]);
      version = (*records[i])->version();
    }
    results[i] =
        shards_[replicas[i]]->Write(DeleteBatch(key, std::string(session_id), version, known));
  });
  for (const absl::Status& status : results) KLS_RETURN_IF_ERROR(status);
  return absl::OkStatus();
}

absl::StatusOr<ListPage> SessionStore::ListSessions(std::string_view tenant, int page_size,
                                                    std::string_view page_token) {
  KLS_RETURN_IF_ERROR(CheckId("tenant", tenant));
  if (page_size < 1 || page_size > 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size ", page_size, " is not in [1, 1000]"));
  }
  const std::string prefix = absl::StrCat(Av(tenant), "/");
  std::string cursor;  // the last session id handed out (exclusive)
  if (!page_token.empty()) {
    KLS_ASSIGN_OR_RETURN(cursor, DecodePageToken(tenant, page_token));
  }
  const int64_t now_ms = absl::ToUnixMillis(absl::Now());

  ListPage page;
  bool exhausted = false;
  // Rounds: each takes the `need` smallest session ids after the cursor over all shards (each
  // shard contributes its smallest need + 1, which is enough to know them and whether more
  // follow); expired sessions are skipped, so a round may leave the page short.
  while (static_cast<int>(page.records.size()) < page_size && !exhausted) {
    const size_t need = page_size - page.records.size();
    std::vector<std::vector<SessionRecord>> per_shard(shards_.size());
    std::vector<absl::Status> results(shards_.size());
    const std::string start_after = cursor.empty() ? std::string() : prefix + cursor;
    ParallelFor(shards_.size(), [&](size_t s) {
      absl::Status parse_error;
      results[s] = shards_[s]->Scan(
          kSessions, prefix, start_after, static_cast<uint32_t>(need + 1), /*keys_only=*/false,
          [&](std::string_view record_key, std::string_view value) {
            SessionRecord record;
            if (!record.ParseFromArray(value.data(), static_cast<int>(value.size()))) {
              parse_error = absl::DataLossError(absl::StrCat("shard ", shards_[s]->name(),
                                                             ": session record ", Av(record_key),
                                                             " does not parse"));
              return false;
            }
            per_shard[s].push_back(std::move(record));
            return true;
          });
      if (results[s].ok()) results[s] = parse_error;
    });
    std::vector<absl::Status> unavailable;
    for (const absl::Status& status : results) {
      if (absl::IsUnavailable(status)) {
        unavailable.push_back(status);
      } else if (!status.ok()) {
        return status;
      }
    }
    if (unavailable.size() == shards_.size()) {
      return NoLiveReplica(absl::StrCat("the sessions of tenant ", Av(tenant)), unavailable);
    }
    // Replicas of one session: the highest version wins.
    std::map<std::string, SessionRecord> merged;
    for (std::vector<SessionRecord>& records : per_shard) {
      for (SessionRecord& record : records) {
        auto [it, inserted] = merged.try_emplace(record.session_id());
        if (inserted || record.version() > it->second.version()) it->second = std::move(record);
      }
    }
    exhausted = merged.size() <= need;
    size_t taken = 0;
    for (auto& [session_id, record] : merged) {
      if (taken++ == need) break;
      cursor = session_id;
      if (!IsExpired(record, now_ms)) page.records.push_back(std::move(record));
    }
  }
  if (!exhausted) page.next_page_token = EncodePageToken(tenant, cursor);
  return page;
}

absl::StatusOr<GcStats> SessionStore::CollectGarbage(absl::Time now, absl::Duration block_grace) {
  const int64_t now_ms = absl::ToUnixMillis(now);
  const int64_t grace_ms = absl::ToInt64Milliseconds(block_grace);
  GcStats stats;

  // Mark: every record on every shard (stale replicas included, to err on keeping). A shard that
  // cannot be scanned may hold the only reference to a block, so then nothing is swept.
  struct ShardMarks {
    std::unordered_set<std::string> blocks;
    std::vector<SessionRecord> expired;
    absl::Status status;
  };
  std::vector<ShardMarks> marks(shards_.size());
  ParallelFor(shards_.size(), [&](size_t s) {
    ShardMarks& mark = marks[s];
    absl::Status parse_error;
    mark.status = shards_[s]->Scan(
        kSessions, "", "", 0, /*keys_only=*/false,
        [&](std::string_view key, std::string_view value) {
          SessionRecord record;
          if (!record.ParseFromArray(value.data(), static_cast<int>(value.size()))) {
            // It may reference blocks: refuse to sweep rather than guess.
            parse_error = absl::DataLossError(absl::StrCat(
                "shard ", shards_[s]->name(), ": session record ", Av(key), " does not parse"));
            return false;
          }
          if (IsExpired(record, now_ms)) {
            mark.expired.push_back(std::move(record));
            return true;
          }
          for (const std::string& block : record.block_keys()) mark.blocks.insert(block);
          for (const kls::v1::StateRef& ref : record.retained_states()) {
            for (const std::string& block : ref.block_keys()) mark.blocks.insert(block);
          }
          return true;
        });
    if (mark.status.ok()) mark.status = parse_error;
  });
  for (const ShardMarks& mark : marks) KLS_RETURN_IF_ERROR(mark.status);
  std::unordered_set<std::string> marked = std::move(marks[0].blocks);
  for (size_t s = 1; s < marks.size(); ++s) marked.merge(marks[s].blocks);

  // Expired sessions, per replica (checked against the version seen, so a session a worker
  // revived meanwhile stays).
  std::set<std::string> expired_sessions;
  for (size_t s = 0; s < shards_.size(); ++s) {
    for (const SessionRecord& record : marks[s].expired) {
      const std::string key = RecordKey(record.tenant(), record.session_id());
      absl::Status status =
          shards_[s]->Write(DeleteBatch(key, record.session_id(), record.version(), {&record}));
      if (absl::IsAborted(status)) continue;
      KLS_RETURN_IF_ERROR(status);
      expired_sessions.insert(key);
    }
  }
  stats.sessions_expired = expired_sessions.size();

  // Sweep: unmarked blocks older than the grace period. Only unmarked blocks are read (for
  // their write time); a commit that re-references an old block rewrites it with a fresh time.
  struct ShardSweep {
    uint64_t scanned = 0, referenced = 0, deleted = 0;
    absl::Status status;
  };
  std::vector<ShardSweep> sweeps(shards_.size());
  ParallelFor(shards_.size(), [&](size_t s) {
    ShardSweep& sweep = sweeps[s];
    Shard& shard = *shards_[s];
    std::vector<std::string> candidates;
    sweep.status = shard.Scan(kBlocks, "", "", 0, /*keys_only=*/true,
                              [&](std::string_view key, std::string_view) {
                                ++sweep.scanned;
                                std::string block(key);
                                if (marked.count(block) != 0) {
                                  ++sweep.referenced;
                                } else {
                                  candidates.push_back(std::move(block));
                                }
                                return true;
                              });
    if (!sweep.status.ok()) return;
    std::vector<std::string> doomed;
    for (size_t begin = 0; begin < candidates.size(); begin += kGcReadBatch) {
      std::vector<std::string> batch_keys(
          candidates.begin() + begin,
          candidates.begin() + std::min(candidates.size(), begin + kGcReadBatch));
      absl::StatusOr<std::vector<std::optional<std::string>>> values =
          shard.Read(kBlocks, batch_keys);
      if (!values.ok()) {
        sweep.status = values.status();
        return;
      }
      for (size_t j = 0; j < batch_keys.size(); ++j) {
        const std::optional<std::string>& value = (*values)[j];
        if (!value.has_value()) continue;  // deleted meanwhile
        int64_t written_ms = 0;            // a value too short to hold a time is garbage
        if (value->size() >= kBlockTimeBytes) {
          std::memcpy(&written_ms, value->data(), kBlockTimeBytes);
        }
        if (now_ms - written_ms > grace_ms) doomed.push_back(std::move(batch_keys[j]));
      }
    }
    for (size_t begin = 0; begin < doomed.size(); begin += kGcDeleteBatch) {
      WriteBatchSpec batch;
      const size_t end = std::min(doomed.size(), begin + kGcDeleteBatch);
      for (size_t j = begin; j < end; ++j) {
        batch.ops.push_back(WriteOp{kBlocks, std::move(doomed[j]), true, {}});
      }
      sweep.status = shard.Write(batch);
      if (!sweep.status.ok()) return;
      sweep.deleted += end - begin;
    }
  });
  for (const ShardSweep& sweep : sweeps) {
    stats.blocks_scanned += sweep.scanned;
    stats.blocks_referenced += sweep.referenced;
    stats.blocks_deleted += sweep.deleted;
  }
  for (const ShardSweep& sweep : sweeps) KLS_RETURN_IF_ERROR(sweep.status);
  return stats;
}

absl::StatusOr<StoreStats> SessionStore::Stats() {
  std::vector<StoreStats> per_shard(shards_.size());
  std::vector<absl::Status> results(shards_.size());
  ParallelFor(shards_.size(), [&](size_t s) {
    const std::pair<Family, uint64_t StoreStats::*> families[] = {
        {kSessions, &StoreStats::sessions},
        {kState, &StoreStats::state_chunks},
        {kBlocks, &StoreStats::blocks},
        {kTokens, &StoreStats::token_histories}};
    for (const auto& [family, field] : families) {
      uint64_t& count = per_shard[s].*field;
      results[s] = shards_[s]->Scan(family, "", "", 0, /*keys_only=*/true,
                                    [&](std::string_view, std::string_view) {
                                      ++count;
                                      return true;
                                    });
      if (!results[s].ok()) return;
    }
  });
  StoreStats total;
  for (size_t s = 0; s < shards_.size(); ++s) {
    KLS_RETURN_IF_ERROR(results[s]);
    total.sessions += per_shard[s].sessions;
    total.state_chunks += per_shard[s].state_chunks;
    total.blocks += per_shard[s].blocks;
    total.token_histories += per_shard[s].token_histories;
  }
  return total;
}

}  // namespace kls::store

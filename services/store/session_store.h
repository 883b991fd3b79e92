// The session schema of ARCHITECTURE.md §4 over S shards with replication factor R:
// rendezvous hashing (common/rendezvous.h) places session-scoped keys (record, tokens, state
// chunks) by session id, so one session's commit is one atomic batch per replica, and MLA blocks
// by their hash, so blocks spread over every shard. Keys:
//   sessions  "<tenant>/<session_id>"                    -> kls.v1.SessionRecord
//   state     "<session_id>/<version %020d>/<chunk %06d>" -> snapshot state chunk
//   blocks    16-byte block hash (binary)                 -> 8-byte write time (ms, LE) + MLA block
//   tokens    "<session_id>"                              -> token ids, u32 little-endian
#ifndef KLS_SERVICES_STORE_SESSION_STORE_H_
#define KLS_SERVICES_STORE_SESSION_STORE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kls/v1/store.pb.h"
#include "services/store/shard.h"

namespace kls::store {

struct SessionStoreOptions {
  int replication = 1;  // R: copies of every key, on the top-R shards; 1 <= R <= shards
};

// One turn's snapshot, written by Commit.
struct CommitRequest {
  kls::v1::SessionRecord record;          // the new record
  std::vector<std::string> state_chunks;  // stored as <session_id>/<record.version>/<i>
  // New MLA blocks (key = 16-byte hash). Always written (idempotent, refreshes their write time,
  // so garbage collection never races a commit that re-references an old block).
  std::vector<std::pair<std::string, std::string>> blocks;
  std::vector<int32_t> tokens;  // the whole token history (record.num_history_tokens() ids)
  // The version the session's record has in the store; nullopt for a new session (whose record
  // must not exist yet).
  std::optional<uint64_t> expected_version;
  bool sync = true;  // fsync the record batch
  // State versions to delete in the same batch (versions that fell out of retained_states),
  // each with its chunk count.
  std::vector<std::pair<uint64_t, uint32_t>> drop_state_versions;
};

struct ListPage {
  std::vector<kls::v1::SessionRecord> records;
  std::string next_page_token;  // empty on the last page
};

struct GcStats {
  uint64_t sessions_expired = 0;
  uint64_t blocks_scanned = 0;
  uint64_t blocks_deleted = 0;
  uint64_t blocks_referenced = 0;
};

// Key counts per family (summed over shards, counting replicas), for tests and metrics.
struct StoreStats {
  uint64_t sessions = 0, state_chunks = 0, blocks = 0, token_histories = 0;
};

// Thread-safe. Shard failures: a write needs every live replica of the top R to succeed and at
// least one replica to be live (else UNAVAILABLE); a read asks every replica of the top R and
// takes the record with the highest version, writing it back to stale live replicas.
class SessionStore {
 public:
  static absl::StatusOr<std::unique_ptr<SessionStore>> Create(
      std::vector<std::unique_ptr<Shard>> shards, const SessionStoreOptions& options);

  // (1) state chunks and blocks (unsynced, idempotent), then (2) record + tokens + drops in one
  // synced batch per replica, checked against expected_version (ABORTED if the store's record
  // has another version or exists when it should not: another worker committed the session).
  // Readers never see a partial snapshot. INVALID_ARGUMENT for an inconsistent request.
  absl::Status Commit(const CommitRequest& request);
  // The same, moving the request's (multi-MiB) chunks and blocks into the batches instead of
  // copying them.
  absl::Status Commit(CommitRequest&& request);

  // The record; NOT_FOUND if absent, deleted or expired (now > update_time + ttl).
  absl::StatusOr<kls::v1::SessionRecord> GetRecord(std::string_view tenant,
                                                   std::string_view session_id);
  // Chunk values of one version in order. NOT_FOUND if any is missing, DATA_LOSS on shard
  // corruption. (The codec checks the contents.)
  absl::StatusOr<std::vector<std::string>> GetStateChunks(std::string_view session_id,
                                                          uint64_t version, uint32_t chunks);
  // MLA block values (without the write-time prefix) in the order of `keys`; blocks on different
  // shards are fetched in parallel. NOT_FOUND naming the first missing block.
  absl::StatusOr<std::vector<std::string>> GetBlocks(const std::vector<std::string>& keys);
  // The token history. NOT_FOUND if missing, DATA_LOSS if its size is not a multiple of 4.
  absl::StatusOr<std::vector<int32_t>> GetTokens(std::string_view session_id);

  // Deletes record, tokens and state chunks (blocks go with garbage collection). NOT_FOUND if
  // absent.
  absl::Status DeleteSession(std::string_view tenant, std::string_view session_id);

  // A tenant's live sessions in session-id order. page_size in [1, 1000]; page_token from a
  // previous page (INVALID_ARGUMENT if malformed).
  absl::StatusOr<ListPage> ListSessions(std::string_view tenant, int page_size,
                                        std::string_view page_token);

  // Mark and sweep: deletes expired sessions (record, tokens, state), then blocks referenced by
  // no record (block_keys and retained_states) that were written more than `block_grace` ago.
  absl::StatusOr<GcStats> CollectGarbage(absl::Time now, absl::Duration block_grace);

  absl::StatusOr<StoreStats> Stats();

  int num_shards() const;
  int replication() const;

 private:
  SessionStore(std::vector<std::unique_ptr<Shard>> shards, const SessionStoreOptions& options);

  // Indices into shards_ of the top-R owners of `placement_key`, best first.
  std::vector<size_t> Replicas(std::string_view placement_key) const;
  // Commit step (1): the blocks, each on every live replica of its owners.
  absl::Status WriteBlocks(std::vector<std::pair<std::string, std::string>> blocks, bool sync,
                           const std::vector<size_t>& session_replicas);
  // Commit step (2): `batch` (CAS on expected_version) on the first live replica, which decides
  // the commit, then on the others, bringing stale ones up to new_version.
  absl::Status WriteSessionBatch(const std::vector<size_t>& replicas, const WriteBatchSpec& batch,
                                 const std::string& record_key,
                                 std::optional<uint64_t> expected_version, uint64_t new_version);
  // Copies the record, its tokens and current state chunks from shards_[source] to the stale
  // shards_[target] (read repair); `target_version` is the target's record version (nullopt:
  // absent). Best effort: failures are logged.
  void Repair(const kls::v1::SessionRecord& record, size_t source, size_t target,
              std::optional<uint64_t> target_version);

  std::vector<std::unique_ptr<Shard>> shards_;
  std::vector<std::string> shard_names_;  // shards_[i]->name(), the rendezvous candidates
  SessionStoreOptions options_;
};

}  // namespace kls::store

#endif  // KLS_SERVICES_STORE_SESSION_STORE_H_

// The snapshot codec: a SessionState as the byte values the state store keeps (ARCHITECTURE.md
// §4, HOUSE_STYLE.md H19). Two kinds of values:
//
//   state chunk  the KDA recurrent + conv state of every KDA layer, split into chunks of at most
//                `max_chunk_bytes`. Each chunk is self-describing and checked on its own.
//   MLA block    the MLA latent cache of kMlaBlockTokens consecutive tokens (the last block of
//                a session may be partial), all MLA layers, addressed by MlaBlockHash.
//
// Every value = a fixed little-endian header + payload:
//   magic "KLSS" (state) / "KLSB" (block), u32 format_version (kSnapshotFormatVersion),
//   16-byte model fingerprint, u32 dtype of the payload (kFloat32 on the CPU backend),
//   layer count, per-layer shape words, u64 token position (state: tokens inside the state;
//   block: first token of the block) and count, u32 chunk index / chunk count (state), u64
//   payload bytes, u64 XXH3-64 of header-before-checksum + payload.
// Exact layout of format_version 1 (every integer little-endian, L = layer count,
// S = 32 + 4 * words_per_layer * L; a block is a value with one chunk):
//   [0, 4)        magic "KLSS" | "KLSB"
//   [4, 8)        u32 format_version
//   [8, 24)       model fingerprint: u64 high, u64 low
//   [24, 28)      u32 dtype (SnapshotDType)
//   [28, 32)      u32 L: KDA layers (state) / MLA layers (block)
//   [32, S)       shape words, per layer: state u32 H, K, V, W; block u32 Dc, Dr
//   [S, S+8)      u64 token position
//   [S+8, S+16)   u64 num_tokens (block; 0 in a state chunk)
//   [S+16, S+24)  u32 chunk_index, u32 chunk_count (block: 0, 1)
//   [S+24, S+32)  u64 chunk_offset: where this payload starts in the whole (unchunked) payload
//   [S+32, S+40)  u64 total payload bytes (all chunks)
//   [S+40, S+48)  u64 content digest: XXH3-64 of the whole payload; ties the chunks of one
//                 snapshot together (chunks of another snapshot at the same position differ)
//   [S+48, S+56)  u64 payload_bytes of this value
//   [S+56, S+64)  u64 checksum: XXH3-64 of bytes [0, S+56) followed by the payload
//   [S+64, ...)   payload (payload_bytes)
// Payload layouts (fixed; a change bumps kSnapshotFormatVersion):
//   state: for each KDA layer in model order: recurrent [H, K, V] then conv [3][W-1][H*K],
//          concatenated over layers, then cut into chunks at arbitrary byte offsets
//   block: [mla_layer][token][Dc + Dr]
// Values are written in the dtype the backend holds (fp32 here), so a same-backend restore is
// bit-exact; a reader converts other dtypes it knows (fp32, bf16) and refuses others.
//
// Readers check, in order: magic and size (DATA_LOSS), format_version (FAILED_PRECONDITION; a
// reader cannot know another version's layout), checksum (DATA_LOSS), then fingerprint, dtype and
// shapes (FAILED_PRECONDITION), then the chunk sequence (DATA_LOSS). So a corrupt fingerprint
// reads as DATA_LOSS and only an intact value of another model as FAILED_PRECONDITION.
//
// Thread-safety: every function is pure apart from its output argument; concurrent calls on
// distinct outputs are safe.
#ifndef KLS_ENGINE_STATE_SNAPSHOT_H_
#define KLS_ENGINE_STATE_SNAPSHOT_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/hash.h"
#include "engine/model/config.h"
#include "engine/state/session_state.h"

namespace kls::engine {

inline constexpr uint32_t kSnapshotFormatVersion = 1;
inline constexpr int kMlaBlockTokens = 256;
inline constexpr size_t kMaxStateChunkBytes = size_t{4} << 20;

enum class SnapshotDType : uint32_t { kFloat32 = 1, kBFloat16 = 2 };

// Content address of one MLA block: xxh3_128 over (fingerprint, cache dtype, previous block's
// hash (zeros for the first block), the block's token ids). The cache of a prefix is a pure
// function of the prefix, so equal prefixes share blocks.
Hash128 MlaBlockHash(const Hash128& model_fingerprint, SnapshotDType dtype,
                     const Hash128& previous_block, std::span<const int32_t> block_tokens);

// The block hashes of a token history's first `num_tokens` tokens: ceil(num_tokens / 256)
// hashes; the last covers a partial block when num_tokens is not a multiple of 256.
std::vector<Hash128> MlaBlockHashes(const Hash128& model_fingerprint, SnapshotDType dtype,
                                    std::span<const int32_t> tokens);

// The state chunks of `state` (KDA recurrent + conv of every KDA layer), recording
// state.num_tokens() as the token position. Each chunk (header included) is at most
// max_chunk_bytes (>= 4 KiB); a model without KDA layers gives one chunk with an empty payload.
// `dtype` is the payload dtype: kFloat32 is bit-exact; kBFloat16 rounds to nearest even (for
// backends that hold bf16, and for tests of the bf16 reader). INVALID_ARGUMENT if the KDA state
// does not match the config, max_chunk_bytes < 4096 or dtype is unknown.
absl::StatusOr<std::vector<std::string>> EncodeStateChunks(
    const SessionState& state, const ModelConfig& config, const Hash128& model_fingerprint,
    size_t max_chunk_bytes = kMaxStateChunkBytes, SnapshotDType dtype = SnapshotDType::kFloat32);

// Restores the KDA recurrent + conv state of `state` (which must already be sized for the
// config, e.g. SessionState(config)) from `chunks` in order, and returns the token position
// recorded in them; does not touch num_tokens() or the MLA caches. INVALID_ARGUMENT if `state`
// is not sized for the config. Every chunk is checked before `state` is written, so today an
// error leaves `state` unchanged; callers should still decode into a scratch state:
//   DATA_LOSS           bad magic, truncated value, checksum mismatch, chunks out of order,
//                       missing, duplicated or from different snapshots (token positions,
//                       chunk counts or content digests that disagree)
//   FAILED_PRECONDITION fingerprint or format_version mismatch (the message names both values),
//                       an unknown payload dtype, or layer shapes that differ from the config
absl::StatusOr<int64_t> DecodeStateChunks(std::span<const std::string> chunks,
                                          const ModelConfig& config,
                                          const Hash128& model_fingerprint, SessionState* state);

// The MLA block holding cache rows [first_token, first_token + num_tokens) of every MLA layer
// (num_tokens in [1, kMlaBlockTokens], first_token a multiple of kMlaBlockTokens, rows present
// in `state`), with the payload in `dtype` (as for EncodeStateChunks). INVALID_ARGUMENT otherwise,
// or when the model has no MLA layers.
absl::StatusOr<std::string> EncodeMlaBlock(const SessionState& state, const ModelConfig& config,
                                           const Hash128& model_fingerprint, int64_t first_token,
                                           int num_tokens,
                                           SnapshotDType dtype = SnapshotDType::kFloat32);

// Appends the rows of one block to the MLA caches of `state`. The block's first token must equal
// the rows the caches already hold (blocks are applied in order; DATA_LOSS names both otherwise).
// DATA_LOSS / FAILED_PRECONDITION as for DecodeStateChunks; INVALID_ARGUMENT if the caches of
// `state` do not fit the config. On error `state` is unchanged. Does not touch num_tokens().
absl::Status DecodeMlaBlock(std::string_view block, const ModelConfig& config,
                            const Hash128& model_fingerprint, SessionState* state);

// What a value's header says, for `kls snapshot inspect` and store diagnostics.
struct SnapshotValueInfo {
  bool is_block = false;
  uint32_t format_version = 0;
  Hash128 model_fingerprint;
  SnapshotDType dtype = SnapshotDType::kFloat32;
  uint32_t num_layers = 0;
  int64_t token_position = 0;                 // state: tokens inside; block: first token
  int64_t num_tokens = 0;                     // block only
  uint32_t chunk_index = 0, chunk_count = 0;  // state only
  uint64_t payload_bytes = 0;
  std::vector<uint32_t> layer_shapes;  // per layer: state H, K, V, W; block Dc, Dr
  uint64_t chunk_offset = 0;           // state: this payload's offset in the whole payload
  uint64_t total_payload_bytes = 0;    // all chunks together
  uint64_t content_digest = 0;         // XXH3-64 of the whole payload
  // The value's size agrees with its header and its checksum matches.
  bool checksum_ok = false;
};
// Parses any value's header without a config. DATA_LOSS when the header itself is unreadable
// (too short, bad magic); FAILED_PRECONDITION for a format_version this build does not know.
// A damaged or truncated payload is not an error: it reports checksum_ok = false.
absl::StatusOr<SnapshotValueInfo> InspectSnapshotValue(std::string_view value);

}  // namespace kls::engine

#endif  // KLS_ENGINE_STATE_SNAPSHOT_H_

// Kimi (K2-family) tiktoken BPE tokenizer: `tiktoken.model` mergeable ranks, 256 special-token
// slots after them, and the K2 pre-tokenizer regex run through PCRE2. KIMI_LINEAR.md §7; README.md
// here.
#ifndef KLS_ENGINE_TOKENIZER_TOKENIZER_H_
#define KLS_ENGINE_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace kls::engine {

// Special-token slots after the mergeable ranks: ids num_ranks .. num_ranks + 255.
inline constexpr int32_t kNumSpecialTokenSlots = 256;

// The K2 pre-tokenizer pattern exactly as tiktoken receives it (Rust regex syntax, with `&&` class
// intersection). Kept for documentation and golden generation; PCRE2 compiles a rewrite of it.
extern const std::string_view kKimiPatternTiktoken;
// The PCRE2 rewrite: `[X&&[^\p{Han}]]` → `(?:(?!\p{sc=Han})[X])`, `\p{Han}` → `\p{sc=Han}` (PCRE2
// reads a bare script name as Script_Extensions, Rust as Script), and `\s`/`\S` spelled out as
// Unicode White_Space (PCRE2's UCP `\s` also takes U+180E, Rust's does not).
extern const std::string_view kKimiPatternPcre2;

class PreTokenizer;  // PCRE2 state; defined in tokenizer.cc.

// Immutable after Load/FromContents; every const method is thread-safe.
class Tokenizer {
 public:
  // Loads <model_dir>/tiktoken.model (lines "base64token rank") and
  // <model_dir>/tokenizer_config.json. NOT_FOUND naming the file when one is missing;
  // INVALID_ARGUMENT naming the file (and line, for tiktoken.model) when the content is malformed;
  // see FromContents for what is checked.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& model_dir);

  // Builds a tokenizer from the two files' contents. tiktoken.model: one "token rank" line per
  // mergeable token (empty lines skipped), ranks exactly 0..n-1 in any order, tokens distinct and
  // non-empty, every single byte present. tokenizer_config.json: an object whose optional
  // `added_tokens_decoder` ({"<id>": {"content": "<name>", ...}}) names ids in
  // [n, n + 256) (unnamed slots are `<|reserved_token_<id>|>`), and whose optional `bos_token` /
  // `eos_token` (string or {"content": ...}; default "[BOS]" / "[EOS]") name special tokens.
  // Entries for ids n + 256 and n + 257 (the reference tokenizer reserves 258 ids; these two are
  // outside the embedding) are ignored. INVALID_ARGUMENT otherwise, including for a key that is not
  // a decimal id, an id below n (it would shadow a mergeable token) or an id >= n + 258.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromContents(
      std::string_view tiktoken_model, std::string_view tokenizer_config_json);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Plain text → ids, identical to the reference `TikTokenTokenizer.encode(text,
  // allow_special_tokens=False)` (including its 400,000-code-point chunks and its split of runs of
  // more than 25,000 whitespace / non-whitespace code points). Special-token strings in `text` are
  // encoded as ordinary text: every id is < num_ranks(). INVALID_ARGUMENT on invalid UTF-8 (naming
  // the byte offset); INTERNAL if PCRE2 fails.
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) const;

  // Ids → bytes; special tokens become their names, or nothing when skip_special. INVALID_ARGUMENT
  // on an id outside [0, vocab_size()). The output may be invalid UTF-8 when the ids split a
  // character (this is the raw decode; StreamingDecoder repairs it).
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids, bool skip_special = false) const;

  // The bytes of one mergeable token, or the name of a special one (valid while *this lives).
  // INVALID_ARGUMENT on an id outside [0, vocab_size()).
  absl::StatusOr<std::string_view> TokenBytes(int32_t id) const;

  // Id of a special token by name (e.g. "<|im_end|>", "<|reserved_token_163589|>"); nullopt if
  // none.
  std::optional<int32_t> SpecialTokenId(std::string_view name) const;
  // True for ids in [num_ranks(), vocab_size()).
  bool IsSpecial(int32_t id) const { return id >= num_ranks_ && id < vocab_size(); }

  int64_t num_ranks() const { return num_ranks_; }  // lines in tiktoken.model
  int64_t vocab_size() const { return num_ranks_ + kNumSpecialTokenSlots; }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }

  // Test hook: byte-level BPE of one pre-token with tiktoken's merge order, through the quadratic
  // path (`use_heap` false, tiktoken's own loop) or the O(n log n) heap path used for long pieces.
  // Both give identical ids. INTERNAL only if the vocabulary invariant is broken.
  absl::StatusOr<std::vector<int32_t>> TEST_BytePairEncode(std::string_view piece,
                                                           bool use_heap) const;

 private:
  Tokenizer();
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Build(std::string_view tiktoken_model,
                                                          std::string_view model_name,
                                                          std::string_view config_json,
                                                          std::string_view config_name);

  std::string_view MergeableBytes(int32_t rank) const;
  // Rank of a byte string, or -1 when it is not a mergeable token.
  int32_t Rank(std::string_view bytes) const;
  absl::Status EncodePiece(std::string_view piece, std::vector<int32_t>* out) const;
  absl::Status BytePairEncodeLinearScan(std::string_view piece, std::vector<int32_t>* out) const;
  absl::Status BytePairEncodeHeap(std::string_view piece, std::vector<int32_t>* out) const;
  absl::Status EncodeSegment(std::string_view segment, std::vector<int32_t>* out) const;

  int32_t num_ranks_ = 0;
  // All mergeable tokens' bytes back to back, in rank order; token r is
  // token_bytes_[token_offsets_[r], token_offsets_[r + 1]).
  std::string token_bytes_;
  std::vector<uint32_t> token_offsets_;
  absl::flat_hash_map<std::string_view, int32_t> rank_of_;  // views into token_bytes_
  std::vector<std::string> special_names_;                  // [kNumSpecialTokenSlots]
  absl::flat_hash_map<std::string, int32_t> special_ids_;
  int32_t bos_id_ = 0;
  int32_t eos_id_ = 0;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
};

// Streaming decode of generated tokens. Push returns only complete, valid UTF-8 text: an incomplete
// trailing character is held back until a later token completes it, and bytes that can never form a
// character become U+FFFD at once (one per maximal invalid subpart, as Python's
// bytes.decode("utf-8", "replace")). Flush returns what is held back (a truncated character becomes
// U+FFFD) and resets. The concatenated output equals the replace-decode of Decode(all ids).
// Not thread-safe; the tokenizer must outlive it.
class StreamingDecoder {
 public:
  explicit StreamingDecoder(const Tokenizer& tokenizer, bool skip_special = true);

  // INVALID_ARGUMENT on an id outside [0, vocab_size()); the decoder state is then unchanged.
  absl::StatusOr<std::string> Push(int32_t id);
  std::string Flush();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::string pending_;  // at most 3 bytes: a valid but incomplete UTF-8 prefix
};

}  // namespace kls::engine

#endif  // KLS_ENGINE_TOKENIZER_TOKENIZER_H_

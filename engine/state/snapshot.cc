#include "engine/state/snapshot.h"

#include <xxhash.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"

namespace kls::engine {
namespace {

// Payload values are the host's float bytes; only the header is serialized field by field.
static_assert(std::endian::native == std::endian::little,
              "snapshot payloads assume a little-endian host");

constexpr char kStateMagic[4] = {'K', 'L', 'S', 'S'};
constexpr char kBlockMagic[4] = {'K', 'L', 'S', 'B'};
constexpr size_t kFixedPrefixBytes = 32;  // magic .. layer count
constexpr size_t kFixedSuffixBytes = 64;  // token position .. checksum
constexpr size_t kMinChunkBytes = 4096;
constexpr uint32_t kStateWordsPerLayer = 4;  // H, K, V, W
constexpr uint32_t kBlockWordsPerLayer = 2;  // Dc, Dr

// Streaming XXH3-64: the checksum covers two non-adjacent ranges of a value.
class Xxh3Stream64 {
 public:
  Xxh3Stream64() : state_(XXH3_createState()) { XXH3_64bits_reset(state_); }
  ~Xxh3Stream64() { XXH3_freeState(state_); }
  Xxh3Stream64(const Xxh3Stream64&) = delete;
  Xxh3Stream64& operator=(const Xxh3Stream64&) = delete;

  void Update(const void* data, size_t size) { XXH3_64bits_update(state_, data, size); }
  void Update(std::string_view s) { Update(s.data(), s.size()); }
  uint64_t Digest() const { return XXH3_64bits_digest(state_); }

 private:
  XXH3_state_t* state_;
};

uint64_t ValueChecksum(std::string_view header_before_checksum, std::string_view payload) {
  Xxh3Stream64 h;
  h.Update(header_before_checksum);
  h.Update(payload);
  return h.Digest();
}

size_t HeaderBytes(uint32_t words_per_layer, uint64_t num_layers) {
  return kFixedPrefixBytes + 4 * words_per_layer * num_layers + kFixedSuffixBytes;
}

void PutU32(uint32_t v, char* out) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<char>(v >> (8 * i));
}
void PutU64(uint64_t v, char* out) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(v >> (8 * i));
}
uint32_t GetU32(const char* in) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{static_cast<unsigned char>(in[i])} << (8 * i);
  return v;
}
uint64_t GetU64(const char* in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t{static_cast<unsigned char>(in[i])} << (8 * i);
  return v;
}

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
uint16_t ToBf16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
float FromBf16(uint16_t v) { return std::bit_cast<float>(uint32_t{v} << 16); }

bool KnownDType(uint32_t dtype) {
  return dtype == static_cast<uint32_t>(SnapshotDType::kFloat32) ||
         dtype == static_cast<uint32_t>(SnapshotDType::kBFloat16);
}
size_t ElementBytes(SnapshotDType dtype) { return dtype == SnapshotDType::kBFloat16 ? 2 : 4; }

// A header as read from a value, plus whether the value is intact.
struct Header {
  bool is_block = false;
  uint32_t format_version = 0;
  Hash128 fingerprint;
  uint32_t dtype = 0;
  uint32_t num_layers = 0;
  std::vector<uint32_t> shape_words;
  uint64_t token_position = 0;
  uint64_t num_tokens = 0;
  uint32_t chunk_index = 0;
  uint32_t chunk_count = 0;
  uint64_t chunk_offset = 0;
  uint64_t total_bytes = 0;
  uint64_t digest = 0;
  uint64_t payload_bytes = 0;
  uint64_t checksum = 0;
  std::string_view payload;        // everything after the header
  bool size_ok = false;            // payload.size() == payload_bytes
  uint64_t computed_checksum = 0;  // only when size_ok
};

// Reads the header. DATA_LOSS when it is unreadable, FAILED_PRECONDITION for an unknown version.
absl::StatusOr<Header> ParseHeader(std::string_view value) {
  if (value.size() < 8) {
    return absl::DataLossError(absl::StrCat("snapshot value of ", value.size(),
                                            " bytes is too short for a header (truncated)"));
  }
  Header h;
  if (std::memcmp(value.data(), kStateMagic, 4) == 0) {
    h.is_block = false;
  } else if (std::memcmp(value.data(), kBlockMagic, 4) == 0) {
    h.is_block = true;
  } else {
    return absl::DataLossError(absl::StrFormat(
        "snapshot value has bad magic 0x%08x (want \"KLSS\" or \"KLSB\")", GetU32(value.data())));
  }
  h.format_version = GetU32(value.data() + 4);
  if (h.format_version != kSnapshotFormatVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        "snapshot format_version ", h.format_version,
        " is not supported (this build reads format_version ", kSnapshotFormatVersion, ")"));
  }
  if (value.size() < kFixedPrefixBytes) {
    return absl::DataLossError(absl::StrCat("snapshot value of ", value.size(),
                                            " bytes is too short for a header (truncated)"));
  }
  const char* p = value.data();
  h.fingerprint.high = GetU64(p + 8);
  h.fingerprint.low = GetU64(p + 16);
  h.dtype = GetU32(p + 24);
  h.num_layers = GetU32(p + 28);
  const uint32_t words = h.is_block ? kBlockWordsPerLayer : kStateWordsPerLayer;
  const size_t header_bytes = HeaderBytes(words, h.num_layers);
  if (value.size() < header_bytes) {
    return absl::DataLossError(absl::StrCat(
        "snapshot value of ", value.size(), " bytes is shorter than its ", header_bytes,
        "-byte header (", h.num_layers, " layers): truncated or corrupt"));
  }
  h.shape_words.resize(size_t{words} * h.num_layers);
  for (size_t i = 0; i < h.shape_words.size(); ++i) {
    h.shape_words[i] = GetU32(p + kFixedPrefixBytes + 4 * i);
  }
  const char* s = p + header_bytes - kFixedSuffixBytes;
  h.token_position = GetU64(s);
  h.num_tokens = GetU64(s + 8);
  h.chunk_index = GetU32(s + 16);
  h.chunk_count = GetU32(s + 20);
  h.chunk_offset = GetU64(s + 24);
  h.total_bytes = GetU64(s + 32);
  h.digest = GetU64(s + 40);
  h.payload_bytes = GetU64(s + 48);
  h.checksum = GetU64(s + 56);
  h.payload = value.substr(header_bytes);
  h.size_ok = h.payload.size() == h.payload_bytes;
  if (h.size_ok) h.computed_checksum = ValueChecksum(value.substr(0, header_bytes - 8), h.payload);
  return h;
}

const char* KindName(bool is_block) { return is_block ? "MLA block" : "state chunk"; }

// Parses a value a decoder is about to use: the right kind, intact, of this model, known dtype.
absl::StatusOr<Header> ParseForDecode(std::string_view value, bool want_block,
                                      const Hash128& model_fingerprint, const std::string& what) {
  absl::StatusOr<Header> parsed = ParseHeader(value);
  if (!parsed.ok()) {
    return absl::Status(parsed.status().code(),
                        absl::StrCat(what, ": ", parsed.status().message()));
  }
  Header& h = *parsed;
  if (h.is_block != want_block) {
    return absl::DataLossError(
        absl::StrCat(what, " is a ", KindName(h.is_block), ", not a ", KindName(want_block)));
  }
  if (!h.size_ok) {
    return absl::DataLossError(absl::StrCat(what, " holds ", h.payload.size(),
                                            " payload bytes but its header says ", h.payload_bytes,
                                            " (truncated or corrupt)"));
  }
  if (h.computed_checksum != h.checksum) {
    return absl::DataLossError(
        absl::StrFormat("%s: checksum mismatch (stored 0x%016x, computed 0x%016x)", what,
                        h.checksum, h.computed_checksum));
  }
  if (h.fingerprint != model_fingerprint) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " was written for model fingerprint ", h.fingerprint.ToHex(),
                     " but the loaded model's fingerprint is ", model_fingerprint.ToHex()));
  }
  if (!KnownDType(h.dtype)) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " has payload dtype ", h.dtype,
                     ", which this build cannot read (known: 1 = fp32, 2 = bf16)"));
  }
  if (h.token_position > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return absl::DataLossError(
        absl::StrCat(what, " has token position ", h.token_position, ", beyond int64"));
  }
  return parsed;
}

// Compares a value's shape words with the config's; FAILED_PRECONDITION names the first
// difference. `names` label the words of one layer.
absl::Status CheckShapes(const Header& h, const std::vector<uint32_t>& want,
                         std::span<const char* const> names, const char* layer_kind,
                         const std::string& what) {
  const size_t words = names.size();
  const size_t want_layers = want.size() / words;
  if (h.num_layers != want_layers) {
    return absl::FailedPreconditionError(absl::StrCat(what, " has ", h.num_layers, " ", layer_kind,
                                                      " layers but the model has ", want_layers));
  }
  for (size_t i = 0; i < want.size(); ++i) {
    if (h.shape_words[i] != want[i]) {
      return absl::FailedPreconditionError(absl::StrCat(
          what, ": ", layer_kind, " layer ", i / words, " has ", names[i % words], " = ",
          h.shape_words[i], " but the model has ", names[i % words], " = ", want[i]));
    }
  }
  return absl::OkStatus();
}

// The payload as a list of fp32 arrays, in payload order.
struct ConstSegment {
  const float* data;
  size_t count;
};
struct Segment {
  float* data;
  size_t count;
};

// Produces the payload bytes of `segments` in `dtype`, sequentially, in pieces of any size.
class PayloadWriter {
 public:
  PayloadWriter(std::vector<ConstSegment> segments, SnapshotDType dtype)
      : segments_(std::move(segments)), es_(ElementBytes(dtype)) {}

  // Writes the next n bytes (which must exist) to out.
  void Write(char* out, size_t n) {
    while (n > 0) {
      const ConstSegment& seg = segments_[seg_];
      const size_t seg_bytes = seg.count * es_;
      if (pos_ == seg_bytes) {
        ++seg_;
        pos_ = 0;
        continue;
      }
      const size_t take = std::min(n, seg_bytes - pos_);
      if (es_ == 4) {
        std::memcpy(out, reinterpret_cast<const char*>(seg.data) + pos_, take);
      } else {
        for (size_t b = 0; b < take;) {
          const size_t at = pos_ + b;
          const uint16_t v = ToBf16(seg.data[at / 2]);
          const char bytes[2] = {static_cast<char>(v & 0xff), static_cast<char>(v >> 8)};
          const size_t c = std::min(2 - at % 2, take - b);
          std::memcpy(out + b, bytes + at % 2, c);
          b += c;
        }
      }
      out += take;
      n -= take;
      pos_ += take;
    }
  }

 private:
  std::vector<ConstSegment> segments_;
  size_t es_;
  size_t seg_ = 0;
  size_t pos_ = 0;  // byte offset inside segments_[seg_]
};

// Consumes payload bytes in `dtype`, in pieces cut anywhere, into `segments` as fp32.
class PayloadReader {
 public:
  PayloadReader(std::vector<Segment> segments, SnapshotDType dtype)
      : segments_(std::move(segments)), es_(ElementBytes(dtype)) {}

  // Consumes n bytes; the caller has checked that the total fits the segments.
  void Read(const char* in, size_t n) {
    while (n > 0) {
      const Segment& seg = segments_[seg_];
      const size_t seg_bytes = seg.count * es_;
      if (pos_ == seg_bytes) {
        ++seg_;
        pos_ = 0;
        continue;
      }
      const size_t take = std::min(n, seg_bytes - pos_);
      if (es_ == 4) {
        std::memcpy(reinterpret_cast<char*>(seg.data) + pos_, in, take);
      } else {
        // Segments hold whole elements, so only a chunk boundary can split one: carry its low
        // byte to the next call.
        size_t b = 0;
        if (pos_ % 2 == 1) {
          seg.data[pos_ / 2] = FromBf16(static_cast<uint16_t>(
              pending_low_ | (uint16_t{static_cast<unsigned char>(in[0])} << 8)));
          b = 1;
        }
        for (; b + 2 <= take; b += 2) {
          seg.data[(pos_ + b) / 2] = FromBf16(
              static_cast<uint16_t>(static_cast<unsigned char>(in[b]) |
                                    (uint16_t{static_cast<unsigned char>(in[b + 1])} << 8)));
        }
        if (b < take) pending_low_ = static_cast<unsigned char>(in[b]);
      }
      in += take;
      n -= take;
      pos_ += take;
    }
  }

 private:
  std::vector<Segment> segments_;
  size_t es_;
  size_t seg_ = 0;
  size_t pos_ = 0;
  uint16_t pending_low_ = 0;
};

// Serializes a header into out[0, header_bytes) (the checksum is written by SealValue).
struct HeaderFields {
  bool is_block;
  const Hash128* fingerprint;
  SnapshotDType dtype;
  const std::vector<uint32_t>* shape_words;
  uint32_t num_layers;
  uint64_t token_position;
  uint64_t num_tokens;
  uint32_t chunk_index;
  uint32_t chunk_count;
  uint64_t chunk_offset;
  uint64_t total_bytes;
  uint64_t digest;
  uint64_t payload_bytes;
};

void WriteHeader(const HeaderFields& f, char* out) {
  std::memcpy(out, f.is_block ? kBlockMagic : kStateMagic, 4);
  PutU32(kSnapshotFormatVersion, out + 4);
  PutU64(f.fingerprint->high, out + 8);
  PutU64(f.fingerprint->low, out + 16);
  PutU32(static_cast<uint32_t>(f.dtype), out + 24);
  PutU32(f.num_layers, out + 28);
  char* p = out + kFixedPrefixBytes;
  for (uint32_t w : *f.shape_words) {
    PutU32(w, p);
    p += 4;
  }
  PutU64(f.token_position, p);
  PutU64(f.num_tokens, p + 8);
  PutU32(f.chunk_index, p + 16);
  PutU32(f.chunk_count, p + 20);
  PutU64(f.chunk_offset, p + 24);
  PutU64(f.total_bytes, p + 32);
  PutU64(f.digest, p + 40);
  PutU64(f.payload_bytes, p + 48);
}

// Writes the checksum of a value whose header (all but the checksum) and payload are in place.
void SealValue(size_t header_bytes, std::string* value) {
  const std::string_view v(*value);
  PutU64(ValueChecksum(v.substr(0, header_bytes - 8), v.substr(header_bytes)),
         value->data() + header_bytes - 8);
}

// XXH3-64 of the payload of `segments` in `dtype`.
uint64_t PayloadDigest(const std::vector<ConstSegment>& segments, SnapshotDType dtype,
                       uint64_t total_bytes) {
  Xxh3Stream64 h;
  if (dtype == SnapshotDType::kFloat32) {
    for (const ConstSegment& s : segments) h.Update(s.data, s.count * 4);
    return h.Digest();
  }
  PayloadWriter writer(segments, dtype);
  std::string buffer(size_t{64} << 10, '\0');
  for (uint64_t done = 0; done < total_bytes;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(buffer.size(), total_bytes - done));
    writer.Write(buffer.data(), n);
    h.Update(buffer.data(), n);
    done += n;
  }
  return h.Digest();
}

absl::Status CheckEncodeDType(SnapshotDType dtype) {
  if (!KnownDType(static_cast<uint32_t>(dtype))) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown snapshot dtype ", static_cast<uint32_t>(dtype)));
  }
  return absl::OkStatus();
}

// Per KDA layer: H, K, V, W of the config.
std::vector<uint32_t> StateShapeWords(const ModelConfig& config) {
  const LinearAttnConfig& la = config.linear_attn_config;
  std::vector<uint32_t> words;
  for (int l = 0; l < config.num_kda_layers(); ++l) {
    words.insert(
        words.end(),
        {static_cast<uint32_t>(la.num_heads), static_cast<uint32_t>(la.head_dim),
         static_cast<uint32_t>(la.head_dim), static_cast<uint32_t>(la.short_conv_kernel_size)});
  }
  return words;
}

// Per MLA layer: Dc, Dr of the config.
std::vector<uint32_t> BlockShapeWords(const ModelConfig& config) {
  std::vector<uint32_t> words;
  for (int l = 0; l < config.num_mla_layers(); ++l) {
    words.insert(words.end(), {static_cast<uint32_t>(config.kv_lora_rank),
                               static_cast<uint32_t>(config.qk_rope_head_dim)});
  }
  return words;
}

// INVALID_ARGUMENT unless the KDA buffers of `state` have the config's sizes.
absl::Status CheckKdaSized(const SessionState& state, const ModelConfig& config) {
  const int64_t h = config.linear_attn_config.num_heads;
  const int64_t k = config.linear_attn_config.head_dim;
  const int64_t w = config.linear_attn_config.short_conv_kernel_size;
  if (static_cast<int64_t>(state.kda().size()) != config.num_kda_layers()) {
    return absl::InvalidArgumentError(absl::StrCat("session state has ", state.kda().size(),
                                                   " KDA layers but the model has ",
                                                   config.num_kda_layers()));
  }
  for (size_t l = 0; l < state.kda().size(); ++l) {
    const KdaLayerState& s = state.kda()[l];
    if (static_cast<int64_t>(s.recurrent.size()) != h * k * k ||
        static_cast<int64_t>(s.conv.size()) != 3 * (w - 1) * h * k) {
      return absl::InvalidArgumentError(
          absl::StrCat("session state KDA layer ", l, " holds ", s.recurrent.size(),
                       " recurrent and ", s.conv.size(), " conv values but the model needs ",
                       h * k * k, " and ", 3 * (w - 1) * h * k));
    }
  }
  return absl::OkStatus();
}

// One past the last token whose rows every MLA cache of `state` holds (the caches hold rows
// [mla_first_row(), end)); INVALID_ARGUMENT when they disagree or do not fit.
absl::StatusOr<int64_t> MlaRowsEnd(const SessionState& state, const ModelConfig& config) {
  const int64_t d = config.mla_cache_dim();
  if (static_cast<int64_t>(state.mla().size()) != config.num_mla_layers()) {
    return absl::InvalidArgumentError(absl::StrCat("session state has ", state.mla().size(),
                                                   " MLA layers but the model has ",
                                                   config.num_mla_layers()));
  }
  if (d <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("model MLA cache width is ", d));
  }
  int64_t rows = 0;
  for (size_t l = 0; l < state.mla().size(); ++l) {
    const int64_t size = static_cast<int64_t>(state.mla()[l].latent.size());
    if (size % d != 0 || (l > 0 && size / d != rows)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "session state MLA layer ", l, " holds ", size, " cache values, not a whole number of ",
          d, "-wide rows equal to the other layers' ", rows));
    }
    rows = size / d;
  }
  return state.mla_first_row() + rows;
}

}  // namespace

Hash128 MlaBlockHash(const Hash128& model_fingerprint, SnapshotDType dtype,
                     const Hash128& previous_block, std::span<const int32_t> block_tokens) {
  Hasher128 h;
  h.AddU64(model_fingerprint.high)
      .AddU64(model_fingerprint.low)
      .AddU64(static_cast<uint32_t>(dtype))
      .AddU64(previous_block.high)
      .AddU64(previous_block.low)
      .Add(block_tokens.data(), block_tokens.size_bytes());  // int32 little-endian
  return h.Finish();
}

std::vector<Hash128> MlaBlockHashes(const Hash128& model_fingerprint, SnapshotDType dtype,
                                    std::span<const int32_t> tokens) {
  std::vector<Hash128> hashes;
  hashes.reserve((tokens.size() + kMlaBlockTokens - 1) / kMlaBlockTokens);
  Hash128 previous;
  for (size_t first = 0; first < tokens.size(); first += kMlaBlockTokens) {
    const size_t n = std::min<size_t>(kMlaBlockTokens, tokens.size() - first);
    previous = MlaBlockHash(model_fingerprint, dtype, previous, tokens.subspan(first, n));
    hashes.push_back(previous);
  }
  return hashes;
}

absl::StatusOr<std::vector<std::string>> EncodeStateChunks(const SessionState& state,
                                                           const ModelConfig& config,
                                                           const Hash128& model_fingerprint,
                                                           size_t max_chunk_bytes,
                                                           SnapshotDType dtype) {
  KLS_RETURN_IF_ERROR(CheckEncodeDType(dtype));
  KLS_RETURN_IF_ERROR(CheckKdaSized(state, config));
  if (state.num_tokens() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("session state has negative num_tokens ", state.num_tokens()));
  }
  const std::vector<uint32_t> shape_words = StateShapeWords(config);
  const uint32_t num_layers = static_cast<uint32_t>(config.num_kda_layers());
  const size_t header_bytes = HeaderBytes(kStateWordsPerLayer, num_layers);
  if (max_chunk_bytes < kMinChunkBytes || max_chunk_bytes <= header_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_chunk_bytes ", max_chunk_bytes, " must be at least ", kMinChunkBytes,
                     " and more than the ", header_bytes, "-byte header"));
  }
  std::vector<ConstSegment> segments;
  for (const KdaLayerState& s : state.kda()) {
    segments.push_back({s.recurrent.data(), s.recurrent.size()});
    segments.push_back({s.conv.data(), s.conv.size()});
  }
  uint64_t total = 0;
  for (const ConstSegment& s : segments) total += s.count * ElementBytes(dtype);
  const uint64_t per_chunk = max_chunk_bytes - header_bytes;
  const uint64_t count = std::max<uint64_t>(1, (total + per_chunk - 1) / per_chunk);
  if (count > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("state of ", total, " bytes needs ", count,
                                                   " chunks of ", max_chunk_bytes, " bytes"));
  }
  const uint64_t digest = PayloadDigest(segments, dtype, total);

  PayloadWriter writer(std::move(segments), dtype);
  std::vector<std::string> chunks(count);
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t offset = i * per_chunk;
    const uint64_t n = std::min(per_chunk, total - offset);
    std::string& value = chunks[i];
    value.resize(header_bytes + n);
    WriteHeader({.is_block = false,
                 .fingerprint = &model_fingerprint,
                 .dtype = dtype,
                 .shape_words = &shape_words,
                 .num_layers = num_layers,
                 .token_position = static_cast<uint64_t>(state.num_tokens()),
                 .num_tokens = 0,
                 .chunk_index = static_cast<uint32_t>(i),
                 .chunk_count = static_cast<uint32_t>(count),
                 .chunk_offset = offset,
                 .total_bytes = total,
                 .digest = digest,
                 .payload_bytes = n},
                value.data());
    writer.Write(value.data() + header_bytes, n);
    SealValue(header_bytes, &value);
  }
  return chunks;
}

absl::StatusOr<int64_t> DecodeStateChunks(std::span<const std::string> chunks,
                                          const ModelConfig& config,
                                          const Hash128& model_fingerprint, SessionState* state) {
  if (state == nullptr) return absl::InvalidArgumentError("DecodeStateChunks: null state");
  KLS_RETURN_IF_ERROR(CheckKdaSized(*state, config));
  if (chunks.empty()) return absl::DataLossError("no state chunks to decode");

  static constexpr const char* kNames[] = {"H", "K", "V", "W"};
  const std::vector<uint32_t> want_shapes = StateShapeWords(config);
  // Pass 1: every chunk intact, of this model, and one snapshot's chunks in order.
  std::vector<Header> headers;
  headers.reserve(chunks.size());
  Xxh3Stream64 digest;
  uint64_t offset = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const std::string what = absl::StrCat("state chunk at position ", i);
    KLS_ASSIGN_OR_RETURN(Header h,
                         ParseForDecode(chunks[i], /*want_block=*/false, model_fingerprint, what));
    KLS_RETURN_IF_ERROR(CheckShapes(h, want_shapes, kNames, "KDA", what));
    if (h.chunk_count != chunks.size()) {
      return absl::DataLossError(absl::StrCat(what, " belongs to a snapshot of ", h.chunk_count,
                                              " chunks but ", chunks.size(),
                                              " were given (missing or extra chunks)"));
    }
    if (h.chunk_index != i) {
      return absl::DataLossError(absl::StrCat(what, " is chunk ", h.chunk_index,
                                              " (chunks out of order, missing or duplicated)"));
    }
    if (i > 0) {
      const Header& first = headers.front();
      if (h.token_position != first.token_position || h.dtype != first.dtype ||
          h.total_bytes != first.total_bytes || h.digest != first.digest) {
        return absl::DataLossError(absl::StrFormat(
            "%s is from another snapshot than chunk 0: token position %d vs %d, dtype %d vs %d, "
            "total bytes %d vs %d, content digest 0x%016x vs 0x%016x",
            what, h.token_position, first.token_position, h.dtype, first.dtype, h.total_bytes,
            first.total_bytes, h.digest, first.digest));
      }
    }
    if (h.chunk_offset != offset || h.payload_bytes > h.total_bytes - offset) {
      return absl::DataLossError(absl::StrCat(what, " covers payload bytes [", h.chunk_offset,
                                              ", +", h.payload_bytes, ") but ", offset, " of ",
                                              h.total_bytes, " came before it"));
    }
    offset += h.payload_bytes;
    digest.Update(h.payload);
    headers.push_back(std::move(h));
  }
  const Header& first = headers.front();
  const SnapshotDType dtype = static_cast<SnapshotDType>(first.dtype);
  uint64_t want_total = 0;
  for (const KdaLayerState& s : state->kda()) {
    want_total += (s.recurrent.size() + s.conv.size()) * ElementBytes(dtype);
  }
  if (offset != first.total_bytes || offset != want_total) {
    return absl::DataLossError(absl::StrCat("state chunks hold ", offset,
                                            " payload bytes, header says ", first.total_bytes,
                                            ", the model's shapes need ", want_total));
  }
  if (digest.Digest() != first.digest) {
    return absl::DataLossError(
        absl::StrFormat("state chunks' content digest mismatch (stored 0x%016x, computed 0x%016x)",
                        first.digest, digest.Digest()));
  }

  // Pass 2: everything checked; write the state.
  std::vector<Segment> segments;
  for (KdaLayerState& s : state->kda()) {
    segments.push_back({s.recurrent.data(), s.recurrent.size()});
    segments.push_back({s.conv.data(), s.conv.size()});
  }
  PayloadReader reader(std::move(segments), dtype);
  for (const Header& h : headers) reader.Read(h.payload.data(), h.payload.size());
  return static_cast<int64_t>(first.token_position);
}

absl::StatusOr<std::string> EncodeMlaBlock(const SessionState& state, const ModelConfig& config,
                                           const Hash128& model_fingerprint, int64_t first_token,
                                           int num_tokens, SnapshotDType dtype) {
  KLS_RETURN_IF_ERROR(CheckEncodeDType(dtype));
  if (config.num_mla_layers() == 0) {
    return absl::InvalidArgumentError("the model has no MLA layers, so no MLA blocks");
  }
  KLS_ASSIGN_OR_RETURN(const int64_t rows_end, MlaRowsEnd(state, config));
  if (num_tokens < 1 || num_tokens > kMlaBlockTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("MLA block num_tokens ", num_tokens, " is not in [1, ", kMlaBlockTokens, "]"));
  }
  if (first_token < 0 || first_token % kMlaBlockTokens != 0) {
    return absl::InvalidArgumentError(absl::StrCat("MLA block first_token ", first_token,
                                                   " is not a non-negative multiple of ",
                                                   kMlaBlockTokens));
  }
  if (first_token < state.mla_first_row() || first_token + num_tokens > rows_end) {
    return absl::InvalidArgumentError(
        absl::StrCat("MLA block covers rows [", first_token, ", ", first_token + num_tokens,
                     ") but the caches hold rows [", state.mla_first_row(), ", ", rows_end, ")"));
  }
  const std::vector<uint32_t> shape_words = BlockShapeWords(config);
  const uint32_t num_layers = static_cast<uint32_t>(config.num_mla_layers());
  const size_t d = static_cast<size_t>(config.mla_cache_dim());
  std::vector<ConstSegment> segments;
  for (const MlaLayerState& s : state.mla()) {
    segments.push_back(
        {s.latent.data() + (first_token - state.mla_first_row()) * d, num_tokens * d});
  }
  const uint64_t total = uint64_t{num_layers} * num_tokens * d * ElementBytes(dtype);
  const uint64_t digest = PayloadDigest(segments, dtype, total);
  const size_t header_bytes = HeaderBytes(kBlockWordsPerLayer, num_layers);
  std::string value(header_bytes + total, '\0');
  WriteHeader({.is_block = true,
               .fingerprint = &model_fingerprint,
               .dtype = dtype,
               .shape_words = &shape_words,
               .num_layers = num_layers,
               .token_position = static_cast<uint64_t>(first_token),
               .num_tokens = static_cast<uint64_t>(num_tokens),
               .chunk_index = 0,
               .chunk_count = 1,
               .chunk_offset = 0,
               .total_bytes = total,
               .digest = digest,
               .payload_bytes = total},
              value.data());
  PayloadWriter(std::move(segments), dtype).Write(value.data() + header_bytes, total);
  SealValue(header_bytes, &value);
  return value;
}

absl::Status DecodeMlaBlock(std::string_view block, const ModelConfig& config,
                            const Hash128& model_fingerprint, SessionState* state) {
  if (state == nullptr) return absl::InvalidArgumentError("DecodeMlaBlock: null state");
  KLS_ASSIGN_OR_RETURN(const int64_t rows, MlaRowsEnd(*state, config));
  KLS_ASSIGN_OR_RETURN(const Header h,
                       ParseForDecode(block, /*want_block=*/true, model_fingerprint, "MLA block"));
  static constexpr const char* kNames[] = {"Dc", "Dr"};
  KLS_RETURN_IF_ERROR(CheckShapes(h, BlockShapeWords(config), kNames, "MLA", "MLA block"));
  const SnapshotDType dtype = static_cast<SnapshotDType>(h.dtype);
  const uint64_t d = static_cast<uint64_t>(config.mla_cache_dim());
  if (h.num_tokens < 1 || h.num_tokens > kMlaBlockTokens ||
      h.token_position % kMlaBlockTokens != 0 || h.chunk_index != 0 || h.chunk_count != 1 ||
      h.chunk_offset != 0 || h.total_bytes != h.payload_bytes ||
      h.payload_bytes != uint64_t{h.num_layers} * h.num_tokens * d * ElementBytes(dtype)) {
    return absl::DataLossError(absl::StrCat(
        "MLA block header is inconsistent: first token ", h.token_position, ", ", h.num_tokens,
        " tokens, chunk ", h.chunk_index, "/", h.chunk_count, " at ", h.chunk_offset, ", ",
        h.payload_bytes, " of ", h.total_bytes, " payload bytes"));
  }
  if (Xxh3_64(h.payload) != h.digest) {
    return absl::DataLossError("MLA block content digest mismatch");
  }
  if (h.token_position != static_cast<uint64_t>(rows)) {
    return absl::DataLossError(absl::StrCat("MLA block starts at token ", h.token_position,
                                            " but the caches hold ", rows,
                                            " rows (blocks must be applied in order)"));
  }
  // Everything is checked: from here on nothing fails.
  std::vector<Segment> segments;
  const size_t n = static_cast<size_t>(h.num_tokens * d);
  for (MlaLayerState& s : state->mla()) {
    const size_t old = s.latent.size();
    s.latent.resize(old + n);
    segments.push_back({s.latent.data() + old, n});
  }
  PayloadReader(std::move(segments), dtype).Read(h.payload.data(), h.payload.size());
  return absl::OkStatus();
}

absl::StatusOr<SnapshotValueInfo> InspectSnapshotValue(std::string_view value) {
  KLS_ASSIGN_OR_RETURN(const Header h, ParseHeader(value));
  SnapshotValueInfo info;
  info.is_block = h.is_block;
  info.format_version = h.format_version;
  info.model_fingerprint = h.fingerprint;
  info.dtype = static_cast<SnapshotDType>(h.dtype);
  info.num_layers = h.num_layers;
  info.token_position = static_cast<int64_t>(h.token_position);
  info.num_tokens = static_cast<int64_t>(h.num_tokens);
  info.chunk_index = h.chunk_index;
  info.chunk_count = h.chunk_count;
  info.payload_bytes = h.payload_bytes;
  info.layer_shapes = h.shape_words;
  info.chunk_offset = h.chunk_offset;
  info.total_payload_bytes = h.total_bytes;
  info.content_digest = h.digest;
  info.checksum_ok = h.size_ok && h.computed_checksum == h.checksum;
  return info;
}

}  // namespace kls::engine

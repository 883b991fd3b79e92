#include "engine/state/snapshot.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/hash.h"
#include "engine/model/make_model.h"
#include "tests/test_util.h"

namespace kls::engine {
namespace {

using ::testing::AllOf;
using ::testing::AnyOf;
using ::testing::HasSubstr;

constexpr Hash128 kFingerprint{0x0123456789abcdefull, 0xfedcba9876543210ull};
constexpr Hash128 kOtherFingerprint{0x1111222233334444ull, 0x5555666677778888ull};

ModelConfig TinyConfig() {
  absl::StatusOr<ModelConfig> config = PresetConfig("tiny");
  EXPECT_TRUE(config.ok()) << config.status();
  return *config;
}

// Random normals plus (with `specials`) the values a byte copy must keep: -0, a denormal,
// +-inf, a NaN payload.
void FillRandom(std::mt19937_64& rng, std::vector<float>* v, bool specials) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& x : *v) x = normal(rng);
  if (!specials) return;
  const float kSpecials[] = {
      -0.0f, std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::infinity(),
      -std::numeric_limits<float>::infinity(), std::bit_cast<float>(0x7fc01234u)};
  for (size_t i = 0; i < std::size(kSpecials) && i < v->size(); ++i) {
    (*v)[(i * 7919) % v->size()] = kSpecials[i];
  }
}

// A state of `config` with random KDA state and `num_tokens` random MLA rows.
SessionState RandomState(const ModelConfig& config, uint64_t seed, int64_t num_tokens,
                         bool specials = true) {
  std::mt19937_64 rng(seed);
  SessionState state(config);
  for (KdaLayerState& s : state.kda()) {
    FillRandom(rng, &s.recurrent, specials);
    FillRandom(rng, &s.conv, specials);
  }
  for (MlaLayerState& s : state.mla()) {
    s.latent.resize(num_tokens * config.mla_cache_dim());
    FillRandom(rng, &s.latent, specials);
  }
  state.set_num_tokens(num_tokens);
  return state;
}

std::vector<uint32_t> Bits(const std::vector<float>& v) {
  std::vector<uint32_t> bits(v.size());
  std::memcpy(bits.data(), v.data(), v.size() * 4);
  return bits;
}

void ExpectKdaBitEqual(const SessionState& actual, const SessionState& expected) {
  ASSERT_EQ(actual.kda().size(), expected.kda().size());
  for (size_t l = 0; l < actual.kda().size(); ++l) {
    EXPECT_EQ(Bits(actual.kda()[l].recurrent), Bits(expected.kda()[l].recurrent)) << "layer " << l;
    EXPECT_EQ(Bits(actual.kda()[l].conv), Bits(expected.kda()[l].conv)) << "layer " << l;
  }
}

void ExpectMlaBitEqual(const SessionState& actual, const SessionState& expected) {
  ASSERT_EQ(actual.mla().size(), expected.mla().size());
  for (size_t l = 0; l < actual.mla().size(); ++l) {
    EXPECT_EQ(Bits(actual.mla()[l].latent), Bits(expected.mla()[l].latent)) << "layer " << l;
  }
}

// Header bytes of a value (everything before the payload).
size_t HeaderSize(const std::string& value) {
  absl::StatusOr<SnapshotValueInfo> info = InspectSnapshotValue(value);
  EXPECT_TRUE(info.ok()) << info.status();
  return value.size() - info->payload_bytes;
}

uint64_t ReadU64(const std::string& v, size_t at) {
  uint64_t x = 0;
  for (int i = 0; i < 8; ++i) x |= uint64_t{static_cast<unsigned char>(v[at + i])} << (8 * i);
  return x;
}
void WriteU64(uint64_t x, size_t at, std::string* v) {
  for (int i = 0; i < 8; ++i) (*v)[at + i] = static_cast<char>(x >> (8 * i));
}
void WriteU32(uint32_t x, size_t at, std::string* v) {
  for (int i = 0; i < 4; ++i) (*v)[at + i] = static_cast<char>(x >> (8 * i));
}

// The documented checksum, computed independently: XXH3-64 of header-before-checksum + payload.
uint64_t DocumentedChecksum(const std::string& value, size_t header_bytes) {
  const std::string covered = value.substr(0, header_bytes - 8) + value.substr(header_bytes);
  return Xxh3_64(covered);
}

// Rewrites the checksum of an edited value so that only the edit itself is under test.
void Reseal(std::string* value, size_t header_bytes) {
  WriteU64(DocumentedChecksum(*value, header_bytes), header_bytes - 8, value);
}

bool IsRejection(const absl::Status& s) {
  return s.code() == absl::StatusCode::kDataLoss ||
         s.code() == absl::StatusCode::kFailedPrecondition;
}

// ---------------------------------------------------------------- state chunks

class StateRoundTripTest : public ::testing::TestWithParam<size_t> {};

TEST_P(StateRoundTripTest, BitExact) {
  const ModelConfig config = TinyConfig();
  const SessionState state = RandomState(config, /*seed=*/11, /*num_tokens=*/1234);
  const size_t max_chunk = GetParam();
  absl::StatusOr<std::vector<std::string>> chunks =
      EncodeStateChunks(state, config, kFingerprint, max_chunk);
  ASSERT_TRUE(chunks.ok()) << chunks.status();

  const size_t header = HeaderSize(chunks->front());
  uint64_t total = 0;
  for (const KdaLayerState& s : state.kda()) total += (s.recurrent.size() + s.conv.size()) * 4;
  const size_t per_chunk = max_chunk - header;
  EXPECT_EQ(chunks->size(), (total + per_chunk - 1) / per_chunk);
  for (size_t i = 0; i < chunks->size(); ++i) {
    EXPECT_LE((*chunks)[i].size(), max_chunk) << "chunk " << i;
    absl::StatusOr<SnapshotValueInfo> info = InspectSnapshotValue((*chunks)[i]);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_TRUE(info->checksum_ok);
    EXPECT_EQ(info->chunk_index, i);
    EXPECT_EQ(info->chunk_count, chunks->size());
    EXPECT_EQ(info->chunk_offset, i * per_chunk);
    EXPECT_EQ(info->total_payload_bytes, total);
  }

  // Decode into a state full of other values; MLA caches and num_tokens are not touched.
  SessionState decoded = RandomState(config, /*seed=*/99, /*num_tokens=*/3);
  const SessionState before = decoded;
  absl::StatusOr<int64_t> position = DecodeStateChunks(*chunks, config, kFingerprint, &decoded);
  ASSERT_TRUE(position.ok()) << position.status();
  EXPECT_EQ(*position, 1234);
  ExpectKdaBitEqual(decoded, state);
  ExpectMlaBitEqual(decoded, before);
  EXPECT_EQ(decoded.num_tokens(), 3);
}

// 4 KiB (the minimum), an odd size (chunks end inside a float), a size whose payload divides the
// state exactly (computed in the test below), a large one and the default (one chunk).
INSTANTIATE_TEST_SUITE_P(ChunkSizes, StateRoundTripTest,
                         ::testing::Values(size_t{4096}, size_t{4097}, size_t{65536 + 123},
                                           kMaxStateChunkBytes),
                         [](const ::testing::TestParamInfo<size_t>& info) {
                           return absl::StrCat("max", info.param);
                         });

TEST(StateChunksTest, ChunkSizeThatDividesThePayload) {
  const ModelConfig config = TinyConfig();
  const SessionState state = RandomState(config, 12, 7);
  absl::StatusOr<std::vector<std::string>> one = EncodeStateChunks(state, config, kFingerprint);
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_EQ(one->size(), 1u);
  const size_t header = HeaderSize(one->front());
  const size_t total = one->front().size() - header;
  ASSERT_EQ(total % 4, 0u);
  const size_t max_chunk = header + total / 4;
  absl::StatusOr<std::vector<std::string>> chunks =
      EncodeStateChunks(state, config, kFingerprint, max_chunk);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  ASSERT_EQ(chunks->size(), 4u);
  for (const std::string& c : *chunks) EXPECT_EQ(c.size(), max_chunk);
  SessionState decoded(config);
  absl::StatusOr<int64_t> position = DecodeStateChunks(*chunks, config, kFingerprint, &decoded);
  ASSERT_TRUE(position.ok()) << position.status();
  EXPECT_EQ(*position, 7);
  ExpectKdaBitEqual(decoded, state);
}

TEST(StateChunksTest, HeaderLayoutAndChecksumAreAsDocumented) {
  const ModelConfig config = TinyConfig();
  const SessionState state = RandomState(config, 13, 42);
  absl::StatusOr<std::vector<std::string>> chunks =
      EncodeStateChunks(state, config, kFingerprint, 4096);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  const std::string& v = (*chunks)[1];
  const size_t header = 32 + 16 * config.num_kda_layers() + 64;
  ASSERT_EQ(HeaderSize(v), header);
  EXPECT_EQ(v.substr(0, 4), "KLSS");
  EXPECT_EQ(ReadU64(v, 4) & 0xffffffffu, kSnapshotFormatVersion);
  EXPECT_EQ(ReadU64(v, 8), kFingerprint.high);
  EXPECT_EQ(ReadU64(v, 16), kFingerprint.low);
  EXPECT_EQ(ReadU64(v, 24) & 0xffffffffu, 1u);                         // fp32
  EXPECT_EQ(ReadU64(v, 24) >> 32, uint64_t(config.num_kda_layers()));  // layer count
  EXPECT_EQ(ReadU64(v, 32), (uint64_t{64} << 32) | 4);                 // H = 4, K = 64
  EXPECT_EQ(ReadU64(v, 40), (uint64_t{4} << 32) | 64);                 // V = 64, W = 4
  const size_t s = header - 64;
  EXPECT_EQ(ReadU64(v, s), 42u);                                          // token position
  EXPECT_EQ(ReadU64(v, s + 16), (uint64_t{(*chunks).size()} << 32) | 1);  // index 1, count
  EXPECT_EQ(ReadU64(v, s + 24), 4096 - header);                           // offset of chunk 1
  EXPECT_EQ(ReadU64(v, s + 48), v.size() - header);                       // payload bytes
  EXPECT_EQ(ReadU64(v, s + 56), DocumentedChecksum(v, header));
  // The payload is the layer-0 recurrent state's bytes, from where chunk 0 stopped.
  EXPECT_EQ(
      std::memcmp(v.data() + header,
                  reinterpret_cast<const char*>(state.kda()[0].recurrent.data()) + (4096 - header),
                  v.size() - header),
      0);
}

TEST(StateChunksTest, EveryByteFlipIsRejectedAndLeavesStateUnchanged) {
  const ModelConfig config = TinyConfig();
  const SessionState state = RandomState(config, 14, 77);
  absl::StatusOr<std::vector<std::string>> chunks =
      EncodeStateChunks(state, config, kFingerprint, 4096);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  SessionState scratch = RandomState(config, 15, 0);
  const SessionState before = scratch;
  int tried = 0;
  for (size_t c : {size_t{0}, chunks->size() / 2, chunks->size() - 1}) {
    const size_t size = (*chunks)[c].size();
    const size_t header = HeaderSize((*chunks)[c]);
    for (size_t pos = 0; pos < size; pos += (pos < header ? 1 : 13)) {
      std::vector<std::string> bad = *chunks;
      bad[c][pos] = static_cast<char>(bad[c][pos] ^ (1 << (pos % 8)));
      absl::StatusOr<int64_t> r = DecodeStateChunks(bad, config, kFingerprint, &scratch);
      ASSERT_FALSE(r.ok()) << "chunk " << c << " byte " << pos << " flipped was accepted";
      EXPECT_TRUE(IsRejection(r.status()))
          << "chunk " << c << " byte " << pos << ": " << r.status();
      absl::StatusOr<SnapshotValueInfo> info = InspectSnapshotValue(bad[c]);
      EXPECT_TRUE(!info.ok() || !info->checksum_ok) << "chunk " << c << " byte " << pos;
      ++tried;
    }
  }
  EXPECT_GT(tried, 3 * 192);
  ExpectKdaBitEqual(scratch, before);
}

TEST(StateChunksTest, TruncatedOrExtendedValuesAreDataLoss) {
  const ModelConfig config = TinyConfig();
  const SessionState state = RandomState(config, 16, 5);
  absl::StatusOr<std::vector<std::string>> chunks =
      EncodeStateChunks(state, config, kFingerprint, 4096);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  SessionState scratch(config);
  for (size_t c : {size_t{0}, chunks->size() - 1}) {
    const size_t header = HeaderSize((*chunks)[c]);
    for (size_t len = 0; len < (*chunks)[c].size(); len += (len < header + 8 ? 1 : 97)) {
      std::vector<std::string> bad = *chunks;
      bad[c].resize(len);
      absl::StatusOr<int64_t> r = DecodeStateChunks(bad, config, kFingerprint, &scratch);
      EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << "length " << len;
    }
    std::vector<std::string> longer = *chunks;
    longer[c] += '\0';
    EXPECT_EQ(DecodeStateChunks(longer, config, kFingerprint, &scratch).status().code(),
              absl::StatusCode::kDataLoss);
  }
}

TEST(StateChunksTest, WrongFingerprintIsFailedPreconditionNamingBoth) {
  const ModelConfig config = TinyConfig();
  absl::StatusOr<std::vector<std::string>> chunks =
      EncodeStateChunks(RandomState(config, 17, 5), config, kFingerprint, 4096);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  SessionState scratch(config);
  absl::StatusOr<int64_t> r = DecodeStateChunks(*chunks, config, kOtherFingerprint, &scratch);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(),
              AllOf(HasSubstr(kFingerprint.ToHex()), HasSubstr(kOtherFingerprint.ToHex())));
}

TEST(StateChunksTest, UnknownFormatVersionIsFailedPreconditionNamingBoth) {
  const ModelConfig config = TinyConfig();
  absl::StatusOr<std::vector<std::string>> chunks =
      EncodeStateChunks(RandomState(config, 18, 5), config, kFingerprint);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  std::vector<std::string> v2 = *chunks;
  WriteU32(2, 4, &v2[0]);
  Reseal(&v2[0], HeaderSize((*chunks)[0]));
  SessionState scratch(config);
  absl::StatusOr<int64_t> r = DecodeStateChunks(v2, config, kFingerprint, &scratch);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(),
              AllOf(HasSubstr("format_version 2"), HasSubstr("format_version 1")));
  EXPECT_EQ(InspectSnapshotValue(v2[0]).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(StateChunksTest, UnknownDTypeIsFailedPrecondition) {
  const ModelConfig config = TinyConfig();
  absl::StatusOr<std::vector<std::string>> chunks =
      EncodeStateChunks(RandomState(config, 19, 5), config, kFingerprint);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  std::vector<std::string> bad = *chunks;
  WriteU32(7, 24, &bad[0]);
  Reseal(&bad[0], HeaderSize((*chunks)[0]));
  SessionState scratch(config);
  absl::StatusOr<int64_t> r = DecodeStateChunks(bad, config, kFingerprint, &scratch);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("dtype 7"));
}

TEST(StateChunksTest, OrderMissingDuplicateAndForeignChunksAreDataLoss) {
  const ModelConfig config = TinyConfig();
  const SessionState a = RandomState(config, 20, 500);
  const SessionState b = RandomState(config, 21, 500);  // same position, other content
  SessionState a_later = a;
  a_later.set_num_tokens(501);  // same content, other position
  auto encode = [&](const SessionState& s, size_t max_chunk) {
    absl::StatusOr<std::vector<std::string>> c =
        EncodeStateChunks(s, config, kFingerprint, max_chunk);
    EXPECT_TRUE(c.ok()) << c.status();
    return *c;
  };
  const std::vector<std::string> ca = encode(a, 4096);
  const std::vector<std::string> cb = encode(b, 4096);
  const std::vector<std::string> ca_later = encode(a_later, 4096);
  const std::vector<std::string> ca_big = encode(a, 8192);
  ASSERT_GT(ca.size(), 3u);
  ASSERT_EQ(ca.size(), cb.size());

  auto expect_data_loss = [&](std::vector<std::string> chunks, const char* what) {
    SessionState scratch(config);
    absl::StatusOr<int64_t> r = DecodeStateChunks(chunks, config, kFingerprint, &scratch);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << what << ": " << r.status();
  };
  std::vector<std::string> v = ca;
  std::swap(v[1], v[2]);
  expect_data_loss(v, "swapped");
  v = ca;
  v.erase(v.begin() + 1);
  expect_data_loss(v, "middle missing");
  v = ca;
  v.pop_back();
  expect_data_loss(v, "last missing");
  v = ca;
  v[2] = v[1];
  expect_data_loss(v, "duplicated in place of another");
  v = ca;
  v.push_back(ca.back());
  expect_data_loss(v, "duplicated extra");
  v = ca;
  v[0] = cb[0];
  expect_data_loss(v, "first chunk of another snapshot at the same position");
  v = ca;
  v.back() = cb.back();
  expect_data_loss(v, "last chunk of another snapshot at the same position");
  v = ca;
  v[1] = ca_later[1];
  expect_data_loss(v, "chunk of the same content at another position");
  v = ca;
  v[0] = ca_big[0];
  expect_data_loss(v, "chunk of another chunking");
  expect_data_loss({}, "no chunks");
}

TEST(StateChunksTest, ShapesThatDifferFromTheConfigAreFailedPrecondition) {
  const ModelConfig config = TinyConfig();
  absl::StatusOr<std::vector<std::string>> chunks =
      EncodeStateChunks(RandomState(config, 22, 5), config, kFingerprint, 4096);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  struct Case {
    const char* name;
    void (*edit)(ModelConfig*);
    const char* message;
  };
  const Case cases[] = {
      {"heads", [](ModelConfig* c) { c->linear_attn_config.num_heads = 2; }, "H = 4"},
      {"head_dim", [](ModelConfig* c) { c->linear_attn_config.head_dim = 32; }, "K = 64"},
      {"conv", [](ModelConfig* c) { c->linear_attn_config.short_conv_kernel_size = 3; }, "W = 4"},
      {"layers",
       [](ModelConfig* c) {
         c->linear_attn_config.full_attn_layers.push_back(c->linear_attn_config.kda_layers.back());
         c->linear_attn_config.kda_layers.pop_back();
       },
       "KDA layers"},
  };
  for (const Case& k : cases) {
    ModelConfig other = config;
    k.edit(&other);
    SessionState scratch(other);
    absl::StatusOr<int64_t> r = DecodeStateChunks(*chunks, other, kFingerprint, &scratch);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition)
        << k.name << ": " << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr(k.message)) << k.name;
  }
}

TEST(StateChunksTest, BadArguments) {
  const ModelConfig config = TinyConfig();
  const SessionState state = RandomState(config, 23, 5);
  EXPECT_EQ(EncodeStateChunks(state, config, kFingerprint, 4095).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodeStateChunks(state, config, kFingerprint, 4096, static_cast<SnapshotDType>(9))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  ModelConfig other = config;
  other.linear_attn_config.head_dim = 32;
  EXPECT_EQ(EncodeStateChunks(state, other, kFingerprint).status().code(),
            absl::StatusCode::kInvalidArgument);

  absl::StatusOr<std::vector<std::string>> chunks = EncodeStateChunks(state, config, kFingerprint);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  SessionState unsized;
  EXPECT_EQ(DecodeStateChunks(*chunks, config, kFingerprint, &unsized).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeStateChunks(*chunks, config, kFingerprint, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A block is not a state chunk, and the other way round.
  absl::StatusOr<std::string> block = EncodeMlaBlock(state, config, kFingerprint, 0, 5);
  ASSERT_TRUE(block.ok()) << block.status();
  SessionState scratch(config);
  EXPECT_EQ(DecodeStateChunks(std::vector<std::string>{*block}, config, kFingerprint, &scratch)
                .status()
                .code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(DecodeMlaBlock((*chunks)[0], config, kFingerprint, &scratch).code(),
            absl::StatusCode::kDataLoss);
}

TEST(StateChunksTest, ModelWithoutKdaLayersGivesOneEmptyChunk) {
  ModelConfig config = TinyConfig();
  for (int layer : config.linear_attn_config.kda_layers) {
    config.linear_attn_config.full_attn_layers.push_back(layer);
  }
  config.linear_attn_config.kda_layers.clear();
  ASSERT_EQ(config.num_kda_layers(), 0);
  SessionState state(config);
  state.set_num_tokens(9);
  absl::StatusOr<std::vector<std::string>> chunks = EncodeStateChunks(state, config, kFingerprint);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  ASSERT_EQ(chunks->size(), 1u);
  EXPECT_EQ(InspectSnapshotValue(chunks->front())->payload_bytes, 0u);
  SessionState decoded(config);
  absl::StatusOr<int64_t> position = DecodeStateChunks(*chunks, config, kFingerprint, &decoded);
  ASSERT_TRUE(position.ok()) << position.status();
  EXPECT_EQ(*position, 9);
}

// ---------------------------------------------------------------- MLA blocks

class MlaBlockRoundTripTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(MlaBlockRoundTripTest, BitExactIncludingPartialLastBlock) {
  const ModelConfig config = TinyConfig();
  const int64_t tokens = GetParam();
  const SessionState state = RandomState(config, 30, tokens);
  SessionState decoded(config);
  int blocks = 0;
  for (int64_t first = 0; first < tokens; first += kMlaBlockTokens) {
    const int n = static_cast<int>(std::min<int64_t>(kMlaBlockTokens, tokens - first));
    absl::StatusOr<std::string> block = EncodeMlaBlock(state, config, kFingerprint, first, n);
    ASSERT_TRUE(block.ok()) << block.status();
    absl::StatusOr<SnapshotValueInfo> info = InspectSnapshotValue(*block);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_TRUE(info->is_block);
    EXPECT_TRUE(info->checksum_ok);
    EXPECT_EQ(info->token_position, first);
    EXPECT_EQ(info->num_tokens, n);
    EXPECT_EQ(info->num_layers, uint32_t(config.num_mla_layers()));
    EXPECT_EQ(info->payload_bytes,
              uint64_t(config.num_mla_layers()) * n * config.mla_cache_dim() * 4);
    ASSERT_TRUE(DecodeMlaBlock(*block, config, kFingerprint, &decoded).ok());
    ++blocks;
  }
  EXPECT_EQ(blocks, (tokens + kMlaBlockTokens - 1) / kMlaBlockTokens);
  EXPECT_EQ(decoded.num_tokens(), 0);  // untouched
  ExpectMlaBitEqual(decoded, state);
  decoded.set_num_tokens(tokens);
  EXPECT_TRUE(decoded.MatchesConfig(config));
}

INSTANTIATE_TEST_SUITE_P(Tokens, MlaBlockRoundTripTest,
                         ::testing::Values(int64_t{1}, int64_t{255}, int64_t{256}, int64_t{257},
                                           int64_t{600}),
                         [](const ::testing::TestParamInfo<int64_t>& info) {
                           return absl::StrCat("T", info.param);
                         });

// A state that holds only the rows from some token on (what a backend exports for an
// incremental snapshot) encodes the same blocks as the whole state, and refuses the rows it
// does not hold.
TEST(MlaBlockTest, StateHoldingLaterRowsOnlyEncodesTheSameBlocks) {
  const ModelConfig config = TinyConfig();
  const SessionState full = RandomState(config, 31, 600);
  SessionState tail = full;
  const size_t skip = size_t{512} * config.mla_cache_dim();
  for (MlaLayerState& s : tail.mla()) s.latent.erase(s.latent.begin(), s.latent.begin() + skip);
  tail.set_mla_first_row(512);
  EXPECT_TRUE(tail.MatchesConfig(config));
  absl::StatusOr<std::string> from_full = EncodeMlaBlock(full, config, kFingerprint, 512, 88);
  absl::StatusOr<std::string> from_tail = EncodeMlaBlock(tail, config, kFingerprint, 512, 88);
  ASSERT_TRUE(from_full.ok()) << from_full.status();
  ASSERT_TRUE(from_tail.ok()) << from_tail.status();
  EXPECT_EQ(*from_full, *from_tail);
  absl::StatusOr<std::string> missing = EncodeMlaBlock(tail, config, kFingerprint, 256, 256);
  EXPECT_TRUE(absl::IsInvalidArgument(missing.status())) << missing.status();
  EXPECT_NE(missing.status().message().find("[512, 600)"), std::string_view::npos)
      << missing.status();
  // The KDA chunks do not depend on which MLA rows are held.
  absl::StatusOr<std::vector<std::string>> chunks_full =
      EncodeStateChunks(full, config, kFingerprint);
  absl::StatusOr<std::vector<std::string>> chunks_tail =
      EncodeStateChunks(tail, config, kFingerprint);
  ASSERT_TRUE(chunks_full.ok() && chunks_tail.ok());
  EXPECT_EQ(*chunks_full, *chunks_tail);
}

TEST(MlaBlockTest, OutOfOrderBlockIsRejectedAndLeavesStateUnchanged) {
  const ModelConfig config = TinyConfig();
  const SessionState state = RandomState(config, 31, 600);
  absl::StatusOr<std::string> b0 = EncodeMlaBlock(state, config, kFingerprint, 0, 256);
  absl::StatusOr<std::string> b1 = EncodeMlaBlock(state, config, kFingerprint, 256, 256);
  ASSERT_TRUE(b0.ok() && b1.ok());

  SessionState decoded(config);
  absl::Status s = DecodeMlaBlock(*b1, config, kFingerprint, &decoded);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(s.message(), AllOf(HasSubstr("256"), HasSubstr("0 rows")));
  for (const MlaLayerState& l : decoded.mla()) EXPECT_TRUE(l.latent.empty());

  ASSERT_TRUE(DecodeMlaBlock(*b0, config, kFingerprint, &decoded).ok());
  const SessionState after_first = decoded;
  EXPECT_EQ(DecodeMlaBlock(*b0, config, kFingerprint, &decoded).code(),
            absl::StatusCode::kDataLoss);  // the same block again
  ExpectMlaBitEqual(decoded, after_first);
  ASSERT_TRUE(DecodeMlaBlock(*b1, config, kFingerprint, &decoded).ok());
}

TEST(MlaBlockTest, EveryBitFlipIsRejectedAndLeavesStateUnchanged) {
  const ModelConfig config = TinyConfig();
  const SessionState state = RandomState(config, 32, 1);
  absl::StatusOr<std::string> block = EncodeMlaBlock(state, config, kFingerprint, 0, 1);
  ASSERT_TRUE(block.ok()) << block.status();
  SessionState decoded(config);
  for (size_t pos = 0; pos < block->size(); ++pos) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = *block;
      bad[pos] = static_cast<char>(bad[pos] ^ (1 << bit));
      absl::Status s = DecodeMlaBlock(bad, config, kFingerprint, &decoded);
      ASSERT_TRUE(IsRejection(s)) << "byte " << pos << " bit " << bit << ": " << s;
    }
  }
  for (const MlaLayerState& l : decoded.mla()) EXPECT_TRUE(l.latent.empty());
  for (size_t len = 0; len < block->size(); ++len) {
    EXPECT_EQ(DecodeMlaBlock(block->substr(0, len), config, kFingerprint, &decoded).code(),
              absl::StatusCode::kDataLoss)
        << "length " << len;
  }
  for (const MlaLayerState& l : decoded.mla()) EXPECT_TRUE(l.latent.empty());
}

TEST(MlaBlockTest, ModelMismatchIsFailedPrecondition) {
  const ModelConfig config = TinyConfig();
  const SessionState state = RandomState(config, 33, 10);
  absl::StatusOr<std::string> block = EncodeMlaBlock(state, config, kFingerprint, 0, 10);
  ASSERT_TRUE(block.ok()) << block.status();
  SessionState decoded(config);
  absl::Status s = DecodeMlaBlock(*block, config, kOtherFingerprint, &decoded);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr(kFingerprint.ToHex()), HasSubstr(kOtherFingerprint.ToHex())));

  ModelConfig other = config;
  other.kv_lora_rank = 32;
  SessionState other_state(other);
  s = DecodeMlaBlock(*block, other, kFingerprint, &other_state);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("Dc = 64"));
  for (const MlaLayerState& l : other_state.mla()) EXPECT_TRUE(l.latent.empty());
}

TEST(MlaBlockTest, BadArguments) {
  const ModelConfig config = TinyConfig();
  const SessionState state = RandomState(config, 34, 300);
  auto code = [&](int64_t first, int n) {
    return EncodeMlaBlock(state, config, kFingerprint, first, n).status().code();
  };
  EXPECT_EQ(code(0, 0), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(0, 257), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(1, 10), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(-256, 10), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(256, 45), absl::StatusCode::kInvalidArgument);  // rows 256..300 only
  EXPECT_EQ(code(256, 44), absl::StatusCode::kOk);
  EXPECT_EQ(EncodeMlaBlock(state, config, kFingerprint, 0, 1, static_cast<SnapshotDType>(0))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  SessionState ragged = state;
  ragged.mla()[1].latent.resize(10 * config.mla_cache_dim());
  EXPECT_EQ(EncodeMlaBlock(ragged, config, kFingerprint, 0, 10).status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::string> block = EncodeMlaBlock(state, config, kFingerprint, 0, 10);
  ASSERT_TRUE(block.ok());
  EXPECT_EQ(DecodeMlaBlock(*block, config, kFingerprint, &ragged).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeMlaBlock(*block, config, kFingerprint, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------- bf16 payloads

// Rewrites an fp32 value as the same value in bf16 with the payload `bf16` (hand-built, so the
// reader is checked independently of the encoder's rounding).
std::string AsBf16Value(const std::string& fp32_value, const std::vector<uint16_t>& bf16) {
  const size_t header = HeaderSize(fp32_value);
  std::string v = fp32_value.substr(0, header);
  for (uint16_t x : bf16) {
    v.push_back(static_cast<char>(x & 0xff));
    v.push_back(static_cast<char>(x >> 8));
  }
  const size_t s = header - 64;
  const uint64_t bytes = bf16.size() * 2;
  WriteU32(2, 24, &v);  // dtype bf16
  WriteU64(bytes, s + 32, &v);
  WriteU64(Xxh3_64(std::string_view(v).substr(header)), s + 40, &v);
  WriteU64(bytes, s + 48, &v);
  Reseal(&v, header);
  return v;
}

// Values exactly representable in bf16 (low 16 bits zero), so the conversion is exact.
void FillBf16Exact(std::mt19937_64& rng, std::vector<float>* v) {
  for (float& x : *v) {
    uint32_t hi = static_cast<uint32_t>(rng()) & 0xffffu;
    if ((hi & 0x7f80u) == 0x7f80u) hi &= 0xbfffu;  // keep it finite
    x = std::bit_cast<float>(hi << 16);
  }
}

std::vector<uint16_t> HighHalves(const std::vector<float>& v) {
  std::vector<uint16_t> out;
  for (float x : v) out.push_back(static_cast<uint16_t>(std::bit_cast<uint32_t>(x) >> 16));
  return out;
}

TEST(Bf16Test, HandBuiltBf16BlockDecodesToFp32) {
  const ModelConfig config = TinyConfig();
  std::mt19937_64 rng(40);
  SessionState state = RandomState(config, 40, 100);
  for (MlaLayerState& l : state.mla()) FillBf16Exact(rng, &l.latent);
  absl::StatusOr<std::string> fp32 = EncodeMlaBlock(state, config, kFingerprint, 0, 100);
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  std::vector<uint16_t> payload;
  for (const MlaLayerState& l : state.mla()) {
    const std::vector<uint16_t> h = HighHalves(l.latent);
    payload.insert(payload.end(), h.begin(), h.end());
  }
  const std::string bf16 = AsBf16Value(*fp32, payload);
  EXPECT_EQ(InspectSnapshotValue(bf16)->dtype, SnapshotDType::kBFloat16);
  SessionState decoded(config);
  absl::Status s = DecodeMlaBlock(bf16, config, kFingerprint, &decoded);
  ASSERT_TRUE(s.ok()) << s;
  ExpectMlaBitEqual(decoded, state);
}

TEST(Bf16Test, HandBuiltBf16StateDecodesToFp32) {
  const ModelConfig config = TinyConfig();
  std::mt19937_64 rng(41);
  SessionState state(config);
  state.set_num_tokens(17);
  std::vector<uint16_t> payload;
  for (KdaLayerState& l : state.kda()) {
    FillBf16Exact(rng, &l.recurrent);
    FillBf16Exact(rng, &l.conv);
    for (const std::vector<float>* v : {&l.recurrent, &l.conv}) {
      const std::vector<uint16_t> h = HighHalves(*v);
      payload.insert(payload.end(), h.begin(), h.end());
    }
  }
  absl::StatusOr<std::vector<std::string>> fp32 = EncodeStateChunks(state, config, kFingerprint);
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  ASSERT_EQ(fp32->size(), 1u);
  const std::vector<std::string> bf16 = {AsBf16Value(fp32->front(), payload)};
  SessionState decoded(config);
  absl::StatusOr<int64_t> position = DecodeStateChunks(bf16, config, kFingerprint, &decoded);
  ASSERT_TRUE(position.ok()) << position.status();
  EXPECT_EQ(*position, 17);
  ExpectKdaBitEqual(decoded, state);
}

TEST(Bf16Test, EncoderOptionRoundsToNearestEvenAndDecodes) {
  const ModelConfig config = TinyConfig();
  SessionState state = RandomState(config, 42, 3, /*specials=*/false);
  std::vector<float>& r = state.kda()[0].recurrent;
  const float one = 1.0f;
  r[0] = one + std::ldexp(1.0f, -8);                          // tie -> even (1)
  r[1] = one + 3 * std::ldexp(1.0f, -8);                      // tie -> even (1 + 2^-6)
  r[2] = one + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20);  // above the tie -> up
  r[3] = std::numeric_limits<float>::infinity();
  r[4] = std::numeric_limits<float>::quiet_NaN();
  r[5] = -0.0f;
  const SessionState original = state;
  // 4097-byte chunks: odd payload sizes, so chunk boundaries split bf16 values.
  absl::StatusOr<std::vector<std::string>> chunks =
      EncodeStateChunks(state, config, kFingerprint, 4097, SnapshotDType::kBFloat16);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  ASSERT_GT(chunks->size(), 50u);
  for (const std::string& c : *chunks) {
    EXPECT_LE(c.size(), 4097u);
    EXPECT_EQ(InspectSnapshotValue(c)->dtype, SnapshotDType::kBFloat16);
  }
  SessionState decoded(config);
  absl::StatusOr<int64_t> position = DecodeStateChunks(*chunks, config, kFingerprint, &decoded);
  ASSERT_TRUE(position.ok()) << position.status();
  EXPECT_EQ(*position, 3);
  const std::vector<float>& d = decoded.kda()[0].recurrent;
  EXPECT_EQ(d[0], 1.0f);
  EXPECT_EQ(d[1], one + std::ldexp(1.0f, -6));
  EXPECT_EQ(d[2], one + std::ldexp(1.0f, -7));
  EXPECT_EQ(d[3], std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(d[4]));
  EXPECT_TRUE(std::signbit(d[5]));
  const std::vector<float> want0(original.kda()[0].recurrent.begin() + 6,
                                 original.kda()[0].recurrent.end());
  const std::vector<float> got0(d.begin() + 6, d.end());
  const testing::Tolerance tol = testing::kBf16StateTolerance;
  EXPECT_TRUE(testing::AllClose(got0, want0, tol.atol, tol.rtol));
  for (size_t l = 0; l < decoded.kda().size(); ++l) {
    if (l > 0) {
      EXPECT_TRUE(testing::AllClose(decoded.kda()[l].recurrent, original.kda()[l].recurrent,
                                    tol.atol, tol.rtol))
          << "layer " << l;
    }
    EXPECT_TRUE(
        testing::AllClose(decoded.kda()[l].conv, original.kda()[l].conv, tol.atol, tol.rtol))
        << "layer " << l;
  }

  // An MLA block through the same option.
  absl::StatusOr<std::string> block =
      EncodeMlaBlock(state, config, kFingerprint, 0, 3, SnapshotDType::kBFloat16);
  ASSERT_TRUE(block.ok()) << block.status();
  SessionState block_decoded(config);
  ASSERT_TRUE(DecodeMlaBlock(*block, config, kFingerprint, &block_decoded).ok());
  for (size_t l = 0; l < block_decoded.mla().size(); ++l) {
    EXPECT_TRUE(testing::AllClose(block_decoded.mla()[l].latent, original.mla()[l].latent, tol.atol,
                                  tol.rtol))
        << "layer " << l;
  }
}

// ---------------------------------------------------------------- block hashes

std::vector<int32_t> RandomTokens(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % 163840);
  return t;
}

TEST(MlaBlockHashTest, IsTheDocumentedHasher128Fields) {
  const std::vector<int32_t> tokens = RandomTokens(50, 256);
  const Hash128 previous{7, 9};
  Hasher128 h;
  h.AddU64(kFingerprint.high).AddU64(kFingerprint.low).AddU64(1).AddU64(7).AddU64(9);
  h.Add(tokens.data(), tokens.size() * sizeof(int32_t));
  EXPECT_EQ(MlaBlockHash(kFingerprint, SnapshotDType::kFloat32, previous, tokens), h.Finish());
}

TEST(MlaBlockHashTest, ChainsBlocksAndCoversAPartialLastBlock) {
  const std::vector<int32_t> tokens = RandomTokens(51, 600);
  const std::span<const int32_t> t(tokens);
  const std::vector<Hash128> hashes = MlaBlockHashes(kFingerprint, SnapshotDType::kFloat32, t);
  ASSERT_EQ(hashes.size(), 3u);
  const Hash128 h0 =
      MlaBlockHash(kFingerprint, SnapshotDType::kFloat32, Hash128{}, t.subspan(0, 256));
  const Hash128 h1 = MlaBlockHash(kFingerprint, SnapshotDType::kFloat32, h0, t.subspan(256, 256));
  const Hash128 h2 = MlaBlockHash(kFingerprint, SnapshotDType::kFloat32, h1, t.subspan(512, 88));
  EXPECT_EQ(hashes[0], h0);
  EXPECT_EQ(hashes[1], h1);
  EXPECT_EQ(hashes[2], h2);
  EXPECT_TRUE(MlaBlockHashes(kFingerprint, SnapshotDType::kFloat32, {}).empty());
  EXPECT_EQ(MlaBlockHashes(kFingerprint, SnapshotDType::kFloat32, t.first(256)).size(), 1u);
  EXPECT_EQ(MlaBlockHashes(kFingerprint, SnapshotDType::kFloat32, t.first(257)).size(), 2u);
  // A partial block differs from the full block it grows into.
  EXPECT_FALSE(MlaBlockHashes(kFingerprint, SnapshotDType::kFloat32, t.first(300))[1] ==
               MlaBlockHashes(kFingerprint, SnapshotDType::kFloat32, t.first(301))[1]);
}

TEST(MlaBlockHashTest, EqualPrefixesShareHashesAndAChangeReachesOnlyLaterBlocks) {
  const std::vector<int32_t> a = RandomTokens(52, 1000);
  const std::vector<Hash128> ha = MlaBlockHashes(kFingerprint, SnapshotDType::kFloat32, a);
  ASSERT_EQ(ha.size(), 4u);
  // Same prefix, different tail: the shared whole blocks keep their hashes.
  std::vector<int32_t> b(a.begin(), a.begin() + 700);
  b.push_back(5);
  const std::vector<Hash128> hb = MlaBlockHashes(kFingerprint, SnapshotDType::kFloat32, b);
  EXPECT_EQ(hb[0], ha[0]);
  EXPECT_EQ(hb[1], ha[1]);
  for (size_t pos : {size_t{0}, size_t{255}, size_t{256}, size_t{300}, size_t{511}, size_t{512},
                     size_t{767}, size_t{768}, size_t{999}}) {
    std::vector<int32_t> c = a;
    c[pos] ^= 1;
    const std::vector<Hash128> hc = MlaBlockHashes(kFingerprint, SnapshotDType::kFloat32, c);
    const size_t changed = pos / kMlaBlockTokens;
    for (size_t i = 0; i < ha.size(); ++i) {
      if (i < changed) {
        EXPECT_EQ(hc[i], ha[i]) << "token " << pos << " block " << i;
      } else {
        EXPECT_FALSE(hc[i] == ha[i]) << "token " << pos << " block " << i;
      }
    }
  }
  // Fingerprint and dtype are part of every hash.
  const std::vector<Hash128> hf = MlaBlockHashes(kOtherFingerprint, SnapshotDType::kFloat32, a);
  const std::vector<Hash128> hd = MlaBlockHashes(kFingerprint, SnapshotDType::kBFloat16, a);
  for (size_t i = 0; i < ha.size(); ++i) {
    EXPECT_FALSE(hf[i] == ha[i]);
    EXPECT_FALSE(hd[i] == ha[i]);
  }
}

// ---------------------------------------------------------------- inspect

TEST(InspectTest, ReportsHeaderFieldsAndDamage) {
  const ModelConfig config = TinyConfig();
  const SessionState state = RandomState(config, 60, 300);
  absl::StatusOr<std::vector<std::string>> chunks =
      EncodeStateChunks(state, config, kFingerprint, 8192);
  ASSERT_TRUE(chunks.ok()) << chunks.status();
  absl::StatusOr<SnapshotValueInfo> info = InspectSnapshotValue((*chunks)[2]);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->is_block);
  EXPECT_EQ(info->format_version, kSnapshotFormatVersion);
  EXPECT_EQ(info->model_fingerprint, kFingerprint);
  EXPECT_EQ(info->dtype, SnapshotDType::kFloat32);
  EXPECT_EQ(info->num_layers, uint32_t(config.num_kda_layers()));
  EXPECT_EQ(info->layer_shapes.size(), 4u * config.num_kda_layers());
  EXPECT_EQ(info->token_position, 300);
  EXPECT_EQ(info->chunk_index, 2u);
  EXPECT_EQ(info->chunk_count, chunks->size());
  EXPECT_TRUE(info->checksum_ok);

  absl::StatusOr<std::string> block = EncodeMlaBlock(state, config, kFingerprint, 256, 44);
  ASSERT_TRUE(block.ok()) << block.status();
  info = InspectSnapshotValue(*block);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->is_block);
  EXPECT_EQ(info->token_position, 256);
  EXPECT_EQ(info->num_tokens, 44);
  EXPECT_EQ(info->layer_shapes, (std::vector<uint32_t>{64, 16, 64, 16}));
  EXPECT_TRUE(info->checksum_ok);

  std::string damaged = *block;
  damaged.back() ^= 1;
  info = InspectSnapshotValue(damaged);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->checksum_ok);
  info = InspectSnapshotValue(block->substr(0, block->size() - 1));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->checksum_ok);

  EXPECT_EQ(InspectSnapshotValue("").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(InspectSnapshotValue(std::string_view("KLSX\1\0\0\0", 8)).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(InspectSnapshotValue(block->substr(0, 40)).status().code(),
            absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace kls::engine

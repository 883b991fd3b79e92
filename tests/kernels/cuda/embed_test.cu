// The row-gather launchers (kernels/embed/embed.cu) against embed_ref.h. Gathers copy bf16 bits,
// so results must be bit-identical. Covers the vectorized (dim % 8 == 0, 16-byte aligned rows)
// and scalar paths, edge ids 0 and V−1, out-of-range ids (zero row + sticky device flag), strided
// sources and destinations (padding must stay untouched), last-row indices for varlen
// cu_seqlens with empty sequences, the whole lm_head row selection, zero counts and bad
// arguments. Outputs are poisoned (0xFFFF) first. Fixed seeds.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <climits>
#include <cstdint>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kernels/embed/embed.h"
#include "kernels/embed/embed_ref.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace kls::kernels {
namespace {

using ::kls::testing::CudaParamTest;
using ::kls::testing::CudaTest;
using ::kls::testing::DeviceBuffer;
using ::kls::testing::Download;
using ::kls::testing::Poison;
using ::kls::testing::Upload;

constexpr uint16_t kPoisonBits = 0xFFFF;

// Random bf16 bit patterns of finite values (sign, exponent 1..254, any mantissa).
std::vector<uint16_t> RandomBf16Bits(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint16_t> r(n);
  for (uint16_t& b : r) {
    const uint64_t v = rng();
    const uint16_t exponent = static_cast<uint16_t>(1 + v % 254);
    b = static_cast<uint16_t>(((v >> 8) & 0x8000u) | (exponent << 7) | ((v >> 20) & 0x7Fu));
  }
  return r;
}

std::vector<__nv_bfloat16> AsBf16(const std::vector<uint16_t>& bits) {
  std::vector<__nv_bfloat16> r(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) {
    __nv_bfloat16_raw raw;
    raw.x = bits[i];
    r[i] = __nv_bfloat16(raw);
  }
  return r;
}

std::vector<uint16_t> DownloadBits(const DeviceBuffer<__nv_bfloat16>& d) {
  std::vector<__nv_bfloat16> h;
  EXPECT_CUDA_OK(Download(d, h));
  std::vector<uint16_t> bits(h.size());
  for (size_t i = 0; i < h.size(); ++i) bits[i] = __nv_bfloat16_raw(h[i]).x;
  return bits;
}

int32_t DownloadFlag(const DeviceBuffer<int32_t>& flag) {
  std::vector<int32_t> h;
  EXPECT_CUDA_OK(Download(flag, h));
  return h.empty() ? -999 : h[0];
}

// Bit equality with the index and both values of the first difference.
::testing::AssertionResult SameBits(const std::vector<uint16_t>& actual,
                                    const std::vector<uint16_t>& expected, int64_t row_length) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure() << "size " << actual.size() << " != " << expected.size();
  }
  int64_t mismatches = 0, first = -1;
  for (size_t i = 0; i < actual.size(); ++i) {
    if (actual[i] != expected[i] && mismatches++ == 0) first = static_cast<int64_t>(i);
  }
  if (mismatches == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << mismatches << " mismatching elements; first at " << first << " (row "
         << first / row_length << ", column " << first % row_length << "): got 0x" << std::hex
         << actual[first] << ", expected 0x" << expected[first];
}

DeviceBuffer<int32_t> ZeroFlag() {
  DeviceBuffer<int32_t> flag;
  EXPECT_CUDA_OK(Upload(std::vector<int32_t>{0}, flag));
  return flag;
}

struct EmbedCase {
  int64_t vocab;
  int dim;
  int64_t tokens;
};

std::ostream& operator<<(std::ostream& os, const EmbedCase& c) {
  return os << "V" << c.vocab << " D" << c.dim << " T" << c.tokens;
}

class EmbeddingGatherTest : public CudaParamTest<EmbedCase> {};

TEST_P(EmbeddingGatherTest, MatchesReferenceBitForBit) {
  const auto [vocab, dim, tokens] = GetParam();
  const std::vector<uint16_t> table = RandomBf16Bits(vocab * dim, 1);
  std::mt19937_64 rng(2);
  std::vector<int32_t> ids(tokens);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % vocab);
  ids[0] = 0;  // edge ids
  ids[tokens - 1] = static_cast<int32_t>(vocab - 1);
  DeviceBuffer<__nv_bfloat16> d_table, d_out;
  DeviceBuffer<int32_t> d_ids;
  ASSERT_CUDA_OK(Upload(AsBf16(table), d_table));
  ASSERT_CUDA_OK(Upload(ids, d_ids));
  ASSERT_CUDA_OK(d_out.Allocate(tokens * dim));
  ASSERT_CUDA_OK(Poison(d_out));
  DeviceBuffer<int32_t> flag = ZeroFlag();
  ASSERT_CUDA_OK(LaunchEmbeddingGather(d_table.get(), vocab, dim, d_ids.get(), tokens, d_out.get(),
                                       flag.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<uint16_t> expected(tokens * dim);
  ASSERT_TRUE(
      EmbeddingGatherReference(table.data(), vocab, dim, ids.data(), tokens, expected.data()));
  EXPECT_TRUE(SameBits(DownloadBits(d_out), expected, dim));
  EXPECT_EQ(DownloadFlag(flag), 0);
}

// dim % 8 == 0 takes the 16-byte path (8, 64, 2304), anything else the scalar one (1, 7, 100).
INSTANTIATE_TEST_SUITE_P(Shapes, EmbeddingGatherTest,
                         ::testing::Values(EmbedCase{1, 8, 3}, EmbedCase{512, 64, 65},
                                           EmbedCase{512, 7, 1}, EmbedCase{163840, 16, 33},
                                           EmbedCase{4096, 2304, 7}, EmbedCase{300, 100, 500},
                                           EmbedCase{2, 1, 19}),
                         [](const ::testing::TestParamInfo<EmbedCase>& info) {
                           return "V" + std::to_string(info.param.vocab) + "_D" +
                                  std::to_string(info.param.dim) + "_T" +
                                  std::to_string(info.param.tokens);
                         });

class EmbedTest : public CudaTest {};

// Bad ids give zero rows and set the flag; good ids in the same launch are still copied; the
// flag is sticky across later clean launches.
TEST_F(EmbedTest, OutOfRangeIdsAreZeroedAndFlagged) {
  for (int dim : {64, 7}) {
    SCOPED_TRACE(::testing::Message() << "dim " << dim);
    const int64_t vocab = 100;
    const std::vector<uint16_t> table = RandomBf16Bits(vocab * dim, 3);
    const std::vector<int32_t> ids = {-1, 100, INT_MAX, INT_MIN, 0, 99, 42};
    const int64_t tokens = static_cast<int64_t>(ids.size());
    DeviceBuffer<__nv_bfloat16> d_table, d_out;
    DeviceBuffer<int32_t> d_ids;
    ASSERT_CUDA_OK(Upload(AsBf16(table), d_table));
    ASSERT_CUDA_OK(Upload(ids, d_ids));
    ASSERT_CUDA_OK(d_out.Allocate(tokens * dim));
    ASSERT_CUDA_OK(Poison(d_out));
    DeviceBuffer<int32_t> flag = ZeroFlag();
    ASSERT_CUDA_OK(LaunchEmbeddingGather(d_table.get(), vocab, dim, d_ids.get(), tokens,
                                         d_out.get(), flag.get(), stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    std::vector<uint16_t> expected(tokens * dim);
    EXPECT_FALSE(
        EmbeddingGatherReference(table.data(), vocab, dim, ids.data(), tokens, expected.data()));
    for (int j = 0; j < 4 * dim; ++j) ASSERT_EQ(expected[j], 0) << "reference zero rows";
    EXPECT_TRUE(SameBits(DownloadBits(d_out), expected, dim));
    EXPECT_EQ(DownloadFlag(flag), 1);

    // A clean launch does not clear it.
    const std::vector<int32_t> good = {1, 2};
    ASSERT_CUDA_OK(Upload(good, d_ids));
    ASSERT_CUDA_OK(LaunchEmbeddingGather(d_table.get(), vocab, dim, d_ids.get(), 2, d_out.get(),
                                         flag.get(), stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    EXPECT_EQ(DownloadFlag(flag), 1);
  }
}

struct StridedCase {
  int dim;
  int64_t src_stride, dst_stride;
  int64_t offset;  // elements added to both base pointers
  const char* path;
};

// Strided rows on both sides; the elements between rows of dst must keep their poison.
TEST_F(EmbedTest, GatherRowsStrided) {
  const StridedCase cases[] = {{8, 24, 16, 0, "vector"},
                               {64, 72, 64, 0, "vector"},
                               {64, 72, 80, 1, "scalar: unaligned"},
                               {7, 9, 11, 0, "scalar: dim"},
                               {64, 68, 64, 0, "scalar: src stride"},
                               {2304, 2304 * 3, 2312, 0, "vector, model width"}};
  for (const StridedCase& c : cases) {
    SCOPED_TRACE(::testing::Message()
                 << "dim " << c.dim << " strides " << c.src_stride << "/" << c.dst_stride
                 << " offset " << c.offset << " (" << c.path << ")");
    const int64_t src_rows = 37, rows = 9;
    const std::vector<uint16_t> src = RandomBf16Bits(c.offset + src_rows * c.src_stride, 4);
    const std::vector<int32_t> indices = {36, 0, 5, 5, 17, 1, 35, 20, 36};
    DeviceBuffer<__nv_bfloat16> d_src, d_dst;
    DeviceBuffer<int32_t> d_indices;
    ASSERT_CUDA_OK(Upload(AsBf16(src), d_src));
    ASSERT_CUDA_OK(Upload(indices, d_indices));
    ASSERT_CUDA_OK(d_dst.Allocate(c.offset + rows * c.dst_stride));
    ASSERT_CUDA_OK(Poison(d_dst));
    DeviceBuffer<int32_t> flag = ZeroFlag();
    ASSERT_CUDA_OK(LaunchGatherRows(d_src.get() + c.offset, c.src_stride, src_rows, c.dim,
                                    d_indices.get(), rows, d_dst.get() + c.offset, c.dst_stride,
                                    flag.get(), stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    std::vector<uint16_t> expected(c.offset + rows * c.dst_stride, kPoisonBits);
    ASSERT_TRUE(GatherRowsReference(src.data() + c.offset, c.src_stride, src_rows, c.dim,
                                    indices.data(), rows, expected.data() + c.offset,
                                    c.dst_stride));
    EXPECT_TRUE(SameBits(DownloadBits(d_dst), expected, c.dst_stride));
    EXPECT_EQ(DownloadFlag(flag), 0);
  }
}

TEST_F(EmbedTest, LastRowIndicesVarlen) {
  // Lengths 5, 1, 0 (empty), 14, 1.
  const std::vector<int32_t> cu_seqlens = {0, 5, 6, 6, 20, 21};
  const int num_seqs = 5;
  DeviceBuffer<int32_t> d_cu, d_idx;
  ASSERT_CUDA_OK(Upload(cu_seqlens, d_cu));
  ASSERT_CUDA_OK(d_idx.Allocate(num_seqs));
  ASSERT_CUDA_OK(Poison(d_idx));
  ASSERT_CUDA_OK(LaunchLastRowIndices(d_cu.get(), num_seqs, d_idx.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<int32_t> actual;
  ASSERT_CUDA_OK(Download(d_idx, actual));
  EXPECT_EQ(actual, (std::vector<int32_t>{4, 5, -1, 19, 20}));
  std::vector<int32_t> expected(num_seqs);
  LastRowIndicesReference(cu_seqlens.data(), num_seqs, expected.data());
  EXPECT_EQ(actual, expected);

  // Many sequences (several CTAs), random lengths including empty ones.
  std::mt19937_64 rng(5);
  const int many = 1000;
  std::vector<int32_t> cu(many + 1, 0);
  for (int n = 0; n < many; ++n) cu[n + 1] = cu[n] + static_cast<int32_t>(rng() % 4);
  ASSERT_CUDA_OK(Upload(cu, d_cu));
  ASSERT_CUDA_OK(d_idx.Allocate(many));
  ASSERT_CUDA_OK(Poison(d_idx));
  ASSERT_CUDA_OK(LaunchLastRowIndices(d_cu.get(), many, d_idx.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  ASSERT_CUDA_OK(Download(d_idx, actual));
  expected.resize(many);
  LastRowIndicesReference(cu.data(), many, expected.data());
  EXPECT_EQ(actual, expected);
}

// The engine's lm_head input: hidden [total_tokens, D] → the last row of each sequence. An empty
// sequence's −1 index gives a zero row and raises the flag.
TEST_F(EmbedTest, LastRowGatherForLmHead) {
  const int dim = 2304;
  for (bool with_empty : {false, true}) {
    SCOPED_TRACE(with_empty ? "with an empty sequence" : "all non-empty");
    const std::vector<int32_t> cu_seqlens =
        with_empty ? std::vector<int32_t>{0, 3, 3, 70} : std::vector<int32_t>{0, 3, 4, 70};
    const int num_seqs = 3;
    const int64_t total = cu_seqlens.back();
    const std::vector<uint16_t> hidden = RandomBf16Bits(total * dim, 6);
    DeviceBuffer<__nv_bfloat16> d_hidden, d_last;
    DeviceBuffer<int32_t> d_cu, d_idx;
    ASSERT_CUDA_OK(Upload(AsBf16(hidden), d_hidden));
    ASSERT_CUDA_OK(Upload(cu_seqlens, d_cu));
    ASSERT_CUDA_OK(d_idx.Allocate(num_seqs));
    ASSERT_CUDA_OK(d_last.Allocate(num_seqs * dim));
    ASSERT_CUDA_OK(Poison(d_last));
    DeviceBuffer<int32_t> flag = ZeroFlag();
    ASSERT_CUDA_OK(LaunchLastRowIndices(d_cu.get(), num_seqs, d_idx.get(), stream()));
    ASSERT_CUDA_OK(LaunchGatherRows(d_hidden.get(), dim, total, dim, d_idx.get(), num_seqs,
                                    d_last.get(), dim, flag.get(), stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    std::vector<int32_t> idx(num_seqs);
    LastRowIndicesReference(cu_seqlens.data(), num_seqs, idx.data());
    std::vector<uint16_t> expected(num_seqs * dim);
    EXPECT_EQ(GatherRowsReference(hidden.data(), dim, total, dim, idx.data(), num_seqs,
                                  expected.data(), dim),
              !with_empty);
    EXPECT_TRUE(SameBits(DownloadBits(d_last), expected, dim));
    EXPECT_EQ(DownloadFlag(flag), with_empty ? 1 : 0);
  }
}

TEST_F(EmbedTest, ZeroCountsAreNoOps) {
  EXPECT_EQ(LaunchEmbeddingGather(nullptr, 10, 8, nullptr, 0, nullptr, nullptr, stream()),
            cudaSuccess);
  EXPECT_EQ(LaunchGatherRows(nullptr, 8, 0, 8, nullptr, 0, nullptr, 8, nullptr, stream()),
            cudaSuccess);
  EXPECT_EQ(LaunchLastRowIndices(nullptr, 0, nullptr, stream()), cudaSuccess);
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
}

TEST_F(EmbedTest, RejectsBadArguments) {
  DeviceBuffer<__nv_bfloat16> a, b;
  DeviceBuffer<int32_t> ids, flag;
  ASSERT_CUDA_OK(a.Allocate(256));
  ASSERT_CUDA_OK(b.Allocate(256));
  ASSERT_CUDA_OK(ids.Allocate(4));
  ASSERT_CUDA_OK(flag.Allocate(1));
  const cudaStream_t s = stream();
  constexpr cudaError_t kBad = cudaErrorInvalidValue;
  EXPECT_EQ(LaunchEmbeddingGather(a.get(), 0, 8, ids.get(), 2, b.get(), flag.get(), s), kBad)
      << "vocab 0";
  EXPECT_EQ(LaunchEmbeddingGather(a.get(), 8, 0, ids.get(), 2, b.get(), flag.get(), s), kBad)
      << "dim 0";
  EXPECT_EQ(LaunchEmbeddingGather(a.get(), 8, 8, ids.get(), -1, b.get(), flag.get(), s), kBad)
      << "tokens -1";
  EXPECT_EQ(LaunchEmbeddingGather(nullptr, 8, 8, ids.get(), 2, b.get(), flag.get(), s), kBad)
      << "null table";
  EXPECT_EQ(LaunchEmbeddingGather(a.get(), 8, 8, nullptr, 2, b.get(), flag.get(), s), kBad)
      << "null ids";
  EXPECT_EQ(LaunchEmbeddingGather(a.get(), 8, 8, ids.get(), 2, nullptr, flag.get(), s), kBad)
      << "null out";
  EXPECT_EQ(LaunchEmbeddingGather(a.get(), 8, 8, ids.get(), 2, b.get(), nullptr, s), kBad)
      << "null flag";
  EXPECT_EQ(LaunchGatherRows(a.get(), 7, 8, 8, ids.get(), 2, b.get(), 8, flag.get(), s), kBad)
      << "src stride < dim";
  EXPECT_EQ(LaunchGatherRows(a.get(), 8, 8, 8, ids.get(), 2, b.get(), 7, flag.get(), s), kBad)
      << "dst stride < dim";
  EXPECT_EQ(LaunchGatherRows(a.get(), 8, -1, 8, ids.get(), 2, b.get(), 8, flag.get(), s), kBad)
      << "src rows -1";
  const int huge = (1 << 30) + 1;
  EXPECT_EQ(LaunchGatherRows(a.get(), huge, 8, huge, ids.get(), 2, b.get(), huge, flag.get(), s),
            kBad)
      << "dim 2^30 + 1";
  EXPECT_EQ(LaunchLastRowIndices(ids.get(), -1, ids.get(), s), kBad) << "num_seqs -1";
  EXPECT_EQ(LaunchLastRowIndices(nullptr, 2, ids.get(), s), kBad) << "null cu_seqlens";
  EXPECT_EQ(LaunchLastRowIndices(ids.get(), 2, nullptr, s), kBad) << "null indices";
  ASSERT_CUDA_OK(cudaStreamSynchronize(s));
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace kls::kernels

// LaunchCausalConv1dSilu (kernels/conv/conv_causal.cu) against CausalConv1dSiluReference<double>
// run per stream on the kernel's exact bf16 inputs. Outputs: H5 policy (bf16 table AND relative
// RMS error < 5e-3), poisoned with NaN before each run. Final conv states: bit-exact (they are
// copies of bf16 inputs), and slots no sequence uses stay untouched. Shapes sweep T (including
// sequences shorter than W−1 and empty ones), W ∈ {2, 3, 4}, ragged batches with non-contiguous
// slots, the model's decode width (3 × 4096 channels) and a sequence long enough to exceed the
// 65535-CTA grid limit along the runs. A decode chain checks A+B tokens in one call == A, then B
// one token at a time, bit for bit. Fixed seeds throughout.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <ostream>
#include <string>
#include <vector>

#include "kernels/conv/conv.h"
#include "kernels/conv/conv_ref.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/test_util.h"

namespace kls::kernels {
namespace {

using ::kls::testing::Bf16ToDouble;
using ::kls::testing::CudaParamTest;
using ::kls::testing::CudaTest;
using ::kls::testing::DeviceBuffer;
using ::kls::testing::Download;
using ::kls::testing::kBf16StateTolerance;
using ::kls::testing::MatchesReference;
using ::kls::testing::Poison;
using ::kls::testing::ToBf16;
using ::kls::testing::Upload;

constexpr double kRmsBound = 5e-3;

// A packed batch; every value is a bf16 value.
struct Problem {
  int num_streams = 0, stream_dim = 0, width = 0, num_slots = 0;
  std::vector<int64_t> lengths;
  std::vector<int32_t> slots;
  std::vector<double> x;       // [total, C]
  std::vector<double> weight;  // [C, W]
  std::vector<double> pool;    // [num_slots, num_streams, W-1, stream_dim]

  int num_seqs() const { return static_cast<int>(lengths.size()); }
  int64_t channels() const { return static_cast<int64_t>(num_streams) * stream_dim; }
  int64_t total() const { return std::accumulate(lengths.begin(), lengths.end(), int64_t{0}); }
  int64_t slot_size() const { return channels() * (width - 1); }
  std::vector<int32_t> cu_seqlens() const {
    std::vector<int32_t> cu{0};
    for (int64_t len : lengths) cu.push_back(cu.back() + static_cast<int32_t>(len));
    return cu;
  }
};

Problem MakeProblem(std::vector<int64_t> lengths, std::vector<int32_t> slots, int num_slots,
                    int num_streams, int stream_dim, int width, uint64_t seed) {
  using ::kls::testing::RandomNormal;
  using ::kls::testing::RoundToBf16InPlace;
  Problem p;
  p.num_streams = num_streams;
  p.stream_dim = stream_dim;
  p.width = width;
  p.num_slots = num_slots;
  p.lengths = std::move(lengths);
  p.slots = std::move(slots);
  p.x = RandomNormal(static_cast<size_t>(p.total() * p.channels()), seed + 1);
  p.weight = RandomNormal(static_cast<size_t>(p.channels() * width), seed + 2, 0.0, 0.5);
  p.pool = RandomNormal(static_cast<size_t>(num_slots * p.slot_size()), seed + 3);
  for (auto* v : {&p.x, &p.weight, &p.pool}) RoundToBf16InPlace(*v);
  return p;
}

struct Result {
  std::vector<double> out;   // [total, C]
  std::vector<double> pool;  // [num_slots, num_streams, W-1, stream_dim]
};

// The reference works on one [total, D] stream with [W-1, D] states: run it per stream.
Result Reference(const Problem& p) {
  Result r;
  r.pool = p.pool;
  r.out.assign(p.x.size(), 0.0);
  const int64_t total = p.total(), c = p.channels(), sd = p.stream_dim;
  std::vector<int64_t> cu{0};
  for (int64_t len : p.lengths) cu.push_back(cu.back() + len);
  std::vector<double> xs(static_cast<size_t>(total * sd)), outs(xs.size());
  for (int s = 0; s < p.num_streams; ++s) {
    for (int64_t t = 0; t < total; ++t) {
      std::copy_n(p.x.begin() + t * c + s * sd, sd, xs.begin() + t * sd);
    }
    std::vector<double*> states;
    for (int32_t slot : p.slots) {
      states.push_back(r.pool.data() +
                       (static_cast<int64_t>(slot) * p.num_streams + s) * (p.width - 1) * sd);
    }
    CausalConv1dSiluReference<double>(xs.data(), p.weight.data() + s * sd * p.width, cu.data(),
                                      p.num_seqs(), sd, p.width, states.data(), outs.data());
    for (int64_t t = 0; t < total; ++t) {
      std::copy_n(outs.begin() + t * sd, sd, r.out.begin() + t * c + s * sd);
    }
  }
  return r;
}

struct DeviceInputs {
  DeviceBuffer<__nv_bfloat16> x, weight, out;
  DeviceBuffer<int32_t> cu_seqlens, slots;
};

cudaError_t UploadInputs(const Problem& p, DeviceInputs& d) {
  cudaError_t err = cudaSuccess;
  const auto step = [&err](cudaError_t e) {
    if (err == cudaSuccess) err = e;
  };
  step(Upload(ToBf16(p.x), d.x));
  step(Upload(ToBf16(p.weight), d.weight));
  step(Upload(p.cu_seqlens(), d.cu_seqlens));
  step(Upload(p.slots, d.slots));
  step(d.out.Allocate(p.x.size()));
  step(Poison(d.out));
  return err;
}

CausalConvParams MakeParams(const Problem& p, DeviceInputs& d, __nv_bfloat16* pool) {
  CausalConvParams params;
  params.x = d.x.get();
  params.weight = d.weight.get();
  params.conv_state = pool;
  params.conv_slots = d.slots.get();
  params.cu_seqlens = d.cu_seqlens.get();
  params.out = d.out.get();
  params.num_seqs = p.num_seqs();
  params.total_tokens = p.total();
  params.max_seqlen = static_cast<int>(*std::max_element(p.lengths.begin(), p.lengths.end()));
  params.num_streams = p.num_streams;
  params.stream_dim = p.stream_dim;
  params.width = p.width;
  return params;
}

void RunKernel(const Problem& p, cudaStream_t stream, Result& r) {
  DeviceInputs d;
  ASSERT_CUDA_OK(UploadInputs(p, d));
  DeviceBuffer<__nv_bfloat16> pool;
  ASSERT_CUDA_OK(Upload(ToBf16(p.pool), pool));
  ASSERT_CUDA_OK(LaunchCausalConv1dSilu(MakeParams(p, d, pool.get()), stream));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<__nv_bfloat16> out, pool_host;
  ASSERT_CUDA_OK(Download(d.out, out));
  ASSERT_CUDA_OK(Download(pool, pool_host));
  r.out = Bf16ToDouble(out);
  r.pool = Bf16ToDouble(pool_host);
}

// Number of elements that differ at all (NaN counts as different).
int64_t CountDifferent(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return -1;
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += !(a[i] == b[i]);
  return n;
}

void ExpectMatchesReference(const Problem& p, const Result& gpu) {
  const Result ref = Reference(p);
  EXPECT_TRUE(MatchesReference(gpu.out, ref.out, kBf16StateTolerance, kRmsBound)) << "output";
  // The new states are copies of bf16 inputs (old state or x); the reference pool also keeps
  // unused slots as they were.
  EXPECT_EQ(CountDifferent(gpu.pool, ref.pool), 0) << "final conv states";
}

struct ConvCase {
  std::string name;
  std::vector<int64_t> lengths;
  std::vector<int32_t> slots;
  int num_slots;
  int num_streams;
  int stream_dim;
  int width;
  uint64_t seed;
};

std::ostream& operator<<(std::ostream& os, const ConvCase& c) { return os << c.name; }

class CausalConvTest : public CudaParamTest<ConvCase> {};
class CausalConvKernelTest : public CudaTest {};

TEST_P(CausalConvTest, MatchesFp64Reference) {
  const ConvCase& c = GetParam();
  const Problem p =
      MakeProblem(c.lengths, c.slots, c.num_slots, c.num_streams, c.stream_dim, c.width, c.seed);
  Result gpu;
  ASSERT_NO_FATAL_FAILURE(RunKernel(p, stream(), gpu));
  ExpectMatchesReference(p, gpu);
}

std::vector<ConvCase> Cases() {
  std::vector<ConvCase> cases;
  // One sequence of T tokens, 3 streams of 256 channels, slot 1 of 3.
  for (int64_t t : {1, 2, 3, 15, 16, 17, 63, 64, 65, 127, 1000, 4097}) {
    cases.push_back(
        {"T" + std::to_string(t) + "_W4", {t}, {1}, 3, 3, 256, 4, 100 + static_cast<uint64_t>(t)});
  }
  // Decode at the model's width: 3 × 4096 channels, non-contiguous slots.
  cases.push_back(
      {"Decode_B7_W4_C12288", {1, 1, 1, 1, 1, 1, 1}, {5, 0, 3, 9, 2, 8, 11}, 12, 3, 4096, 4, 200});
  cases.push_back({"Ragged_1_5_64_3_W4", {1, 5, 64, 3}, {5, 0, 3, 7}, 8, 3, 64, 4, 300});
  // Shorter than W−1 (the new state mixes old state and new inputs) and empty.
  cases.push_back({"Short_1_2_0_W4", {1, 2, 0}, {2, 0, 1}, 4, 3, 64, 4, 301});
  cases.push_back({"OneStream_Sd8_W4", {5, 33}, {1, 0}, 2, 1, 8, 4, 302});
  for (int w : {2, 3}) {
    const std::string tag = "_W" + std::to_string(w);
    cases.push_back({"Ragged_1_2_17_40_0" + tag,
                     {1, 2, 17, 40, 0},
                     {4, 0, 3, 1, 2},
                     6,
                     3,
                     64,
                     w,
                     400 + static_cast<uint64_t>(w)});
    cases.push_back(
        {"Decode_B3" + tag, {1, 1, 1}, {2, 0, 1}, 3, 3, 128, w, 500 + static_cast<uint64_t>(w)});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, CausalConvTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<ConvCase>& info) {
                           return info.param.name;
                         });

// More runs of 16 tokens than the grid's 65535 y-blocks: CTAs stride over the extra runs.
TEST_F(CausalConvKernelTest, SequenceLongerThanTheGrid) {
  const int64_t t = int64_t{65535} * 16 + 40;
  const Problem p = MakeProblem({3, t}, {1, 0}, 2, 1, 8, 4, 600);
  Result gpu;
  ASSERT_NO_FATAL_FAILURE(RunKernel(p, stream(), gpu));
  ExpectMatchesReference(p, gpu);
}

// Tokens [from[n], from[n] + count[n]) of every sequence n, as their own problem (pool kept).
Problem Slice(const Problem& p, const std::vector<int64_t>& from,
              const std::vector<int64_t>& count) {
  Problem s = p;
  s.lengths = count;
  s.x.clear();
  const int64_t c = p.channels();
  int64_t bos = 0;
  for (int n = 0; n < p.num_seqs(); ++n) {
    s.x.insert(s.x.end(), p.x.begin() + (bos + from[n]) * c,
               p.x.begin() + (bos + from[n] + count[n]) * c);
    bos += p.lengths[n];
  }
  return s;
}

// A+B tokens in one call == A tokens, then B single-token calls, bit for bit (the same fp32
// arithmetic sees the same bf16 inputs, whether they come from x or from the state).
TEST_F(CausalConvKernelTest, ChainEqualsOneCall) {
  const std::vector<int64_t> a = {37, 1, 2, 20}, b = {4, 4, 4, 4};
  std::vector<int64_t> lengths;
  for (size_t n = 0; n < a.size(); ++n) lengths.push_back(a[n] + b[n]);
  const Problem whole = MakeProblem(lengths, {4, 1, 2, 0}, 5, 3, 64, 4, 700);
  Result one_call;
  ASSERT_NO_FATAL_FAILURE(RunKernel(whole, stream(), one_call));
  ASSERT_NO_FATAL_FAILURE(ExpectMatchesReference(whole, one_call));

  DeviceBuffer<__nv_bfloat16> pool;
  ASSERT_CUDA_OK(Upload(ToBf16(whole.pool), pool));
  std::vector<Problem> calls = {Slice(whole, {0, 0, 0, 0}, a)};
  for (int64_t i = 0; i < 4; ++i) {
    calls.push_back(Slice(whole, {a[0] + i, a[1] + i, a[2] + i, a[3] + i}, {1, 1, 1, 1}));
  }
  std::vector<std::vector<double>> outs;
  for (const Problem& call : calls) {
    DeviceInputs d;
    ASSERT_CUDA_OK(UploadInputs(call, d));
    ASSERT_CUDA_OK(LaunchCausalConv1dSilu(MakeParams(call, d, pool.get()), stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    std::vector<__nv_bfloat16> out;
    ASSERT_CUDA_OK(Download(d.out, out));
    outs.push_back(Bf16ToDouble(out));
  }
  std::vector<__nv_bfloat16> pool_host;
  ASSERT_CUDA_OK(Download(pool, pool_host));

  const size_t c = static_cast<size_t>(whole.channels());
  std::vector<double> chained;
  int64_t first_a = 0;
  for (size_t n = 0; n < a.size(); ++n) {
    chained.insert(chained.end(), outs[0].begin() + first_a * c,
                   outs[0].begin() + (first_a + a[n]) * c);
    first_a += a[n];
    for (int64_t i = 0; i < 4; ++i) {
      chained.insert(chained.end(), outs[1 + i].begin() + n * c, outs[1 + i].begin() + (n + 1) * c);
    }
  }
  EXPECT_EQ(CountDifferent(chained, one_call.out), 0) << "outputs";
  EXPECT_EQ(CountDifferent(Bf16ToDouble(pool_host), one_call.pool), 0) << "final conv states";
}

TEST_F(CausalConvKernelTest, RejectsBadArguments) {
  const Problem p = MakeProblem({2, 1}, {0, 1}, 2, 3, 64, 4, 800);
  DeviceInputs d;
  ASSERT_CUDA_OK(UploadInputs(p, d));
  DeviceBuffer<__nv_bfloat16> pool;
  ASSERT_CUDA_OK(Upload(ToBf16(p.pool), pool));
  const CausalConvParams good = MakeParams(p, d, pool.get());

  CausalConvParams bad = good;
  for (int width : {0, 1, 5}) {
    bad.width = width;
    EXPECT_EQ(LaunchCausalConv1dSilu(bad, stream()), cudaErrorInvalidValue) << "width " << width;
  }
  bad = good;
  bad.stream_dim = 60;
  bad.num_streams = 3;
  EXPECT_EQ(LaunchCausalConv1dSilu(bad, stream()), cudaErrorInvalidValue) << "stream_dim 60";
  bad = good;
  bad.num_seqs = 0;
  EXPECT_EQ(LaunchCausalConv1dSilu(bad, stream()), cudaErrorInvalidValue) << "no sequences";
  bad = good;
  bad.num_seqs = 65536;
  EXPECT_EQ(LaunchCausalConv1dSilu(bad, stream()), cudaErrorInvalidValue) << "65536 sequences";
  bad = good;
  bad.x = nullptr;
  EXPECT_EQ(LaunchCausalConv1dSilu(bad, stream()), cudaErrorInvalidValue) << "null x";
  bad = good;
  bad.conv_slots = nullptr;
  EXPECT_EQ(LaunchCausalConv1dSilu(bad, stream()), cudaErrorInvalidValue) << "null slots";
  bad = good;
  bad.out = d.x.get();
  EXPECT_EQ(LaunchCausalConv1dSilu(bad, stream()), cudaErrorInvalidValue) << "out aliases x";
  bad = good;
  bad.x = d.x.get() + 4;  // 8 bytes: not 16-byte aligned
  EXPECT_EQ(LaunchCausalConv1dSilu(bad, stream()), cudaErrorInvalidValue) << "misaligned x";
  bad = good;
  bad.total_tokens = -1;
  EXPECT_EQ(LaunchCausalConv1dSilu(bad, stream()), cudaErrorInvalidValue) << "negative tokens";

  // Nothing was launched: no error pending, the state pool untouched.
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  std::vector<__nv_bfloat16> pool_host;
  ASSERT_CUDA_OK(Download(pool, pool_host));
  EXPECT_EQ(CountDifferent(Bf16ToDouble(pool_host), p.pool), 0);
}

}  // namespace
}  // namespace kls::kernels

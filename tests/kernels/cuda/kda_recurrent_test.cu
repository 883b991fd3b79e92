// LaunchKdaRecurrent (KDA decode, kernels/kda/kda_recurrent.cu) against the fp64 CPU reference:
// KdaGateReference + L2NormReference + KdaRecurrentReference<double> fed the kernel's exact
// (bf16 / fp32) inputs. Outputs and final states are compared with the H5 policy (element-wise
// table AND relative RMS error; bounds below); outputs are poisoned with NaN before each run;
// state slots no sequence uses must come back bit-identical. Shapes sweep T, head_dim, H, ragged
// batches, non-contiguous slots, empty sequences and extreme gates; a decode chain checks that
// one call over A+B tokens equals A then B one token at a time, and a CUDA graph replay checks
// that the launcher is capture-safe. Fixed seeds throughout.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/kda/kda.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/kernels/cuda/kda_test_inputs.h"
#include "tests/test_util.h"

namespace kls::kernels {
namespace {

using ::kls::testing::CudaParamTest;
using ::kls::testing::CudaTest;
using ::kls::testing::DeviceBuffer;
using ::kls::testing::Download;
using ::kls::testing::ExpectUntouchedKdaSlots;
using ::kls::testing::kBf16StateTolerance;
using ::kls::testing::KdaCase;
using ::kls::testing::KdaDeviceInputs;
using ::kls::testing::KdaGateMode;
using ::kls::testing::KdaProblem;
using ::kls::testing::KdaReference;
using ::kls::testing::KdaReferenceStep;
using ::kls::testing::KdaResult;
using ::kls::testing::kFp32Tolerance;
using ::kls::testing::MakeKdaParams;
using ::kls::testing::MakeKdaProblem;
using ::kls::testing::MatchesReference;
using ::kls::testing::Poison;
using ::kls::testing::SliceKdaProblem;
using ::kls::testing::Upload;
using ::kls::testing::UploadKdaInputs;

// Outputs are bf16: the bf16 row of the H5 table and a relative RMS error below 5e-3 (fla's
// bound). Final states are fp32 end to end and the reference sees the kernel's exact inputs, so
// only fp32 rounding separates them: the fp32 row of the table and a relative RMS error below
// 1e-5 (measured: ~1e-8). The bf16 bounds would let a wrong gate through (a softplus threshold
// of 2 instead of 20 moves the state by ~1e-2).
constexpr double kRmsBound = 5e-3;
constexpr double kStateRmsBound = 1e-5;

// Runs the kernel once on `p` with its own pool; fills `r`.
void RunKernel(const KdaProblem& p, cudaStream_t stream, KdaResult& r) {
  KdaDeviceInputs d;
  ASSERT_CUDA_OK(UploadKdaInputs(p, d));
  DeviceBuffer<float> pool;
  ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(p.pool), pool));
  ASSERT_CUDA_OK(LaunchKdaRecurrent(MakeKdaParams(p, d, pool.get()), stream));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<__nv_bfloat16> out;
  std::vector<float> pool_host;
  ASSERT_CUDA_OK(Download(d.out, out));
  ASSERT_CUDA_OK(Download(pool, pool_host));
  r.out = ::kls::testing::Bf16ToDouble(out);
  r.pool = ::kls::testing::ToDouble(pool_host);
}

class KdaRecurrentTest : public CudaParamTest<KdaCase> {};
class KdaRecurrentKernelTest : public CudaTest {};

TEST_P(KdaRecurrentTest, MatchesFp64Reference) {
  const KdaCase& c = GetParam();
  const KdaProblem p = MakeKdaProblem(c);
  KdaResult gpu;
  ASSERT_NO_FATAL_FAILURE(RunKernel(p, stream(), gpu));
  const KdaResult ref = KdaReference(p);
  EXPECT_TRUE(MatchesReference(gpu.out, ref.out, kBf16StateTolerance, kRmsBound)) << "output";
  EXPECT_TRUE(MatchesReference(gpu.pool, ref.pool, kFp32Tolerance, kStateRmsBound))
      << "final states";
  ExpectUntouchedKdaSlots(p, gpu.pool);
}

std::vector<KdaCase> Cases() {
  std::vector<KdaCase> cases;
  // One sequence of T tokens (a multi-token decode), slot 1 of 3; both head dims.
  for (int64_t t : {1, 2, 3, 63, 64, 65, 127, 1000}) {
    cases.push_back({"T" + std::to_string(t) + "_H4_D128",
                     {t},
                     {1},
                     3,
                     4,
                     128,
                     KdaGateMode::kModel,
                     100 + static_cast<uint64_t>(t)});
  }
  for (int64_t t : {1, 65, 4097}) {
    cases.push_back({"T" + std::to_string(t) + "_H4_D64",
                     {t},
                     {2},
                     3,
                     4,
                     64,
                     KdaGateMode::kModel,
                     200 + static_cast<uint64_t>(t)});
  }
  cases.push_back({"T127_H1_D128", {127}, {0}, 1, 1, 128, KdaGateMode::kModel, 300});
  cases.push_back({"T3_H32_D128", {3}, {0}, 2, 32, 128, KdaGateMode::kModel, 301});
  // Decode batches (1 token per sequence) with non-contiguous slots.
  cases.push_back({"Decode_B7_H32_D128",
                   {1, 1, 1, 1, 1, 1, 1},
                   {5, 0, 3, 9, 2, 8, 11},
                   12,
                   32,
                   128,
                   KdaGateMode::kModel,
                   400});
  cases.push_back({"Decode_B3_H4_D64", {1, 1, 1}, {5, 0, 3}, 6, 4, 64, KdaGateMode::kModel, 401});
  cases.push_back({"Decode_B19_H1_D64",
                   std::vector<int64_t>(19, 1),
                   {18, 0, 17, 1, 16, 2, 15, 3, 14, 4, 13, 5, 12, 6, 11, 7, 10, 8, 9},
                   20,
                   1,
                   64,
                   KdaGateMode::kModel,
                   402});
  // Ragged varlen batches, an empty sequence (keeps its state).
  cases.push_back(
      {"Ragged_1_5_64_3_D128", {1, 5, 64, 3}, {5, 0, 3, 7}, 8, 4, 128, KdaGateMode::kModel, 500});
  cases.push_back(
      {"Ragged_1_5_64_3_D64", {1, 5, 64, 3}, {5, 0, 3, 7}, 8, 4, 64, KdaGateMode::kModel, 501});
  cases.push_back(
      {"Ragged_Empty_3_0_2", {3, 0, 2}, {2, 0, 4}, 5, 4, 128, KdaGateMode::kModel, 502});
  // Gate extremes: finite, and equal to the reference.
  for (int d : {64, 128}) {
    const std::string dim = "_D" + std::to_string(d);
    cases.push_back({"GateMinus400" + dim,
                     {1, 65, 20},
                     {1, 0, 2},
                     3,
                     4,
                     d,
                     KdaGateMode::kExtreme,
                     600 + static_cast<uint64_t>(d)});
    cases.push_back({"GateZero" + dim,
                     {1, 200, 20},
                     {1, 0, 2},
                     3,
                     4,
                     d,
                     KdaGateMode::kZero,
                     700 + static_cast<uint64_t>(d)});
    cases.push_back({"GateAlternating" + dim,
                     {1, 100, 20},
                     {1, 0, 2},
                     3,
                     4,
                     d,
                     KdaGateMode::kAlternating,
                     800 + static_cast<uint64_t>(d)});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, KdaRecurrentTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<KdaCase>& info) {
                           return info.param.name;
                         });

// Decode chain: one call over A+B tokens equals A tokens in one call followed by B calls of one
// token per sequence, on outputs and final states.
TEST_F(KdaRecurrentKernelTest, ChainEqualsOneCall) {
  const std::vector<int64_t> a = {37, 1, 20}, b = {5, 5, 5};
  std::vector<int64_t> lengths;
  for (size_t n = 0; n < a.size(); ++n) lengths.push_back(a[n] + b[n]);
  const KdaProblem whole = MakeKdaProblem(lengths, {4, 1, 2}, 5, 4, 128, KdaGateMode::kModel, 900);
  KdaResult one_call;
  ASSERT_NO_FATAL_FAILURE(RunKernel(whole, stream(), one_call));

  DeviceBuffer<float> pool;
  ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(whole.pool), pool));
  std::vector<std::vector<double>> outs;  // per call, [tokens of the call, H, D]
  std::vector<KdaProblem> calls = {SliceKdaProblem(whole, {0, 0, 0}, a)};
  for (int64_t i = 0; i < 5; ++i) {
    calls.push_back(SliceKdaProblem(whole, {a[0] + i, a[1] + i, a[2] + i}, {1, 1, 1}));
  }
  for (const KdaProblem& call : calls) {
    KdaDeviceInputs d;
    ASSERT_CUDA_OK(UploadKdaInputs(call, d));
    ASSERT_CUDA_OK(LaunchKdaRecurrent(MakeKdaParams(call, d, pool.get()), stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    std::vector<__nv_bfloat16> out;
    ASSERT_CUDA_OK(Download(d.out, out));
    outs.push_back(::kls::testing::Bf16ToDouble(out));
  }
  std::vector<float> pool_host;
  ASSERT_CUDA_OK(Download(pool, pool_host));

  // Reassemble the chained outputs in the packed order of the single call.
  const size_t width = static_cast<size_t>(whole.num_heads) * whole.head_dim;
  std::vector<double> chained;
  for (size_t n = 0; n < a.size(); ++n) {
    int64_t first_a = 0;
    for (size_t m = 0; m < n; ++m) first_a += a[m];
    chained.insert(chained.end(), outs[0].begin() + first_a * width,
                   outs[0].begin() + (first_a + a[n]) * width);
    for (int64_t i = 0; i < 5; ++i) {
      chained.insert(chained.end(), outs[1 + i].begin() + n * width,
                     outs[1 + i].begin() + (n + 1) * width);
    }
  }
  EXPECT_TRUE(MatchesReference(chained, one_call.out, kBf16StateTolerance, kRmsBound));
  EXPECT_TRUE(MatchesReference(::kls::testing::ToDouble(pool_host), one_call.pool, kFp32Tolerance,
                               kStateRmsBound));
  // And both against the reference.
  const KdaResult ref = KdaReference(whole);
  EXPECT_TRUE(MatchesReference(one_call.out, ref.out, kBf16StateTolerance, kRmsBound));
  EXPECT_TRUE(MatchesReference(one_call.pool, ref.pool, kFp32Tolerance, kStateRmsBound));
}

// q, k and v read from one fused [T, 3·H·D + pad] buffer (the engine's conv output) give the
// same bits as contiguous inputs; a stride the kernel cannot take is refused.
TEST_F(KdaRecurrentKernelTest, StridedQkvEqualsContiguous) {
  const KdaProblem p = MakeKdaProblem({3, 1, 6}, {0, 2, 1}, 3, 4, 128, KdaGateMode::kModel, 1100);
  KdaResult contiguous;
  ASSERT_NO_FATAL_FAILURE(RunKernel(p, stream(), contiguous));

  KdaDeviceInputs d;
  ASSERT_CUDA_OK(UploadKdaInputs(p, d));
  DeviceBuffer<float> pool;
  ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(p.pool), pool));
  KdaParams params = MakeKdaParams(p, d, pool.get());
  DeviceBuffer<__nv_bfloat16> fused;
  ASSERT_CUDA_OK(::kls::testing::UploadFusedQkv(p, 3 * 4 * 128 + 8, fused, params));
  ASSERT_CUDA_OK(LaunchKdaRecurrent(params, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<__nv_bfloat16> out;
  std::vector<float> pool_host;
  ASSERT_CUDA_OK(Download(d.out, out));
  ASSERT_CUDA_OK(Download(pool, pool_host));
  EXPECT_EQ(::kls::testing::Bf16ToDouble(out), contiguous.out);
  EXPECT_EQ(::kls::testing::ToDouble(pool_host), contiguous.pool);

  for (int64_t bad : {int64_t{4 * 128 - 8}, int64_t{3 * 4 * 128 + 4}}) {
    params.qkv_token_stride = bad;
    EXPECT_EQ(LaunchKdaRecurrent(params, stream()), cudaErrorInvalidValue) << bad;
  }
}

// The launcher records into a CUDA graph (no synchronization, no allocation) and each replay is
// one decode step.
TEST_F(KdaRecurrentKernelTest, ReplaysInCudaGraph) {
  const KdaProblem p = MakeKdaProblem({1, 1, 1}, {2, 0, 1}, 3, 32, 128, KdaGateMode::kModel, 1000);
  KdaDeviceInputs d;
  ASSERT_CUDA_OK(UploadKdaInputs(p, d));
  DeviceBuffer<float> pool;
  ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(p.pool), pool));
  const KdaParams params = MakeKdaParams(p, d, pool.get());

  // Capture on a stream of its own that never synchronizes with the legacy default stream.
  cudaStream_t capture = nullptr;
  ASSERT_CUDA_OK(cudaStreamCreateWithFlags(&capture, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  ASSERT_CUDA_OK(cudaStreamBeginCapture(capture, cudaStreamCaptureModeThreadLocal));
  const cudaError_t launch = LaunchKdaRecurrent(params, capture);
  ASSERT_CUDA_OK(cudaStreamEndCapture(capture, &graph));
  ASSERT_CUDA_OK(launch);
  cudaGraphExec_t exec = nullptr;
  ASSERT_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  ASSERT_CUDA_OK(cudaGraphLaunch(exec, capture));
  ASSERT_CUDA_OK(cudaGraphLaunch(exec, capture));
  ASSERT_CUDA_OK(cudaStreamSynchronize(capture));
  ASSERT_CUDA_OK(cudaGraphExecDestroy(exec));
  ASSERT_CUDA_OK(cudaGraphDestroy(graph));
  ASSERT_CUDA_OK(cudaStreamDestroy(capture));

  std::vector<__nv_bfloat16> out;
  std::vector<float> pool_host;
  ASSERT_CUDA_OK(Download(d.out, out));
  ASSERT_CUDA_OK(Download(pool, pool_host));
  std::vector<double> ref_pool = p.pool, ref_out;
  KdaReferenceStep(p, ref_pool, ref_out);  // first replay
  KdaReferenceStep(p, ref_pool, ref_out);  // second replay: same token, evolved state
  EXPECT_TRUE(
      MatchesReference(::kls::testing::Bf16ToDouble(out), ref_out, kBf16StateTolerance, kRmsBound));
  EXPECT_TRUE(MatchesReference(::kls::testing::ToDouble(pool_host), ref_pool, kFp32Tolerance,
                               kStateRmsBound));
}

// All sequences empty: success, nothing written.
TEST_F(KdaRecurrentKernelTest, NoTokensIsANoOp) {
  KdaProblem p = MakeKdaProblem({0, 0}, {0, 1}, 2, 4, 64, KdaGateMode::kModel, 1100);
  KdaDeviceInputs d;
  ASSERT_CUDA_OK(UploadKdaInputs(p, d));
  // Zero-sized inputs have no allocation; the launcher still wants non-null pointers.
  DeviceBuffer<__nv_bfloat16> dummy;
  ASSERT_CUDA_OK(dummy.Allocate(64));
  DeviceBuffer<float> pool;
  ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(p.pool), pool));
  KdaParams params = MakeKdaParams(p, d, pool.get());
  params.q = params.k = params.v = params.f = params.beta_logits = dummy.get();
  params.out = dummy.get();
  ASSERT_CUDA_OK(LaunchKdaRecurrent(params, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<float> pool_host;
  ASSERT_CUDA_OK(Download(pool, pool_host));
  EXPECT_EQ(::kls::testing::ToDouble(pool_host), p.pool);
}

TEST_F(KdaRecurrentKernelTest, RejectsBadArguments) {
  const KdaProblem p = MakeKdaProblem({2, 1}, {0, 1}, 2, 4, 64, KdaGateMode::kModel, 1200);
  KdaDeviceInputs d;
  ASSERT_CUDA_OK(UploadKdaInputs(p, d));
  DeviceBuffer<float> pool;
  ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(p.pool), pool));
  const KdaParams good = MakeKdaParams(p, d, pool.get());

  KdaParams bad = good;
  bad.head_dim = 96;
  EXPECT_EQ(LaunchKdaRecurrent(bad, stream()), cudaErrorInvalidValue) << "head_dim 96";
  bad = good;
  bad.num_seqs = 0;
  EXPECT_EQ(LaunchKdaRecurrent(bad, stream()), cudaErrorInvalidValue) << "no sequences";
  bad = good;
  bad.num_heads = 0;
  EXPECT_EQ(LaunchKdaRecurrent(bad, stream()), cudaErrorInvalidValue) << "no heads";
  bad = good;
  bad.q = nullptr;
  EXPECT_EQ(LaunchKdaRecurrent(bad, stream()), cudaErrorInvalidValue) << "null q";
  bad = good;
  bad.state_slots = nullptr;
  EXPECT_EQ(LaunchKdaRecurrent(bad, stream()), cudaErrorInvalidValue) << "null slots";
  bad = good;
  bad.state_pool = pool.get() + 1;
  EXPECT_EQ(LaunchKdaRecurrent(bad, stream()), cudaErrorInvalidValue) << "misaligned pool";
  bad = good;
  bad.out = d.out.get() + 1;
  EXPECT_EQ(LaunchKdaRecurrent(bad, stream()), cudaErrorInvalidValue) << "misaligned out";
  bad = good;
  bad.total_tokens = -1;
  EXPECT_EQ(LaunchKdaRecurrent(bad, stream()), cudaErrorInvalidValue) << "negative tokens";

  // Nothing was launched: the pool is unchanged and no error is pending.
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  std::vector<float> pool_host;
  ASSERT_CUDA_OK(Download(pool, pool_host));
  EXPECT_EQ(::kls::testing::ToDouble(pool_host), p.pool);
}

}  // namespace
}  // namespace kls::kernels

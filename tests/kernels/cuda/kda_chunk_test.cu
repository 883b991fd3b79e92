// LaunchKdaChunk (KDA prefill, kernels/kda/kda_chunk.cu) against the fp64 CPU reference:
// KdaGateReference + L2NormReference + KdaRecurrentReference<double> (the definition) fed the
// kernel's exact bf16 / fp32 inputs. Outputs and final states are compared with the H5 policy
// (bf16 table element-wise AND relative RMS error < 5e-3); outputs and the workspace are
// poisoned with NaN before each run; slots no sequence uses must come back bit-identical.
// Shapes sweep T around the chunk size (64) and sub-chunk size (16), both head dims, both state
// tile widths (BV = 32 and 64), ragged batches with empty sequences, non-contiguous slots and
// extreme gates. Chains check prefill(A) → prefill(B) and prefill(A) → decode(B) (through
// LaunchKdaRecurrent) against prefill(A+B); a CUDA graph replay checks capture safety and
// determinism; bad arguments are refused. Fixed seeds throughout.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/kda/kda.h"
#include "kernels/kda/kda_chunk_tuning.h"
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
using ::kls::testing::KdaResult;
using ::kls::testing::MakeKdaParams;
using ::kls::testing::MakeKdaProblem;
using ::kls::testing::MatchesReference;
using ::kls::testing::Poison;
using ::kls::testing::SliceKdaProblem;
using ::kls::testing::Upload;
using ::kls::testing::UploadKdaInputs;

constexpr double kRmsBound = 5e-3;  // relative RMS error, bf16 I/O with an fp32 state

// Allocates the workspace LaunchKdaChunk asks for and poisons it (NaN everywhere), so a read
// of anything the kernel did not write first shows up in the comparison.
cudaError_t MakeWorkspace(const KdaParams& params, DeviceBuffer<unsigned char>& ws) {
  const size_t bytes = KdaChunkWorkspaceBytes(params);
  if (bytes == 0) return cudaErrorInvalidValue;
  cudaError_t err = ws.Allocate(bytes);
  if (err != cudaSuccess) return err;
  return Poison(ws);
}

// Runs the chunk kernel on `p` with inputs `d` against the device pool `pool`.
void LaunchChunk(const KdaProblem& p, KdaDeviceInputs& d, float* pool, cudaStream_t stream) {
  const KdaParams params = MakeKdaParams(p, d, pool);
  DeviceBuffer<unsigned char> ws;
  ASSERT_CUDA_OK(MakeWorkspace(params, ws));
  ASSERT_CUDA_OK(LaunchKdaChunk(params, ws.get(), ws.size(), stream));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
}

void CopyOut(const KdaDeviceInputs& d, std::vector<double>& out) {
  std::vector<__nv_bfloat16> host;
  ASSERT_CUDA_OK(Download(d.out, host));
  out = ::kls::testing::Bf16ToDouble(host);
}

void CopyPool(const DeviceBuffer<float>& pool, std::vector<double>& out) {
  std::vector<float> host;
  ASSERT_CUDA_OK(Download(pool, host));
  out = ::kls::testing::ToDouble(host);
}

// One chunk call on `p` with its own pool.
void RunChunk(const KdaProblem& p, cudaStream_t stream, KdaResult& r) {
  KdaDeviceInputs d;
  ASSERT_CUDA_OK(UploadKdaInputs(p, d));
  DeviceBuffer<float> pool;
  ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(p.pool), pool));
  ASSERT_NO_FATAL_FAILURE(LaunchChunk(p, d, pool.get(), stream));
  ASSERT_NO_FATAL_FAILURE(CopyOut(d, r.out));
  ASSERT_NO_FATAL_FAILURE(CopyPool(pool, r.pool));
}

// Rows [from[n], from[n] + count[n]) of every sequence of a [total, H, D] output laid out by
// `lengths`, concatenated.
std::vector<double> SliceRows(const std::vector<double>& out, const std::vector<int64_t>& lengths,
                              const std::vector<int64_t>& from, const std::vector<int64_t>& count,
                              size_t row_width) {
  std::vector<double> r;
  int64_t bos = 0;
  for (size_t n = 0; n < lengths.size(); ++n) {
    const auto begin = out.begin() + (bos + from[n]) * static_cast<int64_t>(row_width);
    r.insert(r.end(), begin, begin + count[n] * static_cast<int64_t>(row_width));
    bos += lengths[n];
  }
  return r;
}

class KdaChunkTest : public CudaParamTest<KdaCase> {};
class KdaChunkKernelTest : public CudaTest {};

TEST_P(KdaChunkTest, MatchesFp64Reference) {
  const KdaCase& c = GetParam();
  const KdaProblem p = MakeKdaProblem(c);
  KdaResult gpu;
  ASSERT_NO_FATAL_FAILURE(RunChunk(p, stream(), gpu));
  const KdaResult ref = KdaReference(p);
  EXPECT_TRUE(MatchesReference(gpu.out, ref.out, kBf16StateTolerance, kRmsBound)) << "output";
  EXPECT_TRUE(MatchesReference(gpu.pool, ref.pool, kBf16StateTolerance, kRmsBound))
      << "final states";
  ExpectUntouchedKdaSlots(p, gpu.pool);
}

std::vector<KdaCase> Cases() {
  std::vector<KdaCase> cases;
  // One sequence of T tokens around the chunk (64) and sub-chunk (16) sizes, slot 1 of 3.
  for (int64_t t : {1, 15, 16, 17, 63, 64, 65, 127, 1000, 4097}) {
    cases.push_back({"T" + std::to_string(t) + "_H4_D128",
                     {t},
                     {1},
                     3,
                     4,
                     128,
                     KdaGateMode::kModel,
                     100 + static_cast<uint64_t>(t)});
  }
  for (int64_t t : {1, 63, 64, 65, 127, 1000, 4097}) {
    cases.push_back({"T" + std::to_string(t) + "_H4_D64",
                     {t},
                     {2},
                     3,
                     4,
                     64,
                     KdaGateMode::kModel,
                     200 + static_cast<uint64_t>(t)});
  }
  cases.push_back({"T200_H1_D128", {200}, {0}, 1, 1, 128, KdaGateMode::kModel, 300});
  // N·H·(D/32) ≥ 4·SMs (132 SMs on H100 / H200) selects the BV = 64 state tiles.
  cases.push_back({"BV64_Batch5_H32_D128",
                   {70, 1, 130, 64, 3},
                   {4, 0, 2, 6, 1},
                   7,
                   32,
                   128,
                   KdaGateMode::kModel,
                   310});
  cases.push_back({"BV64_Batch9_H32_D64",
                   {9, 64, 1, 100, 65, 2, 30, 128, 7},
                   {9, 0, 8, 1, 7, 2, 6, 3, 5},
                   10,
                   32,
                   64,
                   KdaGateMode::kModel,
                   311});
  // Ragged varlen batches with non-contiguous slots; empty sequences keep their state.
  cases.push_back(
      {"Ragged_1_5_64_3_D128", {1, 5, 64, 3}, {5, 0, 3, 7}, 8, 4, 128, KdaGateMode::kModel, 500});
  cases.push_back(
      {"Ragged_65_0_130_1_D64", {65, 0, 130, 1}, {3, 0, 5, 1}, 6, 4, 64, KdaGateMode::kModel, 501});
  cases.push_back(
      {"Ragged_Empty_3_0_2_0", {3, 0, 2, 0}, {2, 0, 4, 5}, 6, 4, 128, KdaGateMode::kModel, 502});
  cases.push_back({"Ragged_19_H2_D128",
                   {33, 1, 64, 0, 17, 128, 5, 70, 1, 2, 63, 65, 16, 0, 9, 200, 3, 1, 44},
                   {18, 0, 17, 1, 16, 2, 15, 3, 14, 4, 13, 5, 12, 6, 11, 7, 10, 8, 9},
                   20,
                   2,
                   128,
                   KdaGateMode::kModel,
                   503});
  // Gate extremes: finite, and equal to the reference.
  for (int d : {64, 128}) {
    const std::string dim = "_D" + std::to_string(d);
    cases.push_back({"GateMinus400" + dim,
                     {1, 130, 20},
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
                     {1, 300, 20},
                     {1, 0, 2},
                     3,
                     4,
                     d,
                     KdaGateMode::kAlternating,
                     800 + static_cast<uint64_t>(d)});
  }
  // A long pure delta rule: the state integrates every rounding error of the chain.
  cases.push_back({"GateZero_T4097_D128", {4097}, {0}, 1, 2, 128, KdaGateMode::kZero, 900});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, KdaChunkTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<KdaCase>& info) {
                           return info.param.name;
                         });

// Both state-tile widths, forced (the launcher picks by SM count), on both head dims; an
// unsupported width is refused.
TEST_F(KdaChunkKernelTest, ForcedStateTilesMatchReference) {
  for (int head_dim : {64, 128}) {
    const KdaProblem p =
        MakeKdaProblem({130, 1, 64, 77}, {3, 1, 0, 4}, 5, 3, head_dim, KdaGateMode::kModel, 950);
    const KdaResult ref = KdaReference(p);
    for (int tile : {32, 64}) {
      SCOPED_TRACE("head_dim " + std::to_string(head_dim) + ", tile " + std::to_string(tile));
      KdaDeviceInputs d;
      ASSERT_CUDA_OK(UploadKdaInputs(p, d));
      DeviceBuffer<float> pool;
      ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(p.pool), pool));
      const KdaParams params = MakeKdaParams(p, d, pool.get());
      DeviceBuffer<unsigned char> ws;
      ASSERT_CUDA_OK(MakeWorkspace(params, ws));
      EXPECT_EQ(LaunchKdaChunkWithStateTile(params, ws.get(), ws.size(), 48, stream()),
                cudaErrorInvalidValue);
      ASSERT_CUDA_OK(LaunchKdaChunkWithStateTile(params, ws.get(), ws.size(), tile, stream()));
      ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
      KdaResult gpu;
      ASSERT_NO_FATAL_FAILURE(CopyOut(d, gpu.out));
      ASSERT_NO_FATAL_FAILURE(CopyPool(pool, gpu.pool));
      EXPECT_TRUE(MatchesReference(gpu.out, ref.out, kBf16StateTolerance, kRmsBound));
      EXPECT_TRUE(MatchesReference(gpu.pool, ref.pool, kBf16StateTolerance, kRmsBound));
      ExpectUntouchedKdaSlots(p, gpu.pool);
    }
  }
}

// prefill(A) then prefill(B) on the same slots equals prefill(A+B), on the outputs of B and the
// final states; A ends inside a chunk, so the chunk boundaries of the two runs differ.
TEST_F(KdaChunkKernelTest, SplitPrefillEqualsOneCall) {
  const std::vector<int64_t> a = {100, 1, 64}, b = {77, 130, 65};
  std::vector<int64_t> lengths;
  for (size_t n = 0; n < a.size(); ++n) lengths.push_back(a[n] + b[n]);
  const KdaProblem whole = MakeKdaProblem(lengths, {4, 1, 2}, 5, 4, 128, KdaGateMode::kModel, 1000);
  KdaResult one_call;
  ASSERT_NO_FATAL_FAILURE(RunChunk(whole, stream(), one_call));
  const KdaResult ref = KdaReference(whole);

  DeviceBuffer<float> pool;
  ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(whole.pool), pool));
  const KdaProblem first = SliceKdaProblem(whole, {0, 0, 0}, a);
  const KdaProblem second = SliceKdaProblem(whole, a, b);
  KdaDeviceInputs d1, d2;
  ASSERT_CUDA_OK(UploadKdaInputs(first, d1));
  ASSERT_CUDA_OK(UploadKdaInputs(second, d2));
  ASSERT_NO_FATAL_FAILURE(LaunchChunk(first, d1, pool.get(), stream()));
  ASSERT_NO_FATAL_FAILURE(LaunchChunk(second, d2, pool.get(), stream()));
  std::vector<double> out_b, split_pool;
  ASSERT_NO_FATAL_FAILURE(CopyOut(d2, out_b));
  ASSERT_NO_FATAL_FAILURE(CopyPool(pool, split_pool));

  const size_t width = static_cast<size_t>(whole.num_heads) * whole.head_dim;
  const std::vector<double> ref_b = SliceRows(ref.out, lengths, a, b, width);
  const std::vector<double> one_call_b = SliceRows(one_call.out, lengths, a, b, width);
  EXPECT_TRUE(MatchesReference(out_b, ref_b, kBf16StateTolerance, kRmsBound)) << "split vs fp64";
  EXPECT_TRUE(MatchesReference(split_pool, ref.pool, kBf16StateTolerance, kRmsBound));
  EXPECT_TRUE(MatchesReference(out_b, one_call_b, kBf16StateTolerance, kRmsBound))
      << "split vs one call";
  EXPECT_TRUE(MatchesReference(split_pool, one_call.pool, kBf16StateTolerance, kRmsBound));
}

// prefill(A) with the chunk kernel, then B tokens decoded one at a time with LaunchKdaRecurrent,
// equals prefill(A+B) with the chunk kernel (and the fp64 reference).
TEST_F(KdaChunkKernelTest, ChunkThenDecodeEqualsChunk) {
  const std::vector<int64_t> a = {130, 64, 1, 37};
  constexpr int kDecodeSteps = 6;
  std::vector<int64_t> lengths;
  for (int64_t len : a) lengths.push_back(len + kDecodeSteps);
  for (int head_dim : {64, 128}) {
    SCOPED_TRACE("head_dim " + std::to_string(head_dim));
    const KdaProblem whole =
        MakeKdaProblem(lengths, {3, 0, 5, 2}, 6, 4, head_dim, KdaGateMode::kModel, 1100 + head_dim);
    KdaResult one_call;
    ASSERT_NO_FATAL_FAILURE(RunChunk(whole, stream(), one_call));
    const KdaResult ref = KdaReference(whole);

    DeviceBuffer<float> pool;
    ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(whole.pool), pool));
    const KdaProblem prefill = SliceKdaProblem(whole, {0, 0, 0, 0}, a);
    KdaDeviceInputs dp;
    ASSERT_CUDA_OK(UploadKdaInputs(prefill, dp));
    ASSERT_NO_FATAL_FAILURE(LaunchChunk(prefill, dp, pool.get(), stream()));
    std::vector<double> decoded;  // [steps, N, H, D]
    for (int step = 0; step < kDecodeSteps; ++step) {
      std::vector<int64_t> from;
      for (int64_t len : a) from.push_back(len + step);
      const KdaProblem token = SliceKdaProblem(whole, from, {1, 1, 1, 1});
      KdaDeviceInputs dt;
      ASSERT_CUDA_OK(UploadKdaInputs(token, dt));
      ASSERT_CUDA_OK(LaunchKdaRecurrent(MakeKdaParams(token, dt, pool.get()), stream()));
      ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
      std::vector<double> out;
      ASSERT_NO_FATAL_FAILURE(CopyOut(dt, out));
      decoded.insert(decoded.end(), out.begin(), out.end());
    }
    std::vector<double> chain_pool;
    ASSERT_NO_FATAL_FAILURE(CopyPool(pool, chain_pool));

    // Reorder the one-call and reference outputs of the decoded tokens to [steps, N, H, D].
    const size_t width = static_cast<size_t>(whole.num_heads) * whole.head_dim;
    std::vector<double> ref_tail, one_call_tail;
    for (int step = 0; step < kDecodeSteps; ++step) {
      std::vector<int64_t> from;
      for (int64_t len : a) from.push_back(len + step);
      const std::vector<int64_t> ones(a.size(), 1);
      const std::vector<double> r = SliceRows(ref.out, lengths, from, ones, width);
      const std::vector<double> o = SliceRows(one_call.out, lengths, from, ones, width);
      ref_tail.insert(ref_tail.end(), r.begin(), r.end());
      one_call_tail.insert(one_call_tail.end(), o.begin(), o.end());
    }
    EXPECT_TRUE(MatchesReference(decoded, ref_tail, kBf16StateTolerance, kRmsBound));
    EXPECT_TRUE(MatchesReference(decoded, one_call_tail, kBf16StateTolerance, kRmsBound));
    EXPECT_TRUE(MatchesReference(chain_pool, ref.pool, kBf16StateTolerance, kRmsBound));
    EXPECT_TRUE(MatchesReference(chain_pool, one_call.pool, kBf16StateTolerance, kRmsBound));
  }
}

// The launcher is capture-safe after a warm-up (no allocation, no attribute call, no sync), and
// the kernels are deterministic: a graph replay reproduces the eager run bit for bit.
TEST_F(KdaChunkKernelTest, GraphReplayIsBitIdentical) {
  const KdaProblem p =
      MakeKdaProblem({300, 5, 64}, {2, 0, 1}, 3, 8, 128, KdaGateMode::kModel, 1200);
  KdaDeviceInputs d;
  ASSERT_CUDA_OK(UploadKdaInputs(p, d));
  DeviceBuffer<float> pool;
  const std::vector<float> pool0 = ::kls::testing::ToFloat(p.pool);
  ASSERT_CUDA_OK(Upload(pool0, pool));
  const KdaParams params = MakeKdaParams(p, d, pool.get());
  DeviceBuffer<unsigned char> ws;
  ASSERT_CUDA_OK(MakeWorkspace(params, ws));

  ASSERT_CUDA_OK(LaunchKdaChunk(params, ws.get(), ws.size(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> eager_out, eager_pool;
  ASSERT_NO_FATAL_FAILURE(CopyOut(d, eager_out));
  ASSERT_NO_FATAL_FAILURE(CopyPool(pool, eager_pool));

  ASSERT_CUDA_OK(cudaMemcpy(pool.get(), pool0.data(), pool.bytes(), cudaMemcpyHostToDevice));
  ASSERT_CUDA_OK(Poison(d.out));
  ASSERT_CUDA_OK(Poison(ws));
  cudaGraph_t graph = nullptr;
  ASSERT_CUDA_OK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
  const cudaError_t launch = LaunchKdaChunk(params, ws.get(), ws.size(), stream());
  ASSERT_CUDA_OK(cudaStreamEndCapture(stream(), &graph));
  ASSERT_CUDA_OK(launch);
  cudaGraphExec_t exec = nullptr;
  ASSERT_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  EXPECT_CUDA_OK(cudaGraphExecDestroy(exec));
  EXPECT_CUDA_OK(cudaGraphDestroy(graph));
  std::vector<double> graph_out, graph_pool;
  ASSERT_NO_FATAL_FAILURE(CopyOut(d, graph_out));
  ASSERT_NO_FATAL_FAILURE(CopyPool(pool, graph_pool));
  EXPECT_TRUE(graph_out == eager_out) << "graph output differs from the eager run";
  EXPECT_TRUE(graph_pool == eager_pool) << "graph states differ from the eager run";
}

// Unsupported arguments are refused before any launch and leave everything untouched.
// q, k and v read from one fused [T, 3·H·D + pad] buffer (the engine's conv output) give the
// same bits as contiguous inputs; a stride the kernel cannot take is refused.
TEST_F(KdaChunkKernelTest, StridedQkvEqualsContiguous) {
  const KdaProblem p =
      MakeKdaProblem({130, 7, 64}, {2, 0, 1}, 3, 4, 128, KdaGateMode::kModel, 1200);
  KdaResult contiguous;
  ASSERT_NO_FATAL_FAILURE(RunChunk(p, stream(), contiguous));

  KdaDeviceInputs d;
  ASSERT_CUDA_OK(UploadKdaInputs(p, d));
  DeviceBuffer<float> pool;
  ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(p.pool), pool));
  KdaParams params = MakeKdaParams(p, d, pool.get());
  DeviceBuffer<__nv_bfloat16> fused;
  ASSERT_CUDA_OK(::kls::testing::UploadFusedQkv(p, 3 * 4 * 128 + 8, fused, params));
  DeviceBuffer<unsigned char> ws;
  ASSERT_CUDA_OK(MakeWorkspace(params, ws));
  ASSERT_CUDA_OK(LaunchKdaChunk(params, ws.get(), ws.size(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  KdaResult strided;
  ASSERT_NO_FATAL_FAILURE(CopyOut(d, strided.out));
  ASSERT_NO_FATAL_FAILURE(CopyPool(pool, strided.pool));
  EXPECT_EQ(strided.out, contiguous.out);
  EXPECT_EQ(strided.pool, contiguous.pool);

  for (int64_t bad : {int64_t{4 * 128 - 8}, int64_t{3 * 4 * 128 + 4}}) {
    params.qkv_token_stride = bad;
    EXPECT_EQ(LaunchKdaChunk(params, ws.get(), ws.size(), stream()), cudaErrorInvalidValue) << bad;
  }
}

TEST_F(KdaChunkKernelTest, RefusesBadArguments) {
  const KdaProblem p = MakeKdaProblem({70, 3}, {1, 0}, 2, 2, 64, KdaGateMode::kModel, 1300);
  KdaDeviceInputs d;
  ASSERT_CUDA_OK(UploadKdaInputs(p, d));
  DeviceBuffer<float> pool;
  ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(p.pool), pool));
  const KdaParams good = MakeKdaParams(p, d, pool.get());
  DeviceBuffer<unsigned char> ws;
  ASSERT_CUDA_OK(MakeWorkspace(good, ws));

  const auto refused = [&](KdaParams params, size_t ws_bytes) {
    return LaunchKdaChunk(params, ws.get(), ws_bytes, stream()) == cudaErrorInvalidValue;
  };
  KdaParams bad = good;
  bad.head_dim = 96;
  EXPECT_TRUE(refused(bad, ws.size())) << "head_dim 96";
  EXPECT_EQ(KdaChunkWorkspaceBytes(bad), 0u);
  bad = good;
  bad.num_seqs = 0;
  EXPECT_TRUE(refused(bad, ws.size())) << "no sequences";
  bad = good;
  bad.num_heads = 0;
  EXPECT_TRUE(refused(bad, ws.size())) << "no heads";
  bad = good;
  bad.q = nullptr;
  EXPECT_TRUE(refused(bad, ws.size())) << "null q";
  bad = good;
  bad.state_slots = nullptr;
  EXPECT_TRUE(refused(bad, ws.size())) << "null slots";
  bad = good;
  bad.k = d.k.get() + 1;  // 2-byte aligned only
  EXPECT_TRUE(refused(bad, ws.size())) << "misaligned k";
  bad = good;
  bad.scale = NAN;
  EXPECT_TRUE(refused(bad, ws.size())) << "NaN scale";
  EXPECT_TRUE(refused(good, ws.size() - 1)) << "workspace one byte short";
  EXPECT_EQ(LaunchKdaChunk(good, nullptr, ws.size(), stream()), cudaErrorInvalidValue);
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));

  // Nothing ran: the outputs are still poisoned and the states unchanged.
  std::vector<double> out, pool_after;
  ASSERT_NO_FATAL_FAILURE(CopyOut(d, out));
  ASSERT_NO_FATAL_FAILURE(CopyPool(pool, pool_after));
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](double x) { return std::isnan(x); }));
  EXPECT_TRUE(pool_after == p.pool);

  // Workspace sizes: 0 for unsupported shapes, growing with the token count.
  KdaParams longer = good;
  longer.total_tokens = good.total_tokens * 10;
  EXPECT_GT(KdaChunkWorkspaceBytes(longer), KdaChunkWorkspaceBytes(good));
}

// A batch of empty sequences is a no-op that needs no workspace and keeps every state.
TEST_F(KdaChunkKernelTest, EmptyBatchIsANoOp) {
  const KdaProblem p = MakeKdaProblem({0, 0}, {1, 0}, 2, 2, 128, KdaGateMode::kModel, 1400);
  KdaDeviceInputs d;
  ASSERT_CUDA_OK(UploadKdaInputs(p, d));
  DeviceBuffer<float> pool;
  ASSERT_CUDA_OK(Upload(::kls::testing::ToFloat(p.pool), pool));
  EXPECT_EQ(LaunchKdaChunk(MakeKdaParams(p, d, pool.get()), nullptr, 0, stream()), cudaSuccess);
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> pool_after;
  ASSERT_NO_FATAL_FAILURE(CopyPool(pool, pool_after));
  EXPECT_TRUE(pool_after == p.pool);
}

}  // namespace
}  // namespace kls::kernels

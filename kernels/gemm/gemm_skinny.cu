// Skinny GEMMs (contract: gemm.h, LaunchSkinnyGemm; layouts and figures: README.md).
//
// A decode step multiplies a few token rows by every weight of a projection, so its cost is one
// read of W. Each CTA streams 16 weight rows (the MMA's M; "swap AB", gemm_stream_mma.cuh) over
// the whole of k with 16-byte loads that skip L1, against the ≤ 16 token rows (the MMA's N: one n8
// fragment for m ≤ 8, two for m ≤ 16) read through L1, where every CTA finds them. The CTA's
// kWarps warps take interleaved 32-wide k chunks, kUnroll chunks of loads in flight per warp
// (SkinnyGemmArgs::chunks_in_flight, 4 by default), and sum their fragments through shared
// memory; warp 0 writes the 16 × m outputs.
//
// With SkinnyGemmArgs::overlap_previous_kernel (programmatic dependent launch) the kernel may
// start while the previous kernel on the stream finishes. It only prefetches its first weight
// chunks into L2 before griddepcontrol.wait (the weights never depend on earlier kernels); x is
// read and y written after it. Without the attribute the wait returns at once.
//
// Grid: one CTA per 16-row block of every problem, problems back to back (blockIdx.x past a
// problem's first block belongs to it). kWarps ∈ {4, 8, 16} is picked on the host (unless
// SkinnyGemmArgs::warps_per_cta names it) so that the grid holds at least ~16 warps per SM: a
// projection with few row blocks (o_proj: n = 2304, 144 blocks) splits k over more warps instead of
// leaving most SMs idle.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "kernels/gemm/gemm.h"
#include "kernels/gemm/gemm_internal.h"
#include "kernels/gemm/gemm_stream_mma.cuh"

namespace kls::kernels {
namespace {

using gemm_internal::ElementBytes;
using gemm_internal::Extent;
using gemm_internal::Overlaps;
using gemm_stream::LoadNoL1;
using gemm_stream::SwapAbChunk;

constexpr int kRows = 16;   // weight rows per CTA: the MMA's M
constexpr int kChunk = 32;  // k elements per 4-lane group per load (4 lanes × 8)
constexpr int kTargetWarpsPerSm = 16;
constexpr int kDefaultUnroll = 4;

struct KernelProblem {
  const __nv_bfloat16* x;
  const __nv_bfloat16* w;
  void* y;
  int64_t ldx, ldw, ldy;
  int32_t n, k;
  int32_t first_block;  // the problem's first blockIdx.x
  bool y_fp32, accumulate;
};

struct KernelArgs {
  KernelProblem problems[kSkinnyGemmMaxProblems];
  int32_t num_problems;
  int32_t m;
};

__device__ __forceinline__ void PrefetchL2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

__device__ __forceinline__ uint4 LoadOrZero(const __nv_bfloat16* p, bool ok) {
  return ok ? LoadNoL1(p) : make_uint4(0, 0, 0, 0);
}

// kFrags = 1: m ≤ 8; 2: m ≤ 16. kUnroll: 32-wide chunks of loads in flight per warp.
template <int kWarps, int kFrags, int kUnroll>
__global__ void __launch_bounds__(kWarps * 32)
    SkinnyGemmKernel(const __grid_constant__ KernelArgs args) {
  __shared__ float red[(kWarps - 1) * kFrags * 4 * 32];
  // The problem this CTA belongs to, selected with compile-time indices (registers, no local copy).
  KernelProblem p = args.problems[0];
#pragma unroll
  for (int i = 1; i < kSkinnyGemmMaxProblems; ++i) {
    if (i < args.num_problems && static_cast<int32_t>(blockIdx.x) >= args.problems[i].first_block) {
      p = args.problems[i];
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t row0 =
      static_cast<int64_t>(static_cast<int32_t>(blockIdx.x) - p.first_block) * kRows;
  const bool lo_ok = row0 + g < p.n, hi_ok = row0 + g + 8 < p.n;
  const __nv_bfloat16* w_lo = p.w + (lo_ok ? row0 + g : 0) * p.ldw;
  const __nv_bfloat16* w_hi = p.w + (hi_ok ? row0 + g + 8 : 0) * p.ldw;
  // B column g of fragment f is token row 8f + g.
  const __nv_bfloat16* x_row[kFrags];
  bool x_ok[kFrags];
#pragma unroll
  for (int f = 0; f < kFrags; ++f) {
    x_ok[f] = 8 * f + g < args.m;
    x_row[f] = p.x + (x_ok[f] ? 8 * f + g : 0) * p.ldx;
  }

  // Overlap the first round trip to memory with the previous kernel's tail, then wait for it
  // (a no-op when launched without the programmatic attribute).
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int kk = (warp + u * kWarps) * kChunk + 8 * t;
    if (kk < p.k && lo_ok) PrefetchL2(w_lo + kk);
    if (kk < p.k && hi_ok) PrefetchL2(w_hi + kk);
  }
  asm volatile("griddepcontrol.wait;\n" ::: "memory");

  float acc[kFrags][4] = {};
  const int chunks = (p.k + kChunk - 1) / kChunk;
  for (int c0 = warp; c0 < chunks; c0 += kWarps * kUnroll) {
    uint4 wl[kUnroll], wh[kUnroll], xv[kFrags][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int kk = (c0 + u * kWarps) * kChunk + 8 * t;
      const bool ok = kk < p.k;  // k % 8 == 0: a lane's 8 elements are all in or all out
      wl[u] = LoadOrZero(w_lo + kk, ok && lo_ok);
      wh[u] = LoadOrZero(w_hi + kk, ok && hi_ok);
#pragma unroll
      for (int f = 0; f < kFrags; ++f) {
        xv[f][u] = ok && x_ok[f] ? __ldg(reinterpret_cast<const uint4*>(x_row[f] + kk))
                                 : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int f = 0; f < kFrags; ++f) SwapAbChunk(acc[f], wl[u], wh[u], xv[f][u]);
    }
  }
  gemm_stream::ReduceOverWarps<kWarps>(acc, red);
  if (warp != 0) return;

    // C fragment f, value v: weight row g + 8·(v >> 1), token 8f + 2t + (v & 1).
#pragma unroll
  for (int f = 0; f < kFrags; ++f) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t row = row0 + g + 8 * (v >> 1);
      const int token = 8 * f + 2 * t + (v & 1);
      if (row >= p.n || token >= args.m) continue;
      const int64_t at = token * p.ldy + row;
      if (p.y_fp32) {
        float* y = static_cast<float*>(p.y) + at;
        *y = p.accumulate ? *y + acc[f][v] : acc[f][v];
      } else {
        __nv_bfloat16* y = static_cast<__nv_bfloat16*>(p.y) + at;
        *y = __float2bfloat16_rn(p.accumulate ? __bfloat162float(*y) + acc[f][v] : acc[f][v]);
      }
    }
  }
}

template <int kWarps, int kFrags, int kUnroll>
cudaError_t LaunchShape(const KernelArgs& args, unsigned blocks, bool overlap,
                        cudaStream_t stream) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kWarps * 32);
  config.stream = stream;
  config.attrs = overlap ? &attribute : nullptr;
  config.numAttrs = overlap ? 1 : 0;
  return cudaLaunchKernelEx(&config, SkinnyGemmKernel<kWarps, kFrags, kUnroll>, args);
}

template <int kWarps>
cudaError_t LaunchWarps(const KernelArgs& args, unsigned blocks, int unroll, bool overlap,
                        cudaStream_t stream) {
  if (args.m <= 8) {
    return unroll == 8 ? LaunchShape<kWarps, 1, 8>(args, blocks, overlap, stream)
                       : LaunchShape<kWarps, 1, 4>(args, blocks, overlap, stream);
  }
  return unroll == 8 ? LaunchShape<kWarps, 2, 8>(args, blocks, overlap, stream)
                     : LaunchShape<kWarps, 2, 4>(args, blocks, overlap, stream);
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Validates problem `i` (m >= 1): dims, strides, alignment, extents; *x_bytes, *w_bytes and
// *y_bytes get the operands' extents for the overlap checks.
GemmStatus ValidateProblem(const SkinnyGemmProblem& q, int i, int64_t m, int64_t* x_bytes,
                           int64_t* w_bytes, int64_t* y_bytes) {
  constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();
  if (q.n < 1 || q.n > kMaxDim) return KLS_GEMM_INVALID("problems[%d].n=%lld", i, (long long)q.n);
  // k <= 2^30 keeps the kernel's int32 chunk and element indices (which run up to k + 4096)
  // from overflowing.
  if (q.k < 1 || q.k > (int64_t{1} << 30) || q.k % 8 != 0) {
    return KLS_GEMM_INVALID("problems[%d].k=%lld (a positive multiple of 8, at most 2^30)", i,
                            (long long)q.k);
  }
  if (q.y_type != GemmOutputType::kBf16 && q.y_type != GemmOutputType::kFp32) {
    return KLS_GEMM_INVALID("problems[%d].y_type=%d", i, static_cast<int>(q.y_type));
  }
  if (q.mode != GemmOutputMode::kOverwrite && q.mode != GemmOutputMode::kAccumulate) {
    return KLS_GEMM_INVALID("problems[%d].mode=%d", i, static_cast<int>(q.mode));
  }
  if (q.ldx < q.k || q.ldx % 8 != 0) {
    return KLS_GEMM_INVALID("problems[%d].ldx=%lld (>= k=%lld, a multiple of 8)", i,
                            (long long)q.ldx, (long long)q.k);
  }
  if (q.ldw < q.k || q.ldw % 8 != 0) {
    return KLS_GEMM_INVALID("problems[%d].ldw=%lld (>= k=%lld, a multiple of 8)", i,
                            (long long)q.ldw, (long long)q.k);
  }
  if (q.ldy < q.n) {
    return KLS_GEMM_INVALID("problems[%d].ldy=%lld < n=%lld", i, (long long)q.ldy, (long long)q.n);
  }
  if (q.x == nullptr || q.w == nullptr || q.y == nullptr) {
    return KLS_GEMM_INVALID("problems[%d]: a null x, w or y", i);
  }
  if (!Aligned16(q.x) || !Aligned16(q.w)) {
    return KLS_GEMM_INVALID("problems[%d]: x or w is not 16-byte aligned", i);
  }
  const size_t y_element = ElementBytes(q.y_type);
  if (reinterpret_cast<uintptr_t>(q.y) % y_element != 0) {
    return KLS_GEMM_INVALID("problems[%d].y is not aligned to its element", i);
  }
  int64_t ex = 0, ew = 0, ey = 0;
  if (!Extent(m, q.k, q.ldx, 1, 0, &ex) || !Extent(q.n, q.k, q.ldw, 1, 0, &ew) ||
      !Extent(m, q.n, q.ldy, 1, 0, &ey) || ew > std::numeric_limits<int64_t>::max() / 4 ||
      ey > std::numeric_limits<int64_t>::max() / 4) {
    return KLS_GEMM_INVALID("problems[%d]: operand extent overflows int64", i);
  }
  *x_bytes = ex * static_cast<int64_t>(sizeof(__nv_bfloat16));
  *w_bytes = ew * static_cast<int64_t>(sizeof(__nv_bfloat16));
  *y_bytes = ey * static_cast<int64_t>(y_element);
  return GemmStatus{};
}

}  // namespace

GemmStatus LaunchSkinnyGemm(const SkinnyGemmArgs& args, cudaStream_t stream) {
  if (args.m < 0 || args.m > kSkinnyGemmMaxRows) {
    return KLS_GEMM_INVALID("SkinnyGemmArgs.m=%lld (0..%lld)", (long long)args.m,
                            (long long)kSkinnyGemmMaxRows);
  }
  if (args.num_problems < 1 || args.num_problems > kSkinnyGemmMaxProblems) {
    return KLS_GEMM_INVALID("SkinnyGemmArgs.num_problems=%d (1..%d)", args.num_problems,
                            kSkinnyGemmMaxProblems);
  }
  if (args.warps_per_cta != 0 && args.warps_per_cta != 4 && args.warps_per_cta != 8 &&
      args.warps_per_cta != 16) {
    return KLS_GEMM_INVALID("SkinnyGemmArgs.warps_per_cta=%d (0, 4, 8 or 16)", args.warps_per_cta);
  }
  if (args.chunks_in_flight != 0 && args.chunks_in_flight != 4 && args.chunks_in_flight != 8) {
    return KLS_GEMM_INVALID("SkinnyGemmArgs.chunks_in_flight=%d (0, 4 or 8)",
                            args.chunks_in_flight);
  }
  if (args.m == 0) return GemmStatus{};
  int64_t x_bytes[kSkinnyGemmMaxProblems], w_bytes[kSkinnyGemmMaxProblems],
      y_bytes[kSkinnyGemmMaxProblems];
  KernelArgs kernel_args{};
  kernel_args.num_problems = args.num_problems;
  kernel_args.m = static_cast<int32_t>(args.m);
  int64_t blocks = 0;
  for (int i = 0; i < args.num_problems; ++i) {
    const SkinnyGemmProblem& q = args.problems[i];
    const GemmStatus valid = ValidateProblem(q, i, args.m, &x_bytes[i], &w_bytes[i], &y_bytes[i]);
    if (!valid.ok()) return valid;
    KernelProblem& kp = kernel_args.problems[i];
    kp = KernelProblem{q.x,
                       q.w,
                       q.y,
                       q.ldx,
                       q.ldw,
                       q.ldy,
                       static_cast<int32_t>(q.n),
                       static_cast<int32_t>(q.k),
                       static_cast<int32_t>(blocks),
                       q.y_type == GemmOutputType::kFp32,
                       q.mode == GemmOutputMode::kAccumulate};
    blocks += (q.n + kRows - 1) / kRows;
    if (blocks > std::numeric_limits<int32_t>::max()) {
      return KLS_GEMM_INVALID("SkinnyGemmArgs: more than 2^31 - 1 row blocks in all");
    }
  }
  // Every y is written while every x and w is read.
  for (int i = 0; i < args.num_problems; ++i) {
    const SkinnyGemmProblem& qi = args.problems[i];
    for (int j = 0; j < args.num_problems; ++j) {
      const SkinnyGemmProblem& qj = args.problems[j];
      if (Overlaps(qi.y, y_bytes[i], qj.x, x_bytes[j]) ||
          Overlaps(qi.y, y_bytes[i], qj.w, w_bytes[j]) ||
          (j != i && Overlaps(qi.y, y_bytes[i], qj.y, y_bytes[j]))) {
        return KLS_GEMM_INVALID("problems[%d].y overlaps an operand of problems[%d]", i, j);
      }
    }
  }
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) {
    return gemm_internal::Failure(CUBLAS_STATUS_SUCCESS, err, "reading the SM count: %s",
                                  cudaGetErrorString(err));
  }
  int warps = args.warps_per_cta;
  if (warps == 0) {
    const int64_t target_warps = int64_t{sms} * kTargetWarpsPerSm;
    warps = blocks * 4 >= target_warps ? 4 : blocks * 8 >= target_warps ? 8 : 16;
  }
  const int unroll = args.chunks_in_flight == 0 ? kDefaultUnroll : args.chunks_in_flight;
  const unsigned grid = static_cast<unsigned>(blocks);
  const bool overlap = args.overlap_previous_kernel;
  err = warps == 4   ? LaunchWarps<4>(kernel_args, grid, unroll, overlap, stream)
        : warps == 8 ? LaunchWarps<8>(kernel_args, grid, unroll, overlap, stream)
                     : LaunchWarps<16>(kernel_args, grid, unroll, overlap, stream);
  if (err != cudaSuccess) {
    return gemm_internal::Failure(CUBLAS_STATUS_SUCCESS, err, "skinny GEMM launch: %s",
                                  cudaGetErrorString(err));
  }
  return GemmStatus{};
}

}  // namespace kls::kernels

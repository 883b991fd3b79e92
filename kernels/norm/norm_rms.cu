// Row norms (RMSNorm, residual add + RMSNorm, gated RMSNorm, L2 norm) in one kernel template
// (contract: norm.h; math: README.md).
//
// Mapping. A "row" is one normalized vector (a token for RMSNorm, a (token, head) pair for the
// gated and L2 norms). CTAs have 256 threads; a row belongs to one warp when dim ≤ 1024 (8 rows
// per CTA, shuffle-only reduction) and to the whole CTA otherwise (shuffles, then 8 floats of
// smem and one __syncthreads). Each thread takes kVec = 8 consecutive elements per step (16-byte
// loads and stores) when dim % 8 == 0 and every pointer is 16-byte aligned, else kVec = 1.
// Two passes over the row: pass 1 sums the squares (and, for the fused add, writes the rounded
// residual), pass 2 re-reads the row (an L1/L2 hit) and writes the output. A thread visits the
// same elements in both passes, which is what makes out == x safe.
//
// Limits: rows·dim elements addressed with int64; grid ≤ 2³¹−1 CTAs (checked on the host).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/norm/norm.h"

namespace kls::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kCtaRowMinDim = 1025;  // rows at least this long get a whole CTA

enum class NormKind { kRms, kAddRms, kGatedRms, kL2 };

struct NormArgs {
  const __nv_bfloat16* x = nullptr;
  __nv_bfloat16* residual = nullptr;    // kAddRms only
  const __nv_bfloat16* gate = nullptr;  // kGatedRms only
  const __nv_bfloat16* weight = nullptr;
  __nv_bfloat16* out = nullptr;
  int64_t rows = 0;
  int dim = 0;
  float eps = 0.f;
};

// Two bf16 packed in a 32-bit word (element 0 in the low half) to floats: bf16 is the top half
// of an fp32, so this is exact and needs no type punning.
__device__ __forceinline__ float2 UnpackBf16x2(uint32_t word) {
  return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
}

__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  const __nv_bfloat162_raw raw = __floats2bfloat162_rn(lo, hi);  // round to nearest even
  return static_cast<uint32_t>(raw.x) | (static_cast<uint32_t>(raw.y) << 16);
}

template <int kVec>
__device__ __forceinline__ void Load(const __nv_bfloat16* p, float (&v)[kVec]) {
  if constexpr (kVec == 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = UnpackBf16x2(words[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  } else {
    static_assert(kVec == 1);
    v[0] = __bfloat162float(*p);
  }
}

template <int kVec>
__device__ __forceinline__ void Store(__nv_bfloat16* p, const float (&v)[kVec]) {
  if constexpr (kVec == 8) {
    *reinterpret_cast<uint4*>(p) = make_uint4(PackBf16x2(v[0], v[1]), PackBf16x2(v[2], v[3]),
                                              PackBf16x2(v[4], v[5]), PackBf16x2(v[6], v[7]));
  } else {
    *p = __float2bfloat16_rn(v[0]);
  }
}

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// kRowThreads = 32: one warp per row; kThreads: one CTA per row. Every thread gets the sum.
template <int kRowThreads>
__device__ __forceinline__ float RowSum(float x) {
  x = WarpSum(x);
  if constexpr (kRowThreads == kThreads) {
    __shared__ float warp_sums[kThreads / 32];
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = x;
    __syncthreads();
    x = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) x += warp_sums[w];
  } else {
    static_assert(kRowThreads == 32);
  }
  return x;
}

template <NormKind kKind, int kVec, int kRowThreads>
__global__ void __launch_bounds__(kThreads) RowNormKernel(const NormArgs a) {
  constexpr int kRowsPerCta = kThreads / kRowThreads;
  constexpr int kStride = kRowThreads * kVec;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kRowThreads;
  if (row >= a.rows) return;  // uniform over the row's threads (a warp, or the CTA)
  const int first = static_cast<int>(threadIdx.x % kRowThreads) * kVec;
  const int64_t base = row * a.dim;

  float sum_sq = 0.f;
  for (int j = first; j < a.dim; j += kStride) {
    float v[kVec];
    Load<kVec>(a.x + base + j, v);
    if constexpr (kKind == NormKind::kAddRms) {
      float r[kVec];
      Load<kVec>(a.residual + base + j, r);
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[e] = __bfloat162float(__float2bfloat16_rn(v[e] + r[e]));
      Store<kVec>(a.residual + base + j, v);
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum_sq += v[e] * v[e];
  }
  sum_sq = RowSum<kRowThreads>(sum_sq);
  const float inv = kKind == NormKind::kL2
                        ? 1.f / sqrtf(sum_sq + a.eps)
                        : 1.f / sqrtf(sum_sq / static_cast<float>(a.dim) + a.eps);

  for (int j = first; j < a.dim; j += kStride) {
    float v[kVec];
    // The fused add normalizes the sum this thread stored in pass 1.
    Load<kVec>((kKind == NormKind::kAddRms ? a.residual : a.x) + base + j, v);
    if constexpr (kKind == NormKind::kL2) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[e] *= inv;
    } else {
      float w[kVec];
      Load<kVec>(a.weight + j, w);
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[e] = w[e] * (v[e] * inv);
      if constexpr (kKind == NormKind::kGatedRms) {
        float z[kVec];
        Load<kVec>(a.gate + base + j, z);
#pragma unroll
        for (int e = 0; e < kVec; ++e) v[e] *= 1.f / (1.f + expf(-z[e]));
      }
    }
    Store<kVec>(a.out + base + j, v);
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <NormKind kKind, int kVec>
cudaError_t LaunchWithVec(const NormArgs& a, cudaStream_t stream) {
  if (a.dim >= kCtaRowMinDim) {
    const int64_t blocks = a.rows;
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    RowNormKernel<kKind, kVec, kThreads><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  } else {
    constexpr int kRowsPerCta = kThreads / 32;
    const int64_t blocks = (a.rows + kRowsPerCta - 1) / kRowsPerCta;
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    RowNormKernel<kKind, kVec, 32><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <NormKind kKind>
cudaError_t LaunchNorm(const NormArgs& a, cudaStream_t stream) {
  const bool needs_weight = kKind != NormKind::kL2;
  if (a.x == nullptr || a.out == nullptr || (needs_weight && a.weight == nullptr) ||
      (kKind == NormKind::kAddRms && a.residual == nullptr) ||
      (kKind == NormKind::kGatedRms && a.gate == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (a.rows < 0 || a.dim < 1 || !(a.eps >= 0.f) || !std::isfinite(a.eps)) {
    return cudaErrorInvalidValue;
  }
  if (a.rows == 0) return cudaSuccess;
  const bool vectorized = a.dim % 8 == 0 && Aligned16(a.x) && Aligned16(a.out) &&
                          (!needs_weight || Aligned16(a.weight)) &&
                          (a.residual == nullptr || Aligned16(a.residual)) &&
                          (a.gate == nullptr || Aligned16(a.gate));
  return vectorized ? LaunchWithVec<kKind, 8>(a, stream) : LaunchWithVec<kKind, 1>(a, stream);
}

}  // namespace

cudaError_t LaunchRmsNorm(const __nv_bfloat16* x, const __nv_bfloat16* weight, int64_t rows,
                          int dim, float eps, __nv_bfloat16* out, cudaStream_t stream) {
  NormArgs a;
  a.x = x;
  a.weight = weight;
  a.out = out;
  a.rows = rows;
  a.dim = dim;
  a.eps = eps;
  return LaunchNorm<NormKind::kRms>(a, stream);
}

cudaError_t LaunchAddRmsNorm(const __nv_bfloat16* x, __nv_bfloat16* residual,
                             const __nv_bfloat16* weight, int64_t rows, int dim, float eps,
                             __nv_bfloat16* out, cudaStream_t stream) {
  NormArgs a;
  a.x = x;
  a.residual = residual;
  a.weight = weight;
  a.out = out;
  a.rows = rows;
  a.dim = dim;
  a.eps = eps;
  return LaunchNorm<NormKind::kAddRms>(a, stream);
}

cudaError_t LaunchGatedRmsNorm(const __nv_bfloat16* x, const __nv_bfloat16* gate,
                               const __nv_bfloat16* weight, int64_t tokens, int heads, int dim,
                               float eps, __nv_bfloat16* out, cudaStream_t stream) {
  if (heads < 1 || tokens < 0 || tokens > INT64_MAX / heads) return cudaErrorInvalidValue;
  NormArgs a;
  a.x = x;
  a.gate = gate;
  a.weight = weight;
  a.out = out;
  a.rows = tokens * heads;
  a.dim = dim;
  a.eps = eps;
  return LaunchNorm<NormKind::kGatedRms>(a, stream);
}

cudaError_t LaunchL2Norm(const __nv_bfloat16* x, int64_t rows, int dim, float eps,
                         __nv_bfloat16* out, cudaStream_t stream) {
  NormArgs a;
  a.x = x;
  a.out = out;
  a.rows = rows;
  a.dim = dim;
  a.eps = eps;
  return LaunchNorm<NormKind::kL2>(a, stream);
}

}  // namespace kls::kernels

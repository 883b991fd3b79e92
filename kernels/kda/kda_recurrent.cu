// KDA decode: the recurrence of KIMI_LINEAR.md §3.6 token by token, with the exact gate, the
// q/k L2 norms, the q scale and sigmoid(β) fused in (contract: kda.h; math: README.md).
//
// CTA mapping. One CTA of 128 threads per (sequence n, head h, tile of kBlockV = 16 value
// columns), on a 1-D grid of N·H·(V/16) CTAs with the tile index fastest. Value columns evolve
// independently, so a CTA owns the [K, 16] slice S[:, v0:v0+16] of its state for the whole call
// and keeps it in fp32 registers: thread t holds the 4 columns v0 + 4·(t % 4) .. +3 (one float4,
// 16-byte loads and stores) of the rows {t / 4 + 32·m : m < K / 32}. At K = V = 128, H = 32,
// B = 1 that is 256 CTAs; each reads and writes 8 KB of state.
//
// Per token every CTA of a (n, h) pair loads q, k, f (K bf16 each; 0.8 KB against 8 KB of state,
// the redundancy across the V tiles is cheap; all loads are issued right after the state's) and
//   1. every warp reduces ‖q‖², ‖k‖² and q·k over all K itself (4 elements per lane, shuffles),
//      and each lane computes q̂·scale, k̂ and α = exp(g) of the one row it owns (lane l of warp
//      w owns row 8w + l/4 + 32·(l % 4)); a thread gets the scalars of its rows from the owner
//      lanes with shuffles — no shared memory and no barrier in this step;
//   2. decays its rows by α, accumulates the partial column sums p = S̃ᵀk̂ and u = S̃ᵀ(q̂·scale),
//      and reduces them over the rows (shuffles over the lanes that share a column group, then
//      smem across the warps, double-buffered by token parity);
//   3. δ = β(v − p) and o = u + δ·(k̂·q̂·scale), which equals S_newᵀ(q̂·scale) with one reduction
//      instead of two; then S += k̂ δᵀ. Threads of row group 0 store o (4 bf16, 8 bytes).
// One __syncthreads per token; the state is read once before the first token and written once
// after the last, whatever the token count. Shared memory: 2·4·4·8 floats (1 KB). At most 64
// registers, so 8 CTAs (1024 threads) per SM keep 64 KB of state loads in flight.
//
// Limits (checked on the host, cudaErrorInvalidValue): K == V ∈ {64, 128}; N ≥ 1, H ≥ 1,
// N·H·V/16 < 2³¹; every pointer non-null; state_pool 16-byte aligned, v and out 8-byte aligned.
// Trusted (device data): cu_seqlens non-decreasing from 0; slots distinct and inside the pool.
// Empty sequences keep their state untouched.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kda/kda.h"

namespace kls::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockV = 16;                        // value columns per CTA
constexpr int kColGroups = kBlockV / 4;            // float4 column groups per CTA
constexpr int kRowGroups = kThreads / kColGroups;  // threads sharing one column group
static_assert(32 % kColGroups == 0, "a warp must hold whole column-group sets");

__device__ __forceinline__ float Softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the lanes of a warp that hold the same column group (lane % kColGroups).
__device__ __forceinline__ float ColumnGroupSum(float x) {
#pragma unroll
  for (int offset = kColGroups; offset < 32; offset <<= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

__device__ __forceinline__ float4 ColumnGroupSum(float4 v) {
  return make_float4(ColumnGroupSum(v.x), ColumnGroupSum(v.y), ColumnGroupSum(v.z),
                     ColumnGroupSum(v.w));
}

// Two bf16 packed in a 32-bit word (element 0 in the low half) to floats: bf16 is the top half
// of an fp32, so this is exact and needs no type punning.
__device__ __forceinline__ float2 UnpackBf16x2(uint32_t word) {
  return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
}

__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  const __nv_bfloat162_raw raw = __floats2bfloat162_rn(lo, hi);  // round to nearest even
  return static_cast<uint32_t>(raw.x) | (static_cast<uint32_t>(raw.y) << 16);
}

__device__ __forceinline__ float4 LoadBf16x4(const __nv_bfloat16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 lo = UnpackBf16x2(raw.x), hi = UnpackBf16x2(raw.y);
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

__device__ __forceinline__ void StoreBf16x4(__nv_bfloat16* p, float4 v) {
  *reinterpret_cast<uint2*>(p) = make_uint2(PackBf16x2(v.x, v.y), PackBf16x2(v.z, v.w));
}

// kDim = K = V. At most 64 registers (8 CTAs, 1024 threads per SM): decode is bound by the
// state bytes in flight, so occupancy matters more than the one 8-byte spill ptxas makes at
// K = 128 to get there.
template <int kDim>
__global__ void __launch_bounds__(kThreads, 8) KdaRecurrentKernel(const KdaParams p) {
  static_assert(kDim % kRowGroups == 0 && kDim % kBlockV == 0 && kDim <= kThreads);
  constexpr int kRows = kDim / kRowGroups;  // state rows per thread
  constexpr int kTiles = kDim / kBlockV;
  static_assert(kRows <= kColGroups && kRowGroups == 8 * kWarps,
                "the row owners of a row group fit its column-group lanes");

  // Per-warp partial p and u, double-buffered by token parity: the one __syncthreads of token t
  // separates its writes from its reads, and a warp writes the same buffer again (token t + 2)
  // only after the barrier of token t + 1, which every reader of token t has passed.
  __shared__ float4 col_red[2][kWarps][kColGroups][2];

  const int num_heads = p.num_heads;
  const int tile = static_cast<int>(blockIdx.x % kTiles);
  const int h = static_cast<int>((blockIdx.x / kTiles) % num_heads);
  const int n = static_cast<int>(blockIdx.x / kTiles / num_heads);
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32, warp = tid / 32;
  const int cg = tid % kColGroups, rg = tid / kColGroups;
  const int col = tile * kBlockV + 4 * cg;  // first of this thread's 4 value columns
  // The warp's rows are {8·warp + lane / 4 + 32·m}; lane owns row `own_row` (m = lane % 4,
  // folded into kRows) for the per-row scalars q̂, k̂, α, and the thread of row group rg fetches
  // row rg + 32·m from lane (lane & ~3) | m with a shuffle: no shared memory, no barrier.
  const int own_row = rg + kRowGroups * ((lane % kColGroups) % kRows);

  // Independent loads first, so their latencies overlap.
  const int bos = p.cu_seqlens[n];  // token indices fit int32 (cu_seqlens is int32)
  const int eos = p.cu_seqlens[n + 1];
  const int slot = p.state_slots[n];
  if (eos <= bos) return;  // empty sequence: its state stays as it is

  const int64_t state_off = (static_cast<int64_t>(slot) * num_heads + h) * (kDim * kDim) + col;
  float4 s[kRows];
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
    s[m] =
        *reinterpret_cast<const float4*>(p.state_pool + state_off + (rg + m * kRowGroups) * kDim);
  }

  const float neg_rate = -expf(p.a_log[h]);
  const float dt_bias = p.dt_bias[h * kDim + own_row];
  const float scale = p.scale;

  for (int t = bos; t < eos; ++t) {
    const int64_t row =
        (static_cast<int64_t>(t) * num_heads + h) * kDim;  // [t, h, :] of f and out (K == V)
    const int64_t qkv_row = static_cast<int64_t>(t) * p.qkv_token_stride + h * kDim;  // q, k, v
    // Every warp reduces the full norms itself, so no barrier: lane loads the element that lane
    // owns in warp e (e < kWarps covers all K; lanes past kRows in their group duplicate and
    // are left out of the sums). Element `warp` is this lane's own row.
    float qn[kWarps], kn[kWarps];
#pragma unroll
    for (int e = 0; e < kWarps; ++e) {
      const int idx = own_row + 8 * (e - warp);
      qn[e] = __bfloat162float(p.q[qkv_row + idx]);
      kn[e] = __bfloat162float(p.k[qkv_row + idx]);
    }
    const float fe = __bfloat162float(p.f[row + own_row]);
    const float4 v = LoadBf16x4(p.v + qkv_row + col);
    const float beta =
        1.f /
        (1.f + expf(-__bfloat162float(p.beta_logits[static_cast<int64_t>(t) * num_heads + h])));

    // 1. Norms and q·k over K (warp-local), then this lane's row scalars.
    float sq = 0.f, sk = 0.f, sqk = 0.f, qe = qn[0], ke = kn[0];
#pragma unroll
    for (int e = 0; e < kWarps; ++e) {
      sq = fmaf(qn[e], qn[e], sq);
      sk = fmaf(kn[e], kn[e], sk);
      sqk = fmaf(qn[e], kn[e], sqk);
      if (e == warp) {
        qe = qn[e];
        ke = kn[e];
      }
    }
    if ((lane % kColGroups) >= kRows) sq = sk = sqk = 0.f;  // duplicate owner (K = 64)
    sq = WarpSum(sq);
    sk = WarpSum(sk);
    sqk = WarpSum(sqk);
    const float q_inv = scale / sqrtf(sq + 1e-6f);  // L2 norm with eps inside the sqrt, and scale
    const float k_inv = 1.f / sqrtf(sk + 1e-6f);
    const float kq = sqk * q_inv * k_inv;  // k̂ · (q̂ · scale)
    const float q_own = qe * q_inv, k_own = ke * k_inv;
    const float a_own = expf(neg_rate * Softplus(fe + dt_bias));

    // 2. Decay, then p = S̃ᵀk̂ and u = S̃ᵀq̂ over this thread's rows, then over the CTA.
    float4 pp = make_float4(0.f, 0.f, 0.f, 0.f), uu = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      const int src = (lane & ~(kColGroups - 1)) | m;
      const float a = __shfl_sync(0xffffffffu, a_own, src);
      const float qr = __shfl_sync(0xffffffffu, q_own, src);
      const float kr = __shfl_sync(0xffffffffu, k_own, src);
      s[m].x *= a;
      s[m].y *= a;
      s[m].z *= a;
      s[m].w *= a;
      pp.x += s[m].x * kr;
      pp.y += s[m].y * kr;
      pp.z += s[m].z * kr;
      pp.w += s[m].w * kr;
      uu.x += s[m].x * qr;
      uu.y += s[m].y * qr;
      uu.z += s[m].z * qr;
      uu.w += s[m].w * qr;
    }
    pp = ColumnGroupSum(pp);
    uu = ColumnGroupSum(uu);
    const int buf = (t - bos) & 1;
    if (lane < kColGroups) {  // row group 0 of this warp; lane == cg
      col_red[buf][warp][lane][0] = pp;
      col_red[buf][warp][lane][1] = uu;
    }
    __syncthreads();
    pp = make_float4(0.f, 0.f, 0.f, 0.f);
    uu = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float4 a = col_red[buf][w][cg][0], b = col_red[buf][w][cg][1];
      pp.x += a.x;
      pp.y += a.y;
      pp.z += a.z;
      pp.w += a.w;
      uu.x += b.x;
      uu.y += b.y;
      uu.z += b.z;
      uu.w += b.w;
    }

    // 3. δ = β(v − p), o = S_newᵀ(q̂·scale) = u + δ (k̂·q̂·scale), S += k̂ δᵀ.
    const float4 delta = make_float4(beta * (v.x - pp.x), beta * (v.y - pp.y), beta * (v.z - pp.z),
                                     beta * (v.w - pp.w));
    if (rg == 0) {
      StoreBf16x4(p.out + row + col, make_float4(uu.x + delta.x * kq, uu.y + delta.y * kq,
                                                 uu.z + delta.z * kq, uu.w + delta.w * kq));
    }
#pragma unroll
    for (int m = 0; m < kRows; ++m) {  // k̂ re-fetched: cheaper than 4 live registers
      const float kr = __shfl_sync(0xffffffffu, k_own, (lane & ~(kColGroups - 1)) | m);
      s[m].x += kr * delta.x;
      s[m].y += kr * delta.y;
      s[m].z += kr * delta.z;
      s[m].w += kr * delta.w;
    }
  }

  float* const state = p.state_pool + state_off;
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
    *reinterpret_cast<float4*>(state + (rg + m * kRowGroups) * kDim) = s[m];
  }
}

bool Aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

bool ValidRecurrentParams(const KdaParams& p) {
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.f == nullptr ||
      p.beta_logits == nullptr || p.a_log == nullptr || p.dt_bias == nullptr ||
      p.cu_seqlens == nullptr || p.state_pool == nullptr || p.state_slots == nullptr ||
      p.out == nullptr) {
    return false;
  }
  if (p.num_seqs < 1 || p.num_heads < 1 || p.total_tokens < 0) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  const int64_t hk = static_cast<int64_t>(p.num_heads) * p.head_dim;
  if (p.qkv_token_stride != 0 && (p.qkv_token_stride < hk || p.qkv_token_stride % 8 != 0)) {
    return false;
  }
  if (!Aligned(p.state_pool, 16) || !Aligned(p.v, 8) || !Aligned(p.out, 8)) return false;
  const int64_t blocks = static_cast<int64_t>(p.num_seqs) * p.num_heads * (p.head_dim / kBlockV);
  return blocks <= INT32_MAX;
}

}  // namespace

cudaError_t LaunchKdaRecurrent(const KdaParams& params, cudaStream_t stream) {
  if (!ValidRecurrentParams(params)) return cudaErrorInvalidValue;
  if (params.total_tokens == 0) return cudaSuccess;  // every sequence is empty
  const unsigned blocks = static_cast<unsigned>(static_cast<int64_t>(params.num_seqs) *
                                                params.num_heads * (params.head_dim / kBlockV));
  KdaParams p = params;
  if (p.qkv_token_stride == 0) p.qkv_token_stride = static_cast<int64_t>(p.num_heads) * p.head_dim;
  if (p.head_dim == 64) {
    KdaRecurrentKernel<64><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    KdaRecurrentKernel<128><<<blocks, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace kls::kernels

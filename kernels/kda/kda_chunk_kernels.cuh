// Device code of the KDA chunk kernels: launch arguments, shared-memory layouts and the three
// kernels (plan, prepare, state). Algorithm, CTA mapping and limits: the block at the top of
// kda_chunk.cu, which is the only file that includes this one.
#ifndef KLS_KERNELS_KDA_KDA_CHUNK_KERNELS_CUH_
#define KLS_KERNELS_KDA_KDA_CHUNK_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/kda/kda_chunk_mma.cuh"

namespace kls::kernels::kda_chunk {

constexpr int kChunk = 64;     // C
constexpr int kSubChunk = 16;  // BC
constexpr int kThreads = 256;  // prepare and state kernels
constexpr int kPlanThreads = 1024;
constexpr int kPlanSmemBytes = kPlanThreads / 32 * 4;

using bf16 = __nv_bfloat16;
using f16 = __half;

// ---------------------------------------------------------------------------------------------
// 1. Plan
// ---------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kPlanThreads)
    KdaChunkPlanKernel(const int32_t* __restrict__ cu_seqlens, int num_seqs,
                       int32_t* __restrict__ chunk_start) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* const warp_totals = reinterpret_cast<int*>(smem);  // [kPlanThreads / 32]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per = (num_seqs + kPlanThreads - 1) / kPlanThreads;
  const int s0 = min(num_seqs, tid * per), s1 = min(num_seqs, s0 + per);
  int local = 0;
  for (int s = s0; s < s1; ++s) local += (cu_seqlens[s + 1] - cu_seqlens[s] + kChunk - 1) / kChunk;

  int incl = local;  // inclusive scan within the warp
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int x = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += x;
  }
  if (lane == 31) warp_totals[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int t = warp_totals[lane];
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int x = __shfl_up_sync(0xffffffffu, t, off);
      if (lane >= off) t += x;
    }
    warp_totals[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  int running = incl - local + (warp > 0 ? warp_totals[warp - 1] : 0);
  for (int s = s0; s < s1; ++s) {
    chunk_start[s] = running;
    running += (cu_seqlens[s + 1] - cu_seqlens[s] + kChunk - 1) / kChunk;
  }
  if (tid == kPlanThreads - 1) chunk_start[num_seqs] = warp_totals[kPlanThreads / 32 - 1];
}

// ---------------------------------------------------------------------------------------------
// 2. Prepare
// ---------------------------------------------------------------------------------------------

struct PrepareArgs {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const bf16* f;
  int64_t qkv_token_stride;  // elements between tokens of q, k, v (f is [T, H, K] contiguous)
  const bf16* beta_logits;
  const float* a_log;
  const float* dt_bias;
  const int32_t* cu_seqlens;
  const int32_t* chunk_start;
  f16* qg;
  f16* kg;
  f16* w;
  f16* u;
  f16* p;
  float* gamma;
  int32_t* vexp;
  int num_seqs;
  int num_heads;
  float scale;
};

// Shared memory of the prepare kernel, in bytes. Regions and what they hold by phase (q, k, f,
// v arrive as bf16; everything the kernel writes into them is fp16):
//   q     q → Q̃ (rows ≥ 16, in place) → M = T·Diag(β) ([64][kMStride])
//   k     k → K̃ (rows ≥ 16, in place) → v → v·2^−e_v (in place)
//   f     f → phase D scratch (K = 128; after kEnd for K = 64) → Kw = K ⊙ e^G
//   alpha α (fp32 [64][kAlphaStride]) → K̂ ([96][kKP]) → T (fp32 [64][kTStride])
//   a     A (fp32, strictly lower); x: block temporaries of the inverse
template <int K>
struct PrepareSmem {
  static constexpr int kKP = K + 8;  // 16-bit row stride (16-byte pad: conflict-free ldmatrix)
  static constexpr int kAlphaStride = K + 4;
  static constexpr int kAStride = 68;
  static constexpr int kTStride = 68;
  static constexpr int kMStride = 72;
  static constexpr int kTileBytes = kChunk * kKP * 2;
  static constexpr int kAlphaBytes = kChunk * kAlphaStride * 4;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kTileBytes;
  static constexpr int kF = kK + kTileBytes;
  static constexpr int kAlpha = kF + kTileBytes;
  static constexpr int kA = kAlpha + kAlphaBytes;
  static constexpr int kX = kA + kChunk * kAStride * 4;  // fp32 [3][16][16]
  static constexpr int kRsq = kX + 3 * 256 * 4;          // fp32 [64]
  static constexpr int kRsk = kRsq + kChunk * 4;         // fp32 [64]
  static constexpr int kBeta = kRsk + kChunk * 4;        // fp32 [64]
  static constexpr int kFirst = kBeta + kChunk * 4;      // fp32 [4][K] α of each sub-chunk's row 0
  static constexpr int kPex = kFirst + 4 * K * 4;        // fp32 [4][K] product of rows 1..15
  static constexpr int kVmax = kPex + 4 * K * 4;         // fp32 [8] per-warp max |v|
  static constexpr int kEnd = kVmax + 8 * 4;
  // Per-warp scratch of phase D's tensor-core piece: fp16 [24][kScrStride] (an 80-byte row
  // stride keeps ldmatrix conflict-free). It lives in the f region (raw f is dead after α,
  // Kw is written only in phase 2b) when that is large enough, else after kEnd.
  static constexpr int kScrStride = 40;
  static constexpr int kScrBytes = 24 * kScrStride * 2;
  static constexpr bool kScrInF = 8 * kScrBytes <= kTileBytes;
  static constexpr int kScr = kScrInF ? kF : kEnd;
  static constexpr int kBytes = kScrInF ? kEnd : kEnd + 8 * kScrBytes;
  static_assert(96 * kKP * 2 <= kAlphaBytes, "K^ must fit in the alpha region");
  static_assert(kChunk * kTStride * 4 <= kAlphaBytes, "T must fit in the alpha region");
  static_assert(kChunk * kMStride * 2 <= kTileBytes, "M must fit in the q region");
  static_assert(kF % 16 == 0 && kEnd % 16 == 0 && kScrBytes % 16 == 0, "16-byte alignment");
};

// e such that m·2^−e < 1/4 for m ≥ 0 (the v-side scale of the fp16 operands); 0 when m is 0 or
// not finite (the result is then NaN anyway, or needs no scaling).
__device__ __forceinline__ int ScaleExponent(float m) {
  if (!(m > 0.f) || !isfinite(m)) return 0;
  int x = 0;
  frexpf(m, &x);  // m = f·2^x with f ∈ [0.5, 1)
  return x + 2;
}

// First row of the K̂ rows anchored at sub-chunk i (i = 1, 2, 3 hold 16, 32, 48 rows).
__device__ __forceinline__ int KhatBase(int i) { return 8 * i * (i - 1); }

__device__ __forceinline__ float Bf16ToFloat(bf16 x) { return __bfloat162float(x); }

// Stages 64 rows × K bf16 of head h of a [tokens, H, K] tensor; rows ≥ len are zero-filled.
template <int K>
__device__ __forceinline__ void StageRows(bf16* dst, const bf16* src_row0, int64_t row_stride,
                                          int len, int tid) {
  constexpr int kPieces = K / 8;  // 16-byte pieces per row
#pragma unroll
  for (int i = 0; i < kChunk * kPieces / kThreads; ++i) {
    const int piece = tid + kThreads * i;
    const int r = piece / kPieces, c8 = (piece % kPieces) * 8;
    const bool valid = r < len;
    const bf16* src = valid ? src_row0 + r * row_stride + c8 : src_row0;
    CpAsync16(dst + r * PrepareSmem<K>::kKP + c8, src, valid);
  }
}

template <int K>
__global__ void __launch_bounds__(kThreads, 2) KdaChunkPrepareKernel(const PrepareArgs args) {
  using L = PrepareSmem<K>;
  constexpr int kKP = L::kKP;
  constexpr int kAS = L::kAlphaStride;
  constexpr int kAP = L::kAStride;
  constexpr int kTP = L::kTStride;
  constexpr int kMP = L::kMStride;
  constexpr int kDpt = K / 64;  // channels per thread in the column phases

  extern __shared__ __align__(16) unsigned char smem[];
  bf16* const qs = reinterpret_cast<bf16*>(smem + L::kQ);
  bf16* const ks = reinterpret_cast<bf16*>(smem + L::kK);
  bf16* const fs = reinterpret_cast<bf16*>(smem + L::kF);
  float* const alpha = reinterpret_cast<float*>(smem + L::kAlpha);
  float* const ts = reinterpret_cast<float*>(smem + L::kAlpha);
  float* const as = reinterpret_cast<float*>(smem + L::kA);
  float* const xs = reinterpret_cast<float*>(smem + L::kX);
  float* const rsq = reinterpret_cast<float*>(smem + L::kRsq);
  float* const rsk = reinterpret_cast<float*>(smem + L::kRsk);
  float* const beta = reinterpret_cast<float*>(smem + L::kBeta);
  float* const sfirst = reinterpret_cast<float*>(smem + L::kFirst);
  float* const spex = reinterpret_cast<float*>(smem + L::kPex);
  // fp16 views of the same regions (what the kernel writes there is fp16).
  f16* const qh = reinterpret_cast<f16*>(qs);
  f16* const kh = reinterpret_cast<f16*>(ks);
  f16* const kwh = reinterpret_cast<f16*>(fs);
  f16* const khat = reinterpret_cast<f16*>(smem + L::kAlpha);
  f16* const ms = qh;   // M after Q̃ is consumed
  bf16* const vs = ks;  // v after K̃ is consumed, then scaled to fp16 in place (vh)
  f16* const vh = kh;
  float* const vmax = reinterpret_cast<float*>(smem + L::kVmax);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int num_heads = args.num_heads;
  const int h = static_cast<int>(blockIdx.x % num_heads);
  const int gc = static_cast<int>(blockIdx.x / num_heads);
  if (gc >= args.chunk_start[args.num_seqs]) return;  // unused chunk slot
  int lo = 0, hi = args.num_seqs - 1;                 // last n with chunk_start[n] <= gc
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (args.chunk_start[mid] <= gc) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t tok0 = static_cast<int64_t>(args.cu_seqlens[lo]) +
                       static_cast<int64_t>(gc - args.chunk_start[lo]) * kChunk;
  const int len =
      static_cast<int>(min(static_cast<int64_t>(kChunk), args.cu_seqlens[lo + 1] - tok0));
  const int64_t row_stride = static_cast<int64_t>(num_heads) * K;
  const int64_t in_off = (tok0 * num_heads + h) * K;
  const int64_t qkv_off = tok0 * args.qkv_token_stride + static_cast<int64_t>(h) * K;
  const size_t tile = static_cast<size_t>(gc) * num_heads + h;
  f16* const qg_out = args.qg + tile * kChunk * K;
  f16* const kg_out = args.kg + tile * kChunk * K;
  f16* const w_out = args.w + tile * kChunk * K;
  f16* const u_out = args.u + tile * kChunk * K;
  f16* const p_out = args.p + tile * kChunk * kChunk;
  float* const gamma_out = args.gamma + tile * K;

  // ---- Phase 0: stage q, k, f; β.
  StageRows<K>(qs, args.q + qkv_off, args.qkv_token_stride, len, tid);
  StageRows<K>(ks, args.k + qkv_off, args.qkv_token_stride, len, tid);
  StageRows<K>(fs, args.f + in_off, row_stride, len, tid);
  CpAsyncCommit();
  if (tid < kChunk) {
    float b = 0.f;
    if (tid < len) {
      const float x = Bf16ToFloat(args.beta_logits[(tok0 + tid) * num_heads + h]);
      b = 1.f / (1.f + expf(-x));
    }
    beta[tid] = b;
  }
  CpAsyncWaitAll();
  __syncthreads();

  // ---- Phase 1: row norms (warp w owns rows 8w..8w+7) and α = exp(g).
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = warp * 8 + i;
    float sq = 0.f, sk = 0.f;
#pragma unroll
    for (int c = 2 * lane; c < K; c += 64) {
      const float2 qv = UnpackBf16x2(*reinterpret_cast<const uint32_t*>(qs + r * kKP + c));
      const float2 kv = UnpackBf16x2(*reinterpret_cast<const uint32_t*>(ks + r * kKP + c));
      sq += qv.x * qv.x + qv.y * qv.y;
      sk += kv.x * kv.x + kv.y * kv.y;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      sq += __shfl_xor_sync(0xffffffffu, sq, off);
      sk += __shfl_xor_sync(0xffffffffu, sk, off);
    }
    if (lane == 0) {
      rsq[r] = args.scale / sqrtf(sq + 1e-6f);
      rsk[r] = 1.f / sqrtf(sk + 1e-6f);
    }
  }
  {
    // MUFU exp2/log2: softplus to ~1e-7 absolute (log(1 + e^x) rounds 1 + e^x when e^x is
    // tiny), α to ~1e-6 relative; far below the bf16 output rounding. α underflows to +0.
    const float rate = expf(args.a_log[h]);
    const int d = (2 * tid) % K;  // two channels per thread, fixed: kThreads·2 is a multiple of K
    const float2 bias = *reinterpret_cast<const float2*>(args.dt_bias + h * K + d);
#pragma unroll 4
    for (int r = 2 * tid / K; r < kChunk; r += 2 * kThreads / K) {
      const float2 fv = UnpackBf16x2(*reinterpret_cast<const uint32_t*>(fs + r * kKP + d));
      const float x0 = fv.x + bias.x, x1 = fv.y + bias.y;
      const float sp0 = x0 > 20.f ? x0 : __logf(1.f + __expf(x0));
      const float sp1 = x1 > 20.f ? x1 : __logf(1.f + __expf(x1));
      *reinterpret_cast<float2*>(alpha + r * kAS + d) =
          r < len ? make_float2(__expf(-rate * sp0), __expf(-rate * sp1)) : make_float2(1.f, 1.f);
    }
  }
  __syncthreads();

  // ---- Phase D: diagonal 16×16 blocks of A and P. Each block is split at its row 8:
  //   - the two 8×8 pieces on the diagonal (rows and columns 0..7, and 8..15) pairwise in fp32;
  //   - the lower-left 8×8 piece (rows 8..15, columns 0..7) as an fp16 tensor-core product
  //     anchored at row 8: e^{G_r − G_c} = Π_{c<m≤8} α_m · Π_{8<m≤r} α_m, both factors ≤ 1.
  // Warp w: sub-chunk j = w / 2, half = w % 2 (rows and columns 8·half .. 8·half + 7).
  {
    const int j = warp >> 1, half = warp & 1;
    // Pairwise piece. Lane (ci = lane % 4, dg = lane / 4): local columns cl = 2·ci and cl + 1 of
    // the half, channels {4·dg + 32·m + e}. For column c the running product
    // y = k_c · Π_{m=c+1}^{r} α_m gives Σ_d k_r,d y and Σ_d q_r,d y; acc[16·col + 8·(is P) + rr]
    // with rr = r − 8·half.
    {
      const int ci = lane & 3, dg = lane >> 2;
      const int cl = 2 * ci;
      float acc[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) acc[i] = 0.f;
#pragma unroll 1
      for (int m = 0; m < K / 32; ++m) {
        const int d0 = 4 * dg + 32 * m;
        float y0[4] = {0.f, 0.f, 0.f, 0.f}, y1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int rr = 0; rr < 8; ++rr) {
          const int row = kSubChunk * j + 8 * half + rr;
          const float4 al = *reinterpret_cast<const float4*>(alpha + row * kAS + d0);
          const uint2 kr = *reinterpret_cast<const uint2*>(ks + row * kKP + d0);
          const uint2 qr = *reinterpret_cast<const uint2*>(qs + row * kKP + d0);
          const float2 k01 = UnpackBf16x2(kr.x), k23 = UnpackBf16x2(kr.y);
          const float2 q01 = UnpackBf16x2(qr.x), q23 = UnpackBf16x2(qr.y);
          const float kv[4] = {k01.x, k01.y, k23.x, k23.y};
          const float qv[4] = {q01.x, q01.y, q23.x, q23.y};
          const float av[4] = {al.x, al.y, al.z, al.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {  // y stays 0 on the rows above its column
            y0[e] = rr == cl ? kv[e] : y0[e] * av[e];
            y1[e] = rr == cl + 1 ? kv[e] : y1[e] * av[e];
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            acc[rr] = fmaf(kv[e], y0[e], acc[rr]);
            acc[8 + rr] = fmaf(qv[e], y0[e], acc[8 + rr]);
            acc[16 + rr] = fmaf(kv[e], y1[e], acc[16 + rr]);
            acc[24 + rr] = fmaf(qv[e], y1[e], acc[24 + rr]);
          }
        }
      }
      // Sum over the 8 lanes of a column pair (lane bits 2..4) by recursive halving: after the
      // three steps lane (b4 b3 b2) holds the totals of acc indices 16·b4 + 8·b3 + 4·b2 + i.
      {
        const bool up = (lane & 16) != 0;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const float send = up ? acc[i] : acc[i + 16];
          const float keep = up ? acc[i + 16] : acc[i];
          acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
        }
      }
      {
        const bool up = (lane & 8) != 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float send = up ? acc[i] : acc[i + 8];
          const float keep = up ? acc[i + 8] : acc[i];
          acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
        }
      }
      {
        const bool up = (lane & 4) != 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float send = up ? acc[i] : acc[i + 4];
          const float keep = up ? acc[i + 4] : acc[i];
          acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
        }
      }
      const int col = 8 * half + cl + ((lane & 16) ? 1 : 0);  // within the block
      const bool is_p = (lane & 8) != 0;
      const int r_base = 8 * half + ((lane & 4) ? 4 : 0);
      const int ccol = kSubChunk * j + col;
      const float rk_c = rsk[ccol];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = r_base + i;
        const int row = kSubChunk * j + r;
        if (is_p) {
          p_out[row * kChunk + ccol] = __float2half_rn(r >= col ? rsq[row] * rk_c * acc[i] : 0.f);
        } else {
          as[row * kAP + ccol] = r > col ? beta[row] * rsk[row] * rk_c * acc[i] : 0.f;
        }
      }
    }

    // Lower-left piece on the tensor cores; warp half h takes channels [h·K/2, (h+1)·K/2) in
    // steps of 32 (lane = channel), then half 1 hands its partial sums to half 0 through the
    // scratch and a named barrier. Scratch rows (fp16, normalized q, k): 0..7 K̃' = k̂_r·Π_{8<m≤r}
    // α_m and 8..15 Q̃' = q̂_r·Π_{8<m≤r} α_m (r = 8..15), 16..23 K̂' = k̂_c·Π_{c<m≤8} α_m
    // (c = 0..7). MMA rows 0..7 give A (before β), rows 8..15 give P.
    {
      constexpr int kSL = L::kScrStride;
      f16* const scr = reinterpret_cast<f16*>(smem + L::kScr + warp * L::kScrBytes);
      const int base = kSubChunk * j;
      float pacc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 1
      for (int s = 0; s < K / 64; ++s) {
        const int d = half * (K / 2) + 32 * s + lane;
        float av[kSubChunk], kv[kSubChunk];
#pragma unroll
        for (int r = 0; r < kSubChunk; ++r) {
          av[r] = r > 0 ? alpha[(base + r) * kAS + d] : 1.f;
          kv[r] = Bf16ToFloat(ks[(base + r) * kKP + d]) * rsk[base + r];
        }
        float a = 1.f;
#pragma unroll
        for (int rr = 0; rr < 8; ++rr) {
          const int r = 8 + rr;
          if (rr > 0) a *= av[r];
          const float qv = Bf16ToFloat(qs[(base + r) * kKP + d]) * rsq[base + r];
          scr[rr * kSL + lane] = __float2half_rn(kv[r] * a);
          scr[(8 + rr) * kSL + lane] = __float2half_rn(qv * a);
        }
        float b = av[8];
#pragma unroll
        for (int c = 7; c >= 0; --c) {
          scr[(16 + c) * kSL + lane] = __float2half_rn(kv[c] * b);
          b *= av[c];
        }
        __syncwarp();
        uint32_t a0[4], a1[4], bb[4];
        Ldsm4(a0, ARowMajorAddr(scr, kSL, 0, 0, lane));
        Ldsm4(a1, ARowMajorAddr(scr, kSL, 0, 16, lane));
        // Four 8×8 matrices of K̂' (rows = n), k offsets 0, 8, 16, 24: b-fragments of both k16.
        Ldsm4(bb, scr + (16 + (lane & 7)) * kSL + ((lane >> 3) << 3));
        MmaF16(pacc, a0, bb[0], bb[1]);
        MmaF16(pacc, a1, bb[2], bb[3]);
        __syncwarp();  // the scratch is rewritten next
      }
      float* const part = reinterpret_cast<float*>(smem + L::kScr + (warp | 1) * L::kScrBytes);
      if (half == 1) {
        *reinterpret_cast<float4*>(part + 4 * lane) =
            make_float4(pacc[0], pacc[1], pacc[2], pacc[3]);
        // P above the diagonal of block j (rows 0..7, columns 8..15) is zero.
        *reinterpret_cast<uint32_t*>(p_out + (base + (lane >> 2)) * kChunk + base + 8 +
                                     2 * (lane & 3)) = 0u;
        NamedBarrierArrive(1 + j, 64);
      } else {
        NamedBarrierSync(1 + j, 64);
        const float4 o = *reinterpret_cast<const float4*>(part + 4 * lane);
        const int row = base + 8 + g, c = base + 2 * t4;
        const float b_r = beta[row];
        *reinterpret_cast<float2*>(as + row * kAP + c) =
            make_float2(b_r * (pacc[0] + o.x), b_r * (pacc[1] + o.y));
        *reinterpret_cast<uint32_t*>(p_out + row * kChunk + c) =
            PackHalf2(pacc[2] + o.z, pacc[3] + o.w);
      }
    }
  }

  // ---- Phase 2a: per (sub-chunk jj, channels): α of the sub-chunk's first row and the product
  // of its rows 1..15 (kept in registers for phase 2b).
  const int jj = tid >> 6;
  const int dbase = (tid & 63) * kDpt;
  float al[kSubChunk][kDpt];
#pragma unroll
  for (int i = 0; i < kSubChunk; ++i) {
#pragma unroll
    for (int e = 0; e < kDpt; ++e) al[i][e] = alpha[(kSubChunk * jj + i) * kAS + dbase + e];
  }
#pragma unroll
  for (int e = 0; e < kDpt; ++e) {
    float pex = 1.f;
#pragma unroll
    for (int i = 1; i < kSubChunk; ++i) pex *= al[i][e];
    sfirst[jj * K + dbase + e] = al[0][e];
    spex[jj * K + dbase + e] = pex;
  }
  __syncthreads();

  // ---- Phase 2b: decay factors as products, the fp16 operands and Qg / Kg / γ.
  {
    float e_before[kDpt], z_after[kDpt], anchor[4][kDpt];  // anchor[i]: e^{G_{n_i} − G_{n_jj+15}}
#pragma unroll
    for (int e = 0; e < kDpt; ++e) {
      const int d = dbase + e;
      float full[4], first[4];
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        first[s] = sfirst[s * K + d];
        full[s] = first[s] * spex[s * K + d];
      }
      float before = 1.f, after = 1.f;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        if (s < jj) before *= full[s];
        if (s > jj) after *= full[s];
      }
      e_before[e] = before;
      z_after[e] = after;
      if (jj == 0) gamma_out[d] = full[0] * full[1] * full[2] * full[3];
#pragma unroll
      for (int i = 1; i < 4; ++i) {
        float x = 0.f;
        if (i > jj) {
          x = first[i];
#pragma unroll
          for (int s = 1; s < 3; ++s) {
            if (s > jj && s < i) x *= full[s];
          }
        }
        anchor[i][e] = x;
      }
    }

    // Backward over the sub-chunk's rows (reads raw k before phase 2b's forward loop
    // overwrites it): b = Π_{m=r+1}^{15} α_m.
    float b[kDpt];
#pragma unroll
    for (int e = 0; e < kDpt; ++e) b[e] = 1.f;
#pragma unroll
    for (int ii = kSubChunk - 1; ii >= 0; --ii) {
      const int row = kSubChunk * jj + ii;
      const float rk = rsk[row];
      float kn[kDpt];
#pragma unroll
      for (int e = 0; e < kDpt; ++e) kn[e] = Bf16ToFloat(ks[row * kKP + dbase + e]) * rk;
      if constexpr (kDpt == 2) {
        *reinterpret_cast<uint32_t*>(kg_out + row * K + dbase) =
            PackHalf2(kn[0] * b[0] * z_after[0], kn[1] * b[1] * z_after[1]);
#pragma unroll
        for (int i = 1; i < 4; ++i) {
          if (i > jj) {
            *reinterpret_cast<uint32_t*>(khat + (KhatBase(i) + row) * kKP + dbase) =
                PackHalf2(kn[0] * b[0] * anchor[i][0], kn[1] * b[1] * anchor[i][1]);
          }
        }
      } else {
        kg_out[row * K + dbase] = __float2half_rn(kn[0] * b[0] * z_after[0]);
#pragma unroll
        for (int i = 1; i < 4; ++i) {
          if (i > jj) {
            khat[(KhatBase(i) + row) * kKP + dbase] = __float2half_rn(kn[0] * b[0] * anchor[i][0]);
          }
        }
      }
#pragma unroll
      for (int e = 0; e < kDpt; ++e) b[e] *= al[ii][e];
    }

    // Forward: a = Π_{m=n_jj+1}^{r} α_m = e^{G_r − G_{n_jj}}, e^{G_r} = e_before · α_{n_jj} · a.
    float a[kDpt];
#pragma unroll
    for (int e = 0; e < kDpt; ++e) a[e] = 1.f;
#pragma unroll
    for (int ii = 0; ii < kSubChunk; ++ii) {
      const int row = kSubChunk * jj + ii;
      if (ii > 0) {
#pragma unroll
        for (int e = 0; e < kDpt; ++e) a[e] *= al[ii][e];
      }
      const float rq = rsq[row], rk = rsk[row];
      float qn[kDpt], kn[kDpt], eg[kDpt];
#pragma unroll
      for (int e = 0; e < kDpt; ++e) {
        qn[e] = Bf16ToFloat(qs[row * kKP + dbase + e]) * rq;
        kn[e] = Bf16ToFloat(ks[row * kKP + dbase + e]) * rk;
        eg[e] = e_before[e] * al[0][e] * a[e];
      }
      if constexpr (kDpt == 2) {
        *reinterpret_cast<uint32_t*>(qg_out + row * K + dbase) =
            PackHalf2(qn[0] * eg[0], qn[1] * eg[1]);
        *reinterpret_cast<uint32_t*>(kwh + row * kKP + dbase) =
            PackHalf2(kn[0] * eg[0], kn[1] * eg[1]);
        if (jj > 0) {
          *reinterpret_cast<uint32_t*>(qh + row * kKP + dbase) =
              PackHalf2(qn[0] * a[0], qn[1] * a[1]);
          *reinterpret_cast<uint32_t*>(kh + row * kKP + dbase) =
              PackHalf2(kn[0] * a[0], kn[1] * a[1]);
        }
      } else {
        qg_out[row * K + dbase] = __float2half_rn(qn[0] * eg[0]);
        kwh[row * kKP + dbase] = __float2half_rn(kn[0] * eg[0]);
        if (jj > 0) {
          qh[row * kKP + dbase] = __float2half_rn(qn[0] * a[0]);
          kh[row * kKP + dbase] = __float2half_rn(kn[0] * a[0]);
        }
      }
    }
  }
  __syncthreads();

  // ---- Phase 3: off-diagonal 16×16 blocks (i > jb) of A = Diag(β) K̃_i K̂ᵀ and P = Q̃_i K̂ᵀ.
  // 12 units (i, jb, src ∈ {Q̃, K̃}); warp w takes units w and w + 8.
  for (int unit = warp; unit < 12; unit += 8) {
    const int pair = unit >> 1;
    const bool is_k = (unit & 1) != 0;
    const int i = pair < 1 ? 1 : (pair < 3 ? 2 : 3);
    const int jb = pair - (i * (i - 1)) / 2;
    const f16* const abase = is_k ? kh : qh;
    float acc[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      uint32_t af[4], bfr[4];
      Ldsm4(af, ARowMajorAddr(abase, kKP, kSubChunk * i, 16 * kk, lane));
      Ldsm4(bfr, BNMajorAddr(khat, kKP, 16 * kk, KhatBase(i) + kSubChunk * jb, lane));
      MmaF16(acc[0], af, bfr[0], bfr[1]);
      MmaF16(acc[1], af, bfr[2], bfr[3]);
    }
    const int r0 = kSubChunk * i + g, r1 = r0 + 8;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int c = kSubChunk * jb + 8 * nt + 2 * t4;
      if (is_k) {
        *reinterpret_cast<float2*>(as + r0 * kAP + c) =
            make_float2(beta[r0] * acc[nt][0], beta[r0] * acc[nt][1]);
        *reinterpret_cast<float2*>(as + r1 * kAP + c) =
            make_float2(beta[r1] * acc[nt][2], beta[r1] * acc[nt][3]);
      } else {
        *reinterpret_cast<uint32_t*>(p_out + r0 * kChunk + c) = PackHalf2(acc[nt][0], acc[nt][1]);
        *reinterpret_cast<uint32_t*>(p_out + r1 * kChunk + c) = PackHalf2(acc[nt][2], acc[nt][3]);
      }
    }
  }
  __syncthreads();

  // ---- Phase 4: stage v (overlaps the inverse); T = (I + A)⁻¹; M = T·Diag(β).
  StageRows<K>(vs, args.v + qkv_off, args.qkv_token_stride, len, tid);
  CpAsyncCommit();
  if (tid < 64) {  // diagonal blocks: forward substitution, thread = (block, column)
    const int blk = tid >> 4, c = tid & 15;
    const float* const ab = as + kSubChunk * blk * kAP + kSubChunk * blk;
    float x[kSubChunk];
#pragma unroll
    for (int r = 0; r < kSubChunk; ++r) {
      float s = 0.f;
#pragma unroll
      for (int l = 0; l < r; ++l) s = fmaf(ab[r * kAP + l], x[l], s);
      x[r] = r == c ? 1.f : -s;  // x[l] = 0 for l < c, so rows above c stay 0
    }
    float* const tb = ts + kSubChunk * blk * kTP + kSubChunk * blk;
#pragma unroll
    for (int r = 0; r < kSubChunk; ++r) tb[r * kTP + c] = x[r];
  }
  __syncthreads();
#pragma unroll
  for (int i = 1; i < 4; ++i) {  // row block i: T_ij = −T_ii Σ_{m=j}^{i−1} A_im T_mj, j < i
    for (int e = tid; e < 256 * i; e += kThreads) {
      const int jb = e >> 8, r = (e >> 4) & 15, c = e & 15;
      float s = 0.f;
      for (int m = jb; m < i; ++m) {
        const float* const arow = as + (kSubChunk * i + r) * kAP + kSubChunk * m;
        const float* const tcol = ts + (kSubChunk * m) * kTP + kSubChunk * jb + c;
#pragma unroll
        for (int l = 0; l < kSubChunk; ++l) s = fmaf(arow[l], tcol[l * kTP], s);
      }
      xs[e] = s;
    }
    __syncthreads();
    for (int e = tid; e < 256 * i; e += kThreads) {
      const int jb = e >> 8, r = (e >> 4) & 15, c = e & 15;
      const float* const trow = ts + (kSubChunk * i + r) * kTP + kSubChunk * i;
      const float* const xcol = xs + jb * 256 + c;
      float s = 0.f;
#pragma unroll
      for (int l = 0; l < kSubChunk; ++l) s = fmaf(trow[l], xcol[l * 16], s);
      ts[(kSubChunk * i + r) * kTP + kSubChunk * jb + c] = -s;
    }
    __syncthreads();
  }
  for (int e = tid; e < kChunk * kChunk; e += kThreads) {
    const int r = e >> 6, c = e & 63;
    ms[r * kMP + c] = __float2half_rn(c <= r ? ts[r * kTP + c] * beta[c] : 0.f);
  }
  // v → fp16 scaled by 2^−e_v with max|v|·2^−e_v < 1/4 (exact for |v| above 2^−17·max|v|: the bf16
  // mantissa fits fp16's), so U = M·V overflows fp16 only if a row of |M| sums past 2^18; e_v goes
  // to the workspace.
  CpAsyncWaitAll();
  {
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < K / 32; ++i) {  // this thread's own cp.async pieces (rows ≥ len are 0)
      const int piece = tid + kThreads * i;
      const int r = piece / (K / 8), c8 = (piece % (K / 8)) * 8;
      const uint4 raw = *reinterpret_cast<const uint4*>(vs + r * kKP + c8);
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 x = UnpackBf16x2(words[e]);
        m = fmaxf(m, fmaxf(fabsf(x.x), fabsf(x.y)));
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (lane == 0) vmax[warp] = m;
  }
  __syncthreads();
  {
    float m = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) m = fmaxf(m, vmax[w]);
    const int e_v = ScaleExponent(m);
    const float down = ldexpf(1.f, -e_v);
    if (tid == 0) args.vexp[tile] = e_v;
#pragma unroll
    for (int i = 0; i < K / 32; ++i) {
      const int piece = tid + kThreads * i;
      const int r = piece / (K / 8), c8 = (piece % (K / 8)) * 8;
      uint4* const p = reinterpret_cast<uint4*>(vs + r * kKP + c8);
      const uint4 raw = *p;
      const float2 x0 = UnpackBf16x2(raw.x), x1 = UnpackBf16x2(raw.y);
      const float2 x2 = UnpackBf16x2(raw.z), x3 = UnpackBf16x2(raw.w);
      *p = make_uint4(PackHalf2(x0.x * down, x0.y * down), PackHalf2(x1.x * down, x1.y * down),
                      PackHalf2(x2.x * down, x2.y * down), PackHalf2(x3.x * down, x3.y * down));
    }
  }
  __syncthreads();

  // ---- Phase 5: W = M·Kw and U = M·V. M is block lower triangular, so row block mi needs
  // k-blocks 0..mi; warp w does W row block (w % 4) and U row block 3 − (w % 4) (5 k-blocks
  // each), on the column half w / 4.
  {
    const int mi_w = warp & 3, nh = warp >> 2;
#pragma unroll 1
    for (int job = 0; job < 2; ++job) {
      const int mi = job == 0 ? mi_w : 3 - mi_w;
      const f16* const bbase = job == 0 ? kwh : vh;
      f16* const out = job == 0 ? w_out : u_out;
      float acc[K / 16][4] = {};
      for (int kk = 0; kk <= mi; ++kk) {
        uint32_t af[4];
        Ldsm4(af, ARowMajorAddr(ms, kMP, 16 * mi, 16 * kk, lane));
#pragma unroll
        for (int np = 0; np < K / 32; ++np) {
          uint32_t bfr[4];
          Ldsm4T(bfr, BKMajorAddr(bbase, kKP, 16 * kk, nh * (K / 2) + 16 * np, lane));
          MmaF16(acc[2 * np], af, bfr[0], bfr[1]);
          MmaF16(acc[2 * np + 1], af, bfr[2], bfr[3]);
        }
      }
      const int r0 = 16 * mi + g;
#pragma unroll
      for (int nt = 0; nt < K / 16; ++nt) {
        const int c = nh * (K / 2) + 8 * nt + 2 * t4;
        *reinterpret_cast<uint32_t*>(out + r0 * K + c) = PackHalf2(acc[nt][0], acc[nt][1]);
        *reinterpret_cast<uint32_t*>(out + (r0 + 8) * K + c) = PackHalf2(acc[nt][2], acc[nt][3]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 3. State chain and output
// ---------------------------------------------------------------------------------------------

struct StateArgs {
  const f16* qg;
  const f16* kg;
  const f16* w;
  const f16* u;
  const f16* p;
  const float* gamma;
  const int32_t* vexp;
  const int32_t* cu_seqlens;
  const int32_t* chunk_start;
  const int32_t* state_slots;
  float* state_pool;
  bf16* out;
  int num_seqs;
  int num_heads;
};

// Two stages of {W, Qg, Kg, P, U tile, γ} plus the fp16 operand copies of S and Δ.
template <int K, int BV>
struct StateSmem {
  static constexpr int kKP = K + 8;
  static constexpr int kPP = kChunk + 8;
  static constexpr int kBVP = BV + 8;
  static constexpr int kW = 0;
  static constexpr int kQg = kW + kChunk * kKP * 2;
  static constexpr int kKg = kQg + kChunk * kKP * 2;
  static constexpr int kP = kKg + kChunk * kKP * 2;
  static constexpr int kU = kP + kChunk * kPP * 2;
  static constexpr int kGamma = kU + kChunk * kBVP * 2;
  static constexpr int kStage = kGamma + K * 4;
  static constexpr int kSb = 2 * kStage;                // fp16 [K][kBVP]: S·2^−e
  static constexpr int kDb = kSb + K * kBVP * 2;        // fp16 [64][kBVP]: Δ·2^−e
  static constexpr int kRed = kDb + kChunk * kBVP * 2;  // int [8] scale reduction
  static constexpr int kBytes = kRed + 8 * 4;
  static_assert(kStage % 16 == 0 && kU % 16 == 0 && kGamma % 16 == 0, "16-byte aligned regions");
};

template <int K, int BV>
__device__ __forceinline__ void StageChunk(unsigned char* stage, const StateArgs& args, size_t tile,
                                           int vb, int tid) {
  using L = StateSmem<K, BV>;
  constexpr int kKP = L::kKP;
  constexpr int kPieces = K / 8;
  const f16* const srcs[3] = {args.w + tile * kChunk * K, args.qg + tile * kChunk * K,
                              args.kg + tile * kChunk * K};
  f16* const dsts[3] = {reinterpret_cast<f16*>(stage + L::kW),
                        reinterpret_cast<f16*>(stage + L::kQg),
                        reinterpret_cast<f16*>(stage + L::kKg)};
#pragma unroll
  for (int which = 0; which < 3; ++which) {
#pragma unroll
    for (int i = 0; i < kChunk * kPieces / kThreads; ++i) {
      const int piece = tid + kThreads * i;
      const int r = piece / kPieces, c8 = (piece % kPieces) * 8;
      CpAsync16(dsts[which] + r * kKP + c8, srcs[which] + r * K + c8, true);
    }
  }
  {
    const f16* const src = args.p + tile * kChunk * kChunk;
    f16* const dst = reinterpret_cast<f16*>(stage + L::kP);
#pragma unroll
    for (int i = 0; i < kChunk * 8 / kThreads; ++i) {
      const int piece = tid + kThreads * i;
      const int r = piece >> 3, c8 = (piece & 7) * 8;
      CpAsync16(dst + r * L::kPP + c8, src + r * kChunk + c8, true);
    }
  }
  {
    constexpr int kUPieces = BV / 8;
    const f16* const src = args.u + tile * kChunk * K + vb * BV;
    f16* const dst = reinterpret_cast<f16*>(stage + L::kU);
#pragma unroll
    for (int i = 0; i < kChunk * kUPieces / kThreads; ++i) {
      const int piece = tid + kThreads * i;
      const int r = piece / kUPieces, c8 = (piece % kUPieces) * 8;
      CpAsync16(dst + r * L::kBVP + c8, src + r * K + c8, true);
    }
  }
  if (tid < K / 4) {
    CpAsync16(reinterpret_cast<float*>(stage + L::kGamma) + 4 * tid,
              args.gamma + tile * K + 4 * tid, true);
  }
}

// The chain runs in a scaled domain: S' = S·2^−e, Δ' = Δ·2^−e with one exponent e per CTA
// (max over the sequence's chunks of e_v, and the exponent of max|S₀| over the CTA's slice), so
// S' and Δ' fit fp16 as MMA operands; the recurrence is linear, so O = (Qg·S' + P·Δ')·2^e.
template <int K, int BV>
__global__ void __launch_bounds__(kThreads, 1) KdaChunkStateKernel(const StateArgs args) {
  using L = StateSmem<K, BV>;
  constexpr int V = K;
  constexpr int kKP = L::kKP;
  constexpr int kPP = L::kPP;
  constexpr int kBVP = L::kBVP;
  constexpr int kNvb = V / BV;
  // Δ/O: warp → row block mi = w % 4, n8 tiles [nh·kNo, nh·kNo + kNo) with nh = w / 4.
  constexpr int kNo = BV / 16;
  // S: warp → key block mt, n8 tiles [ns0, ns0 + kNs).
  constexpr int kKeyBlocks = K / 16;
  constexpr int kWarpsPerKeyBlock = 8 / kKeyBlocks;
  constexpr int kNs = (BV / 8) / kWarpsPerKeyBlock;
  static_assert(kNo % 2 == 0 && kNs % 2 == 0, "n8 tiles are loaded in pairs");

  extern __shared__ __align__(16) unsigned char smem[];
  f16* const sb = reinterpret_cast<f16*>(smem + L::kSb);
  f16* const db = reinterpret_cast<f16*>(smem + L::kDb);
  int* const red = reinterpret_cast<int*>(smem + L::kRed);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int num_heads = args.num_heads;
  const int vb = static_cast<int>(blockIdx.x % kNvb);
  const int rest = static_cast<int>(blockIdx.x / kNvb);
  const int h = rest % num_heads, n = rest / num_heads;
  const int c_begin = args.chunk_start[n], c_end = args.chunk_start[n + 1];
  if (c_begin >= c_end) return;  // empty sequence: state untouched
  const int64_t bos = args.cu_seqlens[n], eos = args.cu_seqlens[n + 1];
  float* const state =
      args.state_pool + (static_cast<size_t>(args.state_slots[n]) * num_heads + h) * K * V;

  const int mi = warp & 3, nh = warp >> 2;
  const int mt = warp % kKeyBlocks;
  const int ns0 = (warp / kKeyBlocks) * kNs;
  const int key0 = 16 * mt + g;

  StageChunk<K, BV>(smem, args, static_cast<size_t>(c_begin) * num_heads + h, vb, tid);
  CpAsyncCommit();

  // Initial state slice → registers; the CTA's scale exponent.
  float s_acc[kNs][4];
  int e_cta = 0;
  {
    float m = 0.f;
#pragma unroll
    for (int nt = 0; nt < kNs; ++nt) {
      const int col = vb * BV + 8 * (ns0 + nt) + 2 * t4;
      const float2 lo = *reinterpret_cast<const float2*>(state + key0 * V + col);
      const float2 hi = *reinterpret_cast<const float2*>(state + (key0 + 8) * V + col);
      s_acc[nt][0] = lo.x;
      s_acc[nt][1] = lo.y;
      s_acc[nt][2] = hi.x;
      s_acc[nt][3] = hi.y;
      m = fmaxf(m, fmaxf(fmaxf(fabsf(lo.x), fabsf(lo.y)), fmaxf(fabsf(hi.x), fabsf(hi.y))));
    }
    int e = ScaleExponent(m);
    for (int c = c_begin + tid; c < c_end; c += kThreads) {
      e = max(e, args.vexp[static_cast<size_t>(c) * num_heads + h]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) e = max(e, __shfl_xor_sync(0xffffffffu, e, off));
    if (lane == 0) red[warp] = e;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) e_cta = max(e_cta, red[w]);
  }
  const float down = ldexpf(1.f, -e_cta), up = ldexpf(1.f, e_cta);
#pragma unroll
  for (int nt = 0; nt < kNs; ++nt) {
    const int col = 8 * (ns0 + nt) + 2 * t4;
#pragma unroll
    for (int e = 0; e < 4; ++e) s_acc[nt][e] *= down;
    *reinterpret_cast<uint32_t*>(sb + key0 * kBVP + col) = PackHalf2(s_acc[nt][0], s_acc[nt][1]);
    *reinterpret_cast<uint32_t*>(sb + (key0 + 8) * kBVP + col) =
        PackHalf2(s_acc[nt][2], s_acc[nt][3]);
  }

  // e_v of the current chunk; the next one is loaded an iteration ahead (off the chain).
  int ev_cur = args.vexp[static_cast<size_t>(c_begin) * num_heads + h];
  for (int c = c_begin; c < c_end; ++c) {
    const int ev_next = c + 1 < c_end ? args.vexp[static_cast<size_t>(c + 1) * num_heads + h] : 0;
    const int stage_idx = (c - c_begin) & 1;
    unsigned char* const stage = smem + stage_idx * L::kStage;
    const f16* const ws = reinterpret_cast<const f16*>(stage + L::kW);
    const f16* const qgs = reinterpret_cast<const f16*>(stage + L::kQg);
    const f16* const kgs = reinterpret_cast<const f16*>(stage + L::kKg);
    const f16* const ps = reinterpret_cast<const f16*>(stage + L::kP);
    const f16* const us = reinterpret_cast<const f16*>(stage + L::kU);
    const float* const gs = reinterpret_cast<const float*>(stage + L::kGamma);
    // U was stored as U·2^−e_v(c); in the CTA's domain it is U·2^−e = stored·2^(e_v − e).
    const float u_scale = ldexpf(1.f, ev_cur - e_cta);

    CpAsyncWaitAll();
    __syncthreads();  // chunk c landed; sb written; the other stage is free
    if (c + 1 < c_end) {
      StageChunk<K, BV>(smem + (stage_idx ^ 1) * L::kStage, args,
                        static_cast<size_t>(c + 1) * num_heads + h, vb, tid);
      CpAsyncCommit();
    }

    // Δ' = U' − W·S' and O' = Qg·S' (same B fragments of S').
    float x_acc[kNo][4] = {}, o_acc[kNo][4] = {};
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      uint32_t aw[4], aq[4];
      Ldsm4(aw, ARowMajorAddr(ws, kKP, 16 * mi, 16 * kk, lane));
      Ldsm4(aq, ARowMajorAddr(qgs, kKP, 16 * mi, 16 * kk, lane));
#pragma unroll
      for (int np = 0; np < kNo / 2; ++np) {
        uint32_t bfr[4];
        Ldsm4T(bfr, BKMajorAddr(sb, kBVP, 16 * kk, 8 * (nh * kNo + 2 * np), lane));
        MmaF16(x_acc[2 * np], aw, bfr[0], bfr[1]);
        MmaF16(x_acc[2 * np + 1], aw, bfr[2], bfr[3]);
        MmaF16(o_acc[2 * np], aq, bfr[0], bfr[1]);
        MmaF16(o_acc[2 * np + 1], aq, bfr[2], bfr[3]);
      }
    }
    const int r0 = 16 * mi + g, r1 = r0 + 8;
#pragma unroll
    for (int nt = 0; nt < kNo; ++nt) {
      const int col = 8 * (nh * kNo + nt) + 2 * t4;
      const float2 u0 = UnpackHalf2(*reinterpret_cast<const uint32_t*>(us + r0 * kBVP + col));
      const float2 u1 = UnpackHalf2(*reinterpret_cast<const uint32_t*>(us + r1 * kBVP + col));
      *reinterpret_cast<uint32_t*>(db + r0 * kBVP + col) =
          PackHalf2(u0.x * u_scale - x_acc[nt][0], u0.y * u_scale - x_acc[nt][1]);
      *reinterpret_cast<uint32_t*>(db + r1 * kBVP + col) =
          PackHalf2(u1.x * u_scale - x_acc[nt][2], u1.y * u_scale - x_acc[nt][3]);
    }
    __syncthreads();  // Δ' complete; nobody reads sb until the next chunk

    // O' += P·Δ' over the k-blocks kk ≤ mi (P is lower triangular); store valid rows of O'·2^e.
    for (int kk = 0; kk <= mi; ++kk) {
      uint32_t ap[4];
      Ldsm4(ap, ARowMajorAddr(ps, kPP, 16 * mi, 16 * kk, lane));
#pragma unroll
      for (int np = 0; np < kNo / 2; ++np) {
        uint32_t bfr[4];
        Ldsm4T(bfr, BKMajorAddr(db, kBVP, 16 * kk, 8 * (nh * kNo + 2 * np), lane));
        MmaF16(o_acc[2 * np], ap, bfr[0], bfr[1]);
        MmaF16(o_acc[2 * np + 1], ap, bfr[2], bfr[3]);
      }
    }
    {
      const int64_t tok0 = bos + static_cast<int64_t>(c - c_begin) * kChunk;
      const int len = static_cast<int>(min(static_cast<int64_t>(kChunk), eos - tok0));
      bf16* const out_row0 = args.out + (tok0 * num_heads + h) * V + vb * BV;
      const int64_t out_stride = static_cast<int64_t>(num_heads) * V;
#pragma unroll
      for (int nt = 0; nt < kNo; ++nt) {
        const int col = 8 * (nh * kNo + nt) + 2 * t4;
        if (r0 < len) {
          *reinterpret_cast<uint32_t*>(out_row0 + r0 * out_stride + col) =
              PackBf16x2(o_acc[nt][0] * up, o_acc[nt][1] * up);
        }
        if (r1 < len) {
          *reinterpret_cast<uint32_t*>(out_row0 + r1 * out_stride + col) =
              PackBf16x2(o_acc[nt][2] * up, o_acc[nt][3] * up);
        }
      }
    }

    // S' ← γ ⊙ S' + Kgᵀ·Δ', then its fp16 copy for the next chunk.
    {
      const float g0 = gs[key0], g1 = gs[key0 + 8];
#pragma unroll
      for (int nt = 0; nt < kNs; ++nt) {
        s_acc[nt][0] *= g0;
        s_acc[nt][1] *= g0;
        s_acc[nt][2] *= g1;
        s_acc[nt][3] *= g1;
      }
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        uint32_t ak[4];
        Ldsm4T(ak, ATransposedAddr(kgs, kKP, 16 * mt, 16 * kk, lane));
#pragma unroll
        for (int np = 0; np < kNs / 2; ++np) {
          uint32_t bfr[4];
          Ldsm4T(bfr, BKMajorAddr(db, kBVP, 16 * kk, 8 * (ns0 + 2 * np), lane));
          MmaF16(s_acc[2 * np], ak, bfr[0], bfr[1]);
          MmaF16(s_acc[2 * np + 1], ak, bfr[2], bfr[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < kNs; ++nt) {
        const int col = 8 * (ns0 + nt) + 2 * t4;
        *reinterpret_cast<uint32_t*>(sb + key0 * kBVP + col) =
            PackHalf2(s_acc[nt][0], s_acc[nt][1]);
        *reinterpret_cast<uint32_t*>(sb + (key0 + 8) * kBVP + col) =
            PackHalf2(s_acc[nt][2], s_acc[nt][3]);
      }
    }
    ev_cur = ev_next;
  }

#pragma unroll
  for (int nt = 0; nt < kNs; ++nt) {
    const int col = vb * BV + 8 * (ns0 + nt) + 2 * t4;
    *reinterpret_cast<float2*>(state + key0 * V + col) =
        make_float2(s_acc[nt][0] * up, s_acc[nt][1] * up);
    *reinterpret_cast<float2*>(state + (key0 + 8) * V + col) =
        make_float2(s_acc[nt][2] * up, s_acc[nt][3] * up);
  }
}

}  // namespace kls::kernels::kda_chunk

#endif  // KLS_KERNELS_KDA_KDA_CHUNK_KERNELS_CUH_

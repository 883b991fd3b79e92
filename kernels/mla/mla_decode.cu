// MLA decode: absorbed attention of one query per sequence over the paged latent cache
// (contract: mla.h; math: README.md "Absorbed form" and "CUDA kernels"). Also the cache-append
// kernel.
//
// Split kernel. One CTA of 256 threads (8 warps) per (context split, group of ≤ 32 heads,
// sequence), grid (splits, head groups, N) with the split fastest so the CTAs of one sequence
// run together and share its query rows in L2. All heads of a group use each cache row, so a
// row is read from HBM once per group (MQA form; Kimi-Linear-48B has one group of 32 heads).
// Split s of a sequence of length L covers tokens [s·c, min((s+1)·c, L)) with
// c = roundup(ceil(L / splits), 32), computed on the device from seq_lens, so the split count is
// a host-side constant (CUDA graphs) and any trailing splits may be empty.
// The CTA walks its range in tiles of 32 tokens through a 4-stage cp.async ring (three tiles in
// flight while one is used; each token's row is looked up in the block table, so any page size
// works). Per tile:
//   1. S = Q·Kᵀ on the tensor cores (bf16 m16n8k16, fp32 accumulation): the MMA rows are the
//      heads (16 or 32), the columns the 32 tokens, the depth the Dc + Dr = 576 key channels,
//      split in 4 quarters over the warps; each warp keeps its quarter of Q as A fragments in
//      registers for the whole CTA (36 registers at 576) and reads only cache rows from shared
//      memory. The four partial S tiles are summed through shared memory.
//   2. Online softmax in fp32, exp2 domain: a group of 8 (16) threads owns a head row of the
//      tile; row max and sum by shuffles; P rounded to bf16 into shared memory, and the rescale
//      factor of each row.
//   3. O += P·V on the tensor cores: V is the tile's first Dc channels (the latent, read in place
//      with ldmatrix.trans); each warp owns Dc/8 output columns for all heads (64 fp32
//      registers at Dc = 512).
// Three __syncthreads per tile. Shared memory at Dc = 512, 32 heads: 4 × 37.4 KB ring (rows
// padded to 584 elements so ldmatrix is conflict-free) + 18 KB partial scores + 2.5 KB P
// = 167 KB, one CTA per SM. With one split the CTA writes out_latent (bf16) itself; otherwise it
// writes its normalized fp32 output and log2-sum-exp (−inf for an empty split) to the workspace
// and a combine kernel merges the splits.
//
// Combine kernel. One CTA of 128 threads per (sequence·head, 128 output columns): the weights
// 2^(lse_s − max) of all splits in shared memory, then each warp sums a quarter of the splits
// (float4 per lane) and the warps' sums are added.
//
// Split count (host, MlaDecodeNumSplits): minimizes waves × (tokens per split + 128), where a
// wave is one CTA per SM slot and 128 tokens stand for a CTA's fixed cost (query load, pipeline
// fill, the partial write and its read back). B = 1, H = 32 on 132 SMs gives ~132 splits.
//
// Limits (host-checked, cudaErrorInvalidValue): (Dc, Dr) ∈ {(512, 64), (256, 64), (64, 16)};
// page_size a multiple of 16 in [16, 256]; max_pages_per_seq·page_size < 2³¹; N ≤ 65535;
// splits ≤ 1024. Device data is clamped (seq_lens) or range-checked (page ids) before it is used
// for addressing.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/mla/mla.h"
#include "kernels/mla/mla_mma.cuh"

namespace kls::kernels {
namespace mla {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileTokens = 32;
constexpr int kStages = 4;
constexpr int kKGroups = 4;  // warps along the QKᵀ depth
constexpr int kMaxSplits = 1024;
constexpr int kSplitOverheadTokens = 128;
constexpr float kLog2e = 1.4426950408889634f;

constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int kDcT, int kDrT, int kMTilesT>
struct DecodeConfig {
  static constexpr int kDc = kDcT;
  static constexpr int kDr = kDrT;
  static constexpr int kMTiles = kMTilesT;
  static constexpr int kDk = kDc + kDr;  // key width (cache row)
  static constexpr int kK16 = kDk / 16;  // QKᵀ depth steps
  static constexpr int kHeads = 16 * kMTiles;
  static constexpr int kNGroups = kWarps / (kMTiles * kKGroups);
  static constexpr int kNTilesQk = kTileTokens / 8 / kNGroups;  // n8 tiles per warp in QKᵀ
  static constexpr int kKSteps = (kK16 + kKGroups - 1) / kKGroups;
  static constexpr int kNTilesPv = kDc / 8 / kWarps;  // n8 output tiles per warp in P·V
  static constexpr int kRowStride = kDk + 8;          // smem elements per token row
  static constexpr int kPStride = kTileTokens + 8;
  static constexpr int kSStride = kTileTokens + 4;  // fp32 partial scores
  static constexpr int kStageElems = kTileTokens * kRowStride;
  static constexpr int kKvBytes = kStages * kStageElems * 2;
  static constexpr int kSPartBytes = kKGroups * kHeads * kSStride * 4;
  static constexpr int kPBytes = kHeads * kPStride * 2;
  static constexpr int kSmemBytes = kKvBytes + kSPartBytes + kPBytes + 2 * kHeads * 4;
  static constexpr int kColsPerThread = kHeads * kTileTokens / kThreads;  // softmax
  static constexpr int kLanesPerRow = kTileTokens / kColsPerThread;
  static constexpr int kRowChunks = kDk / 8;  // 16-byte chunks per cache row

  static_assert(kMTiles == 1 || kMTiles == 2);
  static_assert(kDc % (8 * kWarps) == 0 && kDr % 16 == 0 && kDr > 0);
  static_assert(kNGroups * kMTiles * kKGroups == kWarps && kNTilesQk % 2 == 0);
  static_assert(kColsPerThread == 2 || kColsPerThread == 4);
  static_assert(kTileTokens % kWarps == 0);
  static_assert(kSmemBytes <= 227 * 1024);
};

struct DecodeArgs {
  MlaDecodeParams p;
  float* part_o;    // [N, H, splits, Dc] fp32, normalized per split
  float* part_lse;  // [N, H, splits] fp32, log2-sum-exp of the scaled scores (−inf: empty)
};

// Issues the cp.async copies of tokens [tok0, tok0 + 32) into a stage (rows at or past `end`, and
// rows in pages outside the pool, are zero-filled and never read).
template <class C>
__device__ __forceinline__ void LoadTile(bf16* dst, const MlaDecodeParams& p, const int32_t* table,
                                         int tok0, int end, int warp, int lane) {
  constexpr int kRowsPerWarp = kTileTokens / kWarps;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = warp * kRowsPerWarp + r;
    const int tok = tok0 + row;
    bool valid = tok < end;
    const bf16* src = p.cache_pages;
    if (valid) {
      const int page = __ldg(table + tok / p.page_size);
      valid = page >= 0 && page < p.num_pages;
      if (valid) {
        src += (static_cast<int64_t>(page) * p.page_size + tok % p.page_size) * C::kDk;
      }
    }
#pragma unroll
    for (int c = lane; c < C::kRowChunks; c += 32) {
      CpAsync16(dst + row * C::kRowStride + c * 8, src + (valid ? c * 8 : 0), valid);
    }
  }
}

// Two query elements (k, k + 1) of head h as a bf16x2 word; zero for padded heads and steps.
template <class C>
__device__ __forceinline__ uint32_t QueryWord(const MlaDecodeParams& p, int b, int h, int k) {
  if (h >= p.num_heads || k >= C::kDk) return 0u;
  const int64_t row = static_cast<int64_t>(b) * p.num_heads + h;
  if (k < C::kDc) return *reinterpret_cast<const uint32_t*>(p.q_latent + row * C::kDc + k);
  return *reinterpret_cast<const uint32_t*>(p.q_pe + row * C::kDr + (k - C::kDc));
}

template <class C>
__global__ void __launch_bounds__(kThreads, 1)
    MlaDecodeSplitKernel(const __grid_constant__ DecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* const kv = reinterpret_cast<bf16*>(smem);                     // [kStages][32][kRowStride]
  float* const spart = reinterpret_cast<float*>(smem + C::kKvBytes);  // [kKGroups][heads][..]
  bf16* const ps = reinterpret_cast<bf16*>(smem + C::kKvBytes + C::kSPartBytes);  // [heads][..]
  float* const alpha_s =
      reinterpret_cast<float*>(smem + C::kKvBytes + C::kSPartBytes + C::kPBytes);  // [heads]
  float* const inv_l_s = alpha_s + C::kHeads;                                      // [heads]

  const MlaDecodeParams& p = a.p;
  const int split = static_cast<int>(blockIdx.x);
  const int num_splits = static_cast<int>(gridDim.x);
  const int head0 = static_cast<int>(blockIdx.y) * C::kHeads;
  const int b = static_cast<int>(blockIdx.z);
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int num_heads = p.num_heads;

  // The token range of this split, from the device-side length (clamped to the block table).
  const int capacity = p.max_pages_per_seq * p.page_size;  // < 2^31, host-checked
  const int seq_len = min(max(p.seq_lens[b], 0), capacity);
  const int per_split =
      static_cast<int>(CeilDiv(CeilDiv(seq_len, num_splits), kTileTokens) * kTileTokens);
  const int start =
      static_cast<int>(min(static_cast<int64_t>(split) * per_split, static_cast<int64_t>(seq_len)));
  const int end = min(start + per_split, seq_len);

  if (start >= end) {  // empty split (or empty sequence): zeros and lse = −inf
    for (int i = tid; i < C::kHeads * (C::kDc / 4); i += kThreads) {
      const int h = head0 + i / (C::kDc / 4);
      const int col = (i % (C::kDc / 4)) * 4;
      if (h >= num_heads) continue;
      const int64_t row = static_cast<int64_t>(b) * num_heads + h;
      if (num_splits == 1) {
        *reinterpret_cast<uint2*>(p.out_latent + row * C::kDc + col) = make_uint2(0u, 0u);
      } else {
        *reinterpret_cast<float4*>(a.part_o + (row * num_splits + split) * C::kDc + col) =
            make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    if (num_splits > 1 && tid < C::kHeads && head0 + tid < num_heads) {
      a.part_lse[(static_cast<int64_t>(b) * num_heads + head0 + tid) * num_splits + split] =
          -INFINITY;
    }
    return;
  }

  const int32_t* const table = p.block_table + static_cast<int64_t>(b) * p.max_pages_per_seq;
  const int num_tiles = static_cast<int>(CeilDiv(end - start, kTileTokens));
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < num_tiles) {
      LoadTile<C>(kv + st * C::kStageElems, p, table, start + st * kTileTokens, end, warp, lane);
    }
    CpAsyncCommit();
  }

  // Warp roles in QKᵀ: depth quarter kg, head tile mt, token group ng.
  const int kg = warp % kKGroups;
  const int mt = (warp / kKGroups) % C::kMTiles;
  const int ng = warp / (kKGroups * C::kMTiles);
  uint32_t qa[C::kKSteps][4];
  {
    const int h_lo = head0 + mt * 16 + g, h_hi = h_lo + 8;
#pragma unroll
    for (int j = 0; j < C::kKSteps; ++j) {
      const int k = (kg * C::kKSteps + j) * 16 + 2 * t;
      qa[j][0] = QueryWord<C>(p, b, h_lo, k);
      qa[j][1] = QueryWord<C>(p, b, h_hi, k);
      qa[j][2] = QueryWord<C>(p, b, h_lo, k + 8);
      qa[j][3] = QueryWord<C>(p, b, h_hi, k + 8);
    }
  }

  // Softmax roles: row srow (a head of the group), columns scol .. scol + kColsPerThread − 1.
  const int srow = tid / C::kLanesPerRow;
  const int scol = (tid % C::kLanesPerRow) * C::kColsPerThread;
  const float scale_log2 = p.scale * kLog2e;
  float m_run = -INFINITY, l_run = 0.f;

  // P·V roles: all head rows, output columns [col0, col0 + 8·kNTilesPv).
  const int col0 = warp * C::kNTilesPv * 8;
  float o[C::kMTiles][C::kNTilesPv][4];
#pragma unroll
  for (int i = 0; i < C::kMTiles; ++i) {
#pragma unroll
    for (int n = 0; n < C::kNTilesPv; ++n) o[i][n][0] = o[i][n][1] = o[i][n][2] = o[i][n][3] = 0.f;
  }

  for (int it = 0; it < num_tiles; ++it) {
    CpAsyncWait<kStages - 2>();  // this thread's copies of tile `it` have landed
    __syncthreads();             // everyone's have; everyone is done with tile it − 1
    {
      const int next = it + kStages - 1;
      if (next < num_tiles) {
        LoadTile<C>(kv + (next % kStages) * C::kStageElems, p, table, start + next * kTileTokens,
                    end, warp, lane);
      }
      CpAsyncCommit();
    }
    const bf16* const tile = kv + (it % kStages) * C::kStageElems;
    const int tok0 = start + it * kTileTokens;

    // 1. Partial scores of this warp's depth quarter.
    {
      float acc[C::kNTilesQk][4];
#pragma unroll
      for (int n = 0; n < C::kNTilesQk; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
      for (int j = 0; j < C::kKSteps; ++j) {
        const int ks = kg * C::kKSteps + j;
        if (ks < C::kK16) {
#pragma unroll
          for (int np = 0; np < C::kNTilesQk / 2; ++np) {
            uint32_t bfrag[4];
            Ldsm4(bfrag,
                  BNMajorAddr(tile, C::kRowStride, ks * 16, ng * C::kNTilesQk * 8 + np * 16, lane));
            MmaBf16(acc[2 * np], qa[j], bfrag[0], bfrag[1]);
            MmaBf16(acc[2 * np + 1], qa[j], bfrag[2], bfrag[3]);
          }
        }
      }
      float* const sp = spart + (kg * C::kHeads + mt * 16) * C::kSStride;
#pragma unroll
      for (int n = 0; n < C::kNTilesQk; ++n) {
        const int col = (ng * C::kNTilesQk + n) * 8 + 2 * t;
        *reinterpret_cast<float2*>(sp + g * C::kSStride + col) = make_float2(acc[n][0], acc[n][1]);
        *reinterpret_cast<float2*>(sp + (g + 8) * C::kSStride + col) =
            make_float2(acc[n][2], acc[n][3]);
      }
    }
    __syncthreads();

    // 2. Online softmax of row srow over this tile.
    {
      float s[C::kColsPerThread];
#pragma unroll
      for (int j = 0; j < C::kColsPerThread; ++j) s[j] = 0.f;
#pragma unroll
      for (int q = 0; q < kKGroups; ++q) {
        const float* src = spart + (q * C::kHeads + srow) * C::kSStride + scol;
        if constexpr (C::kColsPerThread == 4) {
          const float4 v = *reinterpret_cast<const float4*>(src);
          s[0] += v.x;
          s[1] += v.y;
          s[2] += v.z;
          s[3] += v.w;
        } else {
          const float2 v = *reinterpret_cast<const float2*>(src);
          s[0] += v.x;
          s[1] += v.y;
        }
      }
      const int valid = end - tok0;  // ≥ 1: the tile starts inside the range
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < C::kColsPerThread; ++j) {
        s[j] = scol + j < valid ? s[j] * scale_log2 : -INFINITY;
        tile_max = fmaxf(tile_max, s[j]);
      }
      tile_max = WarpMaxXor(tile_max, C::kLanesPerRow);
      const float m_new = fmaxf(m_run, tile_max);  // finite: the row has a valid column
      const float alpha = exp2f(m_run - m_new);    // 0 on the first tile
      float pv[C::kColsPerThread];
      float psum = 0.f;
#pragma unroll
      for (int j = 0; j < C::kColsPerThread; ++j) {
        pv[j] = RoundBf16(exp2f(s[j] - m_new));  // the weights P·V uses, summed as such
        psum += pv[j];
      }
      psum = WarpSumXor(psum, C::kLanesPerRow);
      l_run = l_run * alpha + psum;
      m_run = m_new;
      bf16* const dst = ps + srow * C::kPStride + scol;
      if constexpr (C::kColsPerThread == 4) {
        *reinterpret_cast<uint2*>(dst) =
            make_uint2(PackBf16x2(pv[0], pv[1]), PackBf16x2(pv[2], pv[3]));
      } else {
        *reinterpret_cast<uint32_t*>(dst) = PackBf16x2(pv[0], pv[1]);
      }
      if (tid % C::kLanesPerRow == 0) alpha_s[srow] = alpha;
    }
    __syncthreads();

    // 3. O = alpha·O + P·V over the tile's 32 tokens.
#pragma unroll
    for (int i = 0; i < C::kMTiles; ++i) {
      const float a_lo = alpha_s[i * 16 + g], a_hi = alpha_s[i * 16 + g + 8];
#pragma unroll
      for (int n = 0; n < C::kNTilesPv; ++n) {
        o[i][n][0] *= a_lo;
        o[i][n][1] *= a_lo;
        o[i][n][2] *= a_hi;
        o[i][n][3] *= a_hi;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kTileTokens / 16; ++kk) {
      uint32_t pa[C::kMTiles][4];
#pragma unroll
      for (int i = 0; i < C::kMTiles; ++i) {
        Ldsm4(pa[i], ARowMajorAddr(ps, C::kPStride, i * 16, kk * 16, lane));
      }
#pragma unroll
      for (int np = 0; np < C::kNTilesPv / 2; ++np) {
        uint32_t bfrag[4];
        Ldsm4T(bfrag, BKMajorAddr(tile, C::kRowStride, kk * 16, col0 + np * 16, lane));
#pragma unroll
        for (int i = 0; i < C::kMTiles; ++i) {
          MmaBf16(o[i][2 * np], pa[i], bfrag[0], bfrag[1]);
          MmaBf16(o[i][2 * np + 1], pa[i], bfrag[2], bfrag[3]);
        }
      }
      if constexpr (C::kNTilesPv % 2 == 1) {
        constexpr int n = C::kNTilesPv - 1;
        uint32_t bfrag[2];
        Ldsm2T(bfrag, BKMajorAddr(tile, C::kRowStride, kk * 16, col0 + n * 8, lane));
#pragma unroll
        for (int i = 0; i < C::kMTiles; ++i) MmaBf16(o[i][n], pa[i], bfrag[0], bfrag[1]);
      }
    }
  }
  CpAsyncWait<0>();  // nothing useful is pending (only empty groups), but leave none behind

  // Normalize and store.
  if (tid % C::kLanesPerRow == 0) {
    inv_l_s[srow] = 1.f / l_run;  // l_run ≥ 1: the row max contributes exp2(0)
    const int h = head0 + srow;
    if (num_splits > 1 && h < num_heads) {
      a.part_lse[(static_cast<int64_t>(b) * num_heads + h) * num_splits + split] =
          m_run + log2f(l_run);
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < C::kMTiles; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = i * 16 + g + 8 * half;
      const int h = head0 + r;
      if (h >= num_heads) continue;
      const float inv = inv_l_s[r];
      const int64_t row = static_cast<int64_t>(b) * num_heads + h;
#pragma unroll
      for (int n = 0; n < C::kNTilesPv; ++n) {
        const int col = col0 + n * 8 + 2 * t;
        const float x = o[i][n][2 * half] * inv, y = o[i][n][2 * half + 1] * inv;
        if (num_splits == 1) {
          *reinterpret_cast<uint32_t*>(p.out_latent + row * C::kDc + col) = PackBf16x2(x, y);
        } else {
          *reinterpret_cast<float2*>(a.part_o + (row * num_splits + split) * C::kDc + col) =
              make_float2(x, y);
        }
      }
    }
  }
}

constexpr int kCombineThreads = 128;
constexpr int kCombineWarps = kCombineThreads / 32;
constexpr int kCombineCols = 4 * 32;  // output columns per CTA (a float4 per lane)

__device__ __forceinline__ float BlockReduce(float x, bool is_max, float* red) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  x = is_max ? WarpMaxXor(x, 32) : WarpSumXor(x, 32);
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < kCombineWarps; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
  __syncthreads();  // red is reused by the next reduction
  return r;
}

// Merges the splits of one (sequence, head) for 128 output columns.
__global__ void __launch_bounds__(kCombineThreads)
    MlaDecodeCombineKernel(const float* part_o, const float* part_lse, bf16* out, int dc,
                           int num_splits) {
  __shared__ float weights[kMaxSplits];
  __shared__ float red[kCombineWarps];
  __shared__ float4 acc_s[kCombineWarps][32];
  const int64_t bh = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int col = static_cast<int>(blockIdx.y) * kCombineCols + lane * 4;
  const float* const lse = part_lse + bh * num_splits;

  float mx = -INFINITY;
  for (int s = tid; s < num_splits; s += kCombineThreads) mx = fmaxf(mx, lse[s]);
  mx = BlockReduce(mx, true, red);
  if (mx == -INFINITY) {  // every split empty: the sequence has no cached token
    if (warp == 0 && col < dc) {
      *reinterpret_cast<uint2*>(out + bh * dc + col) = make_uint2(0u, 0u);
    }
    return;
  }
  float sum = 0.f;
  for (int s = tid; s < num_splits; s += kCombineThreads) {
    const float w = exp2f(lse[s] - mx);  // 0 for empty splits
    weights[s] = w;
    sum += w;
  }
  sum = BlockReduce(sum, false, red);  // its barriers also publish `weights`

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (col < dc) {
    const float* const base = part_o + bh * num_splits * dc + col;
#pragma unroll 8
    for (int s = warp; s < num_splits; s += kCombineWarps) {
      const float w = weights[s];
      const float4 v = *reinterpret_cast<const float4*>(base + static_cast<int64_t>(s) * dc);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
  }
  acc_s[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && col < dc) {
    float4 r = acc_s[0][lane];
#pragma unroll
    for (int w = 1; w < kCombineWarps; ++w) {
      const float4 v = acc_s[w][lane];
      r.x += v.x;
      r.y += v.y;
      r.z += v.z;
      r.w += v.w;
    }
    const float inv = 1.f / sum;
    *reinterpret_cast<uint2*>(out + bh * dc + col) =
        make_uint2(PackBf16x2(r.x * inv, r.y * inv), PackBf16x2(r.z * inv, r.w * inv));
  }
}

// ---------------------------------------------------------------------------------------------
// Cache append: one warp per new token, 16-byte copies.
// ---------------------------------------------------------------------------------------------

constexpr int kAppendThreads = 128;
constexpr int kAppendTokensPerCta = kAppendThreads / 32;

__global__ void __launch_bounds__(kAppendThreads)
    MlaCacheAppendKernel(const __grid_constant__ MlaCacheAppendParams p) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * kAppendTokensPerCta + (threadIdx.x >> 5);
  if (tok >= p.total_new || tok >= p.cu_seqlens[p.num_seqs]) return;
  // The sequence owning row `tok`: the last n with cu_seqlens[n] ≤ tok (skips empty ones).
  int lo = 0, hi = p.num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.cu_seqlens[mid] <= tok) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int n = lo;
  const int64_t pos = static_cast<int64_t>(p.seq_starts[n]) + (tok - p.cu_seqlens[n]);
  if (tok < p.cu_seqlens[n] || pos < 0 ||
      pos >= static_cast<int64_t>(p.max_pages_per_seq) * p.page_size) {
    return;
  }
  const int64_t page =
      p.block_table[static_cast<int64_t>(n) * p.max_pages_per_seq + pos / p.page_size];
  if (page < 0 || page >= p.num_pages) return;
  const uint4* const src = reinterpret_cast<const uint4*>(p.rows + tok * p.row_stride);
  uint4* const dst = reinterpret_cast<uint4*>(
      p.cache_pages + (page * p.page_size + pos % p.page_size) * static_cast<int64_t>(p.row_dim));
  for (int c = lane; c < p.row_dim / 8; c += 32) dst[c] = src[c];
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

bool Aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

template <int A, int B, int M>
struct Tag {
  using Config = DecodeConfig<A, B, M>;
};

// Calls f(Tag<Dc, Dr, m_tiles>{}) for a supported variant; false otherwise.
template <typename F>
bool DispatchDims(int dc, int dr, int m_tiles, F&& f) {
  if (dc == 512 && dr == 64) {
    m_tiles == 2 ? f(Tag<512, 64, 2>{}) : f(Tag<512, 64, 1>{});
  } else if (dc == 256 && dr == 64) {
    m_tiles == 2 ? f(Tag<256, 64, 2>{}) : f(Tag<256, 64, 1>{});
  } else if (dc == 64 && dr == 16) {
    m_tiles == 2 ? f(Tag<64, 16, 2>{}) : f(Tag<64, 16, 1>{});
  } else {
    return false;
  }
  return true;
}

bool SupportedShape(const MlaDecodeParams& p) {
  const bool dims = (p.head_dim_latent == 512 && p.head_dim_rope == 64) ||
                    (p.head_dim_latent == 256 && p.head_dim_rope == 64) ||
                    (p.head_dim_latent == 64 && p.head_dim_rope == 16);
  return dims && p.num_seqs >= 1 && p.num_seqs <= 65535 && p.num_heads >= 1 && p.max_seq_len >= 0 &&
         p.max_pages_per_seq >= 1 && p.num_pages >= 1 && p.page_size >= 16 && p.page_size <= 256 &&
         p.page_size % 16 == 0 &&
         static_cast<int64_t>(p.max_pages_per_seq) * p.page_size <= INT32_MAX &&
         p.num_splits >= 0 && p.num_splits <= kMaxSplits;
}

int MTiles(const MlaDecodeParams& p) { return p.num_heads > 16 ? 2 : 1; }
int HeadGroups(const MlaDecodeParams& p) {
  const int heads_per_cta = 16 * MTiles(p);
  return (p.num_heads + heads_per_cta - 1) / heads_per_cta;
}

// Per-device caches (bit/entry d for device d < 64), so that a launch captured into a CUDA graph
// after a warm-up makes no attribute or occupancy calls.
constexpr int kMaxDevices = 64;

cudaError_t CurrentDevice(int* device) {
  const cudaError_t err = cudaGetDevice(device);
  if (err != cudaSuccess) return err;
  return *device >= 0 && *device < kMaxDevices ? cudaSuccess : cudaErrorInvalidDevice;
}

cudaError_t SmCount(int device, int* sms) {
  static std::atomic<int> cache[kMaxDevices];
  const int cached = cache[device].load(std::memory_order_acquire);
  if (cached > 0) {
    *sms = cached;
    return cudaSuccess;
  }
  const cudaError_t err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  cache[device].store(*sms, std::memory_order_release);
  return cudaSuccess;
}

// Raises the split kernel's shared-memory limit (once per device) and returns its resident CTAs
// per SM.
template <class C>
cudaError_t PrepareSplitKernel(int device, int* ctas_per_sm) {
  static std::atomic<int> cache[kMaxDevices];
  const int cached = cache[device].load(std::memory_order_acquire);
  if (cached > 0) {
    *ctas_per_sm = cached;
    return cudaSuccess;
  }
  cudaError_t err = cudaFuncSetAttribute(
      MlaDecodeSplitKernel<C>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  int n = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, MlaDecodeSplitKernel<C>, kThreads,
                                                      C::kSmemBytes);
  if (err != cudaSuccess) return err;
  n = std::max(n, 1);
  cache[device].store(n, std::memory_order_release);
  *ctas_per_sm = n;
  return cudaSuccess;
}

// Minimizes waves × (tokens per split + a CTA's fixed cost in tokens).
int ChooseSplits(int64_t ctas_per_split, int64_t max_seq_len, int64_t slots) {
  const int64_t max_splits = std::clamp<int64_t>(CeilDiv(max_seq_len, kTileTokens), 1, kMaxSplits);
  int best = 1;
  int64_t best_cost = INT64_MAX;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t waves = CeilDiv(ctas_per_split * s, slots);
    const int64_t tokens = CeilDiv(CeilDiv(max_seq_len, s), kTileTokens) * kTileTokens;
    const int64_t cost = waves * (tokens + kSplitOverheadTokens);
    if (cost < best_cost) {
      best_cost = cost;
      best = static_cast<int>(s);
    }
  }
  return best;
}

struct DecodePlan {
  int splits = 0;
  int head_groups = 0;
  size_t part_o_bytes = 0;  // 256-byte aligned
  size_t workspace_bytes = 0;
};

cudaError_t MakePlan(const MlaDecodeParams& p, DecodePlan* plan) {
  if (!SupportedShape(p)) return cudaErrorInvalidValue;
  plan->head_groups = HeadGroups(p);
  if (p.num_splits > 0) {
    plan->splits = p.num_splits;
  } else {
    int device = 0, sms = 0, ctas_per_sm = 0;
    cudaError_t err = CurrentDevice(&device);
    if (err != cudaSuccess) return err;
    err = SmCount(device, &sms);
    if (err != cudaSuccess) return err;
    DispatchDims(p.head_dim_latent, p.head_dim_rope, MTiles(p), [&](auto tag) {
      err = PrepareSplitKernel<typename decltype(tag)::Config>(device, &ctas_per_sm);
    });
    if (err != cudaSuccess) return err;
    plan->splits = ChooseSplits(static_cast<int64_t>(p.num_seqs) * plan->head_groups, p.max_seq_len,
                                static_cast<int64_t>(sms) * ctas_per_sm);
  }
  if (plan->splits > 1) {
    const size_t rows = static_cast<size_t>(p.num_seqs) * static_cast<size_t>(p.num_heads) *
                        static_cast<size_t>(plan->splits);
    const auto align = [](size_t x) { return (x + 255) & ~static_cast<size_t>(255); };
    plan->part_o_bytes = align(rows * static_cast<size_t>(p.head_dim_latent) * sizeof(float));
    plan->workspace_bytes = plan->part_o_bytes + align(rows * sizeof(float));
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace mla

int MlaDecodeNumSplits(const MlaDecodeParams& params) {
  mla::DecodePlan plan;
  return mla::MakePlan(params, &plan) == cudaSuccess ? plan.splits : 0;
}

size_t MlaDecodeWorkspaceBytes(const MlaDecodeParams& params) {
  mla::DecodePlan plan;
  return mla::MakePlan(params, &plan) == cudaSuccess ? plan.workspace_bytes : 0;
}

cudaError_t LaunchMlaDecode(const MlaDecodeParams& params, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  using mla::Aligned;
  const MlaDecodeParams& p = params;
  if (!mla::SupportedShape(p) || !std::isfinite(p.scale)) return cudaErrorInvalidValue;
  if (p.q_latent == nullptr || p.q_pe == nullptr || p.cache_pages == nullptr ||
      p.block_table == nullptr || p.seq_lens == nullptr || p.out_latent == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (!Aligned(p.q_latent, 4) || !Aligned(p.q_pe, 4) || !Aligned(p.cache_pages, 16) ||
      !Aligned(p.out_latent, 16)) {
    return cudaErrorInvalidValue;
  }
  mla::DecodePlan plan;
  cudaError_t err = mla::MakePlan(p, &plan);
  if (err != cudaSuccess) return err;
  if (plan.workspace_bytes > 0 &&
      (workspace == nullptr || !Aligned(workspace, 16) || workspace_bytes < plan.workspace_bytes)) {
    return cudaErrorInvalidValue;
  }
  int device = 0, ctas_per_sm = 0;
  err = mla::CurrentDevice(&device);
  if (err != cudaSuccess) return err;

  mla::DecodeArgs args;
  args.p = p;
  args.part_o = plan.workspace_bytes > 0 ? static_cast<float*>(workspace) : nullptr;
  args.part_lse =
      plan.workspace_bytes > 0
          ? reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + plan.part_o_bytes)
          : nullptr;
  const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(plan.head_groups),
                  static_cast<unsigned>(p.num_seqs));
  mla::DispatchDims(p.head_dim_latent, p.head_dim_rope, mla::MTiles(p), [&](auto tag) {
    using C = typename decltype(tag)::Config;
    err = mla::PrepareSplitKernel<C>(device, &ctas_per_sm);
    if (err != cudaSuccess) return;
    mla::MlaDecodeSplitKernel<C><<<grid, mla::kThreads, C::kSmemBytes, stream>>>(args);
    err = cudaGetLastError();
  });
  if (err != cudaSuccess || plan.splits == 1) return err;
  const dim3 combine_grid(
      static_cast<unsigned>(static_cast<int64_t>(p.num_seqs) * p.num_heads),
      static_cast<unsigned>((p.head_dim_latent + mla::kCombineCols - 1) / mla::kCombineCols));
  mla::MlaDecodeCombineKernel<<<combine_grid, mla::kCombineThreads, 0, stream>>>(
      args.part_o, args.part_lse, p.out_latent, p.head_dim_latent, plan.splits);
  return cudaGetLastError();
}

cudaError_t LaunchMlaCacheAppend(const MlaCacheAppendParams& params, cudaStream_t stream) {
  using mla::Aligned;
  const MlaCacheAppendParams& p = params;
  if (p.num_seqs < 1 || p.row_dim < 8 || p.row_dim % 8 != 0 || p.page_size < 1 ||
      p.max_pages_per_seq < 1 || p.num_pages < 1 || p.total_new < 0 || p.row_stride < p.row_dim ||
      p.row_stride % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.cache_pages == nullptr || p.block_table == nullptr || p.seq_starts == nullptr ||
      p.cu_seqlens == nullptr || !Aligned(p.cache_pages, 16)) {
    return cudaErrorInvalidValue;
  }
  if (p.total_new == 0) return cudaSuccess;
  if (p.rows == nullptr || !Aligned(p.rows, 16)) return cudaErrorInvalidValue;
  const int64_t blocks = mla::CeilDiv(p.total_new, mla::kAppendTokensPerCta);
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  mla::MlaCacheAppendKernel<<<static_cast<unsigned>(blocks), mla::kAppendThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kls::kernels

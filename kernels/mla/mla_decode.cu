// MLA decode: absorbed attention of one query per sequence over the paged latent cache
// (contract: mla.h; math: README.md "Absorbed form" and "CUDA kernels"). Also the cache-append
// kernel.
//
// Split kernel (sm_90a: TMA loads, warpgroup MMAs). One CTA of 128 threads (one warpgroup) per
// (context split, group of ≤ 32 heads, sequence), grid (splits, head groups, N) with the split
// fastest so the CTAs of one sequence run together and share its query rows in L2. All heads of
// a group use each cache row, so a row is read from HBM once per group (MQA form;
// Kimi-Linear-48B has one group of 32 heads). Split s of a sequence of length L covers tokens
// [s·c, min((s+1)·c, L)) with c = roundup(ceil(L / splits), 64), computed on the device from
// seq_lens, so the split count is a host-side constant (CUDA graphs) and trailing splits may be
// empty.
// The CTA walks its range in tiles of 64 tokens. Warp 0 loads a tile with TMA boxes of 16 rows ×
// 64 channels (a 16-row block never crosses a page; each block's page comes from the block
// table) into 64-channel grids with the 128-byte swizzle, counted by one mbarrier. Per tile:
//   1. Sᵀ = K·Qᵀ (tokens × heads) by wgmma m64nHk16 over the Dc + Dr = 576 channels, both
//      operands in shared memory (Q was copied there once per CTA).
//   2. Online softmax per head column in fp32, exp2 domain: column max over the 64 rows by
//      shuffles and over the four warps through shared memory; Pᵀ (bf16, heads × tokens) into a
//      swizzled grid; the accumulators rescaled.
//   3. Oᵀ += Vᵀ·Pᵀ (channels × heads) by wgmma with A = the tile's first Dc channels read
//      M-major, so the latent serves as key and value without a copy: Dc/64 MMAs of 64 channels
//      per k-step, 128 fp32 accumulators per thread at Dc = 512.
// Then warp 0 issues the next tile into the same buffer. Shared memory at Dc = 512, 32 heads:
// 72 KB tile + 36 KB Q + 4 KB Pᵀ + 0.5 KB = 113 KB, 255 registers: two CTAs per SM, so one
// CTA's loads are in flight while the other computes. The last tile's rows past the range (and
// blocks whose page is outside the pool, never loaded) are zeroed in shared memory. With one
// split the CTA writes out_latent (bf16) itself; otherwise it writes its normalized fp32 output
// and log2-sum-exp (−inf for an empty split) to the workspace and a combine kernel merges the
// splits. Both outputs go through shared memory (transposed) for row-contiguous stores.
//
// Combine kernel. One CTA of 128 threads per (sequence·head, 128 output columns): the weights
// 2^(lse_s − max) of all splits in shared memory, then each warp sums a quarter of the splits
// (float4 per lane) and the warps' sums are added.
//
// Split count (host, MlaDecodeNumSplits): minimizes waves × (tokens per split + 128), where a
// wave is one CTA per SM slot (two per SM) and 128 tokens stand for a CTA's fixed cost (query
// load, the partial write and its read back). B = 1, H = 32 on 132 SMs gives ~264 splits.
//
// The launcher encodes the pool as a 2-D tensor map (cuTensorMapEncodeTiled through the runtime's
// driver entry point) on every call; a captured launch keeps it, so the pool must not move.
//
// Limits (host-checked, cudaErrorInvalidValue): (Dc, Dr) ∈ {(512, 64), (256, 64), (64, 16)};
// page_size a multiple of 16 in [16, 256]; max_pages_per_seq·page_size < 2³¹ and
// num_pages·page_size < 2³¹; N ≤ 65535; splits ≤ 1024. Device data is clamped (seq_lens) or
// range-checked (page ids) before it is used for addressing.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/mla/mla.h"
#include "kernels/mla/mla_mma.cuh"
#include "kernels/mla/mla_wgmma.cuh"

namespace kls::kernels {
namespace mla {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 128;  // one warpgroup
constexpr int kWarps = kThreads / 32;
constexpr int kTileTokens = 64;  // the M of the QKᵀ warpgroup MMA
constexpr int kBoxTokens = 16;   // rows of one TMA box: never crosses a page (sizes % 16 == 0)
constexpr int kBoxesPerColumn = kTileTokens / kBoxTokens;
// One tile buffer per CTA and two CTAs per SM, so that one CTA's MMAs and softmax overlap the
// other's loads; two buffers at one CTA per SM (loads two tiles ahead) measured slower: 61% vs
// 79% of copy at B = 1, L = 1M on an H200.
constexpr int kCtasPerSm = 2;
constexpr int kMaxSplits = 1024;
constexpr int kSplitOverheadTokens = 128;
constexpr float kLog2e = 1.4426950408889634f;

constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// kHeadsT: heads per CTA (16 or 32), the N of both warpgroup MMAs.
template <int kDcT, int kDrT, int kHeadsT>
struct DecodeConfig {
  static constexpr int kDc = kDcT;
  static constexpr int kDr = kDrT;
  static constexpr int kHeads = kHeadsT;
  static constexpr int kDk = kDc + kDr;             // key width (cache row)
  static constexpr int kColumns = (kDk + 63) / 64;  // 64-channel swizzled grids per row
  static constexpr int kKSteps = kDk / 16;          // QKᵀ depth steps
  static constexpr int kMBlocks = kDc / 64;         // P·V: 64 output channels per MMA
  static constexpr int kAcc = kHeads / 2;           // accumulator registers per m64nHk16
  static constexpr int kCols = kHeads / 4;          // head columns each thread owns
  static constexpr int kTileColumnBytes = kTileTokens * 128;
  static constexpr int kTileBytes = kColumns * kTileColumnBytes;
  static constexpr int kBoxBytes = kBoxTokens * 128;
  static constexpr int kQColumnBytes = kHeads * 128;
  static constexpr int kQBytes = kColumns * kQColumnBytes;
  static constexpr int kPBytes = kHeads * 128;  // Pᵀ: a head's 64 tokens fill one 128-byte row
  static constexpr int kRedBytes = kWarps * kHeads * 4;
  static constexpr int kSmemBytes = kTileBytes + kQBytes + kPBytes + kRedBytes + 16;
  static constexpr int kOutStride = kDc + 4;  // fp32, padded: conflict-free transposed writes

  static_assert(kHeads == 16 || kHeads == 32);
  static_assert(kDk % 16 == 0 && kDc % 64 == 0 && kDr > 0 && kDk * 2 % 16 == 0);
  static_assert(kTileBytes % 1024 == 0 && kQBytes % 1024 == 0 && kPBytes % 1024 == 0);
  static_assert(kHeads * kOutStride * 4 <= kTileBytes);  // the output transpose reuses the tile
  static_assert(kSmemBytes <= 113 * 1024);               // two CTAs per SM
};

struct DecodeArgs {
  CUtensorMap cache_map;  // 2-D [pool rows, Dk] bf16, box [16 rows, 64 channels], 128-B swizzle
  MlaDecodeParams p;
  float* part_o;    // [N, H, splits, Dc] fp32, normalized per split
  float* part_lse;  // [N, H, splits] fp32, log2-sum-exp of the scaled scores (−inf: empty)
};

// Lane l < 4 of warp 0: the pool row of the first token of 16-token block l of the tile at tok0,
// or −1 when the block starts at or past `end` or its page is outside the pool (not loaded).
__device__ __forceinline__ int BlockRow(const MlaDecodeParams& p, const int32_t* table, int tok0,
                                        int end, int lane) {
  if (lane >= kBoxesPerColumn) return -1;
  const int tok = tok0 + kBoxTokens * lane;
  if (tok >= end) return -1;
  const int page = __ldg(table + tok / p.page_size);
  return page >= 0 && page < p.num_pages ? page * p.page_size + tok % p.page_size : -1;
}

// Warp 0 arms the tile's barrier for the tile whose block rows `row` (lanes 0..3, BlockRow)
// holds: the bitmask of loaded blocks goes to *loaded_s (published by lane 0's arrival, read
// after the wait) and the barrier expects exactly their bytes. Returns the four rows in every
// lane.
template <class C>
__device__ __forceinline__ void ArmTile(uint64_t* bar, int* loaded_s, int row, int lane,
                                        int (&rows)[kBoxesPerColumn]) {
  const int loaded = static_cast<int>(__ballot_sync(0xffffffffu, row >= 0) & 0xFu);
#pragma unroll
  for (int k = 0; k < kBoxesPerColumn; ++k) rows[k] = __shfl_sync(0xffffffffu, row, k);
  if (lane == 0) {
    *loaded_s = loaded;
    MbarrierArriveExpectTx(bar, __popc(loaded) * C::kColumns * C::kBoxBytes);
  }
  __syncwarp();
}

// Warp 0 issues the TMA boxes (16 rows × 64 channels) of a tile's loaded blocks, every
// 64-channel grid.
template <class C>
__device__ __forceinline__ void IssueTile(const DecodeArgs& a, unsigned char* tile_s, uint64_t* bar,
                                          const int (&rows)[kBoxesPerColumn], int lane) {
  for (int box = lane; box < kBoxesPerColumn * C::kColumns; box += 32) {
    const int block = box / C::kColumns, column = box - block * C::kColumns;
    int r = rows[0];
#pragma unroll
    for (int k = 1; k < kBoxesPerColumn; ++k) r = block == k ? rows[k] : r;
    if (r >= 0) {
      TmaLoad2d(tile_s + column * C::kTileColumnBytes + block * C::kBoxBytes, &a.cache_map,
                column * 64, r, bar);
    }
  }
}

template <class C>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    MlaDecodeSplitKernel(const __grid_constant__ DecodeArgs a) {
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* const tile_s = smem;               // [columns][64 tokens][128 B], swizzled
  unsigned char* const q_s = smem + C::kTileBytes;  // [columns][heads][128 B]
  unsigned char* const p_s = q_s + C::kQBytes;      // Pᵀ [heads][64 tokens], swizzled
  float* const red_s = reinterpret_cast<float*>(p_s + C::kPBytes);  // [warps][heads]
  uint64_t* const bar = reinterpret_cast<uint64_t*>(p_s + C::kPBytes + C::kRedBytes);
  int* const loaded_s = reinterpret_cast<int*>(bar + 1);

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
  if ((kda_chunk::SmemAddr(smem) & 1023u) != 0) __trap();  // the swizzled grids need it

  const int32_t* const table = p.block_table + static_cast<int64_t>(b) * p.max_pages_per_seq;
  const int num_tiles = static_cast<int>(CeilDiv(end - start, kTileTokens));

  if (tid == 0) MbarrierInit(bar, 1);
  // Query rows into their swizzled grids (4-byte copies: the rows are only 4-byte aligned);
  // padded heads are zero-filled.
  for (int i = tid; i < C::kHeads * C::kDk / 2; i += kThreads) {
    const int hh = i / (C::kDk / 2), k = (i - hh * (C::kDk / 2)) * 2;
    const int h = head0 + hh;
    const bool valid = h < num_heads;
    const int64_t row = static_cast<int64_t>(b) * num_heads + (valid ? h : 0);
    const bf16* src =
        k < C::kDc ? p.q_latent + row * C::kDc + k : p.q_pe + row * C::kDr + (k - C::kDc);
    CpAsync4(q_s + (k / 64) * C::kQColumnBytes + Swizzle128Offset(hh, k % 64), src, valid);
  }
  kda_chunk::CpAsyncCommit();
  __syncthreads();  // the barrier is initialized
  if (warp == 0 && num_tiles > 0) {
    int rows[kBoxesPerColumn];
    ArmTile<C>(bar, loaded_s, BlockRow(p, table, start, end, lane), lane, rows);
    IssueTile<C>(a, tile_s, bar, rows, lane);
  }
  kda_chunk::CpAsyncWaitAll();

  // Descriptors (mla_wgmma.cuh). QKᵀ: A = the tile (tokens × channels, K-major), B = Q (heads
  // × channels, K-major). P·V as Oᵀ = Vᵀ·Pᵀ: A = the tile's first Dc channels read M-major
  // (channels × tokens), B = Pᵀ (heads × tokens, K-major).
  const uint64_t desc_k = SmemDescriptorSw128(tile_s, 16, 1024);
  const uint64_t desc_q = SmemDescriptorSw128(q_s, 16, 1024);
  const uint64_t desc_v = SmemDescriptorSw128(tile_s, C::kTileColumnBytes, 1024);
  const uint64_t desc_p = SmemDescriptorSw128(p_s, 16, 1024);

  // This thread's head columns: col(j, e) = 8j + 2t + e, index 2j + e; token rows r0, r0 + 8.
  const int r0 = 16 * warp + g;
  const float scale_log2 = p.scale * kLog2e;
  float m_run[C::kCols], l_part[C::kCols];
#pragma unroll
  for (int c = 0; c < C::kCols; ++c) {
    m_run[c] = -INFINITY;
    l_part[c] = 0.f;
  }
  float o[C::kMBlocks][C::kAcc];  // Oᵀ: rows = channels 64·mb + 16·warp + g (+8), cols = heads
#pragma unroll
  for (int mb = 0; mb < C::kMBlocks; ++mb) {
#pragma unroll
    for (int i = 0; i < C::kAcc; ++i) o[mb][i] = 0.f;
  }

  for (int it = 0; it < num_tiles; ++it) {
    const int tok0 = start + it * kTileTokens;
    const int valid = end - tok0;  // ≥ 1: the tile starts inside the range
    MbarrierWait(bar, it & 1);
    // Rows past the range, or of blocks not loaded (outside the pool), become zeros: their P is 0
    // and 0·garbage could be NaN.
    const int loaded = *loaded_s;
    if (valid < kTileTokens || loaded != (1 << kBoxesPerColumn) - 1) {
      for (int i = tid; i < kTileTokens * C::kColumns * 8; i += kThreads) {
        const int r = i / (C::kColumns * 8), rest = i - r * (C::kColumns * 8);
        if (r < valid && ((loaded >> (r / kBoxTokens)) & 1)) continue;
        *reinterpret_cast<uint4*>(tile_s + (rest >> 3) * C::kTileColumnBytes + r * 128 +
                                  (rest & 7) * 16) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    FenceProxyAsync();
    __syncthreads();  // the tile (and, on the first pass, Q) is ready for wgmma

    // 1. Sᵀ = K·Qᵀ (tokens × heads) over the Dc + Dr channels.
    float s[C::kAcc];
#pragma unroll
    for (int i = 0; i < C::kAcc; ++i) s[i] = 0.f;
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < C::kKSteps; ++ks) {
      const int column = ks / 4, within = (ks % 4) * 32;
      WgmmaBf16<C::kHeads, 0>(s, AdvanceDescriptor(desc_k, column * C::kTileColumnBytes + within),
                              AdvanceDescriptor(desc_q, column * C::kQColumnBytes + within),
                              ks > 0);
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceAccumulators(s);

    // 2. Online softmax per head column, exp2 domain: the tile's column max over the four warps.
    float tile_max[C::kCols];
#pragma unroll
    for (int j = 0; j < C::kHeads / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& lo = s[4 * j + e];
        float& hi = s[4 * j + 2 + e];
        lo = r0 < valid ? lo * scale_log2 : -INFINITY;
        hi = r0 + 8 < valid ? hi * scale_log2 : -INFINITY;
        float mx = fmaxf(lo, hi);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        tile_max[2 * j + e] = mx;
        if (g == 0) red_s[warp * C::kHeads + 8 * j + 2 * t + e] = mx;
      }
    }
    __syncthreads();
    float alpha[C::kCols];
#pragma unroll
    for (int j = 0; j < C::kHeads / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = 2 * j + e, col = 8 * j + 2 * t + e;
        float mx = tile_max[c];
#pragma unroll
        for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, red_s[w * C::kHeads + col]);
        const float m_new = fmaxf(m_run[c], mx);  // finite: the column has a valid row
        alpha[c] = exp2f(m_run[c] - m_new);       // 0 on the first tile
        m_run[c] = m_new;
        // The weights P·V uses, summed as such.
        const float p_lo = RoundBf16(exp2f(s[4 * j + e] - m_new));
        const float p_hi = RoundBf16(exp2f(s[4 * j + 2 + e] - m_new));
        l_part[c] = l_part[c] * alpha[c] + p_lo + p_hi;
        *reinterpret_cast<bf16*>(p_s + Swizzle128Offset(col, r0)) = __float2bfloat16_rn(p_lo);
        *reinterpret_cast<bf16*>(p_s + Swizzle128Offset(col, r0 + 8)) = __float2bfloat16_rn(p_hi);
      }
    }
#pragma unroll
    for (int mb = 0; mb < C::kMBlocks; ++mb) {
#pragma unroll
      for (int j = 0; j < C::kHeads / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          o[mb][4 * j + e] *= alpha[2 * j + e];
          o[mb][4 * j + 2 + e] *= alpha[2 * j + e];
        }
      }
    }
    FenceProxyAsync();
    __syncthreads();  // Pᵀ is complete

    // 3. Oᵀ += Vᵀ·Pᵀ over the tile's 64 tokens.
    WgmmaFence();
#pragma unroll
    for (int mb = 0; mb < C::kMBlocks; ++mb) {
#pragma unroll
      for (int ks = 0; ks < kTileTokens / 16; ++ks) {
        WgmmaBf16<C::kHeads, 1>(o[mb],
                                AdvanceDescriptor(desc_v, mb * C::kTileColumnBytes + ks * 2048),
                                AdvanceDescriptor(desc_p, ks * 32), true);
      }
    }
    WgmmaCommit();
    WgmmaWait<0>();
#pragma unroll
    for (int mb = 0; mb < C::kMBlocks; ++mb) FenceAccumulators(o[mb]);
    __syncthreads();  // every warp's MMAs are done with the tile and Pᵀ

    // Refill the buffer with the next tile. (Looking the pages up before the MMAs and starting the
    // Dr channels' grids right after QKᵀ measured no faster.)
    if (warp == 0 && it + 1 < num_tiles) {
      FenceProxyAsync();  // order this CTA's earlier generic writes of the tile before the TMA
      int rows[kBoxesPerColumn];
      ArmTile<C>(bar, loaded_s, BlockRow(p, table, tok0 + kTileTokens, end, lane), lane, rows);
      IssueTile<C>(a, tile_s, bar, rows, lane);
    }
  }

  // Row sums per head: this thread's rows, then the lanes of its column, then the warps.
#pragma unroll
  for (int j = 0; j < C::kHeads / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float l = l_part[2 * j + e];
      l += __shfl_xor_sync(0xffffffffu, l, 4);
      l += __shfl_xor_sync(0xffffffffu, l, 8);
      l += __shfl_xor_sync(0xffffffffu, l, 16);
      if (g == 0) red_s[warp * C::kHeads + 8 * j + 2 * t + e] = l;
    }
  }
  __syncthreads();
  float inv_l[C::kCols];
#pragma unroll
  for (int j = 0; j < C::kHeads / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = 2 * j + e, col = 8 * j + 2 * t + e;
      float l = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) l += red_s[w * C::kHeads + col];
      inv_l[c] = 1.f / l;  // l ≥ 1: the column max contributes exp2(0)
      const int h = head0 + col;
      if (num_splits > 1 && warp == 0 && g == 0 && h < num_heads) {
        a.part_lse[(static_cast<int64_t>(b) * num_heads + h) * num_splits + split] =
            m_run[c] + log2f(l);
      }
    }
  }

  // Normalized Oᵀ transposed through shared memory (the tile is free), then row-contiguous
  // stores.
  float* const out_s = reinterpret_cast<float*>(tile_s);  // [heads][kOutStride]
#pragma unroll
  for (int mb = 0; mb < C::kMBlocks; ++mb) {
#pragma unroll
    for (int j = 0; j < C::kHeads / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + 2 * t + e;
        const int ch = 64 * mb + 16 * warp + g;
        out_s[col * C::kOutStride + ch] = o[mb][4 * j + e] * inv_l[2 * j + e];
        out_s[col * C::kOutStride + ch + 8] = o[mb][4 * j + 2 + e] * inv_l[2 * j + e];
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < C::kHeads * (C::kDc / 4); i += kThreads) {
    const int hh = i / (C::kDc / 4), col = (i % (C::kDc / 4)) * 4;
    const int h = head0 + hh;
    if (h >= num_heads) continue;
    const float4 v = *reinterpret_cast<const float4*>(out_s + hh * C::kOutStride + col);
    const int64_t row = static_cast<int64_t>(b) * num_heads + h;
    if (num_splits == 1) {
      *reinterpret_cast<uint2*>(p.out_latent + row * C::kDc + col) =
          make_uint2(PackBf16x2(v.x, v.y), PackBf16x2(v.z, v.w));
    } else {
      *reinterpret_cast<float4*>(a.part_o + (row * num_splits + split) * C::kDc + col) = v;
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

// Calls f(Tag<Dc, Dr, heads per CTA>{}) for a supported variant; false otherwise.
template <typename F>
bool DispatchDims(int dc, int dr, int heads_per_cta, F&& f) {
  if (dc == 512 && dr == 64) {
    heads_per_cta == 32 ? f(Tag<512, 64, 32>{}) : f(Tag<512, 64, 16>{});
  } else if (dc == 256 && dr == 64) {
    heads_per_cta == 32 ? f(Tag<256, 64, 32>{}) : f(Tag<256, 64, 16>{});
  } else if (dc == 64 && dr == 16) {
    heads_per_cta == 32 ? f(Tag<64, 16, 32>{}) : f(Tag<64, 16, 16>{});
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
         p.num_pages <= INT32_MAX / p.page_size && p.num_splits >= 0 && p.num_splits <= kMaxSplits;
}

int HeadsPerCta(const MlaDecodeParams& p) { return p.num_heads > 16 ? 32 : 16; }
int HeadGroups(const MlaDecodeParams& p) {
  return (p.num_heads + HeadsPerCta(p) - 1) / HeadsPerCta(p);
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
  // Two CTAs per SM need (nearly) all of the unified L1/shared memory as shared memory.
  err =
      cudaFuncSetAttribute(MlaDecodeSplitKernel<C>, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared);
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

// The cache pool as a 2-D tensor map [num_pages · page_size rows, Dk] of bf16 for TMA: boxes of
// 16 rows × 64 channels, 128-byte swizzle, zeros outside (the tiny dims' second grid).
cudaError_t EncodeCacheMap(const MlaDecodeParams& p, CUtensorMap* map) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                             cudaEnableDefault, &found);
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)
               : nullptr;
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const int dk = p.head_dim_latent + p.head_dim_rope;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(dk),
                              static_cast<cuuint64_t>(p.num_pages) * p.page_size};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(dk) * sizeof(__nv_bfloat16)};
  const cuuint32_t box[2] = {64, kBoxTokens};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(
      map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<__nv_bfloat16*>(p.cache_pages), dims,
      strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
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
    DispatchDims(p.head_dim_latent, p.head_dim_rope, HeadsPerCta(p), [&](auto tag) {
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
  err = mla::EncodeCacheMap(p, &args.cache_map);
  if (err != cudaSuccess) return err;
  args.p = p;
  args.part_o = plan.workspace_bytes > 0 ? static_cast<float*>(workspace) : nullptr;
  args.part_lse =
      plan.workspace_bytes > 0
          ? reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + plan.part_o_bytes)
          : nullptr;
  const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(plan.head_groups),
                  static_cast<unsigned>(p.num_seqs));
  mla::DispatchDims(p.head_dim_latent, p.head_dim_rope, mla::HeadsPerCta(p), [&](auto tag) {
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

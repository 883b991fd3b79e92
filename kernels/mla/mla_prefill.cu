// MLA prefill: causal, non-absorbed attention over decompressed keys and values, varlen, with
// the queries the last len_q positions of each sequence's len_k keys (contract: mla.h; math:
// README.md "CUDA kernels"). Flash-attention style: the scores exist only as register tiles.
// Two kernels: (Dqk, Dv) = (192, 128) runs MlaPrefillWgmmaKernel (warpgroup MMAs, namespace wg
// below, described there); the tiny preset's (48, 32) runs MlaPrefillKernel, described here.
//
// CTA mapping. One CTA of 256 threads (8 warps) per (tile of 128 queries, sequence, head), on a
// 1-D grid ordered by query tile DESCENDING (head fastest, then sequence): under the causal mask
// a tile's work grows with its index, so the longest CTAs start first and the short ones fill
// the tail. Each warp owns 16 query rows; the CTA walks the keys it needs (0 .. the last query's
// position) in blocks of 64:
//   S = Q·Kᵀ (bf16 m16n8k16, fp32 accumulation; the warp's Q rows stay in registers as A
//       fragments for the whole CTA: 48 registers at Dqk = 192; K from shared memory through
//       ldmatrix), scaled into the exp2 domain, causally masked on the blocks that cross the
//       diagonal (a warp skips blocks that are entirely above its diagonal);
//   online softmax per row in registers (the 4 lanes of a row reduce with shuffles);
//   O += P·V with P re-packed from the S accumulators into A fragments (bf16), V through
//       ldmatrix.trans; O is 16 × Dv fp32 per warp (64 registers at Dv = 128).
// K and V blocks are double-buffered with cp.async: block j + 1 loads while block j is used.
// Shared memory at (192, 128): Q 50 KB + 2 × (K 25 KB + V 17 KB) = 134 KB (rows padded by 8
// elements so ldmatrix is conflict-free); one CTA per SM. Rows past a sequence's end are
// zero-filled and never stored.
//
// Numerics: fp32 scores, softmax statistics and output accumulators; P is rounded to bf16 for
// the P·V product (the row sums use the unrounded values); the output is rounded to bf16 once.
//
// Limits (host-checked, cudaErrorInvalidValue): (Dqk, Dv) ∈ {(192, 128), (48, 32)}; 16-byte
// aligned q, k, v, out and strides that are multiples of 8 elements; grid < 2³¹ CTAs.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

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

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockM = 16 * kWarps;  // queries per CTA
constexpr int kBlockN = 64;           // keys per block
constexpr float kLog2e = 1.4426950408889634f;

template <int kDqkT, int kDvT>
struct PrefillConfig {
  static constexpr int kDqk = kDqkT;
  static constexpr int kDv = kDvT;
  static constexpr int kQkStride = kDqk + 8;  // smem row strides (elements)
  static constexpr int kVStride = kDv + 8;
  static constexpr int kK16 = kDqk / 16;
  static constexpr int kNTilesS = kBlockN / 8;
  static constexpr int kNTilesO = kDv / 8;
  static constexpr int kQElems = kBlockM * kQkStride;
  static constexpr int kKElems = kBlockN * kQkStride;
  static constexpr int kVElems = kBlockN * kVStride;
  static constexpr int kSmemBytes = (kQElems + 2 * (kKElems + kVElems)) * 2;
  static_assert(kDqk % 16 == 0 && kDv % 16 == 0, "MMA tiles are 16 deep and 16 wide");
  static_assert(kSmemBytes <= 227 * 1024);
};

// cp.async of rows [0, kRows) of a [rows, kDim] tile whose row r lives at base + r·stride; rows
// at or past valid_rows are zero-filled without being read.
template <int kRows, int kDim, int kStride>
__device__ __forceinline__ void LoadRows(bf16* dst, const bf16* base, int64_t stride,
                                         int valid_rows, int tid) {
  constexpr int kChunks = kDim / 8;
#pragma unroll 4
  for (int i = tid; i < kRows * kChunks; i += kThreads) {
    const int row = i / kChunks, c = i % kChunks;
    const bool valid = row < valid_rows;
    const bf16* src = valid ? base + row * stride + c * 8 : base;
    CpAsync16(dst + row * kStride + c * 8, src, valid);
  }
}

// The work of this CTA: sequence n, head h, query tile [q0, q0 + rows_here) of its len_q
// queries, and the keys 0 .. kv_end − 1 they see, in n_blocks blocks of block_n. The 1-D grid
// runs the query tiles in descending order (head fastest, then sequence). `valid` is false when
// the tile starts past the sequence's queries (nothing to do).
struct PrefillTile {
  bool valid = false;
  int h = 0;
  int q_bos = 0, len_q = 0, k_bos = 0, len_k = 0;
  int q0 = 0, rows_here = 0;
  int offset = 0;  // position of local query 0 among the keys
  int kv_end = 0, n_blocks = 0;
};

__device__ __forceinline__ PrefillTile LocatePrefillTile(const MlaPrefillParams& p, int num_q_tiles,
                                                         int block_n) {
  PrefillTile w;
  const int64_t per_tile = static_cast<int64_t>(p.num_seqs) * p.num_heads;
  const int64_t linear = blockIdx.x;
  const int tile = num_q_tiles - 1 - static_cast<int>(linear / per_tile);
  const int rem = static_cast<int>(linear % per_tile);
  const int n = rem / p.num_heads;
  w.h = rem % p.num_heads;
  w.q_bos = p.cu_seqlens_q[n];
  w.len_q = p.cu_seqlens_q[n + 1] - w.q_bos;
  w.k_bos = p.cu_seqlens_k[n];
  w.len_k = p.cu_seqlens_k[n + 1] - w.k_bos;
  w.q0 = tile * kBlockM;
  if (w.q0 >= w.len_q) return w;
  w.valid = true;
  w.offset = w.len_k - w.len_q;
  w.rows_here = min(kBlockM, w.len_q - w.q0);
  // Keys any valid query of the tile sees: 0 .. offset + q0 + rows_here − 1.
  w.kv_end = max(0, min(w.len_k, w.offset + w.q0 + w.rows_here));
  w.n_blocks = (w.kv_end + block_n - 1) / block_n;
  return w;
}

// Both prefill kernels keep S and O as m16n8 accumulator fragments: for a lane (g = lane / 4,
// t = lane % 4) and n8 tile i, x[i][0..1] are row g, columns 8i + 2t and 8i + 2t + 1, and
// x[i][2..3] are row g + 8 at the same columns. mma.sync's m16n8 tiles and each warp's 16 rows of
// a wgmma m64nN accumulator have this layout, so the softmax and the store below serve both.

// The wgmma wrappers take an accumulator as one flat array of 4 · kTiles floats.
template <int kTiles>
__device__ __forceinline__ float (&Flat(float (&x)[kTiles][4]))[4 * kTiles] {
  return reinterpret_cast<float(&)[4 * kTiles]>(x);
}

// Scales the scores of the keys key0 + [0, 8 · kTiles) into the exp2 domain and, when `masked`,
// sets those past the last key a row sees (last_lo for row g, last_hi for row g + 8) to −∞.
template <int kTiles>
__device__ __forceinline__ void ScaleAndMask(float (&s)[kTiles][4], float scale_log2, bool masked,
                                             int key0, int t, int last_lo, int last_hi) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = key0 + i * 8 + 2 * t + e;
      s[i][e] *= scale_log2;
      s[i][2 + e] *= scale_log2;
      if (masked) {
        if (key > last_lo) s[i][e] = -INFINITY;
        if (key > last_hi) s[i][2 + e] = -INFINITY;
      }
    }
  }
}

// One online-softmax step of the lane's rows g (r = 0) and g + 8 (r = 1): the row maxima over
// this block (the row's 4 lanes reduce with shuffles) update m_run, S becomes exp2(S − m), O and
// the per-lane partial sums l_run are rescaled, and l_run adds this block's partial sums.
template <int kTilesS, int kTilesO>
__device__ __forceinline__ void OnlineSoftmax(float (&s)[kTilesS][4], float (&o)[kTilesO][4],
                                              float (&m_run)[2], float (&l_run)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < kTilesS; ++i) mx = fmaxf(mx, fmaxf(s[i][2 * r], s[i][2 * r + 1]));
    mx = WarpMaxXor(mx, 4);
    const float m_new = fmaxf(m_run[r], mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet
    const float alpha = exp2f(m_run[r] - m_use);
    m_run[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kTilesS; ++i) {
      s[i][2 * r] = exp2f(s[i][2 * r] - m_use);
      s[i][2 * r + 1] = exp2f(s[i][2 * r + 1] - m_use);
      sum += s[i][2 * r] + s[i][2 * r + 1];
    }
    l_run[r] = l_run[r] * alpha + sum;  // per-lane partial; reduced over the row at the end
#pragma unroll
    for (int i = 0; i < kTilesO; ++i) {
      o[i][2 * r] *= alpha;
      o[i][2 * r + 1] *= alpha;
    }
  }
}

// The A fragment (bf16) of the P·V step over keys 16kk .. 16kk + 15: S tiles 2kk and 2kk + 1.
template <int kTiles>
__device__ __forceinline__ void PackPFragment(const float (&s)[kTiles][4], int kk,
                                              uint32_t (&pa)[4]) {
  pa[0] = PackBf16x2(s[2 * kk][0], s[2 * kk][1]);
  pa[1] = PackBf16x2(s[2 * kk][2], s[2 * kk][3]);
  pa[2] = PackBf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  pa[3] = PackBf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Divides the lane's O rows by their softmax sums and stores those inside the sequence
// (row < len_q) as bf16: p.out[q_bos + row][h][8i + 2t, +1] of p.out [tokens, num_heads, kDv].
template <int kDv>
__device__ __forceinline__ void StoreNormalizedRows(const MlaPrefillParams& p,
                                                    const float (&o)[kDv / 8][4],
                                                    const float (&l_run)[2], int row_lo, int row_hi,
                                                    int len_q, int q_bos, int h, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = WarpSumXor(l_run[r], 4);
    const float inv = l > 0.f ? 1.f / l : 0.f;  // 0: a query that sees no key
    const int row = r == 0 ? row_lo : row_hi;
    if (row >= len_q) continue;
    bf16* const dst = p.out + (static_cast<int64_t>(q_bos + row) * p.num_heads + h) * kDv + 2 * t;
#pragma unroll
    for (int i = 0; i < kDv / 8; ++i) {
      *reinterpret_cast<uint32_t*>(dst + i * 8) =
          PackBf16x2(o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
    }
  }
}

template <class C>
__global__ void __launch_bounds__(kThreads, 1)
    MlaPrefillKernel(const __grid_constant__ MlaPrefillParams p, const int num_q_tiles) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* const qs = reinterpret_cast<bf16*>(smem);  // [kBlockM][kQkStride]
  bf16* const ks = qs + C::kQElems;                // [2][kBlockN][kQkStride]
  bf16* const vs = ks + 2 * C::kKElems;            // [2][kBlockN][kVStride]

  const PrefillTile w = LocatePrefillTile(p, num_q_tiles, kBlockN);
  if (!w.valid) return;
  const int h = w.h, q_bos = w.q_bos, len_q = w.len_q, q0 = w.q0, rows_here = w.rows_here;
  const int offset = w.offset, kv_end = w.kv_end, n_blocks = w.n_blocks;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  const bf16* const q_base = p.q + static_cast<int64_t>(q_bos + q0) * p.q_token_stride +
                             static_cast<int64_t>(h) * p.q_head_stride;
  const bf16* const k_base = p.k + static_cast<int64_t>(w.k_bos) * p.k_token_stride +
                             static_cast<int64_t>(h) * p.k_head_stride;
  const bf16* const v_base = p.v + static_cast<int64_t>(w.k_bos) * p.v_token_stride +
                             static_cast<int64_t>(h) * p.v_head_stride;

  LoadRows<kBlockM, C::kDqk, C::kQkStride>(qs, q_base, p.q_token_stride, rows_here, tid);
  if (n_blocks > 0) {
    const int valid = min(kBlockN, kv_end);
    LoadRows<kBlockN, C::kDqk, C::kQkStride>(ks, k_base, p.k_token_stride, valid, tid);
    LoadRows<kBlockN, C::kDv, C::kVStride>(vs, v_base, p.v_token_stride, valid, tid);
  }
  CpAsyncCommit();

  const float scale_log2 = p.scale * kLog2e;
  // Local query rows of this lane and the last key each may see.
  const int row_lo = q0 + warp * 16 + g, row_hi = row_lo + 8;
  const int last_lo = offset + row_lo, last_hi = offset + row_hi;
  const int warp_first_last = offset + q0 + warp * 16;  // last key of the warp's first row
  const int warp_last_last = warp_first_last + 15;      // ... of its last row

  uint32_t qa[C::kK16][4];
  float o[C::kNTilesO][4];
#pragma unroll
  for (int i = 0; i < C::kNTilesO; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};

  for (int j = 0; j < n_blocks; ++j) {
    CpAsyncWait<0>();  // block j (and, at j = 0, Q) has landed for this thread
    __syncthreads();   // ... for every thread; block j − 1's buffers are free
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < C::kK16; ++kk) {
        Ldsm4(qa[kk], ARowMajorAddr(qs, C::kQkStride, warp * 16, kk * 16, lane));
      }
    }
    if (j + 1 < n_blocks) {
      const int buf = (j + 1) & 1;
      const int key0 = (j + 1) * kBlockN;
      const int valid = min(kBlockN, kv_end - key0);
      LoadRows<kBlockN, C::kDqk, C::kQkStride>(
          ks + buf * C::kKElems, k_base + key0 * p.k_token_stride, p.k_token_stride, valid, tid);
      LoadRows<kBlockN, C::kDv, C::kVStride>(
          vs + buf * C::kVElems, v_base + key0 * p.v_token_stride, p.v_token_stride, valid, tid);
    }
    CpAsyncCommit();

    const int key0 = j * kBlockN;
    if (key0 > warp_last_last) continue;  // above the diagonal for all 16 rows of this warp
    const bf16* const kt = ks + (j & 1) * C::kKElems;
    const bf16* const vt = vs + (j & 1) * C::kVElems;

    // S = Q·Kᵀ for 16 rows × 64 keys.
    float s[C::kNTilesS][4];
#pragma unroll
    for (int i = 0; i < C::kNTilesS; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < C::kK16; ++kk) {
#pragma unroll
      for (int np = 0; np < C::kNTilesS / 2; ++np) {
        uint32_t b[4];
        Ldsm4(b, BNMajorAddr(kt, C::kQkStride, kk * 16, np * 16, lane));
        MmaBf16(s[2 * np], qa[kk], b[0], b[1]);
        MmaBf16(s[2 * np + 1], qa[kk], b[2], b[3]);
      }
    }

    // Scale into the exp2 domain; mask keys past each row's position (only on blocks that
    // reach past the warp's first row).
    const bool masked = key0 + kBlockN - 1 > warp_first_last;
    ScaleAndMask(s, scale_log2, masked, key0, t, last_lo, last_hi);
    OnlineSoftmax(s, o, m_run, l_run);

    // O += P·V: the S accumulators of n8 tiles 2kk, 2kk + 1 are the A fragment of step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[4];
      PackPFragment(s, kk, pa);
#pragma unroll
      for (int np = 0; np < C::kNTilesO / 2; ++np) {
        uint32_t b[4];
        Ldsm4T(b, BKMajorAddr(vt, C::kVStride, kk * 16, np * 16, lane));
        MmaBf16(o[2 * np], pa, b[0], b[1]);
        MmaBf16(o[2 * np + 1], pa, b[2], b[3]);
      }
    }
  }
  CpAsyncWait<0>();

  StoreNormalizedRows<C::kDv>(p, o, l_run, row_lo, row_hi, len_q, q_bos, h, t);
}

// ---------------------------------------------------------------------------------------------
// The (Dqk, Dv) = (192, 128) prefill on warpgroup MMAs (sm_90a wgmma; helpers and the 128-byte
// swizzled layout in mla_wgmma.cuh). Same CTA mapping as MlaPrefillKernel (128 queries per CTA,
// 1-D grid with the query tile descending), 256 threads = two warpgroups of 64 query rows each,
// keys in blocks of 128:
//   S = Q·Kᵀ   m64n128k16 × 12 with both operands in shared memory (Q and K K-major);
//   online softmax per row in registers (a row lives in 4 lanes of one warp), causal mask only
//              on blocks that cross the warpgroup's diagonal (a warpgroup skips blocks entirely
//              above it);
//   O += P·V   m64n128k16 × 8 with P from registers (the S accumulators re-packed into bf16 A
//              fragments) and V from shared memory read N-major.
// Q, K and V arrive by cp.async (16-byte chunks written straight into their swizzled slots; rows
// past the valid range are zero-filled); K and V are double-buffered: block j + 1 loads while j
// is used. Shared memory: Q 48 KB + 2 × (K 48 KB + V 32 KB) = 208 KB, one CTA per SM.
namespace wg {

constexpr int kThreads = 256;
constexpr int kBlockM = 128;  // queries per CTA (64 per warpgroup)
constexpr int kBlockN = 128;  // keys per block
constexpr int kDqk = 192, kDv = 128;
constexpr int kQBytes = kBlockM * kDqk * 2;
constexpr int kKBytes = kBlockN * kDqk * 2;
constexpr int kVBytes = kBlockN * kDv * 2;
constexpr int kSmemBytes = kQBytes + 2 * (kKBytes + kVBytes);
static_assert(kSmemBytes <= 227 * 1024);
static_assert(kBlockM == mla::kBlockM, "the launcher's grid is shared with MlaPrefillKernel");

// cp.async of rows [0, kRows) of a [rows, kDim] tile whose row r lives at base + r·stride into
// kDim/64 swizzled grids of [kRows][128 B]; rows at or past valid_rows are zero-filled.
template <int kRows, int kDim>
__device__ __forceinline__ void LoadSwizzled(unsigned char* dst, const bf16* base, int64_t stride,
                                             int valid_rows, int tid) {
  constexpr int kChunks = kDim / 8;
#pragma unroll 4
  for (int i = tid; i < kRows * kChunks; i += kThreads) {
    const int row = i / kChunks, c = i % kChunks;
    const bool valid = row < valid_rows;
    const bf16* src = valid ? base + row * stride + c * 8 : base;
    CpAsync16(dst + (c >> 3) * (kRows * 128) + Swizzle128Offset(row, (c & 7) * 8), src, valid);
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    MlaPrefillWgmmaKernel(const __grid_constant__ MlaPrefillParams p, const int num_q_tiles) {
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* const q_s = smem;               // 3 grids of [128 queries][128 B]
  unsigned char* const k_s = smem + kQBytes;     // [2 stages] 3 grids of [128 keys][128 B]
  unsigned char* const v_s = k_s + 2 * kKBytes;  // [2 stages] 2 grids of [128 keys][128 B]

  const PrefillTile w = LocatePrefillTile(p, num_q_tiles, kBlockN);
  if (!w.valid) return;
  const int h = w.h, q_bos = w.q_bos, len_q = w.len_q, q0 = w.q0, rows_here = w.rows_here;
  const int offset = w.offset, kv_end = w.kv_end, n_blocks = w.n_blocks;
  if ((kda_chunk::SmemAddr(smem) & 1023u) != 0) __trap();  // the swizzled grids need it

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wwarp = warp & 3;  // warpgroup, warp within it
  const int g = lane >> 2, t = lane & 3;

  const bf16* const q_base = p.q + static_cast<int64_t>(q_bos + q0) * p.q_token_stride +
                             static_cast<int64_t>(h) * p.q_head_stride;
  const bf16* const k_base = p.k + static_cast<int64_t>(w.k_bos) * p.k_token_stride +
                             static_cast<int64_t>(h) * p.k_head_stride;
  const bf16* const v_base = p.v + static_cast<int64_t>(w.k_bos) * p.v_token_stride +
                             static_cast<int64_t>(h) * p.v_head_stride;

  LoadSwizzled<kBlockM, kDqk>(q_s, q_base, p.q_token_stride, rows_here, tid);
  if (n_blocks > 0) {
    const int valid = min(kBlockN, kv_end);
    LoadSwizzled<kBlockN, kDqk>(k_s, k_base, p.k_token_stride, valid, tid);
    LoadSwizzled<kBlockN, kDv>(v_s, v_base, p.v_token_stride, valid, tid);
  }
  CpAsyncCommit();

  // Descriptors (mla_wgmma.cuh). S: A = this warpgroup's 64 Q rows, B = the K block (both
  // K-major). P·V: B = the V block, N-major (dv is the contiguous dimension), 2 grids of 64.
  const uint64_t desc_q = SmemDescriptorSw128(q_s + wg * 64 * 128, 16, 1024);
  const uint64_t desc_k = SmemDescriptorSw128(k_s, 16, 1024);
  const uint64_t desc_v = SmemDescriptorSw128(v_s, kBlockN * 128, 1024);

  const float scale_log2 = p.scale * kLog2e;
  // Local query rows of this lane and the last key each may see.
  const int row_lo = q0 + wg * 64 + wwarp * 16 + g, row_hi = row_lo + 8;
  const int last_lo = offset + row_lo, last_hi = offset + row_hi;
  const int wg_first_last = offset + q0 + wg * 64;  // last key of the warpgroup's first row
  const int wg_last_last = wg_first_last + 63;      // ... of its last row

  float o[kDv / 8][4];  // O: the lane's rows g, g + 8 of its warp's 16 (fragment layout: Flat)
#pragma unroll
  for (int i = 0; i < 64; ++i) Flat(o)[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};

  // The two warpgroups take turns issuing their MMAs (named barriers 1 and 2; each turn is
  // passed on once the MMAs are issued), so one's softmax runs under the other's MMAs.
  const auto take_turn = [&] { kda_chunk::NamedBarrierSync(1 + wg, kThreads); };
  const auto pass_turn = [&] { kda_chunk::NamedBarrierArrive(2 - wg, kThreads); };
  if (wg == 1) pass_turn();  // warpgroup 0 goes first

  for (int j = 0; j < n_blocks; ++j) {
    CpAsyncWait<0>();  // block j (and, at j = 0, Q) has landed for this thread
    FenceProxyAsync();
    __syncthreads();  // ... for every thread and for wgmma; block j − 1's buffers are free
    if (j + 1 < n_blocks) {
      const int buf = (j + 1) & 1;
      const int key0 = (j + 1) * kBlockN;
      const int valid = min(kBlockN, kv_end - key0);
      LoadSwizzled<kBlockN, kDqk>(k_s + buf * kKBytes, k_base + key0 * p.k_token_stride,
                                  p.k_token_stride, valid, tid);
      LoadSwizzled<kBlockN, kDv>(v_s + buf * kVBytes, v_base + key0 * p.v_token_stride,
                                 p.v_token_stride, valid, tid);
    }
    CpAsyncCommit();

    const int key0 = j * kBlockN;
    if (key0 > wg_last_last) {  // above the diagonal for all 64 rows: only the turns
      take_turn();
      pass_turn();
      take_turn();
      pass_turn();
      continue;
    }

    // S = Q·Kᵀ for 64 rows × 128 keys.
    float s[kBlockN / 8][4];
    take_turn();
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < kDqk / 16; ++ks) {
      const uint32_t at = (ks >> 2) * (kBlockM * 128) + (ks & 3) * 32;
      const uint32_t bt = (j & 1) * kKBytes + (ks >> 2) * (kBlockN * 128) + (ks & 3) * 32;
      WgmmaBf16M64N128(Flat(s), AdvanceDescriptor(desc_q, at), AdvanceDescriptor(desc_k, bt),
                       ks > 0);
    }
    WgmmaCommit();
    pass_turn();
    WgmmaWait<0>();
    FenceAccumulators(Flat(s));

    // Scale into the exp2 domain; mask keys past each row's position (only on blocks that reach
    // past the warpgroup's first row).
    const bool masked = key0 + kBlockN - 1 > wg_first_last;
    ScaleAndMask(s, scale_log2, masked, key0, t, last_lo, last_hi);
    OnlineSoftmax(s, o, m_run, l_run);

    // O += P·V: the S accumulators of n8 tiles 2kk, 2kk + 1 are the A fragment of step kk.
    uint32_t pa[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) PackPFragment(s, kk, pa[kk]);
    take_turn();
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      WgmmaBf16M64N128RegA<1>(Flat(o), pa[kk],
                              AdvanceDescriptor(desc_v, (j & 1) * kVBytes + kk * 2048), true);
    }
    WgmmaCommit();
    pass_turn();
    WgmmaWait<0>();
    FenceAccumulators(Flat(o));
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) FenceRegisters(pa[kk]);
  }
  if (wg == 0) take_turn();  // warpgroup 1's last pass: every arrival is consumed
  CpAsyncWait<0>();

  StoreNormalizedRows<kDv>(p, o, l_run, row_lo, row_hi, len_q, q_bos, h, t);
}

}  // namespace wg

bool Aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Raises `kernel`'s shared-memory limit once per device (bit d of *configured), so launches
// captured into a CUDA graph after a warm-up make no attribute calls, then launches it.
template <class Kernel>
cudaError_t LaunchConfigured(Kernel kernel, std::atomic<uint64_t>* configured, int smem_bytes,
                             const MlaPrefillParams& p, int num_q_tiles, int64_t blocks,
                             cudaStream_t stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device >= 0 && device < 64 ? (uint64_t{1} << device) : 0;
  if (bit == 0 || (configured->load(std::memory_order_acquire) & bit) == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
    configured->fetch_or(bit, std::memory_order_acq_rel);
  }
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem_bytes, stream>>>(p, num_q_tiles);
  return cudaGetLastError();
}

template <class C>
cudaError_t LaunchPrefill(const MlaPrefillParams& p, int num_q_tiles, int64_t blocks,
                          cudaStream_t stream) {
  static std::atomic<uint64_t> configured{0};
  return LaunchConfigured(MlaPrefillKernel<C>, &configured, C::kSmemBytes, p, num_q_tiles, blocks,
                          stream);
}

cudaError_t LaunchPrefillWgmma(const MlaPrefillParams& p, int num_q_tiles, int64_t blocks,
                               cudaStream_t stream) {
  static std::atomic<uint64_t> configured{0};
  static_assert(wg::kThreads == kThreads);
  return LaunchConfigured(wg::MlaPrefillWgmmaKernel, &configured, wg::kSmemBytes, p, num_q_tiles,
                          blocks, stream);
}

}  // namespace
}  // namespace mla

cudaError_t LaunchMlaPrefill(const MlaPrefillParams& params, cudaStream_t stream) {
  using mla::Aligned;
  const MlaPrefillParams& p = params;
  const bool model_dims = p.head_dim_qk == 192 && p.head_dim_v == 128;
  const bool tiny_dims = p.head_dim_qk == 48 && p.head_dim_v == 32;
  if (!(model_dims || tiny_dims) || p.num_seqs < 1 || p.num_heads < 1 || p.max_seqlen_q < 0 ||
      p.total_q < 0 || !std::isfinite(p.scale)) {
    return cudaErrorInvalidValue;
  }
  if (p.cu_seqlens_q == nullptr || p.cu_seqlens_k == nullptr) return cudaErrorInvalidValue;
  if (p.total_q == 0 || p.max_seqlen_q == 0) return cudaSuccess;
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (!Aligned(p.q, 16) || !Aligned(p.k, 16) || !Aligned(p.v, 16) || !Aligned(p.out, 16)) {
    return cudaErrorInvalidValue;
  }
  for (const int64_t stride : {p.q_token_stride, p.q_head_stride, p.k_token_stride, p.k_head_stride,
                               p.v_token_stride, p.v_head_stride}) {
    if (stride < 0 || stride % 8 != 0) return cudaErrorInvalidValue;
  }
  const int num_q_tiles = (p.max_seqlen_q + mla::kBlockM - 1) / mla::kBlockM;
  const int64_t blocks = static_cast<int64_t>(num_q_tiles) * p.num_seqs * p.num_heads;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  return model_dims
             ? mla::LaunchPrefillWgmma(p, num_q_tiles, blocks, stream)
             : mla::LaunchPrefill<mla::PrefillConfig<48, 32>>(p, num_q_tiles, blocks, stream);
}

}  // namespace kls::kernels

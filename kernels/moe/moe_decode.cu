// MoE decode: the routed experts for a few tokens per expert, as weight-streaming tensor-core
// GEMVs over the aligned pairs (moe_align.cu, kMoeDecodeTileRows = 16 rows per tile). Memory
// bound: each CTA streams 16 (down) or 2 × 16 (gate + up) weight rows of one expert once, at
// 16 B per lane per load, and multiplies them by the tile's ≤ 16 token vectors.
//
// "Swap AB": the weight rows are the MMA's M dimension and the tile's tokens its N dimension
// (two n8 fragments; the second is skipped when the tile has ≤ 8 pairs). The MMA sums over k
// in any order, so each lane's fragment k positions are remapped: in a 32-wide k chunk lane
// (g, t) loads elements 8t..8t+7 of its rows (one 16-byte load per row) and feeds words 0, 1
// to the first k16 step and words 2, 3 to the second, for A (weights) and B (tokens) alike.
// This turns the fragment loads into coalesced 64-byte row segments without shared memory.
//
//   gate_up  CTA (tile, 16 intermediate columns j0..j0+15): rows j of w1[e] and I + j of w3[e]
//            against hidden[tok(r)], SwiGLU, act[tile rows, j0..j0+15] bf16.
//   down     CTA (tile, 16 output columns d0..d0+15): rows d of w2[e] against act[tile rows],
//            pair_out[pair(r), d0..d0+15] bf16 for the tile's real pairs.
// Grid (max_tiles, ⌈I/16⌉ or ⌈D/16⌉); CTAs at or past the device-side tile count exit. Four
// warps split K (interleaved 32-wide chunks, kUnroll chunks of loads in flight per warp) and
// reduce through 8 KB of shared memory; warp 0 applies the epilogue and writes 16-byte rows.
//
// Limits (checked by moe_experts.cu): D and I multiples of 8, 16-byte aligned pointers,
// ⌈D/16⌉ and ⌈I/16⌉ ≤ 65535.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/gemm/gemm_stream_mma.cuh"
#include "kernels/moe/moe.h"
#include "kernels/moe/moe_internal.h"
#include "kernels/moe/moe_mma.cuh"

namespace kls::kernels::moe_internal {
namespace {

using gemm_stream::LoadNoL1;
using gemm_stream::SwapAbChunk;
using moe_mma::Silu;

constexpr int kRows = kMoeDecodeTileRows;  // tokens per tile and weight rows per CTA
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 32;  // k per lane-group load (4 lanes × 8 elements)
constexpr int kUnroll = 4;
static_assert(kRows == 16, "the fragment mapping assumes 16-row tiles");

__device__ __forceinline__ uint4 LoadOrZero(const __nv_bfloat16* p, bool ok) {
  return ok ? LoadNoL1(p) : make_uint4(0, 0, 0, 0);
}

// The expert of `tile`; false when the tile has no work (past the device-side tile count, or,
// without alignment, a pair whose id is outside [0, E)).
__device__ __forceinline__ bool TileExpert(const ExpertGemmArgs& args, int64_t tile,
                                           int64_t* expert) {
  if (args.expert_ids != nullptr) {
    const int32_t e = args.expert_ids[tile];
    *expert = e;
    return e >= 0 && e < args.num_experts;
  }
  if (tile >= *args.num_tiles) return false;
  *expert = args.tile_experts[tile];
  return true;
}

// The pair in row r of `tile`, −1 for a padding row.
__device__ __forceinline__ int TilePair(const ExpertGemmArgs& args, int64_t tile, int r) {
  if (args.expert_ids != nullptr) return r == 0 ? static_cast<int>(tile) : -1;
  return args.sorted_pairs[tile * kRows + r];
}

// Writes warp 0's C fragments (rows = 16 weight rows, columns = 16 tokens, fragment f covers
// tokens 8f..8f+7) transposed into tile[token][row] as bf16.
__device__ __forceinline__ void StageTransposed(const float (&c)[2][4],
                                                __nv_bfloat16 (*tile)[kRows], int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int f = 0; f < 2; ++f) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int row = g + 8 * (v >> 1);
      const int token = 8 * f + 2 * t + (v & 1);
      tile[token][row] = __float2bfloat16_rn(c[f][v]);
    }
  }
}

__global__ void __launch_bounds__(kThreads) MoeDecodeGateUpKernel(ExpertGemmArgs args) {
  __shared__ float red[(kWarps - 1) * 16 * 32];
  __shared__ __align__(16) __nv_bfloat16 tile_out[kRows][kRows];
  const int64_t tile = blockIdx.x;
  int64_t expert = 0;
  if (!TileExpert(args, tile, &expert)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int d_model = args.hidden_size, inter = args.intermediate_size;
  const int j0 = blockIdx.y * kRows;
  const int64_t row0 = tile * kRows;

  const int pair_lo = TilePair(args, tile, g);
  const int pair_hi = TilePair(args, tile, 8 + g);
  const bool has_hi = TilePair(args, tile, 8) >= 0;  // rows are filled from the front
  const __nv_bfloat16* x_lo =
      args.hidden + static_cast<int64_t>(pair_lo >= 0 ? pair_lo / args.top_k : 0) * d_model;
  const __nv_bfloat16* x_hi =
      args.hidden + static_cast<int64_t>(pair_hi >= 0 ? pair_hi / args.top_k : 0) * d_model;
  const bool row_lo_ok = j0 + g < inter, row_hi_ok = j0 + g + 8 < inter;
  const __nv_bfloat16* w = args.w_gate_up + expert * 2 * inter * d_model;
  const __nv_bfloat16* gate_lo = w + static_cast<int64_t>(row_lo_ok ? j0 + g : 0) * d_model;
  const __nv_bfloat16* gate_hi = w + static_cast<int64_t>(row_hi_ok ? j0 + g + 8 : 0) * d_model;
  const __nv_bfloat16* up_lo = gate_lo + static_cast<int64_t>(inter) * d_model;
  const __nv_bfloat16* up_hi = gate_hi + static_cast<int64_t>(inter) * d_model;

  // acc[0], acc[1]: gate for tokens 0-7, 8-15; acc[2], acc[3]: up, likewise.
  float acc[4][4] = {};
  const int chunks = (d_model + kChunk - 1) / kChunk;
  for (int c0 = warp; c0 < chunks; c0 += kWarps * kUnroll) {
    uint4 wg_lo[kUnroll], wg_hi[kUnroll], wu_lo[kUnroll], wu_hi[kUnroll], xl[kUnroll], xh[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = (c0 + u * kWarps) * kChunk + 8 * t;
      const bool ok = k < d_model;  // d_model % 8 == 0: a lane's 8 elements are all in or out
      wg_lo[u] = LoadOrZero(gate_lo + k, ok && row_lo_ok);
      wg_hi[u] = LoadOrZero(gate_hi + k, ok && row_hi_ok);
      wu_lo[u] = LoadOrZero(up_lo + k, ok && row_lo_ok);
      wu_hi[u] = LoadOrZero(up_hi + k, ok && row_hi_ok);
      xl[u] =
          ok && pair_lo >= 0 ? *reinterpret_cast<const uint4*>(x_lo + k) : make_uint4(0, 0, 0, 0);
      xh[u] = ok && has_hi && pair_hi >= 0 ? *reinterpret_cast<const uint4*>(x_hi + k)
                                           : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      SwapAbChunk(acc[0], wg_lo[u], wg_hi[u], xl[u]);
      SwapAbChunk(acc[2], wu_lo[u], wu_hi[u], xl[u]);
      if (has_hi) {
        SwapAbChunk(acc[1], wg_lo[u], wg_hi[u], xh[u]);
        SwapAbChunk(acc[3], wu_lo[u], wu_hi[u], xh[u]);
      }
    }
  }
  gemm_stream::ReduceOverWarps<kWarps>(acc, red);
  if (warp != 0) return;

  float act[2][4];
#pragma unroll
  for (int f = 0; f < 2; ++f) {
#pragma unroll
    for (int v = 0; v < 4; ++v) act[f][v] = Silu(acc[f][v]) * acc[2 + f][v];
  }
  StageTransposed(act, tile_out, lane);
  __syncwarp();
  // Lane → (token, half): 8 intermediate columns = one 16-byte store.
  const int token = lane >> 1, half = lane & 1;
  if (j0 + 8 * half < inter) {
    *reinterpret_cast<uint4*>(args.act + (row0 + token) * inter + j0 + 8 * half) =
        *reinterpret_cast<const uint4*>(&tile_out[token][8 * half]);
  }
}

__global__ void __launch_bounds__(kThreads) MoeDecodeDownKernel(ExpertGemmArgs args) {
  __shared__ float red[(kWarps - 1) * 8 * 32];
  __shared__ __align__(16) __nv_bfloat16 tile_out[kRows][kRows];
  const int64_t tile = blockIdx.x;
  int64_t expert = 0;
  if (!TileExpert(args, tile, &expert)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int d_model = args.hidden_size, inter = args.intermediate_size;
  const int d0 = blockIdx.y * kRows;
  const int64_t row0 = tile * kRows;

  const bool has_hi = TilePair(args, tile, 8) >= 0;
  // act rows exist for every tile row (padding rows hold zeros).
  const __nv_bfloat16* x_lo = args.act + (row0 + g) * inter;
  const __nv_bfloat16* x_hi = args.act + (row0 + 8 + g) * inter;
  const bool row_lo_ok = d0 + g < d_model, row_hi_ok = d0 + g + 8 < d_model;
  const __nv_bfloat16* w = args.w_down + expert * d_model * inter;
  const __nv_bfloat16* w_lo = w + static_cast<int64_t>(row_lo_ok ? d0 + g : 0) * inter;
  const __nv_bfloat16* w_hi = w + static_cast<int64_t>(row_hi_ok ? d0 + g + 8 : 0) * inter;

  float acc[2][4] = {};  // tokens 0-7, 8-15
  const int chunks = (inter + kChunk - 1) / kChunk;
  for (int c0 = warp; c0 < chunks; c0 += kWarps * kUnroll) {
    uint4 wl[kUnroll], wh[kUnroll], xl[kUnroll], xh[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = (c0 + u * kWarps) * kChunk + 8 * t;
      const bool ok = k < inter;
      wl[u] = LoadOrZero(w_lo + k, ok && row_lo_ok);
      wh[u] = LoadOrZero(w_hi + k, ok && row_hi_ok);
      xl[u] = ok ? *reinterpret_cast<const uint4*>(x_lo + k) : make_uint4(0, 0, 0, 0);
      xh[u] = ok && has_hi ? *reinterpret_cast<const uint4*>(x_hi + k) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      SwapAbChunk(acc[0], wl[u], wh[u], xl[u]);
      if (has_hi) SwapAbChunk(acc[1], wl[u], wh[u], xh[u]);
    }
  }
  gemm_stream::ReduceOverWarps<kWarps>(acc, red);
  if (warp != 0) return;

  StageTransposed(acc, tile_out, lane);
  __syncwarp();
  const int token = lane >> 1, half = lane & 1;
  const int pair = TilePair(args, tile, token);
  if (pair >= 0 && d0 + 8 * half < d_model) {
    *reinterpret_cast<uint4*>(args.pair_out + static_cast<int64_t>(pair) * d_model + d0 +
                              8 * half) =
        *reinterpret_cast<const uint4*>(&tile_out[token][8 * half]);
  }
}

}  // namespace

cudaError_t LaunchDecodeExpertGemms(const ExpertGemmArgs& args, cudaStream_t stream) {
  if (args.max_tiles == 0) return cudaSuccess;
  const unsigned tiles = static_cast<unsigned>(args.max_tiles);
  const dim3 gate_up_grid(tiles,
                          static_cast<unsigned>((args.intermediate_size + kRows - 1) / kRows));
  MoeDecodeGateUpKernel<<<gate_up_grid, kThreads, 0, stream>>>(args);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 down_grid(tiles, static_cast<unsigned>((args.hidden_size + kRows - 1) / kRows));
  MoeDecodeDownKernel<<<down_grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace kls::kernels::moe_internal

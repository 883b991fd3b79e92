// MoE prefill: the routed experts as two grouped GEMMs over the aligned pairs (moe_align.cu),
// bf16 mma.sync m16n8k16 with fp32 accumulators and a cp.async multistage pipeline.
//
//   gate_up  act[r, j] = silu(h[tok(r)]·w1[e]ᵀ)_j · (h[tok(r)]·w3[e]ᵀ)_j, r over the expert's
//            rows, A rows gathered from hidden through sorted_pairs (−1 → zero rows), B = rows
//            of w_gate_up[e] ([2·I, D], D contiguous), SwiGLU in registers, act stored bf16.
//   down     pair_out[pair(r)] = act[r]·w2[e]ᵀ, A = act rows (contiguous), B = w_down[e]
//            ([D, I]), scattered to the pair's row; padding rows are not stored.
//
// CTA mapping: a BM × 128 output tile; grid = max_tiles · n_tiles CTAs, CTA b computes M tile
// b / n_tiles and N tile b % n_tiles (N fastest: consecutive CTAs share the gathered A tile,
// and an expert's weights stay in L2 across its M tiles). CTAs whose M tile is at or past the
// device-side tile count exit at once. Each M tile belongs to one expert (tile_experts).
//   BM = 128: 8 warps as 2 (M) × 4 (N), warp tile 64 × 32, 3 stages (96 KB, 2 CTAs / SM)
//   BM =  64: 4 warps as 2 (M) × 2 (N), warp tile 32 × 64, 4 stages (96 KB, 2 CTAs / SM)
// K steps of 64: each smem row is 128 B (8 chunks of 16 B), chunk c of row r stored at
// c ^ (r mod 8), so cp.async stores and ldmatrix reads are bank-conflict free.
//
// Gate-up tile layout: the 128 B rows of an N tile hold 64 intermediate columns j0..j0+63 as
// 4 groups of 32 rows, group q = gate rows j0+16q..+15 then up rows I+j0+16q..+15. A warp's N
// range is a multiple of 32, so in each run of four n8 fragments the first two are gate and
// the last two the matching up columns: SwiGLU needs no data exchange.
//
// Limits (checked by moe_experts.cu): D and I multiples of 8 (16-byte rows; K and N edges are
// zero-filled / not stored at 8-column granularity), 16-byte aligned pointers.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/moe/moe.h"
#include "kernels/moe/moe_internal.h"
#include "kernels/moe/moe_mma.cuh"

namespace kls::kernels::moe_internal {
namespace {

using moe_mma::CpAsync16;
using moe_mma::CpAsyncCommit;
using moe_mma::CpAsyncWait;
using moe_mma::Ldsm4;
using moe_mma::MmaBf16;
using moe_mma::PackBf16x2;
using moe_mma::Silu;

constexpr int kBN = kPrefillTileN;
constexpr int kBK = 64;
constexpr int kChunksPerRow = kBK / 8;

template <int kBM, int kWarpsM, int kWarpsN, int kStages, int kMinCtasPerSm>
struct TileConfig {
  static constexpr int kM = kBM;
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kWarpM = kBM / kWarpsM;
  static constexpr int kWarpN = kBN / kWarpsN;
  static constexpr int kMI = kWarpM / 16;  // m16 fragments per warp
  static constexpr int kNI = kWarpN / 8;   // n8 fragments per warp
  static constexpr int kStageCount = kStages;
  static constexpr int kMinCtas = kMinCtasPerSm;  // __launch_bounds__ (register cap)
  static constexpr int kWarpsAlongN = kWarpsN;
  static constexpr int kAIters = kBM * kChunksPerRow / kThreads;
  static constexpr int kBIters = kBN * kChunksPerRow / kThreads;
  static constexpr int kRowsPerIter = kThreads / kChunksPerRow;
  static constexpr int kSmemBytes = kStages * (kBM + kBN) * kBK * 2;
  static_assert(kWarpN % 32 == 0, "gate/up pairing needs 32-column warp ranges");
  static_assert(kAIters * kThreads == kBM * kChunksPerRow, "A tile load must divide evenly");
  static_assert(kBIters * kThreads == kBN * kChunksPerRow, "B tile load must divide evenly");
};

using Config128 = TileConfig<128, 2, 4, 3, 2>;
using Config64 = TileConfig<64, 2, 2, 4, 2>;

// Offset (elements) of 16-byte chunk `chunk` of row `row` in a swizzled [rows][kBK] tile.
__device__ __forceinline__ int SwizzledOffset(int row, int chunk) {
  return row * kBK + ((chunk ^ (row & 7)) << 3);
}

template <typename Cfg, bool kGateUp>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinCtas)
    MoeGroupedGemmKernel(ExpertGemmArgs args, int n_tiles) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* const smem_a = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* const smem_b = smem_a + Cfg::kStageCount * Cfg::kM * kBK;

  const int64_t m_tile = blockIdx.x / n_tiles;
  const int n_tile = static_cast<int>(blockIdx.x % n_tiles);
  if (m_tile >= *args.num_tiles) return;
  const int64_t expert = args.tile_experts[m_tile];
  const int64_t row0 = m_tile * Cfg::kM;
  const int d_model = args.hidden_size, inter = args.intermediate_size;
  const int k_total = kGateUp ? d_model : inter;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / Cfg::kWarpsAlongN, warp_n = warp % Cfg::kWarpsAlongN;
  const int chunk = tid & (kChunksPerRow - 1);

  // Global row of every tile row this thread copies (fixed over K).
  const __nv_bfloat16* a_src[Cfg::kAIters];
  bool a_ok[Cfg::kAIters];
#pragma unroll
  for (int i = 0; i < Cfg::kAIters; ++i) {
    const int r = tid / kChunksPerRow + i * Cfg::kRowsPerIter;
    if constexpr (kGateUp) {
      const int pair = args.sorted_pairs[row0 + r];
      a_ok[i] = pair >= 0;
      a_src[i] = args.hidden + static_cast<int64_t>(a_ok[i] ? pair / args.top_k : 0) * d_model;
    } else {
      a_ok[i] = true;
      a_src[i] = args.act + (row0 + r) * inter;
    }
  }
  const __nv_bfloat16* b_src[Cfg::kBIters];
  bool b_ok[Cfg::kBIters];
#pragma unroll
  for (int i = 0; i < Cfg::kBIters; ++i) {
    const int n = tid / kChunksPerRow + i * Cfg::kRowsPerIter;
    if constexpr (kGateUp) {
      const int j = n_tile * kGateUpColumnsPerTile + (n >> 5) * 16 + (n & 15);
      b_ok[i] = j < inter;
      const int64_t w_row = (n & 31) < 16 ? j : inter + j;
      b_src[i] = args.w_gate_up + (expert * 2 * inter + (b_ok[i] ? w_row : 0)) * d_model;
    } else {
      const int d = n_tile * kBN + n;
      b_ok[i] = d < d_model;
      b_src[i] = args.w_down + (expert * d_model + (b_ok[i] ? d : 0)) * inter;
    }
  }

  auto load_stage = [&](int stage, int k_step) {
    const int k = k_step * kBK + chunk * 8;
    const bool k_ok = k < k_total;
    const int k_src = k_ok ? k : 0;
    __nv_bfloat16* sa = smem_a + stage * Cfg::kM * kBK;
    __nv_bfloat16* sb = smem_b + stage * kBN * kBK;
#pragma unroll
    for (int i = 0; i < Cfg::kAIters; ++i) {
      const int r = tid / kChunksPerRow + i * Cfg::kRowsPerIter;
      CpAsync16(sa + SwizzledOffset(r, chunk), a_src[i] + k_src, a_ok[i] && k_ok);
    }
#pragma unroll
    for (int i = 0; i < Cfg::kBIters; ++i) {
      const int n = tid / kChunksPerRow + i * Cfg::kRowsPerIter;
      CpAsync16(sb + SwizzledOffset(n, chunk), b_src[i] + k_src, b_ok[i] && k_ok);
    }
  };

  float acc[Cfg::kMI][Cfg::kNI][4];
#pragma unroll
  for (int mi = 0; mi < Cfg::kMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < Cfg::kNI; ++ni) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.0f;
    }
  }

  const int k_steps = (k_total + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < Cfg::kStageCount - 1; ++s) {
    if (s < k_steps) load_stage(s, s);
    CpAsyncCommit();
  }

  for (int ks = 0; ks < k_steps; ++ks) {
    CpAsyncWait<Cfg::kStageCount - 2>();
    __syncthreads();  // step ks has landed for all threads; step ks−1's stage is free
    const int next = ks + Cfg::kStageCount - 1;
    if (next < k_steps) load_stage(next % Cfg::kStageCount, next);
    CpAsyncCommit();

    const int stage = ks % Cfg::kStageCount;
    const __nv_bfloat16* sa = smem_a + stage * Cfg::kM * kBK;
    const __nv_bfloat16* sb = smem_b + stage * kBN * kBK;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[Cfg::kMI][4];
      uint32_t bf[Cfg::kNI][2];
#pragma unroll
      for (int mi = 0; mi < Cfg::kMI; ++mi) {
        const int r = warp_m * Cfg::kWarpM + mi * 16 + (lane & 15);
        Ldsm4(af[mi], sa + SwizzledOffset(r, kk * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int nj = 0; nj < Cfg::kNI / 2; ++nj) {
        const int n = warp_n * Cfg::kWarpN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t r[4];
        Ldsm4(r, sb + SwizzledOffset(n, kk * 2 + ((lane >> 3) & 1)));
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < Cfg::kMI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < Cfg::kNI; ++ni) MmaBf16(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
      }
    }
  }
  CpAsyncWait<0>();

  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < Cfg::kMI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_m * Cfg::kWarpM + mi * 16 + g + 8 * h;
      if constexpr (kGateUp) {
        __nv_bfloat16* out_row = args.act + (row0 + r) * inter;
#pragma unroll
        for (int ni = 0; ni < Cfg::kNI; ++ni) {
          if ((ni & 3) >= 2) continue;  // the up half of a group of four
          const int n = warp_n * Cfg::kWarpN + ni * 8 + 2 * t;
          const int j = n_tile * kGateUpColumnsPerTile + (n >> 5) * 16 + (n & 15);
          if (j >= inter) continue;
          const float v0 = Silu(acc[mi][ni][2 * h]) * acc[mi][ni + 2][2 * h];
          const float v1 = Silu(acc[mi][ni][2 * h + 1]) * acc[mi][ni + 2][2 * h + 1];
          *reinterpret_cast<uint32_t*>(out_row + j) = PackBf16x2(v0, v1);
        }
      } else {
        const int pair = args.sorted_pairs[row0 + r];
        if (pair < 0) continue;
        __nv_bfloat16* out_row = args.pair_out + static_cast<int64_t>(pair) * d_model;
#pragma unroll
        for (int ni = 0; ni < Cfg::kNI; ++ni) {
          const int d = n_tile * kBN + warp_n * Cfg::kWarpN + ni * 8 + 2 * t;
          if (d >= d_model) continue;
          *reinterpret_cast<uint32_t*>(out_row + d) =
              PackBf16x2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        }
      }
    }
  }
}

template <typename Cfg, bool kGateUp>
cudaError_t LaunchGemm(const ExpertGemmArgs& args, cudaStream_t stream) {
  const int n_tiles =
      kGateUp ? (args.intermediate_size + kGateUpColumnsPerTile - 1) / kGateUpColumnsPerTile
              : (args.hidden_size + kBN - 1) / kBN;
  const int64_t ctas = args.max_tiles * n_tiles;
  if (ctas == 0) return cudaSuccess;
  auto kernel = MoeGroupedGemmKernel<Cfg, kGateUp>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(ctas), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args, n_tiles);
  return cudaGetLastError();
}

template <typename Cfg>
cudaError_t LaunchBoth(const ExpertGemmArgs& args, cudaStream_t stream) {
  const cudaError_t err = LaunchGemm<Cfg, true>(args, stream);
  if (err != cudaSuccess) return err;
  return LaunchGemm<Cfg, false>(args, stream);
}

}  // namespace

int64_t PrefillMaxCtas(int64_t max_tiles, int hidden_size, int intermediate_size) {
  const int64_t n_gate_up = (intermediate_size + kGateUpColumnsPerTile - 1) / kGateUpColumnsPerTile;
  const int64_t n_down = (hidden_size + kBN - 1) / kBN;
  return max_tiles * (n_gate_up > n_down ? n_gate_up : n_down);
}

cudaError_t LaunchPrefillExpertGemms(const ExpertGemmArgs& args, int tile_rows,
                                     cudaStream_t stream) {
  if (tile_rows == Config128::kM) return LaunchBoth<Config128>(args, stream);
  if (tile_rows == Config64::kM) return LaunchBoth<Config64>(args, stream);
  return cudaErrorInvalidValue;
}

}  // namespace kls::kernels::moe_internal

// MoE routed experts (LaunchMoeExperts, moe.h): validation, workspace layout and path choice,
// then align (moe_align.cu) → expert GEMMs (moe_prefill.cu or moe_decode.cu) → combine. A
// single token on the decode path skips the alignment: each of its pairs is a tile of its own.
//
// Combine kernel: grid (T, ⌈D / 1024⌉) of 128-thread CTAs; each thread owns 8 consecutive
// columns of one token (16-byte loads of bf16), issues every slot's load first, then starts from
// shared_out (or 0) and adds w · pair_out over the slots in slot order with fp32 FMAs, and
// rounds to bf16 once. The slot ids and weights go through shared memory. Limits: D a multiple
// of 8 with D / 8 <= 65535 · 128 (gridDim.y), 16-byte aligned pointers.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "kernels/moe/moe.h"
#include "kernels/moe/moe_internal.h"
#include "kernels/moe/moe_mma.cuh"

namespace kls::kernels {
namespace {

constexpr int kCombineThreads = 128;
constexpr size_t kSectionAlign = 256;
constexpr int kPrefillLargeTileMinPairsPerExpert = 384;
// Decode grids put ⌈D/16⌉ or ⌈I/16⌉ on gridDim.y.
constexpr int kMaxDecodeWidth = 65535 * kMoeDecodeTileRows;

size_t AlignUp(size_t bytes) { return (bytes + kSectionAlign - 1) / kSectionAlign * kSectionAlign; }

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Grid (T, ⌈D / (8 · kCombineThreads)⌉): a thread owns 8 columns of one token. All of its
// slots' loads are issued before the first is used, so a decode step (T = 1) costs one round of
// memory latency rather than one per slot; the sum runs in slot order as before.
__global__ void __launch_bounds__(kCombineThreads)
    MoeCombineKernel(const __nv_bfloat16* __restrict__ pair_out, const int32_t* __restrict__ ids,
                     const float* __restrict__ weights, const __nv_bfloat16* shared_out,
                     int hidden_size, int num_experts, int top_k, __nv_bfloat16* out) {
  __shared__ float slot_weight[kMoeMaxTopK];
  __shared__ bool slot_ok[kMoeMaxTopK];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < top_k) {
    const int e = ids[t * top_k + threadIdx.x];
    slot_ok[threadIdx.x] = e >= 0 && e < num_experts;
    slot_weight[threadIdx.x] = weights[t * top_k + threadIdx.x];
  }
  __syncthreads();
  const int c = blockIdx.y * kCombineThreads + threadIdx.x;
  if (c >= hidden_size / 8) return;
  uint4 v[kMoeMaxTopK];
#pragma unroll
  for (int slot = 0; slot < kMoeMaxTopK; ++slot) {
    if (slot < top_k && slot_ok[slot]) {
      v[slot] =
          *reinterpret_cast<const uint4*>(pair_out + (t * top_k + slot) * hidden_size + 8 * c);
    }
  }
  float acc[8];
  if (shared_out != nullptr) {
    const uint4 s = *reinterpret_cast<const uint4*>(shared_out + t * hidden_size + 8 * c);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = moe_mma::UnpackBf16x2(moe_mma::Word(s, i));
      acc[2 * i] = f.x;
      acc[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
  }
#pragma unroll
  for (int slot = 0; slot < kMoeMaxTopK; ++slot) {
    if (slot < top_k && slot_ok[slot]) {
      const float w = slot_weight[slot];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = moe_mma::UnpackBf16x2(moe_mma::Word(v[slot], i));
        acc[2 * i] = fmaf(w, f.x, acc[2 * i]);
        acc[2 * i + 1] = fmaf(w, f.y, acc[2 * i + 1]);
      }
    }
  }
  uint4 r;
  r.x = moe_mma::PackBf16x2(acc[0], acc[1]);
  r.y = moe_mma::PackBf16x2(acc[2], acc[3]);
  r.z = moe_mma::PackBf16x2(acc[4], acc[5]);
  r.w = moe_mma::PackBf16x2(acc[6], acc[7]);
  *reinterpret_cast<uint4*>(out + t * hidden_size + 8 * c) = r;
}

bool CombineArgsOk(const void* pair_out, const int32_t* ids, const float* weights,
                   const void* shared_out, int64_t num_tokens, int hidden_size, int num_experts,
                   int top_k, const void* out) {
  return num_tokens >= 0 && num_tokens <= int64_t{INT_MAX} && hidden_size >= 8 &&
         hidden_size % 8 == 0 && hidden_size / 8 <= 65535 * kCombineThreads && num_experts >= 1 &&
         num_experts <= kMoeMaxExperts && top_k >= 1 && top_k <= kMoeMaxTopK &&
         pair_out != nullptr && ids != nullptr && weights != nullptr && out != nullptr &&
         Aligned16(pair_out) && Aligned16(out) && (shared_out == nullptr || Aligned16(shared_out));
}

// Host-side checks of the sizes (not the pointers) of LaunchMoeExperts.
bool ExpertSizesOk(const MoeExpertsParams& p) {
  return p.num_tokens >= 0 && p.num_tokens <= int64_t{INT_MAX} && p.hidden_size >= 8 &&
         p.hidden_size % 8 == 0 && p.hidden_size <= kMaxDecodeWidth && p.intermediate_size >= 8 &&
         p.intermediate_size % 8 == 0 && p.intermediate_size <= kMaxDecodeWidth &&
         p.num_experts >= 1 && p.num_experts <= kMoeMaxExperts && p.top_k >= 1 &&
         p.top_k <= kMoeMaxTopK &&
         (p.path == MoePath::kAuto || p.path == MoePath::kDecode || p.path == MoePath::kPrefill);
}

struct ExpertsLayout {
  size_t align_bytes = 0, act = 0, pair_out = 0, total = 0;
  int tile_rows = 0;
};

// false when the sizes are unsupported.
bool ComputeExpertsLayout(const MoeExpertsParams& p, ExpertsLayout* l) {
  if (!ExpertSizesOk(p)) return false;
  l->tile_rows = MoeExpertsTileRows(p);
  size_t align_bytes = 0;
  if (MoeAlignWorkspaceBytes(p.num_tokens, p.num_experts, p.top_k, l->tile_rows, &align_bytes) !=
      cudaSuccess) {
    return false;
  }
  int64_t max_tiles = 0;
  if (!moe_internal::AlignMaxTiles(p.num_tokens, p.num_experts, p.top_k, l->tile_rows,
                                   &max_tiles)) {
    return false;
  }
  const int64_t max_rows = max_tiles * l->tile_rows;
  const bool decode = l->tile_rows == kMoeDecodeTileRows;
  if (!decode && moe_internal::PrefillMaxCtas(max_tiles, p.hidden_size, p.intermediate_size) >
                     int64_t{INT_MAX}) {
    return false;
  }
  if (decode && max_tiles > int64_t{INT_MAX}) return false;
  l->align_bytes = AlignUp(align_bytes);
  l->act = l->align_bytes;
  l->pair_out = l->act + AlignUp(sizeof(__nv_bfloat16) * max_rows * p.intermediate_size);
  l->total = l->pair_out + AlignUp(sizeof(__nv_bfloat16) * p.num_tokens * p.top_k * p.hidden_size);
  return true;
}

}  // namespace

MoePath MoeSelectPath(int64_t num_tokens, int num_experts, int top_k) {
  // T·K <= 4·E, written as a division so that no product can overflow.
  const int64_t k = top_k > 0 ? top_k : 1;
  return num_tokens <= int64_t{kMoeDecodeMaxPairsPerExpert} * num_experts / k ? MoePath::kDecode
                                                                              : MoePath::kPrefill;
}

int MoeExpertsTileRows(const MoeExpertsParams& params) {
  const MoePath path = params.path == MoePath::kAuto
                           ? MoeSelectPath(params.num_tokens, params.num_experts, params.top_k)
                           : params.path;
  if (path == MoePath::kDecode) return kMoeDecodeTileRows;
  // T·K >= 384·E, as T >= ⌈384·E / K⌉.
  const int64_t k = params.top_k > 0 ? params.top_k : 1;
  const int64_t min_tokens =
      (int64_t{kPrefillLargeTileMinPairsPerExpert} * params.num_experts + k - 1) / k;
  return params.num_tokens >= min_tokens ? 128 : 64;
}

cudaError_t MoeExpertsWorkspaceBytes(const MoeExpertsParams& params, size_t* bytes) {
  ExpertsLayout l;
  if (bytes == nullptr || !ComputeExpertsLayout(params, &l)) return cudaErrorInvalidValue;
  *bytes = l.total;
  return cudaSuccess;
}

cudaError_t LaunchMoeExperts(const MoeExpertsParams& p, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  ExpertsLayout l;
  if (!ComputeExpertsLayout(p, &l)) return cudaErrorInvalidValue;
  if (p.hidden == nullptr || p.expert_ids == nullptr || p.expert_weights == nullptr ||
      p.w_gate_up == nullptr || p.w_down == nullptr || p.out == nullptr || workspace == nullptr ||
      workspace_bytes < l.total || !Aligned16(p.hidden) || !Aligned16(p.w_gate_up) ||
      !Aligned16(p.w_down) || !Aligned16(p.out) || !Aligned16(workspace) ||
      (p.shared_out != nullptr && !Aligned16(p.shared_out))) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0) return cudaSuccess;

  MoeAlignment view;
  cudaError_t err = MoeAlignmentLayout(workspace, l.align_bytes, p.num_tokens, p.num_experts,
                                       p.top_k, l.tile_rows, &view);
  if (err != cudaSuccess) return err;
  // One token on the decode path (batch-1 decode): its pairs are the tiles, one each, and no
  // alignment kernel runs.
  const bool pairs_as_tiles =
      l.tile_rows == kMoeDecodeTileRows && p.num_tokens == 1 && view.max_tiles >= p.top_k;
  if (!pairs_as_tiles) {
    err = LaunchMoeAlign(p.expert_ids, p.num_tokens, p.num_experts, p.top_k, l.tile_rows, workspace,
                         l.align_bytes, stream);
    if (err != cudaSuccess) return err;
  }

  char* base = static_cast<char*>(workspace);
  moe_internal::ExpertGemmArgs args;
  args.hidden = p.hidden;
  args.w_gate_up = p.w_gate_up;
  args.w_down = p.w_down;
  args.sorted_pairs = view.sorted_pairs;
  args.tile_experts = view.tile_experts;
  args.num_tiles = view.num_tiles;
  args.act = reinterpret_cast<__nv_bfloat16*>(base + l.act);
  args.pair_out = reinterpret_cast<__nv_bfloat16*>(base + l.pair_out);
  args.max_tiles = view.max_tiles;
  args.hidden_size = p.hidden_size;
  args.intermediate_size = p.intermediate_size;
  args.top_k = p.top_k;
  if (pairs_as_tiles) {
    args.expert_ids = p.expert_ids;
    args.num_experts = p.num_experts;
    args.max_tiles = p.top_k;
  }
  err = l.tile_rows == kMoeDecodeTileRows
            ? moe_internal::LaunchDecodeExpertGemms(args, stream)
            : moe_internal::LaunchPrefillExpertGemms(args, l.tile_rows, stream);
  if (err != cudaSuccess) return err;
  return LaunchMoeCombine(args.pair_out, p.expert_ids, p.expert_weights, p.shared_out, p.num_tokens,
                          p.hidden_size, p.num_experts, p.top_k, p.out, stream);
}

cudaError_t LaunchMoeCombine(const __nv_bfloat16* pair_out, const int32_t* expert_ids,
                             const float* expert_weights, const __nv_bfloat16* shared_out,
                             int64_t num_tokens, int hidden_size, int num_experts, int top_k,
                             __nv_bfloat16* out, cudaStream_t stream) {
  if (!CombineArgsOk(pair_out, expert_ids, expert_weights, shared_out, num_tokens, hidden_size,
                     num_experts, top_k, out)) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(num_tokens),
                  static_cast<unsigned>((hidden_size / 8 + kCombineThreads - 1) / kCombineThreads));
  MoeCombineKernel<<<grid, kCombineThreads, 0, stream>>>(
      pair_out, expert_ids, expert_weights, shared_out, hidden_size, num_experts, top_k, out);
  return cudaGetLastError();
}

}  // namespace kls::kernels

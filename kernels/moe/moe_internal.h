// Private to kernels/moe: the expert GEMM launchers that LaunchMoeExperts (moe_experts.cu)
// dispatches to, and the alignment constants they share. Not part of the kernels' API.
#ifndef KLS_KERNELS_MOE_MOE_INTERNAL_H_
#define KLS_KERNELS_MOE_MOE_INTERNAL_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kls::kernels::moe_internal {

// Pairs per CTA of the alignment kernels; at most one chunk takes the single-kernel path.
inline constexpr int kAlignChunk = 4096;

// Prefill tile shapes (moe_prefill.cu): M rows × kPrefillTileN columns of the GEMM output.
inline constexpr int kPrefillTileN = 128;
// Gate-up GEMM: one 128-column tile covers 64 intermediate columns (64 gate + 64 up rows).
inline constexpr int kGateUpColumnsPerTile = kPrefillTileN / 2;

// The alignment's max_tiles for these host-side sizes; false when MoeAlignWorkspaceBytes would
// reject them.
bool AlignMaxTiles(int64_t num_tokens, int num_experts, int top_k, int tile_rows,
                   int64_t* max_tiles);

// Everything both expert GEMMs read and write; device pointers, shapes as in moe.h.
struct ExpertGemmArgs {
  const __nv_bfloat16* hidden = nullptr;     // [T, D]
  const __nv_bfloat16* w_gate_up = nullptr;  // [E, 2·I, D]
  const __nv_bfloat16* w_down = nullptr;     // [E, D, I]
  const int32_t* sorted_pairs = nullptr;     // [max_tiles · tile_rows]
  const int32_t* tile_experts = nullptr;     // [max_tiles]
  const int32_t* num_tiles = nullptr;        // [1]
  __nv_bfloat16* act = nullptr;              // [max_tiles · tile_rows, I] SwiGLU output
  __nv_bfloat16* pair_out = nullptr;         // [T·top_k, D] per-pair expert output
  int64_t max_tiles = 0;
  int hidden_size = 0;        // D
  int intermediate_size = 0;  // I
  int top_k = 0;
  // Decode kernels only. Non-null: one token and no alignment (its experts may repeat; each pair
  // is computed on its own): tile t holds pair t alone, its expert expert_ids[t] (a tile whose id
  // is outside [0, num_experts) does nothing, as the alignment skips such pairs). sorted_pairs,
  // tile_experts and num_tiles are then unused.
  const int32_t* expert_ids = nullptr;  // [top_k]
  int num_experts = 0;
};

// Gate-up GEMM + SwiGLU into act, then down GEMM into pair_out, with tile_rows 64 or 128.
// The caller has validated the sizes (moe_experts.cu).
cudaError_t LaunchPrefillExpertGemms(const ExpertGemmArgs& args, int tile_rows,
                                     cudaStream_t stream);

// The same two steps with the weight-streaming kernels over kMoeDecodeTileRows-row tiles.
cudaError_t LaunchDecodeExpertGemms(const ExpertGemmArgs& args, cudaStream_t stream);

// CTAs in the prefill grid for these sizes (both GEMMs; the larger one), for the launcher's
// grid-size check.
int64_t PrefillMaxCtas(int64_t max_tiles, int hidden_size, int intermediate_size);

}  // namespace kls::kernels::moe_internal

#endif  // KLS_KERNELS_MOE_MOE_INTERNAL_H_

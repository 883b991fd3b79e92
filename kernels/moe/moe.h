// CUDA launchers for the Kimi Linear sparse MoE block (KIMI_LINEAR.md §6.2): the sigmoid router
// with correction bias, the device-side permutation of (token, slot) pairs by expert, the routed
// experts' SwiGLU as grouped GEMMs (prefill) or weight-streaming tensor-core GEMVs (decode), and
// the weighted combine with the shared expert's output. Math, layouts and design:
// kernels/moe/README.md. CPU references: moe_ref.h.
//
// Every launcher takes the stream last, never synchronizes, never allocates, and never reads
// device data on the host (token counts per expert stay on the device), so all of them can be
// captured in a CUDA graph. Host-side arguments are checked before any launch: unsupported ones
// return cudaErrorInvalidValue and launch nothing; otherwise the result is the launch status.
// Routing data in device memory is not validated on the host: an expert id outside
// [0, num_experts) makes its (token, slot) pair contribute nothing. The launchers hold no state
// and may be called from any thread (each call on its own stream and workspace).
//
// Tensors are row-major. T = num_tokens, D = hidden_size, I = intermediate_size (one expert's
// width), E = num_experts, K = top_k; a "pair" p = t·K + slot is one (token, slot) choice.
#ifndef KLS_KERNELS_MOE_MOE_H_
#define KLS_KERNELS_MOE_MOE_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/moe/moe_ref.h"

namespace kls::kernels {

inline constexpr int kMoeMaxExperts = 512;  // E limit of every launcher
inline constexpr int kMoeMaxTopK = 16;      // K limit of every launcher
inline constexpr int kMoeMaxTileRows = 1024;
// Rows per M tile of the decode path, and the largest average number of pairs per expert
// (T·K / E) for which kAuto picks it: decode iff T·K <= kMoeDecodeMaxPairsPerExpert · E
// (Kimi-Linear-48B, E = 256, K = 8: T <= 128; tiny E = 8, K = 2: T <= 16).
inline constexpr int kMoeDecodeTileRows = 16;
inline constexpr int kMoeDecodeMaxPairsPerExpert = 4;

// ---------------------------------------------------------------------------------------------
// 1. Router
// ---------------------------------------------------------------------------------------------

// The MoeRouteReference procedure on the device: s = sigmoid(logits[t]), the top_k experts by
// s + bias (ties to the lower id) in descending key order, weights s (kUnbiased) or s + bias
// (kBiased), renormalized when `renormalize` (unless their sum is 0), times
// `routed_scaling_factor`. Sigmoid, keys and weights are computed in fp64 like the reference,
// so the ids match it exactly and the weights to ~1 ulp of fp32; a NaN key sorts as −inf.
//   logits          [T, logits_row_stride] fp32 device; columns [0, E) are read
//   bias            [E] fp32 device (e_score_correction_bias), or nullptr for none
//   expert_ids      [T, top_k] int32 device, written
//   expert_weights  [T, top_k] fp32 device, written
// Supported: T >= 0 (T == 0 launches nothing), 1 <= E <= kMoeMaxExperts,
// 1 <= top_k <= min(E, kMoeMaxTopK), logits_row_stride >= E, non-null pointers (bias aside).
cudaError_t LaunchMoeRoute(const float* logits, int64_t logits_row_stride, const float* bias,
                           int64_t num_tokens, int num_experts, int top_k, bool renormalize,
                           double routed_scaling_factor, RouterWeighting weighting,
                           int32_t* expert_ids, float* expert_weights, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// 2. Alignment: pairs grouped by expert, each expert's rows padded to a multiple of tile_rows
// ---------------------------------------------------------------------------------------------

// Device arrays written by LaunchMoeAlign, carved out of its workspace (MoeAlignmentLayout).
// With count_e = number of pairs p with expert_ids[p] == e and padded_e = ⌈count_e / tile⌉·tile:
struct MoeAlignment {
  // [max_rows] int32. Rows [offsets[e], offsets[e] + count_e) hold the pairs routed to e in
  // ascending pair order (a stable sort); rows [offsets[e] + count_e, offsets[e+1]) hold -1.
  // Rows at and past offsets[E] are unspecified.
  int32_t* sorted_pairs = nullptr;
  // [max_tiles] int32: the expert of each M tile (tile i covers rows [i·tile, (i+1)·tile));
  // entries at and past *num_tiles are unspecified.
  int32_t* tile_experts = nullptr;
  int32_t* expert_offsets = nullptr;  // [E + 1] int32: exclusive prefix sum of padded_e
  int32_t* expert_counts = nullptr;   // [E] int32: count_e
  int32_t* num_tiles = nullptr;       // [1] int32: offsets[E] / tile, the M tiles in use
  int64_t max_rows = 0;   // host: rows sorted_pairs can hold, ≥ offsets[E] for any routing
  int64_t max_tiles = 0;  // host: max_rows / tile_rows
};

// Bytes of workspace LaunchMoeAlign needs for these host-side sizes (256-byte aligned
// sections). cudaErrorInvalidValue (and *bytes untouched) when a size is unsupported:
// T < 0, E outside [1, kMoeMaxExperts], top_k outside [1, kMoeMaxTopK] (top_k > E is allowed),
// tile_rows outside [1, kMoeMaxTileRows], or T·top_k + E·tile_rows + 4096 > 2^31 − 1.
cudaError_t MoeAlignWorkspaceBytes(int64_t num_tokens, int num_experts, int top_k, int tile_rows,
                                   size_t* bytes);

// The device arrays inside `workspace` for these sizes (no device access). Fails like
// MoeAlignWorkspaceBytes, and when workspace is null or workspace_bytes is too small.
cudaError_t MoeAlignmentLayout(void* workspace, size_t workspace_bytes, int64_t num_tokens,
                               int num_experts, int top_k, int tile_rows, MoeAlignment* alignment);

// Fills the MoeAlignment arrays of `workspace` from the routing (one kernel when
// T·top_k <= 4096, else two). Pairs whose id is outside [0, E) are left out.
//   expert_ids  [T, top_k] int32 device
cudaError_t LaunchMoeAlign(const int32_t* expert_ids, int64_t num_tokens, int num_experts,
                           int top_k, int tile_rows, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// 3. Routed experts and combine
// ---------------------------------------------------------------------------------------------

enum class MoePath {
  kAuto,     // kDecode iff T·top_k <= kMoeDecodeMaxPairsPerExpert · E, else kPrefill
  kDecode,   // weight-streaming tensor-core GEMVs over 16-row tiles (each expert's weights
             // are read once per tile of its tokens; meant for a few tokens per expert)
  kPrefill,  // grouped GEMMs, 64- or 128-row tiles (mma.sync bf16, cp.async pipeline)
};

struct MoeExpertsParams {
  const __nv_bfloat16* hidden = nullptr;  // [T, D] bf16 device, the FFN input (post-norm)
  const int32_t* expert_ids = nullptr;    // [T, top_k] int32 device (LaunchMoeRoute)
  const float* expert_weights = nullptr;  // [T, top_k] fp32 device, scaling already applied
  // Expert weights, packed once at upload from the checkpoint's per-expert tensors
  // (experts.{e}.w1 / w3 / w2, PyTorch [out, in]):
  //   w_gate_up [E, 2·I, D] bf16: rows [0, I) of expert e are w1 (gate, [I, D]) and rows
  //             [I, 2·I) are w3 (up, [I, D]) — vLLM's w13 layout; D contiguous.
  //   w_down    [E, D, I] bf16: expert e's w2 ([D, I]); I contiguous.
  const __nv_bfloat16* w_gate_up = nullptr;
  const __nv_bfloat16* w_down = nullptr;
  // [T, D] bf16 device added to the routed sum (the shared expert's output), or nullptr.
  const __nv_bfloat16* shared_out = nullptr;
  // [T, D] bf16 device: out[t] = shared_out[t] + Σ_slot w[t, slot] · E_{id[t, slot]}(hidden[t]),
  // E_e(x) = (silu(x·w1ᵀ) ⊙ (x·w3ᵀ))·w2ᵀ. May alias hidden or shared_out (written last).
  __nv_bfloat16* out = nullptr;
  int64_t num_tokens = 0;     // T >= 0
  int hidden_size = 0;        // D, a multiple of 8
  int intermediate_size = 0;  // I, a multiple of 8
  int num_experts = 0;        // E in [1, kMoeMaxExperts]
  int top_k = 0;              // in [1, kMoeMaxTopK]
  MoePath path = MoePath::kAuto;
};

// The path kAuto resolves to for these host-side sizes (kDecode or kPrefill): kDecode iff
// T·top_k <= kMoeDecodeMaxPairsPerExpert · E.
MoePath MoeSelectPath(int64_t num_tokens, int num_experts, int top_k);

// Rows per M tile that LaunchMoeExperts uses for `params` (host-side fields only):
// kMoeDecodeTileRows on the decode path; on the prefill path 128 when the average pairs per
// expert T·top_k / E >= 384, else 64 (less padding per expert).
int MoeExpertsTileRows(const MoeExpertsParams& params);

// Workspace bytes LaunchMoeExperts needs for `params` (host-side fields only: T, D, I, E,
// top_k, path): the alignment arrays, the SwiGLU intermediate [max_rows, I] bf16 and the
// per-pair expert outputs [T·top_k, D] bf16. cudaErrorInvalidValue for unsupported sizes.
cudaError_t MoeExpertsWorkspaceBytes(const MoeExpertsParams& params, size_t* bytes);

// The routed experts plus combine: align (tile = MoeExpertsTileRows), gate_up GEMM with SwiGLU
// in its epilogue (bf16 intermediate), down GEMM into per-pair rows, then LaunchMoeCombine.
// fp32 accumulation throughout. Deterministic: the same inputs give bitwise the same output.
// `workspace` (16-byte aligned) must hold MoeExpertsWorkspaceBytes(params) bytes; its contents
// need no initialization and are scratch afterwards. T == 0 launches nothing.
// cudaErrorInvalidValue for unsupported sizes (see MoeExpertsParams; also D, I <= 1048560 and
// the alignment's limit T·top_k + E·tile < 2^31 − 4096), null pointers (shared_out aside),
// pointers not 16-byte aligned, or a null or short workspace.
cudaError_t LaunchMoeExperts(const MoeExpertsParams& params, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

// out[t] = shared_out[t] + Σ_slot expert_weights[t, slot] · pair_out[t·top_k + slot], summed in
// fp32 in slot order and rounded to bf16 once; slots whose id is outside [0, E) are skipped
// (their pair_out rows are never read).
//   pair_out    [T·top_k, D] bf16 device
//   expert_ids, expert_weights  [T, top_k] device
//   shared_out  [T, D] bf16 device or nullptr; may alias out
//   out         [T, D] bf16 device
// Supported: T >= 0, D a positive multiple of 8 with D / 8 <= 65535 · 128,
// 1 <= E <= kMoeMaxExperts, 1 <= top_k <= kMoeMaxTopK, non-null pointers (shared_out aside),
// 16-byte aligned bf16 pointers.
cudaError_t LaunchMoeCombine(const __nv_bfloat16* pair_out, const int32_t* expert_ids,
                             const float* expert_weights, const __nv_bfloat16* shared_out,
                             int64_t num_tokens, int hidden_size, int num_experts, int top_k,
                             __nv_bfloat16* out, cudaStream_t stream);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_MOE_MOE_H_

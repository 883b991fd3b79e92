// The CUDA backend's glue kernels: the small reshapes, activations and conversions between the
// kernels/ ops that the model needs (SwiGLU's activation, the MLA latent norm, paged-row
// gathers, key assembly for non-absorbed MLA, dtype conversion, seeded random weights). Their
// correctness is covered by the backend's CPU-agreement tests (tests/engine/cuda), which compare
// the whole forward pass and every state against the CPU backend.
//
// Launchers never synchronize or allocate and are safe to capture in a CUDA graph; they return
// the launch status (cudaErrorInvalidValue for negative sizes). bf16 = __nv_bfloat16; all
// tensors row-major.
#ifndef KLS_ENGINE_BACKEND_CUDA_CUDA_OPS_H_
#define KLS_ENGINE_BACKEND_CUDA_CUDA_OPS_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kls::engine::cuda {

// out[t, i] = silu(gate_up[t, i]) · gate_up[t, width + i]  (fp32 math, one bf16 rounding)
//   gate_up [rows, 2·width] (gate ‖ up); out [rows, width]
cudaError_t LaunchSiluMul(const __nv_bfloat16* gate_up, int64_t rows, int width, __nv_bfloat16* out,
                          cudaStream_t stream);

// The MLA cache row of each token from kv_a_proj's output: the latent normalized with
// kv_a_layernorm, then k_pe copied.
//   kv [rows, dc + dr]; weight [dc]; out [rows, dc + dr]:
//   out[t, :dc] = weight ⊙ kv[t, :dc] / sqrt(mean(kv[t, :dc]²) + eps),  out[t, dc:] = kv[t, dc:]
cudaError_t LaunchLatentNormPack(const __nv_bfloat16* kv, const __nv_bfloat16* weight, int64_t rows,
                                 int dc, int dr, float eps, __nv_bfloat16* out,
                                 cudaStream_t stream);

// Copies every cached row of the sequences out of their pages, in token order:
//   out[row_starts[n] + i, :] = pages[block_table[n][i / page_size], i % page_size, :]
// for i < row_starts[n+1] − row_starts[n].
//   pages [num_pages, page_size, row_dim]; block_table [num_seqs, max_pages_per_seq];
//   row_starts [num_seqs + 1] device; out [total_rows, row_dim]
cudaError_t LaunchGatherPagedRows(const __nv_bfloat16* pages, int page_size, int row_dim,
                                  const int32_t* block_table, int max_pages_per_seq,
                                  const int32_t* row_starts, int num_seqs, int64_t total_rows,
                                  __nv_bfloat16* out, cudaStream_t stream);

// Keys of non-absorbed MLA: per row r and head h, k[r, h] = (k_nope[r, h] ‖ k_pe[r]).
//   kv_b [rows, heads, dn + dv] (kv_b_proj's output: dn key columns, then dv value columns)
//   cache_rows [rows, dc + dr] (the latent rows; k_pe is columns [dc, dc + dr))
//   k [rows, heads, dn + dr]
cudaError_t LaunchBuildMlaKeys(const __nv_bfloat16* kv_b, const __nv_bfloat16* cache_rows,
                               int64_t rows, int heads, int dn, int dv, int dc, int dr,
                               __nv_bfloat16* k, cudaStream_t stream);

// The pre-norm block boundary with an fp32 residual stream (the layers' outputs are bf16; the
// sum they accumulate into stays fp32, so rounding does not pile up over the depth):
//   residual[r, :] += delta[r, :] (skipped when delta is null);
//   out[r, :] = bf16(weight ⊙ residual[r, :] / sqrt(mean(residual[r, :]²) + eps))
//   delta [rows, dim] bf16 or null; residual [rows, dim] fp32 in/out; weight [dim]; out [rows, dim]
cudaError_t LaunchAddRmsNormF32(const __nv_bfloat16* delta, float* residual,
                                const __nv_bfloat16* weight, int64_t rows, int dim, float eps,
                                __nv_bfloat16* out, cudaStream_t stream);

// ok[r] = 1 when row r of logits [rows, vocab] fp32 holds no NaN and at least one finite
// value (kernels::SamplableLogits), else 0. One block per row.
cudaError_t LaunchLogitsSamplable(const float* logits, int rows, int64_t vocab, int32_t* ok,
                                  cudaStream_t stream);

// Elementwise conversions (round to nearest even; bf16 → fp32 is exact).
cudaError_t LaunchFloatToBf16(const float* in, int64_t n, __nv_bfloat16* out, cudaStream_t stream);
cudaError_t LaunchBf16ToFloat(const __nv_bfloat16* in, int64_t n, float* out, cudaStream_t stream);

// Seeded random fill, a pure function of (seed, index): kNormal gives mean + stddev·N(0, 1),
// kLogUniform gives log(1 + 15·U(0, 1)) (A_log). Written as bf16 or fp32.
enum class RandomFill { kNormal, kLogUniform };
cudaError_t LaunchRandomFill(void* out, bool fp32, int64_t n, uint64_t seed, RandomFill kind,
                             float mean, float stddev, cudaStream_t stream);

}  // namespace kls::engine::cuda

#endif  // KLS_ENGINE_BACKEND_CUDA_CUDA_OPS_H_

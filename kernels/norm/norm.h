// CUDA launchers for the norms of Kimi Linear (KIMI_LINEAR.md §2, §3.3, §3.7): RMSNorm, RMSNorm
// with the residual add fused in, the gated RMSNorm of the KDA output, and the L2 norm. CPU
// references: norm_ref.h; math and limits: README.md.
//
// All tensors are bf16, row-major with `dim` contiguous; statistics and the elementwise math are
// fp32 and every output is rounded to bf16 once. Launchers never synchronize and never allocate;
// they return cudaErrorInvalidValue (nothing launched) on a null pointer, rows < 0, dim < 1,
// heads < 1, a negative or NaN eps, or more than 2³¹−1 CTAs, and otherwise the launch status.
// rows == 0 launches nothing and returns cudaSuccess. `out` may be the same pointer as `x` (each
// element is read before it is written, by the same thread); any other overlap is unsupported.
// 16-byte aligned pointers with dim % 8 == 0 take the vectorized path; anything else works too.
#ifndef KLS_KERNELS_NORM_NORM_H_
#define KLS_KERNELS_NORM_NORM_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kls::kernels {

// out[r, :] = weight ⊙ x[r, :] / sqrt(mean(x[r, :]²) + eps)
//   x, out [rows, dim]; weight [dim]
cudaError_t LaunchRmsNorm(const __nv_bfloat16* x, const __nv_bfloat16* weight, int64_t rows,
                          int dim, float eps, __nv_bfloat16* out, cudaStream_t stream);

// The pre-norm block boundary, fused:
//   residual[r, :] = bf16(residual[r, :] + x[r, :]);  out[r, :] = RmsNorm(residual[r, :])
// The statistics are taken over the rounded sum, so this equals a bf16 add followed by
// LaunchRmsNorm bit for bit (up to fp32 summation order).
//   x [rows, dim] (may be the same pointer as out); residual [rows, dim] in/out (must not overlap
//   x or out); weight [dim]; out [rows, dim]
cudaError_t LaunchAddRmsNorm(const __nv_bfloat16* x, __nv_bfloat16* residual,
                             const __nv_bfloat16* weight, int64_t rows, int dim, float eps,
                             __nv_bfloat16* out, cudaStream_t stream);

// The KDA output gate (o_norm, sigmoid), per token t and head h:
//   out[t, h, :] = weight ⊙ x[t, h, :] / sqrt(mean(x[t, h, :]²) + eps) ⊙ sigmoid(gate[t, h, :])
//   x, out [tokens, heads, dim]; gate [tokens, heads·dim] pre-sigmoid (may be the same pointer
//   as out); weight [dim], shared by all heads
cudaError_t LaunchGatedRmsNorm(const __nv_bfloat16* x, const __nv_bfloat16* gate,
                               const __nv_bfloat16* weight, int64_t tokens, int heads, int dim,
                               float eps, __nv_bfloat16* out, cudaStream_t stream);

// out[r, :] = x[r, :] / sqrt(Σ x[r, :]² + eps)   (eps inside the sqrt; fla's l2norm, 1e-6)
//   x, out [rows, dim]; per-head use: rows = tokens·heads, dim = head_dim
cudaError_t LaunchL2Norm(const __nv_bfloat16* x, int64_t rows, int dim, float eps,
                         __nv_bfloat16* out, cudaStream_t stream);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_NORM_NORM_H_

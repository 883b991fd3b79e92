// CPU references for the norms of Kimi Linear: RMSNorm, gated RMSNorm (KDA output gate) and
// L2 norm (KDA q/k). Statistics in fp64. `out` may alias `x` in all three.
#ifndef KLS_KERNELS_NORM_NORM_REF_H_
#define KLS_KERNELS_NORM_NORM_REF_H_

#include <cstdint>

namespace kls::kernels {

// out[r, :] = weight ⊙ x[r, :] / sqrt(mean(x[r, :]²) + eps).
//   x, out [rows, dim]; weight [dim]
template <typename T>
void RmsNormReference(const T* x, const T* weight, int64_t rows, int64_t dim, double eps, T* out);

// Per row r and head h: out = weight ⊙ x / sqrt(mean(x²) + eps) ⊙ sigmoid(gate), with one
// weight vector shared by all heads (KIMI_LINEAR.md §3.7).
//   x, gate, out [rows, heads, dim]; weight [dim]
template <typename T>
void GatedRmsNormReference(const T* x, const T* gate, const T* weight, int64_t rows, int heads,
                           int64_t dim, double eps, T* out);

// out[r, :] = x[r, :] / sqrt(sum(x[r, :]²) + eps)   (eps inside the sqrt, fla's l2norm: 1e-6).
//   x, out [rows, dim]  (for per-head norms pass rows = tokens·heads, dim = head_dim)
template <typename T>
void L2NormReference(const T* x, int64_t rows, int64_t dim, double eps, T* out);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_NORM_NORM_REF_H_

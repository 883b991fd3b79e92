// CPU references for MLA attention (KIMI_LINEAR.md §5): non-absorbed causal attention over
// decompressed keys/values (prefill) and absorbed attention over the latent cache (decode).
// NoPE: nothing is rotated. Plain loops, fp64 accumulation, numerically safe softmax.
#ifndef KLS_KERNELS_MLA_MLA_REF_H_
#define KLS_KERNELS_MLA_MLA_REF_H_

#include <cstdint>

namespace kls::kernels {

// Causal softmax attention of `num_new` queries against `num_ctx` keys of one sequence, where
// the queries are the LAST num_new positions of the context: query i sits at position
// p_i = num_ctx - num_new + i and attends to keys 0..p_i.
//   q   [num_new, H, Dqk]
//   k   [num_ctx, H, Dqk]
//   v   [num_ctx, H, Dv]
//   out [num_new, H, Dv]
template <typename T>
void MlaPrefillAttentionReference(const T* q, const T* k, const T* v, int64_t num_new,
                                  int64_t num_ctx, int num_heads, int dqk, int dv, double scale,
                                  T* out);

// Absorbed MLA over the latent cache of one sequence. The cache holds, per position, the
// normalized latent c (Dc values) followed by the shared k_pe (Dr values). Query i sits at
// position p_i = num_ctx - num_new + i and attends to cache rows 0..p_i. Per head h:
//   q_lat  = W_UK^hᵀ q_nope^h                     (Dc)
//   s(τ)   = (q_lat · c_τ + q_pe^h · kpe_τ) * scale
//   o^h    = W_UV^h · Σ_τ softmax(s)(τ) c_τ       (Dv)
// where W_UK^h / W_UV^h are rows [h*(Dn+Dv), h*(Dn+Dv)+Dn) / [h*(Dn+Dv)+Dn, (h+1)*(Dn+Dv)) of
// kv_b_proj.
//   q_nope      [num_new, H, Dn]
//   q_pe        [num_new, H, Dr]
//   cache       [num_ctx, Dc + Dr]
//   kv_b_proj   [H * (Dn + Dv), Dc]   (kv_b_proj.weight, rows per head: Dn k_nope then Dv v)
//   out         [num_new, H, Dv]
template <typename T>
void MlaDecodeAbsorbedReference(const T* q_nope, const T* q_pe, const T* cache, const T* kv_b_proj,
                                int64_t num_new, int64_t num_ctx, int num_heads, int dn, int dr,
                                int dc, int dv, double scale, T* out);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_MLA_MLA_REF_H_

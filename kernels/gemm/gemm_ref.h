// CPU reference for the GEMMs of gemm.h: plain loops, fp64 accumulation, no tricks.
#ifndef KLS_KERNELS_GEMM_GEMM_REF_H_
#define KLS_KERNELS_GEMM_GEMM_REF_H_

#include <cstdint>

namespace kls::kernels {

// For b < batch, i < m, o < n:
//   y[b·batch_stride_y + i·ldy + o] (+)= Σ_{j<k} x[b·batch_stride_x + i·ldx + j]
//                                          · w[b·batch_stride_w + o·w_stride_n + j·w_stride_k]
// summed in fp64 in increasing j and rounded to T once (added to the old y when `accumulate`).
// Strided addressing covers both weight layouts of gemm.h: kNK (nn.Linear [n, k]) is
// w_stride_n = ldw, w_stride_k = 1; kKN ([k, n]) is w_stride_n = 1, w_stride_k = ldw.
// m, batch == 0 do nothing; k == 0 writes zeros (or leaves y unchanged when accumulating).
template <typename T>
void GemmReference(const T* x, int64_t ldx, int64_t batch_stride_x, const T* w, int64_t w_stride_n,
                   int64_t w_stride_k, int64_t batch_stride_w, T* y, int64_t ldy,
                   int64_t batch_stride_y, int64_t m, int64_t n, int64_t k, int64_t batch,
                   bool accumulate);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_GEMM_GEMM_REF_H_

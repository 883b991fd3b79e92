// CPU reference for the GEMMs of gemm.h (see gemm_ref.h).
#include "kernels/gemm/gemm_ref.h"

#include <cstdint>

namespace kls::kernels {

template <typename T>
void GemmReference(const T* x, int64_t ldx, int64_t batch_stride_x, const T* w, int64_t w_stride_n,
                   int64_t w_stride_k, int64_t batch_stride_w, T* y, int64_t ldy,
                   int64_t batch_stride_y, int64_t m, int64_t n, int64_t k, int64_t batch,
                   bool accumulate) {
  for (int64_t b = 0; b < batch; ++b) {
    const T* xb = x + b * batch_stride_x;
    const T* wb = w + b * batch_stride_w;
    T* yb = y + b * batch_stride_y;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t o = 0; o < n; ++o) {
        double sum = 0.0;
        for (int64_t j = 0; j < k; ++j) {
          sum += static_cast<double>(xb[i * ldx + j]) *
                 static_cast<double>(wb[o * w_stride_n + j * w_stride_k]);
        }
        T& out = yb[i * ldy + o];
        out = static_cast<T>(accumulate ? static_cast<double>(out) + sum : sum);
      }
    }
  }
}

template void GemmReference<float>(const float*, int64_t, int64_t, const float*, int64_t, int64_t,
                                   int64_t, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                   int64_t, bool);
template void GemmReference<double>(const double*, int64_t, int64_t, const double*, int64_t,
                                    int64_t, int64_t, double*, int64_t, int64_t, int64_t, int64_t,
                                    int64_t, int64_t, bool);

}  // namespace kls::kernels

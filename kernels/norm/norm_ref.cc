#include "kernels/norm/norm_ref.h"

#include <cmath>

namespace kls::kernels {
namespace {

// 1 / sqrt(mean(x^2) + eps) over n values, in fp64.
template <typename T>
double InverseRms(const T* x, int64_t n, double eps) {
  double sum_sq = 0;
  for (int64_t i = 0; i < n; ++i) sum_sq += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return 1.0 / std::sqrt(sum_sq / static_cast<double>(n) + eps);
}

double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

}  // namespace

// Each element is read before its own output is written and no other element is read after,
// so out == x is safe in all three functions.
template <typename T>
void RmsNormReference(const T* x, const T* weight, int64_t rows, int64_t dim, double eps, T* out) {
  if (dim <= 0) return;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    T* yr = out + r * dim;
    const double inv_rms = InverseRms(xr, dim, eps);
    for (int64_t i = 0; i < dim; ++i) {
      yr[i] = static_cast<T>(static_cast<double>(weight[i]) * static_cast<double>(xr[i]) * inv_rms);
    }
  }
}

template <typename T>
void GatedRmsNormReference(const T* x, const T* gate, const T* weight, int64_t rows, int heads,
                           int64_t dim, double eps, T* out) {
  if (dim <= 0) return;
  for (int64_t r = 0; r < rows * heads; ++r) {
    const T* xr = x + r * dim;
    const T* zr = gate + r * dim;
    T* yr = out + r * dim;
    const double inv_rms = InverseRms(xr, dim, eps);
    for (int64_t i = 0; i < dim; ++i) {
      const double normed = static_cast<double>(weight[i]) * static_cast<double>(xr[i]) * inv_rms;
      yr[i] = static_cast<T>(normed * Sigmoid(static_cast<double>(zr[i])));
    }
  }
}

template <typename T>
void L2NormReference(const T* x, int64_t rows, int64_t dim, double eps, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    T* yr = out + r * dim;
    double sum_sq = 0;
    for (int64_t i = 0; i < dim; ++i) {
      sum_sq += static_cast<double>(xr[i]) * static_cast<double>(xr[i]);
    }
    const double inv_norm = 1.0 / std::sqrt(sum_sq + eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = static_cast<T>(static_cast<double>(xr[i]) * inv_norm);
  }
}

template void RmsNormReference<float>(const float*, const float*, int64_t, int64_t, double, float*);
template void RmsNormReference<double>(const double*, const double*, int64_t, int64_t, double,
                                       double*);
template void GatedRmsNormReference<float>(const float*, const float*, const float*, int64_t, int,
                                           int64_t, double, float*);
template void GatedRmsNormReference<double>(const double*, const double*, const double*, int64_t,
                                            int, int64_t, double, double*);
template void L2NormReference<float>(const float*, int64_t, int64_t, double, float*);
template void L2NormReference<double>(const double*, int64_t, int64_t, double, double*);

}  // namespace kls::kernels

#include "kernels/conv/conv_ref.h"

#include <cmath>
#include <vector>

namespace kls::kernels {
namespace {

double Silu(double x) { return x / (1.0 + std::exp(-x)); }

}  // namespace

template <typename T>
void CausalConv1dSiluReference(const T* x, const T* weight, const int64_t* cu_seqlens,
                               int64_t num_seqs, int64_t dim, int width, T* const* conv_states,
                               T* out) {
  if (num_seqs <= 0 || dim <= 0 || width <= 0) return;
  const int64_t history = width - 1;  // rows of each conv state
  std::vector<double> new_state(static_cast<size_t>(history * dim));
  for (int64_t n = 0; n < num_seqs; ++n) {
    const int64_t bos = cu_seqlens[n], len = cu_seqlens[n + 1] - bos;
    T* state = history > 0 ? conv_states[n] : nullptr;
    // Input at sequence-local position tau in [-history, len): the state holds tau < 0.
    const auto input = [&](int64_t tau, int64_t c) -> double {
      return tau < 0 ? static_cast<double>(state[(history + tau) * dim + c])
                     : static_cast<double>(x[(bos + tau) * dim + c]);
    };
    for (int64_t t = 0; t < len; ++t) {
      for (int64_t c = 0; c < dim; ++c) {
        double sum = 0;
        for (int i = 0; i < width; ++i) {
          sum += static_cast<double>(weight[c * width + i]) * input(t - history + i, c);
        }
        out[(bos + t) * dim + c] = static_cast<T>(Silu(sum));
      }
    }
    // The last `history` inputs of the extended sequence; staged because a short sequence
    // (len < history) keeps part of the old state.
    for (int64_t r = 0; r < history; ++r) {
      for (int64_t c = 0; c < dim; ++c) new_state[r * dim + c] = input(len - history + r, c);
    }
    for (int64_t i = 0; i < history * dim; ++i) state[i] = static_cast<T>(new_state[i]);
  }
}

template void CausalConv1dSiluReference<float>(const float*, const float*, const int64_t*, int64_t,
                                               int64_t, int, float* const*, float*);
template void CausalConv1dSiluReference<double>(const double*, const double*, const int64_t*,
                                                int64_t, int64_t, int, double* const*, double*);

}  // namespace kls::kernels

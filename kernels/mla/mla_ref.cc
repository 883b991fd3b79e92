// CPU references for MLA attention (KIMI_LINEAR.md §5; math in kernels/mla/README.md).
// Preconditions (the caller validates): 0 <= num_new <= num_ctx, positive dimensions, no
// aliasing between inputs and `out`. A query that would see no key (only possible when
// num_new > num_ctx) gets a zero output instead of reading out of bounds.
#include "kernels/mla/mla_ref.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace kls::kernels {
namespace {

// In place: w[0..n) = exp(w - max(w)) and returns Σ exp(...); n >= 1. Subtracting the max
// keeps exp() in (0, 1], so large scores cannot overflow.
double SoftmaxNumerators(double* w, int64_t n) {
  double max_score = w[0];
  for (int64_t j = 1; j < n; ++j) max_score = std::max(max_score, w[j]);
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    w[j] = std::exp(w[j] - max_score);
    sum += w[j];
  }
  return sum;
}

}  // namespace

template <typename T>
void MlaPrefillAttentionReference(const T* q, const T* k, const T* v, int64_t num_new,
                                  int64_t num_ctx, int num_heads, int dqk, int dv, double scale,
                                  T* out) {
  if (num_new <= 0 || num_heads <= 0) return;
  const int64_t q_row = static_cast<int64_t>(num_heads) * dqk;
  const int64_t v_row = static_cast<int64_t>(num_heads) * dv;
  std::vector<double> weights(static_cast<size_t>(std::max<int64_t>(num_ctx, 1)));
  std::vector<double> acc(static_cast<size_t>(std::max(dv, 1)));

  for (int64_t i = 0; i < num_new; ++i) {
    const int64_t visible = std::min(num_ctx, num_ctx - num_new + i + 1);  // keys 0..p_i
    for (int h = 0; h < num_heads; ++h) {
      T* o = out + i * v_row + static_cast<int64_t>(h) * dv;
      if (visible <= 0) {
        std::fill(o, o + dv, T(0));
        continue;
      }
      const T* qh = q + i * q_row + static_cast<int64_t>(h) * dqk;
      for (int64_t j = 0; j < visible; ++j) {
        const T* kh = k + j * q_row + static_cast<int64_t>(h) * dqk;
        double dot = 0.0;
        for (int d = 0; d < dqk; ++d) dot += double(qh[d]) * double(kh[d]);
        weights[j] = dot * scale;
      }
      const double sum = SoftmaxNumerators(weights.data(), visible);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j < visible; ++j) {
        const T* vh = v + j * v_row + static_cast<int64_t>(h) * dv;
        for (int d = 0; d < dv; ++d) acc[d] += weights[j] * double(vh[d]);
      }
      for (int d = 0; d < dv; ++d) o[d] = static_cast<T>(acc[d] / sum);
    }
  }
}

template <typename T>
void MlaDecodeAbsorbedReference(const T* q_nope, const T* q_pe, const T* cache, const T* kv_b_proj,
                                int64_t num_new, int64_t num_ctx, int num_heads, int dn, int dr,
                                int dc, int dv, double scale, T* out) {
  if (num_new <= 0 || num_heads <= 0) return;
  const int64_t cache_row = static_cast<int64_t>(dc) + dr;
  const int64_t head_rows = static_cast<int64_t>(dn) + dv;  // kv_b_proj rows per head
  std::vector<double> q_lat(static_cast<size_t>(std::max(dc, 1)));
  std::vector<double> ctx_lat(static_cast<size_t>(std::max(dc, 1)));
  std::vector<double> weights(static_cast<size_t>(std::max<int64_t>(num_ctx, 1)));

  for (int64_t i = 0; i < num_new; ++i) {
    const int64_t visible = std::min(num_ctx, num_ctx - num_new + i + 1);
    for (int h = 0; h < num_heads; ++h) {
      T* o = out + (i * num_heads + h) * static_cast<int64_t>(dv);
      if (visible <= 0) {
        std::fill(o, o + dv, T(0));
        continue;
      }
      const T* qn = q_nope + (i * num_heads + h) * static_cast<int64_t>(dn);
      const T* qp = q_pe + (i * num_heads + h) * static_cast<int64_t>(dr);
      const T* w_uk = kv_b_proj + h * head_rows * dc;        // [Dn, Dc]
      const T* w_uv = w_uk + static_cast<int64_t>(dn) * dc;  // [Dv, Dc]

      // q_lat = W_UKᵀ q_nope, kept in fp64 (absorbing never rounds through T).
      std::fill(q_lat.begin(), q_lat.end(), 0.0);
      for (int n = 0; n < dn; ++n) {
        const double qv = qn[n];
        const T* row = w_uk + static_cast<int64_t>(n) * dc;
        for (int c = 0; c < dc; ++c) q_lat[c] += qv * double(row[c]);
      }

      for (int64_t j = 0; j < visible; ++j) {
        const T* c_row = cache + j * cache_row;
        const T* kpe_row = c_row + dc;
        double dot = 0.0;
        for (int c = 0; c < dc; ++c) dot += q_lat[c] * double(c_row[c]);
        for (int r = 0; r < dr; ++r) dot += double(qp[r]) * double(kpe_row[r]);
        weights[j] = dot * scale;
      }
      const double sum = SoftmaxNumerators(weights.data(), visible);

      std::fill(ctx_lat.begin(), ctx_lat.end(), 0.0);
      for (int64_t j = 0; j < visible; ++j) {
        const T* c_row = cache + j * cache_row;
        for (int c = 0; c < dc; ++c) ctx_lat[c] += weights[j] * double(c_row[c]);
      }
      for (int c = 0; c < dc; ++c) ctx_lat[c] /= sum;

      for (int d = 0; d < dv; ++d) {
        const T* row = w_uv + static_cast<int64_t>(d) * dc;
        double acc = 0.0;
        for (int c = 0; c < dc; ++c) acc += double(row[c]) * ctx_lat[c];
        o[d] = static_cast<T>(acc);
      }
    }
  }
}

template void MlaPrefillAttentionReference<float>(const float*, const float*, const float*, int64_t,
                                                  int64_t, int, int, int, double, float*);
template void MlaPrefillAttentionReference<double>(const double*, const double*, const double*,
                                                   int64_t, int64_t, int, int, int, double,
                                                   double*);
template void MlaDecodeAbsorbedReference<float>(const float*, const float*, const float*,
                                                const float*, int64_t, int64_t, int, int, int, int,
                                                int, double, float*);
template void MlaDecodeAbsorbedReference<double>(const double*, const double*, const double*,
                                                 const double*, int64_t, int64_t, int, int, int,
                                                 int, int, double, double*);

}  // namespace kls::kernels

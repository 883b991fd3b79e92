// CPU references for the Kimi Linear MoE block (KIMI_LINEAR.md §6.2; see kernels/moe/README.md).
// Router: scores, selection keys and weights are computed in fp64 and rounded to fp32 once, at
// the end.
// Preconditions (the caller validates): num_experts >= 1, 1 <= top_k <= num_experts. Outside
// them nothing is read out of bounds: slots past num_experts get id -1 and weight 0.
// A NaN logit or bias makes that expert's selection key -inf (never preferred over a number).
#include "kernels/moe/moe_ref.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace kls::kernels {
namespace {

// x rounded to fp32, then to the nearest bf16 with ties to even: __float2bfloat16_rn of the
// fp32 value a kernel holds. NaN stays NaN; overflow gives ±inf, as on the device.
double RoundToBf16(double x) {
  const float f = static_cast<float>(x);
  if (std::isnan(f)) return x;
  uint32_t bits = std::bit_cast<uint32_t>(f);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<double>(std::bit_cast<float>(bits & 0xFFFF0000u));
}

}  // namespace

void MoeRouteReference(const float* logits, const float* bias, int64_t num_tokens, int num_experts,
                       int top_k, bool renormalize, double routed_scaling_factor,
                       RouterWeighting weighting, int32_t* expert_ids, float* expert_weights) {
  if (num_tokens <= 0 || top_k <= 0) return;
  const int chosen = std::clamp(num_experts, 0, top_k);
  std::vector<double> scores(static_cast<size_t>(std::max(num_experts, 0)));
  std::vector<double> keys(scores.size());
  std::vector<int32_t> order(scores.size());
  std::vector<double> w(static_cast<size_t>(top_k));

  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* row = logits + t * num_experts;
    for (int e = 0; e < num_experts; ++e) {
      scores[e] = 1.0 / (1.0 + std::exp(-double(row[e])));
      keys[e] = scores[e] + (bias != nullptr ? double(bias[e]) : 0.0);
      if (std::isnan(keys[e])) keys[e] = -INFINITY;
    }
    // Descending key, ties to the lower id: a strict total order, so the result is unique.
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(
        order.begin(), order.begin() + chosen, order.end(),
        [&](int32_t a, int32_t b) { return keys[a] > keys[b] || (keys[a] == keys[b] && a < b); });

    double sum = 0.0;
    for (int i = 0; i < chosen; ++i) {
      const int32_t e = order[i];
      w[i] = scores[e];
      if (weighting == RouterWeighting::kBiased && bias != nullptr) w[i] += double(bias[e]);
      sum += w[i];
    }
    // A zero sum (every chosen score underflowed, or biased weights cancelling) would give
    // 0/0; leave the weights unnormalized instead of emitting NaN.
    const bool divide = renormalize && sum != 0.0;
    int32_t* ids = expert_ids + t * top_k;
    float* weights = expert_weights + t * top_k;
    for (int i = 0; i < top_k; ++i) {
      if (i < chosen) {
        ids[i] = order[i];
        const double wi = divide ? w[i] / sum : w[i];
        weights[i] = static_cast<float>(wi * routed_scaling_factor);
      } else {
        ids[i] = -1;
        weights[i] = 0.0f;
      }
    }
  }
}

template <typename T>
void MoeExpertsReference(const T* hidden, int64_t num_tokens, int hidden_size,
                         int intermediate_size, int num_experts, int top_k,
                         const int32_t* expert_ids, const float* expert_weights,
                         const T* const* w_gate, const T* const* w_up, const T* const* w_down,
                         const T* shared_out, T* out, MoeReferenceRounding rounding) {
  if (num_tokens <= 0 || hidden_size <= 0 || intermediate_size <= 0 || top_k <= 0) return;
  const int64_t d_model = hidden_size, width = intermediate_size;
  const bool bf16 = rounding == MoeReferenceRounding::kBf16Storage;
  std::vector<double> acc(d_model), act(width);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const T* x = hidden + t * d_model;
    for (int64_t d = 0; d < d_model; ++d) {
      acc[d] = shared_out != nullptr ? double(shared_out[t * d_model + d]) : 0.0;
    }
    for (int slot = 0; slot < top_k; ++slot) {
      const int32_t e = expert_ids[t * top_k + slot];
      if (e < 0 || e >= num_experts) continue;
      const double weight = expert_weights[t * top_k + slot];
      const T* gate = w_gate[e];
      const T* up = w_up[e];
      const T* down = w_down[e];
      for (int64_t j = 0; j < width; ++j) {
        double g = 0.0, u = 0.0;
        for (int64_t d = 0; d < d_model; ++d) {
          g += double(x[d]) * double(gate[j * d_model + d]);
          u += double(x[d]) * double(up[j * d_model + d]);
        }
        act[j] = g / (1.0 + std::exp(-g)) * u;
        if (bf16) act[j] = RoundToBf16(act[j]);  // the kernels' act buffer
      }
      for (int64_t d = 0; d < d_model; ++d) {
        double y = 0.0;
        for (int64_t j = 0; j < width; ++j) y += act[j] * double(down[d * width + j]);
        if (bf16) y = RoundToBf16(y);  // the kernels' pair_out row
        acc[d] += weight * y;
      }
    }
    for (int64_t d = 0; d < d_model; ++d) out[t * d_model + d] = static_cast<T>(acc[d]);
  }
}

template void MoeExpertsReference<float>(const float*, int64_t, int, int, int, int, const int32_t*,
                                         const float*, const float* const*, const float* const*,
                                         const float* const*, const float*, float*,
                                         MoeReferenceRounding);
template void MoeExpertsReference<double>(const double*, int64_t, int, int, int, int,
                                          const int32_t*, const float*, const double* const*,
                                          const double* const*, const double* const*, const double*,
                                          double*, MoeReferenceRounding);

}  // namespace kls::kernels

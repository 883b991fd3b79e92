// CPU reference for the Kimi Linear MoE router (KIMI_LINEAR.md §6.2; see kernels/moe/README.md).
// Scores, selection keys and weights are computed in fp64 and rounded to fp32 once, at the end.
// Preconditions (the caller validates): num_experts >= 1, 1 <= top_k <= num_experts. Outside
// them nothing is read out of bounds: slots past num_experts get id -1 and weight 0.
// A NaN logit or bias makes that expert's selection key -inf (never preferred over a number).
#include "kernels/moe/moe_ref.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace kls::kernels {

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

}  // namespace kls::kernels

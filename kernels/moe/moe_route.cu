// MoE router (LaunchMoeRoute, moe.h): sigmoid scores, top-k by score + correction bias, weights,
// renormalization and scaling, matching MoeRouteReference (moe_ref.cc) operation for operation.
//
// CTA mapping: one warp per token, kTokensPerCta = 4 warps per CTA, grid ⌈T / 4⌉. Lane l holds
// experts e = l + 32·j (j < kPerLane = the next power of two ≥ ⌈E / 32⌉, so E ≤ 512) in
// registers. Each of the top_k rounds takes every lane's best remaining expert and reduces
// (key, id, weight) over the warp with five xor-shuffles, using the reference's strict order
// (key descending, then id ascending); the owner lane marks the winner removed in a bitmask.
// Lane i keeps round i's winner, so slot i is written by lane i.
//
// Numerics: the sigmoid, keys, weights, their sum (accumulated in selection order by every
// lane), the division and the scaling are fp64 operations in the reference's order, rounded
// to fp32 once. Only exp() may differ from the host's libm (≤ 1 ulp of fp64), so ids agree
// except on keys that tie to within ~1e-16. No shared memory.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "kernels/moe/moe.h"

namespace kls::kernels {
namespace {

constexpr int kTokensPerCta = 4;

// a before b in the reference's strict total order.
__device__ __forceinline__ bool Before(double key_a, int id_a, double key_b, int id_b) {
  return key_a > key_b || (key_a == key_b && id_a < id_b);
}

template <int kPerLane>
__global__ void __launch_bounds__(kTokensPerCta * 32)
    MoeRouteKernel(const float* __restrict__ logits, int64_t row_stride,
                   const float* __restrict__ bias, int64_t num_tokens, int num_experts, int top_k,
                   bool renormalize, double scaling, bool biased_weights,
                   int32_t* __restrict__ expert_ids, float* __restrict__ expert_weights) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTokensPerCta + (threadIdx.x >> 5);
  if (t >= num_tokens) return;  // warp-uniform
  const float* row = logits + t * row_stride;

  double key[kPerLane], weight[kPerLane];
  unsigned removed = 0;  // bit j: expert lane + 32·j is chosen already or does not exist
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int e = lane + 32 * j;
    key[j] = -INFINITY;
    weight[j] = 0.0;
    if (e < num_experts) {
      // The reference's expressions; __dadd_rn keeps the compiler from contracting anything.
      const double s = __ddiv_rn(1.0, __dadd_rn(1.0, exp(-static_cast<double>(row[e]))));
      const double b = bias != nullptr ? static_cast<double>(bias[e]) : 0.0;
      const double k = __dadd_rn(s, b);
      key[j] = isnan(k) ? -INFINITY : k;
      weight[j] = biased_weights ? k : s;
    } else {
      removed |= 1u << j;
    }
  }

  double sum = 0.0;
  double my_weight = 0.0;
  int my_id = -1;
  for (int i = 0; i < top_k; ++i) {
    double best_key = -INFINITY, best_weight = 0.0;
    int best_id = INT_MAX;  // "none": any real expert, even with key −inf, comes before it
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + 32 * j;
      if (!((removed >> j) & 1u) && Before(key[j], e, best_key, best_id)) {
        best_key = key[j];
        best_id = e;
        best_weight = weight[j];
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const double other_key = __shfl_xor_sync(0xffffffffu, best_key, offset);
      const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
      const double other_weight = __shfl_xor_sync(0xffffffffu, best_weight, offset);
      if (Before(other_key, other_id, best_key, best_id)) {
        best_key = other_key;
        best_id = other_id;
        best_weight = other_weight;
      }
    }
    // Every lane now holds the same winner (top_k <= E, so it is a real expert).
    if ((best_id & 31) == lane) removed |= 1u << (best_id >> 5);
    sum = __dadd_rn(sum, best_weight);
    if (lane == i) {
      my_id = best_id;
      my_weight = best_weight;
    }
  }

  if (lane < top_k) {
    const bool divide = renormalize && sum != 0.0;
    const double w = divide ? __ddiv_rn(my_weight, sum) : my_weight;
    expert_ids[t * top_k + lane] = my_id;
    expert_weights[t * top_k + lane] = static_cast<float>(__dmul_rn(w, scaling));
  }
}

template <int kPerLane>
cudaError_t Launch(const float* logits, int64_t row_stride, const float* bias, int64_t num_tokens,
                   int num_experts, int top_k, bool renormalize, double scaling, bool biased,
                   int32_t* expert_ids, float* expert_weights, cudaStream_t stream) {
  const int64_t blocks = (num_tokens + kTokensPerCta - 1) / kTokensPerCta;
  MoeRouteKernel<kPerLane><<<static_cast<unsigned>(blocks), kTokensPerCta * 32, 0, stream>>>(
      logits, row_stride, bias, num_tokens, num_experts, top_k, renormalize, scaling, biased,
      expert_ids, expert_weights);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchMoeRoute(const float* logits, int64_t logits_row_stride, const float* bias,
                           int64_t num_tokens, int num_experts, int top_k, bool renormalize,
                           double routed_scaling_factor, RouterWeighting weighting,
                           int32_t* expert_ids, float* expert_weights, cudaStream_t stream) {
  if (num_tokens < 0 || num_experts < 1 || num_experts > kMoeMaxExperts || top_k < 1 ||
      top_k > kMoeMaxTopK || top_k > num_experts || logits_row_stride < num_experts ||
      logits == nullptr || expert_ids == nullptr || expert_weights == nullptr ||
      (weighting != RouterWeighting::kUnbiased && weighting != RouterWeighting::kBiased)) {
    return cudaErrorInvalidValue;
  }
  // The grid's x dimension holds ⌈T / 4⌉ CTAs.
  if ((num_tokens + kTokensPerCta - 1) / kTokensPerCta > int64_t{INT_MAX}) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0) return cudaSuccess;
  // The reference adds the bias to the weights only when there is a bias.
  const bool biased = weighting == RouterWeighting::kBiased && bias != nullptr;
  const int per_lane = (num_experts + 31) / 32;
  auto launch = [&](auto kernel_per_lane) {
    return Launch<decltype(kernel_per_lane)::value>(
        logits, logits_row_stride, bias, num_tokens, num_experts, top_k, renormalize,
        routed_scaling_factor, biased, expert_ids, expert_weights, stream);
  };
  if (per_lane <= 1) return launch(std::integral_constant<int, 1>{});
  if (per_lane <= 2) return launch(std::integral_constant<int, 2>{});
  if (per_lane <= 4) return launch(std::integral_constant<int, 4>{});
  if (per_lane <= 8) return launch(std::integral_constant<int, 8>{});
  return launch(std::integral_constant<int, 16>{});
}

}  // namespace kls::kernels

// MoE router (LaunchMoeRoute, moe.h): sigmoid scores, top-k by score + correction bias, weights,
// renormalization and scaling, matching MoeRouteReference (moe_ref.cc) operation for operation.
//
// CTA mapping: one warp per token, kTokensPerCta = 4 warps per CTA, grid ⌈T / 4⌉. Lane l holds
// experts e = l + 32·j (j < kPerLane = the next power of two ≥ ⌈E / 32⌉, so E ≤ 512) in
// registers. Each key is also kept as an order-preserving 64-bit code (a larger key, a larger
// code; 0 means "none"). Each of the top_k rounds takes every lane's best remaining expert and
// finds the warp's winner in the reference's strict order (key descending, then id ascending)
// with three single-instruction warp reductions (max of the code's high word, max of the low word
// among the lanes that tie on it, min of the id among the lanes that tie on both) instead of a
// shuffle tree; the winner's lane broadcasts its weight and marks it removed in a bitmask. Lane i
// keeps round i's winner, so slot i is written by lane i.
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

// An order-preserving code of a non-NaN key: a > b as doubles iff Code(a) > Code(b), and every
// key (−inf included) codes above 0. −0 is coded as +0, which it equals.
__device__ __forceinline__ uint64_t Code(double key) {
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(key == 0.0 ? 0.0 : key));
  return (bits >> 63) != 0 ? ~bits : bits | (uint64_t{1} << 63);
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

  uint64_t code[kPerLane];
  double weight[kPerLane];
  unsigned removed = 0;  // bit j: expert lane + 32·j is chosen already or does not exist
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int e = lane + 32 * j;
    code[j] = 0;
    weight[j] = 0.0;
    if (e < num_experts) {
      // The reference's expressions; __dadd_rn keeps the compiler from contracting anything.
      const double s = __ddiv_rn(1.0, __dadd_rn(1.0, exp(-static_cast<double>(row[e]))));
      const double b = bias != nullptr ? static_cast<double>(bias[e]) : 0.0;
      const double k = __dadd_rn(s, b);
      code[j] = Code(isnan(k) ? -INFINITY : k);
      weight[j] = biased_weights ? k : s;
    } else {
      removed |= 1u << j;
    }
  }

  double sum = 0.0;
  double my_weight = 0.0;
  int my_id = -1;
  for (int i = 0; i < top_k; ++i) {
    // This lane's best remaining expert: the largest code, the lowest id (j) among equal codes.
    uint64_t best = 0;
    int best_j = 0;
    double best_weight = 0.0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (!((removed >> j) & 1u) && code[j] > best) {
        best = code[j];
        best_j = j;
        best_weight = weight[j];
      }
    }
    // The warp's winner (top_k <= E, so some lane still has a real expert: best > 0).
    const unsigned hi = static_cast<unsigned>(best >> 32), lo = static_cast<unsigned>(best);
    const unsigned max_hi = __reduce_max_sync(0xffffffffu, hi);
    const unsigned max_lo = __reduce_max_sync(0xffffffffu, hi == max_hi ? lo : 0u);
    const bool tied = best != 0 && hi == max_hi && lo == max_lo;
    const unsigned best_id =
        __reduce_min_sync(0xffffffffu, tied ? static_cast<unsigned>(lane + 32 * best_j) : ~0u);
    best_weight = __shfl_sync(0xffffffffu, best_weight, static_cast<int>(best_id & 31));
    if (static_cast<int>(best_id & 31) == lane) removed |= 1u << (best_id >> 5);
    sum = __dadd_rn(sum, best_weight);
    if (lane == i) {
      my_id = static_cast<int>(best_id);
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

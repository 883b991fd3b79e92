// CPU reference for the Kimi Linear MoE router (KIMI_LINEAR.md §6.2): sigmoid scores, top-k
// selection by score + correction bias, renormalization and the routed scaling factor.
#ifndef KLS_KERNELS_MOE_MOE_REF_H_
#define KLS_KERNELS_MOE_MOE_REF_H_

#include <cstdint>

namespace kls::kernels {

enum class RouterWeighting {
  // vLLM (the reference): weights are the unbiased sigmoid scores of the chosen experts.
  kUnbiased,
  // HF remote code: the bias is added in place, so weights are score + bias.
  kBiased,
};

// For each token t: s = sigmoid(logits[t]); choose the top_k experts by s + bias (ties go to
// the lower expert id), in descending order of s + bias; w_i = s_i (kUnbiased) or s_i + bias_i
// (kBiased); if renormalize, w_i /= Σ w; finally w_i *= routed_scaling_factor.
//   logits   [num_tokens, num_experts] router logits (b · W_routerᵀ), fp32
//   bias     [num_experts] e_score_correction_bias, or nullptr for none
//   expert_ids     [num_tokens, top_k] out
//   expert_weights [num_tokens, top_k] out
void MoeRouteReference(const float* logits, const float* bias, int64_t num_tokens, int num_experts,
                       int top_k, bool renormalize, double routed_scaling_factor,
                       RouterWeighting weighting, int32_t* expert_ids, float* expert_weights);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_MOE_MOE_REF_H_

// CPU references for the Kimi Linear MoE block (KIMI_LINEAR.md §6.2): the router (sigmoid
// scores, top-k selection by score + correction bias, renormalization and the routed scaling
// factor) and the routed experts' weighted SwiGLU sum.
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

// Where MoeExpertsReference rounds to bf16, so that a comparison can model the CUDA kernels'
// storage (moe.h, kernels/moe/README.md) instead of loosening a tolerance.
enum class MoeReferenceRounding {
  // fp64 throughout; the only rounding is the final store of out to T.
  kNone,
  // Round to bf16 (round-to-nearest-even, as __float2bfloat16_rn of the value rounded to fp32)
  // exactly where the kernels store bf16: the SwiGLU output silu(g)·u of each intermediate
  // column, and each (token, slot) expert output E_e(h_t) before it is weighted. Everything
  // else stays fp64: the GEMM sums, silu, and the combine shared + Σ w·E (the kernels' combine
  // sums in fp32 and rounds once to bf16 at the output, which is the caller's comparison to
  // allow for; rounding it here would also break sums of per-expert partial results). The
  // inputs are used as given: pass the kernels' bf16 values.
  kBf16Storage,
};

// The routed experts and the combine, plain loops with fp64 accumulation:
//   out[t] = shared_out[t] + Σ_slot expert_weights[t, slot] · E_{expert_ids[t, slot]}(hidden[t]),
//   E_e(x) = (silu(x · w_gate[e]ᵀ) ⊙ (x · w_up[e]ᵀ)) · w_down[e]ᵀ,  silu(a) = a / (1 + e^−a),
// with no intermediate rounding by default, or the kernels' bf16 roundings with
// MoeReferenceRounding::kBf16Storage. Slots whose id is outside [0, num_experts) contribute
// nothing. T is float or double. Never fails; nothing happens when a size is <= 0.
//   hidden          [num_tokens, hidden_size]
//   expert_ids      [num_tokens, top_k]
//   expert_weights  [num_tokens, top_k] (routed_scaling_factor already applied)
//   w_gate, w_up    [num_experts] pointers, each to [intermediate_size, hidden_size] (w1, w3)
//   w_down          [num_experts] pointers, each to [hidden_size, intermediate_size] (w2)
//                   (PyTorch [out, in] layouts; an expert no slot selects may be nullptr)
//   shared_out      [num_tokens, hidden_size], or nullptr for none
//   out             [num_tokens, hidden_size] out; may alias shared_out
template <typename T>
void MoeExpertsReference(const T* hidden, int64_t num_tokens, int hidden_size,
                         int intermediate_size, int num_experts, int top_k,
                         const int32_t* expert_ids, const float* expert_weights,
                         const T* const* w_gate, const T* const* w_up, const T* const* w_down,
                         const T* shared_out, T* out,
                         MoeReferenceRounding rounding = MoeReferenceRounding::kNone);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_MOE_MOE_REF_H_

// CPU reference for token sampling: greedy, temperature, top-k, top-p, seeded and
// counter-based (so a CUDA sampler can reproduce the same draws).
#ifndef KLS_KERNELS_SAMPLING_SAMPLING_REF_H_
#define KLS_KERNELS_SAMPLING_SAMPLING_REF_H_

#include <cstdint>

namespace kls::kernels {

struct SamplerConfig {
  float temperature = 0.0f;  // 0 = greedy (argmax, lowest id on ties)
  float top_p = 1.0f;        // in (0, 1]; 1 disables
  int top_k = 0;             // <= 0 disables
  uint64_t seed = 0;
};

// Uniform double in [0, 1) from (seed, counter): a pure function (splitmix64 mixing), so a draw
// depends only on (seed, counter), not on batching, other sequences or earlier draws.
double SamplerUniform(uint64_t seed, uint64_t counter);

// Draws one token from logits [vocab_size] (fp32). Procedure: greedy if temperature == 0;
// otherwise p = softmax(logits / temperature) in fp64; keep the top_k most likely tokens
// (ties by lower id); keep the smallest prefix of those, in descending probability, whose
// mass reaches top_p (at least one token); renormalize; invert the CDF at
// SamplerUniform(seed, counter). Non-finite logits are treated as -inf; if every logit is
// -inf the result is the lowest id. `counter` is any per-draw counter the caller chooses; it
// must be distinct for each draw of a sequence (equal (seed, counter) gives the same u). The
// engine passes the position of the token being drawn in its session, so draws survive
// resume and fork and do not depend on batching.
int32_t SampleReference(const float* logits, int64_t vocab_size, const SamplerConfig& config,
                        uint64_t counter);

// Whether logits [vocab_size] can be sampled from meaningfully: no NaN and at least one finite
// value (SampleReference would otherwise return an arbitrary id; the engine fails the turn).
bool SamplableLogits(const float* logits, int64_t vocab_size);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_SAMPLING_SAMPLING_REF_H_

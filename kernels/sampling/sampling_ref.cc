// CPU reference for token sampling (see kernels/sampling/README.md for the exact procedure a
// GPU sampler must follow to reproduce these draws).
//
// Conventions the header leaves open, fixed here:
//  * "Most likely" is ordered by logit, descending, ties to the lower id. In exact arithmetic
//    this is the order of softmax(logits / T); using the logits keeps top_k = 1 and tiny
//    top_p identical to greedy at every temperature (fp64 probabilities of distinct logits can
//    round to the same value at huge T).
//  * top_p is measured on the top_k set renormalized (vLLM / HF order: top-k, then top-p).
//  * The CDF is inverted over the kept tokens in ascending id order (a prefix sum over the
//    vocabulary on a GPU; no sort is needed when nothing is truncated).
//  * temperature must be > 0 when not greedy (the caller validates); a negative or NaN
//    temperature is treated as greedy rather than producing garbage. top_p >= 1 or NaN
//    disables top-p; top_p <= 0 keeps one token. vocab_size <= 0 returns 0.
// Thread-safety: safe to call concurrently; the non-greedy path reuses thread-local scratch
// buffers (grown once to the vocabulary size), the greedy path allocates nothing.
#include "kernels/sampling/sampling_ref.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/splitmix64.h"

namespace kls::kernels {
namespace {

// Lowest id among the largest finite logits; 0 when none is finite.
int32_t ArgmaxFinite(const float* logits, int64_t vocab_size) {
  int32_t best = 0;
  float best_value = -INFINITY;
  for (int64_t i = 0; i < vocab_size; ++i) {
    const float v = logits[i];
    // NaN and -inf fail the first test, +inf the second.
    if (v > best_value && v < INFINITY) {
      best_value = v;
      best = static_cast<int32_t>(i);
    }
  }
  return best;
}

struct Scratch {
  std::vector<double> prob;    // [vocab] softmax(logits / T), 0 for non-finite logits
  std::vector<int32_t> order;  // candidate ids (finite logits)
};

}  // namespace

bool SamplableLogits(const float* logits, int64_t vocab_size) {
  bool any_finite = false;
  for (int64_t i = 0; i < vocab_size; ++i) {
    if (std::isnan(logits[i])) return false;
    any_finite |= std::isfinite(logits[i]);
  }
  return any_finite;
}

double SamplerUniform(uint64_t seed, uint64_t counter) {
  // The counter-th output of a splitmix64 stream whose state starts at the first splitmix64
  // output of `seed`; the top 53 bits become a double in [0, 1).
  const uint64_t stream = SplitMix64Mix(seed + kGoldenGamma);
  const uint64_t bits = SplitMix64Mix(stream + (counter + 1) * kGoldenGamma);
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

int32_t SampleReference(const float* logits, int64_t vocab_size, const SamplerConfig& config,
                        uint64_t counter) {
  if (vocab_size <= 0) return 0;
  if (!(config.temperature > 0.0f)) return ArgmaxFinite(logits, vocab_size);

  // Max of the finite logits; no finite logit means the all -inf case.
  double max_logit = -INFINITY;
  int64_t num_finite = 0;
  for (int64_t i = 0; i < vocab_size; ++i) {
    if (std::isfinite(logits[i])) {
      max_logit = std::max(max_logit, double(logits[i]));
      ++num_finite;
    }
  }
  if (num_finite == 0) return 0;

  thread_local Scratch scratch;
  std::vector<double>& prob = scratch.prob;
  prob.resize(static_cast<size_t>(vocab_size));
  const double temperature = config.temperature;
  double z = 0.0;
  for (int64_t i = 0; i < vocab_size; ++i) {
    const float v = logits[i];
    prob[i] = std::isfinite(v) ? std::exp((double(v) - max_logit) / temperature) : 0.0;
    z += prob[i];
  }
  for (int64_t i = 0; i < vocab_size; ++i) prob[i] /= z;  // z >= 1: the max contributes 1

  const double u = SamplerUniform(config.seed, counter);
  const bool use_top_k = config.top_k > 0 && config.top_k < vocab_size;
  const bool use_top_p = config.top_p < 1.0f;  // false for NaN

  if (!use_top_k && !use_top_p) {
    double total = 0.0;
    for (int64_t i = 0; i < vocab_size; ++i) total += prob[i];
    const double target = u * total;
    double cum = 0.0;
    int32_t last_positive = 0;
    for (int64_t i = 0; i < vocab_size; ++i) {
      if (prob[i] <= 0.0) continue;
      cum += prob[i];
      last_positive = static_cast<int32_t>(i);
      if (target < cum) return last_positive;
    }
    return last_positive;  // only when rounding put target at the very top
  }

  // Candidates: the finite-logit ids. Non-finite ids have probability 0 and sort last, so
  // leaving them out changes neither the kept mass nor the draw.
  std::vector<int32_t>& order = scratch.order;
  order.clear();
  for (int64_t i = 0; i < vocab_size; ++i) {
    if (std::isfinite(logits[i])) order.push_back(static_cast<int32_t>(i));
  }
  const auto more_likely = [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const auto first = order.begin();
  const int64_t n = static_cast<int64_t>(order.size());
  const int64_t k = use_top_k ? std::min<int64_t>(config.top_k, n) : n;
  if (k < n) std::nth_element(first, first + k, order.end(), more_likely);  // top-k set: [0, k)

  int64_t kept = k;
  if (use_top_p) {
    double mass = 0.0;
    for (int64_t j = 0; j < k; ++j) mass += prob[order[j]];
    const double threshold = double(config.top_p) * mass;
    // Sort the top-k set lazily in growing blocks: the nucleus is usually a few tokens.
    double cum = 0.0;
    bool reached = false;
    for (int64_t lo = 0, hi = std::min<int64_t>(k, 64); lo < k && !reached;
         lo = hi, hi = std::min<int64_t>(k, 2 * hi)) {
      if (hi < k) std::nth_element(first + lo, first + hi, first + k, more_likely);
      std::sort(first + lo, first + hi, more_likely);
      for (int64_t j = lo; j < hi; ++j) {
        cum += prob[order[j]];
        if (cum >= threshold) {
          kept = j + 1;
          reached = true;
          break;
        }
      }
    }
  }

  std::sort(first, first + kept);  // CDF in ascending id order
  double total = 0.0;
  for (int64_t j = 0; j < kept; ++j) total += prob[order[j]];
  const double target = u * total;
  double cum = 0.0;
  int32_t last_positive = order[0];
  for (int64_t j = 0; j < kept; ++j) {
    const double p = prob[order[j]];
    if (p <= 0.0) continue;
    cum += p;
    last_positive = order[j];
    if (target < cum) return last_positive;
  }
  return last_positive;
}

}  // namespace kls::kernels

// Tests for the sampling reference: the counter-based uniform, greedy, temperature, top-k,
// top-p, non-finite logits, and statistical agreement with softmax(logits / T). All seeds are
// fixed, so the statistical bounds are deterministic (they cannot flake) while still failing
// for a wrong distribution.
#include "kernels/sampling/sampling_ref.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <set>
#include <vector>

namespace kls::kernels {
namespace {

// softmax(logits / T) in fp64 over the finite logits (the others get 0).
std::vector<double> Softmax(const std::vector<float>& logits, double temperature) {
  double max_logit = -INFINITY;
  for (float x : logits) {
    if (std::isfinite(x)) max_logit = std::max(max_logit, double(x));
  }
  std::vector<double> p(logits.size(), 0.0);
  double z = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isfinite(logits[i])) p[i] = std::exp((double(logits[i]) - max_logit) / temperature);
    z += p[i];
  }
  for (double& x : p) x /= z;
  return p;
}

// Keeps only `kept` and renormalizes.
std::vector<double> Restrict(std::vector<double> p, const std::set<int32_t>& kept) {
  double total = 0.0;
  for (size_t i = 0; i < p.size(); ++i) {
    if (kept.count(static_cast<int32_t>(i)) == 0) p[i] = 0.0;
    total += p[i];
  }
  for (double& x : p) x /= total;
  return p;
}

std::vector<int64_t> Histogram(const std::vector<float>& logits, const SamplerConfig& config,
                               int64_t draws) {
  std::vector<int64_t> counts(logits.size(), 0);
  for (int64_t c = 0; c < draws; ++c) {
    const int32_t token =
        SampleReference(logits.data(), static_cast<int64_t>(logits.size()), config, c);
    EXPECT_GE(token, 0);
    EXPECT_LT(token, static_cast<int32_t>(logits.size()));
    if (token >= 0 && token < static_cast<int32_t>(logits.size())) ++counts[token];
  }
  return counts;
}

// Per bin: |observed - N p| <= 5 sigma + 1 (binomial sigma), and a token of probability 0
// never appears. Overall: Pearson chi-square below the 1e-9 upper quantile (Wilson-Hilferty,
// z = 6) for the bins with p > 0.
::testing::AssertionResult MatchesDistribution(const std::vector<int64_t>& counts,
                                               const std::vector<double>& p) {
  int64_t n = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  double chi2 = 0.0;
  int bins = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    const double expected = n * p[i];
    if (p[i] == 0.0) {
      if (counts[i] != 0) {
        return ::testing::AssertionFailure()
               << "token " << i << " has probability 0 but was drawn " << counts[i] << " times";
      }
      continue;
    }
    const double sigma = std::sqrt(n * p[i] * (1.0 - p[i]));
    if (std::fabs(counts[i] - expected) > 5.0 * sigma + 1.0) {
      return ::testing::AssertionFailure()
             << "token " << i << ": observed " << counts[i] << ", expected " << expected
             << " (sigma " << sigma << ")";
    }
    chi2 += (counts[i] - expected) * (counts[i] - expected) / expected;
    ++bins;
  }
  const double df = std::max(bins - 1, 1);
  const double a = 2.0 / (9.0 * df);
  const double critical = df * std::pow(1.0 - a + 6.0 * std::sqrt(a), 3.0);
  if (chi2 > critical) {
    return ::testing::AssertionFailure()
           << "chi-square " << chi2 << " over " << df << " dof exceeds " << critical;
  }
  return ::testing::AssertionSuccess();
}

int32_t Greedy(const std::vector<float>& logits) {
  return SampleReference(logits.data(), static_cast<int64_t>(logits.size()), SamplerConfig{}, 0);
}

// ---------------------------------------------------------------------------------------------
// SamplerUniform

TEST(SamplerUniformTest, PinnedValuesOfTheSplitmixStream) {
  // Computed independently (Python, 64-bit wrap-around) from the formula in README.md; a CUDA
  // sampler must produce the same numbers.
  EXPECT_EQ(SamplerUniform(0, 0), 0.6524484863740322);
  EXPECT_EQ(SamplerUniform(0, 1), 0.7012121095215252);
  EXPECT_EQ(SamplerUniform(12345, 0), 0.01582909387275222);
  EXPECT_EQ(SamplerUniform(12345, 999), 0.08677657307815112);
  EXPECT_EQ(SamplerUniform(UINT64_MAX, UINT64_MAX), 0.2668471864940366);
}

TEST(SamplerUniformTest, PureInUnitIntervalAndWellSpread) {
  constexpr int kDraws = 20000;
  std::set<double> distinct;
  double sum = 0.0;
  for (uint64_t seed : {uint64_t{0}, uint64_t{1}, uint64_t{0xDEADBEEF}}) {
    for (uint64_t c = 0; c < kDraws; ++c) {
      const double u = SamplerUniform(seed, c);
      ASSERT_GE(u, 0.0);
      ASSERT_LT(u, 1.0);
      ASSERT_EQ(u, SamplerUniform(seed, c));
      distinct.insert(u);
      sum += u;
    }
  }
  EXPECT_EQ(distinct.size(), 3u * kDraws);  // no repeats across counters or seeds
  // Mean of 60000 uniforms: sigma = 0.2887 / sqrt(60000) = 0.0012.
  EXPECT_NEAR(sum / (3 * kDraws), 0.5, 5 * 0.0012);
}

// ---------------------------------------------------------------------------------------------
// Greedy

TEST(SampleReferenceTest, GreedyIsArgmaxWithLowestIdOnTies) {
  EXPECT_EQ(Greedy({0.5f, 3.0f, -1.0f, 3.0f, 2.9f}), 1);
  EXPECT_EQ(Greedy({7.0f}), 0);
  EXPECT_EQ(Greedy({-5.0f, -5.0f, -5.0f}), 0);
  EXPECT_EQ(Greedy({-3.0f, -2.0f, -1.0f}), 2);
  // Temperature 0 ignores top_k, top_p, seed and counter.
  const std::vector<float> logits = {0.1f, 0.2f, 4.0f, 0.3f};
  const SamplerConfig config{0.0f, 0.01f, 1, 99};
  for (uint64_t c = 0; c < 10; ++c) EXPECT_EQ(SampleReference(logits.data(), 4, config, c), 2);
}

TEST(SampleReferenceTest, GreedyLargeVocabulary) {
  std::vector<float> logits(163840);
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal;
  for (float& x : logits) x = normal(rng);
  logits[100000] = 50.0f;
  logits[150000] = 50.0f;
  EXPECT_EQ(Greedy(logits), 100000);
}

TEST(SampleReferenceTest, NonFiniteLogitsAreMinusInfinity) {
  const std::vector<float> logits = {NAN, INFINITY, 1.0f, -INFINITY, 2.0f, NAN};
  EXPECT_EQ(Greedy(logits), 4);
  // Sampling only ever draws ids 2 and 4, with softmax over the finite logits.
  const SamplerConfig config{1.0f, 1.0f, 0, 5};
  const std::vector<int64_t> counts = Histogram(logits, config, 20000);
  EXPECT_TRUE(MatchesDistribution(counts, Softmax(logits, 1.0)));
  EXPECT_EQ(counts[2] + counts[4], 20000);
  // Also through the truncating path.
  const SamplerConfig truncated{1.0f, 0.9f, 3, 5};
  const std::vector<int64_t> counts2 = Histogram(logits, truncated, 2000);
  EXPECT_EQ(counts2[2] + counts2[4], 2000);
}

TEST(SampleReferenceTest, AllNonFiniteReturnsLowestId) {
  const std::vector<float> logits = {-INFINITY, NAN, INFINITY, -INFINITY};
  EXPECT_EQ(Greedy(logits), 0);
  for (const SamplerConfig& config :
       {SamplerConfig{1.0f, 1.0f, 0, 1}, SamplerConfig{0.7f, 0.5f, 2, 1}}) {
    for (uint64_t c = 0; c < 20; ++c) EXPECT_EQ(SampleReference(logits.data(), 4, config, c), 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Determinism and counters

TEST(SampleReferenceTest, SameSeedAndCounterGiveTheSameToken) {
  std::vector<float> logits(1000);
  std::mt19937_64 rng(8);
  std::normal_distribution<float> normal;
  for (float& x : logits) x = normal(rng);
  for (const SamplerConfig& config :
       {SamplerConfig{1.0f, 1.0f, 0, 17}, SamplerConfig{0.8f, 0.95f, 0, 17},
        SamplerConfig{1.2f, 1.0f, 40, 17}}) {
    for (uint64_t c = 0; c < 50; ++c) {
      const int32_t first = SampleReference(logits.data(), 1000, config, c);
      EXPECT_EQ(SampleReference(logits.data(), 1000, config, c), first);
      EXPECT_EQ(SampleReference(logits.data(), 1000, config, c), first);
    }
  }
}

TEST(SampleReferenceTest, DifferentCountersAndSeedsGiveDifferentDraws) {
  const std::vector<float> logits(64, 0.0f);  // uniform over 64 tokens
  const SamplerConfig config{1.0f, 1.0f, 0, 1234};
  const std::vector<int64_t> counts = Histogram(logits, config, 4000);
  // 4000 draws over 64 equally likely tokens: every token is hit (P(miss) ~ 64 e^-62.5).
  for (int64_t c : counts) EXPECT_GT(c, 0);
  EXPECT_TRUE(MatchesDistribution(counts, std::vector<double>(64, 1.0 / 64)));
  // Two seeds disagree on most counters (they would agree on ~1/64 by chance).
  SamplerConfig other = config;
  other.seed = 1235;
  int same = 0;
  for (uint64_t c = 0; c < 1000; ++c) {
    same += SampleReference(logits.data(), 64, config, c) ==
            SampleReference(logits.data(), 64, other, c);
  }
  EXPECT_LT(same, 50);
}

// ---------------------------------------------------------------------------------------------
// Truncation equal to greedy

std::vector<float> LogitsWithTiedMax() {
  std::vector<float> logits(500);
  std::mt19937_64 rng(21);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (float& x : logits) x = normal(rng);
  const float max_value = *std::max_element(logits.begin(), logits.end());
  // The max now occurs at least three times: at its original id, at 37 and at 420.
  logits[37] = max_value;
  logits[420] = max_value;
  return logits;
}

TEST(SampleReferenceTest, TopKOneEqualsGreedyAtAnyTemperature) {
  const std::vector<float> logits = LogitsWithTiedMax();
  const int32_t greedy = Greedy(logits);
  EXPECT_LE(greedy, 37);
  for (float temperature : {1e-3f, 0.3f, 1.0f, 7.0f, 1e4f, 1e30f}) {
    const SamplerConfig config{temperature, 1.0f, 1, 77};
    for (uint64_t c = 0; c < 50; ++c) {
      EXPECT_EQ(SampleReference(logits.data(), 500, config, c), greedy) << "T " << temperature;
    }
  }
}

TEST(SampleReferenceTest, TinyTopPEqualsGreedy) {
  const std::vector<float> logits = LogitsWithTiedMax();
  const int32_t greedy = Greedy(logits);
  for (float temperature : {1e-3f, 0.5f, 1.0f, 3.0f, 1e4f}) {
    for (int top_k : {0, 3, 499}) {
      const SamplerConfig config{temperature, 1e-7f, top_k, 5};
      for (uint64_t c = 0; c < 50; ++c) {
        EXPECT_EQ(SampleReference(logits.data(), 500, config, c), greedy) << "T " << temperature;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Statistical agreement with softmax(logits / T), with and without truncation

const std::vector<float> kLogits = {1.0f, -0.5f, 2.0f, 0.0f, 1.5f, -2.0f, 0.5f, 1.9f, -1.0f, 0.2f};

TEST(SampleReferenceTest, FrequenciesMatchTemperatureSoftmax) {
  for (float temperature : {0.7f, 1.0f, 2.5f}) {
    const SamplerConfig config{temperature, 1.0f, 0, 2024};
    const std::vector<int64_t> counts = Histogram(kLogits, config, 20000);
    EXPECT_TRUE(MatchesDistribution(counts, Softmax(kLogits, temperature))) << "T " << temperature;
  }
}

TEST(SampleReferenceTest, StatisticalBoundRejectsTheWrongTemperature) {
  // The bound is tight enough to notice T = 1.0 sampled as if T = 1.15.
  const SamplerConfig config{1.0f, 1.0f, 0, 2024};
  const std::vector<int64_t> counts = Histogram(kLogits, config, 20000);
  EXPECT_FALSE(MatchesDistribution(counts, Softmax(kLogits, 1.15)));
}

TEST(SampleReferenceTest, TopKKeepsTheKMostLikely) {
  // Top 4 of kLogits: ids 2 (2.0), 7 (1.9), 4 (1.5), 0 (1.0).
  const SamplerConfig config{1.3f, 1.0f, 4, 99};
  const std::vector<int64_t> counts = Histogram(kLogits, config, 20000);
  EXPECT_TRUE(MatchesDistribution(counts, Restrict(Softmax(kLogits, 1.3), {2, 7, 4, 0})));
}

TEST(SampleReferenceTest, TopKTiesGoToTheLowerId) {
  const std::vector<float> logits = {0.0f, 1.0f, 3.0f, 1.0f, 1.0f, 3.0f, 1.0f};
  // Top 4: 2, 5 (3.0), then the two lowest ids among the 1.0s: 1 and 3.
  const SamplerConfig config{1.0f, 1.0f, 4, 4};
  const std::vector<int64_t> counts = Histogram(logits, config, 20000);
  EXPECT_TRUE(MatchesDistribution(counts, Restrict(Softmax(logits, 1.0), {1, 2, 3, 5})));
}

TEST(SampleReferenceTest, TopPKeepsTheSmallestPrefixReachingTheMass) {
  const std::vector<double> p = Softmax(kLogits, 1.0);
  // Descending: 2, 7, 4, 0, ... Mass of {2, 7} is below 0.6; {2, 7, 4} reaches it.
  ASSERT_LT(p[2] + p[7], 0.6);
  ASSERT_GE(p[2] + p[7] + p[4], 0.6);
  const SamplerConfig config{1.0f, 0.6f, 0, 31};
  const std::vector<int64_t> counts = Histogram(kLogits, config, 20000);
  EXPECT_TRUE(MatchesDistribution(counts, Restrict(p, {2, 7, 4})));
}

TEST(SampleReferenceTest, TopPIsMeasuredOnTheRenormalizedTopKSet) {
  // p = [0.4, 0.3, 0.2, 0.1]. top_k = 2 leaves {0, 1} with relative mass 4/7 and 3/7; top_p = 0.5
  // then keeps only {0} (4/7 >= 0.5), whereas absolute mass (0.4 < 0.5) would keep {0, 1}.
  const std::vector<float> logits = {std::log(0.4f), std::log(0.3f), std::log(0.2f),
                                     std::log(0.1f)};
  const SamplerConfig config{1.0f, 0.5f, 2, 8};
  for (uint64_t c = 0; c < 500; ++c) EXPECT_EQ(SampleReference(logits.data(), 4, config, c), 0);
  // top_p = 0.6 > 4/7 keeps both, in the ratio 4 : 3.
  const SamplerConfig both{1.0f, 0.6f, 2, 8};
  const std::vector<int64_t> counts = Histogram(logits, both, 20000);
  EXPECT_TRUE(MatchesDistribution(counts, Restrict(Softmax(logits, 1.0), {0, 1})));
}

// ---------------------------------------------------------------------------------------------
// Large vocabulary against a full-sort oracle of the documented procedure

// The procedure of sampling_ref.h / README.md with a full stable sort: order by logit
// descending (ties to the lower id), top_k, top_p on the renormalized top-k set, CDF over the
// kept ids in ascending order.
int32_t OracleSample(const std::vector<float>& logits, const SamplerConfig& config,
                     uint64_t counter) {
  const int64_t n = static_cast<int64_t>(logits.size());
  const std::vector<double> p = Softmax(logits, config.temperature);
  std::vector<int32_t> order;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isfinite(logits[i])) order.push_back(static_cast<int32_t>(i));
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t kept = static_cast<int64_t>(order.size());
  if (config.top_k > 0) kept = std::min<int64_t>(kept, config.top_k);
  if (config.top_p < 1.0f) {
    double mass = 0.0;
    for (int64_t j = 0; j < kept; ++j) mass += p[order[j]];
    double cum = 0.0;
    for (int64_t j = 0; j < kept; ++j) {
      cum += p[order[j]];
      if (cum >= double(config.top_p) * mass) {
        kept = j + 1;
        break;
      }
    }
  }
  std::vector<int32_t> ids(order.begin(), order.begin() + kept);
  std::sort(ids.begin(), ids.end());
  double total = 0.0;
  for (int32_t id : ids) total += p[id];
  const double target = SamplerUniform(config.seed, counter) * total;
  double cum = 0.0;
  for (int32_t id : ids) {
    cum += p[id];
    if (p[id] > 0.0 && target < cum) return id;
  }
  return ids.back();
}

TEST(SampleReferenceTest, MatchesFullSortOracleOnKimiVocabulary) {
  constexpr int64_t kVocab = 163840;
  std::mt19937_64 rng(163840);
  std::normal_distribution<float> normal;
  // Quantized logits: many ties, including across the top-k and top-p boundaries.
  std::vector<float> logits(kVocab);
  for (float& x : logits) x = std::round(4.0f * normal(rng)) / 4.0f;
  logits[5] = NAN;
  logits[6] = INFINITY;
  const SamplerConfig configs[] = {
      {1.0f, 1.0f, 0, 1},     // no truncation
      {0.6f, 1.0f, 50, 2},    // top-k only
      {1.0f, 0.9f, 0, 3},     // wide nucleus: the lazy sort runs to tens of thousands of ids
      {0.3f, 0.95f, 0, 4},    // peaked: small nucleus
      {1.0f, 0.8f, 1000, 5},  // top-k then top-p
      {2.0f, 0.5f, 20000, 6},
  };
  for (const SamplerConfig& config : configs) {
    for (uint64_t c : {uint64_t{0}, uint64_t{1}, uint64_t{977}}) {
      EXPECT_EQ(SampleReference(logits.data(), kVocab, config, c), OracleSample(logits, config, c))
          << "T " << config.temperature << " top_p " << config.top_p << " top_k " << config.top_k
          << " counter " << c;
    }
  }
}

}  // namespace
}  // namespace kls::kernels

// Tests for the MoE router reference (KIMI_LINEAR.md §6.2): selection by sigmoid score + bias,
// weights from unbiased (vLLM) or biased (HF) scores, tie order, renormalization, scaling.
#include "kernels/moe/moe_ref.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "tests/test_util.h"

namespace kls::kernels {
namespace {

using ::kls::testing::AllClose;
using ::kls::testing::kFp32Tolerance;

double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

struct Routed {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routed Route(const std::vector<float>& logits, const std::vector<float>* bias, int num_experts,
             int top_k, bool renormalize, double scaling, RouterWeighting weighting) {
  const int64_t tokens = static_cast<int64_t>(logits.size()) / num_experts;
  Routed r{std::vector<int32_t>(tokens * top_k, -7), std::vector<float>(tokens * top_k, -7.0f)};
  MoeRouteReference(logits.data(), bias != nullptr ? bias->data() : nullptr, tokens, num_experts,
                    top_k, renormalize, scaling, weighting, r.ids.data(), r.weights.data());
  return r;
}

// Unbiased top-2 is {0, 1}; the bias lifts experts 5 and 6 above them, with 6 first.
const std::vector<float> kLogits = {2.0f, 1.5f, -1.0f, 0.0f, -2.0f, -0.5f, -1.5f, 0.5f};
const std::vector<float> kBias = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.9f, 1.0f, 0.0f};

TEST(MoeRouteReferenceTest, SelectsByScorePlusBiasInDescendingOrder) {
  const Routed r = Route(kLogits, &kBias, 8, 2, true, 1.0, RouterWeighting::kUnbiased);
  // keys: s5 + 0.9 = 0.3775 + 0.9 = 1.2775, s6 + 1.0 = 0.1824 + 1.0 = 1.1824, s0 = 0.8808.
  EXPECT_EQ(r.ids, (std::vector<int32_t>{5, 6}));
  const Routed unbiased = Route(kLogits, nullptr, 8, 2, true, 1.0, RouterWeighting::kUnbiased);
  EXPECT_EQ(unbiased.ids, (std::vector<int32_t>{0, 1}));
}

TEST(MoeRouteReferenceTest, UnbiasedWeightsAreRenormalizedSigmoidScoresTimesScaling) {
  constexpr double kScaling = 2.446;
  const Routed r = Route(kLogits, &kBias, 8, 3, true, kScaling, RouterWeighting::kUnbiased);
  ASSERT_EQ(r.ids, (std::vector<int32_t>{5, 6, 0}));
  const double s5 = Sigmoid(-0.5), s6 = Sigmoid(-1.5), s0 = Sigmoid(2.0);
  const double sum = s5 + s6 + s0;
  const std::vector<float> expected = {float(kScaling * s5 / sum), float(kScaling * s6 / sum),
                                       float(kScaling * s0 / sum)};
  EXPECT_TRUE(AllClose(r.weights, expected, kFp32Tolerance.atol, kFp32Tolerance.rtol));
  // Renormalized weights sum to the scaling factor.
  EXPECT_NEAR(std::accumulate(r.weights.begin(), r.weights.end(), 0.0), kScaling, 1e-5);
}

TEST(MoeRouteReferenceTest, BiasedSwitchGivesScorePlusBiasWeights) {
  constexpr double kScaling = 2.446;
  const Routed r = Route(kLogits, &kBias, 8, 3, true, kScaling, RouterWeighting::kBiased);
  ASSERT_EQ(r.ids, (std::vector<int32_t>{5, 6, 0}));
  const double w5 = Sigmoid(-0.5) + 0.9f, w6 = Sigmoid(-1.5) + 1.0f, w0 = Sigmoid(2.0);
  const double sum = w5 + w6 + w0;
  const std::vector<float> expected = {float(kScaling * w5 / sum), float(kScaling * w6 / sum),
                                       float(kScaling * w0 / sum)};
  EXPECT_TRUE(AllClose(r.weights, expected, kFp32Tolerance.atol, kFp32Tolerance.rtol));
  // The biased and unbiased weights differ materially (the HF/vLLM discrepancy is real).
  const Routed u = Route(kLogits, &kBias, 8, 3, true, kScaling, RouterWeighting::kUnbiased);
  EXPECT_GT(std::fabs(u.weights[0] - r.weights[0]), 0.1);
}

TEST(MoeRouteReferenceTest, WithoutBiasBothWeightingsAgree) {
  const Routed u = Route(kLogits, nullptr, 8, 4, true, 1.5, RouterWeighting::kUnbiased);
  const Routed b = Route(kLogits, nullptr, 8, 4, true, 1.5, RouterWeighting::kBiased);
  EXPECT_EQ(u.ids, (std::vector<int32_t>{0, 1, 7, 3}));
  EXPECT_EQ(u.ids, b.ids);
  EXPECT_EQ(u.weights, b.weights);
}

TEST(MoeRouteReferenceTest, NoRenormalizeKeepsScaledScores) {
  constexpr double kScaling = 2.446;
  const Routed r = Route(kLogits, &kBias, 8, 2, false, kScaling, RouterWeighting::kUnbiased);
  ASSERT_EQ(r.ids, (std::vector<int32_t>{5, 6}));
  const std::vector<float> expected = {float(kScaling * Sigmoid(-0.5)),
                                       float(kScaling * Sigmoid(-1.5))};
  EXPECT_TRUE(AllClose(r.weights, expected, kFp32Tolerance.atol, kFp32Tolerance.rtol));
  const Routed b = Route(kLogits, &kBias, 8, 2, false, kScaling, RouterWeighting::kBiased);
  const std::vector<float> expected_biased = {float(kScaling * (Sigmoid(-0.5) + 0.9f)),
                                              float(kScaling * (Sigmoid(-1.5) + 1.0f))};
  EXPECT_TRUE(AllClose(b.weights, expected_biased, kFp32Tolerance.atol, kFp32Tolerance.rtol));
}

TEST(MoeRouteReferenceTest, TiesGoToTheLowerExpertId) {
  // Experts 1, 3, 4, 6 share the best key; 0 and 2 share the next one.
  const std::vector<float> logits = {0.0f, 1.0f, 0.0f, 1.0f, 1.0f, -3.0f, 1.0f, -3.0f};
  const Routed r = Route(logits, nullptr, 8, 6, true, 1.0, RouterWeighting::kUnbiased);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 3, 4, 6, 0, 2}));
  // Every key equal (logit 0.25 and bias 0.25 everywhere): ids in ascending order.
  const std::vector<float> flat(8, 0.25f);
  const Routed f = Route(flat, &flat, 8, 8, false, 1.0, RouterWeighting::kUnbiased);
  EXPECT_EQ(f.ids, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
}

TEST(MoeRouteReferenceTest, TopKEqualsNumExpertsReturnsAllInOrder) {
  const Routed r = Route(kLogits, &kBias, 8, 8, true, 1.0, RouterWeighting::kUnbiased);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{5, 6, 0, 1, 7, 3, 2, 4}));
  EXPECT_NEAR(std::accumulate(r.weights.begin(), r.weights.end(), 0.0), 1.0, 1e-6);
}

TEST(MoeRouteReferenceTest, NanLogitIsNeverPreferred) {
  std::vector<float> logits = kLogits;
  logits[0] = NAN;
  const Routed r = Route(logits, nullptr, 8, 2, true, 1.0, RouterWeighting::kUnbiased);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 7}));
}

// Kimi Linear's router shape, many tokens, against a straightforward full-sort oracle.
TEST(MoeRouteReferenceTest, MatchesFullSortOracleAtModelShape) {
  constexpr int kExperts = 256, kTopK = 8;
  constexpr int64_t kTokens = 37;
  constexpr double kScaling = 2.446;
  std::mt19937_64 rng(42);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_real_distribution<float> bias_dist(-0.3f, 0.3f);
  std::vector<float> logits(kTokens * kExperts), bias(kExperts);
  for (float& x : logits) x = normal(rng);
  for (float& x : bias) x = bias_dist(rng);
  for (RouterWeighting weighting : {RouterWeighting::kUnbiased, RouterWeighting::kBiased}) {
    const Routed r = Route(logits, &bias, kExperts, kTopK, true, kScaling, weighting);
    for (int64_t t = 0; t < kTokens; ++t) {
      std::vector<double> key(kExperts), s(kExperts);
      for (int e = 0; e < kExperts; ++e) {
        s[e] = Sigmoid(logits[t * kExperts + e]);
        key[e] = s[e] + bias[e];
      }
      std::vector<int32_t> order(kExperts);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return key[a] > key[b]; });
      std::vector<float> expected(kTopK);
      double sum = 0.0;
      for (int i = 0; i < kTopK; ++i) {
        const int32_t e = order[i];
        EXPECT_EQ(r.ids[t * kTopK + i], e) << "token " << t << " slot " << i;
        sum += weighting == RouterWeighting::kBiased ? key[e] : s[e];
      }
      for (int i = 0; i < kTopK; ++i) {
        const double w = weighting == RouterWeighting::kBiased ? key[order[i]] : s[order[i]];
        expected[i] = static_cast<float>(kScaling * w / sum);
      }
      const std::vector<float> actual(r.weights.begin() + t * kTopK,
                                      r.weights.begin() + (t + 1) * kTopK);
      EXPECT_TRUE(AllClose(actual, expected, kFp32Tolerance.atol, kFp32Tolerance.rtol))
          << "token " << t;
    }
  }
}

}  // namespace
}  // namespace kls::kernels

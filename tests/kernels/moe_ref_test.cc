// Tests for the MoE references (KIMI_LINEAR.md §6.2). Router: selection by sigmoid score + bias,
// weights from unbiased (vLLM) or biased (HF) scores, tie order, renormalization, scaling.
// Experts: a hand-computed mixture without rounding, and the bf16 storage roundings of
// MoeReferenceRounding::kBf16Storage (SwiGLU output and per-pair expert output, ties to even,
// fp64 combine) by hand and against an independent oracle.
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
double Silu(double x) { return x / (1.0 + std::exp(-x)); }

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

// ---------------------------------------------------------------------------------------------
// MoeExpertsReference
// ---------------------------------------------------------------------------------------------

// D = 2, I = 1, two experts, by hand: E_e(x) = silu(x·g_e)·(x·u_e)·down_e.
TEST(MoeExpertsReferenceTest, HandComputed) {
  const std::vector<double> hidden = {1.0, 2.0};
  const std::vector<double> g0 = {0.5, 0.0}, u0 = {1.0, 1.0}, d0 = {1.0, -1.0};
  const std::vector<double> g1 = {0.0, -1.0}, u1 = {2.0, 0.0}, d1 = {0.5, 2.0};
  const double* gate[2] = {g0.data(), g1.data()};
  const double* up[2] = {u0.data(), u1.data()};
  const double* down[2] = {d0.data(), d1.data()};
  const std::vector<int32_t> ids = {1, 0, 5};  // the third slot is out of range: skipped
  const std::vector<float> weights = {0.25f, 2.0f, 100.0f};
  const std::vector<double> shared = {10.0, 20.0};
  std::vector<double> out(2);
  MoeExpertsReference<double>(hidden.data(), 1, 2, 1, 2, 3, ids.data(), weights.data(), gate, up,
                              down, shared.data(), out.data());
  const double a0 = Silu(0.5) * 3.0;   // expert 0: gate 0.5, up 3
  const double a1 = Silu(-2.0) * 2.0;  // expert 1: gate −2, up 2
  const std::vector<double> want = {10.0 + 0.25 * a1 * 0.5 + 2.0 * a0 * 1.0,
                                    20.0 + 0.25 * a1 * 2.0 + 2.0 * a0 * -1.0};
  EXPECT_TRUE(AllClose(out, want, 1e-12, 1e-12));
}

// One expert, D = 2, I = 2, hidden (1, 0). Gates of 64 make silu exact in fp64 (1 + e^−64 == 1),
// so the SwiGLU outputs are 64·up exactly: 64.25 and 64.75, both bf16 ties (spacing 0.5 at
// 64), which round to even: 64 and 65. With down rows (1, −1) and (1, 2^−9):
//                      y0                 y1
//   no rounding        −0.5               64.25 + 64.75/512 = 64.37646484375
//   act only           64 − 65 = −1       64 + 65/512      = 64.126953125
//   act and pair_out   −1                 64 (64.127 is below the tie 64.25)
//   pair_out only      −0.5               64.5
// Every column tells the variants apart, and the combine must not round: shared + 0.3f·y is not
// a bf16 value. All the expected values are exact in fp64.
TEST(MoeExpertsReferenceTest, Bf16StorageRoundsSwiGluOutputAndPairOutput) {
  const std::vector<double> hidden = {1.0, 0.0};
  const std::vector<double> gate = {64.0, 0.0, 64.0, 0.0};                // [I, D]
  const std::vector<double> up = {1.0 + 0x1p-8, 0.0, 1.0 + 0x3p-8, 0.0};  // [I, D]
  const std::vector<double> down = {1.0, -1.0, 1.0, 0x1p-9};              // [D, I]
  const double* g[1] = {gate.data()};
  const double* u[1] = {up.data()};
  const double* d[1] = {down.data()};
  const std::vector<int32_t> ids = {0};
  const std::vector<float> weights = {0.3f};
  const double w = 0.3f;
  const std::vector<double> shared = {10.0, 20.0};
  auto run = [&](MoeReferenceRounding rounding) {
    std::vector<double> out(2);
    MoeExpertsReference<double>(hidden.data(), 1, 2, 2, 1, 1, ids.data(), weights.data(), g, u, d,
                                shared.data(), out.data(), rounding);
    return out;
  };
  EXPECT_EQ(run(MoeReferenceRounding::kBf16Storage),
            (std::vector<double>{10.0 + w * -1.0, 20.0 + w * 64.0}));
  EXPECT_EQ(run(MoeReferenceRounding::kNone),
            (std::vector<double>{10.0 + w * -0.5, 20.0 + w * 64.37646484375}));

  // The same with T = float: the roundings do not depend on T.
  const std::vector<float> hidden_f(hidden.begin(), hidden.end()), gate_f(gate.begin(), gate.end()),
      up_f(up.begin(), up.end()), down_f(down.begin(), down.end());
  const float* gf[1] = {gate_f.data()};
  const float* uf[1] = {up_f.data()};
  const float* df[1] = {down_f.data()};
  std::vector<float> out_f(2);
  MoeExpertsReference<float>(hidden_f.data(), 1, 2, 2, 1, 1, ids.data(), weights.data(), gf, uf, df,
                             nullptr, out_f.data(), MoeReferenceRounding::kBf16Storage);
  EXPECT_EQ(out_f,
            (std::vector<float>{static_cast<float>(w * -1.0), static_cast<float>(w * 64.0)}));
}

// Round to 8 significant bits, ties to even, by frexp/ldexp (independent of the bit trick in
// moe_ref.cc); finite normal values only.
double Bf16Oracle(double x) {
  int exponent = 0;
  const double mantissa = std::frexp(static_cast<double>(static_cast<float>(x)), &exponent);
  return std::ldexp(std::nearbyint(std::ldexp(mantissa, 8)), exponent - 8);
}

// Random small shape, repeated and invalid ids, shared output: kBf16Storage equals a direct
// loop that rounds the SwiGLU output and each pair's output, and differs from kNone.
TEST(MoeExpertsReferenceTest, Bf16StorageMatchesIndependentOracle) {
  constexpr int kD = 24, kI = 16, kE = 3, kK = 2;
  constexpr int64_t kT = 5;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal(0.0, 1.0);
  auto random = [&](size_t n, double scale) {
    std::vector<double> v(n);
    for (double& x : v) x = Bf16Oracle(scale * normal(rng));
    return v;
  };
  const std::vector<double> hidden = random(kT * kD, 1.0), shared = random(kT * kD, 0.5);
  std::vector<std::vector<double>> gate, up, down;
  std::vector<const double*> g, u, d;
  for (int e = 0; e < kE; ++e) {
    gate.push_back(random(kI * kD, 0.3));
    up.push_back(random(kI * kD, 0.3));
    down.push_back(random(kD * kI, 0.3));
  }
  for (int e = 0; e < kE; ++e) {
    g.push_back(gate[e].data());
    u.push_back(up[e].data());
    d.push_back(down[e].data());
  }
  const std::vector<int32_t> ids = {0, 2, 1, 1, 2, -1, kE, 0, 2, 0};
  const std::vector<float> weights = {0.7f, 1.3f, 0.4f, 0.9f, 2.1f, 5.0f, 5.0f, 1.1f, 0.6f, 0.2f};

  std::vector<double> want = shared;
  for (int64_t t = 0; t < kT; ++t) {
    for (int s = 0; s < kK; ++s) {
      const int32_t e = ids[t * kK + s];
      if (e < 0 || e >= kE) continue;
      std::vector<double> act(kI);
      for (int j = 0; j < kI; ++j) {
        double a = 0.0, b = 0.0;
        for (int k = 0; k < kD; ++k) {
          a += hidden[t * kD + k] * gate[e][j * kD + k];
          b += hidden[t * kD + k] * up[e][j * kD + k];
        }
        act[j] = Bf16Oracle(Silu(a) * b);
      }
      for (int k = 0; k < kD; ++k) {
        double y = 0.0;
        for (int j = 0; j < kI; ++j) y += act[j] * down[e][k * kI + j];
        want[t * kD + k] += double{weights[t * kK + s]} * Bf16Oracle(y);
      }
    }
  }
  std::vector<double> rounded(kT * kD), exact(kT * kD);
  MoeExpertsReference<double>(hidden.data(), kT, kD, kI, kE, kK, ids.data(), weights.data(),
                              g.data(), u.data(), d.data(), shared.data(), rounded.data(),
                              MoeReferenceRounding::kBf16Storage);
  MoeExpertsReference<double>(hidden.data(), kT, kD, kI, kE, kK, ids.data(), weights.data(),
                              g.data(), u.data(), d.data(), shared.data(), exact.data());
  // Same operations in the same order, apart from exp: agreement to a few fp64 ulps.
  EXPECT_TRUE(AllClose(rounded, want, 1e-12, 1e-12));
  // The roundings are visible (bf16 steps of ~2^-8 relative), and the default is unrounded.
  EXPECT_FALSE(AllClose(rounded, exact, 1e-6, 0.0));
  EXPECT_TRUE(AllClose(exact, want, 0.05, 0.0));
}

}  // namespace
}  // namespace kls::kernels

// Norm references: hand-computed values, direct formulas, the shared-per-head weight of the gated
// RMSNorm, and in-place use (out == x).
#include "kernels/norm/norm_ref.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "tests/test_util.h"

namespace kls::kernels {
namespace {

using ::kls::testing::AllClose;

template <typename T>
constexpr ::kls::testing::Tolerance kTol =
    std::is_same_v<T, double> ? ::kls::testing::Tolerance{1e-13, 1e-13}
                              : ::kls::testing::kFp32Tolerance;

template <typename T>
std::vector<T> Random(size_t n, std::mt19937_64& rng, double mean = 0.0) {
  std::normal_distribution<double> normal(mean, 1.0);
  std::vector<T> x(n);
  for (T& e : x) e = static_cast<T>(normal(rng));
  return x;
}

template <typename T>
::testing::AssertionResult Close(const std::vector<T>& actual, const std::vector<T>& expected) {
  return AllClose(std::span<const T>(actual), std::span<const T>(expected), kTol<T>.atol,
                  kTol<T>.rtol);
}

TEST(NormReferenceTest, HandChecked) {
  // x = (3, 4): mean(x^2) = 12.5, sum(x^2) = 25.
  const double x[2] = {3, 4};
  double out[2];

  const double w[2] = {1, 2};
  RmsNormReference(x, w, /*rows=*/1, /*dim=*/2, /*eps=*/0.0, out);
  EXPECT_DOUBLE_EQ(out[0], 3 / std::sqrt(12.5));
  EXPECT_DOUBLE_EQ(out[1], 8 / std::sqrt(12.5));
  RmsNormReference(x, w, 1, 2, /*eps=*/0.5, out);  // sqrt(12.5 + 0.5) = sqrt(13)
  EXPECT_DOUBLE_EQ(out[0], 3 / std::sqrt(13.0));

  L2NormReference(x, 1, 2, /*eps=*/0.0, out);
  EXPECT_DOUBLE_EQ(out[0], 0.6);
  EXPECT_DOUBLE_EQ(out[1], 0.8);
  L2NormReference(x, 1, 2, /*eps=*/11.0, out);  // eps inside the sqrt: sqrt(25 + 11) = 6
  EXPECT_DOUBLE_EQ(out[0], 0.5);
  EXPECT_DOUBLE_EQ(out[1], 4.0 / 6.0);
  const double zeros[2] = {0, 0};
  L2NormReference(zeros, 1, 2, /*eps=*/1e-6, out);  // a zero row stays zero, no NaN
  EXPECT_EQ(out[0], 0.0);
  EXPECT_EQ(out[1], 0.0);

  // Gated, 1 row x 2 heads x dim 2, weight (2, 2) shared by both heads. Head 0: x = (1, 1) so
  // rms = 1; gate (0, 0) gives sigmoid 0.5 -> (1, 1). Head 1: x = (3, 4); gate (ln 3, -ln 3)
  // gives sigmoid (0.75, 0.25).
  const double gx[4] = {1, 1, 3, 4};
  const double gate[4] = {0, 0, std::log(3.0), -std::log(3.0)};
  const double gw[2] = {2, 2};
  double gout[4];
  GatedRmsNormReference(gx, gate, gw, /*rows=*/1, /*heads=*/2, /*dim=*/2, /*eps=*/0.0, gout);
  EXPECT_DOUBLE_EQ(gout[0], 1.0);
  EXPECT_DOUBLE_EQ(gout[1], 1.0);
  EXPECT_DOUBLE_EQ(gout[2], 2 * 3 / std::sqrt(12.5) * 0.75);
  EXPECT_DOUBLE_EQ(gout[3], 2 * 4 / std::sqrt(12.5) * 0.25);
}

template <typename T>
class NormReferenceTest : public ::testing::Test {};

TYPED_TEST_SUITE(NormReferenceTest, kls::testing::FloatTypes, kls::testing::FloatTypeNames);

// Rows of the edge widths 1 and 128 (the model's head dim) and an odd one.
constexpr int64_t kDims[] = {1, 5, 128};

TYPED_TEST(NormReferenceTest, RmsNormMatchesFormula) {
  using T = TypeParam;
  std::mt19937_64 rng(31);
  const int64_t rows = 3;
  const double eps = 1e-5;
  for (int64_t dim : kDims) {
    SCOPED_TRACE(::testing::Message() << "dim " << dim);
    const std::vector<T> x = Random<T>(rows * dim, rng, 0.5);
    const std::vector<T> w = Random<T>(dim, rng);
    std::vector<T> out(x.size()), expected(x.size());
    RmsNormReference(x.data(), w.data(), rows, dim, eps, out.data());
    for (int64_t r = 0; r < rows; ++r) {
      double ms = 0;
      for (int64_t i = 0; i < dim; ++i) ms += double(x[r * dim + i]) * x[r * dim + i] / dim;
      for (int64_t i = 0; i < dim; ++i) {
        expected[r * dim + i] = static_cast<T>(double(w[i]) * x[r * dim + i] / std::sqrt(ms + eps));
      }
    }
    EXPECT_TRUE(Close(out, expected));
  }
}

TYPED_TEST(NormReferenceTest, GatedRmsNormMatchesFormula) {
  using T = TypeParam;
  std::mt19937_64 rng(32);
  const int64_t rows = 3;
  const int heads = 4;
  const double eps = 1e-5;
  for (int64_t dim : kDims) {
    SCOPED_TRACE(::testing::Message() << "dim " << dim);
    const std::vector<T> x = Random<T>(rows * heads * dim, rng);
    const std::vector<T> gate = Random<T>(rows * heads * dim, rng);
    const std::vector<T> w = Random<T>(dim, rng);
    std::vector<T> out(x.size()), expected(x.size());
    GatedRmsNormReference(x.data(), gate.data(), w.data(), rows, heads, dim, eps, out.data());
    for (int64_t r = 0; r < rows; ++r) {
      for (int h = 0; h < heads; ++h) {
        const int64_t base = (r * heads + h) * dim;
        double ms = 0;
        for (int64_t i = 0; i < dim; ++i) ms += double(x[base + i]) * x[base + i] / dim;
        for (int64_t i = 0; i < dim; ++i) {
          const double sig = 1.0 / (1.0 + std::exp(-double(gate[base + i])));
          expected[base + i] =
              static_cast<T>(double(w[i]) * x[base + i] / std::sqrt(ms + eps) * sig);
        }
      }
    }
    EXPECT_TRUE(Close(out, expected));
  }
}

TYPED_TEST(NormReferenceTest, L2NormMatchesFormula) {
  using T = TypeParam;
  std::mt19937_64 rng(33);
  const int64_t rows = 6;  // e.g. 3 tokens x 2 heads
  const double eps = 1e-6;
  for (int64_t dim : kDims) {
    SCOPED_TRACE(::testing::Message() << "dim " << dim);
    const std::vector<T> x = Random<T>(rows * dim, rng);
    std::vector<T> out(x.size()), expected(x.size());
    L2NormReference(x.data(), rows, dim, eps, out.data());
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += double(x[r * dim + i]) * x[r * dim + i];
      for (int64_t i = 0; i < dim; ++i) {
        expected[r * dim + i] = static_cast<T>(x[r * dim + i] / std::sqrt(ss + eps));
      }
    }
    EXPECT_TRUE(Close(out, expected));
  }
}

// out == x gives exactly what a separate output buffer gives.
TYPED_TEST(NormReferenceTest, InPlaceEqualsOutOfPlace) {
  using T = TypeParam;
  std::mt19937_64 rng(34);
  const int64_t rows = 4, dim = 33;
  const int heads = 2;
  const std::vector<T> x = Random<T>(rows * heads * dim, rng);
  const std::vector<T> gate = Random<T>(rows * heads * dim, rng);
  const std::vector<T> w = Random<T>(dim, rng);

  std::vector<T> separate(x.size()), inplace = x;
  RmsNormReference(x.data(), w.data(), rows * heads, dim, 1e-5, separate.data());
  RmsNormReference(inplace.data(), w.data(), rows * heads, dim, 1e-5, inplace.data());
  EXPECT_EQ(inplace, separate) << "RMSNorm";

  inplace = x;
  GatedRmsNormReference(x.data(), gate.data(), w.data(), rows, heads, dim, 1e-5, separate.data());
  GatedRmsNormReference(inplace.data(), gate.data(), w.data(), rows, heads, dim, 1e-5,
                        inplace.data());
  EXPECT_EQ(inplace, separate) << "gated RMSNorm";

  inplace = x;
  L2NormReference(x.data(), rows * heads, dim, 1e-6, separate.data());
  L2NormReference(inplace.data(), rows * heads, dim, 1e-6, inplace.data());
  EXPECT_EQ(inplace, separate) << "L2 norm";
  EXPECT_NE(inplace, x);
}

}  // namespace
}  // namespace kls::kernels

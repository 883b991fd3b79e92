// Causal depthwise conv + SiLU reference: a hand case, a direct formula over an explicitly
// extended input, split sequences with carried conv state, and ragged batches.
#include "kernels/conv/conv_ref.h"

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

double Silu(double x) { return x / (1.0 + std::exp(-x)); }

template <typename T>
std::vector<T> Random(size_t n, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> x(n);
  for (T& e : x) e = static_cast<T>(normal(rng));
  return x;
}

// Runs the reference on a packed batch; `states` are updated in place.
template <typename T>
std::vector<T> RunConv(const std::vector<T>& x, const std::vector<T>& weight,
                       const std::vector<int64_t>& cu_seqlens, int64_t dim, int width,
                       std::vector<std::vector<T>>& states) {
  std::vector<T*> ptrs;
  for (auto& s : states) ptrs.push_back(s.data());
  std::vector<T> out(x.size(), T(-777));
  CausalConv1dSiluReference(x.data(), weight.data(), cu_seqlens.data(),
                            static_cast<int64_t>(cu_seqlens.size()) - 1, dim, width, ptrs.data(),
                            out.data());
  return out;
}

// D = 1, W = 3, weight (1, 0.5, -1), state (0.5, -1), x = (2, -0.5):
//   t=0: 1*0.5 + 0.5*(-1) + (-1)*2    = -2   -> SiLU(-2)
//   t=1: 1*(-1) + 0.5*2 + (-1)*(-0.5) = 0.5  -> SiLU(0.5)
//   new state = (2, -0.5)
TEST(CausalConv1dSiluReferenceTest, HandChecked) {
  const std::vector<double> weight = {1, 0.5, -1};
  const std::vector<double> x = {2, -0.5};
  std::vector<std::vector<double>> states = {{0.5, -1}};
  const std::vector<double> out = RunConv(x, weight, {0, 2}, /*dim=*/1, /*width=*/3, states);
  const std::vector<double> expected = {-2.0 / (1.0 + std::exp(2.0)), 0.5 / (1.0 + std::exp(-0.5))};
  EXPECT_TRUE(AllClose(std::span<const double>(out), expected, 1e-15, 1e-15));
  EXPECT_EQ(states[0], (std::vector<double>{2, -0.5}));
}

template <typename T>
class ConvReferenceTest : public ::testing::Test {};

TYPED_TEST_SUITE(ConvReferenceTest, kls::testing::FloatTypes, kls::testing::FloatTypeNames);

// Against out[t] = SiLU(sum_i w[c, i] * ext[t + i, c]) with ext = [state; x], built explicitly.
TYPED_TEST(ConvReferenceTest, MatchesDirectFormula) {
  using T = TypeParam;
  std::mt19937_64 rng(21);
  const int64_t dim = 7;
  const std::vector<int64_t> lengths = {1, 2, 5, 17};
  for (int width : {1, 2, 4}) {
    SCOPED_TRACE(::testing::Message() << "width " << width);
    const int64_t history = width - 1;
    std::vector<int64_t> cu = {0};
    for (int64_t len : lengths) cu.push_back(cu.back() + len);
    const std::vector<T> x = Random<T>(cu.back() * dim, rng);
    const std::vector<T> weight = Random<T>(dim * width, rng);
    std::vector<std::vector<T>> states;
    for (size_t n = 0; n < lengths.size(); ++n) states.push_back(Random<T>(history * dim, rng));
    const std::vector<std::vector<T>> initial = states;
    const std::vector<T> out = RunConv(x, weight, cu, dim, width, states);

    std::vector<T> expected(x.size());
    for (size_t n = 0; n < lengths.size(); ++n) {
      std::vector<double> ext(initial[n].begin(), initial[n].end());
      ext.insert(ext.end(), x.begin() + cu[n] * dim, x.begin() + cu[n + 1] * dim);
      for (int64_t t = 0; t < lengths[n]; ++t) {
        for (int64_t c = 0; c < dim; ++c) {
          double sum = 0;
          for (int i = 0; i < width; ++i)
            sum += double(weight[c * width + i]) * ext[(t + i) * dim + c];
          expected[(cu[n] + t) * dim + c] = static_cast<T>(Silu(sum));
        }
      }
      // The new state is the last W-1 rows of ext.
      const std::vector<T> expected_state(ext.end() - history * dim, ext.end());
      EXPECT_EQ(states[n], expected_state) << "sequence " << n;
    }
    EXPECT_TRUE(AllClose(std::span<const T>(out), expected, kTol<T>.atol, kTol<T>.rtol));
  }
}

// One pass over 20 tokens == pieces of 1, 2, 3 and 14 tokens with the conv state carried
// (pieces shorter than W-1 keep part of the previous state). Same sums in the same order, so
// bitwise equal.
TYPED_TEST(ConvReferenceTest, SplitWithCarriedStateEqualsOnePass) {
  using T = TypeParam;
  std::mt19937_64 rng(22);
  const int64_t dim = 5;
  const int width = 4;
  const int64_t total = 20;
  const std::vector<T> x = Random<T>(total * dim, rng);
  const std::vector<T> weight = Random<T>(dim * width, rng);
  const std::vector<T> state0 = Random<T>((width - 1) * dim, rng);

  std::vector<std::vector<T>> whole_state = {state0};
  const std::vector<T> whole = RunConv(x, weight, {0, total}, dim, width, whole_state);

  std::vector<std::vector<T>> state = {state0};
  std::vector<T> joined;
  int64_t start = 0;
  for (int64_t piece : {1, 2, 3, 14}) {
    const std::vector<T> xs(x.begin() + start * dim, x.begin() + (start + piece) * dim);
    const std::vector<T> out = RunConv(xs, weight, {0, piece}, dim, width, state);
    joined.insert(joined.end(), out.begin(), out.end());
    start += piece;
  }
  ASSERT_EQ(start, total);
  EXPECT_TRUE(AllClose(std::span<const T>(joined), whole, 0, 0));
  EXPECT_EQ(state[0], whole_state[0]);
}

// A packed batch (with an empty sequence, which keeps its state) equals each sequence alone.
TYPED_TEST(ConvReferenceTest, VarlenBatchEqualsSequencesAlone) {
  using T = TypeParam;
  std::mt19937_64 rng(23);
  const int64_t dim = 6;
  const int width = 4;
  const std::vector<int64_t> lengths = {3, 0, 1, 10};
  std::vector<int64_t> cu = {0};
  for (int64_t len : lengths) cu.push_back(cu.back() + len);
  const std::vector<T> x = Random<T>(cu.back() * dim, rng);
  const std::vector<T> weight = Random<T>(dim * width, rng);
  std::vector<std::vector<T>> states;
  for (size_t n = 0; n < lengths.size(); ++n) states.push_back(Random<T>((width - 1) * dim, rng));
  const std::vector<std::vector<T>> initial = states;
  const std::vector<T> batch = RunConv(x, weight, cu, dim, width, states);

  for (size_t n = 0; n < lengths.size(); ++n) {
    SCOPED_TRACE(::testing::Message() << "sequence " << n);
    const std::vector<T> xs(x.begin() + cu[n] * dim, x.begin() + cu[n + 1] * dim);
    std::vector<std::vector<T>> alone_state = {initial[n]};
    const std::vector<T> alone = RunConv(xs, weight, {0, lengths[n]}, dim, width, alone_state);
    const std::vector<T> batch_part(batch.begin() + cu[n] * dim, batch.begin() + cu[n + 1] * dim);
    EXPECT_TRUE(AllClose(std::span<const T>(batch_part), alone, 0, 0));
    EXPECT_EQ(states[n], alone_state[0]);
  }
  EXPECT_EQ(states[1], initial[1]);
}

}  // namespace
}  // namespace kls::kernels

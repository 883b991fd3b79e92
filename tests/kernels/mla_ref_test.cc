// Tests for the MLA references: hand-checked causal attention, and absorbed decode over the
// latent cache equal to non-absorbed attention over decompressed K/V (KIMI_LINEAR.md §5).
#include "kernels/mla/mla_ref.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace kls::kernels {
namespace {

using ::kls::testing::AllClose;
using ::kls::testing::kFp32Tolerance;
using ::kls::testing::RelativeErrorBelow;

// ---------------------------------------------------------------------------------------------
// Hand-checked prefill attention (H = 1, Dqk = 2, Dv = 1, scale = 1).

TEST(MlaPrefillAttentionReferenceTest, HandCheckedCausalWeights) {
  const double ln3 = std::log(3.0);
  // Query 0 sees key 0 only; query 1 scores keys 0, 1 as 0, ln 3 -> weights 1/4, 3/4;
  // query 2 scores keys 0, 1, 2 as 0, 0, ln 2 -> weights 1/4, 1/4, 1/2.
  const std::vector<double> q = {5.0, -7.0, 1.0, 0.0, 0.0, 1.0};
  const std::vector<double> k = {0.0, 0.0, ln3, 0.0, 0.0, std::log(2.0)};
  const std::vector<double> v = {4.0, 8.0, 16.0};
  std::vector<double> out(3);
  MlaPrefillAttentionReference<double>(q.data(), k.data(), v.data(), 3, 3, 1, 2, 1, 1.0,
                                       out.data());
  const std::vector<double> expected = {4.0, 0.25 * 4 + 0.75 * 8, 0.25 * 4 + 0.25 * 8 + 0.5 * 16};
  EXPECT_TRUE(AllClose(out, expected, 1e-14, 1e-14));
}

TEST(MlaPrefillAttentionReferenceTest, HugeScoresStayFiniteAndExact) {
  // Scores 1000 and 1000 + ln 3: a softmax without max subtraction overflows.
  const double ln3 = std::log(3.0);
  const std::vector<double> q = {1.0, 1.0};
  const std::vector<double> k = {1000.0, 0.0, 1000.0 + ln3, 0.0};
  const std::vector<double> v = {4.0, 8.0};
  std::vector<double> out(1);
  MlaPrefillAttentionReference<double>(q.data(), k.data(), v.data(), 1, 2, 1, 2, 1, 1.0,
                                       out.data());
  EXPECT_TRUE(AllClose(out, std::vector<double>{7.0}, 1e-12, 1e-12));
}

TEST(MlaPrefillAttentionReferenceTest, QueriesNeverSeeLaterKeys) {
  constexpr int64_t kCtx = 6;
  constexpr int kHeads = 2, kDqk = 3, kDv = 2;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  std::vector<double> q(kCtx * kHeads * kDqk), k(q.size()), v(kCtx * kHeads * kDv);
  for (auto* x : {&q, &k, &v}) {
    for (double& e : *x) e = normal(rng);
  }
  std::vector<double> base(kCtx * kHeads * kDv);
  MlaPrefillAttentionReference<double>(q.data(), k.data(), v.data(), kCtx, kCtx, kHeads, kDqk, kDv,
                                       0.5, base.data());
  // Perturb key and value of position `pos`: rows < pos must be bit-identical, rows >= pos
  // must change.
  for (int64_t pos = 0; pos < kCtx; ++pos) {
    std::vector<double> k2 = k, v2 = v;
    for (int i = 0; i < kHeads * kDqk; ++i) k2[pos * kHeads * kDqk + i] += 3.0;
    for (int i = 0; i < kHeads * kDv; ++i) v2[pos * kHeads * kDv + i] -= 5.0;
    std::vector<double> out(base.size());
    MlaPrefillAttentionReference<double>(q.data(), k2.data(), v2.data(), kCtx, kCtx, kHeads, kDqk,
                                         kDv, 0.5, out.data());
    for (int64_t t = 0; t < kCtx; ++t) {
      for (int i = 0; i < kHeads * kDv; ++i) {
        const int64_t idx = t * kHeads * kDv + i;
        if (t < pos) {
          EXPECT_EQ(out[idx], base[idx]) << "query " << t << " saw key " << pos;
        } else {
          EXPECT_NE(out[idx], base[idx]) << "query " << t << " ignored key " << pos;
        }
      }
    }
  }
}

TEST(MlaPrefillAttentionReferenceTest, NewQueriesSitAtTheEndOfTheContext) {
  // Running only the last 2 queries against 5 keys equals the last 2 rows of the full run.
  constexpr int64_t kCtx = 5, kNew = 2;
  constexpr int kHeads = 3, kDqk = 4, kDv = 3;
  std::mt19937_64 rng(11);
  std::normal_distribution<double> normal;
  std::vector<double> q(kCtx * kHeads * kDqk), k(q.size()), v(kCtx * kHeads * kDv);
  for (auto* x : {&q, &k, &v}) {
    for (double& e : *x) e = normal(rng);
  }
  std::vector<double> full(kCtx * kHeads * kDv), tail(kNew * kHeads * kDv);
  MlaPrefillAttentionReference<double>(q.data(), k.data(), v.data(), kCtx, kCtx, kHeads, kDqk, kDv,
                                       0.3, full.data());
  MlaPrefillAttentionReference<double>(q.data() + (kCtx - kNew) * kHeads * kDqk, k.data(), v.data(),
                                       kNew, kCtx, kHeads, kDqk, kDv, 0.3, tail.data());
  const std::vector<double> expected(full.end() - tail.size(), full.end());
  EXPECT_EQ(tail, expected);
}

// ---------------------------------------------------------------------------------------------
// Absorbed decode == non-absorbed attention over decompressed K/V.

struct MlaShape {
  int64_t num_new;
  int64_t num_ctx;
  int heads;
  int dn, dr, dc, dv;
  bool normalize_latent;
};

void PrintTo(const MlaShape& s, std::ostream* os) {
  *os << "{new " << s.num_new << ", ctx " << s.num_ctx << ", H " << s.heads << ", Dn " << s.dn
      << ", Dr " << s.dr << ", Dc " << s.dc << ", Dv " << s.dv
      << (s.normalize_latent ? ", rmsnormed}" : ", raw}");
}

std::string ShapeName(const ::testing::TestParamInfo<MlaShape>& info) {
  const MlaShape& s = info.param;
  return "new" + std::to_string(s.num_new) + "_ctx" + std::to_string(s.num_ctx) + "_H" +
         std::to_string(s.heads) + "_Dn" + std::to_string(s.dn) + "_Dr" + std::to_string(s.dr) +
         "_Dc" + std::to_string(s.dc) + "_Dv" + std::to_string(s.dv) +
         (s.normalize_latent ? "_rmsnormed" : "_raw");
}

std::vector<MlaShape> AllShapes() {
  std::vector<MlaShape> shapes;
  for (int64_t num_new : {1, 5}) {
    for (int64_t num_ctx : {1, 7, 64, 300}) {
      if (num_new > num_ctx) continue;  // the queries are the last num_new context rows
      for (int heads : {1, 4}) {
        shapes.push_back({num_new, num_ctx, heads, 16, 8, 24, 12, heads == 4});
      }
    }
  }
  // Kimi Linear's real per-head dimensions (Dn 128, Dr 64, Dc 512, Dv 128).
  shapes.push_back({3, 40, 2, 128, 64, 512, 128, true});
  return shapes;
}

// Inputs drawn in fp64 then rounded to T; the oracle decompresses from the rounded values.
template <typename T>
struct MlaInputs {
  std::vector<T> q_nope, q_pe, cache, kv_b_proj;
};

template <typename T>
MlaInputs<T> MakeInputs(const MlaShape& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  MlaInputs<T> in;
  in.q_nope.resize(s.num_new * s.heads * s.dn);
  in.q_pe.resize(s.num_new * s.heads * s.dr);
  in.cache.resize(s.num_ctx * (s.dc + s.dr));
  in.kv_b_proj.resize(static_cast<size_t>(s.heads) * (s.dn + s.dv) * s.dc);
  for (T& x : in.q_nope) x = static_cast<T>(normal(rng));
  for (T& x : in.q_pe) x = static_cast<T>(normal(rng));
  // Scale W so that k_nope and v are O(1) and the scores are O(1)-ish, as in a trained model.
  const double w_scale = 1.0 / std::sqrt(static_cast<double>(s.dc));
  for (T& x : in.kv_b_proj) x = static_cast<T>(w_scale * normal(rng));
  for (int64_t t = 0; t < s.num_ctx; ++t) {
    T* row = in.cache.data() + t * (s.dc + s.dr);
    std::vector<double> c(s.dc);
    double sum_sq = 0.0;
    for (double& x : c) {
      x = 2.0 * normal(rng) + 0.5;
      sum_sq += x * x;
    }
    const double inv_rms = s.normalize_latent ? 1.0 / std::sqrt(sum_sq / s.dc + 1e-5) : 1.0;
    for (int i = 0; i < s.dc; ++i) row[i] = static_cast<T>(c[i] * inv_rms);
    for (int i = 0; i < s.dr; ++i) row[s.dc + i] = static_cast<T>(normal(rng));
  }
  return in;
}

// Non-absorbed path: q = [q_nope, q_pe], K = [W_UK c, k_pe] per head (k_pe shared),
// V = W_UV c; decompression in fp64 from the T inputs, then rounded to T for the kernel.
template <typename T>
std::vector<T> NonAbsorbed(const MlaShape& s, const MlaInputs<T>& in, double scale) {
  const int dqk = s.dn + s.dr;
  std::vector<T> q(s.num_new * s.heads * dqk), k(s.num_ctx * s.heads * dqk);
  std::vector<T> v(s.num_ctx * s.heads * s.dv);
  for (int64_t i = 0; i < s.num_new; ++i) {
    for (int h = 0; h < s.heads; ++h) {
      T* qh = q.data() + (i * s.heads + h) * dqk;
      for (int d = 0; d < s.dn; ++d) qh[d] = in.q_nope[(i * s.heads + h) * s.dn + d];
      for (int d = 0; d < s.dr; ++d) qh[s.dn + d] = in.q_pe[(i * s.heads + h) * s.dr + d];
    }
  }
  for (int64_t t = 0; t < s.num_ctx; ++t) {
    const T* c = in.cache.data() + t * (s.dc + s.dr);
    for (int h = 0; h < s.heads; ++h) {
      const T* w = in.kv_b_proj.data() + static_cast<int64_t>(h) * (s.dn + s.dv) * s.dc;
      T* kh = k.data() + (t * s.heads + h) * dqk;
      T* vh = v.data() + (t * s.heads + h) * s.dv;
      for (int r = 0; r < s.dn + s.dv; ++r) {
        double acc = 0.0;
        for (int j = 0; j < s.dc; ++j) acc += double(w[r * s.dc + j]) * double(c[j]);
        if (r < s.dn) {
          kh[r] = static_cast<T>(acc);
        } else {
          vh[r - s.dn] = static_cast<T>(acc);
        }
      }
      for (int d = 0; d < s.dr; ++d) kh[s.dn + d] = c[s.dc + d];
    }
  }
  std::vector<T> out(s.num_new * s.heads * s.dv);
  MlaPrefillAttentionReference<T>(q.data(), k.data(), v.data(), s.num_new, s.num_ctx, s.heads, dqk,
                                  s.dv, scale, out.data());
  return out;
}

template <typename T>
std::vector<T> Absorbed(const MlaShape& s, const MlaInputs<T>& in, double scale) {
  std::vector<T> out(s.num_new * s.heads * s.dv);
  MlaDecodeAbsorbedReference<T>(in.q_nope.data(), in.q_pe.data(), in.cache.data(),
                                in.kv_b_proj.data(), s.num_new, s.num_ctx, s.heads, s.dn, s.dr,
                                s.dc, s.dv, scale, out.data());
  return out;
}

class MlaAbsorbedTest : public ::testing::TestWithParam<MlaShape> {};

TEST_P(MlaAbsorbedTest, Fp64AbsorbedDecodeEqualsNonAbsorbedAttention) {
  const MlaShape& s = GetParam();
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.dn + s.dr));
  const MlaInputs<double> in = MakeInputs<double>(s, 1000 + s.num_ctx * 10 + s.num_new);
  const std::vector<double> expected = NonAbsorbed(s, in, scale);
  const std::vector<double> actual = Absorbed(s, in, scale);
  EXPECT_TRUE(RelativeErrorBelow(actual, expected, 1e-10));
  EXPECT_TRUE(AllClose(actual, expected, 1e-10, 1e-10));
}

TEST_P(MlaAbsorbedTest, Fp32AbsorbedDecodeEqualsNonAbsorbedAttention) {
  const MlaShape& s = GetParam();
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.dn + s.dr));
  const MlaInputs<float> in = MakeInputs<float>(s, 2000 + s.num_ctx * 10 + s.num_new);
  const std::vector<float> expected = NonAbsorbed(s, in, scale);
  const std::vector<float> actual = Absorbed(s, in, scale);
  EXPECT_TRUE(AllClose(actual, expected, kFp32Tolerance.atol, kFp32Tolerance.rtol));
}

INSTANTIATE_TEST_SUITE_P(Shapes, MlaAbsorbedTest, ::testing::ValuesIn(AllShapes()), ShapeName);

TEST(MlaDecodeAbsorbedReferenceTest, SingleContextRowReturnsItsValue) {
  // One key: softmax weight 1, so o^h = W_UV^h c_0 regardless of the query.
  const MlaShape s{1, 1, 2, 3, 2, 4, 3, false};
  const MlaInputs<double> in = MakeInputs<double>(s, 5);
  const std::vector<double> out = Absorbed(s, in, 0.7);
  std::vector<double> expected(s.heads * s.dv);
  for (int h = 0; h < s.heads; ++h) {
    for (int d = 0; d < s.dv; ++d) {
      const double* row = in.kv_b_proj.data() + (h * (s.dn + s.dv) + s.dn + d) * s.dc;
      for (int j = 0; j < s.dc; ++j) expected[h * s.dv + d] += row[j] * in.cache[j];
    }
  }
  EXPECT_TRUE(AllClose(out, expected, 1e-14, 1e-14));
}

}  // namespace
}  // namespace kls::kernels

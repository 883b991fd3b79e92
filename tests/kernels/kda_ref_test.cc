// KDA CPU references: the chunked algorithm with sub-chunk anchoring against the token-by-token
// recurrence (the definition), on outputs and final states, over edge lengths, head dims, gate
// extremes, ragged batches, split prefill and chunk sizes. Fixed seeds throughout.
#include "kernels/kda/kda_ref.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "tests/test_util.h"

namespace kls::kernels {
namespace {

using ::kls::testing::AllClose;
using ::kls::testing::AllFinite;
using ::kls::testing::RelativeErrorBelow;

// The acceptance bounds on the normwise relative error, chunk vs recurrence.
template <typename T>
constexpr double kChunkTolerance = std::is_same_v<T, double> ? 1e-9 : 1e-4;

enum class GateMode {
  kModel,        // the real gate: A_log ~ log U(1, 16), dt_bias ~ N(0, 1), f ~ N(0, 1)
  kMild,         // the real gate with A_log ~ log U(0.005, 0.05): decay spans whole chunks
  kExtreme,      // A_log = log 16, f + dt_bias = 25: g = -400 every step
  kZero,         // g = 0: the pure delta rule
  kAlternating,  // runs of 7 tokens alternate -400 and 0, and the pattern flips per channel
};

// A packed batch of KDA inputs and per-sequence initial states (layouts of kda_ref.h).
template <typename T>
struct KdaProblem {
  int num_heads = 0, dk = 0, dv = 0;
  double scale = 0;
  std::vector<int64_t> cu_seqlens;
  std::vector<T> q, k, v, g, beta;  // [total, H, K], [total, H, K], [total, H, V], ..., [total, H]
  std::vector<std::vector<T>> states;  // num_seqs x [H, K, V]

  int64_t num_seqs() const { return static_cast<int64_t>(cu_seqlens.size()) - 1; }
  int64_t total() const { return cu_seqlens.back(); }
};

template <typename T>
struct KdaResult {
  std::vector<T> out;                   // [total, H, V]
  std::vector<T> states;                // all final states, concatenated in sequence order
  std::vector<std::vector<T>> per_seq;  // the same, one [H, K, V] per sequence
};

template <typename To, typename From>
std::vector<To> Cast(const std::vector<From>& x) {
  return std::vector<To>(x.begin(), x.end());
}

template <typename T>
KdaProblem<T> CastProblem(const KdaProblem<double>& p) {
  KdaProblem<T> r;
  r.num_heads = p.num_heads;
  r.dk = p.dk;
  r.dv = p.dv;
  r.scale = p.scale;
  r.cu_seqlens = p.cu_seqlens;
  r.q = Cast<T>(p.q);
  r.k = Cast<T>(p.k);
  r.v = Cast<T>(p.v);
  r.g = Cast<T>(p.g);
  r.beta = Cast<T>(p.beta);
  for (const auto& s : p.states) r.states.push_back(Cast<T>(s));
  return r;
}

// Normalizes each head_dim-long row to unit L2 norm (the model's q/k after §3.3).
void NormalizeRows(std::vector<double>& x, int dim) {
  for (size_t row = 0; row < x.size() / dim; ++row) {
    double sum_sq = 0;
    for (int i = 0; i < dim; ++i) sum_sq += x[row * dim + i] * x[row * dim + i];
    const double inv = 1.0 / std::sqrt(sum_sq + 1e-6);
    for (int i = 0; i < dim; ++i) x[row * dim + i] *= inv;
  }
}

// Log-decays [total, H, K] for the given mode, through KdaGateReference where the mode is a
// real gate.
std::vector<double> MakeGates(GateMode mode, int64_t total, int num_heads, int dk,
                              std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  const int64_t width = static_cast<int64_t>(num_heads) * dk;
  std::vector<double> g(total * width);
  std::vector<double> f(total * width), a_log(num_heads), dt_bias(width);
  switch (mode) {
    case GateMode::kModel:
    case GateMode::kMild: {
      std::uniform_real_distribution<double> rate =
          mode == GateMode::kModel ? std::uniform_real_distribution<double>(1, 16)
                                   : std::uniform_real_distribution<double>(0.005, 0.05);
      for (double& a : a_log) a = std::log(rate(rng));
      for (double& b : dt_bias) b = normal(rng);
      for (double& x : f) x = normal(rng);
      break;
    }
    case GateMode::kExtreme:
      for (double& a : a_log) a = std::log(16.0);
      for (double& b : dt_bias) b = 0.0;
      for (double& x : f) x = 25.0;
      break;
    case GateMode::kZero:
      return g;
    case GateMode::kAlternating:
      for (int64_t t = 0; t < total; ++t) {
        for (int64_t m = 0; m < width; ++m) {
          g[t * width + m] = ((t / 7) + m) % 2 == 0 ? -400.0 : 0.0;
        }
      }
      return g;
  }
  KdaGateReference<double>(f.data(), a_log.data(), dt_bias.data(), total, num_heads, dk, g.data());
  return g;
}

KdaProblem<double> MakeProblem(const std::vector<int64_t>& lengths, int num_heads, int dk, int dv,
                               GateMode gates, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  KdaProblem<double> p;
  p.num_heads = num_heads;
  p.dk = dk;
  p.dv = dv;
  p.scale = 1.0 / std::sqrt(static_cast<double>(dk));
  p.cu_seqlens.push_back(0);
  for (int64_t len : lengths) p.cu_seqlens.push_back(p.cu_seqlens.back() + len);
  const int64_t total = p.total();
  const auto fill = [&](std::vector<double>& x, int64_t n) {
    x.resize(n);
    for (double& e : x) e = normal(rng);
  };
  fill(p.q, total * num_heads * dk);
  fill(p.k, total * num_heads * dk);
  fill(p.v, total * num_heads * dv);
  NormalizeRows(p.q, dk);
  NormalizeRows(p.k, dk);
  fill(p.beta, total * num_heads);
  for (double& b : p.beta) b = 1.0 / (1.0 + std::exp(-b));
  p.g = MakeGates(gates, total, num_heads, dk, rng);
  p.states.resize(lengths.size());
  for (auto& s : p.states) fill(s, static_cast<int64_t>(num_heads) * dk * dv);
  return p;
}

enum class Algo { kRecurrent, kChunk };

template <typename T>
KdaResult<T> RunKda(const KdaProblem<T>& p, Algo algo, int chunk_size = 64,
                    int sub_chunk_size = 16) {
  KdaResult<T> r;
  r.per_seq = p.states;
  std::vector<T*> state_ptrs;
  for (auto& s : r.per_seq) state_ptrs.push_back(s.data());
  r.out.assign(p.total() * p.num_heads * p.dv, T(-12345));
  KdaArgs<T> args;
  args.q = p.q.data();
  args.k = p.k.data();
  args.v = p.v.data();
  args.g = p.g.data();
  args.beta = p.beta.data();
  args.cu_seqlens = p.cu_seqlens.data();
  args.num_seqs = p.num_seqs();
  args.num_heads = p.num_heads;
  args.head_dim_k = p.dk;
  args.head_dim_v = p.dv;
  args.scale = p.scale;
  args.states = state_ptrs.data();
  args.out = r.out.data();
  if (algo == Algo::kRecurrent) {
    KdaRecurrentReference(args);
  } else {
    KdaChunkReference(args, chunk_size, sub_chunk_size);
  }
  for (const auto& s : r.per_seq) r.states.insert(r.states.end(), s.begin(), s.end());
  return r;
}

template <typename T>
::testing::AssertionResult Close(const std::vector<T>& actual, const std::vector<T>& expected,
                                 double bound) {
  return RelativeErrorBelow(std::span<const T>(actual), std::span<const T>(expected), bound);
}

template <typename T>
void ExpectSameResult(const KdaResult<T>& actual, const KdaResult<T>& expected, double bound) {
  EXPECT_TRUE(Close(actual.out, expected.out, bound)) << "output";
  EXPECT_TRUE(Close(actual.states, expected.states, bound)) << "final state";
}

// Chunked (C = 64, BC = 16) vs recurrence on a fresh problem: both finite, outputs and final
// states within the acceptance bound.
template <typename T>
void ExpectChunkMatchesRecurrence(const KdaProblem<double>& problem) {
  const KdaProblem<T> p = CastProblem<T>(problem);
  const KdaResult<T> rec = RunKda(p, Algo::kRecurrent);
  const KdaResult<T> chunk = RunKda(p, Algo::kChunk);
  EXPECT_TRUE(AllFinite(std::span<const T>(rec.out))) << "recurrent output";
  EXPECT_TRUE(AllFinite(std::span<const T>(rec.states))) << "recurrent final state";
  EXPECT_TRUE(AllFinite(std::span<const T>(chunk.out))) << "chunk output";
  EXPECT_TRUE(AllFinite(std::span<const T>(chunk.states))) << "chunk final state";
  ExpectSameResult(chunk, rec, kChunkTolerance<T>);
}

// --------------------------------------------------------------------------------------------
// The definition itself, by hand.

TEST(KdaGateReferenceTest, HandChecked) {
  // exp(a_log) = 2, dt_bias = 0.5 for every channel; x = f + dt_bias.
  const double a_log[1] = {std::log(2.0)};
  const double dt_bias[4] = {0.5, 0.5, 0.5, 0.5};
  const double f[4] = {-0.5, 24.5, 19.5, -30.5};  // x = 0, 25 (linear branch), 20 (not), -30
  double g[4];
  KdaGateReference(f, a_log, dt_bias, /*num_tokens=*/1, /*num_heads=*/1, /*head_dim=*/4, g);
  EXPECT_NEAR(g[0], -2.0 * std::log(2.0), 1e-15);
  EXPECT_EQ(g[1], -50.0);
  // softplus(20) = 20 + log1p(e^-20): the threshold is strictly "> 20".
  EXPECT_NEAR(g[2], -2.0 * (20.0 + std::exp(-20.0)), 1e-13);
  EXPECT_NE(g[2], -40.0);
  EXPECT_NEAR(g[3], -2.0 * std::exp(-30.0), 1e-25);

  // fp32 agrees and the gate is per head: head 1 has rate 16.
  const float a_log32[2] = {std::log(2.0f), std::log(16.0f)};
  const float dt32[2] = {0.0f, 0.0f};
  const float f32[4] = {0.0f, 25.0f, 0.0f, 25.0f};  // [1 token, 2 heads x 1 channel] x 2 tokens
  float g32[4];
  KdaGateReference(f32, a_log32, dt32, /*num_tokens=*/2, /*num_heads=*/2, /*head_dim=*/1, g32);
  EXPECT_FLOAT_EQ(g32[0], -2.0f * std::log(2.0f));
  EXPECT_FLOAT_EQ(g32[1], -400.0f);
  EXPECT_FLOAT_EQ(g32[2], -2.0f * std::log(2.0f));
  EXPECT_FLOAT_EQ(g32[3], -400.0f);
}

// K = V = 2, T = 2, H = 1, worked through §3.6 by hand:
//   S0 = [[2, 0], [0, 4]], scale = 0.5
//   t=1: k=(1,0), q=(1,0), v=(1,2), beta=0.5, alpha=(0.5, 1)
//        S~=[[1,0],[0,4]], p=(1,0), delta=0.5*((1,2)-(1,0))=(0,1), S1=[[1,1],[0,4]],
//        o1 = 0.5 * S1^T q = 0.5*(1,1) = (0.5, 0.5)
//   t=2: k=(0.6,0.8), q=(0,1), v=(3,4), beta=0.25, alpha=(1, 0.5)
//        S~=[[1,1],[0,2]], p=0.6*(1,1)+0.8*(0,2)=(0.6,2.2), delta=0.25*(2.4,1.8)=(0.6,0.45),
//        S2 = S~ + k delta^T = [[1.36,1.27],[0.48,2.36]], o2 = 0.5*(0.48,2.36) = (0.24,1.18)
KdaProblem<double> HandProblem() {
  KdaProblem<double> p;
  p.num_heads = 1;
  p.dk = 2;
  p.dv = 2;
  p.scale = 0.5;
  p.cu_seqlens = {0, 2};
  p.q = {1, 0, 0, 1};
  p.k = {1, 0, 0.6, 0.8};
  p.v = {1, 2, 3, 4};
  p.g = {std::log(0.5), 0, 0, std::log(0.5)};
  p.beta = {0.5, 0.25};
  p.states = {{2, 0, 0, 4}};
  return p;
}

TEST(KdaReferenceTest, HandCheckedRecurrenceAndChunks) {
  const std::vector<double> expected_out = {0.5, 0.5, 0.24, 1.18};
  const std::vector<double> expected_state = {1.36, 1.27, 0.48, 2.36};
  const KdaProblem<double> p = HandProblem();
  struct Variant {
    Algo algo;
    int chunk, sub;
  };
  // (2, 1): two sub-chunks of one row, so the t=2 / t=1 pair goes through the anchored
  // off-diagonal path; (1, 1): the pair is split across chunks and goes through the state.
  for (const Variant& variant :
       {Variant{Algo::kRecurrent, 0, 0}, Variant{Algo::kChunk, 64, 16}, Variant{Algo::kChunk, 2, 1},
        Variant{Algo::kChunk, 2, 2}, Variant{Algo::kChunk, 1, 1}}) {
    SCOPED_TRACE(::testing::Message() << "chunk " << variant.chunk << " sub " << variant.sub);
    const KdaResult<double> r = RunKda(p, variant.algo, variant.chunk, variant.sub);
    EXPECT_TRUE(AllClose(std::span<const double>(r.out), expected_out, 1e-14, 1e-14));
    EXPECT_TRUE(AllClose(std::span<const double>(r.states), expected_state, 1e-14, 1e-14));
  }
  const KdaResult<float> r32 = RunKda(CastProblem<float>(p), Algo::kChunk, 2, 1);
  EXPECT_TRUE(AllClose(std::span<const float>(r32.out), Cast<float>(expected_out), 1e-6, 1e-6));
  EXPECT_TRUE(
      AllClose(std::span<const float>(r32.states), Cast<float>(expected_state), 1e-6, 1e-6));
}

// --------------------------------------------------------------------------------------------
// Chunked == recurrence over edge lengths and head dims.

struct KdaShape {
  int64_t tokens;
  int num_heads, dk, dv;
  GateMode gates;
  bool fp64;
};

const char* GateName(GateMode mode) {
  switch (mode) {
    case GateMode::kModel:
      return "modelgate";
    case GateMode::kMild:
      return "mildgate";
    case GateMode::kExtreme:
      return "extremegate";
    case GateMode::kZero:
      return "zerogate";
    case GateMode::kAlternating:
      return "altgate";
  }
  return "unknowngate";
}

std::string ShapeString(const KdaShape& s) {
  const char* gates = GateName(s.gates);
  return "T" + std::to_string(s.tokens) + "_H" + std::to_string(s.num_heads) + "_K" +
         std::to_string(s.dk) + "_V" + std::to_string(s.dv) + "_" + gates +
         (s.fp64 ? "_fp64" : "_fp32");
}

std::string ShapeName(const ::testing::TestParamInfo<KdaShape>& info) {
  return ShapeString(info.param);
}

// gtest prints the parameter of a failing case with this instead of raw bytes.
void PrintTo(const KdaShape& s, std::ostream* os) { *os << ShapeString(s); }

class KdaChunkVsRecurrentTest : public ::testing::TestWithParam<KdaShape> {};

TEST_P(KdaChunkVsRecurrentTest, OutputAndFinalStateMatch) {
  const KdaShape& s = GetParam();
  const KdaProblem<double> problem =
      MakeProblem({s.tokens}, s.num_heads, s.dk, s.dv, s.gates, /*seed=*/1000 + s.tokens);
  // The gate mode really produced the gates it names (g is [T, H, K]; alternating starts at -400
  // on channel 0 of token 0).
  if (s.gates == GateMode::kExtreme || s.gates == GateMode::kAlternating) {
    ASSERT_NEAR(problem.g[0], -400.0, 1e-9);
  } else if (s.gates == GateMode::kZero) {
    ASSERT_EQ(problem.g[0], 0.0);
  }
  if (s.fp64) {
    ExpectChunkMatchesRecurrence<double>(problem);
  } else {
    ExpectChunkMatchesRecurrence<float>(problem);
  }
}

// Every gate mode at every edge length: extreme, zero and alternating gates must stay finite and
// within the bound across chunk and sub-chunk boundaries, not only at T = 200.
std::vector<KdaShape> LengthSweep() {
  std::vector<KdaShape> shapes;
  for (int64_t t : {1, 63, 64, 65, 127, 1000}) {
    for (GateMode gates : {GateMode::kModel, GateMode::kMild, GateMode::kExtreme, GateMode::kZero,
                           GateMode::kAlternating}) {
      for (bool fp64 : {false, true}) shapes.push_back({t, 2, 64, 64, gates, fp64});
    }
  }
  return shapes;
}

std::vector<KdaShape> HeadDimSweep() {
  std::vector<KdaShape> shapes;
  for (auto [dk, dv] : {std::pair{60, 60}, {64, 64}, {128, 128}, {60, 128}, {128, 60}}) {
    for (bool fp64 : {false, true}) shapes.push_back({130, 3, dk, dv, GateMode::kMild, fp64});
  }
  return shapes;
}

INSTANTIATE_TEST_SUITE_P(Lengths, KdaChunkVsRecurrentTest, ::testing::ValuesIn(LengthSweep()),
                         ShapeName);
INSTANTIATE_TEST_SUITE_P(HeadDims, KdaChunkVsRecurrentTest, ::testing::ValuesIn(HeadDimSweep()),
                         ShapeName);

// --------------------------------------------------------------------------------------------
// Gate extremes, ragged batches, split prefill, chunk sizes: fp32 and fp64.

template <typename T>
class KdaReferenceTypedTest : public ::testing::Test {};

TYPED_TEST_SUITE(KdaReferenceTypedTest, kls::testing::FloatTypes, kls::testing::FloatTypeNames);

// g = -400 per step: exp(-G) over a chunk would be exp(25600). Only an algorithm that never
// evaluates a positive exponent stays finite.
TYPED_TEST(KdaReferenceTypedTest, ExtremeGatesStayFiniteAndMatch) {
  using T = TypeParam;
  const KdaProblem<double> problem = MakeProblem({200}, 2, 64, 64, GateMode::kExtreme, 7);
  ASSERT_NEAR(problem.g[0], -400.0, 1e-9);
  const KdaProblem<T> p = CastProblem<T>(problem);
  const KdaResult<T> rec = RunKda(p, Algo::kRecurrent);
  const KdaResult<T> chunk = RunKda(p, Algo::kChunk);
  EXPECT_TRUE(AllFinite(std::span<const T>(chunk.out)));
  EXPECT_TRUE(AllFinite(std::span<const T>(chunk.states)));
  ExpectSameResult(chunk, rec, kChunkTolerance<T>);
}

TYPED_TEST(KdaReferenceTypedTest, ZeroGatesPureDeltaRuleMatch) {
  ExpectChunkMatchesRecurrence<TypeParam>(MakeProblem({200}, 2, 64, 64, GateMode::kZero, 8));
}

TYPED_TEST(KdaReferenceTypedTest, AlternatingExtremeAndZeroGatesMatch) {
  using T = TypeParam;
  const KdaProblem<T> p = CastProblem<T>(MakeProblem({200}, 2, 64, 64, GateMode::kAlternating, 9));
  const KdaResult<T> rec = RunKda(p, Algo::kRecurrent);
  const KdaResult<T> chunk = RunKda(p, Algo::kChunk);
  EXPECT_TRUE(AllFinite(std::span<const T>(chunk.out)));
  ExpectSameResult(chunk, rec, kChunkTolerance<T>);
}

// A packed batch (with an empty sequence) equals each sequence run alone; the empty one keeps
// its initial state.
TYPED_TEST(KdaReferenceTypedTest, VarlenBatchEqualsSequencesAlone) {
  using T = TypeParam;
  const std::vector<int64_t> lengths = {1, 63, 0, 65, 130};
  const KdaProblem<T> packed = CastProblem<T>(MakeProblem(lengths, 2, 64, 32, GateMode::kMild, 10));
  for (Algo algo : {Algo::kChunk, Algo::kRecurrent}) {
    SCOPED_TRACE(algo == Algo::kChunk ? "chunk" : "recurrent");
    const KdaResult<T> batch = RunKda(packed, algo);
    for (size_t n = 0; n < lengths.size(); ++n) {
      SCOPED_TRACE(::testing::Message() << "sequence " << n);
      KdaProblem<T> alone;
      alone.num_heads = packed.num_heads;
      alone.dk = packed.dk;
      alone.dv = packed.dv;
      alone.scale = packed.scale;
      alone.cu_seqlens = {0, lengths[n]};
      const int64_t bos = packed.cu_seqlens[n], eos = packed.cu_seqlens[n + 1];
      const auto slice = [&](const std::vector<T>& x, int64_t per_token) {
        return std::vector<T>(x.begin() + bos * per_token, x.begin() + eos * per_token);
      };
      const int h = packed.num_heads;
      alone.q = slice(packed.q, h * packed.dk);
      alone.k = slice(packed.k, h * packed.dk);
      alone.g = slice(packed.g, h * packed.dk);
      alone.v = slice(packed.v, h * packed.dv);
      alone.beta = slice(packed.beta, h);
      alone.states = {packed.states[n]};
      const KdaResult<T> single = RunKda(alone, algo);
      // Same code path on the same numbers: bitwise equal.
      EXPECT_TRUE(AllClose(std::span<const T>(slice(batch.out, h * packed.dv)), single.out, 0, 0));
      EXPECT_TRUE(AllClose(std::span<const T>(batch.per_seq[n]), single.states, 0, 0));
    }
    EXPECT_EQ(batch.per_seq[2], packed.states[2]);
  }
  ExpectSameResult(RunKda(packed, Algo::kChunk), RunKda(packed, Algo::kRecurrent),
                   kChunkTolerance<T>);
}

// Tokens [from, to) of a single-sequence problem, starting from `state`.
template <typename T>
KdaProblem<T> Slice(const KdaProblem<T>& p, int64_t from, int64_t to, std::vector<T> state) {
  KdaProblem<T> r;
  r.num_heads = p.num_heads;
  r.dk = p.dk;
  r.dv = p.dv;
  r.scale = p.scale;
  r.cu_seqlens = {0, to - from};
  const auto slice = [&](const std::vector<T>& x, int64_t per_token) {
    return std::vector<T>(x.begin() + from * per_token, x.begin() + to * per_token);
  };
  r.q = slice(p.q, p.num_heads * p.dk);
  r.k = slice(p.k, p.num_heads * p.dk);
  r.g = slice(p.g, p.num_heads * p.dk);
  r.v = slice(p.v, p.num_heads * p.dv);
  r.beta = slice(p.beta, p.num_heads);
  r.states = {std::move(state)};
  return r;
}

// prefill(A) -> state -> prefill(B) == prefill(A + B), for split points on and off chunk
// boundaries.
TYPED_TEST(KdaReferenceTypedTest, SplitChunkThenChunkEqualsOnePass) {
  using T = TypeParam;
  const int64_t total = 200;
  const KdaProblem<T> p = CastProblem<T>(MakeProblem({total}, 2, 64, 48, GateMode::kMild, 11));
  const KdaResult<T> whole = RunKda(p, Algo::kChunk);
  for (int64_t split : {1, 63, 64, 100, 199}) {
    SCOPED_TRACE(::testing::Message() << "split at " << split);
    const KdaResult<T> first = RunKda(Slice(p, 0, split, p.states[0]), Algo::kChunk);
    const KdaResult<T> second = RunKda(Slice(p, split, total, first.states), Algo::kChunk);
    KdaResult<T> joined;
    joined.out = first.out;
    joined.out.insert(joined.out.end(), second.out.begin(), second.out.end());
    joined.states = second.states;
    ExpectSameResult(joined, whole, kChunkTolerance<T>);
  }
}

// prefill(A) with the chunked path, then decode B one token per call with the recurrence.
TYPED_TEST(KdaReferenceTypedTest, SplitChunkThenRecurrentDecodeEqualsOnePass) {
  using T = TypeParam;
  const int64_t total = 137, split = 100;
  const KdaProblem<T> p = CastProblem<T>(MakeProblem({total}, 2, 64, 64, GateMode::kMild, 12));
  const KdaResult<T> whole = RunKda(p, Algo::kChunk);
  KdaResult<T> joined = RunKda(Slice(p, 0, split, p.states[0]), Algo::kChunk);
  for (int64_t t = split; t < total; ++t) {
    const KdaResult<T> step = RunKda(Slice(p, t, t + 1, joined.states), Algo::kRecurrent);
    joined.out.insert(joined.out.end(), step.out.begin(), step.out.end());
    joined.states = step.states;
  }
  ExpectSameResult(joined, whole, kChunkTolerance<T>);
}

// Every (chunk, sub-chunk) tiling gives the same answer, including one sub-chunk per chunk (no
// off-diagonal blocks) and one row per sub-chunk (all anchored).
TYPED_TEST(KdaReferenceTypedTest, ChunkSizeSweepAgrees) {
  using T = TypeParam;
  const KdaProblem<T> p = CastProblem<T>(MakeProblem({300}, 2, 64, 64, GateMode::kMild, 13));
  const KdaResult<T> rec = RunKda(p, Algo::kRecurrent);
  const KdaResult<T> base = RunKda(p, Algo::kChunk, 64, 16);
  ExpectSameResult(base, rec, kChunkTolerance<T>);
  for (auto [chunk, sub] : {std::pair{16, 16}, {32, 16}, {64, 8}, {64, 64}, {32, 1}, {128, 32}}) {
    SCOPED_TRACE(::testing::Message() << "chunk " << chunk << " sub-chunk " << sub);
    const KdaResult<T> r = RunKda(p, Algo::kChunk, chunk, sub);
    ExpectSameResult(r, base, kChunkTolerance<T>);
    ExpectSameResult(r, rec, kChunkTolerance<T>);
  }
}

// The initial state matters (the tests above would not notice a reference that ignored it if
// the state were zero) and the output is not trivially small.
TYPED_TEST(KdaReferenceTypedTest, InitialStateIsUsed) {
  using T = TypeParam;
  KdaProblem<T> p = CastProblem<T>(MakeProblem({70}, 1, 32, 32, GateMode::kMild, 14));
  const KdaResult<T> with_state = RunKda(p, Algo::kChunk);
  for (T& x : p.states[0]) x = 0;
  const KdaResult<T> without_state = RunKda(p, Algo::kChunk);
  EXPECT_GT(::kls::testing::MaxRelativeError(Cast<double>(with_state.out),
                                             Cast<double>(without_state.out)),
            0.1);
  ExpectSameResult(without_state, RunKda(p, Algo::kRecurrent), kChunkTolerance<T>);
}

// chunk_size not a multiple of sub_chunk_size: the output is all NaN, states untouched.
TYPED_TEST(KdaReferenceTypedTest, InvalidChunkSizesPoisonOutput) {
  using T = TypeParam;
  const KdaProblem<T> p = CastProblem<T>(MakeProblem({10}, 1, 8, 8, GateMode::kMild, 15));
  for (auto [chunk, sub] : {std::pair{64, 24}, {0, 16}, {64, 0}}) {
    const KdaResult<T> r = RunKda(p, Algo::kChunk, chunk, sub);
    for (T x : r.out) ASSERT_TRUE(std::isnan(x)) << "chunk " << chunk << " sub " << sub;
    EXPECT_EQ(r.states, Cast<T>(p.states[0]));
  }
}

}  // namespace
}  // namespace kls::kernels

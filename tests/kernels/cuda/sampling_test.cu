// LaunchSampleTokens (kernels/sampling/sampling.cu) against SampleReference (sampling_ref.h),
// draw for draw.
//
// Policy. Greedy rows must match always. A sampled row must match unless the draw is ambiguous:
// an independent full-sort oracle of the README procedure (in the reference's own fp64
// arithmetic) finds u·total, or the top-p running mass, within kAmbiguousMargin (relative) of a
// boundary, where summation order alone may legitimately move the result. Such draws are counted,
// reported, and must stay rare (≤ 1 per 1000 checked + 1); every other draw must be identical.
// A margin of exactly 0 is not exempt: it arises from structural ties (a flat distribution over
// a power-of-two vocabulary meeting top_p = 0.5 exactly), where every sum is exact in any order.
// Designed exact cases (ties, exactly representable masses) must match with no exemption.
//
// Coverage: SamplerUniformPortable bit-exact on host and device; greedy with ties, NaN, ±inf,
// −0/+0, all non-finite; temperature only; top-k; top-p; top-k + top-p; tiny (512) and real
// (163840) vocabularies; B ∈ {1, 3, 19}; mixed configurations in one launch; a row stride with
// poisoned padding; CUDA-graph replay with new counters and configs; zero rows; bad arguments.
// Fixed seeds throughout.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/sampling/sampling.h"
#include "kernels/sampling/sampling_ref.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace kls::kernels {
namespace {

using ::kls::testing::CudaTest;
using ::kls::testing::DeviceBuffer;
using ::kls::testing::Download;
using ::kls::testing::Poison;
using ::kls::testing::Upload;

constexpr int64_t kTinyVocab = 512;
constexpr int64_t kKimiVocab = 163840;
constexpr double kAmbiguousMargin = 1e-10;

// ---------------------------------------------------------------------------------------------
// The oracle: the README procedure with a full stable sort, returning how close the draw came
// to a boundary (relative to the mass it is measured against).

struct OracleDraw {
  int32_t token = 0;
  double margin = INFINITY;  // min relative distance of u·total / the top-p mass to a boundary
  int64_t kept = 0;          // tokens kept after top-k and top-p
  double u = 0.0;
};

OracleDraw Oracle(const float* logits, int64_t vocab, const SamplerConfig& config,
                  uint64_t counter) {
  OracleDraw d;
  d.u = SamplerUniform(config.seed, counter);
  std::vector<int32_t> order;
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isfinite(logits[i])) order.push_back(static_cast<int32_t>(i));
  }
  if (order.empty()) return d;  // token 0
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  if (!(config.temperature > 0.0f)) {
    d.token = order[0];
    d.kept = 1;
    return d;
  }
  double max_logit = logits[order[0]];
  std::vector<double> p(vocab, 0.0);
  double z = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    p[i] = std::isfinite(logits[i])
               ? std::exp((double(logits[i]) - max_logit) / double(config.temperature))
               : 0.0;
    z += p[i];
  }
  for (double& e : p) e /= z;
  int64_t kept = static_cast<int64_t>(order.size());
  if (config.top_k > 0 && config.top_k < vocab) kept = std::min<int64_t>(kept, config.top_k);
  if (config.top_p < 1.0f) {
    double mass = 0.0;
    for (int64_t j = 0; j < kept; ++j) mass += p[order[j]];
    const double threshold = double(config.top_p) * mass;
    double cum = 0.0;
    bool reached = false;
    for (int64_t j = 0; j < kept; ++j) {
      const double before = cum;
      cum += p[order[j]];
      if (cum >= threshold) {
        if (threshold > 0.0) {
          d.margin = std::min(cum - threshold, threshold - before) / mass;
        }
        kept = j + 1;
        reached = true;
        break;
      }
    }
    if (!reached) d.margin = (threshold - cum) / mass;
  }
  d.kept = kept;
  std::vector<int32_t> ids(order.begin(), order.begin() + kept);
  std::sort(ids.begin(), ids.end());
  double total = 0.0;
  for (int32_t id : ids) total += p[id];
  const double target = d.u * total;
  double cum = 0.0;
  int32_t last_positive = ids[0];
  for (int32_t id : ids) {
    if (p[id] <= 0.0) continue;
    const double before = cum;
    cum += p[id];
    last_positive = id;
    if (target < cum) {
      d.token = id;
      d.margin = std::min(d.margin, std::min(target - before, cum - target) / total);
      return d;
    }
  }
  d.token = last_positive;
  d.margin = std::min(d.margin, (target - cum) / total);
  return d;
}

bool IsAmbiguous(const OracleDraw& d) { return d.margin > 0.0 && d.margin < kAmbiguousMargin; }

std::string DescribeConfig(const SamplerConfig& c) {
  std::ostringstream os;
  os << "T=" << c.temperature << " top_p=" << c.top_p << " top_k=" << c.top_k << " seed=" << c.seed;
  return os.str();
}

// Why a draw differs: both tokens' logits and probabilities as the oracle sees them.
std::string DescribeMismatch(const float* logits, int64_t vocab, const SamplerConfig& config,
                             uint64_t counter, int32_t gpu, int32_t ref, const OracleDraw& d) {
  std::ostringstream os;
  os.precision(17);
  os << DescribeConfig(config) << " counter=" << counter << " u=" << d.u << " kept=" << d.kept
     << " margin=" << d.margin << "; reference token " << ref << " (logit "
     << (ref >= 0 && ref < vocab ? logits[ref] : NAN) << "), gpu token " << gpu;
  if (gpu >= 0 && gpu < vocab) {
    os << " (logit " << logits[gpu] << ")";
  } else {
    os << " (out of range)";
  }
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// Logit generators.

enum class Logits { kNormal, kQuantized, kPeaked, kNonFinite, kMostlyNegInf, kFlat, kSignedZero };

const char* LogitsName(Logits kind) {
  switch (kind) {
    case Logits::kNormal:
      return "normal";
    case Logits::kQuantized:
      return "quantized (ties)";
    case Logits::kPeaked:
      return "peaked";
    case Logits::kNonFinite:
      return "with NaN/inf";
    case Logits::kMostlyNegInf:
      return "3 finite";
    case Logits::kFlat:
      return "flat";
    case Logits::kSignedZero:
      return "signed zeros at the max";
  }
  return "?";
}

std::vector<float> MakeLogits(Logits kind, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> x(vocab);
  switch (kind) {
    case Logits::kNormal:
      for (float& v : x) v = 3.0f * normal(rng);
      break;
    case Logits::kQuantized:
      for (float& v : x) v = std::round(4.0f * normal(rng)) / 4.0f;
      break;
    case Logits::kPeaked:
      for (float& v : x) v = normal(rng);
      x[rng() % vocab] = 12.0f;
      x[rng() % vocab] = 10.5f;
      break;
    case Logits::kNonFinite:
      for (float& v : x) v = 2.0f * normal(rng);
      for (int i = 0; i < 8; ++i) x[rng() % vocab] = NAN;
      for (int i = 0; i < 3; ++i) x[rng() % vocab] = INFINITY;
      for (int i = 0; i < 8; ++i) x[rng() % vocab] = -INFINITY;
      x[0] = NAN;
      x[vocab - 1] = INFINITY;
      break;
    case Logits::kMostlyNegInf:
      std::fill(x.begin(), x.end(), -INFINITY);
      x[vocab / 3] = 1.0f;
      x[vocab / 2] = 1.5f;
      x[vocab - 1] = 1.0f;
      break;
    case Logits::kFlat:
      std::fill(x.begin(), x.end(), 0.0f);
      break;
    case Logits::kSignedZero:
      for (float& v : x) v = -std::fabs(normal(rng)) - 0.5f;
      for (int i = 0; i < 6; ++i) x[rng() % vocab] = (i % 2 == 0) ? -0.0f : 0.0f;
      break;
  }
  return x;
}

// Configurations covering each branch; `vocab` makes top_k == vocab (disabled) expressible.
std::vector<SamplerConfig> SampledConfigs(int64_t vocab) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  return {
      {1.0f, 1.0f, 0, 1},                             // temperature only
      {0.7f, 1.0f, 0, 2},                             // lower temperature
      {1.0f, 1.0f, 50, 3},                            // top-k
      {1.0f, 0.9f, 0, 4},                             // top-p
      {0.8f, 0.95f, 40, 5},                           // all three
      {1.3f, 0.5f, 1000, 6},                          // top_k >= 512 (off) or not
      {5.0f, 0.99f, 0, 7},                            // wide nucleus
      {0.05f, 0.8f, 3, 8},                            // peaked by T
      {1e4f, 0.3f, 0, 9},                             // nearly uniform
      {2.0f, 1.0f, 1, 10},                            // top_k = 1 == greedy
      {1.0f, 0.0f, 0, 11},                            // top_p = 0 keeps one token
      {1.0f, -0.5f, 0, 12},                           // negative top_p: one token
      {1.0f, nan, 7, 13},                             // NaN top_p: disabled
      {1.0f, 1.0f, static_cast<int>(vocab), 14},      // top_k == vocab: disabled
      {1.0f, 1.0f, -3, 15},                           // negative top_k: disabled
      {0.9f, 0.6f, static_cast<int>(vocab) - 1, 16},  // top_k just below vocab
  };
}

// ---------------------------------------------------------------------------------------------
// The harness: one launch over `rows` rows, each compared with the reference and the oracle.

struct Stats {
  int64_t checked = 0;
  int64_t ambiguous = 0;
};

// logits [rows, stride] (columns >= vocab are padding the kernel must not read).
void RunAndCompare(const std::vector<float>& logits, int64_t stride, int64_t vocab,
                   const std::vector<SamplerConfig>& configs, const std::vector<uint64_t>& counters,
                   cudaStream_t stream, bool require_exact, Stats* stats, const char* what) {
  const int rows = static_cast<int>(configs.size());
  ASSERT_EQ(counters.size(), configs.size());
  ASSERT_EQ(logits.size(), static_cast<size_t>(rows) * stride);
  DeviceBuffer<float> d_logits;
  DeviceBuffer<SamplerConfig> d_configs;
  DeviceBuffer<uint64_t> d_counters;
  DeviceBuffer<int32_t> d_tokens;
  ASSERT_CUDA_OK(Upload(logits, d_logits));
  ASSERT_CUDA_OK(Upload(configs, d_configs));
  ASSERT_CUDA_OK(Upload(counters, d_counters));
  ASSERT_CUDA_OK(d_tokens.Allocate(rows));
  ASSERT_CUDA_OK(Poison(d_tokens));
  ASSERT_CUDA_OK(LaunchSampleTokens(d_logits.get(), stride, vocab, rows, d_configs.get(),
                                    d_counters.get(), d_tokens.get(), stream));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<int32_t> tokens;
  ASSERT_CUDA_OK(Download(d_tokens, tokens));
  for (int r = 0; r < rows; ++r) {
    const float* row = logits.data() + static_cast<int64_t>(r) * stride;
    const int32_t ref = SampleReference(row, vocab, configs[r], counters[r]);
    const OracleDraw oracle = Oracle(row, vocab, configs[r], counters[r]);
    ++stats->checked;
    const bool ambiguous = !require_exact && IsAmbiguous(oracle);
    if (ambiguous) {
      ++stats->ambiguous;
      continue;
    }
    EXPECT_EQ(oracle.token, ref) << what << " row " << r << ": the oracle disagrees with the "
                                 << "reference: "
                                 << DescribeMismatch(row, vocab, configs[r], counters[r], tokens[r],
                                                     ref, oracle);
    EXPECT_EQ(tokens[r], ref) << what << " row " << r << ": "
                              << DescribeMismatch(row, vocab, configs[r], counters[r], tokens[r],
                                                  ref, oracle);
  }
}

void ExpectFewAmbiguous(const Stats& stats) {
  std::printf("[ sampling ] %lld draws checked, %lld ambiguous (within %.0e of a boundary)\n",
              static_cast<long long>(stats.checked), static_cast<long long>(stats.ambiguous),
              kAmbiguousMargin);
  EXPECT_LE(stats.ambiguous, stats.checked / 1000 + 1)
      << "too many draws near a CDF/top-p boundary: the oracle's margin is suspect";
}

class SamplingTest : public CudaTest {};

// ---------------------------------------------------------------------------------------------
// The uniform.

__global__ void UniformKernel(const uint64_t* seeds, const uint64_t* counters, int n, double* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = SamplerUniformPortable(seeds[i], counters[i]);
}

TEST_F(SamplingTest, UniformIsBitExactOnHostAndDevice) {
  std::vector<uint64_t> seeds = {0, 12345, 0, ~uint64_t{0}, ~uint64_t{0}, 1};
  std::vector<uint64_t> counters = {0, 999, ~uint64_t{0}, 0, ~uint64_t{0}, 1};
  std::mt19937_64 rng(7);
  for (int i = 0; i < 10000; ++i) {
    seeds.push_back(rng());
    counters.push_back(i % 2 == 0 ? rng() : static_cast<uint64_t>(i));
  }
  const int n = static_cast<int>(seeds.size());
  DeviceBuffer<uint64_t> d_seeds, d_counters;
  DeviceBuffer<double> d_out;
  ASSERT_CUDA_OK(Upload(seeds, d_seeds));
  ASSERT_CUDA_OK(Upload(counters, d_counters));
  ASSERT_CUDA_OK(d_out.Allocate(n));
  UniformKernel<<<(n + 255) / 256, 256, 0, stream()>>>(d_seeds.get(), d_counters.get(), n,
                                                       d_out.get());
  ASSERT_CUDA_OK(cudaGetLastError());
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> device;
  ASSERT_CUDA_OK(Download(d_out, device));
  EXPECT_EQ(SamplerUniformPortable(0, 0), 0.6524484863740322);  // README's pinned values
  EXPECT_EQ(SamplerUniformPortable(12345, 999), 0.08677657307815112);
  int64_t mismatches = 0;
  for (int i = 0; i < n; ++i) {
    const double host = SamplerUniform(seeds[i], counters[i]);
    const double portable = SamplerUniformPortable(seeds[i], counters[i]);
    const bool same = std::memcmp(&host, &device[i], sizeof(double)) == 0 &&
                      std::memcmp(&host, &portable, sizeof(double)) == 0;
    if (!same && mismatches++ < 5) {
      ADD_FAILURE() << "seed " << seeds[i] << " counter " << counters[i] << ": reference " << host
                    << ", host port " << portable << ", device " << device[i];
    }
  }
  EXPECT_EQ(mismatches, 0);
}

// ---------------------------------------------------------------------------------------------
// Greedy.

TEST_F(SamplingTest, GreedyDesignedRows) {
  for (int64_t vocab : {int64_t{1}, kTinyVocab, kKimiVocab}) {
    SCOPED_TRACE(::testing::Message() << "vocab " << vocab);
    struct GreedyRow {
      std::vector<float> logits;
      int32_t expected;
      const char* what;
    };
    std::vector<GreedyRow> rows;
    const auto base = [&] { return MakeLogits(Logits::kNormal, vocab, 11); };
    {
      std::vector<float> x = base();
      const int32_t expected =
          static_cast<int32_t>(std::max_element(x.begin(), x.end()) - x.begin());
      rows.push_back({x, expected, "normal"});
    }
    if (vocab > 200) {
      std::vector<float> x = base();
      x[7] = x[3] = x[100] = 50.0f;  // ties: lowest id
      x[0] = NAN;
      x[1] = INFINITY;  // +inf is not a candidate
      x[vocab - 1] = -INFINITY;
      rows.push_back({x, 3, "ties with NaN and inf"});
      std::vector<float> z(vocab, -1.0f);
      z[vocab - 5] = 0.0f;
      z[9] = -0.0f;  // −0 == +0: the lower id wins
      z[vocab - 2] = 0.0f;
      rows.push_back({z, 9, "signed zeros"});
      std::vector<float> last(vocab, -INFINITY);
      last[vocab - 1] = -FLT_MAX;
      rows.push_back({last, static_cast<int32_t>(vocab - 1), "single finite at V-1"});
    }
    rows.push_back({std::vector<float>(vocab, -INFINITY), 0, "all -inf"});
    rows.push_back({std::vector<float>(vocab, NAN), 0, "all NaN"});
    rows.push_back({std::vector<float>(vocab, INFINITY), 0, "all +inf"});

    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (float temperature : {0.0f, -1.0f, nan}) {
      std::vector<float> logits;
      std::vector<SamplerConfig> configs;
      std::vector<uint64_t> counters;
      for (const GreedyRow& row : rows) {
        logits.insert(logits.end(), row.logits.begin(), row.logits.end());
        configs.push_back({temperature, 0.5f, 3, 99});  // top-k/p ignored when greedy
        counters.push_back(configs.size());
      }
      Stats stats;
      ASSERT_NO_FATAL_FAILURE(RunAndCompare(logits, vocab, vocab, configs, counters, stream(),
                                            /*require_exact=*/true, &stats, "greedy"));
      for (size_t r = 0; r < rows.size(); ++r) {
        EXPECT_EQ(SampleReference(rows[r].logits.data(), vocab, configs[r], 0), rows[r].expected)
            << rows[r].what << ": the reference itself";
      }
    }
  }
}

TEST_F(SamplingTest, GreedyRandomRowsB19) {
  for (Logits kind :
       {Logits::kNormal, Logits::kQuantized, Logits::kNonFinite, Logits::kSignedZero}) {
    for (int64_t vocab : {kTinyVocab, kKimiVocab}) {
      SCOPED_TRACE(::testing::Message() << LogitsName(kind) << " vocab " << vocab);
      std::vector<float> logits;
      std::vector<SamplerConfig> configs;
      std::vector<uint64_t> counters;
      for (int r = 0; r < 19; ++r) {
        const std::vector<float> x = MakeLogits(kind, vocab, 200 + r);
        logits.insert(logits.end(), x.begin(), x.end());
        configs.push_back({0.0f, 1.0f, 0, static_cast<uint64_t>(r)});
        counters.push_back(r);
      }
      Stats stats;
      ASSERT_NO_FATAL_FAILURE(RunAndCompare(logits, vocab, vocab, configs, counters, stream(),
                                            /*require_exact=*/true, &stats, "greedy"));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sampling.

// Tiny vocabulary: every logit kind × every configuration, 19 rows (counters) per launch.
TEST_F(SamplingTest, TinyVocabularyAllConfigs) {
  Stats stats;
  const std::vector<SamplerConfig> configs = SampledConfigs(kTinyVocab);
  for (Logits kind : {Logits::kNormal, Logits::kQuantized, Logits::kPeaked, Logits::kNonFinite,
                      Logits::kMostlyNegInf, Logits::kFlat, Logits::kSignedZero}) {
    for (size_t c = 0; c < configs.size(); ++c) {
      for (int launch = 0; launch < 4; ++launch) {
        SCOPED_TRACE(::testing::Message() << LogitsName(kind) << " " << DescribeConfig(configs[c])
                                          << " launch " << launch);
        const int rows = 19;
        std::vector<float> logits;
        std::vector<SamplerConfig> row_configs;
        std::vector<uint64_t> counters;
        const std::vector<float> x = MakeLogits(kind, kTinyVocab, 300 + launch);
        for (int r = 0; r < rows; ++r) {
          logits.insert(logits.end(), x.begin(), x.end());
          SamplerConfig config = configs[c];
          config.seed = config.seed * 1000 + launch;
          row_configs.push_back(config);
          counters.push_back(static_cast<uint64_t>(r) * 7919 + launch);
        }
        ASSERT_NO_FATAL_FAILURE(RunAndCompare(logits, kTinyVocab, kTinyVocab, row_configs, counters,
                                              stream(), false, &stats, "tiny"));
      }
    }
  }
  ExpectFewAmbiguous(stats);
}

// The Kimi vocabulary: B = 3 rows of distinct logits per launch, every configuration.
TEST_F(SamplingTest, KimiVocabularyAllConfigs) {
  Stats stats;
  const std::vector<SamplerConfig> configs = SampledConfigs(kKimiVocab);
  for (Logits kind : {Logits::kNormal, Logits::kQuantized, Logits::kNonFinite}) {
    std::vector<float> logits;
    for (int r = 0; r < 3; ++r) {
      const std::vector<float> x = MakeLogits(kind, kKimiVocab, 400 + r);
      logits.insert(logits.end(), x.begin(), x.end());
    }
    for (const SamplerConfig& config : configs) {
      SCOPED_TRACE(::testing::Message() << LogitsName(kind) << " " << DescribeConfig(config));
      const std::vector<SamplerConfig> row_configs(3, config);
      const std::vector<uint64_t> counters = {0, 1, 977};
      ASSERT_NO_FATAL_FAILURE(RunAndCompare(logits, kKimiVocab, kKimiVocab, row_configs, counters,
                                            stream(), false, &stats, "kimi"));
    }
  }
  ExpectFewAmbiguous(stats);
}

// B = 1 at both vocabulary sizes, many counters (one launch each).
TEST_F(SamplingTest, SingleRowManyCounters) {
  Stats stats;
  for (int64_t vocab : {kTinyVocab, kKimiVocab}) {
    const std::vector<float> x = MakeLogits(Logits::kNormal, vocab, 500);
    for (uint64_t counter = 0; counter < 12; ++counter) {
      const SamplerConfig config{0.9f, 0.92f, 64, 4242};
      SCOPED_TRACE(::testing::Message() << "vocab " << vocab << " counter " << counter);
      ASSERT_NO_FATAL_FAILURE(
          RunAndCompare(x, vocab, vocab, {config}, {counter}, stream(), false, &stats, "B1"));
    }
  }
  ExpectFewAmbiguous(stats);
}

// 19 rows with 19 different configurations (greedy among them), logits kinds and seeds, in one
// launch, with a row stride whose padding holds a huge finite value the kernel must not read.
TEST_F(SamplingTest, MixedBatchWithRowStride) {
  Stats stats;
  for (int64_t vocab : {kTinyVocab, kKimiVocab}) {
    SCOPED_TRACE(::testing::Message() << "vocab " << vocab);
    const int rows = 19;
    const int64_t stride = vocab + 3;
    std::vector<SamplerConfig> configs = SampledConfigs(vocab);
    configs.push_back({0.0f, 1.0f, 0, 0});
    configs.push_back({-1.0f, 0.3f, 5, 0});
    configs.push_back({1.0f, 0.5f, 2, 0});
    configs.resize(rows);
    const Logits kinds[] = {Logits::kNormal, Logits::kQuantized, Logits::kPeaked,
                            Logits::kNonFinite};
    std::vector<float> logits;
    std::vector<uint64_t> counters;
    for (int r = 0; r < rows; ++r) {
      std::vector<float> x = MakeLogits(kinds[r % 4], vocab, 600 + r);
      x.resize(stride, 1e30f);
      logits.insert(logits.end(), x.begin(), x.end());
      counters.push_back(1000 + r);
    }
    ASSERT_NO_FATAL_FAILURE(
        RunAndCompare(logits, stride, vocab, configs, counters, stream(), false, &stats, "mixed"));
  }
  ExpectFewAmbiguous(stats);
}

// Cases built so that both implementations compute every relevant quantity exactly: ties
// straddling the top-k cut, a top-p threshold met with equality by a flat distribution over a
// power-of-two vocabulary, and top-k then top-p inside a tie group. No ambiguity exemption.
TEST_F(SamplingTest, DesignedExactCuts) {
  Stats stats;
  // Five tied maxima, top_k = 3: ids 10, 20, 30 only (the lowest of the tie group).
  std::vector<float> ties(kTinyVocab, -2.0f);
  for (int id : {10, 20, 30, 40, 50}) ties[id] = 1.0f;
  // Flat over 8: p = 1/8 exactly, mass 1, top_p = 0.5 is met exactly after 4 tokens (0..3).
  const std::vector<float> flat8(8, 0.0f);
  for (uint64_t launch = 0; launch < 8; ++launch) {
    std::vector<SamplerConfig> configs;
    std::vector<uint64_t> counters;
    std::vector<float> logits;
    for (int r = 0; r < 16; ++r) {
      logits.insert(logits.end(), ties.begin(), ties.end());
      configs.push_back({r % 2 == 0 ? 1.0f : 1e-3f, 1.0f, 3, 77 + launch});
      counters.push_back(launch * 100 + r);
    }
    ASSERT_NO_FATAL_FAILURE(RunAndCompare(logits, kTinyVocab, kTinyVocab, configs, counters,
                                          stream(), true, &stats, "tied top-k"));
    logits.clear();
    configs.clear();
    for (int r = 0; r < 16; ++r) {
      logits.insert(logits.end(), flat8.begin(), flat8.end());
      // 0.5: exact equality; 0.25 with top_k 5: two of the five lowest ids.
      configs.push_back(r % 2 == 0 ? SamplerConfig{1.0f, 0.5f, 0, 5 + launch}
                                   : SamplerConfig{1.0f, 0.25f, 5, 6 + launch});
    }
    ASSERT_NO_FATAL_FAILURE(
        RunAndCompare(logits, 8, 8, configs, counters, stream(), true, &stats, "flat top-p"));
  }
  // The kept sets are what the procedure says (checked on the reference: the GPU matched it).
  for (uint64_t c = 0; c < 200; ++c) {
    const int32_t t = SampleReference(ties.data(), kTinyVocab, {1.0f, 1.0f, 3, 1}, c);
    EXPECT_TRUE(t == 10 || t == 20 || t == 30) << t;
    EXPECT_LT(SampleReference(flat8.data(), 8, {1.0f, 0.5f, 0, 2}, c), 4);
    EXPECT_LT(SampleReference(flat8.data(), 8, {1.0f, 0.25f, 5, 3}, c), 2);
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA graphs.

// One captured launch replays with new counters and new configurations written into the same
// device buffers.
TEST_F(SamplingTest, GraphReplayReadsNewCountersAndConfigs) {
  const int rows = 3;
  const int64_t vocab = kTinyVocab;
  std::vector<float> logits;
  for (int r = 0; r < rows; ++r) {
    const std::vector<float> x = MakeLogits(Logits::kNormal, vocab, 700 + r);
    logits.insert(logits.end(), x.begin(), x.end());
  }
  DeviceBuffer<float> d_logits;
  DeviceBuffer<SamplerConfig> d_configs;
  DeviceBuffer<uint64_t> d_counters;
  DeviceBuffer<int32_t> d_tokens;
  ASSERT_CUDA_OK(Upload(logits, d_logits));
  ASSERT_CUDA_OK(d_configs.Allocate(rows));
  ASSERT_CUDA_OK(d_counters.Allocate(rows));
  ASSERT_CUDA_OK(d_tokens.Allocate(rows));

  cudaGraph_t graph = nullptr;
  ASSERT_CUDA_OK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeGlobal));
  const cudaError_t launch = LaunchSampleTokens(d_logits.get(), vocab, vocab, rows, d_configs.get(),
                                                d_counters.get(), d_tokens.get(), stream());
  ASSERT_CUDA_OK(cudaStreamEndCapture(stream(), &graph));
  ASSERT_CUDA_OK(launch);
  cudaGraphExec_t exec = nullptr;
  ASSERT_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));

  Stats stats;
  const std::vector<SamplerConfig> all = SampledConfigs(vocab);
  int64_t distinct_draws = 0;
  std::vector<int32_t> previous;
  for (uint64_t step = 0; step < 24; ++step) {
    std::vector<SamplerConfig> configs(rows);
    std::vector<uint64_t> counters(rows);
    for (int r = 0; r < rows; ++r) {
      configs[r] = step < 12 ? SamplerConfig{1.0f, 1.0f, 0, 31337} : all[(step + r) % all.size()];
      counters[r] = step * 10 + r;  // a decode loop advancing each row's counter
    }
    ASSERT_CUDA_OK(
        cudaMemcpy(d_configs.get(), configs.data(), d_configs.bytes(), cudaMemcpyHostToDevice));
    ASSERT_CUDA_OK(
        cudaMemcpy(d_counters.get(), counters.data(), d_counters.bytes(), cudaMemcpyHostToDevice));
    ASSERT_CUDA_OK(Poison(d_tokens));
    ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    std::vector<int32_t> tokens;
    ASSERT_CUDA_OK(Download(d_tokens, tokens));
    for (int r = 0; r < rows; ++r) {
      const float* row = logits.data() + r * vocab;
      const int32_t ref = SampleReference(row, vocab, configs[r], counters[r]);
      const OracleDraw oracle = Oracle(row, vocab, configs[r], counters[r]);
      ++stats.checked;
      if (IsAmbiguous(oracle)) {
        ++stats.ambiguous;
        continue;
      }
      EXPECT_EQ(tokens[r], ref) << "step " << step << " row " << r << ": "
                                << DescribeMismatch(row, vocab, configs[r], counters[r], tokens[r],
                                                    ref, oracle);
    }
    if (!previous.empty() && tokens != previous) ++distinct_draws;
    previous = tokens;
  }
  EXPECT_GT(distinct_draws, 10) << "replays did not pick up the new counters";
  ExpectFewAmbiguous(stats);
  EXPECT_CUDA_OK(cudaGraphExecDestroy(exec));
  EXPECT_CUDA_OK(cudaGraphDestroy(graph));
}

// ---------------------------------------------------------------------------------------------
// Arguments.

TEST_F(SamplingTest, ZeroRowsIsANoOp) {
  EXPECT_EQ(LaunchSampleTokens(nullptr, 8, 8, 0, nullptr, nullptr, nullptr, stream()), cudaSuccess);
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
}

TEST_F(SamplingTest, RejectsBadArguments) {
  DeviceBuffer<float> logits;
  DeviceBuffer<SamplerConfig> configs;
  DeviceBuffer<uint64_t> counters;
  DeviceBuffer<int32_t> tokens;
  ASSERT_CUDA_OK(logits.Allocate(64));
  ASSERT_CUDA_OK(configs.Allocate(2));
  ASSERT_CUDA_OK(counters.Allocate(2));
  ASSERT_CUDA_OK(tokens.Allocate(2));
  const cudaStream_t s = stream();
  constexpr cudaError_t kBad = cudaErrorInvalidValue;
  float* l = logits.get();
  SamplerConfig* c = configs.get();
  uint64_t* n = counters.get();
  int32_t* t = tokens.get();
  EXPECT_EQ(LaunchSampleTokens(l, 32, 32, -1, c, n, t, s), kBad) << "rows -1";
  EXPECT_EQ(LaunchSampleTokens(l, 32, 0, 2, c, n, t, s), kBad) << "vocab 0";
  EXPECT_EQ(LaunchSampleTokens(l, int64_t{1} << 32, (int64_t{1} << 30) + 1, 2, c, n, t, s), kBad)
      << "vocab 2^30 + 1";
  EXPECT_EQ(LaunchSampleTokens(l, 31, 32, 2, c, n, t, s), kBad) << "stride < vocab";
  EXPECT_EQ(LaunchSampleTokens(nullptr, 32, 32, 2, c, n, t, s), kBad) << "null logits";
  EXPECT_EQ(LaunchSampleTokens(l, 32, 32, 2, nullptr, n, t, s), kBad) << "null configs";
  EXPECT_EQ(LaunchSampleTokens(l, 32, 32, 2, c, nullptr, t, s), kBad) << "null counters";
  EXPECT_EQ(LaunchSampleTokens(l, 32, 32, 2, c, n, nullptr, s), kBad) << "null tokens";
  ASSERT_CUDA_OK(cudaStreamSynchronize(s));
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace kls::kernels

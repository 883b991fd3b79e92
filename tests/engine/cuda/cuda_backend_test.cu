// The CUDA backend against the CPU backend (the fp32 reference), on the tiny model and on a
// mid-size random model (hidden 1024, 8 layers, 16 experts); split prefill, mixed batches,
// forks, checkpoints, CUDA graphs, snapshots moving between backends, and memory exhaustion.
//
// How close a bf16 engine can come to an fp32 reference end to end depends on how much the
// model amplifies rounding, so every end-to-end bound is the issue's bound (logits 2e-2, states
// 5e-3) or twice the distance of a yardstick to the reference, whichever is larger. The yardstick
// is the CPU backend with bf16 activations (CpuBackendOptions::bf16_activations): an engine that
// rounds exactly what the GPU stores in bf16 and computes everything else in fp32, i.e. the best a
// bf16 engine can do, except that it keeps the absorbed MLA decode's latent query and output in
// fp32 where the GPU stores them in bf16, which makes the decode bound slightly stricter. The
// first KDA layer's recurrent state is held to the issue's state bound without a yardstick: its
// input is the embeddings, so no upstream layer amplifies the first layer's differences.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend/cpu/cpu_backend.h"
#include "engine/backend/cuda/cuda_backend.h"
#include "tests/engine/tiny_model.h"
#include "tests/test_util.h"

namespace kls::engine {
namespace {

constexpr double kLogitsBound = 2e-2;  // the issue's bound: bf16 GPU vs fp32 CPU
constexpr double kStateBound = 5e-3;
// A bf16 engine may be up to this much further from the fp32 reference than the yardstick.
constexpr double kYardstickFactor = 2.0;
constexpr int kSteps = 32;

// The agreement models hold bf16 weights, as released checkpoints do, so the CPU reference
// computes on exactly the weights the GPU holds and the comparison measures the GPU's
// arithmetic, not weight rounding. `residual_scale` is MakeModelOptions::residual_scale.
const LoadedModel& Bf16Model(const char* preset, uint64_t seed, double residual_scale = 1.0) {
  static auto* models = new std::map<std::string, const LoadedModel*>();
  const LoadedModel*& model = (*models)[absl::StrCat(preset, "/", seed, "/", residual_scale)];
  if (model == nullptr) {
    absl::StatusOr<LoadedModel> m = LoadModel(::kls::testing::WriteModel(
        preset, seed, DType::kBF16, /*max_shard_bytes=*/0, residual_scale));
    EXPECT_TRUE(m.ok()) << m.status();
    model = new LoadedModel(*std::move(m));
  }
  return *model;
}

// Relative RMS error ||a − e||₂ / ||e||₂ (KIMI_LINEAR.md §9.2's measure).
double RelativeRms(std::span<const float> a, std::span<const float> e) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - e[i]) * (double(a[i]) - e[i]);
    den += double(e[i]) * e[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

::testing::AssertionResult RmsBelow(std::span<const float> a, std::span<const float> e,
                                    double bound) {
  if (a.size() != e.size()) return ::testing::AssertionFailure() << "sizes differ";
  for (float x : a) {
    if (!std::isfinite(x)) return ::testing::AssertionFailure() << "non-finite value";
  }
  const double r = RelativeRms(a, e);
  if (r <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "relative RMS error " << r << " > " << bound;
}

class CudaBackendTest : public ::testing::Test {
 public:
  void SetUp() override {
    int devices = 0;
    ASSERT_EQ(cudaGetDeviceCount(&devices), cudaSuccess)
        << "no CUDA device: GPU tests must run on one";
    ASSERT_GT(devices, 0);
  }

  static std::unique_ptr<CudaBackend> MakeCuda(const ModelWeights& weights,
                                               CudaBackendOptions options = {}) {
    if (options.state_memory_bytes == 0) options.state_memory_bytes = int64_t{3} << 30;
    if (options.max_sessions == CudaBackendOptions{}.max_sessions) options.max_sessions = 8;
    options.max_step_tokens = 2048;
    options.max_step_seqs = 32;
    absl::StatusOr<cuda::DeviceWeights> device = cuda::DeviceWeights::FromHost(weights, nullptr);
    EXPECT_TRUE(device.ok()) << device.status();
    if (!device.ok()) return nullptr;
    absl::StatusOr<std::unique_ptr<CudaBackend>> backend =
        CudaBackend::Create(*std::move(device), options);
    EXPECT_TRUE(backend.ok()) << backend.status();
    return backend.ok() ? *std::move(backend) : nullptr;
  }

  static std::unique_ptr<CpuBackend> MakeCpu(std::shared_ptr<const ModelWeights> weights,
                                             CpuBackendOptions options = {}) {
    absl::StatusOr<std::unique_ptr<CpuBackend>> backend =
        CpuBackend::Create(std::move(weights), options);
    EXPECT_TRUE(backend.ok()) << backend.status();
    return *std::move(backend);
  }
};

std::vector<int32_t> RandomTokens(int n, uint32_t seed, int vocab) {
  std::mt19937 rng(seed);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
  return ids;
}

std::unique_ptr<BackendState> New(Backend& b) {
  absl::StatusOr<std::unique_ptr<BackendState>> s = b.NewState();
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *std::move(s) : nullptr;
}

std::vector<float> Feed(Backend& b, BackendState* state, const std::vector<int32_t>& tokens) {
  std::vector<float> logits(b.config().vocab_size);
  SequenceInput in{tokens, state};
  absl::Status s = b.Forward({&in, 1}, logits);
  EXPECT_TRUE(s.ok()) << s;
  return logits;
}

SessionState Export(Backend& b, const BackendState& state) {
  SessionState host;
  absl::Status s = b.ExportState(state, 0, &host);
  EXPECT_TRUE(s.ok()) << s;
  return host;
}

int32_t Argmax(const std::vector<float>& logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// Each state tensor of `gpu` within max(kStateBound, 2 × the same tensor's distance between
// `yard_a` and `yard_b`) of `ref` (relative RMS). Without a yardstick (nullptr) the bound is
// kStateBound. The first KDA layer's recurrent state is always held to kStateBound.
void ExpectStatesClose(const SessionState& gpu, const SessionState& ref,
                       const SessionState* yard_a = nullptr, const SessionState* yard_b = nullptr) {
  ASSERT_EQ(gpu.num_tokens(), ref.num_tokens());
  auto check = [&](std::span<const float> g, std::span<const float> r, double yard,
                   const std::string& what) {
    const double bound = std::max(kStateBound, kYardstickFactor * yard);
    EXPECT_TRUE(RmsBelow(g, r, bound)) << what << " (yardstick " << yard << ", max-normwise "
                                       << ::kls::testing::MaxRelativeError(g, r) << ")";
  };
  for (size_t l = 0; l < ref.kda().size(); ++l) {
    double yard_s = 0, yard_c = 0;
    if (yard_a != nullptr) {
      if (l > 0) yard_s = RelativeRms(yard_a->kda()[l].recurrent, yard_b->kda()[l].recurrent);
      yard_c = RelativeRms(yard_a->kda()[l].conv, yard_b->kda()[l].conv);
    }
    check(gpu.kda()[l].recurrent, ref.kda()[l].recurrent, yard_s,
          absl::StrCat("KDA state of KDA layer ", l));
    check(gpu.kda()[l].conv, ref.kda()[l].conv, yard_c,
          absl::StrCat("conv state of KDA layer ", l));
  }
  for (size_t l = 0; l < ref.mla().size(); ++l) {
    const double yard =
        yard_a != nullptr ? RelativeRms(yard_a->mla()[l].latent, yard_b->mla()[l].latent) : 0;
    check(gpu.mla()[l].latent, ref.mla()[l].latent, yard,
          absl::StrCat("MLA cache of MLA layer ", l));
  }
}

// The largest relative RMS distance between two states' KDA states.
double WorstKdaStateDistance(const SessionState& a, const SessionState& b) {
  double worst = 0;
  for (size_t l = 0; l < a.kda().size(); ++l)
    worst = std::max(worst, RelativeRms(a.kda()[l].recurrent, b.kda()[l].recurrent));
  return worst;
}

// Whether `token` is among the two largest of `logits`.
bool InTopTwo(const std::vector<float>& logits, int32_t token) {
  int larger = 0;
  for (float x : logits) larger += x > logits[token] ? 1 : 0;
  return larger < 2;
}

// The relative RMS distance of every state tensor (KDA states, conv states, MLA caches, in
// that order) between two states.
std::vector<double> StateDistances(const SessionState& a, const SessionState& b) {
  std::vector<double> d;
  for (size_t l = 0; l < a.kda().size(); ++l)
    d.push_back(RelativeRms(a.kda()[l].recurrent, b.kda()[l].recurrent));
  for (size_t l = 0; l < a.kda().size(); ++l)
    d.push_back(RelativeRms(a.kda()[l].conv, b.kda()[l].conv));
  for (size_t l = 0; l < a.mla().size(); ++l)
    d.push_back(RelativeRms(a.mla()[l].latent, b.mla()[l].latent));
  return d;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// One prompt's distances to the fp32 CPU: the GPU's and the yardstick's.
struct PromptResult {
  double prefill = 0, prefill_yard = 0;     // prefill logits
  std::vector<double> states, states_yard;  // StateDistances after the prefill
  int steps_within = 0;   // decode steps with logits within max(kLogitsBound, 2 × yardstick)
  int steps_same = 0;     // decode steps whose GPU greedy token is the reference's
  int steps_top_two = 0;  // ... or at least among the reference's two largest logits
  bool same = true, yard_same = true;  // greedy tokens equal on every step
};

// Prefill + kSteps greedy decode steps on the GPU, the fp32 CPU reference and the yardstick
// (bf16-activation CPU), all fed the reference's greedy token so that a divergence does not
// cascade into the comparison.
PromptResult CompareRun(const LoadedModel& model, CudaBackend& gpu, int prompt_len, uint32_t seed) {
  CpuBackendOptions bf16_options;
  bf16_options.bf16_activations = true;
  auto ref = CudaBackendTest::MakeCpu(model.weights);
  auto yard = CudaBackendTest::MakeCpu(model.weights, bf16_options);
  const int vocab = static_cast<int>(std::min<int64_t>(model.weights->config.vocab_size, 256));
  const std::vector<int32_t> prompt = RandomTokens(prompt_len, seed, vocab);
  auto gs = New(gpu);
  auto rs = New(*ref);
  auto ys = New(*yard);
  std::vector<float> gl = Feed(gpu, gs.get(), prompt);
  std::vector<float> rl = Feed(*ref, rs.get(), prompt);
  std::vector<float> yl = Feed(*yard, ys.get(), prompt);
  EXPECT_TRUE(::kls::testing::AllFinite(gl));
  PromptResult r;
  r.prefill = RelativeRms(gl, rl);
  r.prefill_yard = RelativeRms(yl, rl);
  const SessionState r_state = Export(*ref, *rs), g_state = Export(gpu, *gs);
  for (const KdaLayerState& layer : g_state.kda()) {
    EXPECT_TRUE(::kls::testing::AllFinite(layer.recurrent) && ::kls::testing::AllFinite(layer.conv))
        << "seed " << seed;
  }
  for (const MlaLayerState& layer : g_state.mla())
    EXPECT_TRUE(::kls::testing::AllFinite(layer.latent)) << "seed " << seed;
  r.states = StateDistances(g_state, r_state);
  r.states_yard = StateDistances(Export(*yard, *ys), r_state);
  std::vector<double> errors, yard_errors;
  for (int step = 0; step < kSteps; ++step) {
    const int32_t token = Argmax(rl);
    r.steps_same += Argmax(gl) == token ? 1 : 0;
    r.steps_top_two += InTopTwo(rl, Argmax(gl)) ? 1 : 0;
    r.same = r.same && Argmax(gl) == token;
    r.yard_same = r.yard_same && Argmax(yl) == token;
    gl = Feed(gpu, gs.get(), {token});
    rl = Feed(*ref, rs.get(), {token});
    yl = Feed(*yard, ys.get(), {token});
    errors.push_back(RelativeRms(gl, rl));
    yard_errors.push_back(RelativeRms(yl, rl));
    r.steps_within +=
        errors.back() <= std::max(kLogitsBound, kYardstickFactor * yard_errors.back());
  }
  std::printf(
      "  prompt %3d tokens, GPU | yardstick vs fp32 CPU: prefill logits %.2e | %.2e, worst "
      "state %.2e | %.2e, decode logits median %.2e | %.2e, max %.2e | %.2e, greedy %s | %s\n",
      prompt_len, r.prefill, r.prefill_yard, *std::max_element(r.states.begin(), r.states.end()),
      *std::max_element(r.states_yard.begin(), r.states_yard.end()), Median(errors),
      Median(yard_errors), *std::max_element(errors.begin(), errors.end()),
      *std::max_element(yard_errors.begin(), yard_errors.end()), r.same ? "same" : "differs",
      r.yard_same ? "same" : "differs");
  return r;
}

// Bounds, over the prompts: the median prefill-logits distance and, tensor by tensor, the median
// state distance within the file comment's bounds (medians, because a prompt on which a token's
// top-k expert choice flips in some layer jumps, in the GPU and in the yardstick alike); decode
// logits within max(kLogitsBound, 2 × yardstick) on ≥ 90% of the steps; the GPU's greedy token
// equal to the reference's on ≥ 90% of the steps and among its top two (vLLM's closeness
// criterion) on ≥ 97%. The issue's "same greedy tokens for 32 steps on most prompts" is up to
// the model on random weights with flat logits (the yardstick misses it too), so the fractions
// of prompts are printed for the GPU and the yardstick.
void AgreementOn(const LoadedModel& model, const char* name, int prompts) {
  auto gpu = CudaBackendTest::MakeCuda(*model.weights);
  ASSERT_NE(gpu, nullptr);
  std::vector<PromptResult> results;
  for (int i = 1; i <= prompts; ++i) {
    results.push_back(CompareRun(model, *gpu, 5 + 23 * i, static_cast<uint32_t>(i)));
  }
  std::vector<double> prefill, prefill_yard;
  int within = 0, same = 0, top_two = 0, agreed = 0, yard_agreed = 0;
  for (const PromptResult& r : results) {
    prefill.push_back(r.prefill);
    prefill_yard.push_back(r.prefill_yard);
    within += r.steps_within;
    same += r.steps_same;
    top_two += r.steps_top_two;
    agreed += r.same ? 1 : 0;
    yard_agreed += r.yard_same ? 1 : 0;
  }
  const int steps = prompts * kSteps;
  std::printf(
      "[ %s ] median prefill logits %.2e (yardstick %.2e); decode steps: logits within bound "
      "%d/%d, greedy token the reference's %d/%d, in its top two %d/%d; same greedy tokens for "
      "%d steps on %d of %d prompts (yardstick %d)\n",
      name, Median(prefill), Median(prefill_yard), within, steps, same, steps, top_two, steps,
      kSteps, agreed, prompts, yard_agreed);
  // The premise: on these models bf16 storage itself stays within the issue's logits bound, so
  // the yardstick cannot stretch the bounds to where nothing fails.
  EXPECT_LE(Median(prefill_yard), kLogitsBound);
  EXPECT_LE(Median(prefill), std::max(kLogitsBound, kYardstickFactor * Median(prefill_yard)));
  const ModelConfig& c = model.weights->config;
  for (size_t t = 0; t < results[0].states.size(); ++t) {
    std::vector<double> g, y;
    for (const PromptResult& r : results) {
      g.push_back(r.states[t]);
      y.push_back(r.states_yard[t]);
    }
    // Tensor 0, the first KDA layer's recurrent state: no yardstick (see the file comment).
    const double bound = t == 0 ? kStateBound : std::max(kStateBound, kYardstickFactor * Median(y));
    const size_t kda = static_cast<size_t>(c.num_kda_layers());
    const std::string what = t < kda       ? absl::StrCat("KDA state of KDA layer ", t)
                             : t < 2 * kda ? absl::StrCat("conv state of KDA layer ", t - kda)
                                           : absl::StrCat("MLA cache of MLA layer ", t - 2 * kda);
    EXPECT_LE(Median(g), bound) << what << " (yardstick " << Median(y) << ")";
  }
  EXPECT_GE(within * 10, steps * 9);
  EXPECT_GE(same * 10, steps * 9);
  EXPECT_GE(top_two * 100, steps * 97);
}

// 1/√(2·8): GPT-2's scaled init for the 8-layer tiny and mid presets. At make-model's default
// (1) each layer's update is as large as the residual stream and rounding differences grow
// tenfold and more over the 8 layers: on the unscaled tiny model the GPU measured up to 0.47
// (prefill logits) and 0.50 (KDA states) from the fp32 CPU, and the yardstick was as far.
constexpr double kScaledInit = 0.25;

TEST_F(CudaBackendTest, AgreesWithCpuOnTinyModel) {
  AgreementOn(Bf16Model("tiny", 7, kScaledInit), "tiny", 8);
}

TEST_F(CudaBackendTest, AgreesWithCpuOnMidModel) {
  AgreementOn(Bf16Model("mid", 11, kScaledInit), "mid", 4);
}

// Prefill in pieces (chunked prefill over a cached context) equals one prefill, within the
// distance bf16 storage itself makes (the yardstick against the fp32 CPU on the same prompt):
// different chunk boundaries round different intermediates.
TEST_F(CudaBackendTest, SplitPrefillEqualsOnePrefill) {
  const LoadedModel& model = Bf16Model("tiny", 7, kScaledInit);
  auto gpu = MakeCuda(*model.weights);
  ASSERT_NE(gpu, nullptr);
  const std::vector<int32_t> prompt = RandomTokens(300, 5, 256);
  auto whole = New(*gpu);
  const std::vector<float> one = Feed(*gpu, whole.get(), prompt);
  auto split = New(*gpu);
  std::vector<float> last;
  for (auto [from, to] :
       {std::pair{0, 17}, std::pair{17, 18}, std::pair{18, 200}, std::pair{200, 300}}) {
    last =
        Feed(*gpu, split.get(), std::vector<int32_t>(prompt.begin() + from, prompt.begin() + to));
  }
  CpuBackendOptions bf16_options;
  bf16_options.bf16_activations = true;
  auto ref = MakeCpu(model.weights);
  auto yard = MakeCpu(model.weights, bf16_options);
  auto rs = New(*ref);
  auto ys = New(*yard);
  const std::vector<float> rl = Feed(*ref, rs.get(), prompt);
  const std::vector<float> yl = Feed(*yard, ys.get(), prompt);
  const double yard_logits = RelativeRms(yl, rl);
  EXPECT_TRUE(RmsBelow(last, one, std::max(kLogitsBound, kYardstickFactor * yard_logits)))
      << "yardstick " << yard_logits;
  const SessionState r_state = Export(*ref, *rs), y_state = Export(*yard, *ys);
  const SessionState split_state = Export(*gpu, *split), whole_state = Export(*gpu, *whole);
  std::printf("  split vs one prefill: logits %.2e, worst KDA state %.2e; yardstick %.2e, %.2e\n",
              RelativeRms(last, one), WorstKdaStateDistance(split_state, whole_state), yard_logits,
              WorstKdaStateDistance(y_state, r_state));
  ExpectStatesClose(split_state, whole_state, &y_state, &r_state);
}

// The states of the yardstick pair for one sequence fed `chunks` in turn (one Forward each): the
// CPU backend in fp32 and with bf16 activations. Between two GPU runs that round differently
// (other chunk boundaries, other GEMM kernels) states may differ as much as bf16 rounding itself
// makes them differ, which ExpectStatesClose's yardstick bound allows.
struct YardstickStates {
  SessionState fp32, bf16;
};

YardstickStates YardstickAfter(const LoadedModel& model,
                               const std::vector<std::vector<int32_t>>& chunks) {
  CpuBackendOptions bf16_options;
  bf16_options.bf16_activations = true;
  auto ref = CudaBackendTest::MakeCpu(model.weights);
  auto yard = CudaBackendTest::MakeCpu(model.weights, bf16_options);
  auto rs = New(*ref);
  auto ys = New(*yard);
  for (const std::vector<int32_t>& chunk : chunks) {
    Feed(*ref, rs.get(), chunk);
    Feed(*yard, ys.get(), chunk);
  }
  return {Export(*ref, *rs), Export(*yard, *ys)};
}

// One step carrying decode tokens and prefill chunks of several sessions equals each alone. The
// mixed step (27 rows) runs its projections through cuBLASLt and a lone decode step (1 row)
// through the skinny GEMM, which sum in different orders, so states get the yardstick bound (as
// for split prefill) on the scaled-init model, whose layers do not amplify rounding tenfold.
TEST_F(CudaBackendTest, MixedBatchEqualsSeparateSteps) {
  const LoadedModel& model = Bf16Model("tiny", 7, kScaledInit);
  auto gpu = MakeCuda(*model.weights);
  ASSERT_NE(gpu, nullptr);
  const int vocab = static_cast<int>(model.weights->config.vocab_size);
  std::vector<std::unique_ptr<BackendState>> batched, alone;
  std::vector<std::vector<int32_t>> history = {RandomTokens(40, 1, 256), RandomTokens(3, 2, 256),
                                               RandomTokens(70, 3, 256)};
  for (const auto& h : history) {
    batched.push_back(New(*gpu));
    alone.push_back(New(*gpu));
    Feed(*gpu, batched.back().get(), h);
    Feed(*gpu, alone.back().get(), h);
  }
  const std::vector<std::vector<int32_t>> step = {{7}, RandomTokens(25, 4, 256), {9}};
  std::vector<SequenceInput> inputs;
  for (size_t i = 0; i < step.size(); ++i) inputs.push_back({step[i], batched[i].get()});
  std::vector<float> logits(step.size() * vocab);
  ASSERT_TRUE(gpu->Forward(inputs, logits).ok());
  for (size_t i = 0; i < step.size(); ++i) {
    const std::vector<float> single = Feed(*gpu, alone[i].get(), step[i]);
    EXPECT_TRUE(
        RmsBelow(std::vector<float>(logits.begin() + i * vocab, logits.begin() + (i + 1) * vocab),
                 single, kLogitsBound))
        << "sequence " << i;
    const YardstickStates yard = YardstickAfter(model, {history[i], step[i]});
    ExpectStatesClose(Export(*gpu, *batched[i]), Export(*gpu, *alone[i]), &yard.bf16, &yard.fp32);
  }
}

// Decode steps through the skinny GEMM (the default for steps of <= 8 rows) and through
// cuBLASLt (skinny_gemm_max_rows = 0) agree over several graph-captured steps of a lone sequence
// and a batch of 3: logits within the issue's bound, states within the yardstick bound (the two
// kernels sum in different orders).
TEST_F(CudaBackendTest, SkinnyAndCublasLtProjectionsAgree) {
  const LoadedModel& model = Bf16Model("tiny", 7, kScaledInit);
  CudaBackendOptions cublaslt_options;
  cublaslt_options.skinny_gemm_max_rows = 0;
  auto skinny = MakeCuda(*model.weights);
  auto cublaslt = MakeCuda(*model.weights, cublaslt_options);
  ASSERT_NE(skinny, nullptr);
  ASSERT_NE(cublaslt, nullptr);
  const int vocab = static_cast<int>(model.weights->config.vocab_size);
  for (int n : {1, 3}) {
    std::vector<std::unique_ptr<BackendState>> a, b;
    std::vector<std::vector<std::vector<int32_t>>> fed(n);  // per sequence, per Forward
    for (int i = 0; i < n; ++i) {
      a.push_back(New(*skinny));
      b.push_back(New(*cublaslt));
      fed[i].push_back(RandomTokens(30 + 11 * i, 60 + i, 256));
      Feed(*skinny, a.back().get(), fed[i].back());
      Feed(*cublaslt, b.back().get(), fed[i].back());
    }
    for (int step = 0; step < 4; ++step) {
      std::vector<int32_t> tokens(n);
      std::vector<SequenceInput> ia, ib;
      for (int i = 0; i < n; ++i) {
        tokens[i] = 5 + 17 * step + i;
        fed[i].push_back({tokens[i]});
        ia.push_back({std::span<const int32_t>(&tokens[i], 1), a[i].get()});
        ib.push_back({std::span<const int32_t>(&tokens[i], 1), b[i].get()});
      }
      std::vector<float> la(static_cast<size_t>(n) * vocab), lb(la.size());
      ASSERT_TRUE(skinny->Forward(ia, la).ok());
      ASSERT_TRUE(cublaslt->Forward(ib, lb).ok());
      EXPECT_TRUE(RmsBelow(la, lb, kLogitsBound)) << "batch " << n << ", step " << step;
    }
    for (int i = 0; i < n; ++i) {
      const YardstickStates yard = YardstickAfter(model, fed[i]);
      ExpectStatesClose(Export(*skinny, *a[i]), Export(*cublaslt, *b[i]), &yard.bf16, &yard.fp32);
    }
  }
  EXPECT_EQ(skinny->graphs_captured(), 2);
}

// Decode batches of every size up to the step limit run (the MLA decode workspace is sized for
// each batch size's split count) and each sequence's logits match a step of its own.
TEST_F(CudaBackendTest, DecodeBatchesOfEverySize) {
  const LoadedModel& model = ::kls::testing::TinyModel();
  CudaBackendOptions options;
  options.max_sessions = 32;  // 64 slots: 32 sessions batched and 32 alone
  auto gpu = MakeCuda(*model.weights, options);
  ASSERT_NE(gpu, nullptr);
  const int vocab = static_cast<int>(model.weights->config.vocab_size);
  for (int n = 1; n <= 32; n += (n < 4 ? 1 : 7)) {
    std::vector<std::unique_ptr<BackendState>> together, alone;
    for (int i = 0; i < n; ++i) {
      const std::vector<int32_t> prompt = RandomTokens(5 + 13 * i, 40 + i, 256);
      together.push_back(New(*gpu));
      alone.push_back(New(*gpu));
      Feed(*gpu, together.back().get(), prompt);
      Feed(*gpu, alone.back().get(), prompt);
      if (HasFatalFailure()) return;
    }
    std::vector<int32_t> tokens(n);
    for (int i = 0; i < n; ++i) tokens[i] = 3 + i;
    std::vector<SequenceInput> inputs;
    for (int i = 0; i < n; ++i)
      inputs.push_back({std::span<const int32_t>(&tokens[i], 1), together[i].get()});
    std::vector<float> logits(static_cast<size_t>(n) * vocab);
    const absl::Status s = gpu->Forward(inputs, logits);
    ASSERT_TRUE(s.ok()) << "batch of " << n << ": " << s;
    for (int i = 0; i < n; ++i) {
      const std::vector<float> single = Feed(*gpu, alone[i].get(), {tokens[i]});
      EXPECT_TRUE(
          RmsBelow(std::vector<float>(logits.begin() + i * vocab, logits.begin() + (i + 1) * vocab),
                   single, kLogitsBound))
          << "batch of " << n << ", sequence " << i;
    }
  }
}

// Decode steps replayed from CUDA graphs give the same bits as eager steps.
TEST_F(CudaBackendTest, GraphReplayEqualsEagerSteps) {
  const LoadedModel& model = ::kls::testing::TinyModel();
  CudaBackendOptions eager_options;
  eager_options.cuda_graphs = false;
  auto graphed = MakeCuda(*model.weights);
  auto eager = MakeCuda(*model.weights, eager_options);
  ASSERT_NE(graphed, nullptr);
  ASSERT_NE(eager, nullptr);
  const int vocab = static_cast<int>(model.weights->config.vocab_size);
  std::vector<std::unique_ptr<BackendState>> a, b;
  for (int i = 0; i < 3; ++i) {
    a.push_back(New(*graphed));
    b.push_back(New(*eager));
    const std::vector<int32_t> prompt = RandomTokens(10 + 7 * i, 20 + i, 256);
    Feed(*graphed, a.back().get(), prompt);
    Feed(*eager, b.back().get(), prompt);
  }
  for (int step = 0; step < 6; ++step) {
    std::vector<int32_t> tokens = {static_cast<int32_t>(step + 1), 40, 77};
    std::vector<SequenceInput> ia, ib;
    for (int i = 0; i < 3; ++i) {
      ia.push_back({std::span<const int32_t>(&tokens[i], 1), a[i].get()});
      ib.push_back({std::span<const int32_t>(&tokens[i], 1), b[i].get()});
    }
    std::vector<float> la(3 * vocab), lb(3 * vocab);
    ASSERT_TRUE(graphed->Forward(ia, la).ok());
    ASSERT_TRUE(eager->Forward(ib, lb).ok());
    EXPECT_EQ(la, lb) << "step " << step;
  }
  EXPECT_EQ(graphed->graphs_captured(), 1);
  EXPECT_EQ(eager->graphs_captured(), 0);
}

// Clone, checkpoint/rollback and export/import keep sessions independent and exact.
TEST_F(CudaBackendTest, ForksCheckpointsAndTransfersAreExact) {
  const LoadedModel& model = ::kls::testing::TinyModel();
  auto gpu = MakeCuda(*model.weights);
  ASSERT_NE(gpu, nullptr);
  auto parent = New(*gpu);
  Feed(*gpu, parent.get(), RandomTokens(100, 8, 256));  // 100 tokens: a partial last page
  absl::StatusOr<std::unique_ptr<BackendState>> child = gpu->CloneState(*parent);
  ASSERT_TRUE(child.ok()) << child.status();
  const std::vector<int32_t> x = RandomTokens(9, 9, 256), y = RandomTokens(4, 10, 256);
  const std::vector<float> px = Feed(*gpu, parent.get(), x);
  const std::vector<float> cy = Feed(*gpu, child->get(), y);
  // Each equals a fresh session fed the same pieces (copy on write kept them apart).
  for (const auto& [branch, logits, state] :
       {std::tuple{&x, &px, parent.get()}, std::tuple{&y, &cy, child->get()}}) {
    auto fresh = New(*gpu);
    Feed(*gpu, fresh.get(), RandomTokens(100, 8, 256));
    EXPECT_EQ(Feed(*gpu, fresh.get(), *branch), *logits);
    const SessionState a = Export(*gpu, *state), b = Export(*gpu, *fresh);
    for (size_t l = 0; l < a.mla().size(); ++l) EXPECT_EQ(a.mla()[l].latent, b.mla()[l].latent);
    for (size_t l = 0; l < a.kda().size(); ++l)
      EXPECT_EQ(a.kda()[l].recurrent, b.kda()[l].recurrent);
  }
  // Rollback returns to the checkpoint bit for bit.
  const SessionState before = Export(*gpu, *parent);
  absl::StatusOr<std::unique_ptr<StateCheckpoint>> cp = gpu->Checkpoint(*parent);
  ASSERT_TRUE(cp.ok()) << cp.status();
  Feed(*gpu, parent.get(), RandomTokens(70, 11, 256));
  ASSERT_TRUE(gpu->Rollback(**cp, parent.get()).ok());
  const SessionState after = Export(*gpu, *parent);
  ASSERT_EQ(after.num_tokens(), before.num_tokens());
  for (size_t l = 0; l < after.kda().size(); ++l) {
    EXPECT_EQ(after.kda()[l].recurrent, before.kda()[l].recurrent);
    EXPECT_EQ(after.kda()[l].conv, before.kda()[l].conv);
  }
  for (size_t l = 0; l < after.mla().size(); ++l)
    EXPECT_EQ(after.mla()[l].latent, before.mla()[l].latent);
  // Export then import continues exactly like the original; a partial export holds the tail.
  absl::StatusOr<std::unique_ptr<BackendState>> imported = gpu->ImportState(Export(*gpu, *parent));
  ASSERT_TRUE(imported.ok()) << imported.status();
  const std::vector<int32_t> z = RandomTokens(5, 12, 256);
  EXPECT_EQ(Feed(*gpu, imported->get(), z), Feed(*gpu, parent.get(), z));
  SessionState tail;
  ASSERT_TRUE(gpu->ExportState(*parent, 70, &tail).ok());
  const SessionState full = Export(*gpu, *parent);
  const size_t d = model.weights->config.mla_cache_dim();
  EXPECT_EQ(tail.mla()[0].latent,
            std::vector<float>(full.mla()[0].latent.begin() + 70 * d, full.mla()[0].latent.end()));
}

// ForwardSample samples on the GPU what SampleReference draws on the host from the GPU's own
// logits (Forward on twin states), for greedy, temperature, top-k and top-p rows of a mixed
// batch, over several steps.
TEST_F(CudaBackendTest, GpuSamplingMatchesTheHostOnItsLogits) {
  const LoadedModel& model = ::kls::testing::TinyModel();
  auto gpu = MakeCuda(*model.weights);
  ASSERT_NE(gpu, nullptr);
  const int64_t vocab = model.weights->config.vocab_size;
  std::vector<std::unique_ptr<BackendState>> sampled, plain;
  for (int i = 0; i < 4; ++i) {
    sampled.push_back(New(*gpu));
    plain.push_back(New(*gpu));
    const std::vector<int32_t> history = RandomTokens(9 + 11 * i, 60 + i, 256);
    Feed(*gpu, sampled.back().get(), history);
    Feed(*gpu, plain.back().get(), history);
  }
  std::vector<SampleRequest> requests(4);
  requests[1].config = {.temperature = 0.7f, .top_p = 1.0f, .top_k = 0, .seed = 11};
  requests[2].config = {.temperature = 1.0f, .top_p = 0.8f, .top_k = 0, .seed = 12};
  requests[3].config = {.temperature = 1.5f, .top_p = 0.95f, .top_k = 20, .seed = 13};
  std::vector<int32_t> next = {5, 6, 7, 8};
  for (int step = 0; step < 6; ++step) {
    // Sequence 3 feeds a chunk every other step, so decode-only and mixed steps both run.
    std::vector<std::vector<int32_t>> feeds;
    for (int i = 0; i < 4; ++i) {
      feeds.push_back(i == 3 && step % 2 == 1 ? RandomTokens(17, 70 + step, 256)
                                              : std::vector<int32_t>{next[i]});
    }
    std::vector<SequenceInput> a, b;
    for (int i = 0; i < 4; ++i) {
      a.push_back({feeds[i], sampled[i].get()});
      b.push_back({feeds[i], plain[i].get()});
      requests[i].counter = static_cast<uint64_t>(sampled[i]->num_tokens() + feeds[i].size());
    }
    std::vector<int32_t> tokens(4, -2);
    ASSERT_TRUE(gpu->ForwardSample(a, requests, tokens).ok());
    std::vector<float> logits(4 * vocab);
    ASSERT_TRUE(gpu->Forward(b, logits).ok());
    for (int i = 0; i < 4; ++i) {
      const int32_t want = kernels::SampleReference(logits.data() + i * vocab, vocab,
                                                    requests[i].config, requests[i].counter);
      EXPECT_EQ(tokens[i], want) << "step " << step << ", sequence " << i;
      next[i] = want;
    }
  }
  std::vector<int32_t> wrong(3);
  const std::vector<int32_t> one = {1};
  SequenceInput in{one, sampled[0].get()};
  EXPECT_TRUE(absl::IsInvalidArgument(gpu->ForwardSample(
      {&in, 1}, std::span<const SampleRequest>(requests).first(1), std::span<int32_t>(wrong))));
}

// A checkpoint of a destroyed state does not roll back a new state, even one at the old address
// (BackendState::id()); the new state and its KDA slot are left as they were.
TEST_F(CudaBackendTest, StaleCheckpointIsRefused) {
  const LoadedModel& model = ::kls::testing::TinyModel();
  auto gpu = MakeCuda(*model.weights);
  ASSERT_NE(gpu, nullptr);
  auto gone = New(*gpu);
  Feed(*gpu, gone.get(), RandomTokens(30, 40, 256));
  absl::StatusOr<std::unique_ptr<StateCheckpoint>> stale = gpu->Checkpoint(*gone);
  ASSERT_TRUE(stale.ok()) << stale.status();
  gone.reset();
  auto fresh = New(*gpu);
  Feed(*gpu, fresh.get(), RandomTokens(40, 41, 256));
  const SessionState before = Export(*gpu, *fresh);
  const absl::Status s = gpu->Rollback(**stale, fresh.get());
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  const SessionState after = Export(*gpu, *fresh);
  ASSERT_EQ(after.num_tokens(), 40);
  for (size_t l = 0; l < after.kda().size(); ++l)
    EXPECT_EQ(after.kda()[l].recurrent, before.kda()[l].recurrent);
}

// The snapshot's host form is backend-independent: a GPU session continues on the CPU and a CPU
// session on the GPU, within the GPU's tolerance.
TEST_F(CudaBackendTest, SessionsMoveBetweenBackends) {
  const LoadedModel& model = Bf16Model("tiny", 7);
  auto gpu = MakeCuda(*model.weights);
  ASSERT_NE(gpu, nullptr);
  auto cpu = MakeCpu(model.weights);
  const std::vector<int32_t> history = RandomTokens(60, 13, 256), next = RandomTokens(6, 14, 256);
  auto g = New(*gpu);
  auto c = New(*cpu);
  Feed(*gpu, g.get(), history);
  Feed(*cpu, c.get(), history);
  const std::vector<float> expected = Feed(*cpu, c.get(), next);  // the reference continuation

  absl::StatusOr<std::unique_ptr<BackendState>> on_cpu = cpu->ImportState(Export(*gpu, *g));
  ASSERT_TRUE(on_cpu.ok()) << on_cpu.status();
  EXPECT_TRUE(RmsBelow(Feed(*cpu, on_cpu->get(), next), expected, kLogitsBound));

  auto c2 = New(*cpu);
  Feed(*cpu, c2.get(), history);
  absl::StatusOr<std::unique_ptr<BackendState>> on_gpu = gpu->ImportState(Export(*cpu, *c2));
  ASSERT_TRUE(on_gpu.ok()) << on_gpu.status();
  EXPECT_TRUE(RmsBelow(Feed(*gpu, on_gpu->get(), next), expected, kLogitsBound));
}

// Running out of cache pages or slots is RESOURCE_EXHAUSTED and changes nothing.
TEST_F(CudaBackendTest, ExhaustionIsAnErrorNotACrash) {
  const LoadedModel& model = ::kls::testing::TinyModel();
  const ModelConfig& c = model.weights->config;
  CudaBackendOptions options;
  options.max_sessions = 1;  // two slots: a session and its checkpoint
  // Two slots and the pages of one full context (the minimum the plan accepts).
  const int64_t slot_bytes =
      int64_t{c.num_kda_layers()} *
      (int64_t{c.linear_attn_config.num_heads} * c.linear_attn_config.head_dim *
           c.linear_attn_config.head_dim * 4 +
       3 * (c.linear_attn_config.short_conv_kernel_size - 1) * c.kda_dim() * 2);
  const int64_t page_bytes = int64_t{c.num_mla_layers()} * 64 * c.mla_cache_dim() * 2;
  options.state_memory_bytes = 2 * slot_bytes + (c.model_max_length / 64) * page_bytes;
  auto gpu = MakeCuda(*model.weights, options);
  ASSERT_NE(gpu, nullptr);
  EXPECT_EQ(gpu->num_slots(), 2);
  auto a = New(*gpu);
  auto b = New(*gpu);
  absl::StatusOr<std::unique_ptr<BackendState>> third = gpu->NewState();
  EXPECT_TRUE(absl::IsResourceExhausted(third.status())) << third.status();
  EXPECT_TRUE(absl::IsResourceExhausted(gpu->Checkpoint(*a).status()));
  // Fill the cache through `a` in steps, then ask `b` for one token more than is left.
  uint32_t seed = 100;
  while (int64_t{gpu->free_pages()} * 64 > 1024)
    Feed(*gpu, a.get(), RandomTokens(1024, seed++, 256));
  const std::vector<int32_t> too_many =
      RandomTokens(static_cast<int>(int64_t{gpu->free_pages()} * 64 + 1), 3, 256);
  std::vector<float> logits(c.vocab_size);
  SequenceInput in{too_many, b.get()};
  const absl::Status s = gpu->Forward({&in, 1}, logits);
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_EQ(b->num_tokens(), 0);
  EXPECT_TRUE(gpu->healthy().ok());
  // Bad input is refused before anything changes.
  const std::vector<int32_t> bad = {static_cast<int32_t>(c.vocab_size)};
  SequenceInput bad_in{bad, b.get()};
  EXPECT_TRUE(absl::IsInvalidArgument(gpu->Forward({&bad_in, 1}, logits)));
}

}  // namespace
}  // namespace kls::engine

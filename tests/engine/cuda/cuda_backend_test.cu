// The CUDA backend against the CPU backend (the reference), on the tiny model and on a mid-size
// random model (hidden 1024, 8 layers, 16 experts): logits within 2e-2 (normwise relative, per
// step), the same greedy tokens for 32 steps on most prompts (the fraction is printed and must
// be ≥ 3/4), states within 5e-3 after prefill; split prefill, mixed batches, forks, checkpoints,
// CUDA graphs, snapshots moving between backends, and memory exhaustion.
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

#include "engine/backend/cpu/cpu_backend.h"
#include "engine/backend/cuda/cuda_backend.h"
#include "tests/engine/tiny_model.h"
#include "tests/test_util.h"

namespace kls::engine {
namespace {

constexpr double kLogitsBound = 2e-2;  // the issue's bound: bf16 GPU vs fp32 CPU
constexpr double kStateBound = 5e-3;
constexpr int kSteps = 32;

// The agreement models hold bf16 weights, as released checkpoints do, so the CPU reference
// computes in fp32 on exactly the weights the GPU holds and the comparison measures the GPU's
// arithmetic, not weight rounding.
const LoadedModel& Bf16Model(const char* preset, uint64_t seed) {
  static auto* models = new std::map<std::string, const LoadedModel*>();
  const LoadedModel*& model = (*models)[preset];
  if (model == nullptr) {
    absl::StatusOr<LoadedModel> m =
        LoadModel(::kls::testing::WriteModel(preset, seed, DType::kBF16));
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

  static std::unique_ptr<CpuBackend> MakeCpu(std::shared_ptr<const ModelWeights> weights) {
    absl::StatusOr<std::unique_ptr<CpuBackend>> backend = CpuBackend::Create(std::move(weights));
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

void ExpectStatesClose(const SessionState& gpu, const SessionState& cpu, double bound) {
  ASSERT_EQ(gpu.num_tokens(), cpu.num_tokens());
  for (size_t l = 0; l < cpu.kda().size(); ++l) {
    EXPECT_TRUE(RmsBelow(gpu.kda()[l].recurrent, cpu.kda()[l].recurrent, bound))
        << "KDA state of KDA layer " << l << " (max-normwise "
        << ::kls::testing::MaxRelativeError(gpu.kda()[l].recurrent, cpu.kda()[l].recurrent) << ")";
    EXPECT_TRUE(RmsBelow(gpu.kda()[l].conv, cpu.kda()[l].conv, bound))
        << "conv state of KDA layer " << l;
  }
  for (size_t l = 0; l < cpu.mla().size(); ++l) {
    EXPECT_TRUE(RmsBelow(gpu.mla()[l].latent, cpu.mla()[l].latent, bound))
        << "MLA cache of MLA layer " << l;
  }
}

// Prefill + kSteps greedy decode steps on both backends, each fed its own greedy token (so a
// divergence does not cascade into the logits comparison); returns whether all tokens agreed.
bool CompareRun(const LoadedModel& model, CudaBackend& gpu, int prompt_len, uint32_t seed) {
  auto cpu = CudaBackendTest::MakeCpu(model.weights);
  const int vocab = static_cast<int>(std::min<int64_t>(model.weights->config.vocab_size, 256));
  const std::vector<int32_t> prompt = RandomTokens(prompt_len, seed, vocab);
  auto gs = New(gpu);
  auto cs = New(*cpu);
  std::vector<float> gl = Feed(gpu, gs.get(), prompt);
  std::vector<float> cl = Feed(*cpu, cs.get(), prompt);
  EXPECT_TRUE(RmsBelow(gl, cl, kLogitsBound)) << "prefill logits, seed " << seed;
  ExpectStatesClose(Export(gpu, *gs), Export(*cpu, *cs), kStateBound);
  bool same = true;
  std::vector<double> errors;
  for (int step = 0; step < kSteps; ++step) {
    const int32_t tg = Argmax(gl), tc = Argmax(cl);
    same = same && tg == tc;
    gl = Feed(gpu, gs.get(), {tc});
    cl = Feed(*cpu, cs.get(), {tc});
    errors.push_back(RelativeRms(gl, cl));
  }
  const int within = static_cast<int>(
      std::count_if(errors.begin(), errors.end(), [](double e) { return e <= kLogitsBound; }));
  std::sort(errors.begin(), errors.end());
  std::printf(
      "  prompt %3d tokens: decode logits within %.0e on %d of %d steps (median %.2e, "
      "max %.2e)%s\n",
      prompt_len, kLogitsBound, within, kSteps, errors[errors.size() / 2], errors.back(),
      same ? "" : ", greedy tokens differ");
  EXPECT_GE(within * 10, kSteps * 9) << "seed " << seed;
  return same;
}

void AgreementOn(const LoadedModel& model, const char* name, int prompts) {
  auto gpu = CudaBackendTest::MakeCuda(*model.weights);
  ASSERT_NE(gpu, nullptr);
  int agreed = 0, runs = 0;
  for (uint32_t seed = 1; seed <= static_cast<uint32_t>(prompts); ++seed) {
    agreed += CompareRun(model, *gpu, 5 + 23 * static_cast<int>(seed), seed) ? 1 : 0;
    ++runs;
  }
  std::printf("[ %s ] same greedy tokens for %d steps on %d of %d prompts\n", name, kSteps, agreed,
              runs);
  EXPECT_GE(agreed * 4, runs * 3);
}

TEST_F(CudaBackendTest, AgreesWithCpuOnTinyModel) { AgreementOn(Bf16Model("tiny", 7), "tiny", 8); }

TEST_F(CudaBackendTest, AgreesWithCpuOnMidModel) { AgreementOn(Bf16Model("mid", 11), "mid", 4); }

// Prefill in pieces (chunked prefill over a cached context) equals one prefill.
TEST_F(CudaBackendTest, SplitPrefillEqualsOnePrefill) {
  const LoadedModel& model = ::kls::testing::TinyModel();
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
  EXPECT_TRUE(RmsBelow(last, one, kLogitsBound));
  ExpectStatesClose(Export(*gpu, *split), Export(*gpu, *whole), kStateBound);
}

// One step carrying decode tokens and prefill chunks of several sessions equals each alone.
TEST_F(CudaBackendTest, MixedBatchEqualsSeparateSteps) {
  const LoadedModel& model = ::kls::testing::TinyModel();
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
    ExpectStatesClose(Export(*gpu, *batched[i]), Export(*gpu, *alone[i]), kStateBound);
  }
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

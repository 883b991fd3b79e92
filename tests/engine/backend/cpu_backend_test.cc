// The CPU forward pass of the whole model: split-prefill equivalence, kernel-choice
// equivalence, batching, state continuation and bad input.
#include "engine/backend/cpu/cpu_backend.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <tuple>
#include <vector>

#include "engine/model/safetensors.h"
#include "tests/engine/tiny_model.h"
#include "tests/test_util.h"

namespace kls::engine {
namespace {

using ::kls::testing::RelativeErrorBelow;
using ::kls::testing::TinyModel;

constexpr double kFp32ModelTolerance = 1e-4;  // the bound for fp32 CPU equivalence

std::vector<int32_t> RandomTokens(int n, uint32_t seed, int vocab = 256) {
  std::mt19937 rng(seed);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % vocab);
  return ids;
}

std::unique_ptr<CpuBackend> MakeBackend(CpuBackendOptions options = {}) {
  auto backend = CpuBackend::Create(TinyModel().weights, options);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return *std::move(backend);
}

// Runs `pieces` of one sequence in order on a fresh state; returns the last logits.
std::vector<float> RunPieces(CpuBackend& backend, const std::vector<std::vector<int32_t>>& pieces,
                             SessionState* state) {
  std::vector<float> logits(backend.config().vocab_size);
  for (const auto& piece : pieces) {
    HostSequenceInput input{piece, state};
    absl::Status s = backend.ForwardHost({&input, 1}, logits);
    EXPECT_TRUE(s.ok()) << s;
  }
  return logits;
}

// Every part of two states agrees within `bound` (normwise relative per tensor).
void ExpectStatesClose(const SessionState& a, const SessionState& b, double bound) {
  ASSERT_EQ(a.num_tokens(), b.num_tokens());
  ASSERT_EQ(a.kda().size(), b.kda().size());
  for (size_t i = 0; i < a.kda().size(); ++i) {
    EXPECT_TRUE(RelativeErrorBelow(a.kda()[i].recurrent, b.kda()[i].recurrent, bound))
        << "KDA state of KDA layer " << i;
    EXPECT_TRUE(RelativeErrorBelow(a.kda()[i].conv, b.kda()[i].conv, bound))
        << "conv state of KDA layer " << i;
  }
  for (size_t i = 0; i < a.mla().size(); ++i) {
    EXPECT_TRUE(RelativeErrorBelow(a.mla()[i].latent, b.mla()[i].latent, bound))
        << "MLA cache of MLA layer " << i;
  }
}

std::vector<int32_t> Slice(const std::vector<int32_t>& v, size_t begin, size_t end) {
  return std::vector<int32_t>(v.begin() + begin, v.begin() + end);
}

// Issue 2: logits of prefill(A+B) equal prefill(A) → prefill(B) and token-by-token decode.
TEST(CpuBackendTest, SplitPrefillEqualsFullPrefillAndDecode) {
  const ModelConfig& config = TinyModel().weights->config;
  auto backend = MakeBackend();
  const std::vector<int32_t> tokens = RandomTokens(150, 1);
  const size_t split = 70;  // A crosses a 64-token chunk boundary, B starts mid-chunk

  SessionState full(config);
  std::vector<float> logits_full = RunPieces(*backend, {tokens}, &full);

  SessionState two(config);
  std::vector<float> logits_two =
      RunPieces(*backend, {Slice(tokens, 0, split), Slice(tokens, split, tokens.size())}, &two);

  std::vector<std::vector<int32_t>> one_by_one = {Slice(tokens, 0, split)};
  for (size_t i = split; i < tokens.size(); ++i) one_by_one.push_back({tokens[i]});
  SessionState decode(config);
  std::vector<float> logits_decode = RunPieces(*backend, one_by_one, &decode);

  EXPECT_TRUE(kls::testing::AllFinite(logits_full));
  EXPECT_TRUE(RelativeErrorBelow(logits_two, logits_full, kFp32ModelTolerance));
  EXPECT_TRUE(RelativeErrorBelow(logits_decode, logits_full, kFp32ModelTolerance));
  ExpectStatesClose(two, full, kFp32ModelTolerance);
  ExpectStatesClose(decode, full, kFp32ModelTolerance);
  EXPECT_EQ(full.num_tokens(), 150);
  EXPECT_EQ(full.mla()[0].latent.size(), 150u * config.mla_cache_dim());
}

// The kernel choice (chunked vs recurrent KDA, absorbed vs decompressed MLA) must not change
// the result.
TEST(CpuBackendTest, KernelChoicesAgree) {
  const ModelConfig& config = TinyModel().weights->config;
  const std::vector<int32_t> tokens = RandomTokens(100, 2);
  auto reference = MakeBackend();
  SessionState ref_state(config);
  std::vector<float> ref =
      RunPieces(*reference, {Slice(tokens, 0, 40), Slice(tokens, 40, 100)}, &ref_state);
  CpuBackendOptions options;
  options.kda_recurrent_max_tokens = 1000;  // recurrence everywhere
  options.mla_absorbed_max_tokens = 1000;   // absorbed attention everywhere
  auto other = MakeBackend(options);
  SessionState other_state(config);
  std::vector<float> got =
      RunPieces(*other, {Slice(tokens, 0, 40), Slice(tokens, 40, 100)}, &other_state);
  EXPECT_TRUE(RelativeErrorBelow(got, ref, kFp32ModelTolerance));
  ExpectStatesClose(other_state, ref_state, kFp32ModelTolerance);
}

// A batch mixing a prefill and decodes equals running each sequence alone.
TEST(CpuBackendTest, BatchEqualsSequencesAlone) {
  const ModelConfig& config = TinyModel().weights->config;
  const int64_t vocab = config.vocab_size;
  auto backend = MakeBackend();
  const std::vector<int32_t> a = RandomTokens(67, 3), b = RandomTokens(5, 4), c = {42};

  SessionState sa(config), sb(config), sc(config);
  RunPieces(*backend, {RandomTokens(9, 5)}, &sc);  // c continues an existing session
  SessionState sc_alone = sc;
  SessionState sa_alone(config), sb_alone(config);
  std::vector<float> la = RunPieces(*backend, {a}, &sa_alone);
  std::vector<float> lb = RunPieces(*backend, {b}, &sb_alone);
  std::vector<float> lc = RunPieces(*backend, {c}, &sc_alone);

  std::vector<HostSequenceInput> batch = {{a, &sa}, {b, &sb}, {c, &sc}};
  std::vector<float> logits(3 * vocab);
  ASSERT_TRUE(backend->ForwardHost(batch, logits).ok());
  auto row = [&](int n) {
    return std::vector<float>(logits.begin() + n * vocab, logits.begin() + (n + 1) * vocab);
  };
  EXPECT_TRUE(RelativeErrorBelow(row(0), la, kFp32ModelTolerance));
  EXPECT_TRUE(RelativeErrorBelow(row(1), lb, kFp32ModelTolerance));
  EXPECT_TRUE(RelativeErrorBelow(row(2), lc, kFp32ModelTolerance));
  ExpectStatesClose(sa, sa_alone, kFp32ModelTolerance);
  ExpectStatesClose(sb, sb_alone, kFp32ModelTolerance);
  ExpectStatesClose(sc, sc_alone, kFp32ModelTolerance);
}

// A copied state is a fork: both copies continue independently and identically.
TEST(CpuBackendTest, CopiedStateContinuesIdentically) {
  const ModelConfig& config = TinyModel().weights->config;
  auto backend = MakeBackend();
  SessionState base(config);
  RunPieces(*backend, {RandomTokens(30, 6)}, &base);
  SessionState fork = base;
  const std::vector<int32_t> next = RandomTokens(12, 7);
  std::vector<float> l1 = RunPieces(*backend, {next}, &base);
  std::vector<float> l2 = RunPieces(*backend, {next}, &fork);
  EXPECT_EQ(l1, l2);
}

// Bad input is refused with INVALID_ARGUMENT and leaves the state exactly as it was.
TEST(CpuBackendTest, BadInputIsRefusedWithoutSideEffects) {
  const ModelConfig& config = TinyModel().weights->config;
  auto backend = MakeBackend();
  SessionState state(config);
  RunPieces(*backend, {RandomTokens(10, 8)}, &state);
  const SessionState before = state;
  std::vector<float> logits(config.vocab_size);

  const std::vector<int32_t> out_of_range = {1, static_cast<int32_t>(config.vocab_size)};
  HostSequenceInput bad_id{out_of_range, &state};
  absl::Status s = backend->ForwardHost({&bad_id, 1}, logits);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("outside the vocabulary"), std::string_view::npos) << s;

  const std::vector<int32_t> negative = {-1};
  HostSequenceInput neg{negative, &state};
  EXPECT_TRUE(absl::IsInvalidArgument(backend->ForwardHost({&neg, 1}, logits)));

  HostSequenceInput empty{{}, &state};
  EXPECT_TRUE(absl::IsInvalidArgument(backend->ForwardHost({&empty, 1}, logits)));

  const std::vector<int32_t> one = {5};
  std::vector<HostSequenceInput> dup = {{one, &state}, {one, &state}};
  std::vector<float> two_rows(2 * config.vocab_size);
  s = backend->ForwardHost(dup, two_rows);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;

  HostSequenceInput ok{one, &state};
  std::vector<float> small(3);
  EXPECT_TRUE(absl::IsInvalidArgument(backend->ForwardHost({&ok, 1}, small)));

  ModelConfig wider = config;
  wider.linear_attn_config.short_conv_kernel_size = 6;
  SessionState other_conv(wider);  // same KDA state size, longer conv window
  HostSequenceInput wrong_conv{one, &other_conv};
  EXPECT_TRUE(absl::IsInvalidArgument(backend->ForwardHost({&wrong_conv, 1}, logits)));

  SessionState foreign;  // not shaped for this model
  HostSequenceInput wrong_state{one, &foreign};
  EXPECT_TRUE(absl::IsInvalidArgument(backend->ForwardHost({&wrong_state, 1}, logits)));

  // Longer than the context limit.
  SessionState near_limit = state;
  near_limit.set_num_tokens(config.model_max_length);
  for (auto& m : near_limit.mla())
    m.latent.resize(config.model_max_length * config.mla_cache_dim());
  HostSequenceInput too_long{one, &near_limit};
  s = backend->ForwardHost({&too_long, 1}, logits);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("context"), std::string_view::npos) << s;

  // Nothing above touched the state.
  ExpectStatesClose(state, before, 0.0);
}

// The MoE routing switch is wired through: biased weights change the output.
TEST(CpuBackendTest, RouterWeightingSwitchChangesLogits) {
  const ModelConfig& config = TinyModel().weights->config;
  const std::vector<int32_t> tokens = RandomTokens(20, 9);
  auto unbiased = MakeBackend();
  CpuBackendOptions options;
  options.router_weighting = kernels::RouterWeighting::kBiased;
  auto biased = MakeBackend(options);
  SessionState s1(config), s2(config);
  std::vector<float> l1 = RunPieces(*unbiased, {tokens}, &s1);
  std::vector<float> l2 = RunPieces(*biased, {tokens}, &s2);
  EXPECT_GT(kls::testing::MaxRelativeError(std::span<const float>(l1), std::span<const float>(l2)),
            1e-3);
}

// bf16_activations stores in bf16 what the CUDA backend stores in bf16 (the MLA cache rows, the
// conv state's projections) and keeps the KDA state in fp32; it moves the logits by about what
// bf16 storage costs, and piecewise prefill equals one prefill to bf16 precision.
TEST(CpuBackendTest, Bf16ActivationsRoundWhatTheGpuStoresInBf16) {
  const ModelConfig& config = TinyModel().weights->config;
  const std::vector<int32_t> tokens = RandomTokens(90, 10);
  CpuBackendOptions options;
  options.bf16_activations = true;
  auto bf16 = MakeBackend(options);
  auto f32 = MakeBackend();
  SessionState b(config), f(config), split(config);
  const std::vector<float> lb = RunPieces(*bf16, {tokens}, &b);
  const std::vector<float> lf = RunPieces(*f32, {tokens}, &f);
  const std::vector<float> ls = RunPieces(
      *bf16, {Slice(tokens, 0, 33), Slice(tokens, 33, 34), Slice(tokens, 34, 90)}, &split);
  auto bf16_exact = [](const std::vector<float>& v) {
    return std::all_of(v.begin(), v.end(),
                       [](float x) { return Bf16ToFloat(FloatToBf16(x)) == x; });
  };
  for (const MlaLayerState& layer : b.mla()) EXPECT_TRUE(bf16_exact(layer.latent));
  for (const KdaLayerState& layer : b.kda()) {
    EXPECT_TRUE(bf16_exact(layer.conv));
    EXPECT_FALSE(bf16_exact(layer.recurrent));
  }
  for (const MlaLayerState& layer : f.mla()) EXPECT_FALSE(bf16_exact(layer.latent));
  EXPECT_TRUE(kls::testing::AllFinite(lb));
  const double moved =
      kls::testing::MaxRelativeError(std::span<const float>(lb), std::span<const float>(lf));
  // Measured 1.5e-2 (max-normwise): a few bf16 ulps, amplified by the 8 layers.
  EXPECT_GT(moved, 1e-3);
  EXPECT_LT(moved, 5e-2);
  // Other pieces round other intermediates (a one-token piece takes the recurrence), so they
  // agree to bf16 storage precision, not fp32's.
  EXPECT_TRUE(RelativeErrorBelow(ls, lb, kls::testing::kBf16StateTolerance.rtol));
  ExpectStatesClose(split, b, kls::testing::kBf16StateTolerance.rtol);
}

// ---- The BackendState API (what the worker engine uses) ----------------------------------------

std::unique_ptr<BackendState> NewState(Backend& backend) {
  absl::StatusOr<std::unique_ptr<BackendState>> state = backend.NewState();
  EXPECT_TRUE(state.ok()) << state.status();
  return state.ok() ? *std::move(state) : nullptr;
}

// Feeds `tokens` into `state` through the generic interface; returns the logits.
std::vector<float> Feed(Backend& backend, BackendState* state, const std::vector<int32_t>& tokens) {
  std::vector<float> logits(backend.config().vocab_size);
  SequenceInput input{tokens, state};
  absl::Status s = backend.Forward({&input, 1}, logits);
  EXPECT_TRUE(s.ok()) << s;
  return logits;
}

SessionState Export(Backend& backend, const BackendState& state, int64_t mla_first_row = 0) {
  SessionState host;
  absl::Status s = backend.ExportState(state, mla_first_row, &host);
  EXPECT_TRUE(s.ok()) << s;
  return host;
}

void ExpectStatesEqual(const SessionState& a, const SessionState& b) {
  ASSERT_EQ(a.num_tokens(), b.num_tokens());
  ASSERT_EQ(a.mla_first_row(), b.mla_first_row());
  ASSERT_EQ(a.kda().size(), b.kda().size());
  for (size_t i = 0; i < a.kda().size(); ++i) {
    EXPECT_EQ(a.kda()[i].recurrent, b.kda()[i].recurrent) << "KDA layer " << i;
    EXPECT_EQ(a.kda()[i].conv, b.kda()[i].conv) << "KDA layer " << i;
  }
  ASSERT_EQ(a.mla().size(), b.mla().size());
  for (size_t i = 0; i < a.mla().size(); ++i) {
    EXPECT_EQ(a.mla()[i].latent, b.mla()[i].latent) << "MLA layer " << i;
  }
}

// ForwardSample draws what SampleReference draws from Forward's logits, per sequence of a
// mixed batch, and refuses request or token spans of the wrong size without changing a state.
TEST(CpuBackendTest, ForwardSampleDrawsFromForwardsLogits) {
  const ModelConfig& config = TinyModel().weights->config;
  const int64_t vocab = config.vocab_size;
  auto backend = MakeBackend();
  std::vector<std::unique_ptr<BackendState>> sampled, plain;
  const std::vector<std::vector<int32_t>> inputs = {RandomTokens(30, 50), {7}, RandomTokens(5, 51)};
  for (int i = 0; i < 3; ++i) {
    sampled.push_back(*backend->NewState());
    plain.push_back(*backend->NewState());
  }
  Feed(*backend, sampled[1].get(), RandomTokens(12, 52));
  Feed(*backend, plain[1].get(), RandomTokens(12, 52));
  std::vector<SampleRequest> requests(3);
  requests[0].config = {};  // greedy
  requests[1].config = {.temperature = 0.8f, .top_p = 0.9f, .top_k = 0, .seed = 3};
  requests[2].config = {.temperature = 1.3f, .top_p = 1.0f, .top_k = 40, .seed = 4};
  for (int i = 0; i < 3; ++i) requests[i].counter = 100 + i;
  std::vector<SequenceInput> a, b;
  for (int i = 0; i < 3; ++i) {
    a.push_back({inputs[i], sampled[i].get()});
    b.push_back({inputs[i], plain[i].get()});
  }
  std::vector<int32_t> tokens(3, -2);
  ASSERT_TRUE(backend->ForwardSample(a, requests, tokens).ok());
  std::vector<float> logits(3 * vocab);
  ASSERT_TRUE(backend->Forward(b, logits).ok());
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(tokens[i], kernels::SampleReference(logits.data() + i * vocab, vocab,
                                                  requests[i].config, requests[i].counter))
        << "sequence " << i;
  }
  for (int i = 0; i < 3; ++i) {
    ExpectStatesClose(*backend->HostState(*sampled[i]), *backend->HostState(*plain[i]), 0.0);
  }

  std::vector<int32_t> short_tokens(2);
  const int64_t before = sampled[0]->num_tokens();
  EXPECT_TRUE(absl::IsInvalidArgument(backend->ForwardSample(a, requests, short_tokens)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      backend->ForwardSample(a, std::span<const SampleRequest>(requests).first(1), tokens)));
  EXPECT_EQ(sampled[0]->num_tokens(), before);
}

TEST(CpuBackendStateTest, CloneContinuesIndependently) {
  auto backend = MakeBackend();
  const std::vector<int32_t> prompt = RandomTokens(40, 1), x = RandomTokens(5, 2),
                             y = RandomTokens(7, 3);
  std::unique_ptr<BackendState> a = NewState(*backend);
  Feed(*backend, a.get(), prompt);
  absl::StatusOr<std::unique_ptr<BackendState>> b = backend->CloneState(*a);
  ASSERT_TRUE(b.ok()) << b.status();
  const std::vector<float> logits_a = Feed(*backend, a.get(), x);
  const std::vector<float> logits_b = Feed(*backend, b->get(), y);

  // Each branch equals the same pieces fed into a fresh state.
  for (const auto& [branch, logits, state] :
       {std::tuple{&x, &logits_a, a.get()}, std::tuple{&y, &logits_b, b->get()}}) {
    std::unique_ptr<BackendState> fresh = NewState(*backend);
    Feed(*backend, fresh.get(), prompt);
    EXPECT_EQ(Feed(*backend, fresh.get(), *branch), *logits);
    ExpectStatesEqual(Export(*backend, *state), Export(*backend, *fresh));
  }
}

TEST(CpuBackendStateTest, ExportHoldsTheRowsAskedFor) {
  auto backend = MakeBackend();
  std::unique_ptr<BackendState> state = NewState(*backend);
  Feed(*backend, state.get(), RandomTokens(30, 4));
  const SessionState full = Export(*backend, *state);
  EXPECT_EQ(full.num_tokens(), 30);
  EXPECT_EQ(full.mla_first_row(), 0);
  EXPECT_TRUE(full.MatchesConfig(backend->config()));

  const SessionState tail = Export(*backend, *state, 17);
  EXPECT_EQ(tail.num_tokens(), 30);
  EXPECT_EQ(tail.mla_first_row(), 17);
  EXPECT_TRUE(tail.MatchesConfig(backend->config()));
  const size_t d = backend->config().mla_cache_dim();
  for (size_t l = 0; l < full.mla().size(); ++l) {
    const std::vector<float>& rows = full.mla()[l].latent;
    EXPECT_EQ(tail.mla()[l].latent, std::vector<float>(rows.begin() + 17 * d, rows.end()));
  }
  EXPECT_EQ(Export(*backend, *state, 30).mla()[0].latent.size(), 0u);

  SessionState untouched = full;
  for (int64_t bad : {int64_t{-1}, int64_t{31}}) {
    absl::Status s = backend->ExportState(*state, bad, &untouched);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  }
  ExpectStatesEqual(untouched, full);
}

TEST(CpuBackendStateTest, ImportContinuesLikeTheOriginal) {
  auto backend = MakeBackend();
  const std::vector<int32_t> prompt = RandomTokens(33, 5), more = RandomTokens(4, 6);
  std::unique_ptr<BackendState> original = NewState(*backend);
  Feed(*backend, original.get(), prompt);
  absl::StatusOr<std::unique_ptr<BackendState>> imported =
      backend->ImportState(Export(*backend, *original));
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_EQ((*imported)->num_tokens(), 33);
  EXPECT_EQ((*imported)->ByteSize(), original->ByteSize());
  EXPECT_EQ(Feed(*backend, imported->get(), more), Feed(*backend, original.get(), more));

  // Partial exports, other shapes and empty states of another model are refused.
  absl::StatusOr<std::unique_ptr<BackendState>> partial =
      backend->ImportState(Export(*backend, *original, 8));
  EXPECT_TRUE(absl::IsInvalidArgument(partial.status())) << partial.status();
  absl::StatusOr<std::unique_ptr<BackendState>> shapeless = backend->ImportState(SessionState());
  EXPECT_TRUE(absl::IsInvalidArgument(shapeless.status())) << shapeless.status();
  SessionState short_cache = Export(*backend, *original);
  short_cache.mla()[0].latent.pop_back();
  absl::StatusOr<std::unique_ptr<BackendState>> torn = backend->ImportState(short_cache);
  EXPECT_TRUE(absl::IsInvalidArgument(torn.status())) << torn.status();
}

TEST(CpuBackendStateTest, RollbackReturnsToTheCheckpoint) {
  auto backend = MakeBackend();
  std::unique_ptr<BackendState> state = NewState(*backend);
  Feed(*backend, state.get(), RandomTokens(21, 7));
  const SessionState before = Export(*backend, *state);
  absl::StatusOr<std::unique_ptr<StateCheckpoint>> checkpoint = backend->Checkpoint(*state);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ((*checkpoint)->num_tokens(), 21);
  Feed(*backend, state.get(), RandomTokens(9, 8));
  Feed(*backend, state.get(), RandomTokens(1, 9));
  ASSERT_TRUE(backend->Rollback(**checkpoint, state.get()).ok());
  ExpectStatesEqual(Export(*backend, *state), before);

  // A checkpoint of another state is refused and changes nothing.
  std::unique_ptr<BackendState> other = NewState(*backend);
  Feed(*backend, other.get(), RandomTokens(25, 10));
  const SessionState other_before = Export(*backend, *other);
  absl::Status s = backend->Rollback(**checkpoint, other.get());
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  ExpectStatesEqual(Export(*backend, *other), other_before);
}

// Checkpoints A (10 tokens) and B (20); rolling back to A and feeding other tokens makes B
// describe a prefix the state no longer has, so B is refused even though the state has enough
// tokens; A itself, and a checkpoint taken after the rollback, still work.
TEST(CpuBackendStateTest, RollbackBelowALaterCheckpointInvalidatesIt) {
  auto backend = MakeBackend();
  std::unique_ptr<BackendState> state = NewState(*backend);
  Feed(*backend, state.get(), RandomTokens(10, 40));
  absl::StatusOr<std::unique_ptr<StateCheckpoint>> a = backend->Checkpoint(*state);
  ASSERT_TRUE(a.ok()) << a.status();
  Feed(*backend, state.get(), RandomTokens(10, 41));
  absl::StatusOr<std::unique_ptr<StateCheckpoint>> b = backend->Checkpoint(*state);
  ASSERT_TRUE(b.ok()) << b.status();
  Feed(*backend, state.get(), RandomTokens(3, 42));
  ASSERT_TRUE(backend->Rollback(**b, state.get()).ok());  // to 20: A's 10 tokens are kept
  ASSERT_TRUE(backend->Rollback(**a, state.get()).ok());  // to 10
  Feed(*backend, state.get(), RandomTokens(15, 43));      // 25 tokens, 10..25 new
  const SessionState before = Export(*backend, *state);
  absl::Status s = backend->Rollback(**b, state.get());
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  ExpectStatesEqual(Export(*backend, *state), before);
  absl::StatusOr<std::unique_ptr<StateCheckpoint>> c = backend->Checkpoint(*state);
  ASSERT_TRUE(c.ok()) << c.status();
  Feed(*backend, state.get(), RandomTokens(2, 44));
  EXPECT_TRUE(backend->Rollback(**c, state.get()).ok());
  EXPECT_EQ(state->num_tokens(), 25);
  EXPECT_TRUE(backend->Rollback(**a, state.get()).ok());
  EXPECT_EQ(state->num_tokens(), 10);
}

// A checkpoint names its state by BackendState::id(), not by address: once the state is gone,
// no new state accepts it, even one the allocator places at the old address (likely here: the
// same size freed and allocated again). A checkpoint taken by another backend is refused too.
TEST(CpuBackendStateTest, StaleAndForeignCheckpointsAreRefused) {
  auto backend = MakeBackend();
  std::unique_ptr<BackendState> gone = NewState(*backend);
  Feed(*backend, gone.get(), RandomTokens(12, 20));
  absl::StatusOr<std::unique_ptr<StateCheckpoint>> stale = backend->Checkpoint(*gone);
  ASSERT_TRUE(stale.ok()) << stale.status();
  const uint64_t gone_id = gone->id();
  gone.reset();
  for (int i = 0; i < 4; ++i) {
    std::unique_ptr<BackendState> fresh = NewState(*backend);
    EXPECT_NE(fresh->id(), gone_id);
    Feed(*backend, fresh.get(), RandomTokens(15, 21 + i));
    const SessionState before = Export(*backend, *fresh);
    absl::Status s = backend->Rollback(**stale, fresh.get());
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    ExpectStatesEqual(Export(*backend, *fresh), before);
  }

  auto other = MakeBackend();
  std::unique_ptr<BackendState> mine = NewState(*backend);
  std::unique_ptr<BackendState> theirs = NewState(*other);
  Feed(*backend, mine.get(), RandomTokens(5, 30));
  absl::StatusOr<std::unique_ptr<StateCheckpoint>> foreign = other->Checkpoint(*theirs);
  ASSERT_TRUE(foreign.ok()) << foreign.status();
  absl::Status s = backend->Rollback(**foreign, mine.get());
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_EQ(mine->num_tokens(), 5);
}

TEST(CpuBackendStateTest, StatesOfAnotherBackendAreRefused) {
  auto mine = MakeBackend();
  auto theirs = MakeBackend();
  std::unique_ptr<BackendState> foreign = NewState(*theirs);
  Feed(*theirs, foreign.get(), RandomTokens(3, 11));
  const std::vector<int32_t> one = {7};
  std::vector<float> logits(mine->config().vocab_size);
  SequenceInput input{one, foreign.get()};
  absl::Status s = mine->Forward({&input, 1}, logits);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_EQ(foreign->num_tokens(), 3);
  EXPECT_TRUE(absl::IsInvalidArgument(mine->CloneState(*foreign).status()));
  SessionState host;
  EXPECT_TRUE(absl::IsInvalidArgument(mine->ExportState(*foreign, 0, &host)));
  EXPECT_TRUE(absl::IsInvalidArgument(mine->Checkpoint(*foreign).status()));
}

TEST(CpuBackendStateTest, MaxStatesIsResourceExhaustedUntilOneGoes) {
  CpuBackendOptions options;
  options.max_states = 2;
  auto backend = MakeBackend(options);
  std::unique_ptr<BackendState> a = NewState(*backend);
  std::unique_ptr<BackendState> b = NewState(*backend);
  absl::StatusOr<std::unique_ptr<BackendState>> third = backend->NewState();
  EXPECT_TRUE(absl::IsResourceExhausted(third.status())) << third.status();
  EXPECT_TRUE(absl::IsResourceExhausted(backend->CloneState(*a).status()));
  EXPECT_TRUE(absl::IsResourceExhausted(backend->ImportState(Export(*backend, *a)).status()));
  b.reset();
  absl::StatusOr<std::unique_ptr<BackendState>> again = backend->CloneState(*a);
  EXPECT_TRUE(again.ok()) << again.status();
}

}  // namespace
}  // namespace kls::engine

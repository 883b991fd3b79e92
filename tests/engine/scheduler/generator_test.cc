// The generation loop: determinism, stop and length handling, the pending token, bad options.
#include "engine/scheduler/generator.h"

#include <gtest/gtest.h>

#include "engine/backend/cpu/cpu_backend.h"
#include "tests/engine/tiny_model.h"

namespace kls::engine {
namespace {

using ::kls::testing::TinyModel;

std::unique_ptr<CpuBackend> MakeBackend() {
  auto backend = CpuBackend::Create(TinyModel().weights);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return *std::move(backend);
}

std::vector<int32_t> Prompt() {
  absl::StatusOr<std::vector<int32_t>> ids = TinyModel().tokenizer->Encode("Hello, Kimi!");
  EXPECT_TRUE(ids.ok());
  return *ids;
}

std::unique_ptr<BackendState> NewState(Backend& backend) {
  absl::StatusOr<std::unique_ptr<BackendState>> state = backend.NewState();
  EXPECT_TRUE(state.ok()) << state.status();
  return state.ok() ? *std::move(state) : nullptr;
}

GenerateResult RunTurn(Backend& backend, BackendState* state, const std::vector<int32_t>& prompt,
                       const GenerateOptions& options) {
  absl::StatusOr<GenerateResult> r = Generate(backend, state, prompt, options);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : GenerateResult{};
}

// Forwards to a CPU backend and counts the forward calls of each kind.
class CountingBackend : public Backend {
 public:
  explicit CountingBackend(std::unique_ptr<CpuBackend> inner) : inner_(std::move(inner)) {}
  absl::StatusOr<std::unique_ptr<BackendState>> NewState() override { return inner_->NewState(); }
  absl::StatusOr<std::unique_ptr<BackendState>> CloneState(const BackendState& s) override {
    return inner_->CloneState(s);
  }
  absl::StatusOr<std::unique_ptr<BackendState>> ImportState(const SessionState& host) override {
    return inner_->ImportState(host);
  }
  absl::Status ExportState(const BackendState& s, int64_t first, SessionState* host) override {
    return inner_->ExportState(s, first, host);
  }
  absl::StatusOr<std::unique_ptr<StateCheckpoint>> Checkpoint(const BackendState& s) override {
    return inner_->Checkpoint(s);
  }
  absl::Status Rollback(const StateCheckpoint& c, BackendState* s) override {
    return inner_->Rollback(c, s);
  }
  absl::Status Forward(std::span<const SequenceInput> batch, std::span<float> logits) override {
    ++forward_calls;
    return inner_->Forward(batch, logits);
  }
  absl::Status ForwardSample(std::span<const SequenceInput> batch,
                             std::span<const SampleRequest> requests,
                             std::span<int32_t> tokens) override {
    ++forward_sample_calls;
    return inner_->ForwardSample(batch, requests, tokens);
  }
  const ModelConfig& config() const override { return inner_->config(); }
  std::string_view name() const override { return "counting"; }

  int forward_calls = 0;
  int forward_sample_calls = 0;

 private:
  std::unique_ptr<CpuBackend> inner_;
};

// Without a logits observer every token is drawn by the backend where the logits are
// (ForwardSample: on the GPU for the CUDA backend); with one, the logits come to the host and
// are drawn there. Both draw the same tokens.
TEST(GeneratorTest, DrawsInTheBackendUnlessTheLogitsAreObserved) {
  CountingBackend backend(MakeBackend());
  GenerateOptions options;
  options.sampler = {0.8f, 0.9f, 40, 77};
  options.max_tokens = 12;
  options.prefill_chunk_tokens = 3;
  const std::vector<int32_t> prompt = Prompt();
  const int inner_chunks = static_cast<int>((prompt.size() + 2) / 3) - 1;
  std::unique_ptr<BackendState> s1 = NewState(backend);
  std::unique_ptr<BackendState> s2 = NewState(backend);

  GenerateResult in_backend = RunTurn(backend, s1.get(), prompt, options);
  ASSERT_EQ(in_backend.tokens.size(), 12u);
  EXPECT_EQ(backend.forward_sample_calls, 12) << "the last prompt chunk, then 11 fed tokens";
  EXPECT_EQ(backend.forward_calls, inner_chunks) << "only the inner prompt chunks";

  backend.forward_calls = backend.forward_sample_calls = 0;
  int observed = 0;
  options.observe_logits = [&](std::span<const float> logits) {
    EXPECT_EQ(logits.size(), static_cast<size_t>(backend.config().vocab_size));
    ++observed;
  };
  GenerateResult on_host = RunTurn(backend, s2.get(), prompt, options);
  EXPECT_EQ(backend.forward_sample_calls, 0);
  EXPECT_EQ(backend.forward_calls, inner_chunks + 12);
  EXPECT_EQ(observed, 12);
  EXPECT_EQ(on_host.tokens, in_backend.tokens);
  EXPECT_EQ(s1->num_tokens(), s2->num_tokens());
}

TEST(GeneratorTest, SameSeedSameTokens) {
  auto backend = MakeBackend();
  GenerateOptions options;
  options.sampler = {1.0f, 0.9f, 50, 1234};
  options.max_tokens = 24;
  std::unique_ptr<BackendState> s1 = NewState(*backend);
  std::unique_ptr<BackendState> s2 = NewState(*backend);
  std::unique_ptr<BackendState> s3 = NewState(*backend);
  GenerateResult a = RunTurn(*backend, s1.get(), Prompt(), options);
  GenerateResult b = RunTurn(*backend, s2.get(), Prompt(), options);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.tokens.size(), 24u);
  options.sampler.seed = 99;
  GenerateResult c = RunTurn(*backend, s3.get(), Prompt(), options);
  EXPECT_NE(a.tokens, c.tokens);  // 24 draws at temperature 1 coinciding would be astonishing
}

TEST(GeneratorTest, GreedyIsArgmaxOfLogits) {
  auto backend = MakeBackend();
  const ModelConfig& config = backend->config();
  GenerateOptions options;
  options.sampler.temperature = 0;
  options.max_tokens = 1;
  std::unique_ptr<BackendState> state = NewState(*backend);
  GenerateResult r = RunTurn(*backend, state.get(), Prompt(), options);
  std::unique_ptr<BackendState> again = NewState(*backend);
  std::vector<float> logits(config.vocab_size);
  std::vector<int32_t> prompt = Prompt();
  SequenceInput input{prompt, again.get()};
  ASSERT_TRUE(backend->Forward({&input, 1}, logits).ok());
  const int32_t argmax =
      static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  ASSERT_EQ(r.tokens.size(), 1u);
  EXPECT_EQ(r.tokens[0], argmax);
}

// ARCHITECTURE.md §3: every generated token but the last is fed; the last is pending.
TEST(GeneratorTest, LastTokenIsPendingAndNextTurnContinues) {
  auto backend = MakeBackend();
  GenerateOptions options;
  options.sampler.temperature = 0;
  options.max_tokens = 10;
  const std::vector<int32_t> prompt = Prompt();
  std::unique_ptr<BackendState> state = NewState(*backend);
  GenerateResult first = RunTurn(*backend, state.get(), prompt, options);
  ASSERT_EQ(first.finish, FinishReason::kLength);
  EXPECT_EQ(state->num_tokens(), static_cast<int64_t>(prompt.size() + first.tokens.size() - 1));
  EXPECT_EQ(first.pending_token, first.tokens.back());

  // Turn 2 on the session equals one fresh prefill of the whole history.
  std::vector<int32_t> turn2 = {first.pending_token, 65, 66, 67};
  GenerateResult second = RunTurn(*backend, state.get(), turn2, options);
  std::vector<int32_t> history = prompt;
  history.insert(history.end(), first.tokens.begin(), first.tokens.end() - 1);
  history.insert(history.end(), turn2.begin(), turn2.end());
  std::unique_ptr<BackendState> fresh = NewState(*backend);
  GenerateResult replay = RunTurn(*backend, fresh.get(), history, options);
  EXPECT_EQ(second.tokens, replay.tokens);
}

TEST(GeneratorTest, StopTokenEndsTheTurn) {
  auto backend = MakeBackend();
  GenerateOptions options;
  options.sampler.temperature = 0;
  options.max_tokens = 5;
  std::unique_ptr<BackendState> probe = NewState(*backend);
  GenerateResult free_run = RunTurn(*backend, probe.get(), Prompt(), options);
  ASSERT_GE(free_run.tokens.size(), 3u);
  // Declare the third greedy token a stop token: the turn ends there with kStop.
  options.stop_token_ids = {free_run.tokens[2]};
  std::unique_ptr<BackendState> state = NewState(*backend);
  GenerateResult r = RunTurn(*backend, state.get(), Prompt(), options);
  const auto first_stop =
      std::find(free_run.tokens.begin(), free_run.tokens.end(), free_run.tokens[2]);
  EXPECT_EQ(r.finish, FinishReason::kStop);
  EXPECT_EQ(r.tokens, std::vector<int32_t>(free_run.tokens.begin(), first_stop + 1));
}

TEST(GeneratorTest, CancelStopsAfterTheToken) {
  auto backend = MakeBackend();
  GenerateOptions options;
  options.max_tokens = 50;
  int seen = 0;
  std::unique_ptr<BackendState> state = NewState(*backend);
  absl::StatusOr<GenerateResult> r =
      Generate(*backend, state.get(), Prompt(), options, [&](int32_t) { return ++seen < 3; });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->finish, FinishReason::kCancelled);
  EXPECT_EQ(r->tokens.size(), 3u);
}

TEST(GeneratorTest, BadOptionsAndPromptsAreRefusedBeforeAnyChange) {
  auto backend = MakeBackend();
  const ModelConfig& config = backend->config();
  std::unique_ptr<BackendState> state = NewState(*backend);
  const std::vector<int32_t> prompt = Prompt();
  GenerateOptions options;
  auto expect_invalid = [&](const GenerateOptions& o, std::span<const int32_t> p,
                            const char* needle) {
    absl::StatusOr<GenerateResult> r = Generate(*backend, state.get(), p, o);
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << r.status();
    EXPECT_NE(r.status().message().find(needle), std::string_view::npos) << r.status();
    EXPECT_EQ(state->num_tokens(), 0);
  };
  GenerateOptions o = options;
  o.sampler.temperature = -1;
  expect_invalid(o, prompt, "temperature");
  o = options;
  o.sampler.temperature = std::numeric_limits<float>::quiet_NaN();
  expect_invalid(o, prompt, "temperature");
  o = options;
  o.sampler.top_p = 0;
  expect_invalid(o, prompt, "top_p");
  o = options;
  o.sampler.top_p = 1.5f;
  expect_invalid(o, prompt, "top_p");
  o = options;
  o.sampler.top_k = -2;
  expect_invalid(o, prompt, "top_k");
  o = options;
  o.max_tokens = 0;
  expect_invalid(o, prompt, "max_tokens");
  expect_invalid(options, {}, "empty");
  const std::vector<int32_t> bad = {1, 2, static_cast<int32_t>(config.vocab_size) + 5};
  expect_invalid(options, bad, "outside the vocabulary");
  const std::vector<int32_t> too_long(config.model_max_length + 1, 65);
  expect_invalid(options, too_long, "context limit");
  const std::vector<int32_t> exactly_full(config.model_max_length, 65);
  expect_invalid(options, exactly_full, "no room");
}

// Positions run 0..model_max_length-1 and the pending token needs one: a prompt must leave a
// position free, and decode stops when the next pending token would take the last one.
TEST(GeneratorTest, ContextLimitEdges) {
  auto weights = std::make_shared<ModelWeights>(*TinyModel().weights);
  weights->config.model_max_length = 20;
  auto backend = CpuBackend::Create(weights);
  ASSERT_TRUE(backend.ok());
  GenerateOptions options;
  options.max_tokens = 100;

  std::unique_ptr<BackendState> full = NewState(**backend);
  const std::vector<int32_t> twenty(20, 65);
  absl::StatusOr<GenerateResult> r = Generate(**backend, full.get(), twenty, options);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << r.status();
  EXPECT_EQ(full->num_tokens(), 0);

  std::unique_ptr<BackendState> nineteen_state = NewState(**backend);
  const std::vector<int32_t> nineteen(19, 65);
  r = Generate(**backend, nineteen_state.get(), nineteen, options);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens.size(), 1u);
  EXPECT_EQ(r->finish, FinishReason::kLength);
  EXPECT_EQ(nineteen_state->num_tokens(), 19);

  std::unique_ptr<BackendState> ten_state = NewState(**backend);
  const std::vector<int32_t> ten(10, 65);
  r = Generate(**backend, ten_state.get(), ten, options);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens.size(), 10u);  // positions 10..19; the last one is pending
  EXPECT_EQ(r->finish, FinishReason::kLength);
  EXPECT_EQ(ten_state->num_tokens(), 19);
}

// Broken numbers never become tokens.
TEST(GeneratorTest, NanLogitsAreAnInternalError) {
  auto weights = std::make_shared<ModelWeights>(*TinyModel().weights);
  weights->final_norm[0] = std::numeric_limits<float>::quiet_NaN();
  auto backend = CpuBackend::Create(weights);
  ASSERT_TRUE(backend.ok());
  std::unique_ptr<BackendState> state = NewState(**backend);
  absl::StatusOr<GenerateResult> r = Generate(**backend, state.get(), Prompt(), GenerateOptions{});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(absl::IsInternal(r.status())) << r.status();
  // The same when the logits come to the host for an observer.
  GenerateOptions observed;
  observed.observe_logits = [](std::span<const float>) {};
  std::unique_ptr<BackendState> state2 = NewState(**backend);
  r = Generate(**backend, state2.get(), Prompt(), observed);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(absl::IsInternal(r.status())) << r.status();
}

// A GPU worker loads the config, fingerprint and tokenizer only; they equal a full load's.
TEST(LoadModelTest, WithoutWeightsKeepsConfigFingerprintAndTokenizer) {
  const std::string dir = ::kls::testing::WriteModel("tiny", 7);
  absl::StatusOr<LoadedModel> full = LoadModel(dir);
  absl::StatusOr<LoadedModel> light = LoadModelWithoutWeights(dir);
  ASSERT_TRUE(full.ok()) << full.status();
  ASSERT_TRUE(light.ok()) << light.status();
  EXPECT_EQ(light->weights->fingerprint, full->weights->fingerprint);
  EXPECT_EQ(light->weights->config.vocab_size, full->weights->config.vocab_size);
  EXPECT_EQ(light->weights->config.num_hidden_layers, full->weights->config.num_hidden_layers);
  EXPECT_TRUE(light->weights->embed.empty());
  EXPECT_TRUE(light->weights->layers.empty());
  EXPECT_EQ(light->tokenizer->vocab_size(), full->tokenizer->vocab_size());
  EXPECT_FALSE(LoadModelWithoutWeights(dir + "/missing").ok());
}

}  // namespace
}  // namespace kls::engine

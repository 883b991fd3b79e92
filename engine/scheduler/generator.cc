#include "engine/scheduler/generator.h"

#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/model/fingerprint.h"

namespace kls::engine {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

namespace {

// The tokenizer of `model_dir`, which must cover exactly the model's vocabulary: every id the
// model can sample must decode, and every id the tokenizer makes must embed.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadMatchingTokenizer(const std::string& model_dir,
                                                                 const ModelConfig& config) {
  KLS_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(model_dir));
  if (tokenizer->vocab_size() != config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        model_dir, ": the tokenizer has ", tokenizer->vocab_size(),
        " ids (tiktoken.model ranks + 256 special slots) but config.json vocab_size is ",
        config.vocab_size));
  }
  return tokenizer;
}

}  // namespace

absl::StatusOr<LoadedModel> LoadModel(const std::string& model_dir) {
  LoadedModel model;
  KLS_ASSIGN_OR_RETURN(std::unique_ptr<ModelWeights> weights, LoadModelWeights(model_dir));
  KLS_ASSIGN_OR_RETURN(model.tokenizer, LoadMatchingTokenizer(model_dir, weights->config));
  model.weights = std::move(weights);
  return model;
}

absl::StatusOr<LoadedModel> LoadModelWithoutWeights(const std::string& model_dir) {
  LoadedModel model;
  auto weights = std::make_unique<ModelWeights>();
  KLS_ASSIGN_OR_RETURN(weights->config, LoadModelConfig(model_dir));
  KLS_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(model_dir));
  weights->fingerprint = ComputeModelFingerprint(weights->config, *checkpoint);
  KLS_ASSIGN_OR_RETURN(model.tokenizer, LoadMatchingTokenizer(model_dir, weights->config));
  model.weights = std::move(weights);
  return model;
}

absl::Status ValidateSamplerConfig(const kernels::SamplerConfig& c) {
  if (!std::isfinite(c.temperature) || c.temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", c.temperature));
  }
  if (!(c.top_p > 0 && c.top_p <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", c.top_p));
  }
  if (c.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", c.top_k));
  }
  return absl::OkStatus();
}

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

absl::StatusOr<GenerateResult> Generate(Backend& backend, BackendState* state,
                                        std::span<const int32_t> prompt,
                                        const GenerateOptions& options,
                                        const std::function<bool(int32_t)>& on_token) {
  const ModelConfig& config = backend.config();
  KLS_RETURN_IF_ERROR(ValidateSamplerConfig(options.sampler));
  if (options.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be >= 1, got ", options.max_tokens));
  }
  if (options.prefill_chunk_tokens < 1) {
    return absl::InvalidArgumentError("prefill_chunk_tokens must be >= 1");
  }
  if (state == nullptr) return absl::InvalidArgumentError("generate: no session state");
  if (prompt.empty()) return absl::InvalidArgumentError("generate: the prompt is empty");
  for (int32_t id : prompt) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt token id ", id, " is outside the vocabulary [0, ", config.vocab_size, ")"));
    }
  }
  // The sampled token takes a position too (it is fed at the next turn), so the prompt must
  // leave at least one.
  const int64_t context = state->num_tokens() + static_cast<int64_t>(prompt.size());
  if (context >= config.model_max_length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", prompt.size(), " tokens (", context, " with the session's history) ",
        "leaves no room for a generated token within the context limit of ",
        config.model_max_length, " tokens"));
  }

  GenerateResult result;
  result.prompt_tokens = static_cast<int64_t>(prompt.size());
  std::vector<float> logits(config.vocab_size);
  // Feeds `tokens` and draws the next token from the logits of the last one. With an observer
  // the logits come to the host (Forward) and are drawn from here; otherwise the backend draws
  // where the logits are (ForwardSample: the CUDA backend copies back only the token). Either
  // way the draw is SampleReference's with counter = the drawn token's position.
  const auto feed_and_draw = [&](std::span<const int32_t> tokens) -> absl::StatusOr<int32_t> {
    SequenceInput input{tokens, state};
    int32_t token = -1;
    if (options.observe_logits) {
      KLS_RETURN_IF_ERROR(backend.Forward({&input, 1}, logits));
      options.observe_logits(logits);
      if (kernels::SamplableLogits(logits.data(), static_cast<int64_t>(logits.size()))) {
        token = kernels::SampleReference(logits.data(), config.vocab_size, options.sampler,
                                         static_cast<uint64_t>(state->num_tokens()));
      }
    } else {
      const SampleRequest request{options.sampler,
                                  static_cast<uint64_t>(state->num_tokens()) + tokens.size()};
      KLS_RETURN_IF_ERROR(backend.ForwardSample({&input, 1}, {&request, 1}, {&token, 1}));
    }
    // A NaN or all -inf row means the forward pass broke; never turn it into a token.
    if (token < 0) {
      return absl::InternalError(absl::StrCat("the logits at position ", state->num_tokens(),
                                              " contain NaN or no finite value"));
    }
    return token;
  };

  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<int32_t> token;
  for (size_t begin = 0; begin < prompt.size(); begin += options.prefill_chunk_tokens) {
    const size_t len =
        std::min(prompt.size() - begin, static_cast<size_t>(options.prefill_chunk_tokens));
    if (begin + len < prompt.size()) {  // an inner chunk: its logits are not needed
      SequenceInput input{prompt.subspan(begin, len), state};
      KLS_RETURN_IF_ERROR(backend.Forward({&input, 1}, logits));
    } else {
      token = feed_and_draw(prompt.subspan(begin, len));
    }
  }
  result.prefill_seconds = SecondsSince(t0);

  const auto t1 = std::chrono::steady_clock::now();
  while (true) {
    if (!token.ok()) return token.status();
    result.tokens.push_back(*token);
    result.pending_token = *token;
    if (on_token && !on_token(*token)) {
      result.finish = FinishReason::kCancelled;
      break;
    }
    if (std::find(options.stop_token_ids.begin(), options.stop_token_ids.end(), *token) !=
        options.stop_token_ids.end()) {
      result.finish = FinishReason::kStop;
      break;
    }
    // Feeding the token must leave room for it in the context.
    if (static_cast<int>(result.tokens.size()) >= options.max_tokens ||
        state->num_tokens() + 1 >= config.model_max_length) {
      result.finish = FinishReason::kLength;
      break;
    }
    token = feed_and_draw(std::span<const int32_t>(&result.tokens.back(), 1));
  }
  result.decode_seconds = SecondsSince(t1);
  return result;
}

}  // namespace kls::engine

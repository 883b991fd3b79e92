// Single-session generation on a Backend: chunked prefill, then sampling and decode until a stop
// token, the token limit or the context limit. The continuous-batching scheduler builds on it.
#ifndef KLS_ENGINE_SCHEDULER_GENERATOR_H_
#define KLS_ENGINE_SCHEDULER_GENERATOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/model/weights.h"
#include "engine/state/session_state.h"
#include "engine/tokenizer/tokenizer.h"
#include "kernels/sampling/sampling_ref.h"

namespace kls::engine {

// Weights and tokenizer of one model directory, checked against each other.
struct LoadedModel {
  std::shared_ptr<const ModelWeights> weights;
  std::unique_ptr<Tokenizer> tokenizer;
};

// Loads config, weights and tokenizer. Errors name the file; INVALID_ARGUMENT unless the
// tokenizer's id count equals the config's vocab_size.
absl::StatusOr<LoadedModel> LoadModel(const std::string& model_dir);

// As LoadModel, but `weights` holds only the config and the fingerprint (no tensors): for a
// backend that loads the weights itself (the CUDA backend streams them to the GPU). The
// checkpoint is still opened and its headers validated for the fingerprint.
absl::StatusOr<LoadedModel> LoadModelWithoutWeights(const std::string& model_dir);

// INVALID_ARGUMENT naming the field unless temperature is finite and >= 0, top_p in (0, 1] and
// top_k >= 0.
absl::Status ValidateSamplerConfig(const kernels::SamplerConfig& config);

enum class FinishReason { kStop, kLength, kCancelled };
std::string_view FinishReasonName(FinishReason reason);

struct GenerateOptions {
  kernels::SamplerConfig sampler;
  int max_tokens = 256;                 // >= 1
  std::vector<int32_t> stop_token_ids;  // a sampled stop token ends the turn (and is returned)
  int prefill_chunk_tokens = 1024;      // prefill in pieces of at most this many tokens
  // If set, sees the logits [vocab] each token is drawn from, before the draw (for dumps and
  // golden comparisons); the logits then come to the host for every token.
  std::function<void(std::span<const float>)> observe_logits;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // every sampled token, including a final stop token
  FinishReason finish = FinishReason::kLength;
  // The last sampled token: NOT fed into the state (ARCHITECTURE.md §3); it opens the next
  // turn's prefill. -1 if nothing was sampled.
  int32_t pending_token = -1;
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

// Feeds `prompt` (>= 1 token) into `state`, then samples up to options.max_tokens tokens,
// feeding each one except the last back into the state. `on_token` sees each sampled token as
// it is drawn; returning false stops the turn (kCancelled). The n-th draw uses sampler counter
// = the token's position in the session, so the same seed and history give the same tokens.
// Each draw happens in the backend (Backend::ForwardSample; the CUDA backend samples on the GPU
// and copies back only the token) unless options.observe_logits wants the logits on the host,
// which then draws the same token there. Errors: INVALID_ARGUMENT for bad options, an empty prompt,
// ids outside the vocabulary or a prompt that leaves no position for a generated token within the
// context limit — all checked before the state changes; INTERNAL if the logits hold NaN or no
// finite value.
absl::StatusOr<GenerateResult> Generate(Backend& backend, BackendState* state,
                                        std::span<const int32_t> prompt,
                                        const GenerateOptions& options,
                                        const std::function<bool(int32_t)>& on_token = nullptr);

}  // namespace kls::engine

#endif  // KLS_ENGINE_SCHEDULER_GENERATOR_H_

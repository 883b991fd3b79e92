// The one interface every backend (cpu, cuda) implements: a varlen forward pass over a batch
// that mixes prefill chunks and decode tokens, each continuing its own SessionState.
#ifndef KLS_ENGINE_BACKEND_BACKEND_H_
#define KLS_ENGINE_BACKEND_BACKEND_H_

#include <cstdint>
#include <span>
#include <string_view>

#include "absl/status/status.h"
#include "engine/model/config.h"
#include "engine/state/session_state.h"

namespace kls::engine {

struct SequenceInput {
  std::span<const int32_t> tokens;  // new tokens of this sequence (>= 1)
  SessionState* state = nullptr;    // continued in place; distinct per entry
};

// Not thread-safe: one engine thread owns a backend.
class Backend {
 public:
  virtual ~Backend() = default;

  // Runs the new tokens of every sequence through the model, appending them to each state, and
  // writes the logits of the last new position of sequence n to logits[n * vocab, (n+1) * vocab).
  // Validates everything first (token ids, context limit, state shapes, distinct states, logits
  // size) and returns INVALID_ARGUMENT naming the problem; on error no state has changed.
  virtual absl::Status Forward(std::span<const SequenceInput> batch, std::span<float> logits) = 0;

  virtual const ModelConfig& config() const = 0;
  virtual std::string_view name() const = 0;
};

}  // namespace kls::engine

#endif  // KLS_ENGINE_BACKEND_BACKEND_H_

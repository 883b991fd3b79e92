// The one interface every backend (cpu, cuda) implements: it owns the model state of the
// sessions it computes on (host vectors for the CPU backend, device pools for the CUDA backend)
// and runs a varlen forward pass over a batch that mixes prefill chunks and decode tokens.
//
// Session state crosses the boundary only in host form (SessionState): ImportState after a
// restore from the store, ExportState for a snapshot. Everything else (fork, rollback of a
// failed turn, the forward pass) stays inside the backend, so a GPU-resident session is never
// copied to the host on the hot path.
#ifndef KLS_ENGINE_BACKEND_BACKEND_H_
#define KLS_ENGINE_BACKEND_BACKEND_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/model/config.h"
#include "engine/state/session_state.h"
#include "kernels/sampling/sampling_ref.h"

namespace kls::engine {

class Backend;

// A session's state as one backend holds it. Created only by that backend; used, copied and
// destroyed only on the thread that owns the backend (destroying it returns its memory to the
// backend, which must outlive it).
class BackendState {
 public:
  virtual ~BackendState() = default;
  BackendState(const BackendState&) = delete;
  BackendState& operator=(const BackendState&) = delete;

  // Tokens fed so far (the length of the MLA caches).
  virtual int64_t num_tokens() const = 0;
  // Bytes of memory this state holds in its backend (KDA + conv + MLA cache); what the
  // worker's hot-session budget counts.
  virtual int64_t ByteSize() const = 0;
  const Backend* owner() const { return owner_; }
  // Unique among the states of the process and never reused, unlike an address: what a
  // checkpoint names its state by, so a checkpoint of a destroyed state cannot roll back a new
  // one that happens to live at the same address.
  uint64_t id() const { return id_; }

  // Rollback bookkeeping, kept by Backend::Rollback. rollbacks(): how many this state has had.
  // PrefixKept(since, tokens): whether no rollback after the first `since` went below `tokens`,
  // i.e. whether a checkpoint taken after `since` rollbacks at `tokens` tokens still describes
  // this state's first `tokens` tokens (a rollback to an earlier checkpoint and new tokens would
  // otherwise make a later checkpoint restore a KDA state over a different cache).
  uint64_t rollbacks() const { return rollbacks_; }
  bool PrefixKept(uint64_t since, int64_t tokens) const {
    for (const auto& [number, kept] : floors_) {
      if (number > since) return kept >= tokens;  // the lowest target after `since`
    }
    return true;
  }
  void NoteRollback(int64_t tokens) {
    ++rollbacks_;
    while (!floors_.empty() && floors_.back().second >= tokens) floors_.pop_back();
    floors_.emplace_back(rollbacks_, tokens);
  }

 protected:
  explicit BackendState(const Backend* owner) : owner_(owner), id_(NextId()) {}

 private:
  static uint64_t NextId() {
    static std::atomic<uint64_t> next{1};
    return next.fetch_add(1, std::memory_order_relaxed);
  }

  const Backend* owner_;
  const uint64_t id_;
  uint64_t rollbacks_ = 0;
  // (rollback number, tokens kept) of the rollbacks that no later one went at or below: both
  // increase from the front, so the first entry past a number holds the lowest target since.
  std::vector<std::pair<uint64_t, int64_t>> floors_;
};

// What a rollback returns to: the fixed-size KDA state and the token count at checkpoint time
// (MLA caches are truncated instead of copied).
class StateCheckpoint {
 public:
  virtual ~StateCheckpoint() = default;
  StateCheckpoint(const StateCheckpoint&) = delete;
  StateCheckpoint& operator=(const StateCheckpoint&) = delete;

  virtual int64_t num_tokens() const = 0;
  const Backend* owner() const { return owner_; }
  // BackendState::id() of the state it was taken of, and its rollbacks() then.
  uint64_t state_id() const { return state_id_; }
  uint64_t state_rollbacks() const { return state_rollbacks_; }

 protected:
  StateCheckpoint(const Backend* owner, const BackendState& of)
      : owner_(owner), state_id_(of.id()), state_rollbacks_(of.rollbacks()) {}

 private:
  const Backend* owner_;
  const uint64_t state_id_;
  const uint64_t state_rollbacks_;
};

// How to draw the next token of a sequence (Backend::ForwardSample).
struct SampleRequest {
  kernels::SamplerConfig config;
  uint64_t counter = 0;  // SampleReference's per-draw counter (the engine: the token's position)
};

struct SequenceInput {
  std::span<const int32_t> tokens;  // new tokens of this sequence (>= 1)
  BackendState* state = nullptr;    // continued in place; distinct per entry, from this backend
};

// Not thread-safe: one engine thread owns a backend and every state it created.
class Backend {
 public:
  virtual ~Backend() = default;

  // A fresh session: zero KDA state, empty caches. RESOURCE_EXHAUSTED when the backend's state
  // memory is used up.
  virtual absl::StatusOr<std::unique_ptr<BackendState>> NewState() = 0;

  // An independent copy (a fork): later forwards of either leave the other unchanged.
  // RESOURCE_EXHAUSTED as for NewState; INVALID_ARGUMENT for a state of another backend.
  virtual absl::StatusOr<std::unique_ptr<BackendState>> CloneState(const BackendState& state) = 0;

  // Copies a host state (a decoded snapshot) in. INVALID_ARGUMENT unless it matches the model's
  // shapes and holds every MLA row (mla_first_row() == 0); RESOURCE_EXHAUSTED as for NewState.
  virtual absl::StatusOr<std::unique_ptr<BackendState>> ImportState(const SessionState& host) = 0;

  // Writes the host form of `state` into `*host`: every KDA layer's recurrent and conv state,
  // num_tokens, and the MLA cache rows of tokens [mla_first_row, num_tokens) with
  // host->mla_first_row() == mla_first_row (a snapshot only needs the rows the store lacks).
  // INVALID_ARGUMENT for a state of another backend or a row outside [0, num_tokens].
  virtual absl::Status ExportState(const BackendState& state, int64_t mla_first_row,
                                   SessionState* host) = 0;

  // Remembers what Rollback returns `state` to. RESOURCE_EXHAUSTED when there is no memory
  // for the copy of the KDA state.
  virtual absl::StatusOr<std::unique_ptr<StateCheckpoint>> Checkpoint(
      const BackendState& state) = 0;
  // Returns `state` to `checkpoint`, which must have been taken by this backend of this very
  // state (not of a destroyed one, nor by another backend), whose first checkpoint.num_tokens()
  // tokens must still be those of the checkpoint: no rollback below them since it was taken
  // (INVALID_ARGUMENT otherwise; the state is then unchanged).
  virtual absl::Status Rollback(const StateCheckpoint& checkpoint, BackendState* state) = 0;

  // Runs the new tokens of every sequence through the model, appending them to each state, and
  // writes the logits of the last new position of sequence n to logits[n * vocab, (n+1) * vocab).
  // Validates everything first (token ids, context limit, state owners, distinct states, logits
  // size) and returns INVALID_ARGUMENT naming the problem; on such an error no state has
  // changed. RESOURCE_EXHAUSTED when cache memory runs out (no state changed). Other errors
  // (a device fault) leave the states of the batch unspecified and may be sticky: healthy()
  // then says so.
  virtual absl::Status Forward(std::span<const SequenceInput> batch, std::span<float> logits) = 0;

  // Forward, then the next token of every sequence from its logits: tokens[n] =
  // SampleReference(logits of sequence n, vocab, requests[n].config, requests[n].counter), or -1
  // when those logits hold a NaN or no finite value (SamplableLogits). The logits stay in the
  // backend (the CUDA backend samples on the GPU and copies back only the tokens). Errors as
  // Forward's, plus INVALID_ARGUMENT (nothing changed) when requests or tokens do not have one
  // entry per sequence.
  virtual absl::Status ForwardSample(std::span<const SequenceInput> batch,
                                     std::span<const SampleRequest> requests,
                                     std::span<int32_t> tokens) = 0;

  // OK while the backend can run; a sticky device error otherwise (the worker then stops
  // serving, ARCHITECTURE.md §8).
  virtual absl::Status healthy() const { return absl::OkStatus(); }

  virtual const ModelConfig& config() const = 0;
  virtual std::string_view name() const = 0;
};

// The checks every Backend::Rollback makes before touching anything: `checkpoint` was taken by
// `backend` of `state` itself (BackendState::id()), no rollback since went below its tokens
// (BackendState::PrefixKept), and the state still has at least that many tokens.
// INVALID_ARGUMENT naming the failed check otherwise.
inline absl::Status CheckRollback(const Backend* backend, const StateCheckpoint& checkpoint,
                                  const BackendState* state) {
  if (state == nullptr || state->owner() != backend || checkpoint.owner() != backend ||
      checkpoint.state_id() != state->id()) {
    return absl::InvalidArgumentError("rollback: the checkpoint was not taken of this state");
  }
  if (!state->PrefixKept(checkpoint.state_rollbacks(), checkpoint.num_tokens())) {
    return absl::InvalidArgumentError(
        "rollback: a later rollback went below the checkpoint's tokens, which differ now");
  }
  if (state->num_tokens() < checkpoint.num_tokens()) {
    return absl::InvalidArgumentError("rollback: the state has fewer tokens than the checkpoint");
  }
  return absl::OkStatus();
}

// Backend::ForwardSample's argument check: a non-empty batch and one request and one token
// slot per sequence; INVALID_ARGUMENT with the three sizes otherwise.
inline absl::Status CheckSampleSpans(std::span<const SequenceInput> batch,
                                     std::span<const SampleRequest> requests,
                                     std::span<const int32_t> tokens) {
  if (batch.empty() || requests.size() != batch.size() || tokens.size() != batch.size()) {
    return absl::InvalidArgumentError(absl::StrCat("forward: ", batch.size(), " sequences but ",
                                                   requests.size(), " sample requests and ",
                                                   tokens.size(), " token slots"));
  }
  return absl::OkStatus();
}

}  // namespace kls::engine

#endif  // KLS_ENGINE_BACKEND_BACKEND_H_

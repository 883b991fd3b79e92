// The worker's engine: one thread that owns the backend, every hot session's state and the
// continuous-batching loop (ARCHITECTURE.md §3, §5; HOUSE_STYLE.md H11). gRPC threads call the
// public methods, which only enqueue; results come back through callbacks and TurnSinks.
//
// Sessions: a hot session is a SessionState plus its token history and record. Every turn first
// reads the session record from the store (a small read) and uses the hot copy only if the
// store still holds the version this worker last wrote — so a session that moved to another
// worker and back is restored, never continued from a stale copy. A cold session is restored on
// the I/O pool (state chunks + MLA blocks + token history); a corrupt or missing chunk falls back
// to rebuilding the state by re-prefilling the token history.
//
// Turn atomicity: before a turn the engine copies the fixed-size KDA/conv state and remembers the
// token count; cancellation or a failure restores the copy and truncates the MLA cache, so the
// session is exactly as before. Commit policies: SYNC sends the final message after the store
// acknowledged the snapshot (a failed commit rolls the turn back); ASYNC sends it first; NONE
// writes nothing now — the session is written back when it is evicted or the worker drains.
#ifndef KLS_SERVICES_WORKER_ENGINE_H_
#define KLS_SERVICES_WORKER_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/backend/backend.h"
#include "engine/scheduler/generator.h"
#include "kernels/sampling/sampling_ref.h"
#include "kls/v1/sessions.pb.h"
#include "kls/v1/worker.pb.h"
#include "services/store/session_store.h"

namespace kls::worker {

struct EngineOptions {
  int64_t hot_budget_bytes = int64_t{2} << 30;  // session state held in memory (LRU beyond)
  int max_running_turns = 64;                   // turns batched together
  int step_prefill_tokens = 512;                // prefill tokens per step (decodes come on top)
  int max_tokens_limit = 8192;                  // the largest max_tokens a request may ask for
  int retained_versions = 3;                    // older state versions kept in the store
  int recent_turns = 16;                        // request_id results remembered per session
  int io_threads = 2;                           // store reads (restores, records)
  // Called once, from the engine thread, when the backend fails for good (a sticky GPU error,
  // ARCHITECTURE.md §8); the worker then reports NOT_SERVING. Turns are refused afterwards.
  std::function<void(const absl::Status&)> on_backend_failure;
};

// A validated turn (built on a gRPC thread by the service).
struct TurnParams {
  std::string tenant;
  std::string session_id;
  std::string request_id;               // empty: not idempotent
  std::vector<int32_t> input;           // rendered input tokens, >= 1, all in the vocabulary
  kernels::SamplerConfig sampler;       // validated; seed resolved
  int max_tokens = 256;                 // >= 1
  std::vector<int32_t> stop_token_ids;  // a sampled one ends the turn
  std::vector<std::string> stop_strings;
  kls::v1::CommitPolicy commit = kls::v1::COMMIT_POLICY_SYNC;
  absl::Time enqueue_time;
  // Merged into the record's metadata at commit (an empty value removes the key).
  std::vector<std::pair<std::string, std::string>> metadata;
  bool special_tokens_in_text = false;       // decode special tokens (but not the stop token)
  std::optional<uint64_t> expected_version;  // ABORTED when the session is at another version
};

// Receives one turn's output. Called from the engine thread (tokens) and the engine or commit
// path (done); implementations must not block. OnDone is called exactly once, last.
class TurnSink {
 public:
  virtual ~TurnSink() = default;
  virtual void OnTokens(std::span<const int32_t> ids, std::string text) = 0;
  // On success `final` carries finish_reason, version, usage, timings and any remaining text.
  virtual void OnDone(const absl::Status& status, kls::v1::GenerateResponse final) = 0;
  // Polled between steps; true stops the turn (it is rolled back, never committed).
  virtual bool IsCancelled() const = 0;
};

template <typename T>
using Callback = absl::AnyInvocable<void(absl::StatusOr<T>)>;

// Thread-safe: every public method may be called from any thread. Callbacks run on the engine
// thread or an I/O thread and must not block.
class Engine {
 public:
  // `store` must outlive the engine. Starts the engine thread.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      const EngineOptions& options, std::shared_ptr<const engine::LoadedModel> model,
      std::unique_ptr<engine::Backend> backend, store::SessionStore* store);
  ~Engine();  // Stops the thread; turns still running end with UNAVAILABLE.

  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  void Generate(TurnParams params, std::shared_ptr<TurnSink> sink);

  // `system_tokens` is the rendered system prompt (may be empty); it becomes the first pending
  // input. ALREADY_EXISTS if the id is taken.
  void CreateSession(std::string tenant, kls::v1::CreateSessionRequest request,
                     std::vector<int32_t> system_tokens, Callback<kls::v1::Session> done);
  void GetSession(std::string tenant, kls::v1::GetSessionRequest request,
                  Callback<kls::v1::Session> done);
  void ListSessions(std::string tenant, kls::v1::ListSessionsRequest request,
                    Callback<kls::v1::ListSessionsResponse> done);
  void DeleteSession(std::string tenant, kls::v1::DeleteSessionRequest request,
                     Callback<kls::v1::DeleteSessionResponse> done);
  void ForkSession(std::string tenant, kls::v1::ForkSessionRequest request,
                   Callback<kls::v1::Session> done);

  kls::v1::Load GetLoad() const;

  // Stops admitting turns (new ones fail with UNAVAILABLE), waits for running turns and pending
  // commits, then writes back every hot session whose latest turn is not yet durable. Returns
  // DEADLINE_EXCEEDED if that takes longer than `timeout` (what is left is lost only for NONE
  // turns; SYNC/ASYNC turns are already committed or failed).
  absl::Status Drain(absl::Duration timeout);

  const engine::ModelConfig& config() const;
  const engine::Tokenizer& tokenizer() const;
  const EngineOptions& options() const;

  class Impl;

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kls::worker

#endif  // KLS_SERVICES_WORKER_ENGINE_H_

// The model state of one session: everything a later prefill or decode call continues from.
#ifndef KLS_ENGINE_STATE_SESSION_STATE_H_
#define KLS_ENGINE_STATE_SESSION_STATE_H_

#include <cstdint>
#include <vector>

#include "engine/model/config.h"

namespace kls::engine {

// Per KDA layer (H heads, K = V head dim, W conv width, HK = H*K). Layouts are the snapshot
// layouts of ARCHITECTURE.md §4.
struct KdaLayerState {
  std::vector<float> recurrent;  // [H, K, V] fp32, V contiguous
  std::vector<float> conv;       // [3 streams (q, k, v)][W-1][HK], oldest input first (pre-conv)
};

// Per MLA layer: the normalized latent and the shared k_pe of the tokens
// [mla_first_row(), num_tokens()) of the session.
struct MlaLayerState {
  std::vector<float> latent;  // [num_tokens - mla_first_row, Dc + Dr]
};

// The host form of a session's model state: what the CPU backend computes on and what
// snapshots are encoded from and decoded into (backends that keep state elsewhere export and
// import it, engine/backend/backend.h). An exported state may hold only the MLA rows from
// mla_first_row() on (the rows a snapshot still needs); a state that backends compute on holds
// them all (mla_first_row() == 0).
// Value type; copying it forks the session. Not thread-safe: one owner (the engine thread).
class SessionState {
 public:
  SessionState() = default;
  // Fresh (zero) state for a model: sized KDA states, empty caches, num_tokens 0.
  explicit SessionState(const ModelConfig& config);

  int64_t num_tokens() const { return num_tokens_; }
  void set_num_tokens(int64_t n) { num_tokens_ = n; }
  // The first token whose MLA cache rows are held (see the class comment).
  int64_t mla_first_row() const { return mla_first_row_; }
  void set_mla_first_row(int64_t row) { mla_first_row_ = row; }

  std::vector<KdaLayerState>& kda() { return kda_; }
  const std::vector<KdaLayerState>& kda() const { return kda_; }
  std::vector<MlaLayerState>& mla() { return mla_; }
  const std::vector<MlaLayerState>& mla() const { return mla_; }

  // Drops the MLA cache rows of tokens [n, num_tokens()) and sets num_tokens() = n
  // (mla_first_row() <= n <= num_tokens(); otherwise nothing changes). The KDA state is not
  // touched: callers restore it from a copy (the engine rolls a failed turn back this way, in
  // O(fixed state) rather than copying the cache).
  void TruncateTokens(int64_t n);

  // Bytes of state held (KDA + conv + MLA cache).
  int64_t ByteSize() const;

  // True when every buffer has the size that model's shapes need (KDA state, conv window, and
  // MLA caches of num_tokens - mla_first_row rows), so kernels may index them without further
  // checks. Backends compute only on states that also have mla_first_row() == 0.
  bool MatchesConfig(const ModelConfig& config) const;

 private:
  int64_t num_tokens_ = 0;
  int64_t mla_first_row_ = 0;
  int mla_cache_dim_ = 0;
  std::vector<KdaLayerState> kda_;
  std::vector<MlaLayerState> mla_;
};

}  // namespace kls::engine

#endif  // KLS_ENGINE_STATE_SESSION_STATE_H_

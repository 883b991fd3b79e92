#include "engine/state/session_state.h"

namespace kls::engine {

SessionState::SessionState(const ModelConfig& config) : mla_cache_dim_(config.mla_cache_dim()) {
  const int64_t h = config.linear_attn_config.num_heads;
  const int64_t k = config.linear_attn_config.head_dim;
  const int64_t w = config.linear_attn_config.short_conv_kernel_size;
  kda_.resize(config.num_kda_layers());
  for (KdaLayerState& s : kda_) {
    s.recurrent.assign(h * k * k, 0.0f);
    s.conv.assign(3 * (w - 1) * h * k, 0.0f);
  }
  mla_.resize(config.num_mla_layers());
}

void SessionState::TruncateTokens(int64_t n) {
  if (n < mla_first_row_ || n > num_tokens_) return;
  for (MlaLayerState& s : mla_) {
    s.latent.resize(static_cast<size_t>(n - mla_first_row_) * mla_cache_dim_);
  }
  num_tokens_ = n;
}

int64_t SessionState::ByteSize() const {
  int64_t bytes = 0;
  for (const KdaLayerState& s : kda_) bytes += (s.recurrent.size() + s.conv.size()) * 4;
  for (const MlaLayerState& s : mla_) bytes += s.latent.size() * 4;
  return bytes;
}

bool SessionState::MatchesConfig(const ModelConfig& config) const {
  const int64_t h = config.linear_attn_config.num_heads;
  const int64_t k = config.linear_attn_config.head_dim;
  const int64_t w = config.linear_attn_config.short_conv_kernel_size;
  if (static_cast<int>(kda_.size()) != config.num_kda_layers()) return false;
  if (static_cast<int>(mla_.size()) != config.num_mla_layers()) return false;
  if (mla_cache_dim_ != config.mla_cache_dim()) return false;
  for (const KdaLayerState& s : kda_) {
    if (static_cast<int64_t>(s.recurrent.size()) != h * k * k) return false;
    if (static_cast<int64_t>(s.conv.size()) != 3 * (w - 1) * h * k) return false;
  }
  if (mla_first_row_ < 0 || mla_first_row_ > num_tokens_) return false;
  for (const MlaLayerState& s : mla_) {
    if (static_cast<int64_t>(s.latent.size()) != (num_tokens_ - mla_first_row_) * mla_cache_dim_) {
      return false;
    }
  }
  return true;
}

}  // namespace kls::engine

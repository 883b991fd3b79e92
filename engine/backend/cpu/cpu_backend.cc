#include "engine/backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/backend/cpu/cpu_ops.h"
#include "kernels/conv/conv_ref.h"
#include "kernels/kda/kda_ref.h"
#include "kernels/mla/mla_ref.h"
#include "kernels/norm/norm_ref.h"

namespace kls::engine {

struct CpuBackend::Packed {
  std::vector<int64_t> cu_seqlens;    // [N + 1]
  std::vector<SessionState*> states;  // [N]
  int64_t num_tokens() const { return cu_seqlens.back(); }
  int64_t length(size_t n) const { return cu_seqlens[n + 1] - cu_seqlens[n]; }
};

absl::StatusOr<std::unique_ptr<CpuBackend>> CpuBackend::Create(
    std::shared_ptr<const ModelWeights> weights, CpuBackendOptions options) {
  if (weights == nullptr) return absl::InvalidArgumentError("CpuBackend: no weights");
  if (options.kda_recurrent_max_tokens < 1 || options.mla_absorbed_max_tokens < 1) {
    return absl::InvalidArgumentError("CpuBackend: token thresholds must be >= 1");
  }
  return std::unique_ptr<CpuBackend>(new CpuBackend(std::move(weights), options));
}

namespace {

class CpuState final : public BackendState {
 public:
  CpuState(const Backend* owner, SessionState state, std::shared_ptr<int> live)
      : BackendState(owner), state(std::move(state)), live_(std::move(live)) {
    ++*live_;
  }
  ~CpuState() override { --*live_; }
  int64_t num_tokens() const override { return state.num_tokens(); }
  int64_t ByteSize() const override { return state.ByteSize(); }

  SessionState state;

 private:
  std::shared_ptr<int> live_;  // the backend's count of live states
};

class CpuCheckpoint final : public StateCheckpoint {
 public:
  CpuCheckpoint(const Backend* owner, const BackendState& of, std::vector<KdaLayerState> kda,
                int64_t num_tokens)
      : StateCheckpoint(owner, of), kda(std::move(kda)), tokens(num_tokens) {}
  int64_t num_tokens() const override { return tokens; }

  std::vector<KdaLayerState> kda;
  int64_t tokens;
};

}  // namespace

SessionState* CpuBackend::HostState(BackendState* state) const {
  if (state == nullptr || state->owner() != this) return nullptr;
  return &static_cast<CpuState*>(state)->state;
}

const SessionState* CpuBackend::HostState(const BackendState& state) const {
  if (state.owner() != this) return nullptr;
  return &static_cast<const CpuState&>(state).state;
}

void CpuBackend::Store(float* x, int64_t n) const {
  if (options_.bf16_activations) cpu::RoundToBf16(x, n);
}

absl::Status CpuBackend::CheckRoom() const {
  if (options_.max_states > 0 && *live_states_ >= options_.max_states) {
    return absl::ResourceExhaustedError(
        absl::StrCat("all ", options_.max_states, " session states of the CPU backend are in use"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<BackendState>> CpuBackend::NewState() {
  KLS_RETURN_IF_ERROR(CheckRoom());
  return std::make_unique<CpuState>(this, SessionState(weights_->config), live_states_);
}

absl::StatusOr<std::unique_ptr<BackendState>> CpuBackend::CloneState(const BackendState& state) {
  const SessionState* host = HostState(state);
  if (host == nullptr) return absl::InvalidArgumentError("clone: a state of another backend");
  KLS_RETURN_IF_ERROR(CheckRoom());
  return std::make_unique<CpuState>(this, *host, live_states_);
}

absl::StatusOr<std::unique_ptr<BackendState>> CpuBackend::ImportState(const SessionState& host) {
  if (!host.MatchesConfig(weights_->config) || host.mla_first_row() != 0) {
    return absl::InvalidArgumentError(
        "import: the state does not match the model's shapes or lacks MLA cache rows");
  }
  KLS_RETURN_IF_ERROR(CheckRoom());
  return std::make_unique<CpuState>(this, host, live_states_);
}

absl::Status CpuBackend::ExportState(const BackendState& state, int64_t mla_first_row,
                                     SessionState* host) {
  const SessionState* source = HostState(state);
  if (source == nullptr) return absl::InvalidArgumentError("export: a state of another backend");
  if (host == nullptr) return absl::InvalidArgumentError("export: no destination");
  if (mla_first_row < 0 || mla_first_row > source->num_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("export: MLA row ", mla_first_row,
                                                   " is outside [0, ", source->num_tokens(), "]"));
  }
  SessionState out(weights_->config);
  out.kda() = source->kda();
  const size_t skip = static_cast<size_t>(mla_first_row) * weights_->config.mla_cache_dim();
  for (size_t l = 0; l < out.mla().size(); ++l) {
    const std::vector<float>& rows = source->mla()[l].latent;
    out.mla()[l].latent.assign(rows.begin() + skip, rows.end());
  }
  out.set_num_tokens(source->num_tokens());
  out.set_mla_first_row(mla_first_row);
  *host = std::move(out);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<StateCheckpoint>> CpuBackend::Checkpoint(const BackendState& state) {
  const SessionState* host = HostState(state);
  if (host == nullptr) return absl::InvalidArgumentError("checkpoint: a state of another backend");
  return std::make_unique<CpuCheckpoint>(this, state, host->kda(), host->num_tokens());
}

absl::Status CpuBackend::Rollback(const StateCheckpoint& checkpoint, BackendState* state) {
  KLS_RETURN_IF_ERROR(CheckRollback(this, checkpoint, state));
  SessionState* host = HostState(state);
  const auto& cp = static_cast<const CpuCheckpoint&>(checkpoint);
  host->kda() = cp.kda;
  host->TruncateTokens(cp.tokens);
  state->NoteRollback(cp.tokens);
  return absl::OkStatus();
}

absl::Status CpuBackend::Forward(std::span<const SequenceInput> batch, std::span<float> logits) {
  if (!injected_fault_.ok()) return injected_fault_;
  if (options_.fail_after_forwards >= 0 && forwards_ >= options_.fail_after_forwards) {
    injected_fault_ = absl::InternalError("injected fault: the backend failed for good");
    return injected_fault_;
  }
  ++forwards_;
  std::vector<HostSequenceInput> host(batch.size());
  for (size_t n = 0; n < batch.size(); ++n) {
    host[n].tokens = batch[n].tokens;
    if (batch[n].state != nullptr) {
      host[n].state = HostState(batch[n].state);
      if (host[n].state == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("forward: sequence ", n, " has a state of another backend"));
      }
    }
  }
  return ForwardHost(host, logits);
}

absl::Status CpuBackend::ForwardSample(std::span<const SequenceInput> batch,
                                       std::span<const SampleRequest> requests,
                                       std::span<int32_t> tokens) {
  KLS_RETURN_IF_ERROR(CheckSampleSpans(batch, requests, tokens));
  const int64_t vocab = weights_->config.vocab_size;
  sample_logits_.resize(batch.size() * static_cast<size_t>(vocab));
  KLS_RETURN_IF_ERROR(Forward(batch, sample_logits_));
  for (size_t n = 0; n < batch.size(); ++n) {
    const float* row = sample_logits_.data() + n * vocab;
    tokens[n] = kernels::SamplableLogits(row, vocab)
                    ? kernels::SampleReference(row, vocab, requests[n].config, requests[n].counter)
                    : -1;
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Validate(std::span<const HostSequenceInput> batch,
                                  std::span<float> logits) const {
  const ModelConfig& c = weights_->config;
  if (batch.empty()) return absl::InvalidArgumentError("forward: empty batch");
  if (logits.size() != batch.size() * static_cast<size_t>(c.vocab_size)) {
    return absl::InvalidArgumentError(absl::StrCat("forward: logits buffer holds ", logits.size(),
                                                   " values, need ", batch.size() * c.vocab_size));
  }
  std::set<const SessionState*> seen;
  for (size_t n = 0; n < batch.size(); ++n) {
    const HostSequenceInput& s = batch[n];
    if (s.state == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", n, " has no state"));
    }
    if (!seen.insert(s.state).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: sequence ", n, " repeats a state of the batch"));
    }
    if (!s.state->MatchesConfig(c) || s.state->mla_first_row() != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: sequence ", n, " has a state of another model shape"));
    }
    if (s.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", n, " has no tokens"));
    }
    for (int32_t id : s.tokens) {
      if (id < 0 || id >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "forward: token id ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
    const int64_t total = s.state->num_tokens() + static_cast<int64_t>(s.tokens.size());
    if (total > c.model_max_length) {
      return absl::InvalidArgumentError(absl::StrCat("context of ", total,
                                                     " tokens exceeds the model's limit of ",
                                                     c.model_max_length, " (model_max_length)"));
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::ForwardHost(std::span<const HostSequenceInput> batch,
                                     std::span<float> logits) {
  if (absl::Status s = Validate(batch, logits); !s.ok()) return s;
  const ModelConfig& c = weights_->config;
  const int64_t d = c.hidden_size;
  const double eps = c.rms_norm_eps;

  Packed packed;
  packed.cu_seqlens.push_back(0);
  for (const HostSequenceInput& s : batch) {
    packed.cu_seqlens.push_back(packed.cu_seqlens.back() + static_cast<int64_t>(s.tokens.size()));
    packed.states.push_back(s.state);
  }
  const int64_t t_total = packed.num_tokens();

  // Residual stream x [T, D].
  std::vector<float> x(t_total * d);
  for (size_t n = 0; n < batch.size(); ++n) {
    for (size_t i = 0; i < batch[n].tokens.size(); ++i) {
      const float* row = weights_->embed.data() + static_cast<int64_t>(batch[n].tokens[i]) * d;
      std::copy(row, row + d, x.data() + (packed.cu_seqlens[n] + i) * d);
    }
  }
  std::vector<float> normed(t_total * d), delta(t_total * d);
  for (const LayerWeights& layer : weights_->layers) {
    kernels::RmsNormReference(x.data(), layer.input_norm.data(), t_total, d, eps, normed.data());
    Store(normed);
    if (layer.kind == LayerKind::kKda) {
      KdaMixer(layer, packed, normed.data(), delta.data());
    } else {
      MlaMixer(layer, packed, normed.data(), delta.data());
    }
    for (int64_t i = 0; i < t_total * d; ++i) x[i] += delta[i];
    kernels::RmsNormReference(x.data(), layer.post_attn_norm.data(), t_total, d, eps,
                              normed.data());
    Store(normed);
    if (layer.ffn == FfnKind::kDense) {
      cpu::SwiGlu(normed.data(), layer.mlp.gate.data(), layer.mlp.up.data(), layer.mlp.down.data(),
                  t_total, d, c.intermediate_size, delta.data(),
                  Rounding(cpu::SwiGluRounding::kSeparateGateUp));
    } else {
      MoeFfn(layer, t_total, normed.data(), delta.data());
    }
    for (int64_t i = 0; i < t_total * d; ++i) x[i] += delta[i];
  }
  // MLA layers appended their cache rows; the token count moves once, after all layers.
  for (size_t n = 0; n < batch.size(); ++n) {
    packed.states[n]->set_num_tokens(packed.states[n]->num_tokens() + packed.length(n));
  }

  // lm_head on the last position of each sequence only.
  std::vector<float> last(batch.size() * d);
  for (size_t n = 0; n < batch.size(); ++n) {
    const float* row = x.data() + (packed.cu_seqlens[n + 1] - 1) * d;
    std::copy(row, row + d, last.data() + n * d);
  }
  kernels::RmsNormReference(last.data(), weights_->final_norm.data(),
                            static_cast<int64_t>(batch.size()), d, eps, last.data());
  Store(last);
  cpu::Linear(last.data(), weights_->lm_head.data(), static_cast<int64_t>(batch.size()), d,
              c.vocab_size, logits.data());
  return absl::OkStatus();
}

void CpuBackend::KdaMixer(const LayerWeights& layer, const Packed& packed, const float* a,
                          float* out) {
  const ModelConfig& c = weights_->config;
  const KdaLayerWeights& w = layer.kda;
  const int64_t t_total = packed.num_tokens();
  const int64_t d = c.hidden_size;
  const int h = c.linear_attn_config.num_heads;
  const int k = c.linear_attn_config.head_dim;
  const int64_t hk = static_cast<int64_t>(h) * k;
  const int width = c.linear_attn_config.short_conv_kernel_size;
  const size_t num_seqs = packed.states.size();

  // Projections, then the short conv + SiLU of each stream against its conv state.
  std::vector<float> proj(t_total * hk), q(t_total * hk), kk(t_total * hk), v(t_total * hk);
  const std::vector<float>* proj_w[3] = {&w.q_proj, &w.k_proj, &w.v_proj};
  const std::vector<float>* conv_w[3] = {&w.q_conv, &w.k_conv, &w.v_conv};
  float* conv_out[3] = {q.data(), kk.data(), v.data()};
  std::vector<float*> conv_states(num_seqs);
  for (int stream = 0; stream < 3; ++stream) {
    cpu::Linear(a, proj_w[stream]->data(), t_total, d, hk, proj.data());
    Store(proj);
    for (size_t n = 0; n < num_seqs; ++n) {
      conv_states[n] = packed.states[n]->kda()[layer.state_slot].conv.data() +
                       static_cast<int64_t>(stream) * (width - 1) * hk;
    }
    kernels::CausalConv1dSiluReference(proj.data(), conv_w[stream]->data(),
                                       packed.cu_seqlens.data(), static_cast<int64_t>(num_seqs), hk,
                                       width, conv_states.data(), conv_out[stream]);
    Store(conv_out[stream], t_total * hk);
  }
  kernels::L2NormReference(q.data(), t_total * h, k, 1e-6, q.data());
  kernels::L2NormReference(kk.data(), t_total * h, k, 1e-6, kk.data());

  // Forget gate (low rank, then the unbounded gate) and beta.
  std::vector<float> low(t_total * k), g(t_total * hk), beta(t_total * h);
  cpu::Linear(a, w.f_a_proj.data(), t_total, d, k, low.data());
  Store(low);
  cpu::Linear(low.data(), w.f_b_proj.data(), t_total, k, hk, proj.data());
  Store(proj);
  kernels::KdaGateReference(proj.data(), w.a_log.data(), w.dt_bias.data(), t_total, h, k, g.data());
  cpu::Linear(a, w.b_proj.data(), t_total, d, h, beta.data());
  Store(beta);
  for (float& b : beta) b = 1.0f / (1.0f + std::exp(-b));

  // The delta rule per sequence: the recurrence for a few tokens, the chunked form otherwise.
  std::vector<float> o(t_total * hk);
  for (size_t n = 0; n < num_seqs; ++n) {
    const int64_t start = packed.cu_seqlens[n];
    const int64_t cu[2] = {0, packed.length(n)};
    float* state = packed.states[n]->kda()[layer.state_slot].recurrent.data();
    kernels::KdaArgs<float> args;
    args.q = q.data() + start * hk;
    args.k = kk.data() + start * hk;
    args.v = v.data() + start * hk;
    args.g = g.data() + start * hk;
    args.beta = beta.data() + start * h;
    args.cu_seqlens = cu;
    args.num_seqs = 1;
    args.num_heads = h;
    args.head_dim_k = k;
    args.head_dim_v = k;
    args.scale = 1.0 / std::sqrt(static_cast<double>(k));
    args.states = &state;
    args.out = o.data() + start * hk;
    if (packed.length(n) <= options_.kda_recurrent_max_tokens) {
      kernels::KdaRecurrentReference(args);
    } else {
      kernels::KdaChunkReference(args, /*chunk_size=*/64, /*sub_chunk_size=*/16);
    }
  }

  // Output gate: gated RMSNorm with the sigmoid of the low-rank gate, then o_proj.
  Store(o);
  cpu::Linear(a, w.g_a_proj.data(), t_total, d, k, low.data());
  Store(low);
  cpu::Linear(low.data(), w.g_b_proj.data(), t_total, k, hk, proj.data());
  Store(proj);
  kernels::GatedRmsNormReference(o.data(), proj.data(), w.o_norm.data(), t_total, h, k,
                                 c.rms_norm_eps, o.data());
  Store(o);
  cpu::Linear(o.data(), w.o_proj.data(), t_total, hk, d, out);
  Store(out, t_total * d);
}

void CpuBackend::MlaMixer(const LayerWeights& layer, const Packed& packed, const float* a,
                          float* out) {
  const ModelConfig& c = weights_->config;
  const MlaLayerWeights& w = layer.mla;
  const int64_t t_total = packed.num_tokens();
  const int64_t d = c.hidden_size;
  const int nh = c.num_attention_heads;
  const int dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
  const int dc = c.kv_lora_rank;
  const int dqk = dn + dr;
  const int64_t cache_dim = dc + dr;
  const double scale = 1.0 / std::sqrt(static_cast<double>(dqk));

  std::vector<float> q(t_total * nh * dqk), kv(t_total * cache_dim);
  cpu::Linear(a, w.q_proj.data(), t_total, d, nh * dqk, q.data());
  Store(q);
  cpu::Linear(a, w.kv_a_proj.data(), t_total, d, cache_dim, kv.data());
  Store(kv);
  // Cache row = [RMSNorm(c), k_pe]: the latent is normalized before it is cached.
  for (int64_t t = 0; t < t_total; ++t) {
    float* row = kv.data() + t * cache_dim;
    kernels::RmsNormReference(row, w.kv_a_layernorm.data(), 1, dc, c.rms_norm_eps, row);
  }
  Store(kv);

  std::vector<float> attn(t_total * nh * dv);
  for (size_t n = 0; n < packed.states.size(); ++n) {
    const int64_t start = packed.cu_seqlens[n];
    const int64_t len = packed.length(n);
    std::vector<float>& cache = packed.states[n]->mla()[layer.state_slot].latent;
    cache.insert(cache.end(), kv.begin() + start * cache_dim,
                 kv.begin() + (start + len) * cache_dim);
    const int64_t ctx = static_cast<int64_t>(cache.size()) / cache_dim;
    const float* qs = q.data() + start * nh * dqk;
    float* os = attn.data() + start * nh * dv;
    if (len <= options_.mla_absorbed_max_tokens) {
      // Absorbed: attend in latent space, MQA-style, without decompressing the cache.
      std::vector<float> q_nope(len * nh * dn), q_pe(len * nh * dr);
      for (int64_t t = 0; t < len; ++t) {
        for (int hh = 0; hh < nh; ++hh) {
          const float* src = qs + (t * nh + hh) * dqk;
          std::copy(src, src + dn, q_nope.data() + (t * nh + hh) * dn);
          std::copy(src + dn, src + dqk, q_pe.data() + (t * nh + hh) * dr);
        }
      }
      kernels::MlaDecodeAbsorbedReference(q_nope.data(), q_pe.data(), cache.data(),
                                          w.kv_b_proj.data(), len, ctx, nh, dn, dr, dc, dv, scale,
                                          os);
    } else {
      // Non-absorbed: decompress keys and values of the whole context, then causal attention.
      std::vector<float> latent(ctx * dc), kvb(ctx * nh * (dn + dv));
      for (int64_t t = 0; t < ctx; ++t) {
        std::copy(cache.begin() + t * cache_dim, cache.begin() + t * cache_dim + dc,
                  latent.begin() + t * dc);
      }
      cpu::Linear(latent.data(), w.kv_b_proj.data(), ctx, dc, nh * (dn + dv), kvb.data());
      Store(kvb);
      std::vector<float> keys(ctx * nh * dqk), values(ctx * nh * dv);
      for (int64_t t = 0; t < ctx; ++t) {
        const float* k_pe = cache.data() + t * cache_dim + dc;
        for (int hh = 0; hh < nh; ++hh) {
          const float* src = kvb.data() + (t * nh + hh) * (dn + dv);
          float* key = keys.data() + (t * nh + hh) * dqk;
          std::copy(src, src + dn, key);
          std::copy(k_pe, k_pe + dr, key + dn);
          std::copy(src + dn, src + dn + dv, values.data() + (t * nh + hh) * dv);
        }
      }
      kernels::MlaPrefillAttentionReference(qs, keys.data(), values.data(), len, ctx, nh, dqk, dv,
                                            scale, os);
    }
  }
  Store(attn);
  cpu::Linear(attn.data(), w.o_proj.data(), t_total, nh * dv, d, out);
  Store(out, t_total * d);
}

void CpuBackend::MoeFfn(const LayerWeights& layer, int64_t rows, const float* b, float* out) {
  const ModelConfig& c = weights_->config;
  const MoeWeights& w = layer.moe;
  const int64_t d = c.hidden_size;
  const int e = c.num_experts;
  const int top_k = c.num_experts_per_token;
  const int64_t width = c.moe_intermediate_size;

  std::vector<float> router_logits(rows * e);
  cpu::Linear(b, w.router.data(), rows, d, e, router_logits.data());
  std::vector<int32_t> ids(rows * top_k);
  std::vector<float> weights(rows * top_k);
  kernels::MoeRouteReference(router_logits.data(), w.correction_bias.data(), rows, e, top_k,
                             c.moe_renormalize, c.routed_scaling_factor, options_.router_weighting,
                             ids.data(), weights.data());

  // Shared expert on every token, then each routed expert on the tokens that chose it.
  cpu::SwiGlu(b, w.shared.gate.data(), w.shared.up.data(), w.shared.down.data(), rows, d,
              width * c.num_shared_experts, out, Rounding(cpu::SwiGluRounding::kSeparateGateUp));
  std::vector<std::vector<std::pair<int64_t, float>>> routed(e);
  for (int64_t t = 0; t < rows; ++t) {
    for (int j = 0; j < top_k; ++j)
      routed[ids[t * top_k + j]].push_back({t, weights[t * top_k + j]});
  }
  std::vector<float> gathered, expert_out;
  for (int x = 0; x < e; ++x) {
    const auto& members = routed[x];
    if (members.empty()) continue;
    const int64_t m = static_cast<int64_t>(members.size());
    gathered.resize(m * d);
    expert_out.resize(m * d);
    for (int64_t i = 0; i < m; ++i) {
      std::copy(b + members[i].first * d, b + (members[i].first + 1) * d, gathered.begin() + i * d);
    }
    const SwiGluWeights& ex = w.experts[x];
    cpu::SwiGlu(gathered.data(), ex.gate.data(), ex.up.data(), ex.down.data(), m, d, width,
                expert_out.data(), Rounding(cpu::SwiGluRounding::kFusedGateUp));
    for (int64_t i = 0; i < m; ++i) {
      float* dst = out + members[i].first * d;
      const float wt = members[i].second;
      for (int64_t j = 0; j < d; ++j) dst[j] += wt * expert_out[i * d + j];
    }
  }
  Store(out, rows * d);
}

}  // namespace kls::engine

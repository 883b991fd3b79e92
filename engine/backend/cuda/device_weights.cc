#include "engine/backend/cuda/device_weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/hash.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/backend/cuda/cuda_ops.h"
#include "engine/model/fingerprint.h"
#include "engine/model/safetensors.h"

namespace kls::engine::cuda {

// Where one host tensor (a ModelWeights field) lives in the arena: `count` elements at `offset`
// bytes, bf16 or fp32, and how random weights initialize it.
struct DeviceWeights::Placement {
  size_t offset = 0;
  int64_t count = 0;
  bool fp32 = false;
  WeightInit init = WeightInit::kLinear;
  int64_t fan_in = 1;
};

// Lays the arena out from a bound ModelWeights (layers sized; tensor data not needed), then
// resolves the pointers once the arena exists.
class DeviceWeights::Builder {
 public:
  explicit Builder(const ModelWeights& w) : c_(w.config) { Plan(w); }

  size_t total_bytes() const { return total_; }
  const std::vector<std::pair<const std::vector<float>*, Placement>>& parts() const {
    return parts_;
  }

  // Fills the pointers of `out` (whose arena is allocated).
  void Resolve(DeviceWeights& out) const {
    char* base = out.arena_.as<char>();
    const auto b = [base](size_t off) { return reinterpret_cast<const bf16*>(base + off); };
    const auto f = [base](size_t off) { return reinterpret_cast<const float*>(base + off); };
    out.embed_ = b(embed_);
    out.final_norm_ = b(final_norm_);
    out.lm_head_ = b(lm_head_);
    out.layers_.clear();
    for (const LayerOffsets& o : layers_) {
      LayerDeviceWeights L;
      L.kind = o.kind;
      L.ffn = o.ffn;
      L.state_slot = o.state_slot;
      L.input_norm = b(o.input_norm);
      L.post_attn_norm = b(o.post_attn_norm);
      if (o.kind == LayerKind::kKda) {
        L.kda = {b(o.qkv),    b(o.conv),    b(o.fa_ga), b(o.f_b),    b(o.g_b),
                 b(o.b_proj), f(o.dt_bias), f(o.a_log), b(o.o_norm), b(o.o_proj)};
      } else {
        L.mla = {b(o.q_proj), b(o.kv_a), b(o.kv_a_norm), b(o.kv_b), b(o.mla_o_proj)};
      }
      if (o.ffn == FfnKind::kDense) {
        L.mlp = {b(o.gate_up), b(o.down), static_cast<int>(c_.intermediate_size)};
      } else {
        L.moe.router = b(o.router);
        L.moe.bias = f(o.bias);
        L.moe.w_gate_up = b(o.w_gate_up);
        L.moe.w_down = b(o.w_down);
        L.moe.shared = {b(o.gate_up), b(o.down),
                        static_cast<int>(c_.num_shared_experts * c_.moe_intermediate_size)};
      }
      out.layers_.push_back(L);
    }
  }

 private:
  struct LayerOffsets {
    LayerKind kind;
    FfnKind ffn;
    int state_slot;
    size_t input_norm, post_attn_norm;
    size_t qkv, conv, fa_ga, f_b, g_b, b_proj, dt_bias, a_log, o_norm, o_proj;
    size_t q_proj, kv_a, kv_a_norm, kv_b, mla_o_proj;
    size_t gate_up, down;  // dense MLP, or the MoE's shared expert
    size_t router, bias, w_gate_up, w_down;
  };

  size_t Reserve(int64_t count, bool fp32) {
    const size_t at = total_;
    total_ += (static_cast<size_t>(count) * (fp32 ? 4 : 2) + 255) & ~size_t{255};
    return at;
  }
  // A part of a reserved tensor: `field` lands `elements_before` elements into it.
  void Part(const std::vector<float>* field, size_t tensor, int64_t elements_before, int64_t count,
            bool fp32, WeightInit init, int64_t fan_in) {
    parts_.push_back({field,
                      {tensor + static_cast<size_t>(elements_before) * (fp32 ? 4 : 2), count, fp32,
                       init, fan_in}});
  }
  size_t Tensor(const std::vector<float>* field, int64_t count, WeightInit init, int64_t fan_in = 1,
                bool fp32 = false) {
    const size_t at = Reserve(count, fp32);
    Part(field, at, 0, count, fp32, init, fan_in);
    return at;
  }

  void Plan(const ModelWeights& w) {
    const int64_t d = c_.hidden_size, v = c_.vocab_size;
    const int64_t h = c_.linear_attn_config.num_heads, k = c_.linear_attn_config.head_dim;
    const int64_t hk = h * k, width = c_.linear_attn_config.short_conv_kernel_size;
    const int64_t nh = c_.num_attention_heads, dn = c_.qk_nope_head_dim;
    const int64_t dr = c_.qk_rope_head_dim, dv = c_.v_head_dim, dc = c_.kv_lora_rank;
    const int64_t e = c_.num_experts, im = c_.moe_intermediate_size;
    const int64_t shared = c_.num_shared_experts * im;
    const int64_t inter = c_.intermediate_size;
    using I = WeightInit;
    embed_ = Tensor(&w.embed, v * d, I::kEmbedding);
    final_norm_ = Tensor(&w.final_norm, d, I::kNorm);
    lm_head_ = Tensor(&w.lm_head, v * d, I::kLinear, d);
    for (const LayerWeights& L : w.layers) {
      LayerOffsets o{};
      o.kind = L.kind;
      o.ffn = L.ffn;
      o.state_slot = L.state_slot;
      o.input_norm = Tensor(&L.input_norm, d, I::kNorm);
      o.post_attn_norm = Tensor(&L.post_attn_norm, d, I::kNorm);
      if (L.kind == LayerKind::kKda) {
        const KdaLayerWeights& K = L.kda;
        o.qkv = Reserve(3 * hk * d, false);
        Part(&K.q_proj, o.qkv, 0, hk * d, false, I::kLinear, d);
        Part(&K.k_proj, o.qkv, hk * d, hk * d, false, I::kLinear, d);
        Part(&K.v_proj, o.qkv, 2 * hk * d, hk * d, false, I::kLinear, d);
        o.conv = Reserve(3 * hk * width, false);
        Part(&K.q_conv, o.conv, 0, hk * width, false, I::kConv, 1);
        Part(&K.k_conv, o.conv, hk * width, hk * width, false, I::kConv, 1);
        Part(&K.v_conv, o.conv, 2 * hk * width, hk * width, false, I::kConv, 1);
        o.fa_ga = Reserve(2 * k * d, false);
        Part(&K.f_a_proj, o.fa_ga, 0, k * d, false, I::kLinear, d);
        Part(&K.g_a_proj, o.fa_ga, k * d, k * d, false, I::kLinear, d);
        o.f_b = Tensor(&K.f_b_proj, hk * k, I::kLinear, k);
        o.g_b = Tensor(&K.g_b_proj, hk * k, I::kLinear, k);
        o.b_proj = Tensor(&K.b_proj, h * d, I::kLinear, d);
        o.dt_bias = Tensor(&K.dt_bias, hk, I::kDtBias, 1, true);
        o.a_log = Tensor(&K.a_log, h, I::kALog, 1, true);
        o.o_norm = Tensor(&K.o_norm, k, I::kNorm);
        o.o_proj = Tensor(&K.o_proj, d * hk, I::kLinear, hk);
      } else {
        const MlaLayerWeights& M = L.mla;
        o.q_proj = Tensor(&M.q_proj, nh * (dn + dr) * d, I::kLinear, d);
        o.kv_a = Tensor(&M.kv_a_proj, (dc + dr) * d, I::kLinear, d);
        o.kv_a_norm = Tensor(&M.kv_a_layernorm, dc, I::kNorm);
        o.kv_b = Tensor(&M.kv_b_proj, nh * (dn + dv) * dc, I::kLinear, dc);
        o.mla_o_proj = Tensor(&M.o_proj, d * nh * dv, I::kLinear, nh * dv);
      }
      const SwiGluWeights& mlp = L.ffn == FfnKind::kDense ? L.mlp : L.moe.shared;
      const int64_t mlp_width = L.ffn == FfnKind::kDense ? inter : shared;
      o.gate_up = Reserve(2 * mlp_width * d, false);
      Part(&mlp.gate, o.gate_up, 0, mlp_width * d, false, I::kLinear, d);
      Part(&mlp.up, o.gate_up, mlp_width * d, mlp_width * d, false, I::kLinear, d);
      o.down = Tensor(&mlp.down, d * mlp_width, I::kLinear, mlp_width);
      if (L.ffn == FfnKind::kMoe) {
        o.router = Tensor(&L.moe.router, e * d, I::kLinear, d);
        o.bias = Tensor(&L.moe.correction_bias, e, I::kRouterBias, 1, true);
        o.w_gate_up = Reserve(e * 2 * im * d, false);
        o.w_down = Reserve(e * d * im, false);
        for (int64_t x = 0; x < e && x < static_cast<int64_t>(L.moe.experts.size()); ++x) {
          const SwiGluWeights& ex = L.moe.experts[x];
          Part(&ex.gate, o.w_gate_up, x * 2 * im * d, im * d, false, I::kLinear, d);
          Part(&ex.up, o.w_gate_up, x * 2 * im * d + im * d, im * d, false, I::kLinear, d);
          Part(&ex.down, o.w_down, x * d * im, d * im, false, I::kLinear, im);
        }
      }
      layers_.push_back(o);
    }
  }

  ModelConfig c_;
  size_t total_ = 0;
  size_t embed_ = 0, final_norm_ = 0, lm_head_ = 0;
  std::vector<LayerOffsets> layers_;
  std::vector<std::pair<const std::vector<float>*, Placement>> parts_;
};

namespace {

constexpr size_t kStagingBytes = size_t{64} << 20;

// Converts `count` fp32 values to the device layout (bf16 or fp32) into `staging`.
void Convert(const float* src, int64_t count, bool fp32, void* staging) {
  if (fp32) {
    std::memcpy(staging, src, static_cast<size_t>(count) * 4);
    return;
  }
  uint16_t* dst = static_cast<uint16_t*>(staging);
  for (int64_t i = 0; i < count; ++i) dst[i] = FloatToBf16(src[i]);
}

// Uploads fp32 values through the pinned staging buffer in pieces.
absl::Status UploadConverted(const float* src, int64_t count, bool fp32, char* device,
                             PinnedMemory& staging, cudaStream_t stream) {
  const int64_t per_piece = static_cast<int64_t>(staging.bytes() / 4);
  for (int64_t at = 0; at < count; at += per_piece) {
    const int64_t n = std::min(per_piece, count - at);
    KLS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));  // staging is free again
    Convert(src + at, n, fp32, staging.as<void>());
    const size_t bytes = static_cast<size_t>(n) * (fp32 ? 4 : 2);
    KLS_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device + static_cast<size_t>(at) * (fp32 ? 4 : 2),
                                             staging.as<void>(), bytes, cudaMemcpyHostToDevice,
                                             stream));
  }
  return absl::OkStatus();
}

// The parameters make-model draws a tensor with (engine/model/make_model.cc).
void InitParameters(WeightInit init, int64_t fan_in, RandomFill* kind, float* mean, float* std) {
  *kind = RandomFill::kNormal;
  *mean = 0.f;
  *std = 1.f;
  switch (init) {
    case WeightInit::kLinear:
      *std = static_cast<float>(1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(fan_in, 1))));
      break;
    case WeightInit::kEmbedding:
    case WeightInit::kDtBias:
      break;
    case WeightInit::kNorm:
      *mean = 1.f;
      *std = 0.1f;
      break;
    case WeightInit::kConv:
    case WeightInit::kRouterBias:
      *std = 0.5f;
      break;
    case WeightInit::kALog:
      *kind = RandomFill::kLogUniform;
      break;
  }
}

}  // namespace

absl::StatusOr<DeviceWeights> DeviceWeights::FromHost(const ModelWeights& weights,
                                                      cudaStream_t stream) {
  Builder builder(weights);
  DeviceWeights out;
  out.config_ = weights.config;
  out.fingerprint_ = weights.fingerprint;
  KLS_ASSIGN_OR_RETURN(out.arena_, DeviceMemory::Allocate(builder.total_bytes(), "model weights"));
  KLS_ASSIGN_OR_RETURN(PinnedMemory staging, PinnedMemory::Allocate(kStagingBytes, "weights"));
  for (const auto& [field, place] : builder.parts()) {
    if (static_cast<int64_t>(field->size()) != place.count) {
      return absl::InvalidArgumentError(absl::StrCat("host weights: a tensor holds ", field->size(),
                                                     " values, expected ", place.count));
    }
    KLS_RETURN_IF_ERROR(UploadConverted(field->data(), place.count, place.fp32,
                                        out.arena_.as<char>() + place.offset, staging, stream));
  }
  KLS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  builder.Resolve(out);
  return out;
}

absl::StatusOr<DeviceWeights> DeviceWeights::Random(const ModelConfig& config, uint64_t seed,
                                                    cudaStream_t stream) {
  ModelWeights shape;  // bound for its layout only; holds no data
  shape.config = config;
  BindWeights(&shape);
  Builder builder(shape);
  DeviceWeights out;
  out.config_ = config;
  const std::string id =
      absl::StrCat("kls random weights v1, seed ", seed, ", layers ", config.num_hidden_layers,
                   ", hidden ", config.hidden_size, ", experts ", config.num_experts);
  out.fingerprint_ = Xxh3_128(id.data(), id.size());
  KLS_ASSIGN_OR_RETURN(out.arena_, DeviceMemory::Allocate(builder.total_bytes(), "model weights"));
  uint64_t part = 0;
  for (const auto& [field, place] : builder.parts()) {
    RandomFill kind;
    float mean, stddev;
    InitParameters(place.init, place.fan_in, &kind, &mean, &stddev);
    KLS_CUDA_RETURN_IF_ERROR(LaunchRandomFill(out.arena_.as<char>() + place.offset, place.fp32,
                                              place.count, seed * 0x9E3779B97F4A7C15ull + ++part,
                                              kind, mean, stddev, stream));
  }
  KLS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  builder.Resolve(out);
  return out;
}

absl::StatusOr<DeviceWeights> DeviceWeights::FromCheckpoint(const std::string& model_dir,
                                                            cudaStream_t stream,
                                                            const UploadProgress& progress) {
  ModelWeights shape;
  KLS_ASSIGN_OR_RETURN(shape.config, LoadModelConfig(model_dir));
  KLS_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(model_dir));
  const std::vector<WeightBinding> bindings = BindWeights(&shape);
  Builder builder(shape);
  std::map<const std::vector<float>*, Placement> placement;
  for (const auto& [field, place] : builder.parts()) placement[field] = place;

  // Every tensor present with the right size before any device memory is taken.
  int64_t total = 0;
  for (const WeightBinding& b : bindings) {
    const TensorView* t = checkpoint->Find(b.name);
    if (t == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(model_dir, ": missing tensor '", b.name, "'"));
    }
    auto it = placement.find(b.dest);
    if (it == placement.end() || t->num_elements() != it->second.count) {
      return absl::InvalidArgumentError(absl::StrCat(model_dir, ": tensor '", b.name, "' has ",
                                                     t->num_elements(), " elements, expected ",
                                                     it == placement.end() ? 0 : it->second.count));
    }
    total += static_cast<int64_t>(t->num_bytes);
  }
  DeviceWeights out;
  out.config_ = shape.config;
  out.fingerprint_ = ComputeModelFingerprint(shape.config, *checkpoint);
  KLS_ASSIGN_OR_RETURN(out.arena_, DeviceMemory::Allocate(builder.total_bytes(), "model weights"));
  KLS_ASSIGN_OR_RETURN(PinnedMemory staging, PinnedMemory::Allocate(kStagingBytes, "weights"));
  // One tensor at a time through a host fp32 buffer of the largest tensor's size at most.
  std::vector<float> host;
  int64_t done = 0;
  for (const WeightBinding& b : bindings) {
    const Placement& place = placement[b.dest];
    host.resize(static_cast<size_t>(place.count));
    absl::Status s = checkpoint->ReadFloat(b.name, b.shape, host.data(), b.match);
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat(model_dir, ": ", s.message()));
    KLS_RETURN_IF_ERROR(UploadConverted(host.data(), place.count, place.fp32,
                                        out.arena_.as<char>() + place.offset, staging, stream));
    done += static_cast<int64_t>(checkpoint->Find(b.name)->num_bytes);
    if (progress) progress(done, total);
  }
  KLS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  builder.Resolve(out);
  return out;
}

}  // namespace kls::engine::cuda

// Kimi Linear model configuration (config.json, model_type "kimi_linear"); KIMI_LINEAR.md §1.1.
#ifndef KLS_ENGINE_MODEL_CONFIG_H_
#define KLS_ENGINE_MODEL_CONFIG_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kls::engine {

enum class LayerKind { kKda, kMla };
enum class FfnKind { kDense, kMoe };

struct LinearAttnConfig {
  int num_heads = 0;                  // KDA heads H
  int head_dim = 0;                   // KDA d_k = d_v
  int short_conv_kernel_size = 0;     // causal conv width W
  std::vector<int> kda_layers;        // 1-based layer numbers, as in config.json
  std::vector<int> full_attn_layers;  // 1-based layer numbers, as in config.json
};

// Every key of KIMI_LINEAR.md §1.1. Field names equal the config.json keys.
struct ModelConfig {
  std::vector<std::string> architectures;
  std::string model_type;
  std::string torch_dtype;
  int64_t vocab_size = 0;
  int hidden_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;  // MLA heads
  int num_key_value_heads = 0;  // unused by MLA math, kept for round trips
  int head_dim = 0;             // unused (hidden / heads); see KIMI_LINEAR.md pitfall 12
  int intermediate_size = 0;    // dense SwiGLU width
  std::string hidden_act;       // must be "silu"
  double rms_norm_eps = 0;
  double rope_theta = 0;  // unused (NoPE)
  int64_t model_max_length = 0;
  bool tie_word_embeddings = false;  // must be false: lm_head.weight is a separate tensor
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 0;
  int64_t pad_token_id = 0;
  std::optional<int> q_lora_rank;  // must be null
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;
  bool mla_use_nope = false;  // must be true
  LinearAttnConfig linear_attn_config;
  int num_experts = 0;
  int num_experts_per_token = 0;
  int num_shared_experts = 0;  // >= 1; the shared expert is num_shared_experts × moe width
  int moe_intermediate_size = 0;
  std::string moe_router_activation_func;  // must be "sigmoid"
  bool moe_renormalize = false;
  double routed_scaling_factor = 0;
  bool use_grouped_topk = false;
  int num_expert_group = 0;  // must be 1
  int topk_group = 0;        // must be 1
  int first_k_dense_replace = 0;
  int moe_layer_freq = 0;
  int num_nextn_predict_layers = 0;  // must be 0

  // Derived (0-based layer index i). KDA iff (i + 1) is in kda_layers.
  LayerKind layer_kind(int i) const;
  // MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0.
  FfnKind ffn_kind(int i) const;
  int num_kda_layers() const;
  int num_mla_layers() const;
  int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }  // MLA d_qk (192)
  int mla_cache_dim() const { return kv_lora_rank + qk_rope_head_dim; }    // latent width (576)
  int kda_dim() const { return linear_attn_config.num_heads * linear_attn_config.head_dim; }
};

// Parses and validates config.json text. Errors are INVALID_ARGUMENT and name the key:
// a missing key, a wrong JSON type, an out-of-range value, layer lists that are not a
// partition of 1..num_hidden_layers, an unsupported model_type or an unsupported feature
// (tied word embeddings, q_lora_rank not null, gate_lower_bound, MTP layers, grouped routing,
// non-sigmoid router). Dimensions that size per-session state have caps far above the released
// model, named in the error: hidden_size <= 65536, num_attention_heads, num_key_value_heads and
// linear_attn_config.num_heads <= 1024, linear_attn_config.head_dim <= 1024, kv_lora_rank,
// qk_nope_head_dim, qk_rope_head_dim and v_head_dim <= 4096. Safe on hostile input: error
// messages never serialize nested JSON values.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text);

// Reads and parses `<model_dir>/config.json`. NOT_FOUND names the file when it is missing.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// Serializes to config.json text (pretty-printed, keys as in the released config) that
// ParseModelConfig accepts and that round-trips every field.
std::string ModelConfigToJson(const ModelConfig& config);

}  // namespace kls::engine

#endif  // KLS_ENGINE_MODEL_CONFIG_H_

#include "engine/model/config.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/file_util.h"
#include "common/status_macros.h"

namespace kls::engine {
namespace {

using json = nlohmann::json;

// Sanity caps, far above any Kimi Linear size (KIMI_LINEAR.md §1.1: hidden 2304, 32 heads, KDA
// head_dim 128, kv_lora_rank 512, qk 128 + 64, v 128). Dimensions that size per-session state
// (the KDA state H × K × K and conv window per layer, the MLA latent cache per token) and
// activations have tight caps, so a hostile config.json cannot make the engine allocate huge
// buffers per session. kMaxDim bounds the rest (weight widths, which the checkpoint must match).
constexpr int64_t kMaxDim = int64_t{1} << 20;
constexpr int64_t kMaxHiddenSize = 65536;
constexpr int64_t kMaxHeads = 1024;
constexpr int64_t kMaxKdaHeadDim = 1024;
constexpr int64_t kMaxMlaDim = 4096;  // kv_lora_rank, qk_nope/qk_rope/v head dims
constexpr int64_t kMaxLayers = 4096;
constexpr int64_t kMaxExperts = int64_t{1} << 16;
constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
// Products the engine forms in int (kda_dim, heads × qk_head_dim, mla_cache_dim) cannot overflow.
static_assert(kMaxHeads * kMaxKdaHeadDim <= kMaxInt);
static_assert(kMaxHeads * (2 * kMaxMlaDim) <= kMaxInt);
constexpr absl::string_view kStateCap = "the cap bounds per-session state";

constexpr absl::string_view kLinearAttn = "linear_attn_config";

std::string KeyPath(absl::string_view prefix, absl::string_view key) {
  return prefix.empty() ? std::string(key) : absl::StrCat(prefix, ".", key);
}

absl::Status Invalid(absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: ", message));
}

absl::Status TypeError(absl::string_view path, absl::string_view what) {
  return Invalid(absl::StrCat("key '", path, "' must be ", what));
}

// An untrusted JSON value for an error message: a scalar as JSON text (a string cut to 40 bytes),
// an array or object by its type name. Never dump() a structured value: dump() recurses once per
// nesting level, so a deeply nested config.json would overflow the stack.
std::string Describe(const json& v) {
  if (v.is_structured()) return v.type_name();
  if (v.is_string()) {
    constexpr size_t kMaxChars = 40;
    const std::string& str = v.get_ref<const std::string&>();
    if (str.size() > kMaxChars) {
      // `replace` covers a UTF-8 character cut at the limit.
      return json(str.substr(0, kMaxChars)).dump(-1, ' ', false, json::error_handler_t::replace) +
             "...";
    }
  }
  return v.dump(-1, ' ', false, json::error_handler_t::replace);
}

// Finds `key` in `obj` (a JSON object); INVALID_ARGUMENT naming the dotted path if absent.
absl::StatusOr<const json*> Require(const json& obj, absl::string_view prefix,
                                    absl::string_view key) {
  auto it = obj.find(std::string(key));
  if (it == obj.end()) return Invalid(absl::StrCat("missing key '", KeyPath(prefix, key), "'"));
  return &*it;
}

// Reads an integer JSON value (signed or unsigned representation) into int64.
bool JsonToInt64(const json& v, int64_t* out) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    *out = static_cast<int64_t>(u);
    return true;
  }
  if (v.is_number_integer()) {
    *out = v.get<int64_t>();
    return true;
  }
  return false;
}

// Integer key with an inclusive range [lo, hi].
// `why` (optional) explains the upper bound; it is added to the message when the value exceeds it.
absl::StatusOr<int64_t> GetInt64(const json& obj, absl::string_view prefix, absl::string_view key,
                                 int64_t lo, int64_t hi, absl::string_view why = "") {
  const std::string path = KeyPath(prefix, key);
  KLS_ASSIGN_OR_RETURN(const json* v, Require(obj, prefix, key));
  int64_t value = 0;
  if (!v->is_number_integer()) return TypeError(path, "an integer");
  if (!JsonToInt64(*v, &value)) {
    return Invalid(absl::StrCat("key '", path, "' is out of range (got ", Describe(*v), ")"));
  }
  if (value < lo || value > hi) {
    std::string range;
    if (lo == hi) {
      range = absl::StrCat(lo);
    } else if (hi == std::numeric_limits<int64_t>::max() || hi == kMaxInt) {
      range = absl::StrCat(">= ", lo);
    } else {
      range = absl::StrCat("in [", lo, ", ", hi, "]");
    }
    const bool explain = value > hi && !why.empty();
    return Invalid(absl::StrCat("key '", path, "' must be ", range, " (got ", value, ")",
                                explain ? ": " : "", explain ? why : ""));
  }
  return value;
}

absl::Status GetInt(const json& obj, absl::string_view prefix, absl::string_view key, int64_t lo,
                    int64_t hi, int* out, absl::string_view why = "") {
  KLS_ASSIGN_OR_RETURN(int64_t v, GetInt64(obj, prefix, key, lo, std::min(hi, kMaxInt), why));
  *out = static_cast<int>(v);
  return absl::OkStatus();
}

// A finite number (integer or float) strictly greater than `above`.
absl::Status GetDouble(const json& obj, absl::string_view key, double above, double* out) {
  KLS_ASSIGN_OR_RETURN(const json* v, Require(obj, "", key));
  if (!v->is_number()) return TypeError(key, "a number");
  const double d = v->get<double>();
  if (!std::isfinite(d) || !(d > above)) {
    return Invalid(absl::StrCat("key '", key, "' must be a finite number > ", above, " (got ",
                                Describe(*v), ")"));
  }
  *out = d;
  return absl::OkStatus();
}

absl::Status GetBool(const json& obj, absl::string_view key, bool* out) {
  KLS_ASSIGN_OR_RETURN(const json* v, Require(obj, "", key));
  if (!v->is_boolean()) return TypeError(key, "a boolean");
  *out = v->get<bool>();
  return absl::OkStatus();
}

absl::Status GetString(const json& obj, absl::string_view key, std::string* out) {
  KLS_ASSIGN_OR_RETURN(const json* v, Require(obj, "", key));
  if (!v->is_string()) return TypeError(key, "a string");
  *out = v->get<std::string>();
  return absl::OkStatus();
}

// A string key that must equal `expected` (the only supported value).
absl::Status GetFixedString(const json& obj, absl::string_view key, absl::string_view expected,
                            std::string* out) {
  KLS_RETURN_IF_ERROR(GetString(obj, key, out));
  if (absl::string_view(*out) != expected) {
    return Invalid(absl::StrCat("key '", key, "' must be \"", expected, "\" (got \"", *out,
                                "\"): unsupported"));
  }
  return absl::OkStatus();
}

absl::Status GetLayerList(const json& obj, absl::string_view key, std::vector<int>* out) {
  const std::string path = KeyPath(kLinearAttn, key);
  KLS_ASSIGN_OR_RETURN(const json* v, Require(obj, kLinearAttn, key));
  if (!v->is_array()) return TypeError(path, "an array of integers");
  out->clear();
  for (const json& e : *v) {
    int64_t n = 0;
    if (!e.is_number_integer() || !JsonToInt64(e, &n) || n < std::numeric_limits<int>::min() ||
        n > kMaxInt) {
      return TypeError(path, "an array of integers");
    }
    out->push_back(static_cast<int>(n));
  }
  return absl::OkStatus();
}

// kda_layers and full_attn_layers must partition 1..num_layers (1-based, KIMI_LINEAR.md §10.1).
absl::Status CheckLayerPartition(const LinearAttnConfig& la, int num_layers) {
  const std::string kda_key = KeyPath(kLinearAttn, "kda_layers");
  const std::string full_key = KeyPath(kLinearAttn, "full_attn_layers");
  // owner[n] for 1-based layer n: 0 = unassigned, 1 = kda, 2 = full attention.
  std::vector<int> owner(static_cast<size_t>(num_layers) + 1, 0);
  const auto mark = [&](const std::vector<int>& list, const std::string& key,
                        int tag) -> absl::Status {
    for (int n : list) {
      if (n < 1 || n > num_layers) {
        std::string hint = n == 0 ? "; this list looks 0-based" : "";
        return Invalid(absl::StrCat("key '", key, "' contains layer number ", n, ", outside 1..",
                                    num_layers, " (layer numbers are 1-based", hint, ")"));
      }
      int& o = owner[static_cast<size_t>(n)];
      if (o == tag) {
        return Invalid(absl::StrCat("key '", key, "' lists layer ", n, " twice"));
      }
      if (o != 0) {
        return Invalid(
            absl::StrCat("layer ", n, " is listed in both '", kda_key, "' and '", full_key, "'"));
      }
      o = tag;
    }
    return absl::OkStatus();
  };
  KLS_RETURN_IF_ERROR(mark(la.kda_layers, kda_key, 1));
  KLS_RETURN_IF_ERROR(mark(la.full_attn_layers, full_key, 2));
  for (int n = 1; n <= num_layers; ++n) {
    if (owner[static_cast<size_t>(n)] == 0) {
      return Invalid(absl::StrCat("layer ", n, " (1-based) is in neither '", kda_key, "' nor '",
                                  full_key, "'"));
    }
  }
  return absl::OkStatus();
}

absl::Status RefuseGateLowerBound(const json& obj, absl::string_view prefix) {
  auto it = obj.find("gate_lower_bound");
  // null means "no lower bound", which is what this engine implements.
  if (it != obj.end() && !it->is_null()) {
    return Invalid(absl::StrCat("key '", KeyPath(prefix, "gate_lower_bound"), "' (", Describe(*it),
                                ") is unsupported: the KDA forget gate here is unbounded, as in "
                                "Kimi-Linear-48B"));
  }
  return absl::OkStatus();
}

absl::Status ParseLinearAttn(const json& root, int num_layers, LinearAttnConfig* la) {
  KLS_ASSIGN_OR_RETURN(const json* obj, Require(root, "", kLinearAttn));
  if (!obj->is_object()) return TypeError(kLinearAttn, "an object");
  KLS_RETURN_IF_ERROR(RefuseGateLowerBound(*obj, kLinearAttn));
  KLS_RETURN_IF_ERROR(
      GetInt(*obj, kLinearAttn, "num_heads", 1, kMaxHeads, &la->num_heads, kStateCap));
  KLS_RETURN_IF_ERROR(
      GetInt(*obj, kLinearAttn, "head_dim", 1, kMaxKdaHeadDim, &la->head_dim, kStateCap));
  KLS_RETURN_IF_ERROR(
      GetInt(*obj, kLinearAttn, "short_conv_kernel_size", 2, 1024, &la->short_conv_kernel_size));
  KLS_RETURN_IF_ERROR(GetLayerList(*obj, "kda_layers", &la->kda_layers));
  KLS_RETURN_IF_ERROR(GetLayerList(*obj, "full_attn_layers", &la->full_attn_layers));
  return CheckLayerPartition(*la, num_layers);
}

absl::Status ParseTorchDtype(const json& root, std::string* out) {
  // Newer transformers write "dtype"; the released config has "torch_dtype".
  const char* key = root.contains("torch_dtype") ? "torch_dtype" : "dtype";
  if (!root.contains(key)) return Invalid("missing key 'torch_dtype' (or its alias 'dtype')");
  KLS_RETURN_IF_ERROR(GetString(root, key, out));
  if (*out != "bfloat16" && *out != "float16" && *out != "float32") {
    return Invalid(absl::StrCat("key '", key, "' must be one of bfloat16, float16, float32 (got \"",
                                *out, "\")"));
  }
  return absl::OkStatus();
}

absl::Status ParseImpl(const json& root, ModelConfig* c) {
  if (!root.is_object()) return Invalid("top level must be a JSON object");
  // model_type first: a config of another model should say so, not report a missing key.
  KLS_ASSIGN_OR_RETURN(const json* model_type, Require(root, "", "model_type"));
  if (!model_type->is_string()) return TypeError("model_type", "a string");
  c->model_type = model_type->get<std::string>();
  if (c->model_type != "kimi_linear") {
    return Invalid(
        absl::StrCat("unsupported model_type '", c->model_type, "' (expected kimi_linear)"));
  }

  KLS_ASSIGN_OR_RETURN(const json* archs, Require(root, "", "architectures"));
  if (!archs->is_array() || archs->empty()) {
    return TypeError("architectures", "a non-empty array of strings");
  }
  c->architectures.clear();
  for (const json& a : *archs) {
    if (!a.is_string()) return TypeError("architectures", "a non-empty array of strings");
    c->architectures.push_back(a.get<std::string>());
  }
  KLS_RETURN_IF_ERROR(ParseTorchDtype(root, &c->torch_dtype));

  KLS_ASSIGN_OR_RETURN(c->vocab_size, GetInt64(root, "", "vocab_size", 1, kMaxInt));
  KLS_RETURN_IF_ERROR(
      GetInt(root, "", "hidden_size", 1, kMaxHiddenSize, &c->hidden_size, kStateCap));
  KLS_RETURN_IF_ERROR(GetInt(root, "", "num_hidden_layers", 1, kMaxLayers, &c->num_hidden_layers));
  KLS_RETURN_IF_ERROR(
      GetInt(root, "", "num_attention_heads", 1, kMaxHeads, &c->num_attention_heads, kStateCap));
  KLS_RETURN_IF_ERROR(
      GetInt(root, "", "num_key_value_heads", 1, kMaxHeads, &c->num_key_value_heads, kStateCap));
  KLS_RETURN_IF_ERROR(GetInt(root, "", "head_dim", 1, kMaxDim, &c->head_dim));
  KLS_RETURN_IF_ERROR(GetInt(root, "", "intermediate_size", 1, kMaxDim, &c->intermediate_size));
  KLS_RETURN_IF_ERROR(GetFixedString(root, "hidden_act", "silu", &c->hidden_act));
  KLS_RETURN_IF_ERROR(GetDouble(root, "rms_norm_eps", 0.0, &c->rms_norm_eps));
  KLS_RETURN_IF_ERROR(GetDouble(root, "rope_theta", 0.0, &c->rope_theta));
  KLS_ASSIGN_OR_RETURN(c->model_max_length, GetInt64(root, "", "model_max_length", 1,
                                                     std::numeric_limits<int64_t>::max()));
  KLS_RETURN_IF_ERROR(GetBool(root, "tie_word_embeddings", &c->tie_word_embeddings));
  if (c->tie_word_embeddings) {
    // The loader always reads lm_head.weight; tied weights would need it to alias embed_tokens.
    return Invalid(
        "tie_word_embeddings: true is not supported (Kimi Linear has a separate lm_head)");
  }
  for (auto [key, field] :
       {std::pair{"bos_token_id", &c->bos_token_id}, std::pair{"eos_token_id", &c->eos_token_id},
        std::pair{"pad_token_id", &c->pad_token_id}}) {
    KLS_ASSIGN_OR_RETURN(*field, GetInt64(root, "", key, 0, std::numeric_limits<int64_t>::max()));
    if (*field >= c->vocab_size) {
      return Invalid(absl::StrCat("key '", key, "' (", *field, ") must be < vocab_size (",
                                  c->vocab_size, ")"));
    }
  }

  // MLA.
  KLS_ASSIGN_OR_RETURN(const json* q_lora_rank, Require(root, "", "q_lora_rank"));
  if (!q_lora_rank->is_null()) {
    return Invalid(absl::StrCat("key 'q_lora_rank' must be null (got ", Describe(*q_lora_rank),
                                "): a low-rank Q projection is unsupported"));
  }
  c->q_lora_rank.reset();
  KLS_RETURN_IF_ERROR(GetInt(root, "", "kv_lora_rank", 1, kMaxMlaDim, &c->kv_lora_rank, kStateCap));
  KLS_RETURN_IF_ERROR(
      GetInt(root, "", "qk_nope_head_dim", 1, kMaxMlaDim, &c->qk_nope_head_dim, kStateCap));
  // 0 would mean no decoupled key slice at all; Kimi-Linear-48B has 64.
  KLS_RETURN_IF_ERROR(
      GetInt(root, "", "qk_rope_head_dim", 0, kMaxMlaDim, &c->qk_rope_head_dim, kStateCap));
  KLS_RETURN_IF_ERROR(GetInt(root, "", "v_head_dim", 1, kMaxMlaDim, &c->v_head_dim, kStateCap));
  KLS_RETURN_IF_ERROR(GetBool(root, "mla_use_nope", &c->mla_use_nope));
  if (!c->mla_use_nope) {
    return Invalid("key 'mla_use_nope' must be true: rotary MLA is unsupported");
  }

  // KDA. gate_lower_bound belongs in linear_attn_config; refuse it at the top level too.
  KLS_RETURN_IF_ERROR(RefuseGateLowerBound(root, ""));
  KLS_RETURN_IF_ERROR(ParseLinearAttn(root, c->num_hidden_layers, &c->linear_attn_config));

  // MoE.
  KLS_RETURN_IF_ERROR(GetInt(root, "", "num_experts", 1, kMaxExperts, &c->num_experts));
  KLS_RETURN_IF_ERROR(
      GetInt(root, "", "num_experts_per_token", 1, kMaxExperts, &c->num_experts_per_token));
  if (c->num_experts_per_token > c->num_experts) {
    return Invalid(absl::StrCat("key 'num_experts_per_token' (", c->num_experts_per_token,
                                ") must be <= num_experts (", c->num_experts, ")"));
  }
  // The loader reads the shared expert's weights for every MoE layer.
  KLS_RETURN_IF_ERROR(
      GetInt(root, "", "num_shared_experts", 1, kMaxExperts, &c->num_shared_experts));
  KLS_RETURN_IF_ERROR(
      GetInt(root, "", "moe_intermediate_size", 1, kMaxDim, &c->moe_intermediate_size));
  KLS_RETURN_IF_ERROR(GetFixedString(root, "moe_router_activation_func", "sigmoid",
                                     &c->moe_router_activation_func));
  KLS_RETURN_IF_ERROR(GetBool(root, "moe_renormalize", &c->moe_renormalize));
  KLS_RETURN_IF_ERROR(GetDouble(root, "routed_scaling_factor", 0.0, &c->routed_scaling_factor));
  KLS_RETURN_IF_ERROR(GetBool(root, "use_grouped_topk", &c->use_grouped_topk));
  // Grouped routing with one group is the plain top-k this engine implements.
  constexpr absl::string_view kNoGroups = "grouped expert routing is unsupported";
  KLS_RETURN_IF_ERROR(GetInt(root, "", "num_expert_group", 1, 1, &c->num_expert_group, kNoGroups));
  KLS_RETURN_IF_ERROR(GetInt(root, "", "topk_group", 1, 1, &c->topk_group, kNoGroups));
  KLS_RETURN_IF_ERROR(GetInt(root, "", "first_k_dense_replace", 0, c->num_hidden_layers,
                             &c->first_k_dense_replace));
  KLS_RETURN_IF_ERROR(GetInt(root, "", "moe_layer_freq", 1, kMaxLayers, &c->moe_layer_freq));
  KLS_RETURN_IF_ERROR(GetInt(root, "", "num_nextn_predict_layers", 0, 0,
                             &c->num_nextn_predict_layers,
                             "multi-token-prediction layers are unsupported"));
  return absl::OkStatus();
}

}  // namespace

LayerKind ModelConfig::layer_kind(int i) const {
  const std::vector<int>& kda = linear_attn_config.kda_layers;
  return std::find(kda.begin(), kda.end(), i + 1) != kda.end() ? LayerKind::kKda : LayerKind::kMla;
}

FfnKind ModelConfig::ffn_kind(int i) const {
  const bool moe = i >= first_k_dense_replace && moe_layer_freq > 0 && i % moe_layer_freq == 0;
  return moe ? FfnKind::kMoe : FfnKind::kDense;
}

int ModelConfig::num_kda_layers() const {
  int n = 0;
  for (int i = 0; i < num_hidden_layers; ++i) n += layer_kind(i) == LayerKind::kKda ? 1 : 0;
  return n;
}

int ModelConfig::num_mla_layers() const { return num_hidden_layers - num_kda_layers(); }

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text) {
  const json root = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return Invalid("not valid JSON");
  ModelConfig config;
  KLS_RETURN_IF_ERROR(ParseImpl(root, &config));
  return config;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = absl::StrCat(model_dir, "/config.json");
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (!text.ok()) {
    if (absl::IsNotFound(text.status())) {
      return absl::NotFoundError(absl::StrCat("model config not found: ", path));
    }
    return text.status();
  }
  return ParseModelConfig(*text);
}

std::string ModelConfigToJson(const ModelConfig& c) {
  // nlohmann's default object is a sorted map, which is also how transformers writes
  // config.json (sort_keys=True).
  json la = json::object();
  la["num_heads"] = c.linear_attn_config.num_heads;
  la["head_dim"] = c.linear_attn_config.head_dim;
  la["short_conv_kernel_size"] = c.linear_attn_config.short_conv_kernel_size;
  la["kda_layers"] = c.linear_attn_config.kda_layers;
  la["full_attn_layers"] = c.linear_attn_config.full_attn_layers;

  json j = json::object();
  j["architectures"] = c.architectures;
  j["model_type"] = c.model_type;
  j["torch_dtype"] = c.torch_dtype;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["intermediate_size"] = c.intermediate_size;
  j["hidden_act"] = c.hidden_act;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["model_max_length"] = c.model_max_length;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["pad_token_id"] = c.pad_token_id;
  j["q_lora_rank"] = c.q_lora_rank.has_value() ? json(*c.q_lora_rank) : json(nullptr);
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["v_head_dim"] = c.v_head_dim;
  j["mla_use_nope"] = c.mla_use_nope;
  j["linear_attn_config"] = std::move(la);
  j["num_experts"] = c.num_experts;
  j["num_experts_per_token"] = c.num_experts_per_token;
  j["num_shared_experts"] = c.num_shared_experts;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["moe_router_activation_func"] = c.moe_router_activation_func;
  j["moe_renormalize"] = c.moe_renormalize;
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["use_grouped_topk"] = c.use_grouped_topk;
  j["num_expert_group"] = c.num_expert_group;
  j["topk_group"] = c.topk_group;
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["moe_layer_freq"] = c.moe_layer_freq;
  j["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  // `replace` keeps dump() from throwing on a hand-built config with invalid UTF-8.
  return j.dump(2, ' ', /*ensure_ascii=*/false, json::error_handler_t::replace) + "\n";
}

}  // namespace kls::engine

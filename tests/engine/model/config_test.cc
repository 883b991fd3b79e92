#include "engine/model/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "tests/test_util.h"

namespace kls::engine {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

// The released Kimi-Linear-48B-A3B config.json (KIMI_LINEAR.md §1.1), every key.
constexpr std::string_view kReleasedConfig = R"json({
  "architectures": ["KimiLinearForCausalLM"],
  "auto_map": {
    "AutoConfig": "configuration_kimi.KimiLinearConfig",
    "AutoModel": "modeling_kimi.KimiLinearModel",
    "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM"
  },
  "bos_token_id": 163584,
  "eos_token_id": 163586,
  "first_k_dense_replace": 1,
  "head_dim": 72,
  "hidden_act": "silu",
  "hidden_size": 2304,
  "initializer_range": 0.02,
  "intermediate_size": 9216,
  "kv_lora_rank": 512,
  "linear_attn_config": {
    "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
    "head_dim": 128,
    "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
    "num_heads": 32,
    "short_conv_kernel_size": 4
  },
  "mla_use_nope": true,
  "model_max_length": 1048576,
  "model_type": "kimi_linear",
  "moe_intermediate_size": 1024,
  "moe_layer_freq": 1,
  "moe_renormalize": true,
  "moe_router_activation_func": "sigmoid",
  "num_attention_heads": 32,
  "num_expert_group": 1,
  "num_experts": 256,
  "num_experts_per_token": 8,
  "num_hidden_layers": 27,
  "num_key_value_heads": 32,
  "num_nextn_predict_layers": 0,
  "num_shared_experts": 1,
  "pad_token_id": 163839,
  "q_lora_rank": null,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "routed_scaling_factor": 2.446,
  "tie_word_embeddings": false,
  "topk_group": 1,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.48.2",
  "use_cache": true,
  "use_grouped_topk": true,
  "v_head_dim": 128,
  "vocab_size": 163840
})json";

// Every key ModelConfig reads, as dotted paths.
const std::vector<std::string>& RequiredKeys() {
  static const auto* keys = new std::vector<std::string>{
      "architectures",
      "model_type",
      "torch_dtype",
      "vocab_size",
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "num_key_value_heads",
      "head_dim",
      "intermediate_size",
      "hidden_act",
      "rms_norm_eps",
      "rope_theta",
      "model_max_length",
      "tie_word_embeddings",
      "bos_token_id",
      "eos_token_id",
      "pad_token_id",
      "q_lora_rank",
      "kv_lora_rank",
      "qk_nope_head_dim",
      "qk_rope_head_dim",
      "v_head_dim",
      "mla_use_nope",
      "linear_attn_config",
      "linear_attn_config.num_heads",
      "linear_attn_config.head_dim",
      "linear_attn_config.short_conv_kernel_size",
      "linear_attn_config.kda_layers",
      "linear_attn_config.full_attn_layers",
      "num_experts",
      "num_experts_per_token",
      "num_shared_experts",
      "moe_intermediate_size",
      "moe_router_activation_func",
      "moe_renormalize",
      "routed_scaling_factor",
      "use_grouped_topk",
      "num_expert_group",
      "topk_group",
      "first_k_dense_replace",
      "moe_layer_freq",
      "num_nextn_predict_layers",
  };
  return *keys;
}

json Released() { return json::parse(kReleasedConfig); }

// The JSON value at a dotted path ("linear_attn_config.kda_layers").
json& At(json& j, const std::string& path) {
  json* node = &j;
  for (absl::string_view part : absl::StrSplit(path, '.')) node = &(*node)[std::string(part)];
  return *node;
}

void Erase(json& j, const std::string& path) {
  const size_t dot = path.rfind('.');
  if (dot == std::string::npos) {
    j.erase(path);
  } else {
    At(j, path.substr(0, dot)).erase(path.substr(dot + 1));
  }
}

absl::StatusOr<ModelConfig> Parse(const json& j) { return ParseModelConfig(j.dump()); }

// Expects INVALID_ARGUMENT whose message contains `needle`.
void ExpectInvalid(const json& j, const std::string& needle) {
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_FALSE(c.ok()) << "accepted a config that should fail with: " << needle;
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(needle));
}

void ExpectSameConfig(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.architectures, b.architectures);
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.hidden_act, b.hidden_act);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);  // exact: doubles must round-trip bit for bit
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.model_max_length, b.model_max_length);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_id, b.eos_token_id);
  EXPECT_EQ(a.pad_token_id, b.pad_token_id);
  EXPECT_EQ(a.q_lora_rank, b.q_lora_rank);
  EXPECT_EQ(a.kv_lora_rank, b.kv_lora_rank);
  EXPECT_EQ(a.qk_nope_head_dim, b.qk_nope_head_dim);
  EXPECT_EQ(a.qk_rope_head_dim, b.qk_rope_head_dim);
  EXPECT_EQ(a.v_head_dim, b.v_head_dim);
  EXPECT_EQ(a.mla_use_nope, b.mla_use_nope);
  EXPECT_EQ(a.linear_attn_config.num_heads, b.linear_attn_config.num_heads);
  EXPECT_EQ(a.linear_attn_config.head_dim, b.linear_attn_config.head_dim);
  EXPECT_EQ(a.linear_attn_config.short_conv_kernel_size,
            b.linear_attn_config.short_conv_kernel_size);
  EXPECT_EQ(a.linear_attn_config.kda_layers, b.linear_attn_config.kda_layers);
  EXPECT_EQ(a.linear_attn_config.full_attn_layers, b.linear_attn_config.full_attn_layers);
  EXPECT_EQ(a.num_experts, b.num_experts);
  EXPECT_EQ(a.num_experts_per_token, b.num_experts_per_token);
  EXPECT_EQ(a.num_shared_experts, b.num_shared_experts);
  EXPECT_EQ(a.moe_intermediate_size, b.moe_intermediate_size);
  EXPECT_EQ(a.moe_router_activation_func, b.moe_router_activation_func);
  EXPECT_EQ(a.moe_renormalize, b.moe_renormalize);
  EXPECT_EQ(a.routed_scaling_factor, b.routed_scaling_factor);
  EXPECT_EQ(a.use_grouped_topk, b.use_grouped_topk);
  EXPECT_EQ(a.num_expert_group, b.num_expert_group);
  EXPECT_EQ(a.topk_group, b.topk_group);
  EXPECT_EQ(a.first_k_dense_replace, b.first_k_dense_replace);
  EXPECT_EQ(a.moe_layer_freq, b.moe_layer_freq);
  EXPECT_EQ(a.num_nextn_predict_layers, b.num_nextn_predict_layers);
}

TEST(ModelConfigTest, ParsesReleasedConfig) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kReleasedConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architectures, std::vector<std::string>{"KimiLinearForCausalLM"});
  EXPECT_EQ(c->model_type, "kimi_linear");
  EXPECT_EQ(c->torch_dtype, "bfloat16");
  EXPECT_EQ(c->vocab_size, 163840);
  EXPECT_EQ(c->hidden_size, 2304);
  EXPECT_EQ(c->num_hidden_layers, 27);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_EQ(c->head_dim, 72);
  EXPECT_EQ(c->intermediate_size, 9216);
  EXPECT_EQ(c->hidden_act, "silu");
  EXPECT_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->model_max_length, 1048576);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->bos_token_id, 163584);
  EXPECT_EQ(c->eos_token_id, 163586);
  EXPECT_EQ(c->pad_token_id, 163839);
  EXPECT_FALSE(c->q_lora_rank.has_value());
  EXPECT_EQ(c->kv_lora_rank, 512);
  EXPECT_EQ(c->qk_nope_head_dim, 128);
  EXPECT_EQ(c->qk_rope_head_dim, 64);
  EXPECT_EQ(c->v_head_dim, 128);
  EXPECT_TRUE(c->mla_use_nope);
  EXPECT_EQ(c->linear_attn_config.num_heads, 32);
  EXPECT_EQ(c->linear_attn_config.head_dim, 128);
  EXPECT_EQ(c->linear_attn_config.short_conv_kernel_size, 4);
  EXPECT_EQ(c->linear_attn_config.full_attn_layers, (std::vector<int>{4, 8, 12, 16, 20, 24, 27}));
  EXPECT_EQ(c->linear_attn_config.kda_layers.size(), 20u);
  EXPECT_EQ(c->num_experts, 256);
  EXPECT_EQ(c->num_experts_per_token, 8);
  EXPECT_EQ(c->num_shared_experts, 1);
  EXPECT_EQ(c->moe_intermediate_size, 1024);
  EXPECT_EQ(c->moe_router_activation_func, "sigmoid");
  EXPECT_TRUE(c->moe_renormalize);
  EXPECT_EQ(c->routed_scaling_factor, 2.446);
  EXPECT_TRUE(c->use_grouped_topk);
  EXPECT_EQ(c->num_expert_group, 1);
  EXPECT_EQ(c->topk_group, 1);
  EXPECT_EQ(c->first_k_dense_replace, 1);
  EXPECT_EQ(c->moe_layer_freq, 1);
  EXPECT_EQ(c->num_nextn_predict_layers, 0);

  EXPECT_EQ(c->qk_head_dim(), 192);
  EXPECT_EQ(c->mla_cache_dim(), 576);
  EXPECT_EQ(c->kda_dim(), 4096);
  EXPECT_EQ(c->num_kda_layers(), 20);
  EXPECT_EQ(c->num_mla_layers(), 7);
}

TEST(ModelConfigTest, LayerTypingOfReleasedConfig) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kReleasedConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<int> mla, dense;
  for (int i = 0; i < c->num_hidden_layers; ++i) {
    if (c->layer_kind(i) == LayerKind::kMla) mla.push_back(i);
    if (c->ffn_kind(i) == FfnKind::kDense) dense.push_back(i);
  }
  EXPECT_EQ(mla, (std::vector<int>{3, 7, 11, 15, 19, 23, 26}));
  EXPECT_EQ(dense, std::vector<int>{0});
  EXPECT_EQ(c->layer_kind(0), LayerKind::kKda);
  EXPECT_EQ(c->layer_kind(24), LayerKind::kKda);
  EXPECT_EQ(c->layer_kind(25), LayerKind::kKda);
}

TEST(ModelConfigTest, FfnKindFollowsDenseReplaceAndFrequency) {
  json j = Released();
  j["num_hidden_layers"] = 6;
  At(j, "linear_attn_config.kda_layers") = {1, 2, 3, 5};
  At(j, "linear_attn_config.full_attn_layers") = {4, 6};
  j["first_k_dense_replace"] = 2;
  j["moe_layer_freq"] = 2;
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<FfnKind> kinds;
  for (int i = 0; i < 6; ++i) kinds.push_back(c->ffn_kind(i));
  EXPECT_EQ(kinds, (std::vector<FfnKind>{FfnKind::kDense, FfnKind::kDense, FfnKind::kMoe,
                                         FfnKind::kDense, FfnKind::kMoe, FfnKind::kDense}));
  EXPECT_EQ(c->num_mla_layers(), 2);

  // first_k_dense_replace == num_hidden_layers: an all-dense model is valid.
  j["first_k_dense_replace"] = 6;
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  for (int i = 0; i < 6; ++i) EXPECT_EQ(c->ffn_kind(i), FfnKind::kDense) << i;
}

TEST(ModelConfigTest, RoundTripsExactly) {
  absl::StatusOr<ModelConfig> first = ParseModelConfig(kReleasedConfig);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string text = ModelConfigToJson(*first);
  absl::StatusOr<ModelConfig> second = ParseModelConfig(text);
  ASSERT_TRUE(second.ok()) << second.status() << "\n" << text;
  ExpectSameConfig(*first, *second);
  EXPECT_EQ(ModelConfigToJson(*second), text);

  // Released layout: linear_attn_config nested, torch_dtype spelled as released.
  const json j = json::parse(text);
  ASSERT_TRUE(j.contains("linear_attn_config"));
  EXPECT_EQ(j["linear_attn_config"]["full_attn_layers"], json({4, 8, 12, 16, 20, 24, 27}));
  EXPECT_EQ(j["linear_attn_config"]["short_conv_kernel_size"], 4);
  EXPECT_TRUE(j["q_lora_rank"].is_null());
  EXPECT_EQ(j["torch_dtype"], "bfloat16");
  EXPECT_FALSE(j.contains("num_kda_layers"));
}

TEST(ModelConfigTest, RoundTripsAwkwardDoubles) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kReleasedConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  c->rms_norm_eps = 1.0 / 3.0 * 1e-6;
  c->routed_scaling_factor = 0.1 + 0.2;
  c->rope_theta = 1e300;
  absl::StatusOr<ModelConfig> back = ParseModelConfig(ModelConfigToJson(*c));
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameConfig(*c, *back);
}

TEST(ModelConfigTest, AcceptsDtypeAlias) {
  json j = Released();
  j.erase("torch_dtype");
  j["dtype"] = "bfloat16";
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->torch_dtype, "bfloat16");
  j["dtype"] = "int8";
  ExpectInvalid(j, "key 'dtype' must be one of bfloat16, float16, float32");
}

TEST(ModelConfigTest, IgnoresUnknownKeys) {
  json j = Released();
  j["some_future_key"] = {{"nested", {1, 2, 3}}};
  At(j, "linear_attn_config.another_future_key") = "x";
  EXPECT_TRUE(Parse(j).ok());
}

TEST(ModelConfigTest, EachMissingKeyIsNamed) {
  for (const std::string& key : RequiredKeys()) {
    SCOPED_TRACE(key);
    json j = Released();
    Erase(j, key);
    ExpectInvalid(j, "config.json: missing key '" + key + "'");
  }
}

TEST(ModelConfigTest, WrongTypesAreNamed) {
  struct Case {
    std::string key;
    json value;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"vocab_size", "163840", "key 'vocab_size' must be an integer"},
      {"hidden_size", 2304.5, "key 'hidden_size' must be an integer"},
      {"num_hidden_layers", 27.0, "key 'num_hidden_layers' must be an integer"},
      {"bos_token_id", nullptr, "key 'bos_token_id' must be an integer"},
      {"linear_attn_config.num_heads", true,
       "key 'linear_attn_config.num_heads' must be an integer"},
      {"rms_norm_eps", "1e-5", "key 'rms_norm_eps' must be a number"},
      {"routed_scaling_factor", json::array(), "key 'routed_scaling_factor' must be a number"},
      {"tie_word_embeddings", 0, "key 'tie_word_embeddings' must be a boolean"},
      {"mla_use_nope", "true", "key 'mla_use_nope' must be a boolean"},
      {"hidden_act", 1, "key 'hidden_act' must be a string"},
      {"model_type", json::object(), "key 'model_type' must be a string"},
      {"torch_dtype", 16, "key 'torch_dtype' must be a string"},
      {"architectures", "KimiLinearForCausalLM", "key 'architectures' must be a non-empty array"},
      {"architectures", {1}, "key 'architectures' must be a non-empty array of strings"},
      {"linear_attn_config", json::array(), "key 'linear_attn_config' must be an object"},
      {"linear_attn_config.kda_layers", "1,2,3",
       "key 'linear_attn_config.kda_layers' must be an array of integers"},
      {"linear_attn_config.full_attn_layers",
       {4.0, 8},
       "key 'linear_attn_config.full_attn_layers' must be an array of integers"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.key);
    json j = Released();
    At(j, c.key) = c.value;
    ExpectInvalid(j, c.message);
  }
}

TEST(ModelConfigTest, OutOfRangeValuesAreNamed) {
  struct Case {
    std::string key;
    json value;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"vocab_size", 0, "key 'vocab_size' must be"},
      {"hidden_size", 0, "key 'hidden_size' must be in [1, "},
      {"hidden_size", -2304, "key 'hidden_size' must be in [1, "},
      {"hidden_size", 4294967296LL, "key 'hidden_size' must be in [1, "},
      {"num_hidden_layers", 0, "key 'num_hidden_layers' must be"},
      {"num_attention_heads", 0, "key 'num_attention_heads'"},
      {"kv_lora_rank", 0, "key 'kv_lora_rank'"},
      {"v_head_dim", -1, "key 'v_head_dim'"},
      {"linear_attn_config.head_dim", 0, "key 'linear_attn_config.head_dim'"},
      {"linear_attn_config.short_conv_kernel_size", 1,
       "key 'linear_attn_config.short_conv_kernel_size' must be in [2, "},
      {"rms_norm_eps", 0.0, "key 'rms_norm_eps' must be a finite number > 0"},
      {"rms_norm_eps", -1e-5, "key 'rms_norm_eps' must be a finite number > 0"},
      {"routed_scaling_factor", 0, "key 'routed_scaling_factor'"},
      {"model_max_length", 0, "key 'model_max_length' must be >= 1"},
      {"eos_token_id", 163840, "key 'eos_token_id' (163840) must be < vocab_size (163840)"},
      {"bos_token_id", 200000, "key 'bos_token_id' (200000) must be < vocab_size"},
      {"pad_token_id", -1, "key 'pad_token_id' must be >= 0"},
      {"num_experts_per_token", 257, "key 'num_experts_per_token' (257) must be <= num_experts"},
      {"num_experts_per_token", 0, "key 'num_experts_per_token'"},
      {"num_shared_experts", -1, "key 'num_shared_experts'"},
      {"num_shared_experts", 0, "key 'num_shared_experts' must be in [1, "},
      {"vocab_size", json(10000000000000000000ULL),
       "key 'vocab_size' is out of range (got 10000000000000000000)"},
      {"first_k_dense_replace", 28, "key 'first_k_dense_replace' must be in [0, 27]"},
      {"first_k_dense_replace", -1, "key 'first_k_dense_replace' must be in [0, 27]"},
      {"moe_layer_freq", 0, "key 'moe_layer_freq' must be in [1, "},
      {"num_expert_group", 8,
       "key 'num_expert_group' must be 1 (got 8): grouped expert routing is unsupported"},
      {"topk_group", 4, "key 'topk_group' must be 1 (got 4)"},
      {"num_nextn_predict_layers", 1,
       "key 'num_nextn_predict_layers' must be 0 (got 1): multi-token"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.key + " = " + c.value.dump());
    json j = Released();
    At(j, c.key) = c.value;
    ExpectInvalid(j, c.message);
  }
}

// Caps on the dimensions that size per-session state (KDA recurrent state H × K × K per layer, MLA
// latent cache per token) and activations, so a hostile config.json cannot ask for huge buffers.
TEST(ModelConfigTest, StateSizingDimensionsAreCapped) {
  struct Case {
    std::string key;
    int64_t cap;
    int64_t lo;
  };
  const std::vector<Case> cases = {
      {"hidden_size", 65536, 1},
      {"num_attention_heads", 1024, 1},
      {"num_key_value_heads", 1024, 1},
      {"kv_lora_rank", 4096, 1},
      {"qk_nope_head_dim", 4096, 1},
      {"qk_rope_head_dim", 4096, 0},
      {"v_head_dim", 4096, 1},
      {"linear_attn_config.num_heads", 1024, 1},
      {"linear_attn_config.head_dim", 1024, 1},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.key);
    json j = Released();
    At(j, c.key) = c.cap;
    absl::StatusOr<ModelConfig> at_cap = Parse(j);
    EXPECT_TRUE(at_cap.ok()) << at_cap.status();
    At(j, c.key) = c.cap + 1;
    ExpectInvalid(j, absl::StrCat("key '", c.key, "' must be in [", c.lo, ", ", c.cap, "] (got ",
                                  c.cap + 1, ")"));
  }
  // Every cap at once still fits the engine's int arithmetic.
  json j = Released();
  j["hidden_size"] = 65536;
  j["num_attention_heads"] = 1024;
  j["kv_lora_rank"] = 4096;
  j["qk_nope_head_dim"] = 4096;
  j["qk_rope_head_dim"] = 4096;
  j["v_head_dim"] = 4096;
  At(j, "linear_attn_config.num_heads") = 1024;
  At(j, "linear_attn_config.head_dim") = 1024;
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->kda_dim(), 1024 * 1024);
  EXPECT_EQ(c->qk_head_dim(), 8192);
  EXPECT_EQ(c->mla_cache_dim(), 8192);
}

TEST(ModelConfigTest, TiedWordEmbeddingsAreRefused) {
  json j = Released();
  j["tie_word_embeddings"] = true;
  ExpectInvalid(j,
                "tie_word_embeddings: true is not supported (Kimi Linear has a separate lm_head)");
}

TEST(ModelConfigTest, UnsupportedModelType) {
  json j = Released();
  j["model_type"] = "deepseek_v3";
  ExpectInvalid(j, "unsupported model_type 'deepseek_v3' (expected kimi_linear)");
  // Reported even when the rest of the config belongs to another model.
  ExpectInvalid(json{{"model_type", "llama"}}, "unsupported model_type 'llama'");
}

TEST(ModelConfigTest, UnsupportedFeatures) {
  struct Case {
    std::string key;
    json value;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"hidden_act", "gelu", "key 'hidden_act' must be \"silu\" (got \"gelu\")"},
      {"moe_router_activation_func", "softmax",
       "key 'moe_router_activation_func' must be \"sigmoid\" (got \"softmax\")"},
      {"q_lora_rank", 1536, "key 'q_lora_rank' must be null (got 1536)"},
      {"mla_use_nope", false, "key 'mla_use_nope' must be true"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.key);
    json j = Released();
    At(j, c.key) = c.value;
    ExpectInvalid(j, c.message);
  }
}

TEST(ModelConfigTest, GateLowerBoundIsRefused) {
  json j = Released();
  At(j, "linear_attn_config.gate_lower_bound") = -5.0;
  ExpectInvalid(j, "key 'linear_attn_config.gate_lower_bound' (-5.0) is unsupported");

  j = Released();
  j["gate_lower_bound"] = -5.0;
  ExpectInvalid(j, "key 'gate_lower_bound' (-5.0) is unsupported");

  // An explicit null means "no lower bound", which is the released model's gate.
  j = Released();
  At(j, "linear_attn_config.gate_lower_bound") = nullptr;
  EXPECT_TRUE(Parse(j).ok());
}

// Error messages describe nested values by type: dump() of attacker-controlled JSON recurses once
// per nesting level.
TEST(ModelConfigTest, NestedValuesAreDescribedByType) {
  json j = Released();
  j["q_lora_rank"] = json::array({json::array({1})});
  ExpectInvalid(j, "key 'q_lora_rank' must be null (got array)");
  j["q_lora_rank"] = {{"a", {{"b", 1}}}};
  ExpectInvalid(j, "key 'q_lora_rank' must be null (got object)");

  j = Released();
  At(j, "linear_attn_config.gate_lower_bound") = json::array({json::array({-5.0})});
  ExpectInvalid(j, "key 'linear_attn_config.gate_lower_bound' (array) is unsupported");
  At(j, "linear_attn_config.gate_lower_bound") = "low";
  ExpectInvalid(j, "key 'linear_attn_config.gate_lower_bound' (\"low\") is unsupported");
  At(j, "linear_attn_config.gate_lower_bound") = std::string(1000, 'x');
  absl::StatusOr<ModelConfig> c = Parse(j);
  ASSERT_FALSE(c.ok());
  EXPECT_LT(c.status().message().size(), 300u) << "a long string is cut in the message";
}

// `depth` nested arrays around 1, as JSON text (built without nlohmann, whose dump() recurses).
std::string DeepArray(int depth) {
  return std::string(static_cast<size_t>(depth), '[') + "1" +
         std::string(static_cast<size_t>(depth), ']');
}

// config.json text with `old` (which must occur once) replaced by `replacement`.
std::string ReleasedWith(std::string_view old, std::string_view replacement) {
  std::string text(kReleasedConfig);
  const size_t at = text.find(old);
  EXPECT_NE(at, std::string::npos) << old;
  if (at != std::string::npos) text.replace(at, old.size(), replacement);
  return text;
}

TEST(ModelConfigTest, DeeplyNestedValuesDoNotOverflowTheStack) {
  constexpr int kDepth = 1'000'000;
  const std::string deep = DeepArray(kDepth);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {ReleasedWith("\"q_lora_rank\": null", "\"q_lora_rank\": " + deep),
       "key 'q_lora_rank' must be null (got array)"},
      {ReleasedWith("\"num_heads\": 32,", "\"num_heads\": 32, \"gate_lower_bound\": " + deep + ","),
       "key 'linear_attn_config.gate_lower_bound' (array) is unsupported"},
      {ReleasedWith("\"use_cache\": true,", "\"gate_lower_bound\": " + deep + ","),
       "key 'gate_lower_bound' (array) is unsupported"},
      {ReleasedWith("\"rms_norm_eps\": 1e-05,", "\"rms_norm_eps\": " + deep + ","),
       "key 'rms_norm_eps' must be a number"},
  };
  for (const auto& [text, message] : cases) {
    SCOPED_TRACE(message);
    absl::StatusOr<ModelConfig> c = ParseModelConfig(text);
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(message));
  }
}

TEST(ModelConfigTest, LayerListsMustPartitionAllLayers) {
  {
    SCOPED_TRACE("layer missing");
    json j = Released();
    At(j, "linear_attn_config.full_attn_layers") = {4, 8, 12, 16, 20, 24};
    ExpectInvalid(j,
                  "layer 27 (1-based) is in neither 'linear_attn_config.kda_layers' nor "
                  "'linear_attn_config.full_attn_layers'");
  }
  {
    SCOPED_TRACE("layer in both");
    json j = Released();
    At(j, "linear_attn_config.kda_layers").push_back(8);
    ExpectInvalid(j, "layer 8 is listed in both");
  }
  {
    SCOPED_TRACE("duplicate");
    json j = Released();
    At(j, "linear_attn_config.full_attn_layers").push_back(27);
    ExpectInvalid(j, "key 'linear_attn_config.full_attn_layers' lists layer 27 twice");
  }
  {
    SCOPED_TRACE("beyond the last layer");
    json j = Released();
    At(j, "linear_attn_config.full_attn_layers").push_back(28);
    ExpectInvalid(j, "contains layer number 28, outside 1..27");
  }
  {
    SCOPED_TRACE("negative");
    json j = Released();
    At(j, "linear_attn_config.kda_layers").push_back(-3);
    ExpectInvalid(j, "contains layer number -3, outside 1..27");
  }
  {
    SCOPED_TRACE("all KDA is a valid partition");
    json j = Released();
    j["num_hidden_layers"] = 3;
    At(j, "linear_attn_config.kda_layers") = {3, 1, 2};
    At(j, "linear_attn_config.full_attn_layers") = json::array();
    j["first_k_dense_replace"] = 1;
    absl::StatusOr<ModelConfig> c = Parse(j);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->num_mla_layers(), 0);
  }
}

TEST(ModelConfigTest, ZeroBasedLayerListsAreRefused) {
  // The released lists shifted to 0-based: a common conversion mistake.
  json j = Released();
  json kda = json::array(), full = json::array();
  for (int n : At(j, "linear_attn_config.kda_layers")) kda.push_back(n - 1);
  for (int n : At(j, "linear_attn_config.full_attn_layers")) full.push_back(n - 1);
  At(j, "linear_attn_config.kda_layers") = kda;
  At(j, "linear_attn_config.full_attn_layers") = full;
  ExpectInvalid(j,
                "key 'linear_attn_config.kda_layers' contains layer number 0, outside 1..27 "
                "(layer numbers are 1-based; this list looks 0-based)");
}

TEST(ModelConfigTest, RejectsTextThatIsNotAConfigObject) {
  for (std::string_view text : {"", "{", "not json", "{\"a\": 1,}"}) {
    SCOPED_TRACE(text);
    absl::StatusOr<ModelConfig> c = ParseModelConfig(text);
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(c.status().message()), HasSubstr("config.json: not valid JSON"));
  }
  for (std::string_view text : {"[]", "42", "\"kimi_linear\"", "null"}) {
    SCOPED_TRACE(text);
    absl::StatusOr<ModelConfig> c = ParseModelConfig(text);
    ASSERT_FALSE(c.ok());
    EXPECT_THAT(std::string(c.status().message()), HasSubstr("top level must be a JSON object"));
  }
}

TEST(ModelConfigTest, LoadsFromDirectory) {
  const std::string dir = kls::testing::MakeTempDir();
  absl::StatusOr<ModelConfig> missing = LoadModelConfig(dir);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr(dir + "/config.json"));

  ASSERT_TRUE(kls::WriteStringToFile(dir + "/config.json", kReleasedConfig).ok());
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_hidden_layers, 27);
  kls::testing::RemoveTree(dir);
}

}  // namespace
}  // namespace kls::engine

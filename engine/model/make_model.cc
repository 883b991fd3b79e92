#include "engine/model/make_model.h"

#include <cmath>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/file_util.h"
#include "common/hash.h"
#include "common/splitmix64.h"
#include "common/status_macros.h"
#include "engine/model/weights.h"
#include "engine/tokenizer/vocab_files.h"
#include "nlohmann/json.hpp"

namespace kls::engine {
namespace {

constexpr int64_t kByteVocab = 256;
constexpr int64_t kMaxWeightBytes = int64_t{8} << 30;
constexpr int64_t kSpecialSlots = 256;

ModelConfig BaseConfig() {
  ModelConfig c;
  c.architectures = {"KimiLinearForCausalLM"};
  c.model_type = "kimi_linear";
  c.torch_dtype = "bfloat16";
  c.hidden_act = "silu";
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = false;
  c.q_lora_rank = std::nullopt;
  c.mla_use_nope = true;
  c.moe_router_activation_func = "sigmoid";
  c.moe_renormalize = true;
  c.routed_scaling_factor = 2.446;
  c.use_grouped_topk = true;
  c.num_expert_group = 1;
  c.topk_group = 1;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.num_nextn_predict_layers = 0;
  c.linear_attn_config.short_conv_kernel_size = 4;
  return c;
}

// 3 KDA then 1 MLA, repeated; the last layer is always MLA (as in the released 27-layer model).
void SetHybridLayers(ModelConfig* c) {
  c->linear_attn_config.kda_layers.clear();
  c->linear_attn_config.full_attn_layers.clear();
  for (int n = 1; n <= c->num_hidden_layers; ++n) {
    const bool mla = n % 4 == 0 || n == c->num_hidden_layers;
    (mla ? c->linear_attn_config.full_attn_layers : c->linear_attn_config.kda_layers).push_back(n);
  }
}

// Byte-level vocabulary + Kimi special slots (ids 256..511).
void SetByteVocab(ModelConfig* c) {
  c->vocab_size = kByteVocab + kSpecialSlots;
  c->bos_token_id = kByteVocab + 0;    // [BOS]
  c->eos_token_id = kByteVocab + 2;    // <|im_end|>
  c->pad_token_id = kByteVocab + 255;  // [PAD]
}

// splitmix64: a tiny, well-mixed generator; each tensor gets its own stream.
struct Rng {
  uint64_t s;
  uint64_t Next() { return SplitMix64Mix(s += kGoldenGamma); }
  double Uniform() { return (Next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  double Normal() {
    const double u1 = 1.0 - Uniform(), u2 = Uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

// Whether the binding is the last projection of a residual branch (MakeModelOptions::
// residual_scale).
bool IsResidualOutput(const WeightBinding& b) {
  return b.name.ends_with("o_proj.weight") || b.name.ends_with("down_proj.weight") ||
         b.name.ends_with("w2.weight");
}

std::vector<float> RandomTensor(const WeightBinding& b, uint64_t seed, double residual_scale) {
  int64_t n = 1;
  for (int64_t s : b.shape) n *= s;
  std::vector<float> v(static_cast<size_t>(n));
  Rng rng{Xxh3_64(b.name, seed)};
  const double linear_scale =
      (IsResidualOutput(b) ? residual_scale : 1.0) / std::sqrt(static_cast<double>(b.shape.back()));
  for (float& x : v) {
    switch (b.init) {
      case WeightInit::kLinear:
        x = static_cast<float>(rng.Normal() * linear_scale);
        break;
      case WeightInit::kEmbedding:
        x = static_cast<float>(rng.Normal());
        break;
      case WeightInit::kNorm:
        x = static_cast<float>(1.0 + 0.1 * rng.Normal());
        break;
      case WeightInit::kConv:
        x = static_cast<float>(0.5 * rng.Normal());
        break;
      case WeightInit::kALog:
        x = static_cast<float>(std::log(1.0 + 15.0 * rng.Uniform()));
        break;
      case WeightInit::kDtBias:
        x = static_cast<float>(rng.Normal());
        break;
      case WeightInit::kRouterBias:
        x = static_cast<float>(0.5 * rng.Normal());
        break;
    }
  }
  return v;
}

std::string EncodeAs(const std::vector<float>& v, DType dtype) {
  std::string bytes(v.size() * DTypeSize(dtype), '\0');
  for (size_t i = 0; i < v.size(); ++i) {
    switch (dtype) {
      case DType::kF32:
        std::memcpy(&bytes[i * 4], &v[i], 4);
        break;
      case DType::kBF16: {
        const uint16_t h = FloatToBf16(v[i]);
        std::memcpy(&bytes[i * 2], &h, 2);
        break;
      }
      case DType::kF16: {
        const uint16_t h = FloatToHalf(v[i]);
        std::memcpy(&bytes[i * 2], &h, 2);
        break;
      }
    }
  }
  return bytes;
}

}  // namespace

std::vector<std::string> PresetNames() { return {"tiny", "mid", "kimi-linear-48b"}; }

absl::StatusOr<ModelConfig> PresetConfig(std::string_view name) {
  ModelConfig c = BaseConfig();
  if (name == "tiny") {
    SetByteVocab(&c);
    c.hidden_size = 256;
    c.num_hidden_layers = 8;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 4;
    c.head_dim = 64;
    c.intermediate_size = 512;
    c.model_max_length = 65536;
    c.kv_lora_rank = 64;
    c.qk_nope_head_dim = 32;
    c.qk_rope_head_dim = 16;
    c.v_head_dim = 32;
    c.linear_attn_config.num_heads = 4;
    c.linear_attn_config.head_dim = 64;
    c.num_experts = 8;
    c.num_experts_per_token = 2;
    c.num_shared_experts = 1;
    c.moe_intermediate_size = 128;
  } else if (name == "mid") {
    SetByteVocab(&c);
    c.hidden_size = 1024;
    c.num_hidden_layers = 8;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 8;
    c.head_dim = 128;
    c.intermediate_size = 4096;
    c.model_max_length = 262144;
    c.kv_lora_rank = 256;
    c.qk_nope_head_dim = 128;
    c.qk_rope_head_dim = 64;
    c.v_head_dim = 128;
    c.linear_attn_config.num_heads = 8;
    c.linear_attn_config.head_dim = 128;
    c.num_experts = 16;
    c.num_experts_per_token = 4;
    c.num_shared_experts = 1;
    c.moe_intermediate_size = 512;
  } else if (name == "kimi-linear-48b") {
    c.vocab_size = 163840;
    c.bos_token_id = 163584;
    c.eos_token_id = 163586;
    c.pad_token_id = 163839;
    c.hidden_size = 2304;
    c.num_hidden_layers = 27;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 32;
    c.head_dim = 72;
    c.intermediate_size = 9216;
    c.model_max_length = 1048576;
    c.kv_lora_rank = 512;
    c.qk_nope_head_dim = 128;
    c.qk_rope_head_dim = 64;
    c.v_head_dim = 128;
    c.linear_attn_config.num_heads = 32;
    c.linear_attn_config.head_dim = 128;
    c.num_experts = 256;
    c.num_experts_per_token = 8;
    c.num_shared_experts = 1;
    c.moe_intermediate_size = 1024;
  } else {
    return absl::NotFoundError(absl::StrCat("unknown preset '", std::string(name),
                                            "' (known: ", absl::StrJoin(PresetNames(), ", "), ")"));
  }
  SetHybridLayers(&c);
  // Validate through the same parser every loaded model goes through.
  return ParseModelConfig(ModelConfigToJson(c));
}

absl::Status MakeModel(const ModelConfig& config, const MakeModelOptions& options) {
  if (options.out_dir.empty()) return absl::InvalidArgumentError("make-model: --out is empty");
  if (!(options.residual_scale > 0) || !std::isfinite(options.residual_scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("make-model: residual_scale ", options.residual_scale, " is not > 0"));
  }
  const int64_t num_ranks = kByteVocab;
  if (num_ranks + kSpecialSlots > config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size ", config.vocab_size,
                                                   " is smaller than the byte-level tokenizer (",
                                                   num_ranks + kSpecialSlots, " ids)"));
  }
  std::error_code ec;
  std::filesystem::create_directories(options.out_dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot create ", options.out_dir, ": ", ec.message()));
  }
  const std::string dir = options.out_dir + "/";
  KLS_RETURN_IF_ERROR(WriteStringToFile(dir + "config.json", ModelConfigToJson(config)));
  KLS_RETURN_IF_ERROR(WriteStringToFile(dir + "tiktoken.model", MakeByteLevelTiktokenModel()));
  KLS_RETURN_IF_ERROR(
      WriteStringToFile(dir + "tokenizer_config.json", MakeKimiTokenizerConfigJson(num_ranks)));
  if (!options.with_weights) return absl::OkStatus();

  ModelWeights shapes;
  shapes.config = config;
  std::vector<WeightBinding> bindings = BindWeights(&shapes);
  // The encoded weights are held in memory until written; refuse sizes this machine class
  // cannot hold rather than abort half way.
  int64_t total_bytes = 0;
  for (const WeightBinding& b : bindings) {
    int64_t n = b.keep_fp32 ? 4 : static_cast<int64_t>(DTypeSize(options.dtype));
    for (int64_t d : b.shape) n *= d;
    total_bytes += n;
  }
  if (total_bytes > kMaxWeightBytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "make-model: the weights would take ", total_bytes >> 30, " GiB; at most ",
        kMaxWeightBytes >> 30, " GiB are written (use --config-only for large presets)"));
  }
  // Encode every tensor, then split into shards of at most max_shard_bytes (a tensor never
  // straddles shards).
  std::vector<std::string> blobs;
  blobs.reserve(bindings.size());
  std::vector<std::vector<size_t>> shards(1);
  int64_t shard_bytes = 0;
  for (size_t i = 0; i < bindings.size(); ++i) {
    const DType dtype = bindings[i].keep_fp32 ? DType::kF32 : options.dtype;
    blobs.push_back(
        EncodeAs(RandomTensor(bindings[i], options.seed, options.residual_scale), dtype));
    const int64_t size = static_cast<int64_t>(blobs.back().size());
    if (options.max_shard_bytes > 0 && shard_bytes > 0 &&
        shard_bytes + size > options.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(i);
    shard_bytes += size;
  }
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  auto write_shard = [&](const std::string& path, const std::vector<size_t>& members) {
    std::vector<TensorToWrite> tensors;
    for (size_t i : members) {
      const DType dtype = bindings[i].keep_fp32 ? DType::kF32 : options.dtype;
      tensors.push_back({bindings[i].name, dtype, bindings[i].shape, blobs[i]});
    }
    return WriteSafetensors(path, tensors, metadata);
  };
  if (shards.size() == 1) return write_shard(dir + "model.safetensors", shards[0]);

  nlohmann::json index;
  index["metadata"] = nlohmann::json::object();
  index["weight_map"] = nlohmann::json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file =
        absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards.size());
    KLS_RETURN_IF_ERROR(write_shard(dir + file, shards[s]));
    for (size_t i : shards[s]) index["weight_map"][bindings[i].name] = file;
  }
  return WriteStringToFile(dir + "model.safetensors.index.json", index.dump(2) + "\n");
}

}  // namespace kls::engine

// Loading checkpoints: foreign layouts (other tools' dtypes, shard splits, tensor order, extra
// tensors, A_log [1, 1, H, 1]), missing pieces, and make-model's determinism.
#include "engine/model/weights.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "engine/backend/cpu/cpu_backend.h"
#include "engine/model/make_model.h"
#include "engine/model/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/engine/tiny_model.h"

namespace kls::engine {
namespace {

using ::kls::testing::WriteModel;

std::string Encode(const std::vector<float>& v, DType dtype) {
  std::string out(v.size() * DTypeSize(dtype), '\0');
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::kF32) {
      std::memcpy(&out[4 * i], &v[i], 4);
    } else {
      const uint16_t h = dtype == DType::kBF16 ? FloatToBf16(v[i]) : FloatToHalf(v[i]);
      std::memcpy(&out[2 * i], &h, 2);
    }
  }
  return out;
}

float RoundTrip(float x, DType dtype) {
  if (dtype == DType::kBF16) return Bf16ToFloat(FloatToBf16(x));
  if (dtype == DType::kF16) return HalfToFloat(FloatToHalf(x));
  return x;
}

DType ForeignDType(const WeightBinding& b, size_t i) {
  if (b.keep_fp32) return DType::kF32;  // A_log, dt_bias, the router bias: fp32 as released
  return i % 3 == 0 ? DType::kF16 : (i % 3 == 1 ? DType::kBF16 : DType::kF32);
}

// Rewrites a checkpoint the way another tool might: reversed tensor order, three shards with an
// index carrying metadata, mixed dtypes, an extra unused tensor. Every value must load as the
// dtype-rounded original.
TEST(WeightsTest, LoadsCheckpointsWrittenInOtherLayouts) {
  const std::string src = WriteModel("tiny", 11);
  absl::StatusOr<std::unique_ptr<ModelWeights>> original = LoadModelWeights(src);
  ASSERT_TRUE(original.ok()) << original.status();
  std::vector<WeightBinding> bindings = BindWeights(original->get());

  const std::string dst = kls::testing::ScratchDir() + "/foreign";
  std::filesystem::create_directories(dst);
  for (const char* f : {"config.json", "tiktoken.model", "tokenizer_config.json"}) {
    std::filesystem::copy_file(src + "/" + f, dst + "/" + f);
  }
  std::vector<std::string> blobs(bindings.size());
  std::vector<std::vector<TensorToWrite>> shards(3);
  nlohmann::json index = {{"metadata", {{"total_size", 0}}},
                          {"weight_map", nlohmann::json::object()}};
  for (size_t r = 0; r < bindings.size(); ++r) {
    const size_t i = bindings.size() - 1 - r;
    const WeightBinding& b = bindings[i];
    blobs[i] = Encode(*b.dest, ForeignDType(b, i));
    const size_t shard = r * 3 / bindings.size();
    shards[shard].push_back({b.name, ForeignDType(b, i), b.shape, blobs[i]});
    index["weight_map"][b.name] = "part-" + std::to_string(shard) + ".safetensors";
  }
  const std::vector<float> extra(64, 0.5f);
  const std::string extra_bytes = Encode(extra, DType::kF32);
  shards[0].push_back(
      {"model.layers.3.self_attn.rotary_emb.inv_freq", DType::kF32, {64}, extra_bytes});
  index["weight_map"]["model.layers.3.self_attn.rotary_emb.inv_freq"] = "part-0.safetensors";
  for (int s = 0; s < 3; ++s) {
    ASSERT_TRUE(WriteSafetensors(dst + "/part-" + std::to_string(s) + ".safetensors", shards[s],
                                 {{"format", "pt"}})
                    .ok());
  }
  ASSERT_TRUE(WriteStringToFile(dst + "/model.safetensors.index.json", index.dump()).ok());

  absl::StatusOr<std::unique_ptr<ModelWeights>> loaded = LoadModelWeights(dst);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  std::vector<WeightBinding> got = BindWeights(loaded->get());
  ASSERT_EQ(got.size(), bindings.size());
  for (size_t i = 0; i < bindings.size(); ++i) {
    ASSERT_EQ(got[i].name, bindings[i].name);
    ASSERT_EQ(got[i].dest->size(), bindings[i].dest->size()) << got[i].name;
    const DType dtype = ForeignDType(bindings[i], i);
    for (size_t j = 0; j < got[i].dest->size(); ++j) {
      ASSERT_EQ((*got[i].dest)[j], RoundTrip((*bindings[i].dest)[j], dtype))
          << got[i].name << "[" << j << "] stored as " << DTypeName(dtype);
    }
  }
  // A_log is [1, 1, H, 1] in the file and [H] in memory.
  EXPECT_EQ((*loaded)->layers[0].kda.a_log.size(),
            static_cast<size_t>((*loaded)->config.linear_attn_config.num_heads));

  // And the model runs on it.
  auto backend = CpuBackend::Create(std::shared_ptr<const ModelWeights>(*std::move(loaded)));
  ASSERT_TRUE(backend.ok());
  absl::StatusOr<std::unique_ptr<BackendState>> state = (*backend)->NewState();
  ASSERT_TRUE(state.ok()) << state.status();
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5};
  SequenceInput input{tokens, state->get()};
  std::vector<float> logits((*backend)->config().vocab_size);
  ASSERT_TRUE((*backend)->Forward({&input, 1}, logits).ok());
  EXPECT_TRUE(kls::testing::AllFinite(logits));
}

TEST(WeightsTest, MissingOrMisshapenTensorIsNamed) {
  const std::string dir = WriteModel("tiny", 12);
  absl::StatusOr<std::unique_ptr<ModelWeights>> original = LoadModelWeights(dir);
  ASSERT_TRUE(original.ok());
  std::vector<WeightBinding> bindings = BindWeights(original->get());

  // Drop one tensor.
  std::vector<std::string> blobs;
  std::vector<TensorToWrite> tensors;
  blobs.reserve(bindings.size());
  for (const WeightBinding& b : bindings) {
    blobs.push_back(Encode(*b.dest, DType::kF32));
    if (b.name == "model.layers.3.self_attn.kv_b_proj.weight") continue;
    tensors.push_back({b.name, DType::kF32, b.shape, blobs.back()});
  }
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
  absl::StatusOr<std::unique_ptr<ModelWeights>> r = LoadModelWeights(dir);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.layers.3.self_attn.kv_b_proj.weight"),
            std::string_view::npos)
      << r.status();

  // A tensor with the wrong shape (transposed f_a_proj, [64, 256]).
  tensors.clear();
  for (size_t i = 0; i < bindings.size(); ++i) {
    std::vector<int64_t> shape = bindings[i].shape;
    if (bindings[i].name == "model.layers.1.self_attn.f_a_proj.weight")
      std::swap(shape[0], shape[1]);
    tensors.push_back({bindings[i].name, DType::kF32, shape, blobs[i]});
  }
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
  r = LoadModelWeights(dir);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.layers.1.self_attn.f_a_proj.weight"),
            std::string_view::npos)
      << r.status();
}

TEST(WeightsTest, MissingFilesAndBadConfigAreClearErrors) {
  const std::string dir = WriteModel("tiny", 13);
  // Tokenizer file missing.
  std::filesystem::remove(dir + "/tiktoken.model");
  absl::StatusOr<LoadedModel> m = LoadModel(dir);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("tiktoken.model"), std::string_view::npos) << m.status();

  // Unsupported model_type.
  absl::StatusOr<std::string> text = ReadFileToString(dir + "/config.json");
  ASSERT_TRUE(text.ok());
  nlohmann::json config = nlohmann::json::parse(*text);
  config["model_type"] = "deepseek_v3";
  ASSERT_TRUE(WriteStringToFile(dir + "/config.json", config.dump()).ok());
  absl::StatusOr<std::unique_ptr<ModelWeights>> w = LoadModelWeights(dir);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("deepseek_v3"), std::string_view::npos) << w.status();

  // Weights missing altogether.
  const std::string empty = kls::testing::ScratchDir();
  std::filesystem::copy_file(dir + "/tokenizer_config.json", empty + "/tokenizer_config.json");
  config["model_type"] = "kimi_linear";
  ASSERT_TRUE(WriteStringToFile(empty + "/config.json", config.dump()).ok());
  w = LoadModelWeights(empty);
  ASSERT_FALSE(w.ok());
  EXPECT_TRUE(absl::IsNotFound(w.status())) << w.status();
}

// Independent of BindWeights' own code: the §7 table of the released checkpoint, typed in.
TEST(WeightsTest, BindingsUseTheReleasedNamesAndShapes) {
  ModelWeights w;
  w.config = *PresetConfig("kimi-linear-48b");
  std::map<std::string, std::vector<int64_t>> got;
  for (const WeightBinding& b : BindWeights(&w)) got[b.name] = b.shape;
  const std::map<std::string, std::vector<int64_t>> expected = {
      {"model.embed_tokens.weight", {163840, 2304}},
      {"model.norm.weight", {2304}},
      {"lm_head.weight", {163840, 2304}},
      {"model.layers.0.input_layernorm.weight", {2304}},
      {"model.layers.0.post_attention_layernorm.weight", {2304}},
      {"model.layers.0.self_attn.q_proj.weight", {4096, 2304}},
      {"model.layers.0.self_attn.k_proj.weight", {4096, 2304}},
      {"model.layers.0.self_attn.v_proj.weight", {4096, 2304}},
      {"model.layers.0.self_attn.q_conv1d.weight", {4096, 1, 4}},
      {"model.layers.0.self_attn.k_conv1d.weight", {4096, 1, 4}},
      {"model.layers.0.self_attn.v_conv1d.weight", {4096, 1, 4}},
      {"model.layers.0.self_attn.f_a_proj.weight", {128, 2304}},
      {"model.layers.0.self_attn.f_b_proj.weight", {4096, 128}},
      {"model.layers.0.self_attn.dt_bias", {4096}},
      {"model.layers.0.self_attn.A_log", {1, 1, 32, 1}},
      {"model.layers.0.self_attn.b_proj.weight", {32, 2304}},
      {"model.layers.0.self_attn.g_a_proj.weight", {128, 2304}},
      {"model.layers.0.self_attn.g_b_proj.weight", {4096, 128}},
      {"model.layers.0.self_attn.o_norm.weight", {128}},
      {"model.layers.0.self_attn.o_proj.weight", {2304, 4096}},
      {"model.layers.0.mlp.gate_proj.weight", {9216, 2304}},
      {"model.layers.0.mlp.up_proj.weight", {9216, 2304}},
      {"model.layers.0.mlp.down_proj.weight", {2304, 9216}},
      {"model.layers.3.self_attn.q_proj.weight", {6144, 2304}},
      {"model.layers.3.self_attn.kv_a_proj_with_mqa.weight", {576, 2304}},
      {"model.layers.3.self_attn.kv_a_layernorm.weight", {512}},
      {"model.layers.3.self_attn.kv_b_proj.weight", {8192, 512}},
      {"model.layers.3.self_attn.o_proj.weight", {2304, 4096}},
      {"model.layers.26.self_attn.kv_b_proj.weight", {8192, 512}},
      {"model.layers.26.block_sparse_moe.gate.weight", {256, 2304}},
      {"model.layers.26.block_sparse_moe.gate.e_score_correction_bias", {256}},
      {"model.layers.26.block_sparse_moe.experts.0.w1.weight", {1024, 2304}},
      {"model.layers.26.block_sparse_moe.experts.255.w3.weight", {1024, 2304}},
      {"model.layers.26.block_sparse_moe.experts.17.w2.weight", {2304, 1024}},
      {"model.layers.26.block_sparse_moe.shared_experts.gate_proj.weight", {1024, 2304}},
      {"model.layers.26.block_sparse_moe.shared_experts.up_proj.weight", {1024, 2304}},
      {"model.layers.26.block_sparse_moe.shared_experts.down_proj.weight", {2304, 1024}},
  };
  for (const auto& [name, shape] : expected) {
    ASSERT_TRUE(got.count(name)) << "no binding for " << name;
    EXPECT_EQ(got[name], shape) << name;
  }
  // Layer typing of the released model: MLA (no KDA tensors) at 3, 7, …, 26; MoE from layer 1.
  EXPECT_FALSE(got.count("model.layers.3.self_attn.A_log"));
  EXPECT_FALSE(got.count("model.layers.26.self_attn.q_conv1d.weight"));
  EXPECT_TRUE(got.count("model.layers.25.self_attn.A_log"));
  EXPECT_FALSE(got.count("model.layers.1.mlp.gate_proj.weight"));
  EXPECT_FALSE(got.count("model.layers.0.block_sparse_moe.gate.weight"));
  // Count: embed, norm, lm_head + per layer 2 norms + mixer + FFN tensors.
  const size_t per_kda = 15, per_mla = 5, dense = 3, moe = 2 + 256 * 3 + 3;
  EXPECT_EQ(got.size(), 3 + 27 * 2 + 20 * per_kda + 7 * per_mla + dense + 26 * moe);
}

TEST(MakeModelTest, LargePresetsAreRefusedWithoutConfigOnly) {
  const std::string dir = kls::testing::ScratchDir() + "/big";
  MakeModelOptions options;
  options.out_dir = dir;
  absl::Status s = MakeModel(*PresetConfig("kimi-linear-48b"), options);
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  options.with_weights = false;
  ASSERT_TRUE(MakeModel(*PresetConfig("kimi-linear-48b"), options).ok());
  absl::StatusOr<ModelConfig> back = LoadModelConfig(dir);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->vocab_size, 163840);
  EXPECT_FALSE(FileExists(dir + "/model.safetensors"));
}

TEST(MakeModelTest, SameSeedSameBytesOtherSeedOtherWeights) {
  const std::string a = WriteModel("tiny", 5, DType::kBF16);
  const std::string b = WriteModel("tiny", 5, DType::kBF16);
  const std::string c = WriteModel("tiny", 6, DType::kBF16);
  auto read = [](const std::string& dir) {
    absl::StatusOr<std::string> s = ReadFileToString(dir + "/model.safetensors");
    EXPECT_TRUE(s.ok());
    return s.ok() ? *s : std::string();
  };
  EXPECT_EQ(read(a), read(b));
  EXPECT_NE(read(a), read(c));
}

// residual_scale multiplies exactly the residual branches' last projections (o_proj of both
// mixers, the dense, shared and routed down projections) and leaves every other tensor alone.
TEST(MakeModelTest, ResidualScaleScalesOnlyTheResidualOutputs) {
  const std::string plain_dir = WriteModel("tiny", 5, DType::kF32, /*max_shard_bytes=*/0, 1.0);
  const std::string scaled_dir = WriteModel("tiny", 5, DType::kF32, /*max_shard_bytes=*/0, 0.25);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> plain =
      SafetensorsFile::Open(plain_dir + "/model.safetensors");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> scaled =
      SafetensorsFile::Open(scaled_dir + "/model.safetensors");
  ASSERT_TRUE(plain.ok()) << plain.status();
  ASSERT_TRUE(scaled.ok()) << scaled.status();
  ASSERT_EQ((*plain)->tensors().size(), (*scaled)->tensors().size());
  int residual_outputs = 0;
  for (const TensorView& p : (*plain)->tensors()) {
    const TensorView* s = (*scaled)->Find(p.name);
    ASSERT_NE(s, nullptr) << p.name;
    ASSERT_EQ(s->num_bytes, p.num_bytes) << p.name;
    const bool residual = p.name.ends_with("o_proj.weight") ||
                          p.name.ends_with("down_proj.weight") || p.name.ends_with("w2.weight");
    residual_outputs += residual ? 1 : 0;
    if (!residual) {
      EXPECT_EQ(std::memcmp(s->data, p.data, p.num_bytes), 0) << p.name << " changed";
      continue;
    }
    ASSERT_EQ(p.dtype, DType::kF32);
    for (int64_t i = 0; i < p.num_elements(); ++i) {
      float a, b;
      std::memcpy(&a, p.data + 4 * i, 4);
      std::memcpy(&b, s->data + 4 * i, 4);
      // A power-of-two scale is exact in every rounding step, so equal to the bit.
      ASSERT_EQ(b, 0.25f * a) << p.name << "[" << i << "]";
    }
  }
  // Per layer: o_proj, then the dense down projection or the shared one and one per expert.
  const ModelConfig config = *PresetConfig("tiny");
  int expected = 0;
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    const bool moe = l >= config.first_k_dense_replace && l % config.moe_layer_freq == 0;
    expected += 1 + (moe ? 1 + config.num_experts : 1);
  }
  EXPECT_EQ(residual_outputs, expected);

  MakeModelOptions options;
  options.out_dir = kls::testing::ScratchDir() + "/bad";
  for (double bad : {0.0, -1.0, std::nan("")}) {
    options.residual_scale = bad;
    const absl::Status s = MakeModel(*PresetConfig("tiny"), options);
    EXPECT_TRUE(absl::IsInvalidArgument(s) && absl::StrContains(s.message(), "residual_scale"))
        << s;
  }
}

TEST(MakeModelTest, ShardedOutputLoadsLikeSingleFile) {
  const std::string single = WriteModel("tiny", 21, DType::kBF16);
  const std::string sharded = WriteModel("tiny", 21, DType::kBF16, /*max_shard_bytes=*/1 << 20);
  EXPECT_TRUE(FileExists(sharded + "/model.safetensors.index.json"));
  EXPECT_FALSE(FileExists(sharded + "/model.safetensors"));
  absl::StatusOr<std::unique_ptr<ModelWeights>> x = LoadModelWeights(single);
  absl::StatusOr<std::unique_ptr<ModelWeights>> y = LoadModelWeights(sharded);
  ASSERT_TRUE(x.ok() && y.ok());
  EXPECT_EQ((*x)->lm_head, (*y)->lm_head);
  EXPECT_EQ((*x)->layers[5].moe.experts[3].down, (*y)->layers[5].moe.experts[3].down);
  EXPECT_EQ((*x)->fingerprint, (*y)->fingerprint);
}

TEST(MakeModelTest, PresetsAreValidAndTinyHasTheIssueShape) {
  for (const std::string& name : PresetNames()) {
    absl::StatusOr<ModelConfig> c = PresetConfig(name);
    ASSERT_TRUE(c.ok()) << name << ": " << c.status();
  }
  ModelConfig tiny = *PresetConfig("tiny");
  EXPECT_EQ(tiny.hidden_size, 256);
  EXPECT_EQ(tiny.num_kda_layers(), 6);
  EXPECT_EQ(tiny.num_mla_layers(), 2);
  EXPECT_EQ(tiny.layer_kind(3), LayerKind::kMla);
  EXPECT_EQ(tiny.layer_kind(7), LayerKind::kMla);
  EXPECT_EQ(tiny.ffn_kind(0), FfnKind::kDense);
  EXPECT_EQ(tiny.ffn_kind(1), FfnKind::kMoe);
  ModelConfig big = *PresetConfig("kimi-linear-48b");
  EXPECT_EQ(big.num_kda_layers(), 20);
  EXPECT_EQ(big.num_mla_layers(), 7);
  EXPECT_EQ(big.linear_attn_config.full_attn_layers, (std::vector<int>{4, 8, 12, 16, 20, 24, 27}));
  EXPECT_TRUE(absl::IsNotFound(PresetConfig("gpt2").status()));
}

}  // namespace
}  // namespace kls::engine

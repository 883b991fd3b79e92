#include "engine/model/fingerprint.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model/config.h"
#include "engine/model/safetensors.h"
#include "tests/test_util.h"

namespace kls::engine {
namespace {

// A two-layer Kimi Linear config (KDA then MLA, dense then MoE).
constexpr std::string_view kTinyConfig = R"json({
  "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear",
  "torch_dtype": "bfloat16", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
  "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32,
  "hidden_act": "silu", "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "model_max_length": 4096,
  "tie_word_embeddings": false, "bos_token_id": 60, "eos_token_id": 61, "pad_token_id": 63,
  "q_lora_rank": null, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
  "v_head_dim": 8, "mla_use_nope": true,
  "linear_attn_config": {"num_heads": 2, "head_dim": 8, "short_conv_kernel_size": 4,
                         "kda_layers": [1], "full_attn_layers": [2]},
  "num_experts": 4, "num_experts_per_token": 2, "num_shared_experts": 1,
  "moe_intermediate_size": 8, "moe_router_activation_func": "sigmoid", "moe_renormalize": true,
  "routed_scaling_factor": 2.446, "use_grouped_topk": true, "num_expert_group": 1,
  "topk_group": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
  "num_nextn_predict_layers": 0
})json";

template <typename T>
std::string_view Bytes(const std::vector<T>& v) {
  return std::string_view(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

class FingerprintTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = kls::testing::MakeTempDir();
    absl::StatusOr<ModelConfig> c = ParseModelConfig(kTinyConfig);
    ASSERT_TRUE(c.ok()) << c.status();
    config_ = *c;
    for (int i = 0; i < 16; ++i) norm_.push_back(FloatToBf16(1.0f + 0.01f * i));
    a_log_ = {0.5f, -0.25f};
    // 128 KiB: above the content-hash limit, so only its name, dtype and shape count.
    embed_.assign(64 * 1024, 0);
    for (size_t i = 0; i < embed_.size(); ++i) embed_[i] = static_cast<uint16_t>(i * 2654435761u);
  }
  void TearDown() override { kls::testing::RemoveTree(dir_); }

  // Writes the checkpoint into `sub` (a fresh sub-directory) and returns its fingerprint.
  kls::Hash128 Fingerprint(const std::string& sub, std::vector<int64_t> a_log_shape = {1, 1, 2, 1},
                           DType norm_dtype = DType::kBF16) {
    const std::string dir = absl::StrCat(dir_, "/", sub);
    std::filesystem::create_directories(dir);
    const std::vector<TensorToWrite> tensors = {
        {"model.embed_tokens.weight", DType::kBF16, {4096, 16}, Bytes(embed_)},
        {"model.layers.0.input_layernorm.weight", norm_dtype, {16}, Bytes(norm_)},
        {"model.layers.0.self_attn.A_log", DType::kF32, a_log_shape, Bytes(a_log_)},
    };
    EXPECT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
    absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
    EXPECT_TRUE(ckpt.ok()) << ckpt.status();
    if (!ckpt.ok()) return {};
    return ComputeModelFingerprint(config_, **ckpt);
  }

  std::string dir_;
  ModelConfig config_;
  std::vector<uint16_t> norm_;
  std::vector<float> a_log_;
  std::vector<uint16_t> embed_;
};

TEST_F(FingerprintTest, SameCheckpointSameHash) {
  const kls::Hash128 first = Fingerprint("a");
  EXPECT_EQ(first, Fingerprint("a"));
  EXPECT_EQ(first, Fingerprint("b")) << "the directory must not matter";
  // The recipe is fixed (XXH3 is specified bit for bit), so the value is the same on every
  // machine; a deliberate recipe change updates this constant and the format tag.
  EXPECT_EQ(first.ToHex(), "fc5c1403abed7a01487ceebe3517ca5c");
}

TEST_F(FingerprintTest, SmallTensorByteChangesHash) {
  const kls::Hash128 base = Fingerprint("base");
  norm_[7] ^= 0x0001;
  EXPECT_NE(Fingerprint("changed"), base);
}

TEST_F(FingerprintTest, LargeTensorContentIsNotHashed) {
  const kls::Hash128 base = Fingerprint("base");
  embed_[12345] ^= 0x0100;
  EXPECT_EQ(Fingerprint("changed"), base);
}

TEST_F(FingerprintTest, ShapeChangesHash) {
  const kls::Hash128 base = Fingerprint("base");
  EXPECT_NE(Fingerprint("shape", {2}), base);  // same bytes, different shape
}

TEST_F(FingerprintTest, DtypeChangesHash) {
  const kls::Hash128 base = Fingerprint("base");
  EXPECT_NE(Fingerprint("dtype", {1, 1, 2, 1}, DType::kF16), base);  // same bytes, F16
}

TEST_F(FingerprintTest, ConfigValueChangesHash) {
  const kls::Hash128 base = Fingerprint("base");
  config_.rms_norm_eps = 1e-6;
  EXPECT_NE(Fingerprint("eps"), base);
  config_.rms_norm_eps = 1e-5;
  EXPECT_EQ(Fingerprint("eps_back"), base);
  config_.linear_attn_config.kda_layers = {2};
  config_.linear_attn_config.full_attn_layers = {1};
  EXPECT_NE(Fingerprint("layers"), base);
}

}  // namespace
}  // namespace kls::engine

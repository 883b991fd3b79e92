// Model weights in host fp32, bound by the released Hugging Face tensor names (KIMI_LINEAR.md §7).
#ifndef KLS_ENGINE_MODEL_WEIGHTS_H_
#define KLS_ENGINE_MODEL_WEIGHTS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/hash.h"
#include "engine/model/config.h"
#include "engine/model/safetensors.h"

namespace kls::engine {

// Shapes below use the config's names: D hidden, H KDA heads, K KDA head dim, W conv width,
// NH MLA heads, Dn/Dr/Dv/Dc MLA dims, I dense width, E experts, Im expert width, S shared experts.
// Linear weights are [out, in] row-major (PyTorch nn.Linear).
struct KdaLayerWeights {
  std::vector<float> q_proj, k_proj, v_proj;  // [H*K, D]
  std::vector<float> q_conv, k_conv,
      v_conv;                   // [H*K, W] (checkpoint [H*K, 1, W]); tap W-1 = current
  std::vector<float> f_a_proj;  // [K, D]
  std::vector<float> f_b_proj;  // [H*K, K]
  std::vector<float> dt_bias;   // [H*K]
  std::vector<float> a_log;     // [H] (checkpoint [1, 1, H, 1])
  std::vector<float> b_proj;    // [H, D]
  std::vector<float> g_a_proj;  // [K, D]
  std::vector<float> g_b_proj;  // [H*K, K]
  std::vector<float> o_norm;    // [K], shared by all heads
  std::vector<float> o_proj;    // [D, H*K]
};

struct MlaLayerWeights {
  std::vector<float> q_proj;          // [NH*(Dn+Dr), D]
  std::vector<float> kv_a_proj;       // [Dc+Dr, D]  (kv_a_proj_with_mqa)
  std::vector<float> kv_a_layernorm;  // [Dc]
  std::vector<float> kv_b_proj;       // [NH*(Dn+Dv), Dc], per head Dn k_nope rows then Dv v rows
  std::vector<float> o_proj;          // [D, NH*Dv]
};

struct SwiGluWeights {
  std::vector<float> gate;  // [width, D]
  std::vector<float> up;    // [width, D]
  std::vector<float> down;  // [D, width]
};

struct MoeWeights {
  std::vector<float> router;           // [E, D]  (gate.weight)
  std::vector<float> correction_bias;  // [E]     (gate.e_score_correction_bias)
  std::vector<SwiGluWeights> experts;  // E of width Im (w1 = gate, w3 = up, w2 = down)
  SwiGluWeights shared;                // width S*Im
};

struct LayerWeights {
  LayerKind kind = LayerKind::kKda;
  FfnKind ffn = FfnKind::kDense;
  int state_slot = 0;                 // index among layers of the same kind (KDA state / MLA cache)
  std::vector<float> input_norm;      // [D]
  std::vector<float> post_attn_norm;  // [D]
  KdaLayerWeights kda;
  MlaLayerWeights mla;
  SwiGluWeights mlp;  // dense FFN (layers < first_k_dense_replace)
  MoeWeights moe;
};

struct ModelWeights {
  ModelConfig config;
  Hash128 fingerprint;
  std::vector<float> embed;       // [vocab, D]
  std::vector<float> final_norm;  // [D]
  std::vector<float> lm_head;     // [vocab, D]
  std::vector<LayerWeights> layers;
};

// How `kls make-model` initializes a tensor.
enum class WeightInit { kLinear, kNorm, kEmbedding, kConv, kALog, kDtBias, kRouterBias };

// One checkpoint tensor: its released name, its checkpoint shape, how it is initialized and
// where it lives in ModelWeights (`dest` is resized and filled by the loader).
struct WeightBinding {
  std::string name;
  std::vector<int64_t> shape;
  WeightInit init;
  ShapeMatch match = ShapeMatch::kExact;
  bool keep_fp32 = false;  // stored as fp32 in released checkpoints (A_log, dt_bias, router bias)
  std::vector<float>* dest = nullptr;
};

// Every tensor of the model described by weights->config, in checkpoint order, bound to
// `weights` (whose layers are sized and typed by this call; tensors already loaded are kept,
// so binding a loaded model lists its tensors). The one table that both the loader and
// make-model use.
std::vector<WeightBinding> BindWeights(ModelWeights* weights);

// Loads config.json and every tensor of the checkpoint in `model_dir` (single file or sharded),
// converting bf16/fp16/fp32 to fp32. Errors name the file and tensor: INVALID_ARGUMENT for a
// missing tensor, a shape that does not match the config or a malformed file (all checked before
// any allocation); RESOURCE_EXHAUSTED when the fp32 weights would not fit in this machine's
// memory. Extra tensors are ignored (with a log line).
absl::StatusOr<std::unique_ptr<ModelWeights>> LoadModelWeights(const std::string& model_dir);

}  // namespace kls::engine

#endif  // KLS_ENGINE_MODEL_WEIGHTS_H_

// `kls make-model`: Hugging Face-layout checkpoints with seeded random weights, for tests,
// the bundled tiny model and benchmarks of real shapes.
#ifndef KLS_ENGINE_MODEL_MAKE_MODEL_H_
#define KLS_ENGINE_MODEL_MAKE_MODEL_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model/config.h"
#include "engine/model/safetensors.h"

namespace kls::engine {

// Names accepted by PresetConfig, e.g. "tiny", "mid", "kimi-linear-48b".
std::vector<std::string> PresetNames();

// The config of a preset. NOT_FOUND lists the known presets.
//   tiny            hidden 256, 8 layers (6 KDA + 2 MLA, 3:1), 4 KDA heads × 64, 4 MLA heads,
//                   kv_lora 64, 8 experts top-2 + 1 shared, layer 0 dense, byte-level vocabulary
//                   (256 ranks + 256 Kimi special slots = 512)
//   mid             hidden 1024, 8 layers, 8 KDA heads × 128, 8 MLA heads, 16 experts top-4
//   kimi-linear-48b the released Kimi-Linear-48B-A3B config (KIMI_LINEAR.md §1.1)
absl::StatusOr<ModelConfig> PresetConfig(std::string_view name);

struct MakeModelOptions {
  std::string out_dir;
  uint64_t seed = 0;
  DType dtype = DType::kBF16;   // weights; A_log, dt_bias and the router bias stay fp32 as released
  bool with_weights = true;     // false: config and tokenizer only
  int64_t max_shard_bytes = 0;  // > 0: split into model-0000i-of-0000n.safetensors + index
  // Multiplies the init of each residual branch's last projection (attention o_proj, the MLP's
  // and experts' down projections); must be > 0. 1/√(2·layers) is GPT-2's scaled init, under
  // which a layer adds a small update to the residual stream, as in trained models, instead of
  // one as large as the stream. End-to-end comparisons of bf16 and fp32 engines use it, since
  // at 1 the random model amplifies a rounding difference tenfold or more over 8 layers.
  double residual_scale = 1.0;
};

// Writes config.json, model.safetensors (or shards + model.safetensors.index.json),
// tiktoken.model and tokenizer_config.json into options.out_dir (created if missing). The
// weights are a pure function of (config, seed). The tokenizer is byte-level with the Kimi
// special tokens; its size must fit config.vocab_size (INVALID_ARGUMENT otherwise).
// RESOURCE_EXHAUSTED when the weights would exceed 8 GiB (kimi-linear-48b: 98 GiB in bf16), since
// they are built in memory; write such presets with with_weights = false.
absl::Status MakeModel(const ModelConfig& config, const MakeModelOptions& options);

}  // namespace kls::engine

#endif  // KLS_ENGINE_MODEL_MAKE_MODEL_H_

// The model's weights on one GPU, in bf16 (fp32 for A_log, dt_bias and the router bias), packed
// for the CUDA backend's kernels: projections that read the same input are concatenated into one
// GEMM (q‖k‖v, f_a‖g_a, gate‖up) and the experts are stacked ([E, 2·Im, D] and [E, D, Im],
// kernels/moe/moe.h). Three sources: a host ModelWeights (tests, small models), a checkpoint
// directory streamed from the safetensors mmap tensor by tensor (never the whole model in host
// memory), or seeded random values generated on the GPU (benchmarks of any config, including
// the 98 GB real shapes, without a checkpoint file).
#ifndef KLS_ENGINE_BACKEND_CUDA_DEVICE_WEIGHTS_H_
#define KLS_ENGINE_BACKEND_CUDA_DEVICE_WEIGHTS_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/cuda/cuda_util.h"
#include "engine/model/config.h"
#include "engine/model/weights.h"

namespace kls::engine::cuda {

using bf16 = __nv_bfloat16;

// Shapes use weights.h's names (D hidden, H KDA heads, K head dim, W conv width, NH MLA heads,
// Dn/Dr/Dv/Dc, I dense width, E experts, Im expert width, S shared experts). Row-major.
struct KdaDeviceWeights {
  const bf16* qkv_proj = nullptr;  // [3·H·K, D]   q_proj ‖ k_proj ‖ v_proj
  const bf16* conv = nullptr;      // [3·H·K, W]   q_conv ‖ k_conv ‖ v_conv
  const bf16* fa_ga = nullptr;     // [2·K, D]     f_a_proj ‖ g_a_proj
  const bf16* f_b = nullptr;       // [H·K, K]
  const bf16* g_b = nullptr;       // [H·K, K]
  const bf16* b_proj = nullptr;    // [H, D]
  const float* dt_bias = nullptr;  // [H·K]
  const float* a_log = nullptr;    // [H]
  const bf16* o_norm = nullptr;    // [K]
  const bf16* o_proj = nullptr;    // [D, H·K]
};

struct MlaDeviceWeights {
  const bf16* q_proj = nullptr;     // [NH·(Dn+Dr), D]
  const bf16* kv_a = nullptr;       // [Dc+Dr, D]
  const bf16* kv_a_norm = nullptr;  // [Dc]
  const bf16* kv_b = nullptr;       // [NH·(Dn+Dv), Dc]
  const bf16* o_proj = nullptr;     // [D, NH·Dv]
};

struct SwiGluDeviceWeights {
  const bf16* gate_up = nullptr;  // [2·width, D]  gate ‖ up
  const bf16* down = nullptr;     // [D, width]
  int width = 0;
};

struct MoeDeviceWeights {
  const bf16* router = nullptr;     // [E, D]
  const float* bias = nullptr;      // [E] e_score_correction_bias
  const bf16* w_gate_up = nullptr;  // [E, 2·Im, D]  per expert w1 ‖ w3
  const bf16* w_down = nullptr;     // [E, D, Im]
  SwiGluDeviceWeights shared;       // width S·Im
};

struct LayerDeviceWeights {
  LayerKind kind = LayerKind::kKda;
  FfnKind ffn = FfnKind::kDense;
  int state_slot = 0;                    // index among layers of its kind
  const bf16* input_norm = nullptr;      // [D]
  const bf16* post_attn_norm = nullptr;  // [D]
  KdaDeviceWeights kda;
  MlaDeviceWeights mla;
  SwiGluDeviceWeights mlp;  // dense layers
  MoeDeviceWeights moe;     // MoE layers
};

// Reports progress of a checkpoint upload: bytes done, bytes in all.
using UploadProgress = std::function<void(int64_t done, int64_t total)>;

class DeviceWeights {
 public:
  // Uploads host weights (converted to bf16). RESOURCE_EXHAUSTED when they do not fit.
  static absl::StatusOr<DeviceWeights> FromHost(const ModelWeights& weights, cudaStream_t stream);
  // Streams the checkpoint in `model_dir` (config.json + safetensors) to the GPU, converting
  // each tensor to bf16 through a pinned staging buffer. Errors as LoadModelWeights (missing or
  // misshapen tensors are named, all checked before the upload starts); RESOURCE_EXHAUSTED when
  // the weights do not fit the device.
  static absl::StatusOr<DeviceWeights> FromCheckpoint(const std::string& model_dir,
                                                      cudaStream_t stream,
                                                      const UploadProgress& progress);
  // Seeded random weights with `make-model`'s distributions, generated on the GPU.
  static absl::StatusOr<DeviceWeights> Random(const ModelConfig& config, uint64_t seed,
                                              cudaStream_t stream);

  const ModelConfig& config() const { return config_; }
  const Hash128& fingerprint() const { return fingerprint_; }
  const bf16* embed() const { return embed_; }            // [V, D]
  const bf16* final_norm() const { return final_norm_; }  // [D]
  const bf16* lm_head() const { return lm_head_; }        // [V, D]
  const std::vector<LayerDeviceWeights>& layers() const { return layers_; }
  int64_t bytes() const { return static_cast<int64_t>(arena_.bytes()); }

 private:
  struct Placement;
  class Builder;

  ModelConfig config_;
  Hash128 fingerprint_;
  DeviceMemory arena_;
  const bf16* embed_ = nullptr;
  const bf16* final_norm_ = nullptr;
  const bf16* lm_head_ = nullptr;
  std::vector<LayerDeviceWeights> layers_;
};

}  // namespace kls::engine::cuda

#endif  // KLS_ENGINE_BACKEND_CUDA_DEVICE_WEIGHTS_H_

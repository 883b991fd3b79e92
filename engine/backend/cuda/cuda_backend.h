// The CUDA backend: the whole Kimi Linear forward pass on one GPU in bf16 (fp32 accumulation,
// fp32 KDA state), with session state resident on the device:
//   - KDA recurrent state [layers][slots][H, K, V] fp32 and conv windows [layers][slots][3, W−1,
//     H·K] bf16, one slot per session (plus one per in-flight turn's checkpoint);
//   - the MLA latent cache in pages [layers][pages][page_size, Dc + Dr] bf16, shared by forks
//     and copied on write (state_memory.h).
// The residual stream between layers is fp32. A step mixes decode tokens (absorbed MLA over the
// paged cache, recurrent KDA) and prefill chunks (non-absorbed MLA over the decompressed context,
// chunked KDA). Decode-only steps are captured as CUDA graphs, one per batch size, and replayed.
//
// Errors: INVALID_ARGUMENT for bad input (nothing changed); RESOURCE_EXHAUSTED when slots, pages
// or scratch memory run out (nothing changed); INTERNAL for a CUDA failure — a sticky one
// (illegal address, …) also makes healthy() fail for good, and the worker stops serving.
// Not thread-safe: one engine thread owns the backend and every state it made.
#ifndef KLS_ENGINE_BACKEND_CUDA_CUDA_BACKEND_H_
#define KLS_ENGINE_BACKEND_CUDA_CUDA_BACKEND_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/backend/cuda/device_weights.h"
#include "kernels/moe/moe_ref.h"

namespace kls::engine {

struct CudaBackendOptions {
  int device = 0;
  // Device memory for session state (KDA slots + MLA pages). 0: what is free after the weights
  // and the step workspaces, less `reserve_bytes`.
  int64_t state_memory_bytes = 0;
  int64_t reserve_bytes = int64_t{1} << 30;
  int32_t max_sessions = 64;   // sessions held at once (sizes the KDA slots)
  int page_size = 64;          // tokens per MLA cache page
  int max_step_tokens = 8192;  // tokens one Forward may carry (prefill chunk budget)
  int max_step_seqs = 256;     // sequences one Forward may carry
  bool cuda_graphs = true;     // capture decode-only steps
  // Steps of at most this many token rows run their projections through kernels/gemm's skinny
  // GEMM, which fuses the projections that read the same input buffer into one launch, instead of
  // one cuBLASLt GEMM each; 0 never does. At most kernels::kSkinnyGemmMaxRows. 8: on an H200 with
  // the 48B shapes it cut TPOT by 10% at batch 1 and 7% at batch 8, and cost 1.5% at batch 16.
  int skinny_gemm_max_rows = 8;
  // Launch those skinny GEMMs with programmatic dependent launch: each may start during the
  // previous kernel and prefetch its weights (kernels::SkinnyGemmArgs::overlap_previous_kernel).
  bool overlap_projections = false;
  kernels::RouterWeighting router_weighting = kernels::RouterWeighting::kUnbiased;
};

// True when a CUDA device is visible (the default backend then is "cuda").
bool CudaDeviceAvailable();

class CudaBackend final : public Backend {
 public:
  // Takes the uploaded weights (their stream must be done) and sizes the state memory.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(cuda::DeviceWeights weights,
                                                             const CudaBackendOptions& options);
  ~CudaBackend() override;

  absl::StatusOr<std::unique_ptr<BackendState>> NewState() override;
  absl::StatusOr<std::unique_ptr<BackendState>> CloneState(const BackendState& state) override;
  absl::StatusOr<std::unique_ptr<BackendState>> ImportState(const SessionState& host) override;
  absl::Status ExportState(const BackendState& state, int64_t mla_first_row,
                           SessionState* host) override;
  absl::StatusOr<std::unique_ptr<StateCheckpoint>> Checkpoint(const BackendState& state) override;
  absl::Status Rollback(const StateCheckpoint& checkpoint, BackendState* state) override;
  absl::Status Forward(std::span<const SequenceInput> batch, std::span<float> logits) override;
  // Samples on the GPU (kernels/sampling) and copies back only the tokens.
  absl::Status ForwardSample(std::span<const SequenceInput> batch,
                             std::span<const SampleRequest> requests,
                             std::span<int32_t> tokens) override;
  absl::Status healthy() const override;
  const ModelConfig& config() const override;
  std::string_view name() const override { return "cuda"; }

  // Benchmarks only (kls bench): fills every KDA slot, conv window and cache page with seeded
  // random values, so that contexts can be "filled" by ExtendContext instead of a prefill.
  absl::Status FillStateMemoryRandom(uint64_t seed);
  // Benchmarks only: appends `tokens` positions to `state` without computing them (their cache
  // rows are whatever the pages hold). RESOURCE_EXHAUSTED when pages run out.
  absl::Status ExtendContext(BackendState* state, int64_t tokens);
  // Waits for the backend's stream (timing).
  absl::Status Synchronize();
  // Benchmarks only: the number of distinct experts the last MoE layer of the last Forward
  // routed its tokens to (read back from the device; 0 for a model without MoE layers).
  absl::StatusOr<int> LastMoeLayerDistinctExperts();

  // Capacity, for operators and tests.
  int32_t num_slots() const;
  int32_t num_pages() const;
  int32_t free_slots() const;
  int32_t free_pages() const;
  int64_t weight_bytes() const;
  int64_t state_bytes() const;
  int graphs_captured() const;

  struct Impl;

 private:
  // Forward's body: logits to `logits`, or (requests non-empty) tokens sampled on the GPU.
  absl::Status Step(std::span<const SequenceInput> batch, std::span<float> logits,
                    std::span<const SampleRequest> requests, std::span<int32_t> tokens);
  explicit CudaBackend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kls::engine

#endif  // KLS_ENGINE_BACKEND_CUDA_CUDA_BACKEND_H_

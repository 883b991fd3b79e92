// The CPU backend: fp32 everywhere (or with bf16 activations, to model the CUDA backend), the
// kernels/<op> references for attention, conv, norms and routing, and cpu_ops for the dense
// projections. The correct reference and the CI path.
#ifndef KLS_ENGINE_BACKEND_CPU_CPU_BACKEND_H_
#define KLS_ENGINE_BACKEND_CPU_CPU_BACKEND_H_

#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/backend/cpu/cpu_ops.h"
#include "engine/model/weights.h"
#include "kernels/moe/moe_ref.h"

namespace kls::engine {

struct CpuBackendOptions {
  // vLLM's routing (unbiased weights) is the reference; kBiased reproduces the HF remote code.
  kernels::RouterWeighting router_weighting = kernels::RouterWeighting::kUnbiased;
  // KDA prefill uses the chunked algorithm for sequences with more than this many new tokens
  // and the recurrence otherwise. Both give the same result; tests vary it.
  int kda_recurrent_max_tokens = 1;
  // MLA uses absorbed attention over the latent cache for at most this many new tokens and
  // decompressed (non-absorbed) attention above it.
  int mla_absorbed_max_tokens = 1;
  // States (sessions and forks) the backend holds at once; 0 = no limit. Beyond it NewState,
  // CloneState and ImportState return RESOURCE_EXHAUSTED, as the CUDA backend does when its
  // state slots run out (tests use it to exercise that path without a GPU).
  int max_states = 0;
  // Fault injection (tests of the worker's fatal-error path): after this many successful
  // forward passes every Forward fails and healthy() reports the failure for good, as after a
  // sticky GPU error. < 0: never.
  int fail_after_forwards = -1;
  // Round every activation the CUDA backend stores in bf16 (projection inputs and outputs,
  // conv and attention outputs, the MLA cache, SwiGLU intermediates, layer outputs) to bf16,
  // keeping the residual stream, router logits, logits and the KDA state in fp32 as it does.
  // The fp32 reference with the GPU's storage precision, the yardstick of what bf16 storage
  // costs on a model. One difference: the absorbed MLA decode keeps its latent query and
  // output in fp32 (the GPU stores both in bf16).
  bool bf16_activations = false;
};

// A sequence of a host-state forward (CpuBackend::ForwardHost).
struct HostSequenceInput {
  std::span<const int32_t> tokens;  // new tokens of this sequence (>= 1)
  SessionState* state = nullptr;    // continued in place; distinct per entry
};

// Its BackendState is a SessionState in host memory, so import, export and clone are copies.
class CpuBackend final : public Backend {
 public:
  // `weights` must outlive nothing else: the backend shares ownership.
  static absl::StatusOr<std::unique_ptr<CpuBackend>> Create(
      std::shared_ptr<const ModelWeights> weights, CpuBackendOptions options = {});

  absl::StatusOr<std::unique_ptr<BackendState>> NewState() override;
  absl::StatusOr<std::unique_ptr<BackendState>> CloneState(const BackendState& state) override;
  absl::StatusOr<std::unique_ptr<BackendState>> ImportState(const SessionState& host) override;
  absl::Status ExportState(const BackendState& state, int64_t mla_first_row,
                           SessionState* host) override;
  absl::StatusOr<std::unique_ptr<StateCheckpoint>> Checkpoint(const BackendState& state) override;
  absl::Status Rollback(const StateCheckpoint& checkpoint, BackendState* state) override;
  absl::Status Forward(std::span<const SequenceInput> batch, std::span<float> logits) override;
  absl::Status ForwardSample(std::span<const SequenceInput> batch,
                             std::span<const SampleRequest> requests,
                             std::span<int32_t> tokens) override;
  absl::Status healthy() const override { return injected_fault_; }
  const ModelConfig& config() const override { return weights_->config; }
  std::string_view name() const override { return "cpu"; }

  // The same forward pass on host states directly (the reference path the tests and the CUDA
  // agreement checks drive); validation and errors as for Forward.
  absl::Status ForwardHost(std::span<const HostSequenceInput> batch, std::span<float> logits);

  // The host state inside a state of this backend; nullptr for a state of another backend.
  SessionState* HostState(BackendState* state) const;
  const SessionState* HostState(const BackendState& state) const;

 private:
  struct Packed;  // per-call packing of the batch (offsets, states)

  CpuBackend(std::shared_ptr<const ModelWeights> weights, CpuBackendOptions options)
      : weights_(std::move(weights)), options_(options) {}

  absl::Status Validate(std::span<const HostSequenceInput> batch, std::span<float> logits) const;
  // Each writes its layer output [T, D] for the normed input a [T, D].
  void KdaMixer(const LayerWeights& layer, const Packed& packed, const float* a, float* out);
  void MlaMixer(const LayerWeights& layer, const Packed& packed, const float* a, float* out);
  void MoeFfn(const LayerWeights& layer, int64_t rows, const float* b, float* out);

  // Rounds x [n] to bf16 in place when options_.bf16_activations is set.
  void Store(float* x, int64_t n) const;
  void Store(std::vector<float>& x) const { Store(x.data(), static_cast<int64_t>(x.size())); }
  cpu::SwiGluRounding Rounding(cpu::SwiGluRounding bf16) const {
    return options_.bf16_activations ? bf16 : cpu::SwiGluRounding::kNone;
  }

  // RESOURCE_EXHAUSTED when options_.max_states states are alive.
  absl::Status CheckRoom() const;

  std::shared_ptr<const ModelWeights> weights_;
  CpuBackendOptions options_;
  std::shared_ptr<int> live_states_ = std::make_shared<int>(0);  // shared with the states
  int forwards_ = 0;
  std::vector<float> sample_logits_;  // ForwardSample's logits [batch, vocab]
  absl::Status injected_fault_;
};

}  // namespace kls::engine

#endif  // KLS_ENGINE_BACKEND_CPU_CPU_BACKEND_H_

// Choosing and creating the compute backend for a model directory: the CPU backend (host fp32
// weights, the reference) or the CUDA backend (weights streamed to the GPU in bf16), and "auto":
// CUDA when this build has it and a GPU is visible, else CPU. No CUDA header is included here,
// so services compile the same with and without CUDA.
#ifndef KLS_ENGINE_BACKEND_FACTORY_H_
#define KLS_ENGINE_BACKEND_FACTORY_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/backend/cpu/cpu_backend.h"
#include "engine/scheduler/generator.h"

namespace kls::engine {

struct BackendChoice {
  std::string kind = "auto";  // "cpu", "cuda" or "auto"
  CpuBackendOptions cpu;
  // CUDA backend (engine/backend/cuda/cuda_backend.h documents each).
  int cuda_device = 0;
  int64_t cuda_state_memory_bytes = 0;  // 0: what is free after weights and workspaces
  int32_t cuda_max_sessions = 64;
  int cuda_max_step_tokens = 8192;
  int cuda_max_step_seqs = 256;
  bool cuda_graphs = true;
};

// True when this build contains the CUDA backend.
bool CudaBackendBuilt();
// True when the CUDA backend is built and a CUDA device is visible.
bool CudaBackendUsable();
// The kind "auto" resolves to here: "cuda" if usable, else "cpu"; other kinds unchanged.
std::string ResolveBackendKind(const std::string& kind);

// OK when `kind` can run here. INVALID_ARGUMENT for an unknown kind; FAILED_PRECONDITION for
// "cuda" without a CUDA build or without a visible GPU, saying which. Needs no model, so
// commands check their flags with it before a slow model load.
absl::Status CheckBackendAvailable(const std::string& kind);

struct ModelAndBackend {
  std::shared_ptr<const LoadedModel> model;
  std::unique_ptr<Backend> backend;
};

// Loads the model the way the chosen backend needs it and creates the backend. The CUDA backend
// logs the weight upload's progress for large models. The errors of CheckBackendAvailable, then
// model and memory errors as LoadModel and the backends report them.
absl::StatusOr<ModelAndBackend> LoadModelAndBackend(const std::string& model_dir,
                                                    const BackendChoice& choice);

}  // namespace kls::engine

#endif  // KLS_ENGINE_BACKEND_FACTORY_H_

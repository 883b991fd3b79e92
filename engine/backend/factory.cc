#include "engine/backend/factory.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"

#if KLS_HAVE_CUDA_BACKEND
#include "engine/backend/cuda/cuda_backend.h"
#endif

namespace kls::engine {

bool CudaBackendBuilt() { return KLS_HAVE_CUDA_BACKEND != 0; }

bool CudaBackendUsable() {
#if KLS_HAVE_CUDA_BACKEND
  return CudaDeviceAvailable();
#else
  return false;
#endif
}

std::string ResolveBackendKind(const std::string& kind) {
  if (kind != "auto") return kind;
  return CudaBackendUsable() ? "cuda" : "cpu";
}

absl::Status CheckBackendAvailable(const std::string& kind) {
  if (kind == "auto" || kind == "cpu") return absl::OkStatus();
  if (kind != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("backend '", kind, "' is not one of cpu, cuda, auto"));
  }
  if (!CudaBackendBuilt()) {
    return absl::FailedPreconditionError(
        "--backend cuda: this build has no CUDA backend (build where the CUDA toolkit is "
        "installed); use --backend cpu");
  }
  if (!CudaBackendUsable()) {
    return absl::FailedPreconditionError(
        "--backend cuda: no CUDA device is visible; use --backend cpu");
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelAndBackend> LoadModelAndBackend(const std::string& model_dir,
                                                    const BackendChoice& choice) {
  KLS_RETURN_IF_ERROR(CheckBackendAvailable(choice.kind));
  const std::string kind = ResolveBackendKind(choice.kind);
  ModelAndBackend out;
  if (kind == "cpu") {
    KLS_ASSIGN_OR_RETURN(LoadedModel loaded, LoadModel(model_dir));
    auto model = std::make_shared<LoadedModel>(std::move(loaded));
    KLS_ASSIGN_OR_RETURN(std::unique_ptr<CpuBackend> backend,
                         CpuBackend::Create(model->weights, choice.cpu));
    out.model = std::move(model);
    out.backend = std::move(backend);
    return out;
  }
#if KLS_HAVE_CUDA_BACKEND
  KLS_ASSIGN_OR_RETURN(LoadedModel loaded, LoadModelWithoutWeights(model_dir));
  out.model = std::make_shared<LoadedModel>(std::move(loaded));
  KLS_RETURN_IF_ERROR(cuda::CudaStatus(cudaSetDevice(choice.cuda_device), "cudaSetDevice"));
  int64_t last_percent = -10;
  const auto start = std::chrono::steady_clock::now();
  KLS_ASSIGN_OR_RETURN(
      cuda::DeviceWeights weights,
      cuda::DeviceWeights::FromCheckpoint(
          model_dir, nullptr, [&last_percent, start](int64_t done, int64_t total) {
            const int64_t percent = total > 0 ? done * 100 / total : 100;
            if (percent >= last_percent + 10 || done == total) {
              last_percent = percent;
              const double secs =
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
              KLS_LOG(INFO) << "uploading weights to the GPU: " << percent << "% (" << (done >> 20)
                            << " of " << (total >> 20) << " MiB, " << static_cast<int>(secs)
                            << " s)";
            }
          }));
  CudaBackendOptions options;
  options.device = choice.cuda_device;
  options.state_memory_bytes = choice.cuda_state_memory_bytes;
  options.max_sessions = choice.cuda_max_sessions;
  options.max_step_tokens = choice.cuda_max_step_tokens;
  options.max_step_seqs = choice.cuda_max_step_seqs;
  options.cuda_graphs = choice.cuda_graphs;
  options.router_weighting = choice.cpu.router_weighting;
  KLS_ASSIGN_OR_RETURN(out.backend, CudaBackend::Create(std::move(weights), options));
#endif
  return out;
}

}  // namespace kls::engine

// C ABI over the GEMM launchers for bench/gemm_bench.py (ctypes). Every pointer is a raw device
// pointer (a torch tensor's data_ptr()) in the layouts of kernels/gemm/gemm.h; `stream` is a
// cudaStream_t (torch.cuda.Stream.cuda_stream); y_fp32 != 0 selects an fp32 y. Functions return
// a cudaError_t value (0 on success; an invalid argument is cudaErrorInvalidValue) and never
// synchronize. Not for production use: the engine calls gemm.h directly.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <memory>

#include "kernels/gemm/gemm.h"

namespace {

using kls::kernels::GemmOutputMode;
using kls::kernels::GemmOutputType;
using kls::kernels::GemmStatus;

int ToCudaError(const GemmStatus& status) {
  if (status.ok()) return cudaSuccess;
  std::fprintf(stderr, "gemm_bench: %s\n", status.message);
  return status.cuda != cudaSuccess ? status.cuda : cudaErrorInvalidValue;
}

// One cuBLASLt object for the process (the bench is single-threaded, one stream).
kls::kernels::CublasLtGemm* Gemm() {
  static std::unique_ptr<kls::kernels::CublasLtGemm> gemm = [] {
    kls::kernels::GemmCreateResult created = kls::kernels::CublasLtGemm::Create({});
    if (!created.status.ok()) std::fprintf(stderr, "gemm_bench: %s\n", created.status.message);
    return std::move(created.gemm);
  }();
  return gemm.get();
}

}  // namespace

extern "C" {

// LaunchSkinnyGemm with one problem: y[m, n] = x[m, k] · w[n, k]ᵀ, dense rows; warps, chunks
// and overlap are SkinnyGemmArgs' launch-shape fields (0, 0, 0: the default shape).
int kls_skinny_gemm(const void* x, const void* w, void* y, int y_fp32, int64_t m, int64_t n,
                    int64_t k, int warps, int chunks, int overlap, void* stream) {
  kls::kernels::SkinnyGemmArgs args;
  args.m = m;
  args.warps_per_cta = warps;
  args.chunks_in_flight = chunks;
  args.overlap_previous_kernel = overlap != 0;
  args.num_problems = 1;
  kls::kernels::SkinnyGemmProblem& q = args.problems[0];
  q.x = static_cast<const __nv_bfloat16*>(x);
  q.ldx = k;
  q.w = static_cast<const __nv_bfloat16*>(w);
  q.ldw = k;
  q.y = y;
  q.y_type = y_fp32 != 0 ? GemmOutputType::kFp32 : GemmOutputType::kBf16;
  q.ldy = n;
  q.n = n;
  q.k = k;
  return ToCudaError(kls::kernels::LaunchSkinnyGemm(args, static_cast<cudaStream_t>(stream)));
}

// CublasLtGemm::Run of the same product (what the engine used for every step before).
int kls_cublaslt_linear(const void* x, const void* w, void* y, int y_fp32, int64_t m, int64_t n,
                        int64_t k, void* stream) {
  kls::kernels::CublasLtGemm* gemm = Gemm();
  if (gemm == nullptr) return cudaErrorInitializationError;
  kls::kernels::GemmArgs args;
  args.m = m;
  args.n = n;
  args.k = k;
  args.x = static_cast<const __nv_bfloat16*>(x);
  args.ldx = k;
  args.w = static_cast<const __nv_bfloat16*>(w);
  args.ldw = k;
  args.y = y;
  args.y_type = y_fp32 != 0 ? GemmOutputType::kFp32 : GemmOutputType::kBf16;
  args.ldy = n;
  args.mode = GemmOutputMode::kOverwrite;
  return ToCudaError(gemm->Run(args, static_cast<cudaStream_t>(stream)));
}

const char* kls_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // extern "C"

// CUDA runtime glue for the engine: errors as absl::Status, and RAII owners of device memory,
// pinned host memory, streams, events and graphs. Host code only (no kernels).
//
// Status mapping: cudaErrorMemoryAllocation → RESOURCE_EXHAUSTED; errors that leave the context
// unusable (illegal address, launch failure, ECC, …; see IsStickyCudaError) → INTERNAL, and the
// backend stops serving; everything else → INTERNAL with the call named.
#ifndef KLS_ENGINE_BACKEND_CUDA_CUDA_UTIL_H_
#define KLS_ENGINE_BACKEND_CUDA_CUDA_UTIL_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"

namespace kls::engine::cuda {

// True for errors after which the CUDA context cannot be used again (the process must restart).
inline bool IsStickyCudaError(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorUnknown:
      return true;
    default:
      return false;
  }
}

inline absl::Status CudaStatus(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

#define KLS_CUDA_RETURN_IF_ERROR(expr) \
  KLS_RETURN_IF_ERROR(::kls::engine::cuda::CudaStatus((expr), #expr))

// Owns `bytes` of memory from a CUDA allocator: DeviceMemory (cudaMalloc, 256-byte aligned) or
// PinnedMemory (cudaMallocHost, page-locked host memory for asynchronous copies).
template <cudaError_t (*kAlloc)(void**, size_t), cudaError_t (*kFree)(void*)>
class CudaMemory {
 public:
  CudaMemory() = default;
  ~CudaMemory() { Reset(); }
  CudaMemory(CudaMemory&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  CudaMemory& operator=(CudaMemory&& o) noexcept {
    if (this != &o) {
      Reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  CudaMemory(const CudaMemory&) = delete;
  CudaMemory& operator=(const CudaMemory&) = delete;

  // RESOURCE_EXHAUSTED naming `what` and the size when the memory is not there.
  static absl::StatusOr<CudaMemory> Allocate(size_t bytes, absl::string_view what) {
    CudaMemory m;
    if (bytes == 0) return m;
    const cudaError_t e = kAlloc(&m.ptr_, bytes);
    if (e != cudaSuccess) {
      m.ptr_ = nullptr;
      (void)cudaGetLastError();  // allocation failures are not sticky; clear them
      return CudaStatus(e, absl::StrCat("allocating ", bytes >> 20, " MiB for ", what));
    }
    m.bytes_ = bytes;
    return m;
  }

  void Reset() {
    if (ptr_ != nullptr) kFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

inline cudaError_t CudaMallocDevice(void** ptr, size_t bytes) { return cudaMalloc(ptr, bytes); }
inline cudaError_t CudaMallocPinned(void** ptr, size_t bytes) { return cudaMallocHost(ptr, bytes); }
using DeviceMemory = CudaMemory<CudaMallocDevice, cudaFree>;
using PinnedMemory = CudaMemory<CudaMallocPinned, cudaFreeHost>;

// A non-blocking stream.
class CudaStream {
 public:
  CudaStream() = default;
  ~CudaStream() {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  absl::Status Create() {
    return CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                      "cudaStreamCreate");
  }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// An instantiated CUDA graph.
class CudaGraphExec {
 public:
  CudaGraphExec() = default;
  ~CudaGraphExec() { Reset(); }
  CudaGraphExec(CudaGraphExec&& o) noexcept : exec_(std::exchange(o.exec_, nullptr)) {}
  CudaGraphExec& operator=(CudaGraphExec&& o) noexcept {
    if (this != &o) {
      Reset();
      exec_ = std::exchange(o.exec_, nullptr);
    }
    return *this;
  }
  CudaGraphExec(const CudaGraphExec&) = delete;
  CudaGraphExec& operator=(const CudaGraphExec&) = delete;
  void Reset() {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    exec_ = nullptr;
  }
  cudaGraphExec_t* out() {
    Reset();
    return &exec_;
  }
  cudaGraphExec_t get() const { return exec_; }

 private:
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace kls::engine::cuda

#endif  // KLS_ENGINE_BACKEND_CUDA_CUDA_UTIL_H_

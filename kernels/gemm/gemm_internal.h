// Host-side helpers shared by the GEMM launchers (gemm_cublaslt.cu, gemm_skinny.cu): failure
// statuses with a formatted message, operand extents and overlap checks.
#ifndef KLS_KERNELS_GEMM_GEMM_INTERNAL_H_
#define KLS_KERNELS_GEMM_GEMM_INTERNAL_H_

#include <cuda_bf16.h>

#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "kernels/gemm/gemm.h"

namespace kls::kernels::gemm_internal {

[[gnu::format(printf, 3, 4)]] inline GemmStatus Failure(cublasStatus_t cublas, cudaError_t cuda,
                                                        const char* format, ...) {
  GemmStatus status;
  status.cublas = cublas;
  status.cuda = cuda;
  va_list args;
  va_start(args, format);
  std::vsnprintf(status.message, sizeof(status.message), format, args);
  va_end(args);
  return status;
}

#define KLS_GEMM_INVALID(...) \
  ::kls::kernels::gemm_internal::Failure(CUBLAS_STATUS_INVALID_VALUE, cudaSuccess, __VA_ARGS__)

inline size_t ElementBytes(GemmOutputType type) {
  return type == GemmOutputType::kFp32 ? sizeof(float) : sizeof(__nv_bfloat16);
}

// Number of elements from the first to one past the last element of a [batch][rows, cols]
// matrix; false on int64 overflow. rows, cols, batch >= 1.
inline bool Extent(int64_t rows, int64_t cols, int64_t ld, int64_t batch, int64_t batch_stride,
                   int64_t* extent) {
  int64_t row_part = 0, batch_part = 0, sum = 0;
  if (__builtin_mul_overflow(rows - 1, ld, &row_part)) return false;
  if (__builtin_mul_overflow(batch - 1, batch_stride, &batch_part)) return false;
  if (__builtin_add_overflow(row_part, batch_part, &sum)) return false;
  return !__builtin_add_overflow(sum, cols, extent);
}

inline bool Overlaps(const void* a, int64_t a_bytes, const void* b, int64_t b_bytes) {
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(a), b0 = reinterpret_cast<uintptr_t>(b);
  return a0 < b0 + static_cast<uintptr_t>(b_bytes) && b0 < a0 + static_cast<uintptr_t>(a_bytes);
}

}  // namespace kls::kernels::gemm_internal

#endif  // KLS_KERNELS_GEMM_GEMM_INTERNAL_H_

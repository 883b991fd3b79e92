// Row gathers: embedding lookup, lm_head row selection, last-row indices (contract: embed.h).
//
// Mapping. One warp per output row, 8 rows per 256-thread CTA. The warp reads the row index
// once (a broadcast load), then its lanes copy the row in 16-byte words (8 bf16) when dim % 8 == 0
// and both row bases and strides are 16-byte aligned, else element by element; consecutive lanes
// take consecutive words, so every access is coalesced. An index out of range zero-fills the row
// and sets the error flag (atomicExch; every writer stores 1). LastRowIndices: one thread per
// sequence.
//
// Limits: dim <= 2³⁰; ceil(rows / 8) <= 2³¹−1 CTAs; offsets in int64.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/embed/embed.h"

namespace kls::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerCta = kThreads / 32;
constexpr int kMaxDim = 1 << 30;  // lane loops step past dim in int

template <int kVec>
__global__ void __launch_bounds__(kThreads)
    GatherRowsKernel(const __nv_bfloat16* __restrict__ src, int64_t src_row_stride,
                     int64_t num_src_rows, int dim, const int32_t* __restrict__ indices,
                     int64_t num_rows, __nv_bfloat16* __restrict__ dst, int64_t dst_row_stride,
                     int32_t* error_flag) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / 32;
  if (row >= num_rows) return;
  const int64_t index = indices[row];
  __nv_bfloat16* out = dst + row * dst_row_stride;
  if (index < 0 || index >= num_src_rows) {
    if constexpr (kVec == 8) {
      for (int j = lane; j < dim / 8; j += 32) reinterpret_cast<uint4*>(out)[j] = uint4{0, 0, 0, 0};
    } else {
      for (int j = lane; j < dim; j += 32) out[j] = __float2bfloat16_rn(0.0f);
    }
    if (lane == 0) atomicExch(error_flag, 1);
    return;
  }
  const __nv_bfloat16* in = src + index * src_row_stride;
  if constexpr (kVec == 8) {
    const uint4* in4 = reinterpret_cast<const uint4*>(in);
    uint4* out4 = reinterpret_cast<uint4*>(out);
    for (int j = lane; j < dim / 8; j += 32) out4[j] = in4[j];
  } else {
    static_assert(kVec == 1);
    for (int j = lane; j < dim; j += 32) out[j] = in[j];
  }
}

__global__ void LastRowIndicesKernel(const int32_t* __restrict__ cu_seqlens, int num_seqs,
                                     int32_t* __restrict__ indices) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= num_seqs) return;
  const int32_t begin = cu_seqlens[n];
  const int32_t end = cu_seqlens[n + 1];
  indices[n] = end > begin ? end - 1 : -1;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t LaunchGatherRows(const __nv_bfloat16* src, int64_t src_row_stride, int64_t num_src_rows,
                             int dim, const int32_t* row_indices, int64_t num_rows,
                             __nv_bfloat16* dst, int64_t dst_row_stride, int32_t* error_flag,
                             cudaStream_t stream) {
  if (num_rows < 0 || num_src_rows < 0 || dim < 1 || dim > kMaxDim || src_row_stride < dim ||
      dst_row_stride < dim) {
    return cudaErrorInvalidValue;
  }
  if (num_rows == 0) return cudaSuccess;
  if (src == nullptr || row_indices == nullptr || dst == nullptr || error_flag == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t ctas = (num_rows + kRowsPerCta - 1) / kRowsPerCta;
  if (ctas > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const bool vec = dim % 8 == 0 && src_row_stride % 8 == 0 && dst_row_stride % 8 == 0 &&
                   Aligned16(src) && Aligned16(dst);
  const dim3 grid(static_cast<unsigned>(ctas));
  if (vec) {
    GatherRowsKernel<8><<<grid, kThreads, 0, stream>>>(src, src_row_stride, num_src_rows, dim,
                                                       row_indices, num_rows, dst, dst_row_stride,
                                                       error_flag);
  } else {
    GatherRowsKernel<1><<<grid, kThreads, 0, stream>>>(src, src_row_stride, num_src_rows, dim,
                                                       row_indices, num_rows, dst, dst_row_stride,
                                                       error_flag);
  }
  return cudaGetLastError();
}

cudaError_t LaunchEmbeddingGather(const __nv_bfloat16* table, int64_t vocab_size, int dim,
                                  const int32_t* ids, int64_t num_tokens, __nv_bfloat16* out,
                                  int32_t* error_flag, cudaStream_t stream) {
  if (vocab_size < 1) return cudaErrorInvalidValue;
  return LaunchGatherRows(table, dim, vocab_size, dim, ids, num_tokens, out, dim, error_flag,
                          stream);
}

cudaError_t LaunchLastRowIndices(const int32_t* cu_seqlens, int num_seqs, int32_t* indices,
                                 cudaStream_t stream) {
  if (num_seqs < 0) return cudaErrorInvalidValue;
  if (num_seqs == 0) return cudaSuccess;
  if (cu_seqlens == nullptr || indices == nullptr) return cudaErrorInvalidValue;
  constexpr int kBlock = 256;
  LastRowIndicesKernel<<<(num_seqs + kBlock - 1) / kBlock, kBlock, 0, stream>>>(cu_seqlens,
                                                                                num_seqs, indices);
  return cudaGetLastError();
}

}  // namespace kls::kernels

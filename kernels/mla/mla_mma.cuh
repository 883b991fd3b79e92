// Warp-level helpers of the MLA kernels (mla_prefill.cu, mla_decode.cu) on top of the shared
// ones in kernels/kda/kda_chunk_mma.cuh (cp.async, ldmatrix.x4, operand addressing; fragment
// layouts documented there) and kernels/gemm/gemm_stream_mma.cuh (the bf16 tensor-core MMA
// m16n8k16 with fp32 accumulation): the two-matrix ldmatrix variants, and cp.async group waits
// with a compile-time depth.
#ifndef KLS_KERNELS_MLA_MLA_MMA_CUH_
#define KLS_KERNELS_MLA_MLA_MMA_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/gemm/gemm_stream_mma.cuh"
#include "kernels/kda/kda_chunk_mma.cuh"

namespace kls::kernels::mla {

using gemm_stream::MmaBf16;
using kda_chunk::ARowMajorAddr;
using kda_chunk::BKMajorAddr;
using kda_chunk::BNMajorAddr;
using kda_chunk::CpAsync16;
using kda_chunk::CpAsyncCommit;
using kda_chunk::Ldsm4;
using kda_chunk::Ldsm4T;
using kda_chunk::PackBf16x2;
using kda_chunk::SmemAddr;

// ldmatrix.x2 (two 8×8 b16 matrices; lanes 0..15 give the row addresses, the others are
// ignored but must be valid shared addresses).
__device__ __forceinline__ void Ldsm2(uint32_t (&r)[2], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(SmemAddr(row_addr))
               : "memory");
}
__device__ __forceinline__ void Ldsm2T(uint32_t (&r)[2], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(SmemAddr(row_addr))
               : "memory");
}

// Waits until at most kPending of this thread's committed cp.async groups are in flight.
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ float WarpMaxXor(float x, int width) {
  for (int offset = width / 2; offset > 0; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}
__device__ __forceinline__ float WarpSumXor(float x, int width) {
  for (int offset = width / 2; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// bf16 value of x, as a float (round to nearest even).
__device__ __forceinline__ float RoundBf16(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

}  // namespace kls::kernels::mla

#endif  // KLS_KERNELS_MLA_MLA_MMA_CUH_

// Warp-level helpers of the MoE expert kernels: the bf16 tensor-core MMA m16n8k16 with fp32
// accumulation, cp.async wait-group with a count, 16-byte loads and bf16 packing. cp.async,
// ldmatrix and the fragment layouts come from kernels/kda/kda_chunk_mma.cuh (documented there).
#ifndef KLS_KERNELS_MOE_MOE_MMA_CUH_
#define KLS_KERNELS_MOE_MOE_MMA_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kda/kda_chunk_mma.cuh"

namespace kls::kernels::moe_mma {

using ::kls::kernels::kda_chunk::CpAsync16;
using ::kls::kernels::kda_chunk::CpAsyncCommit;
using ::kls::kernels::kda_chunk::Ldsm4;
using ::kls::kernels::kda_chunk::PackBf16x2;
using ::kls::kernels::kda_chunk::UnpackBf16x2;

// d += a · b (bf16 inputs, fp32 accumulators); fragments as in kda_chunk_mma.cuh.
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Waits until at most kPending committed cp.async groups of this thread are still in flight.
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// 16-byte read-only load that bypasses L1 (weights are read once per CTA; L2 keeps them for
// other tiles of the same expert).
__device__ __forceinline__ uint4 LoadNoL1(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Word i (0..3) of a uint4; i must be a compile-time constant after unrolling.
__device__ __forceinline__ uint32_t Word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ float Silu(float x) { return x / (1.0f + __expf(-x)); }

}  // namespace kls::kernels::moe_mma

#endif  // KLS_KERNELS_MOE_MOE_MMA_CUH_

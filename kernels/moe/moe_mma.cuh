// Warp-level helpers of the MoE expert kernels: cp.async wait-group with a count and SiLU, plus
// re-exports: the bf16 tensor-core MMA m16n8k16, 16-byte loads and word picks from
// kernels/gemm/gemm_stream_mma.cuh; cp.async, ldmatrix, bf16 packing and the fragment layouts
// from kernels/kda/kda_chunk_mma.cuh (documented there).
#ifndef KLS_KERNELS_MOE_MOE_MMA_CUH_
#define KLS_KERNELS_MOE_MOE_MMA_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/gemm/gemm_stream_mma.cuh"
#include "kernels/kda/kda_chunk_mma.cuh"

namespace kls::kernels::moe_mma {

using ::kls::kernels::gemm_stream::LoadNoL1;
using ::kls::kernels::gemm_stream::MmaBf16;
using ::kls::kernels::gemm_stream::Word;
using ::kls::kernels::kda_chunk::CpAsync16;
using ::kls::kernels::kda_chunk::CpAsyncCommit;
using ::kls::kernels::kda_chunk::Ldsm4;
using ::kls::kernels::kda_chunk::PackBf16x2;
using ::kls::kernels::kda_chunk::UnpackBf16x2;

// Waits until at most kPending committed cp.async groups of this thread are still in flight.
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ float Silu(float x) { return x / (1.0f + __expf(-x)); }

}  // namespace kls::kernels::moe_mma

#endif  // KLS_KERNELS_MOE_MOE_MMA_CUH_

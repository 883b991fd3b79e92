// Warp-level helpers of the weight-streaming GEMVs (gemm_skinny.cu, kernels/moe/moe_decode.cu):
// the bf16 tensor-core MMA m16n8k16 with fp32 accumulation fed straight from 16-byte global loads
// ("swap AB": weight rows are the MMA's M, the few token rows its N), and the reduction of the
// warps' partial fragments when a CTA's warps split K.
//
// Fragments (PTX m16n8k16, lane = 4·g + t): A a0 (row g, k 2t..2t+1), a1 (row g + 8, same k),
// a2 (row g, k 2t+8..2t+9), a3 (row g + 8, same k); B b0 (k 2t..2t+1, column g), b1 (k 2t+8..
// 2t+9, column g); C c[v] (row g + 8·(v >> 1), column 2t + (v & 1)).
#ifndef KLS_KERNELS_GEMM_GEMM_STREAM_MMA_CUH_
#define KLS_KERNELS_GEMM_GEMM_STREAM_MMA_CUH_

#include <cuda_runtime.h>

#include <cstdint>

namespace kls::kernels::gemm_stream {

// d += a · b (bf16 inputs, fp32 accumulators); fragments as in the file comment.
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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

// acc += W[rows g, g + 8; chunk] · X[columns; chunk] over one 32-wide k chunk (both k16 steps).
// Lane (g, t) holds elements 8t..8t+7 of the chunk: w_lo of weight row g, w_hi of row g + 8, x of
// the B column g. The MMA sums over k in any order, so words 0, 1 feed the first k16 step and
// words 2, 3 the second, for A and B alike: each lane's load is one contiguous 16 bytes.
__device__ __forceinline__ void SwapAbChunk(float (&acc)[4], const uint4& w_lo, const uint4& w_hi,
                                            const uint4& x) {
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const uint32_t a[4] = {Word(w_lo, 2 * s), Word(w_hi, 2 * s), Word(w_lo, 2 * s + 1),
                           Word(w_hi, 2 * s + 1)};
    MmaBf16(acc, a, Word(x, 2 * s), Word(x, 2 * s + 1));
  }
}

// Sums the kWarps warps' partial C fragments (kFrags of 4 floats per lane) into warp 0's `acc`
// through `red` (shared, (kWarps − 1)·kFrags·4·32 floats). Ends with warp 0 holding the sums; a
// barrier for all threads of the CTA sits in the middle.
template <int kWarps, int kFrags>
__device__ __forceinline__ void ReduceOverWarps(float (&acc)[kFrags][4], float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp > 0) {
#pragma unroll
    for (int f = 0; f < kFrags; ++f) {
#pragma unroll
      for (int v = 0; v < 4; ++v) red[(((warp - 1) * kFrags + f) * 4 + v) * 32 + lane] = acc[f][v];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int w = 0; w < kWarps - 1; ++w) {
#pragma unroll
      for (int f = 0; f < kFrags; ++f) {
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[f][v] += red[((w * kFrags + f) * 4 + v) * 32 + lane];
      }
    }
  }
}

}  // namespace kls::kernels::gemm_stream

#endif  // KLS_KERNELS_GEMM_GEMM_STREAM_MMA_CUH_

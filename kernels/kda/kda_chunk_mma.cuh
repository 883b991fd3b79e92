// Warp-level building blocks of the KDA chunk kernels (kda_chunk.cu): cp.async, ldmatrix, named
// barriers and the fp16 tensor-core MMA m16n8k16 with fp32 accumulation (sm_80+, used on sm_90a).
//
// Fragment layouts of mma.m16n8k16.row.col (lane = 4·g + t, g = lane / 4, t = lane % 4):
//   A (16×16, row-major)  a[0]: (g, 2t..2t+1)   a[1]: (g+8, 2t..)   a[2]: (g, 2t+8..)   a[3]: (g+8,
//   2t+8..) B (16×8, k × n)       b[0]: (k = 2t..2t+1, n = g)               b[1]: (k = 2t+8.., n =
//   g) C/D (16×8, fp32)      d[0..1]: (g, 2t..2t+1)                    d[2..3]: (g+8, 2t..2t+1)
// The Ldsm* helpers take the per-lane row address of an ldmatrix.x4; the *Addr helpers below
// compute it for the three operand shapes the kernels use.
#ifndef KLS_KERNELS_KDA_KDA_CHUNK_MMA_CUH_
#define KLS_KERNELS_KDA_KDA_CHUNK_MMA_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kls::kernels::kda_chunk {

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when !valid nothing is read and the 16 bytes are zero-filled
// (`gmem` must still be a mapped address).
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// ldmatrix.x4 (four 8×8 b16 matrices); lanes 8i..8i+7 address the rows of matrix i.
__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(row_addr))
               : "memory");
}
__device__ __forceinline__ void Ldsm4T(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(row_addr))
               : "memory");
}

// Named barriers 1..4 (0 is __syncthreads) over `threads` threads, a multiple of 32; `id` is
// dispatched to immediates so that ptxas reserves only the barriers in use. Arrive publishes the
// caller's prior shared-memory writes to the threads that Sync on the same id, without waiting.
__device__ __forceinline__ void NamedBarrierSync(int id, int threads) {
  switch (id) {
    case 1:
      asm volatile("bar.sync 1, %0;\n" ::"r"(threads) : "memory");
      break;
    case 2:
      asm volatile("bar.sync 2, %0;\n" ::"r"(threads) : "memory");
      break;
    case 3:
      asm volatile("bar.sync 3, %0;\n" ::"r"(threads) : "memory");
      break;
    default:
      asm volatile("bar.sync 4, %0;\n" ::"r"(threads) : "memory");
      break;
  }
}
__device__ __forceinline__ void NamedBarrierArrive(int id, int threads) {
  switch (id) {
    case 1:
      asm volatile("bar.arrive 1, %0;\n" ::"r"(threads) : "memory");
      break;
    case 2:
      asm volatile("bar.arrive 2, %0;\n" ::"r"(threads) : "memory");
      break;
    case 3:
      asm volatile("bar.arrive 3, %0;\n" ::"r"(threads) : "memory");
      break;
    default:
      asm volatile("bar.arrive 4, %0;\n" ::"r"(threads) : "memory");
      break;
  }
}

// d += a · b (fp16 inputs, fp32 accumulators).
__device__ __forceinline__ void MmaF16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Row address for Ldsm4 of the A fragment of the 16×16 tile at (row0, col0) of a row-major
// 16-bit matrix with `ld` elements per row.
template <typename T16>
__device__ __forceinline__ const T16* ARowMajorAddr(const T16* base, int ld, int row0, int col0,
                                                    int lane) {
  return base + (row0 + (lane & 15)) * ld + col0 + ((lane >> 4) << 3);
}

// Row address for Ldsm4T of the A fragment of the 16×16 tile (m0.., k0..) of A = Xᵀ, where X is
// stored row-major as [k][m] with `ld` elements per row.
template <typename T16>
__device__ __forceinline__ const T16* ATransposedAddr(const T16* base, int ld, int m0, int k0,
                                                      int lane) {
  return base + (k0 + (lane & 7) + ((lane >> 4) << 3)) * ld + m0 + (((lane >> 3) & 1) << 3);
}

// Row address for Ldsm4T of the B fragments of two adjacent n8 tiles (n0.., n0+8..) of the
// 16-deep slice k0.. of B stored row-major as [k][n]: r[0], r[1] feed tile n0, r[2], r[3] n0+8.
template <typename T16>
__device__ __forceinline__ const T16* BKMajorAddr(const T16* base, int ld, int k0, int n0,
                                                  int lane) {
  return base + (k0 + (lane & 15)) * ld + n0 + ((lane >> 4) << 3);
}

// Row address for Ldsm4 (no transpose) of the B fragments of two adjacent n8 tiles of B stored
// as [n][k] (Bᵀ row-major): r[0], r[1] feed tile n0, r[2], r[3] tile n0+8.
template <typename T16>
__device__ __forceinline__ const T16* BNMajorAddr(const T16* base, int ld, int k0, int n0,
                                                  int lane) {
  return base + (n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + k0 + (((lane >> 3) & 1) << 3);
}

__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t PackHalf2(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ float2 UnpackBf16x2(uint32_t bits) {
  __nv_bfloat162 v;
  *reinterpret_cast<uint32_t*>(&v) = bits;
  return __bfloat1622float2(v);
}

__device__ __forceinline__ float2 UnpackHalf2(uint32_t bits) {
  __half2 v;
  *reinterpret_cast<uint32_t*>(&v) = bits;
  return __half22float2(v);
}

}  // namespace kls::kernels::kda_chunk

#endif  // KLS_KERNELS_KDA_KDA_CHUNK_MMA_CUH_

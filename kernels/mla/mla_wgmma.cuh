// Hopper (sm_90a) asynchronous-unit helpers of the MLA kernels: warpgroup MMA
// (wgmma.mma_async, bf16 m64nNk16 with A in shared memory or registers, B in shared memory),
// shared-memory matrix descriptors for the 128-byte-swizzled layout, tensor-memory-access (TMA)
// tile loads and the mbarriers that count their bytes, and the fences between the generic and
// the async proxy.
//
// Layout (128-byte swizzle, what a TMA box with CU_TENSOR_MAP_SWIZZLE_128B writes): rows of 64
// bf16 (128 bytes); within each 1024-byte-aligned group of 8 rows, the 16-byte chunk c of row r
// is stored at chunk position c ^ r. One such grid of [rows × 64 channels] serves as
//   a K-major operand (rows = M or N, the 64 channels = K): SBO = 1024 (the next 8 rows), LBO
//   unused; a k16 step inside the 128-byte row advances the start address by 32 bytes;
//   an M-major A (the 64 channels = M, rows = K), imm-trans-a = 1: SBO = 1024 (the next 8 K
//   rows), LBO = the distance to the next 64-channel grid.
//
// Accumulator of m64nNk16 (fp32, N/2 registers per thread), thread = 32·w + 4·g + t of the
// warpgroup: d[4j + 0..1] = (row 16w + g, cols 8j + 2t .. +1), d[4j + 2..3] = (row 16w + g + 8,
// same cols), j = 0 .. N/8 − 1 (the mma.m16n8 C layout, stacked over the n8 blocks and warps).
#ifndef KLS_KERNELS_MLA_MLA_WGMMA_CUH_
#define KLS_KERNELS_MLA_MLA_WGMMA_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kda/kda_chunk_mma.cuh"

namespace kls::kernels::mla {

// Byte offset of element (row, col) (col < 64) in a 128-byte-swizzled grid whose base is
// 1024-byte aligned.
__device__ __forceinline__ uint32_t Swizzle128Offset(int row, int col) {
  return static_cast<uint32_t>(row * 128 + ((((col >> 3) ^ row) & 7) << 4) + (col & 7) * 2);
}

// Descriptor of a 128-byte-swizzled operand starting at `smem` (shared memory). Bits 0–13:
// address / 16; 16–29: LBO / 16; 32–45: SBO / 16; 49–51: base offset 0 (the grids are
// 1024-byte aligned); 62–63: layout 1 = 128-byte swizzle.
__device__ __forceinline__ uint64_t SmemDescriptorSw128(const void* smem, uint32_t lbo_bytes,
                                                        uint32_t sbo_bytes) {
  const uint64_t addr = kda_chunk::SmemAddr(smem);
  return ((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) | (uint64_t{1} << 62);
}

// The same descriptor moved `bytes` (a multiple of 16) further into shared memory.
__device__ __forceinline__ uint64_t AdvanceDescriptor(uint64_t desc, uint32_t bytes) {
  return desc + (bytes >> 4);  // shared addresses < 256 KB: the 14-bit field cannot carry
}

// mbarrier (shared memory, 8 bytes) that one arrival plus the bytes of the TMA loads complete.
__device__ __forceinline__ void MbarrierInit(uint64_t* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(kda_chunk::SmemAddr(bar)),
               "r"(arrivals)
               : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void MbarrierArriveExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile(
      "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(kda_chunk::SmemAddr(bar)),
      "r"(bytes)
      : "memory");
}
// Waits until the phase with the given parity has completed.
__device__ __forceinline__ void MbarrierWait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(kda_chunk::SmemAddr(bar)),
      "r"(parity)
      : "memory");
}
// TMA: the box at coordinates (x, y) of a 2-D tensor map into shared memory, completing `bar`.
__device__ __forceinline__ void TmaLoad2d(void* smem, const void* tensor_map, int x, int y,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(kda_chunk::SmemAddr(smem)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(x), "r"(y), "r"(kda_chunk::SmemAddr(bar))
      : "memory");
}
// 4-byte global → shared copy (cp.async); when !valid nothing is read and zeros are written.
__device__ __forceinline__ void CpAsync4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(kda_chunk::SmemAddr(smem)),
               "l"(gmem), "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Shared-memory writes of this thread (st.shared, cp.async) become visible to the async proxy
// that wgmma reads through; a barrier must still order them across threads.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving reads of accumulators above the wait that completes them.
template <int kN>
__device__ __forceinline__ void FenceAccumulators(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <int kTransA>
__device__ __forceinline__ void WgmmaBf16M64N32(float (&d)[16], uint64_t desc_a, uint64_t desc_b,
                                                bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, "
      "%19, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)), "n"(kTransA)
      : "memory");
}
template <int kTransA>
__device__ __forceinline__ void WgmmaBf16M64N16(float (&d)[8], uint64_t desc_a, uint64_t desc_b,
                                                bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)), "n"(kTransA)
      : "memory");
}

// The 64 fp32 accumulators of an m64n128 wgmma: their register list in the instruction (asm
// operands %0 .. %63) and the operands themselves, written once for both m64n128 wrappers.
#define KLS_WGMMA_D64_REGS                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}, "
#define KLS_WGMMA_D64_OPERANDS(d)                                                                 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),    \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),  \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),  \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),  \
      "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),  \
      "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),  \
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),  \
      "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// m64n128k16 with A and B from shared memory (both K-major).
__device__ __forceinline__ void WgmmaBf16M64N128(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                 bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " KLS_WGMMA_D64_REGS
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : KLS_WGMMA_D64_OPERANDS(d)
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate))
      : "memory");
}

// m64n128k16 with A from registers (a = the mma.m16n8k16 A fragment of the warp's 16 rows) and
// B from shared memory, read N-major (kTransB = 1) or K-major. A's registers must stay unchanged
// until the MMA has completed (WgmmaWait, then FenceRegisters).
template <int kTransB>
__device__ __forceinline__ void WgmmaBf16M64N128RegA(float (&d)[64], const uint32_t (&a)[4],
                                                     uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " KLS_WGMMA_D64_REGS
      "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
      : KLS_WGMMA_D64_OPERANDS(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(static_cast<int>(accumulate)),
        "n"(kTransB)
      : "memory");
}

// Keeps the compiler from reusing or moving registers an asynchronous MMA still reads.
template <int kN>
__device__ __forceinline__ void FenceRegisters(uint32_t (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// d (+)= A·B for one m64nNk16 bf16 step (N = 16 or 32), fp32 accumulation, A and B from shared
// memory (descriptors); kTransA = 1 reads A as M-major. accumulate = false overwrites d.
template <int kN, int kTransA>
__device__ __forceinline__ void WgmmaBf16(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b,
                                          bool accumulate) {
  static_assert(kN == 16 || kN == 32);
  if constexpr (kN == 32) {
    WgmmaBf16M64N32<kTransA>(d, desc_a, desc_b, accumulate);
  } else {
    WgmmaBf16M64N16<kTransA>(d, desc_a, desc_b, accumulate);
  }
}

#undef KLS_WGMMA_D64_REGS
#undef KLS_WGMMA_D64_OPERANDS

}  // namespace kls::kernels::mla

#endif  // KLS_KERNELS_MLA_MLA_WGMMA_CUH_

// Causal depthwise conv (width W ≤ 4) + SiLU over the fused q̂/k̂/v̂ streams, prefill and decode
// in one kernel (contract: conv.h; math: README.md).
//
// Mapping. One thread owns 8 consecutive channels (16-byte loads and stores of bf16) of one
// sequence and one run of kRun = 16 consecutive tokens of it. Grid: x = channel groups / 128
// (128 threads per CTA, consecutive channel groups: each token row is read fully coalesced),
// y = runs (ceil(max_seqlen / 16), at most 65535; CTAs stride over further runs), z = sequence.
// A thread keeps the 8 × W weights and a sliding window of the W−1 previous inputs in fp32
// registers; run j > 0 reads its W−1 halo tokens from x (L1/L2 hits, neighbours' rows), run 0
// takes them from the conv state.
//
// In-place state update without a second kernel: W−1 ≤ 3 ≤ kRun, so only run 0 reads the old
// state, and the thread of run 0 also writes the new state of its 8 channels after those reads
// (the newest inputs come from the tail of x or, when the sequence is shorter than W−1, from
// old rows it has not overwritten yet). No other thread touches that state, so there is no
// read/write race and no inter-CTA ordering is needed.
//
// Decode (1 token per sequence): one run, grid (C / 1024, 1, N). Cost per channel and token: one
// x read, one out write, plus W−1 state reads and writes per sequence.
//
// Limits (checked on the host, cudaErrorInvalidValue): 2 ≤ W ≤ 4; stream_dim % 8 == 0;
// N ≤ 65535; 16-byte aligned x, out, conv_state and weight; out not overlapping x.
// Trusted (device data): cu_seqlens non-decreasing from 0; slots distinct and inside the pool.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/conv/conv.h"

namespace kls::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kVec = 8;    // channels per thread (one 16-byte bf16 vector)
constexpr int kRun = 16;   // tokens per thread
constexpr int kBatch = 4;  // tokens loaded together
static_assert(kRun % kBatch == 0);
constexpr int kMaxGridY = 65535;

// Word q (bf16 elements 2q, 2q+1) of 8 packed bf16, as floats: bf16 is the top half of an fp32,
// so the conversion is exact and needs no type punning. q must be a compile-time constant after
// unrolling so that `v` stays in registers.
__device__ __forceinline__ float2 Pair(const uint4& v, int q) {
  const uint32_t word = q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;
  return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
}

// Element k of the bf16 array packed in `v` (8 per uint4).
template <int kN>
__device__ __forceinline__ __nv_bfloat16 Element(const uint4 (&v)[kN], int k) {
  const uint4& u = v[k / 8];
  const int q = (k % 8) / 2;
  const uint32_t word = q == 0 ? u.x : q == 1 ? u.y : q == 2 ? u.z : u.w;
  return __ushort_as_bfloat16(static_cast<unsigned short>(word >> (16 * (k % 2))));
}

__device__ __forceinline__ uint4 Load16(const __nv_bfloat16* p) {
  return *reinterpret_cast<const uint4*>(p);
}

__device__ __forceinline__ void Store16(__nv_bfloat16* p, uint4 v) {
  *reinterpret_cast<uint4*>(p) = v;
}

__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  const __nv_bfloat162_raw raw = __floats2bfloat162_rn(lo, hi);  // round to nearest even
  return static_cast<uint32_t>(raw.x) | (static_cast<uint32_t>(raw.y) << 16);
}

__device__ __forceinline__ float Silu(float z) { return z / (1.f + expf(-z)); }

template <int kWidth>
__global__ void __launch_bounds__(kThreads) CausalConv1dSiluKernel(const CausalConvParams p) {
  constexpr int kHist = kWidth - 1;
  static_assert(kHist >= 1 && kHist <= kRun);

  const int64_t channels = static_cast<int64_t>(p.num_streams) * p.stream_dim;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (group * kVec >= channels) return;
  const int64_t c0 = group * kVec;  // first channel; the 8 stay inside one stream
  const int n = static_cast<int>(blockIdx.z);
  const int64_t bos = p.cu_seqlens[n];
  const int64_t len = p.cu_seqlens[n + 1] - bos;
  if (static_cast<int64_t>(blockIdx.y) * kRun >= len) return;

  // Weights [C, W]: the 8 channels' rows are 8·W contiguous bf16 (16-byte aligned), flat index
  // channel·W + tap. Kept packed: w[i][q] = taps i of channels 2q and 2q+1.
  uint4 w_raw[kWidth];
#pragma unroll
  for (int i = 0; i < kWidth; ++i) w_raw[i] = Load16(p.weight + c0 * kWidth + i * kVec);
  __nv_bfloat162 w[kWidth][kVec / 2];
#pragma unroll
  for (int i = 0; i < kWidth; ++i) {
#pragma unroll
    for (int q = 0; q < kVec / 2; ++q) {
      w[i][q] = __halves2bfloat162(Element(w_raw, 2 * q * kWidth + i),
                                   Element(w_raw, (2 * q + 1) * kWidth + i));
    }
  }

  const __nv_bfloat16* x = p.x + bos * channels + c0;  // token τ of the sequence at τ·channels
  __nv_bfloat16* out = p.out + bos * channels + c0;

  for (int64_t j = blockIdx.y; j * kRun < len; j += gridDim.y) {
    const int64_t t0 = j * kRun;
    const int64_t t1 = t0 + kRun < len ? t0 + kRun : len;

    // window[r] = the 8 inputs at τ = t0 − kHist + r, packed bf16.
    uint4 window[kHist];
    __nv_bfloat16* state = nullptr;
    if (j == 0) {
      const int64_t stream = c0 / p.stream_dim, d0 = c0 % p.stream_dim;
      const int64_t slot = p.conv_slots[n];
      state = p.conv_state + ((slot * p.num_streams + stream) * kHist) * p.stream_dim + d0;
#pragma unroll
      for (int r = 0; r < kHist; ++r) window[r] = Load16(state + r * p.stream_dim);
    } else {
#pragma unroll
      for (int r = 0; r < kHist; ++r) window[r] = Load16(x + (t0 - kHist + r) * channels);
    }

    // kBatch tokens at a time, loads first, so that several 16-byte loads are in flight.
    for (int64_t tb = t0; tb < t1; tb += kBatch) {
      uint4 cur[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (tb + u < t1) cur[u] = Load16(x + (tb + u) * channels);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (tb + u >= t1) break;
        uint32_t y[kVec / 2];
#pragma unroll
        for (int q = 0; q < kVec / 2; ++q) {
          float2 acc = make_float2(0.f, 0.f);
#pragma unroll
          for (int i = 0; i < kHist; ++i) {
            const float2 wi = __bfloat1622float2(w[i][q]), xi = Pair(window[i], q);
            acc.x += wi.x * xi.x;
            acc.y += wi.y * xi.y;
          }
          const float2 wi = __bfloat1622float2(w[kHist][q]), xi = Pair(cur[u], q);
          acc.x += wi.x * xi.x;
          acc.y += wi.y * xi.y;
          y[q] = PackBf16x2(Silu(acc.x), Silu(acc.y));
        }
        Store16(out + (tb + u) * channels, make_uint4(y[0], y[1], y[2], y[3]));
#pragma unroll
        for (int r = 0; r + 1 < kHist; ++r) window[r] = window[r + 1];
        window[kHist - 1] = cur[u];
      }
    }

    if (j == 0) {
      // New state row r = input at τ = len − kHist + r: x when τ ≥ 0, else old row kHist + τ.
      // This thread is the only reader and writer of these rows.
#pragma unroll
      for (int r = 0; r < kHist; ++r) {
        const int64_t tau = len - kHist + r;
        // Old row kHist + tau = len + r > r: rows are rewritten in increasing order, so the row
        // read here is still the old one.
        const uint4 val =
            tau >= 0 ? Load16(x + tau * channels) : Load16(state + (len + r) * p.stream_dim);
        Store16(state + r * p.stream_dim, val);
      }
    }
  }
}

bool Aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool ValidConvParams(const CausalConvParams& p) {
  if (p.x == nullptr || p.weight == nullptr || p.conv_state == nullptr || p.conv_slots == nullptr ||
      p.cu_seqlens == nullptr || p.out == nullptr) {
    return false;
  }
  if (p.num_seqs < 1 || p.num_seqs > kMaxGridY || p.total_tokens < 0 || p.max_seqlen < 0) {
    return false;
  }
  if (p.width < 2 || p.width > 4 || p.num_streams < 1 || p.stream_dim < kVec ||
      p.stream_dim % kVec != 0) {
    return false;
  }
  if (!Aligned16(p.x) || !Aligned16(p.out) || !Aligned16(p.conv_state) || !Aligned16(p.weight)) {
    return false;
  }
  const int64_t channels = static_cast<int64_t>(p.num_streams) * p.stream_dim;
  const int64_t groups = channels / kVec;
  if ((groups + kThreads - 1) / kThreads > INT32_MAX) return false;
  const uintptr_t bytes = static_cast<uintptr_t>(p.total_tokens * channels) * sizeof(__nv_bfloat16);
  const uintptr_t x0 = reinterpret_cast<uintptr_t>(p.x), o0 = reinterpret_cast<uintptr_t>(p.out);
  return x0 + bytes <= o0 || o0 + bytes <= x0 || bytes == 0;
}

template <int kWidth>
void Launch(const CausalConvParams& p, dim3 grid, cudaStream_t stream) {
  CausalConv1dSiluKernel<kWidth><<<grid, kThreads, 0, stream>>>(p);
}

}  // namespace

cudaError_t LaunchCausalConv1dSilu(const CausalConvParams& params, cudaStream_t stream) {
  if (!ValidConvParams(params)) return cudaErrorInvalidValue;
  if (params.total_tokens == 0) return cudaSuccess;
  const int64_t groups = static_cast<int64_t>(params.num_streams) * params.stream_dim / kVec;
  // CTAs stride over runs, so an understated max_seqlen costs speed, never correctness.
  const int64_t runs = std::max<int64_t>(1, (int64_t{params.max_seqlen} + kRun - 1) / kRun);
  const dim3 grid(static_cast<unsigned>((groups + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min<int64_t>(runs, kMaxGridY)),
                  static_cast<unsigned>(params.num_seqs));
  switch (params.width) {
    case 2:
      Launch<2>(params, grid, stream);
      break;
    case 3:
      Launch<3>(params, grid, stream);
      break;
    default:
      Launch<4>(params, grid, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace kls::kernels

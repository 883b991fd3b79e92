#include <cmath>
#include <cstdint>

#include "engine/backend/cuda/cuda_ops.h"

namespace kls::engine::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;

unsigned GridFor(int64_t n, int per_thread = 1) {
  const int64_t blocks =
      (n + int64_t{kThreads} * per_thread - 1) / (int64_t{kThreads} * per_thread);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks));
}

// The sum of `value` over the block (kThreads threads), returned to every thread.
__device__ float BlockSum(float value) {
  __shared__ float partial[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) value += __shfl_xor_sync(0xffffffffu, value, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) partial[0] = s;
  }
  __syncthreads();
  return partial[0];
}

__global__ void SiluMulKernel(const bf16* __restrict__ gate_up, int64_t rows, int width,
                              bf16* __restrict__ out) {
  const int64_t total = rows * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / width;
    const int64_t c = i - r * width;
    const float g = __bfloat162float(gate_up[r * 2 * width + c]);
    const float u = __bfloat162float(gate_up[r * 2 * width + width + c]);
    out[i] = __float2bfloat16(g / (1.f + __expf(-g)) * u);
  }
}

// One block per row: the sum of squares of the latent by a block reduction.
__global__ void LatentNormPackKernel(const bf16* __restrict__ kv, const bf16* __restrict__ weight,
                                     int dc, int dr, float eps, bf16* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const int width = dc + dr;
  const bf16* in = kv + row * width;
  bf16* dst = out + row * width;
  float sum = 0.f;
  for (int i = threadIdx.x; i < dc; i += blockDim.x) {
    const float x = __bfloat162float(in[i]);
    sum += x * x;
  }
  const float inv = rsqrtf(BlockSum(sum) / static_cast<float>(dc) + eps);
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    dst[i] = i < dc ? __float2bfloat16(__bfloat162float(weight[i]) * __bfloat162float(in[i]) * inv)
                    : in[i];
  }
}

// One block per (row, sequence) pair found by a binary search over row_starts.
__global__ void GatherPagedRowsKernel(const bf16* __restrict__ pages, int page_size, int row_dim,
                                      const int32_t* __restrict__ block_table,
                                      int max_pages_per_seq, const int32_t* __restrict__ row_starts,
                                      int num_seqs, int64_t total_rows, bf16* __restrict__ out) {
  for (int64_t row = blockIdx.x; row < total_rows; row += gridDim.x) {
    int lo = 0, hi = num_seqs - 1;  // last n with row_starts[n] <= row
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (row_starts[mid] <= row) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const int64_t i = row - row_starts[lo];
    const int page = block_table[static_cast<int64_t>(lo) * max_pages_per_seq + i / page_size];
    const bf16* src = pages + (static_cast<int64_t>(page) * page_size + i % page_size) * row_dim;
    bf16* dst = out + row * row_dim;
    for (int c = threadIdx.x; c < row_dim; c += blockDim.x) dst[c] = src[c];
  }
}

// At most kNormVecs float4 per thread: rows of up to 4·kThreads·kNormVecs = 8192 values take the
// vectorized kernel, whose loads are all issued before the first use (a decode step's rows are
// single, so the kernel is one CTA whose time is the latency of its dependent load rounds).
constexpr int kNormVecs = 8;

__device__ uint2 PackBf16x4(float a, float b, float c, float d) {
  __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
  uint2 r;
  r.x = *reinterpret_cast<uint32_t*>(&lo);
  r.y = *reinterpret_cast<uint32_t*>(&hi);
  return r;
}

__device__ float4 UnpackBf16x4(uint2 v) {
  const float2 lo = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// AddRmsNormF32Kernel for dim % 4 == 0 and dim <= 4·kThreads·kNormVecs: one block per row, the
// row held in registers, one round of loads (residual, delta, weight) then one of stores.
__global__ void __launch_bounds__(kThreads)
    AddRmsNormF32Vec4Kernel(const bf16* __restrict__ delta, float* __restrict__ residual,
                            const bf16* __restrict__ weight, int dim, float eps,
                            bf16* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const int vecs = dim / 4;
  float4* x = reinterpret_cast<float4*>(residual + row * dim);
  const uint2* d = reinterpret_cast<const uint2*>(delta + row * dim);
  const uint2* w = reinterpret_cast<const uint2*>(weight);
  float4 v[kNormVecs];
  uint2 dv[kNormVecs], wv[kNormVecs];
#pragma unroll
  for (int k = 0; k < kNormVecs; ++k) {
    const int i = threadIdx.x + k * kThreads;
    if (i < vecs) {
      v[k] = x[i];
      if (delta != nullptr) dv[k] = d[i];
      wv[k] = w[i];
    }
  }
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kNormVecs; ++k) {
    const int i = threadIdx.x + k * kThreads;
    if (i < vecs) {
      if (delta != nullptr) {
        const float4 a = UnpackBf16x4(dv[k]);
        v[k] = make_float4(v[k].x + a.x, v[k].y + a.y, v[k].z + a.z, v[k].w + a.w);
        x[i] = v[k];
      }
      sum += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
    }
  }
  const float inv = rsqrtf(BlockSum(sum) / static_cast<float>(dim) + eps);
  uint2* o = reinterpret_cast<uint2*>(out + row * dim);
#pragma unroll
  for (int k = 0; k < kNormVecs; ++k) {
    const int i = threadIdx.x + k * kThreads;
    if (i < vecs) {
      const float4 g = UnpackBf16x4(wv[k]);
      o[i] = PackBf16x4(g.x * (v[k].x * inv), g.y * (v[k].y * inv), g.z * (v[k].z * inv),
                        g.w * (v[k].w * inv));
    }
  }
}

__global__ void LogitsSamplableKernel(const float* __restrict__ logits, int64_t vocab,
                                      int32_t* __restrict__ ok) {
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  int nan = 0, finite = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = row[i];
    nan |= isnan(x) ? 1 : 0;
    finite |= isfinite(x) ? 1 : 0;
  }
  nan = __syncthreads_or(nan);
  finite = __syncthreads_or(finite);
  if (threadIdx.x == 0) ok[blockIdx.x] = !nan && finite ? 1 : 0;
}

// One block per row; the row's fp32 sum of squares by a block reduction.
__global__ void AddRmsNormF32Kernel(const bf16* __restrict__ delta, float* __restrict__ residual,
                                    const bf16* __restrict__ weight, int dim, float eps,
                                    bf16* __restrict__ out) {
  const int64_t row = blockIdx.x;
  float* x = residual + row * dim;
  float sum = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = x[i];
    if (delta != nullptr) {
      v += __bfloat162float(delta[row * dim + i]);
      x[i] = v;
    }
    sum += v * v;
  }
  const float inv = rsqrtf(BlockSum(sum) / static_cast<float>(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    out[row * dim + i] = __float2bfloat16(__bfloat162float(weight[i]) * (x[i] * inv));
  }
}

__global__ void BuildMlaKeysKernel(const bf16* __restrict__ kv_b, const bf16* __restrict__ rows,
                                   int64_t num_rows, int heads, int dn, int dv, int dc, int dr,
                                   bf16* __restrict__ k) {
  const int dk = dn + dr;
  const int64_t total = num_rows * heads * dk;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / (int64_t{heads} * dk);
    const int rest = static_cast<int>(i - r * heads * dk);
    const int h = rest / dk;
    const int c = rest - h * dk;
    k[i] = c < dn ? kv_b[(r * heads + h) * (dn + dv) + c] : rows[r * (dc + dr) + dc + (c - dn)];
  }
}

__global__ void FloatToBf16Kernel(const float* __restrict__ in, int64_t n, bf16* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = __float2bfloat16(in[i]);
  }
}

__global__ void Bf16ToFloatKernel(const bf16* __restrict__ in, int64_t n, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = __bfloat162float(in[i]);
  }
}

__device__ __forceinline__ uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in (0, 1]: 53 random bits, never 0 (log stays finite).
__device__ __forceinline__ double UniformOpen(uint64_t bits) {
  return (static_cast<double>(bits >> 11) + 1.0) * (1.0 / 9007199254740992.0);
}

__global__ void RandomFillKernel(void* out, bool fp32, int64_t n, uint64_t seed, RandomFill kind,
                                 float mean, float stddev) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint64_t a = SplitMix64(seed ^ SplitMix64(static_cast<uint64_t>(i) * 2 + 1));
    float x;
    if (kind == RandomFill::kNormal) {
      const uint64_t b = SplitMix64(a);
      const double r = sqrt(-2.0 * log(UniformOpen(a)));
      x = mean + stddev * static_cast<float>(r * cospi(2.0 * UniformOpen(b)));
    } else {
      x = static_cast<float>(log(1.0 + 15.0 * UniformOpen(a)));
    }
    if (fp32) {
      static_cast<float*>(out)[i] = x;
    } else {
      static_cast<bf16*>(out)[i] = __float2bfloat16(x);
    }
  }
}

}  // namespace

cudaError_t LaunchSiluMul(const bf16* gate_up, int64_t rows, int width, bf16* out,
                          cudaStream_t stream) {
  if (rows < 0 || width < 1 || gate_up == nullptr || out == nullptr) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  SiluMulKernel<<<GridFor(rows * width, 4), kThreads, 0, stream>>>(gate_up, rows, width, out);
  return cudaGetLastError();
}

cudaError_t LaunchLatentNormPack(const bf16* kv, const bf16* weight, int64_t rows, int dc, int dr,
                                 float eps, bf16* out, cudaStream_t stream) {
  if (rows < 0 || dc < 1 || dr < 0 || rows > INT32_MAX || kv == nullptr || weight == nullptr ||
      out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  LatentNormPackKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(kv, weight, dc, dr,
                                                                             eps, out);
  return cudaGetLastError();
}

cudaError_t LaunchGatherPagedRows(const bf16* pages, int page_size, int row_dim,
                                  const int32_t* block_table, int max_pages_per_seq,
                                  const int32_t* row_starts, int num_seqs, int64_t total_rows,
                                  bf16* out, cudaStream_t stream) {
  if (page_size < 1 || row_dim < 1 || max_pages_per_seq < 1 || num_seqs < 1 || total_rows < 0 ||
      pages == nullptr || block_table == nullptr || row_starts == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (total_rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(total_rows < 65535 * 4 ? total_rows : 65535 * 4);
  GatherPagedRowsKernel<<<blocks, 128, 0, stream>>>(pages, page_size, row_dim, block_table,
                                                    max_pages_per_seq, row_starts, num_seqs,
                                                    total_rows, out);
  return cudaGetLastError();
}

cudaError_t LaunchLogitsSamplable(const float* logits, int rows, int64_t vocab, int32_t* ok,
                                  cudaStream_t stream) {
  if (rows < 0 || vocab < 1 || (rows > 0 && (logits == nullptr || ok == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  LogitsSamplableKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, vocab, ok);
  return cudaGetLastError();
}

cudaError_t LaunchAddRmsNormF32(const bf16* delta, float* residual, const bf16* weight,
                                int64_t rows, int dim, float eps, bf16* out, cudaStream_t stream) {
  if (rows < 0 || dim < 1 || rows > INT32_MAX || residual == nullptr || weight == nullptr ||
      out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (dim % 4 == 0 && dim <= 4 * kThreads * kNormVecs && aligned(residual) && aligned(weight) &&
      aligned(out) && (delta == nullptr || aligned(delta))) {
    AddRmsNormF32Vec4Kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        delta, residual, weight, dim, eps, out);
  } else {
    AddRmsNormF32Kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        delta, residual, weight, dim, eps, out);
  }
  return cudaGetLastError();
}

cudaError_t LaunchBuildMlaKeys(const bf16* kv_b, const bf16* cache_rows, int64_t rows, int heads,
                               int dn, int dv, int dc, int dr, bf16* k, cudaStream_t stream) {
  if (rows < 0 || heads < 1 || dn < 0 || dv < 0 || dc < 0 || dr < 0 || kv_b == nullptr ||
      cache_rows == nullptr || k == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  BuildMlaKeysKernel<<<GridFor(rows * heads * (dn + dr), 4), kThreads, 0, stream>>>(
      kv_b, cache_rows, rows, heads, dn, dv, dc, dr, k);
  return cudaGetLastError();
}

cudaError_t LaunchFloatToBf16(const float* in, int64_t n, bf16* out, cudaStream_t stream) {
  if (n < 0 || (n > 0 && (in == nullptr || out == nullptr))) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  FloatToBf16Kernel<<<GridFor(n, 4), kThreads, 0, stream>>>(in, n, out);
  return cudaGetLastError();
}

cudaError_t LaunchBf16ToFloat(const bf16* in, int64_t n, float* out, cudaStream_t stream) {
  if (n < 0 || (n > 0 && (in == nullptr || out == nullptr))) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  Bf16ToFloatKernel<<<GridFor(n, 4), kThreads, 0, stream>>>(in, n, out);
  return cudaGetLastError();
}

cudaError_t LaunchRandomFill(void* out, bool fp32, int64_t n, uint64_t seed, RandomFill kind,
                             float mean, float stddev, cudaStream_t stream) {
  if (n < 0 || (n > 0 && out == nullptr)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  RandomFillKernel<<<GridFor(n, 8), kThreads, 0, stream>>>(out, fp32, n, seed, kind, mean, stddev);
  return cudaGetLastError();
}

}  // namespace kls::engine::cuda

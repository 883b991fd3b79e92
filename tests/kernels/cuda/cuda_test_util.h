// Helpers shared by the CUDA kernel tests (tests/kernels/cuda/*_test.cu): RAII device buffers,
// host <-> device copies, bf16 conversion, NaN poisoning, seeded random fills, the GPU-presence
// check and the comparison against the CPU references (HOUSE_STYLE.md H5 through
// tests/test_util.h, plus the relative RMS error of KIMI_LINEAR.md §9.2).
//
// Usage:
//   class MyKernelTest : public kls::testing::CudaTest {};   // fails (never skips) without a GPU
//   DeviceBuffer<float> d;  ASSERT_CUDA_OK(Upload(host, d));  ASSERT_CUDA_OK(Poison(out));
//   ASSERT_CUDA_OK(Launch...(..., stream));  ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
//   EXPECT_TRUE(MatchesReference(actual, expected, kBf16StateTolerance, kRmsBound));
//
// Not thread-safe; one test body uses its buffers on one thread.
#ifndef KLS_TESTS_KERNELS_CUDA_CUDA_TEST_UTIL_H_
#define KLS_TESTS_KERNELS_CUDA_CUDA_TEST_UTIL_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "tests/test_util.h"

// Fails the current test (fatally) when `expr` does not return cudaSuccess.
#define ASSERT_CUDA_OK(expr)                                           \
  do {                                                                 \
    const cudaError_t kls_cuda_status_ = (expr);                       \
    ASSERT_EQ(kls_cuda_status_, cudaSuccess)                           \
        << #expr << ": " << cudaGetErrorName(kls_cuda_status_) << " (" \
        << cudaGetErrorString(kls_cuda_status_) << ")";                \
  } while (0)

// Non-fatal variant, for destructors of test fixtures and loops that should keep going.
#define EXPECT_CUDA_OK(expr)                                           \
  do {                                                                 \
    const cudaError_t kls_cuda_status_ = (expr);                       \
    EXPECT_EQ(kls_cuda_status_, cudaSuccess)                           \
        << #expr << ": " << cudaGetErrorName(kls_cuda_status_) << " (" \
        << cudaGetErrorString(kls_cuda_status_) << ")";                \
  } while (0)

namespace kls::testing {

// Success when a CUDA device is usable. A machine without a GPU is a failure, never a skip:
// these binaries are only run (scripts/gpu-test run) where a GPU must be present.
inline ::testing::AssertionResult CudaDevicePresent() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    return ::testing::AssertionFailure()
           << "no usable CUDA device: cudaGetDeviceCount: " << cudaGetErrorName(err) << " ("
           << cudaGetErrorString(err) << ")";
  }
  if (count < 1) return ::testing::AssertionFailure() << "no CUDA device present";
  return ::testing::AssertionSuccess();
}

// Base fixture of every GPU test: SetUp fails fatally without a GPU (so the body does not run
// and the test reports FAILED), and owns a non-default (blocking) stream for the launchers.
class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(CudaDevicePresent());
    ASSERT_CUDA_OK(cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_ != nullptr) {
      EXPECT_CUDA_OK(cudaStreamSynchronize(stream_));
      EXPECT_CUDA_OK(cudaStreamDestroy(stream_));
      stream_ = nullptr;
    }
    // A kernel fault is sticky; surface it in the test that caused it.
    EXPECT_CUDA_OK(cudaGetLastError());
  }
  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// TEST_P variant of CudaTest.
template <typename Param>
class CudaParamTest : public CudaTest, public ::testing::WithParamInterface<Param> {};

// Move-only owner of `size()` elements of device memory (cudaMalloc / cudaFree). Empty buffers
// hold nullptr. The destructor never throws and ignores cudaFree's status.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { Reset(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      Reset();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }

  // Frees what was held and allocates `count` elements (uninitialized). count == 0 leaves the
  // buffer empty and returns cudaSuccess.
  cudaError_t Allocate(size_t count) {
    Reset();
    if (count == 0) return cudaSuccess;
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, count * sizeof(T));
    if (err != cudaSuccess) return err;
    data_ = static_cast<T*>(p);
    size_ = count;
    return cudaSuccess;
  }

  void Reset() {
    if (data_ != nullptr) static_cast<void>(cudaFree(data_));
    data_ = nullptr;
    size_ = 0;
  }

  T* get() { return data_; }
  const T* get() const { return data_; }
  size_t size() const { return size_; }
  size_t bytes() const { return size_ * sizeof(T); }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
};

// Allocates `device` to host.size() elements and copies `host` into it. Returns after the data
// has landed (a pageable cudaMemcpy alone may return before its DMA completes).
template <typename T>
cudaError_t Upload(std::span<const T> host, DeviceBuffer<T>& device) {
  cudaError_t err = device.Allocate(host.size());
  if (err != cudaSuccess || host.empty()) return err;
  err = cudaMemcpy(device.get(), host.data(), host.size_bytes(), cudaMemcpyHostToDevice);
  if (err != cudaSuccess) return err;
  return cudaDeviceSynchronize();
}
template <typename T>
cudaError_t Upload(const std::vector<T>& host, DeviceBuffer<T>& device) {
  return Upload(std::span<const T>(host), device);
}

// Waits for all work on the device, then resizes `host` to device.size() and copies the device
// contents into it.
template <typename T>
cudaError_t Download(const DeviceBuffer<T>& device, std::vector<T>& host) {
  host.resize(device.size());
  cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess || device.size() == 0) return err;
  return cudaMemcpy(host.data(), device.get(), device.bytes(), cudaMemcpyDeviceToHost);
}

// Fills every byte with 0xFF: a NaN in bf16, fp16, fp32 and fp64 (and -1 in integers), so an
// output element the kernel forgot to write fails the NaN check of AllClose. Returns after the
// fill has completed.
template <typename T>
cudaError_t Poison(DeviceBuffer<T>& buffer) {
  if (buffer.size() == 0) return cudaSuccess;
  const cudaError_t err = cudaMemset(buffer.get(), 0xFF, buffer.bytes());
  if (err != cudaSuccess) return err;
  return cudaDeviceSynchronize();
}

// bf16 <-> float on the host, bit-exact with __float2bfloat16_rn (round to nearest even; NaN
// stays NaN).
inline float Bf16ToFloat(__nv_bfloat16 x) {
  const __nv_bfloat16_raw raw(x);
  const uint32_t bits = static_cast<uint32_t>(raw.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline __nv_bfloat16 FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  __nv_bfloat16_raw raw;
  if (std::isnan(f)) {
    raw.x = static_cast<uint16_t>((bits >> 16) | 0x0040u);  // keep sign, force a quiet NaN
  } else {
    const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
    raw.x = static_cast<uint16_t>((bits + rounding) >> 16);
  }
  return __nv_bfloat16(raw);
}

// The value `x` takes after a round trip through bf16.
inline double RoundToBf16(double x) {
  return static_cast<double>(Bf16ToFloat(FloatToBf16(static_cast<float>(x))));
}

// Element-wise conversions.
inline std::vector<__nv_bfloat16> ToBf16(std::span<const double> x) {
  std::vector<__nv_bfloat16> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = FloatToBf16(static_cast<float>(x[i]));
  return r;
}
inline std::vector<double> Bf16ToDouble(std::span<const __nv_bfloat16> x) {
  std::vector<double> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = static_cast<double>(Bf16ToFloat(x[i]));
  return r;
}
inline std::vector<float> ToFloat(std::span<const double> x) {
  return std::vector<float>(x.begin(), x.end());
}
inline std::vector<double> ToDouble(std::span<const float> x) {
  return std::vector<double>(x.begin(), x.end());
}

// Rounds every element to the nearest bf16 (or fp32) value in place, so the fp64 reference sees
// exactly the inputs the kernel sees.
inline void RoundToBf16InPlace(std::vector<double>& x) {
  for (double& e : x) e = RoundToBf16(e);
}
inline void RoundToFloatInPlace(std::vector<double>& x) {
  for (double& e : x) e = static_cast<double>(static_cast<float>(e));
}

// Seeded random vectors (std::mt19937_64; the same seed gives the same values everywhere).
inline std::vector<double> RandomNormal(size_t n, uint64_t seed, double mean = 0.0,
                                        double stddev = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(mean, stddev);
  std::vector<double> r(n);
  for (double& e : r) e = dist(rng);
  return r;
}
inline std::vector<double> RandomUniform(size_t n, uint64_t seed, double lo, double hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> r(n);
  for (double& e : r) e = dist(rng);
  return r;
}

// Seeded random vectors rounded to bf16 values (RandomNormal / RandomUniform, then
// RoundToBf16InPlace), for inputs the kernel reads as bf16.
inline std::vector<double> Bf16Normal(size_t n, uint64_t seed, double mean = 0.0,
                                      double stddev = 1.0) {
  std::vector<double> v = RandomNormal(n, seed, mean, stddev);
  RoundToBf16InPlace(v);
  return v;
}
inline std::vector<double> Bf16Uniform(size_t n, uint64_t seed, double lo, double hi) {
  std::vector<double> v = RandomUniform(n, seed, lo, hi);
  RoundToBf16InPlace(v);
  return v;
}

// ‖a − e‖₂ / ‖e‖₂ (fla's assert_close ratio; 0 when both are all zero, inf when only e is).
inline double RelativeRmsError(std::span<const double> actual, std::span<const double> expected) {
  double diff_sq = 0, ref_sq = 0;
  for (size_t i = 0; i < actual.size() && i < expected.size(); ++i) {
    const double d = actual[i] - expected[i];
    diff_sq += d * d;
    ref_sq += expected[i] * expected[i];
  }
  if (ref_sq == 0) return diff_sq == 0 ? 0.0 : INFINITY;
  return std::sqrt(diff_sq / ref_sq);
}

// The project's acceptance check of a kernel result against an fp64 reference: the element-wise
// AllClose(atol, rtol) of H5 (fails on any NaN/Inf, so poisoned-but-unwritten outputs fail) AND
// a relative RMS error below `rms_bound` (5e-3 for bf16 I/O with an fp32 state).
inline ::testing::AssertionResult MatchesReference(std::span<const double> actual,
                                                   std::span<const double> expected,
                                                   Tolerance tolerance, double rms_bound) {
  ::testing::AssertionResult close = AllClose(actual, expected, tolerance.atol, tolerance.rtol);
  if (!close) return close;
  const double rms = RelativeRmsError(actual, expected);
  if (!(rms < rms_bound)) {
    return ::testing::AssertionFailure() << "relative RMS error " << rms << " >= " << rms_bound
                                         << " over " << actual.size() << " elements";
  }
  return ::testing::AssertionSuccess() << "relative RMS error " << rms;
}

}  // namespace kls::testing

#endif  // KLS_TESTS_KERNELS_CUDA_CUDA_TEST_UTIL_H_

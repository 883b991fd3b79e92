// CUDA token sampler: one token per row of fp32 logits, reproducing SampleReference
// (sampling_ref.h; procedure in README.md) draw for draw: greedy, temperature, top-k, top-p,
// seeded by the counter-based SamplerUniform(seed, counter).
//
// Per-row configurations and counters are read from device memory when the kernel runs, so a
// captured CUDA graph replays with whatever values the caller wrote there since. The launcher
// never synchronizes and never allocates.
#ifndef KLS_KERNELS_SAMPLING_SAMPLING_H_
#define KLS_KERNELS_SAMPLING_SAMPLING_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "common/splitmix64.h"
#include "kernels/sampling/sampling_ref.h"

#if defined(__CUDACC__)
#define KLS_SAMPLING_HOST_DEVICE __host__ __device__
#else
#define KLS_SAMPLING_HOST_DEVICE
#endif

namespace kls::kernels {

// splitmix64's output mixer (SplitMix64Mix of common/splitmix64.h), callable on the device.
KLS_SAMPLING_HOST_DEVICE inline uint64_t SamplerMix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// SamplerUniform(seed, counter) of sampling_ref.h, bit for bit, on the host and the device
// (integer arithmetic, then an exact conversion of 53 bits to double and an exact scaling).
KLS_SAMPLING_HOST_DEVICE inline double SamplerUniformPortable(uint64_t seed, uint64_t counter) {
  const uint64_t stream = SamplerMix64(seed + kGoldenGamma);
  const uint64_t bits = SamplerMix64(stream + (counter + 1) * kGoldenGamma);
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// tokens[r] = SampleReference(logits + r·logits_row_stride, vocab_size, configs[r], counters[r])
// for r < num_rows: the same procedure and the same uniform. Probabilities, masses and the CDF
// are fp64 as in the reference (the top-k and top-p cuts are found by a radix select over the
// logits' bits, with masses in 2⁻⁶⁰ fixed point), so a draw differs from the reference only when
// its uniform lands within fp64 rounding (~1e-13 relative) of a CDF or top-p boundary; greedy
// rows (temperature <= 0 or NaN) are identical always. Rows with different configurations (greedy
// and not) may share a launch.
//   logits   [num_rows, vocab_size] fp32, row stride logits_row_stride >= vocab_size (device)
//   configs  [num_rows] SamplerConfig (device; the host struct's layout)
//   counters [num_rows] uint64 (device): the per-draw counter of each row
//   tokens   [num_rows] int32 (device), written
// Returns cudaErrorInvalidValue (nothing launched) for num_rows < 0, vocab_size < 1 or > 2³⁰, a
// short row stride or a null pointer; num_rows == 0 launches nothing and succeeds;
// otherwise the launch status. One 1024-thread CTA per row.
cudaError_t LaunchSampleTokens(const float* logits, int64_t logits_row_stride, int64_t vocab_size,
                               int num_rows, const SamplerConfig* configs, const uint64_t* counters,
                               int32_t* tokens, cudaStream_t stream);

}  // namespace kls::kernels

#undef KLS_SAMPLING_HOST_DEVICE

#endif  // KLS_KERNELS_SAMPLING_SAMPLING_H_

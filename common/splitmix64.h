// splitmix64 (Steele, Lea, Flood 2014): the stream increment and the output mixer, shared by the
// sampler's counter-based uniforms and the engine; dependency-free, so kernels may include it.
#ifndef KLS_COMMON_SPLITMIX64_H_
#define KLS_COMMON_SPLITMIX64_H_

#include <cstdint>

namespace kls {

// The golden-ratio increment between consecutive splitmix64 states.
constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ull;

// splitmix64's output function: a bijective finalizer of one 64-bit state (mod 2^64 arithmetic).
inline uint64_t SplitMix64Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace kls

#endif  // KLS_COMMON_SPLITMIX64_H_

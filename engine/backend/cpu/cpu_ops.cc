#include "engine/backend/cpu/cpu_ops.h"

#include <cmath>
#include <vector>

#include "engine/model/safetensors.h"

namespace kls::engine::cpu {
namespace {

// One dot product in a fixed order (8 interleaved partial sums, then a fixed reduction), so
// results do not depend on how many rows are processed together.
inline float Dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (int j = 0; i < n; ++i, ++j) acc[j] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

}  // namespace

void Linear(const float* x, const float* w, int64_t rows, int64_t in, int64_t out, float* y) {
  // Rows in blocks of 4 so each weight row is read once per block.
  constexpr int64_t kBlock = 4;
  for (int64_t t0 = 0; t0 < rows; t0 += kBlock) {
    const int64_t t1 = std::min(rows, t0 + kBlock);
    for (int64_t o = 0; o < out; ++o) {
      const float* wo = w + o * in;
      for (int64_t t = t0; t < t1; ++t) y[t * out + o] = Dot(x + t * in, wo, in);
    }
  }
}

void RoundToBf16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = Bf16ToFloat(FloatToBf16(x[i]));
}

void SwiGlu(const float* x, const float* gate, const float* up, const float* down, int64_t rows,
            int64_t dim, int64_t width, float* y, SwiGluRounding rounding) {
  const int64_t n = rows * width;
  std::vector<float> g(n), u(n);
  Linear(x, gate, rows, dim, width, g.data());
  Linear(x, up, rows, dim, width, u.data());
  if (rounding == SwiGluRounding::kSeparateGateUp) {
    RoundToBf16(g.data(), n);
    RoundToBf16(u.data(), n);
  }
  for (int64_t i = 0; i < n; ++i) {
    const float a = g[i];
    g[i] = a / (1.0f + std::exp(-a)) * u[i];
  }
  if (rounding != SwiGluRounding::kNone) RoundToBf16(g.data(), n);
  Linear(g.data(), down, rows, width, dim, y);
  if (rounding != SwiGluRounding::kNone) RoundToBf16(y, rows * dim);
}

}  // namespace kls::engine::cpu

#include "engine/backend/cpu/cpu_ops.h"

#include <cmath>
#include <vector>

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

void SwiGlu(const float* x, const float* gate, const float* up, const float* down, int64_t rows,
            int64_t dim, int64_t width, float* y) {
  std::vector<float> g(rows * width), u(rows * width);
  Linear(x, gate, rows, dim, width, g.data());
  Linear(x, up, rows, dim, width, u.data());
  for (int64_t i = 0; i < rows * width; ++i) {
    const float a = g[i];
    g[i] = a / (1.0f + std::exp(-a)) * u[i];
  }
  Linear(g.data(), down, rows, width, dim, y);
}

}  // namespace kls::engine::cpu

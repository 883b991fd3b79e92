// Dense building blocks of the CPU backend. fp32 storage and accumulation, vectorized inner
// loops; each output element is computed by the same sequence of operations whatever the
// number of rows, so splitting a prefill into pieces gives bit-identical projections.
#ifndef KLS_ENGINE_BACKEND_CPU_CPU_OPS_H_
#define KLS_ENGINE_BACKEND_CPU_CPU_OPS_H_

#include <cstdint>

namespace kls::engine::cpu {

// y[t, o] = Σ_i x[t, i] · w[o, i]
//   x [rows, in], w [out, in] (nn.Linear layout), y [rows, out]; y must not alias x.
void Linear(const float* x, const float* w, int64_t rows, int64_t in, int64_t out, float* y);

// SwiGLU MLP: y = (silu(x gateᵀ) ⊙ (x upᵀ)) downᵀ.
//   x [rows, dim], gate/up [width, dim], down [dim, width], y [rows, dim]
void SwiGlu(const float* x, const float* gate, const float* up, const float* down, int64_t rows,
            int64_t dim, int64_t width, float* y);

}  // namespace kls::engine::cpu

#endif  // KLS_ENGINE_BACKEND_CPU_CPU_OPS_H_

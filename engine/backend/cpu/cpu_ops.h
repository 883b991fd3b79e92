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

// Rounds x [n] in place to the nearest bf16 (ties to even), keeping fp32 storage: the CPU
// backend's model of a tensor the CUDA backend stores in bf16.
void RoundToBf16(float* x, int64_t n);

// Which SwiGLU intermediates are rounded to bf16 (CpuBackendOptions::bf16_activations).
enum class SwiGluRounding {
  kNone,
  // The routed experts' grouped GEMM: gate and up stay fp32 inside the epilogue; the SiLU
  // product and the output are bf16.
  kFusedGateUp,
  // Separate GEMMs (dense MLP, shared expert): gate, up, the SiLU product and the output.
  kSeparateGateUp,
};

// SwiGLU MLP: y = (silu(x gateᵀ) ⊙ (x upᵀ)) downᵀ.
//   x [rows, dim], gate/up [width, dim], down [dim, width], y [rows, dim]
void SwiGlu(const float* x, const float* gate, const float* up, const float* down, int64_t rows,
            int64_t dim, int64_t width, float* y, SwiGluRounding rounding = SwiGluRounding::kNone);

}  // namespace kls::engine::cpu

#endif  // KLS_ENGINE_BACKEND_CPU_CPU_OPS_H_

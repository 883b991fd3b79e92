// Inputs and the fp64 reference shared by the KDA kernel tests (kda_chunk_test.cu,
// kda_recurrent_test.cu): a seeded packed varlen batch whose values are exactly representable in
// the kernels' dtypes, its device upload, the KdaParams that point at it, and the reference
// pipeline KdaGateReference + L2NormReference + KdaRecurrentReference<double> run on the same
// values. Both kernels take the same KdaParams, so one problem serves prefill and decode.
//
// Not thread-safe; one test body uses its problems and buffers on one thread.
#ifndef KLS_TESTS_KERNELS_CUDA_KDA_TEST_INPUTS_H_
#define KLS_TESTS_KERNELS_CUDA_KDA_TEST_INPUTS_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "kernels/kda/kda.h"
#include "kernels/kda/kda_ref.h"
#include "kernels/norm/norm_ref.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace kls::testing {

enum class KdaGateMode {
  kModel,        // A_log = log U(1, 16), dt_bias ~ N(0, 1), f ~ N(0, 1): the 48B gate
  kExtreme,      // A_log = log 16, f = 25, dt_bias = 0: g = -400 every step
  kZero,         // f = -30, dt_bias = 0: g ≈ -1e-12, a pure delta rule
  kAlternating,  // g = -400 or ≈ 0 in runs of 7 tokens, the pattern flipping per channel
};

// A packed batch with every value already representable in the kernel's dtype (bf16 inputs,
// fp32 parameters and states), so the fp64 reference sees exactly what the kernel sees.
// Sequence n owns tokens [cu_seqlens()[n], cu_seqlens()[n + 1]) and state slot slots[n].
struct KdaProblem {
  int num_heads = 0, head_dim = 0, num_slots = 0;
  std::vector<int64_t> lengths;        // [N] tokens per sequence, 0 allowed
  std::vector<int32_t> slots;          // [N] state slot per sequence, distinct
  std::vector<double> q, k, v, f;      // [total, H, D] bf16 values
  std::vector<double> beta_logits;     // [total, H] bf16 values
  std::vector<double> a_log, dt_bias;  // [H], [H, D] fp32 values
  std::vector<double> pool;            // [num_slots, H, D, D] fp32 values (initial states)

  int num_seqs() const { return static_cast<int>(lengths.size()); }
  int64_t total() const { return std::accumulate(lengths.begin(), lengths.end(), int64_t{0}); }
  int64_t state_size() const { return static_cast<int64_t>(num_heads) * head_dim * head_dim; }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(head_dim)); }
  // [N + 1] token offsets.
  std::vector<int32_t> cu_seqlens() const {
    std::vector<int32_t> cu{0};
    for (int64_t len : lengths) cu.push_back(cu.back() + static_cast<int32_t>(len));
    return cu;
  }
};

// The problem for `lengths` / `slots` (one slot per sequence, each < num_slots) with inputs
// drawn from seeds seed + 1 .. seed + 8 and gates per `gate`. Deterministic in its arguments.
inline KdaProblem MakeKdaProblem(std::vector<int64_t> lengths, std::vector<int32_t> slots,
                                 int num_slots, int num_heads, int head_dim, KdaGateMode gate,
                                 uint64_t seed) {
  KdaProblem p;
  p.num_heads = num_heads;
  p.head_dim = head_dim;
  p.num_slots = num_slots;
  p.lengths = std::move(lengths);
  p.slots = std::move(slots);
  const int64_t total = p.total();
  const size_t width = static_cast<size_t>(num_heads) * head_dim;
  const size_t n = static_cast<size_t>(total) * width;
  p.q = RandomNormal(n, seed + 1);
  p.k = RandomNormal(n, seed + 2);
  p.v = RandomNormal(n, seed + 3);
  p.beta_logits = RandomNormal(static_cast<size_t>(total) * num_heads, seed + 4);
  p.pool = RandomNormal(static_cast<size_t>(num_slots) * p.state_size(), seed + 5);
  switch (gate) {
    case KdaGateMode::kModel:
      p.f = RandomNormal(n, seed + 6);
      p.a_log = RandomUniform(num_heads, seed + 7, 1.0, 16.0);
      for (double& a : p.a_log) a = std::log(a);
      p.dt_bias = RandomNormal(width, seed + 8);
      break;
    case KdaGateMode::kExtreme:
    case KdaGateMode::kZero:
    case KdaGateMode::kAlternating:
      p.f.resize(n);
      for (size_t t = 0; t < static_cast<size_t>(total); ++t) {
        for (size_t m = 0; m < width; ++m) {
          const bool decay = gate == KdaGateMode::kExtreme ||
                             (gate == KdaGateMode::kAlternating && (t / 7 + m) % 2 == 0);
          p.f[t * width + m] = decay ? 25.0 : -30.0;
        }
      }
      p.a_log.assign(num_heads, std::log(16.0));
      p.dt_bias.assign(width, 0.0);
      break;
  }
  for (auto* x : {&p.q, &p.k, &p.v, &p.f, &p.beta_logits}) RoundToBf16InPlace(*x);
  for (auto* x : {&p.a_log, &p.dt_bias, &p.pool}) RoundToFloatInPlace(*x);
  return p;
}

// One parameterized shape: MakeKdaProblem(c) builds its problem; `name` is the gtest suffix.
struct KdaCase {
  std::string name;
  std::vector<int64_t> lengths;
  std::vector<int32_t> slots;  // one per sequence
  int num_slots;
  int num_heads;
  int head_dim;
  KdaGateMode gate;
  uint64_t seed;
};

inline std::ostream& operator<<(std::ostream& os, const KdaCase& c) { return os << c.name; }

inline KdaProblem MakeKdaProblem(const KdaCase& c) {
  return MakeKdaProblem(c.lengths, c.slots, c.num_slots, c.num_heads, c.head_dim, c.gate, c.seed);
}

struct KdaResult {
  std::vector<double> out;   // [total, H, D]
  std::vector<double> pool;  // [num_slots, H, D, D]
};

// The fp64 recurrence on `p`, starting from (and updating in place) `pool`
// ([num_slots, H, D, D]); `out` is resized to [total, H, D].
inline void KdaReferenceStep(const KdaProblem& p, std::vector<double>& pool,
                             std::vector<double>& out) {
  const int64_t total = p.total();
  const int64_t rows = total * p.num_heads;
  std::vector<double> qn(p.q.size()), kn(p.k.size()), g(p.f.size()), beta(p.beta_logits.size());
  kernels::L2NormReference<double>(p.q.data(), rows, p.head_dim, 1e-6, qn.data());
  kernels::L2NormReference<double>(p.k.data(), rows, p.head_dim, 1e-6, kn.data());
  kernels::KdaGateReference<double>(p.f.data(), p.a_log.data(), p.dt_bias.data(), total,
                                    p.num_heads, p.head_dim, g.data());
  for (size_t i = 0; i < beta.size(); ++i) beta[i] = 1.0 / (1.0 + std::exp(-p.beta_logits[i]));
  std::vector<int64_t> cu{0};
  for (int64_t len : p.lengths) cu.push_back(cu.back() + len);
  std::vector<double*> states;
  for (int32_t slot : p.slots) states.push_back(pool.data() + slot * p.state_size());
  out.assign(static_cast<size_t>(rows) * p.head_dim, 0.0);
  kernels::KdaArgs<double> args;
  args.q = qn.data();
  args.k = kn.data();
  args.v = p.v.data();
  args.g = g.data();
  args.beta = beta.data();
  args.cu_seqlens = cu.data();
  args.num_seqs = p.num_seqs();
  args.num_heads = p.num_heads;
  args.head_dim_k = p.head_dim;
  args.head_dim_v = p.head_dim;
  args.scale = p.scale();
  args.states = states.data();
  args.out = out.data();
  kernels::KdaRecurrentReference(args);
}

// One reference call on `p` from its initial pool.
inline KdaResult KdaReference(const KdaProblem& p) {
  KdaResult r;
  r.pool = p.pool;
  KdaReferenceStep(p, r.pool, r.out);
  return r;
}

// Device copies of one problem's inputs (shapes as in KdaProblem; out is [total, H, D]). The
// pool lives apart so that chains of calls can share it.
struct KdaDeviceInputs {
  DeviceBuffer<__nv_bfloat16> q, k, v, f, beta_logits, out;
  DeviceBuffer<float> a_log, dt_bias;
  DeviceBuffer<int32_t> cu_seqlens, slots;
};

// Uploads `p`'s inputs into `d` and allocates `d.out` poisoned with NaN. Returns the first
// CUDA error (the remaining steps still run), cudaSuccess otherwise.
inline cudaError_t UploadKdaInputs(const KdaProblem& p, KdaDeviceInputs& d) {
  cudaError_t err = cudaSuccess;
  const auto step = [&err](cudaError_t e) {
    if (err == cudaSuccess) err = e;
  };
  step(Upload(ToBf16(p.q), d.q));
  step(Upload(ToBf16(p.k), d.k));
  step(Upload(ToBf16(p.v), d.v));
  step(Upload(ToBf16(p.f), d.f));
  step(Upload(ToBf16(p.beta_logits), d.beta_logits));
  step(Upload(ToFloat(p.a_log), d.a_log));
  step(Upload(ToFloat(p.dt_bias), d.dt_bias));
  step(Upload(p.cu_seqlens(), d.cu_seqlens));
  step(Upload(p.slots, d.slots));
  step(d.out.Allocate(p.v.size()));
  step(Poison(d.out));
  return err;
}

// The launch parameters of `p` on the device inputs `d` and the device state pool `pool`
// ([num_slots, H, D, D] fp32). `p` must have at least one sequence.
inline kernels::KdaParams MakeKdaParams(const KdaProblem& p, KdaDeviceInputs& d, float* pool) {
  kernels::KdaParams params;
  params.q = d.q.get();
  params.k = d.k.get();
  params.v = d.v.get();
  params.f = d.f.get();
  params.beta_logits = d.beta_logits.get();
  params.a_log = d.a_log.get();
  params.dt_bias = d.dt_bias.get();
  params.cu_seqlens = d.cu_seqlens.get();
  params.state_pool = pool;
  params.state_slots = d.slots.get();
  params.out = d.out.get();
  params.num_seqs = p.num_seqs();
  params.total_tokens = p.total();
  params.max_seqlen = static_cast<int>(*std::max_element(p.lengths.begin(), p.lengths.end()));
  params.num_heads = p.num_heads;
  params.head_dim = p.head_dim;
  params.scale = static_cast<float>(p.scale());
  return params;
}

// Uploads q, k and v of `p` side by side into one buffer [total, token_stride] (q at column 0,
// k at H·D, v at 2·H·D; the columns past 3·H·D hold NaN, which the kernel must never read), the
// layout of the engine's conv output, and points `params` at it.
inline cudaError_t UploadFusedQkv(const KdaProblem& p, int64_t token_stride,
                                  DeviceBuffer<__nv_bfloat16>& fused, kernels::KdaParams& params) {
  const int64_t width = static_cast<int64_t>(p.num_heads) * p.head_dim;
  std::vector<double> host(static_cast<size_t>(p.total() * token_stride),
                           std::numeric_limits<double>::quiet_NaN());
  for (int64_t t = 0; t < p.total(); ++t) {
    for (int64_t i = 0; i < width; ++i) {
      host[t * token_stride + i] = p.q[t * width + i];
      host[t * token_stride + width + i] = p.k[t * width + i];
      host[t * token_stride + 2 * width + i] = p.v[t * width + i];
    }
  }
  const cudaError_t err = Upload(ToBf16(host), fused);
  params.q = fused.get();
  params.k = fused.get() + width;
  params.v = fused.get() + 2 * width;
  params.qkv_token_stride = token_stride;
  return err;
}

// Expects the slots of `pool` ([num_slots, H, D, D], after a call) that no sequence of `p` uses
// to be bit-identical to p.pool.
inline void ExpectUntouchedKdaSlots(const KdaProblem& p, const std::vector<double>& pool) {
  for (int slot = 0; slot < p.num_slots; ++slot) {
    if (std::find(p.slots.begin(), p.slots.end(), slot) != p.slots.end()) continue;
    int64_t changed = 0;
    for (int64_t i = slot * p.state_size(); i < (slot + 1) * p.state_size(); ++i) {
      if (pool[i] != p.pool[i]) ++changed;
    }
    EXPECT_EQ(changed, 0) << "unused slot " << slot << " was written";
  }
}

// The tokens [from[n], from[n] + count[n]) of every sequence n of `p` as a problem of their own
// (same slots and parameters; the pool is copied, the caller decides which pool to use).
inline KdaProblem SliceKdaProblem(const KdaProblem& p, const std::vector<int64_t>& from,
                                  const std::vector<int64_t>& count) {
  KdaProblem s;
  s.num_heads = p.num_heads;
  s.head_dim = p.head_dim;
  s.num_slots = p.num_slots;
  s.slots = p.slots;
  s.a_log = p.a_log;
  s.dt_bias = p.dt_bias;
  s.pool = p.pool;
  s.lengths = count;
  const size_t width = static_cast<size_t>(p.num_heads) * p.head_dim;
  int64_t bos = 0;
  for (int n = 0; n < p.num_seqs(); ++n) {
    for (int64_t t = bos + from[n]; t < bos + from[n] + count[n]; ++t) {
      const auto append = [t](const std::vector<double>& src, std::vector<double>& dst, size_t w) {
        dst.insert(dst.end(), src.begin() + t * w, src.begin() + (t + 1) * w);
      };
      append(p.q, s.q, width);
      append(p.k, s.k, width);
      append(p.v, s.v, width);
      append(p.f, s.f, width);
      append(p.beta_logits, s.beta_logits, p.num_heads);
    }
    bos += p.lengths[n];
  }
  return s;
}

}  // namespace kls::testing

#endif  // KLS_TESTS_KERNELS_CUDA_KDA_TEST_INPUTS_H_

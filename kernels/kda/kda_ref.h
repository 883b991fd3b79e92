// CPU references for Kimi Delta Attention (KDA): gate, the token-by-token recurrence (decode)
// and the chunked algorithm with sub-chunk anchoring (prefill). Math: kernels/kda/README.md,
// KIMI_LINEAR.md §3–§4. Plain loops, fp64 accumulation; T is float or double.
//
// Layouts (row-major, tokens of all sequences packed along the first axis; sequence n owns
// tokens [cu_seqlens[n], cu_seqlens[n+1])):
//   q, k   [total_tokens, H, K]   L2-normalized already, q NOT yet scaled
//   v      [total_tokens, H, V]
//   g      [total_tokens, H, K]   per-channel log-decay, <= 0 (may be -inf-ish, e.g. -400)
//   beta   [total_tokens, H]      in (0, 1)
//   states N pointers, each [H, K, V], V contiguous (the snapshot layout): read as the initial
//          state, overwritten with the final state
//   out    [total_tokens, H, V]
#ifndef KLS_KERNELS_KDA_KDA_REF_H_
#define KLS_KERNELS_KDA_KDA_REF_H_

#include <cstdint>

namespace kls::kernels {

template <typename T>
struct KdaArgs {
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  const T* g = nullptr;
  const T* beta = nullptr;
  const int64_t* cu_seqlens = nullptr;  // [num_seqs + 1], cu_seqlens[0] == 0
  int64_t num_seqs = 0;
  int num_heads = 0;   // H
  int head_dim_k = 0;  // K
  int head_dim_v = 0;  // V
  double scale = 0;    // applied to q inside (K^-1/2 for the model)
  T* const* states = nullptr;
  T* out = nullptr;
};

// The KDA gate of Kimi-Linear-48B, no lower bound:
//   g[t, h*K + j] = -exp(a_log[h]) * softplus(f[t, h*K + j] + dt_bias[h*K + j]),
// softplus(x) = x for x > 20 (PyTorch threshold), else log1p(exp(x)).
//   f [num_tokens, H*K], a_log [H], dt_bias [H*K], g [num_tokens, H*K]
template <typename T>
void KdaGateReference(const T* f, const T* a_log, const T* dt_bias, int64_t num_tokens,
                      int num_heads, int head_dim, T* g);

// The recurrence of KIMI_LINEAR.md §3.6, one token at a time (the definition).
template <typename T>
void KdaRecurrentReference(const KdaArgs<T>& args);

// The chunked algorithm of §4.1 with chunk size `chunk_size` (64 in the model) and the
// sub-chunk anchoring of §4.2 (`sub_chunk_size` 16): every exponent evaluated is <= 0, so
// gates down to -400 per step stay finite. chunk_size must be a multiple of sub_chunk_size.
// Equals KdaRecurrentReference up to rounding.
template <typename T>
void KdaChunkReference(const KdaArgs<T>& args, int chunk_size = 64, int sub_chunk_size = 16);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_KDA_KDA_REF_H_

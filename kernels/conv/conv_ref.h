// CPU reference for the causal depthwise short convolution + SiLU of the KDA layer
// (KIMI_LINEAR.md §3.2). Plain loops, fp64 accumulation.
#ifndef KLS_KERNELS_CONV_CONV_REF_H_
#define KLS_KERNELS_CONV_CONV_REF_H_

#include <cstdint>

namespace kls::kernels {

// out[t, c] = SiLU( sum_{i=0..W-1} weight[c, i] * x[t - (W-1) + i, c] ), where inputs before the
// sequence start come from the sequence's conv state (the W-1 previous inputs, oldest first).
// After the call each conv state holds the last W-1 inputs of its sequence (pre-conv values),
// so a later call continues the sequence exactly.
//   x           [total_tokens, D]   packed sequences (cu_seqlens)
//   weight      [D, W]              tap W-1 multiplies the current token (PyTorch Conv1d [D,1,W])
//   cu_seqlens  [num_seqs + 1]
//   conv_states num_seqs pointers, each [W-1, D], oldest input first; zeros for a new sequence
//   out         [total_tokens, D]   must not alias x
template <typename T>
void CausalConv1dSiluReference(const T* x, const T* weight, const int64_t* cu_seqlens,
                               int64_t num_seqs, int64_t dim, int width, T* const* conv_states,
                               T* out);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_CONV_CONV_REF_H_

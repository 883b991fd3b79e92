// CUDA launcher for the short causal depthwise convolution + SiLU of the KDA layers
// (KIMI_LINEAR.md §3.2), over the fused q̂, k̂, v̂ streams of a packed varlen batch, with the
// per-sequence conv state read from and written back to a slot pool in place. One launcher
// serves prefill (any lengths) and decode (one token per sequence). CPU reference: conv_ref.h;
// layouts and limits: README.md.
//
// The launcher never synchronizes and never allocates; it returns cudaErrorInvalidValue for
// arguments it does not support (checked on the host before any launch) and otherwise the
// launch status.
#ifndef KLS_KERNELS_CONV_CONV_H_
#define KLS_KERNELS_CONV_CONV_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kls::kernels {

// Channel c = s·stream_dim + d is channel d of stream s (q̂, k̂, v̂ in the model: 3 streams of
// H·K channels). Sequence n owns tokens [cu_seqlens[n], cu_seqlens[n+1]).
//   out[t, c] = SiLU( Σ_{i<W} weight[c, i] · x[t − (W−1) + i, c] )
// where inputs before the sequence start come from the sequence's conv state (oldest first).
// Afterwards the state holds the last W−1 inputs (pre-conv) of the extended sequence: a sequence
// shorter than W−1 shifts its inputs in behind the newest old ones; an empty one keeps its state.
struct CausalConvParams {
  const __nv_bfloat16* x = nullptr;       // [total_tokens, C] pre-conv inputs, C contiguous
  const __nv_bfloat16* weight = nullptr;  // [C, W]; tap W−1 multiplies the current token
  // Conv state pool [num_slots, num_streams, W−1, stream_dim] bf16 (the snapshot layout
  // [3][W−1][H·K] per slot, oldest input first). Sequence n uses slot conv_slots[n], in place.
  __nv_bfloat16* conv_state = nullptr;
  const int32_t* conv_slots = nullptr;  // [num_seqs] device; distinct slots
  const int32_t* cu_seqlens = nullptr;  // [num_seqs + 1] device, cu_seqlens[0] == 0
  __nv_bfloat16* out = nullptr;         // [total_tokens, C]; must not overlap x or conv_state
  int num_seqs = 0;                     // N, 1 ..= 65535
  int64_t total_tokens = 0;             // == cu_seqlens[num_seqs] (host copy, for checks)
  int max_seqlen = 0;                   // >= every sequence's length (host copy, for grids)
  int num_streams = 0;                  // >= 1 (3 in the model)
  int stream_dim = 0;                   // channels per stream, a multiple of 8 (H·K)
  int width = 0;                        // W, 2 ..= 4 (4 in the model)
};

// Runs the convolution on `stream`. fp32 accumulation; out and the state are rounded to bf16.
// Fails with cudaErrorInvalidValue (nothing launched) on a null pointer, num_seqs outside
// [1, 65535], negative sizes, width outside [2, 4], stream_dim not a positive multiple of 8,
// x / out / conv_state / weight not 16-byte aligned, or out overlapping x. Returns cudaSuccess
// without launching when total_tokens == 0.
cudaError_t LaunchCausalConv1dSilu(const CausalConvParams& params, cudaStream_t stream);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_CONV_CONV_H_

// CUDA launchers for Kimi Delta Attention (KDA): chunked prefill and recurrent decode, both with
// the exact Kimi-Linear-48B fusions inside the kernel (KIMI_LINEAR.md §3.4–§3.6):
//   g    = −exp(a_log[h]) · softplus(f + dt_bias)     no lower bound (−400 per step is legal)
//   q, k = L2-normalized per head (eps 1e-6 inside the sqrt), q then multiplied by `scale`
//   β    = sigmoid(beta_logits)
// Math and derivations: kernels/kda/README.md. CPU references: kda_ref.h.
//
// Launchers never synchronize and never allocate; they return cudaErrorInvalidValue for
// arguments they do not support (checked on the host before any launch) and otherwise the
// launch status. Tensors are row-major; tokens of all sequences are packed along the first axis
// (sequence n owns rows [cu_seqlens[n], cu_seqlens[n+1])).
#ifndef KLS_KERNELS_KDA_KDA_H_
#define KLS_KERNELS_KDA_KDA_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kls::kernels {

struct KdaParams {
  // q, k, v rows are qkv_token_stride elements apart (the conv output [T, 3·H·K] holds them
  // side by side); heads within a row are contiguous.
  const __nv_bfloat16* q = nullptr;            // [total_tokens, H, K]  post-conv, pre-L2-norm
  const __nv_bfloat16* k = nullptr;            // [total_tokens, H, K]  post-conv, pre-L2-norm
  const __nv_bfloat16* v = nullptr;            // [total_tokens, H, V]
  int64_t qkv_token_stride = 0;                // >= H·K, a multiple of 8; 0 means H·K
  const __nv_bfloat16* f = nullptr;            // [total_tokens, H, K]  gate pre-activation
  const __nv_bfloat16* beta_logits = nullptr;  // [total_tokens, H]     pre-sigmoid
  const float* a_log = nullptr;                // [H]
  const float* dt_bias = nullptr;              // [H, K]
  const int32_t* cu_seqlens = nullptr;         // [num_seqs + 1] device, cu_seqlens[0] == 0
  // State pool [num_slots, H, K, V] fp32, V contiguous (the snapshot layout). Sequence n reads
  // its initial state from slot state_slots[n] and leaves its final state there (in place).
  float* state_pool = nullptr;
  const int32_t* state_slots = nullptr;  // [num_seqs] device; distinct slots
  __nv_bfloat16* out = nullptr;          // [total_tokens, H, V]
  int num_seqs = 0;                      // N >= 1
  int64_t total_tokens = 0;              // == cu_seqlens[num_seqs] (host copy, for grids)
  int max_seqlen = 0;                    // >= every sequence's length (host copy, for grids)
  int num_heads = 0;                     // H
  int head_dim = 0;                      // K == V; 64 or 128
  float scale = 0.f;                     // K^-1/2 for the model
};

// Workspace the chunk launcher needs for these sizes (bytes, 256-byte aligned). Depends only
// on the host-side sizes in `params`.
size_t KdaChunkWorkspaceBytes(const KdaParams& params);

// Prefill: the chunked algorithm (C = 64, sub-chunk anchoring) over any sequence lengths.
// `workspace` must hold KdaChunkWorkspaceBytes(params) bytes on the device.
cudaError_t LaunchKdaChunk(const KdaParams& params, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

// Decode: the recurrence token by token; meant for a few tokens per sequence (any count works).
cudaError_t LaunchKdaRecurrent(const KdaParams& params, cudaStream_t stream);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_KDA_KDA_H_

// C ABI over the KDA launchers for bench/kda_bench.py (ctypes). Every pointer is a raw device
// pointer (a torch tensor's data_ptr()) in the layouts of kernels/kda/kda.h; `stream` is a
// cudaStream_t (torch.cuda.Stream.cuda_stream). Functions return a cudaError_t value (0 on
// success) and never synchronize. Not for production use: the engine calls kda.h directly.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/kda/kda.h"
#include "kernels/kda/kda_chunk_tuning.h"

namespace {

kls::kernels::KdaParams MakeParams(const void* q, const void* k, const void* v, const void* f,
                                   const void* beta_logits, const void* a_log, const void* dt_bias,
                                   const void* cu_seqlens, void* state_pool,
                                   const void* state_slots, void* out, int num_seqs,
                                   int64_t total_tokens, int max_seqlen, int num_heads,
                                   int head_dim, float scale) {
  kls::kernels::KdaParams p;
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.k = static_cast<const __nv_bfloat16*>(k);
  p.v = static_cast<const __nv_bfloat16*>(v);
  p.f = static_cast<const __nv_bfloat16*>(f);
  p.beta_logits = static_cast<const __nv_bfloat16*>(beta_logits);
  p.a_log = static_cast<const float*>(a_log);
  p.dt_bias = static_cast<const float*>(dt_bias);
  p.cu_seqlens = static_cast<const int32_t*>(cu_seqlens);
  p.state_pool = static_cast<float*>(state_pool);
  p.state_slots = static_cast<const int32_t*>(state_slots);
  p.out = static_cast<__nv_bfloat16*>(out);
  p.num_seqs = num_seqs;
  p.total_tokens = total_tokens;
  p.max_seqlen = max_seqlen;
  p.num_heads = num_heads;
  p.head_dim = head_dim;
  p.scale = scale;
  return p;
}

}  // namespace

extern "C" {

// Workspace bytes LaunchKdaChunk needs (0 for unsupported shapes).
uint64_t kls_kda_chunk_workspace_bytes(int num_seqs, int64_t total_tokens, int num_heads,
                                       int head_dim) {
  kls::kernels::KdaParams p;
  p.num_seqs = num_seqs;
  p.total_tokens = total_tokens;
  p.num_heads = num_heads;
  p.head_dim = head_dim;
  return kls::kernels::KdaChunkWorkspaceBytes(p);
}

// LaunchKdaChunk (state_tile_v = 0) or LaunchKdaChunkWithStateTile (32, 64). cu_seqlens and
// state_slots are int32 device arrays.
int kls_kda_chunk(const void* q, const void* k, const void* v, const void* f,
                  const void* beta_logits, const void* a_log, const void* dt_bias,
                  const void* cu_seqlens, void* state_pool, const void* state_slots, void* out,
                  int num_seqs, int64_t total_tokens, int max_seqlen, int num_heads, int head_dim,
                  float scale, int state_tile_v, void* workspace, uint64_t workspace_bytes,
                  void* stream) {
  const kls::kernels::KdaParams p =
      MakeParams(q, k, v, f, beta_logits, a_log, dt_bias, cu_seqlens, state_pool, state_slots, out,
                 num_seqs, total_tokens, max_seqlen, num_heads, head_dim, scale);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(state_tile_v == 0
                              ? kls::kernels::LaunchKdaChunk(p, workspace, workspace_bytes, s)
                              : kls::kernels::LaunchKdaChunkWithStateTile(
                                    p, workspace, workspace_bytes, state_tile_v, s));
}

// LaunchKdaRecurrent (decode).
int kls_kda_recurrent(const void* q, const void* k, const void* v, const void* f,
                      const void* beta_logits, const void* a_log, const void* dt_bias,
                      const void* cu_seqlens, void* state_pool, const void* state_slots, void* out,
                      int num_seqs, int64_t total_tokens, int max_seqlen, int num_heads,
                      int head_dim, float scale, void* stream) {
  const kls::kernels::KdaParams p =
      MakeParams(q, k, v, f, beta_logits, a_log, dt_bias, cu_seqlens, state_pool, state_slots, out,
                 num_seqs, total_tokens, max_seqlen, num_heads, head_dim, scale);
  return static_cast<int>(kls::kernels::LaunchKdaRecurrent(p, static_cast<cudaStream_t>(stream)));
}

const char* kls_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // extern "C"

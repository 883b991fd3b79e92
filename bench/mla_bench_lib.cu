// C ABI over the MLA launchers for bench/mla_bench.py (ctypes). Every pointer is a raw device
// pointer (a torch tensor's data_ptr()) in the layouts of kernels/mla/mla.h; strides are in
// elements; `stream` is a cudaStream_t (torch.cuda.Stream.cuda_stream). Functions return a
// cudaError_t value (0 on success) and never synchronize. Not for production use: the engine
// calls mla.h directly.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/mla/mla.h"

namespace {

using bf16 = __nv_bfloat16;

kls::kernels::MlaDecodeParams MakeDecodeParams(const void* q_latent, const void* q_pe,
                                               const void* cache_pages, const void* block_table,
                                               int max_pages_per_seq, const void* seq_lens,
                                               void* out_latent, int num_seqs, int num_heads,
                                               int head_dim_latent, int head_dim_rope,
                                               int page_size, int max_seq_len, float scale,
                                               int64_t num_pages, int num_splits) {
  kls::kernels::MlaDecodeParams p;
  p.q_latent = static_cast<const bf16*>(q_latent);
  p.q_pe = static_cast<const bf16*>(q_pe);
  p.cache_pages = static_cast<const bf16*>(cache_pages);
  p.block_table = static_cast<const int32_t*>(block_table);
  p.max_pages_per_seq = max_pages_per_seq;
  p.seq_lens = static_cast<const int32_t*>(seq_lens);
  p.out_latent = static_cast<bf16*>(out_latent);
  p.num_seqs = num_seqs;
  p.num_heads = num_heads;
  p.head_dim_latent = head_dim_latent;
  p.head_dim_rope = head_dim_rope;
  p.page_size = page_size;
  p.max_seq_len = max_seq_len;
  p.scale = scale;
  p.num_pages = num_pages;
  p.num_splits = num_splits;
  return p;
}

}  // namespace

extern "C" {

// LaunchMlaPrefill. cu_seqlens_q / cu_seqlens_k are int32 device arrays.
int kls_mla_prefill(const void* q, int64_t q_token_stride, int64_t q_head_stride, const void* k,
                    int64_t k_token_stride, int64_t k_head_stride, const void* v,
                    int64_t v_token_stride, int64_t v_head_stride, void* out,
                    const void* cu_seqlens_q, const void* cu_seqlens_k, int num_seqs,
                    int max_seqlen_q, int64_t total_q, int num_heads, int head_dim_qk,
                    int head_dim_v, float scale, void* stream) {
  kls::kernels::MlaPrefillParams p;
  p.q = static_cast<const bf16*>(q);
  p.q_token_stride = q_token_stride;
  p.q_head_stride = q_head_stride;
  p.k = static_cast<const bf16*>(k);
  p.k_token_stride = k_token_stride;
  p.k_head_stride = k_head_stride;
  p.v = static_cast<const bf16*>(v);
  p.v_token_stride = v_token_stride;
  p.v_head_stride = v_head_stride;
  p.out = static_cast<bf16*>(out);
  p.cu_seqlens_q = static_cast<const int32_t*>(cu_seqlens_q);
  p.cu_seqlens_k = static_cast<const int32_t*>(cu_seqlens_k);
  p.num_seqs = num_seqs;
  p.max_seqlen_q = max_seqlen_q;
  p.total_q = total_q;
  p.num_heads = num_heads;
  p.head_dim_qk = head_dim_qk;
  p.head_dim_v = head_dim_v;
  p.scale = scale;
  return static_cast<int>(kls::kernels::LaunchMlaPrefill(p, static_cast<cudaStream_t>(stream)));
}

// MlaDecodeNumSplits (0 for unsupported shapes).
int kls_mla_decode_num_splits(int num_seqs, int num_heads, int head_dim_latent, int head_dim_rope,
                              int page_size, int max_pages_per_seq, int max_seq_len,
                              int64_t num_pages, int num_splits) {
  const kls::kernels::MlaDecodeParams p = MakeDecodeParams(
      nullptr, nullptr, nullptr, nullptr, max_pages_per_seq, nullptr, nullptr, num_seqs, num_heads,
      head_dim_latent, head_dim_rope, page_size, max_seq_len, 1.f, num_pages, num_splits);
  return kls::kernels::MlaDecodeNumSplits(p);
}

// MlaDecodeWorkspaceBytes (0 with one split or for unsupported shapes).
uint64_t kls_mla_decode_workspace_bytes(int num_seqs, int num_heads, int head_dim_latent,
                                        int head_dim_rope, int page_size, int max_pages_per_seq,
                                        int max_seq_len, int64_t num_pages, int num_splits) {
  const kls::kernels::MlaDecodeParams p = MakeDecodeParams(
      nullptr, nullptr, nullptr, nullptr, max_pages_per_seq, nullptr, nullptr, num_seqs, num_heads,
      head_dim_latent, head_dim_rope, page_size, max_seq_len, 1.f, num_pages, num_splits);
  return kls::kernels::MlaDecodeWorkspaceBytes(p);
}

// LaunchMlaDecode. block_table and seq_lens are int32 device arrays.
int kls_mla_decode(const void* q_latent, const void* q_pe, const void* cache_pages,
                   const void* block_table, int max_pages_per_seq, const void* seq_lens,
                   void* out_latent, int num_seqs, int num_heads, int head_dim_latent,
                   int head_dim_rope, int page_size, int max_seq_len, float scale,
                   int64_t num_pages, int num_splits, void* workspace, uint64_t workspace_bytes,
                   void* stream) {
  const kls::kernels::MlaDecodeParams p =
      MakeDecodeParams(q_latent, q_pe, cache_pages, block_table, max_pages_per_seq, seq_lens,
                       out_latent, num_seqs, num_heads, head_dim_latent, head_dim_rope, page_size,
                       max_seq_len, scale, num_pages, num_splits);
  return static_cast<int>(kls::kernels::LaunchMlaDecode(p, workspace, workspace_bytes,
                                                        static_cast<cudaStream_t>(stream)));
}

const char* kls_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // extern "C"

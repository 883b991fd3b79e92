// CUDA launchers for MLA attention (KIMI_LINEAR.md §5; math in kernels/mla/README.md; CPU
// references in mla_ref.h):
//   prefill   causal, non-absorbed attention over decompressed keys/values, varlen, flash-style
//             (online softmax; the T×T score matrix never exists in memory);
//   decode    absorbed attention of one query per sequence over the PAGED latent cache (MQA form:
//             a 576-wide key and a 512-wide value shared by all heads), split along the context
//             and merged by a second pass;
//   append    writes new tokens' latent rows into their cache pages.
//
// Launchers never synchronize and never allocate; they return cudaErrorInvalidValue for
// arguments they do not support (checked on the host before any launch) and otherwise the
// launch status. They are safe to capture into a CUDA graph (after one eager call per device and
// shape class, which configures the kernels' shared-memory limits). Not thread-safe with respect
// to the stream they are given; different streams may be used from different threads.
#ifndef KLS_KERNELS_MLA_MLA_H_
#define KLS_KERNELS_MLA_MLA_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kls::kernels {

// Causal prefill. Sequence n owns query rows [cu_seqlens_q[n], cu_seqlens_q[n+1]) and key/value
// rows [cu_seqlens_k[n], cu_seqlens_k[n+1]); with len_q ≤ len_k its queries are the LAST len_q
// positions of its len_k keys: local query i attends to local keys 0 .. len_k − len_q + i
// (chunked prefill over an existing context; len_q == len_k is a plain causal prefill). Strides
// are in elements, so q/k/v may be views into wider projection outputs; each head's vector is
// contiguous.
struct MlaPrefillParams {
  const __nv_bfloat16* q = nullptr;  // [total_q, H, Dqk] at q[t·q_token_stride + h·q_head_stride]
  int64_t q_token_stride = 0;
  int64_t q_head_stride = 0;
  const __nv_bfloat16* k = nullptr;  // [total_k, H, Dqk] at k[t·k_token_stride + h·k_head_stride]
  int64_t k_token_stride = 0;
  int64_t k_head_stride = 0;
  const __nv_bfloat16* v = nullptr;  // [total_k, H, Dv] at v[t·v_token_stride + h·v_head_stride]
  int64_t v_token_stride = 0;
  int64_t v_head_stride = 0;
  __nv_bfloat16* out = nullptr;           // [total_q, H, Dv] contiguous
  const int32_t* cu_seqlens_q = nullptr;  // [num_seqs + 1] device, cu_seqlens_q[0] == 0
  const int32_t* cu_seqlens_k = nullptr;  // [num_seqs + 1] device, cu_seqlens_k[0] == 0
  int num_seqs = 0;                       // N ≥ 1
  int max_seqlen_q = 0;                   // ≥ every len_q (host copy, for the grid)
  int64_t total_q = 0;                    // == cu_seqlens_q[N] (host copy)
  int num_heads = 0;                      // H
  int head_dim_qk = 0;                    // Dqk (Dn + Dr): 192 or 48
  int head_dim_v = 0;                     // Dv: 128 or 32
  float scale = 0.f;                      // softmax scale, e.g. Dqk^-1/2
};

// Runs the prefill. Supported (Dqk, Dv): (192, 128) (Kimi-Linear-48B and the mid preset) and
// (48, 32) (the tiny preset). Returns cudaErrorInvalidValue for other dims, N < 1, H < 1,
// max_seqlen_q < 0, a non-finite scale, null pointers (when total_q > 0), base pointers not
// 16-byte aligned or strides not multiples of 8 elements. total_q == 0 launches nothing.
// Trusted (device data): cu_seqlens non-decreasing, len_q ≤ max_seqlen_q, len_q ≤ len_k, rows
// inside the tensors; a sequence with len_q > len_k gets zeros for the queries that see no key.
cudaError_t LaunchMlaPrefill(const MlaPrefillParams& params, cudaStream_t stream);

// Absorbed decode: one query token per sequence attends to all seq_lens[n] rows of its cache.
// Per head h (q_lat = W_UK^hᵀ q_nope^h, computed by the engine):
//   s(τ) = scale · (q_latent^h · c_τ + q_pe^h · kpe_τ),   out_latent^h = Σ_τ softmax(s)(τ) c_τ
// (the engine applies W_UV^h afterwards). Token τ of sequence n lives in page
// block_table[n][τ / page_size], row τ % page_size.
struct MlaDecodeParams {
  const __nv_bfloat16* q_latent = nullptr;     // [N, H, Dc] contiguous
  const __nv_bfloat16* q_pe = nullptr;         // [N, H, Dr] contiguous
  const __nv_bfloat16* cache_pages = nullptr;  // [num_pages, page_size, Dc + Dr]: c then kpe
  const int32_t* block_table = nullptr;        // [N, max_pages_per_seq] page ids
  int max_pages_per_seq = 0;
  const int32_t* seq_lens = nullptr;    // [N] device: cache rows per sequence (new token included)
  __nv_bfloat16* out_latent = nullptr;  // [N, H, Dc] contiguous
  int num_seqs = 0;                     // N ≥ 1
  int num_heads = 0;                    // H ≥ 1
  int head_dim_latent = 0;              // Dc: 512, 256 or 64
  int head_dim_rope = 0;                // Dr: 64 (with Dc 512 or 256) or 16 (with Dc 64)
  int page_size = 0;                    // a multiple of 16, ≤ 256
  int max_seq_len = 0;                  // host upper bound of seq_lens; sizes the split count
  float scale = 0.f;                    // softmax scale (the model: 1/sqrt(Dn + Dr))
  int64_t num_pages = 0;                // pages in cache_pages; ids outside are never read
  int num_splits = 0;                   // context splits per sequence; 0 = choose (below)
};

// Context splits per sequence the launcher uses for these sizes on the current device: the
// caller's num_splits when > 0, else a count chosen from N, H, max_seq_len and the SM count
// (it fills the GPU at B = 1 and long contexts). Depends only on host-side sizes, so a captured
// launch stays valid while seq_lens change on the device. 0 for unsupported shapes.
int MlaDecodeNumSplits(const MlaDecodeParams& params);

// Workspace bytes LaunchMlaDecode needs (fp32 partial outputs and log-sum-exps per split; 0 with
// one split, which writes out_latent directly). 0 also for unsupported shapes, which the
// launcher rejects.
size_t MlaDecodeWorkspaceBytes(const MlaDecodeParams& params);

// Runs the decode (one kernel, plus a combine kernel when there are ≥ 2 splits). `workspace`
// (16-byte aligned) must hold MlaDecodeWorkspaceBytes(params) bytes. Returns
// cudaErrorInvalidValue for unsupported dims or page sizes, N < 1 or > 65535, H < 1,
// max_seq_len < 0, max_pages_per_seq < 1, max_pages_per_seq·page_size ≥ 2³¹, num_pages < 1,
// num_pages·page_size ≥ 2³¹ (the pool is one TMA tensor of int32-indexed rows),
// num_splits < 0 or > 1024, a non-finite scale, null pointers, misaligned pointers (cache_pages
// and out_latent 16 bytes, q_latent and q_pe 4 bytes) or a short workspace;
// cudaErrorNotSupported when the driver offers no cuTensorMapEncodeTiled (the kernel loads the
// pool by TMA). Device data is clamped, never trusted for addressing: seq_lens to
// [0, max_pages_per_seq·page_size]; rows in a page with an id outside [0, num_pages) read as
// zeros. A sequence with seq_lens 0 gets zeros.
cudaError_t LaunchMlaDecode(const MlaDecodeParams& params, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream);

// Writes the rows of new tokens into the paged cache: row i of sequence n (i < len_n, with
// len_n = cu_seqlens[n+1] − cu_seqlens[n]) goes to cache position p = seq_starts[n] + i, i.e.
// page block_table[n][p / page_size], row p % page_size. Nothing else in the pool is written.
struct MlaCacheAppendParams {
  const __nv_bfloat16* rows = nullptr;   // [total_new, row_dim] at rows[t·row_stride]
  int64_t row_stride = 0;                // elements between consecutive tokens' rows
  __nv_bfloat16* cache_pages = nullptr;  // [num_pages, page_size, row_dim]
  int64_t num_pages = 0;
  const int32_t* block_table = nullptr;  // [N, max_pages_per_seq] page ids
  int max_pages_per_seq = 0;
  const int32_t* seq_starts = nullptr;  // [N] device: cache position of each first new token
  const int32_t* cu_seqlens = nullptr;  // [N + 1] device: new tokens per sequence, from 0
  int num_seqs = 0;                     // N ≥ 1
  int64_t total_new = 0;                // == cu_seqlens[N] (host copy, for the grid)
  int row_dim = 0;                      // Dc + Dr, a multiple of 8
  int page_size = 0;                    // ≥ 1
};

// Returns cudaErrorInvalidValue for N < 1, row_dim not a positive multiple of 8, page_size < 1,
// max_pages_per_seq < 1, num_pages < 1, row_stride < row_dim or not a multiple of 8, null or
// misaligned (16 bytes) pointers; total_new == 0 launches nothing. Device data is guarded: a
// token whose position is negative, past max_pages_per_seq·page_size, or in a page id outside
// [0, num_pages) is not written.
cudaError_t LaunchMlaCacheAppend(const MlaCacheAppendParams& params, cudaStream_t stream);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_MLA_MLA_H_

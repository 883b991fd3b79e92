// CUDA launchers for row gathers: the token embedding (table lookup with device-side id
// validation) and the lm_head row selection (the last position of each sequence, from
// cu_seqlens). CPU references: embed_ref.h; layouts and limits: README.md.
//
// All matrices are bf16, row-major with a row stride in elements; a gather copies rows bit for
// bit. Launchers never synchronize and never allocate; they return cudaErrorInvalidValue (nothing
// launched) for a null pointer, a negative count, dim < 1 or > 2³⁰, or a row stride < dim, and
// otherwise the launch status. A count of 0 launches nothing and returns cudaSuccess (pointers
// unused). Source and destination must not overlap. 16-byte aligned rows (pointers and strides)
// with dim % 8 == 0 take a vectorized path; anything else works too.
#ifndef KLS_KERNELS_EMBED_EMBED_H_
#define KLS_KERNELS_EMBED_EMBED_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kls::kernels {

// out[t, :] = table[ids[t], :] for t < num_tokens. An id outside [0, vocab_size) is not read: its
// output row is zero-filled and *error_flag is set to 1 (the host validates ids too; this is
// defense in depth). The flag is never cleared by the kernel: the caller zeroes it and may check
// it after any number of launches (CUDA-graph friendly).
//   table [vocab_size, dim] dense; ids [num_tokens] int32 (device); out [num_tokens, dim] dense;
//   error_flag: one int32 on the device
cudaError_t LaunchEmbeddingGather(const __nv_bfloat16* table, int64_t vocab_size, int dim,
                                  const int32_t* ids, int64_t num_tokens, __nv_bfloat16* out,
                                  int32_t* error_flag, cudaStream_t stream);

// dst[r, :] = src[row_indices[r], :] for r < num_rows (e.g. the final hidden state of the last
// position of each sequence, before the final norm and lm_head). An index outside
// [0, num_src_rows) (such as the -1 LaunchLastRowIndices writes for an empty sequence) gives a
// zero row and sets *error_flag to 1, as above.
//   src: row i at src + i·src_row_stride, i < num_src_rows; row_indices [num_rows] int32 (device);
//   dst: row r at dst + r·dst_row_stride; error_flag: one int32 on the device
cudaError_t LaunchGatherRows(const __nv_bfloat16* src, int64_t src_row_stride, int64_t num_src_rows,
                             int dim, const int32_t* row_indices, int64_t num_rows,
                             __nv_bfloat16* dst, int64_t dst_row_stride, int32_t* error_flag,
                             cudaStream_t stream);

// indices[n] = cu_seqlens[n + 1] − 1 (the packed row of sequence n's last token) for n < num_seqs,
// or −1 when sequence n is empty (cu_seqlens[n + 1] <= cu_seqlens[n]).
//   cu_seqlens [num_seqs + 1] int32 (device); indices [num_seqs] int32 (device)
cudaError_t LaunchLastRowIndices(const int32_t* cu_seqlens, int num_seqs, int32_t* indices,
                                 cudaStream_t stream);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_EMBED_EMBED_H_

// CPU references for the row gathers of embed.h: embedding lookup, row gather, last-row indices.
#ifndef KLS_KERNELS_EMBED_EMBED_REF_H_
#define KLS_KERNELS_EMBED_EMBED_REF_H_

#include <cstdint>

namespace kls::kernels {

// out[t, :] = table[ids[t], :]; an id outside [0, vocab_size) gives a zero row. Returns true when
// every id was in range.
//   table [vocab_size, dim]; ids [num_tokens]; out [num_tokens, dim]
template <typename T>
bool EmbeddingGatherReference(const T* table, int64_t vocab_size, int64_t dim, const int32_t* ids,
                              int64_t num_tokens, T* out);

// dst[r·dst_row_stride + j] = src[row_indices[r]·src_row_stride + j] for j < dim; an index outside
// [0, num_src_rows) gives a zero row. Returns true when every index was in range.
template <typename T>
bool GatherRowsReference(const T* src, int64_t src_row_stride, int64_t num_src_rows, int64_t dim,
                         const int32_t* row_indices, int64_t num_rows, T* dst,
                         int64_t dst_row_stride);

// indices[n] = cu_seqlens[n + 1] − 1, or −1 when cu_seqlens[n + 1] <= cu_seqlens[n].
//   cu_seqlens [num_seqs + 1]; indices [num_seqs]
void LastRowIndicesReference(const int32_t* cu_seqlens, int64_t num_seqs, int32_t* indices);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_EMBED_EMBED_REF_H_

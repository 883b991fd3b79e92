// CPU references for the row gathers of embed.h (see embed_ref.h).
#include "kernels/embed/embed_ref.h"

#include <cstdint>

namespace kls::kernels {

template <typename T>
bool GatherRowsReference(const T* src, int64_t src_row_stride, int64_t num_src_rows, int64_t dim,
                         const int32_t* row_indices, int64_t num_rows, T* dst,
                         int64_t dst_row_stride) {
  bool all_valid = true;
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t index = row_indices[r];
    T* out = dst + r * dst_row_stride;
    const bool valid = index >= 0 && index < num_src_rows;
    all_valid = all_valid && valid;
    for (int64_t j = 0; j < dim; ++j) out[j] = valid ? src[index * src_row_stride + j] : T{};
  }
  return all_valid;
}

template <typename T>
bool EmbeddingGatherReference(const T* table, int64_t vocab_size, int64_t dim, const int32_t* ids,
                              int64_t num_tokens, T* out) {
  return GatherRowsReference(table, dim, vocab_size, dim, ids, num_tokens, out, dim);
}

void LastRowIndicesReference(const int32_t* cu_seqlens, int64_t num_seqs, int32_t* indices) {
  for (int64_t n = 0; n < num_seqs; ++n) {
    indices[n] = cu_seqlens[n + 1] > cu_seqlens[n] ? cu_seqlens[n + 1] - 1 : -1;
  }
}

// float / double for numeric tests; uint16_t for bf16 bit patterns.
template bool GatherRowsReference<float>(const float*, int64_t, int64_t, int64_t, const int32_t*,
                                         int64_t, float*, int64_t);
template bool GatherRowsReference<double>(const double*, int64_t, int64_t, int64_t, const int32_t*,
                                          int64_t, double*, int64_t);
template bool GatherRowsReference<uint16_t>(const uint16_t*, int64_t, int64_t, int64_t,
                                            const int32_t*, int64_t, uint16_t*, int64_t);
template bool EmbeddingGatherReference<float>(const float*, int64_t, int64_t, const int32_t*,
                                              int64_t, float*);
template bool EmbeddingGatherReference<double>(const double*, int64_t, int64_t, const int32_t*,
                                               int64_t, double*);
template bool EmbeddingGatherReference<uint16_t>(const uint16_t*, int64_t, int64_t, const int32_t*,
                                                 int64_t, uint16_t*);

}  // namespace kls::kernels

// Tuning entry point of the KDA chunk kernel, for benchmarks and tests: LaunchKdaChunk with the
// width of the state kernel's value tiles forced instead of chosen by the launcher.
#ifndef KLS_KERNELS_KDA_KDA_CHUNK_TUNING_H_
#define KLS_KERNELS_KDA_KDA_CHUNK_TUNING_H_

#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/kda/kda.h"

namespace kls::kernels {

// LaunchKdaChunk, with state_tile_v value columns per state CTA: 32, 64, or 0 for the launcher's
// own choice (what LaunchKdaChunk does). Other values: cudaErrorInvalidValue, nothing launched.
cudaError_t LaunchKdaChunkWithStateTile(const KdaParams& params, void* workspace,
                                        size_t workspace_bytes, int state_tile_v,
                                        cudaStream_t stream);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_KDA_KDA_CHUNK_TUNING_H_

// MoE alignment (LaunchMoeAlign, moe.h): groups the T·K (token, slot) pairs by expert on the
// device — vLLM's moe_align_block_size, made stable — so that every M tile of the expert GEMMs
// belongs to one expert.
//
// Algorithm. The pairs are cut into chunks of kAlignChunk = 4096, one CTA (256 threads) each.
//   count   (only when there are ≥ 2 chunks) each CTA histograms its chunk into
//           block_counts[chunk][e] with shared-memory atomics.
//   scatter each CTA sums block_counts over all chunks (count_e) and over the chunks before its
//           own (its first row inside expert e), scans the padded counts ⌈count_e / tile⌉·tile
//           over the experts (offsets), and then ranks its pairs in 256-pair rounds: within a
//           warp by __match_any_sync (lanes with the same expert), across the 8 warps by
//           per-warp counts in shared memory. Row = offsets[e] + pairs of e in earlier chunks,
//           rounds and warps + rank in warp, so each expert's pairs stay in ascending pair order
//           and the result does not depend on scheduling. CTA 0 writes offsets, counts and the
//           tile count; the warps of all CTAs share out the experts' tile_experts entries and
//           the −1 padding rows.
// With a single chunk one CTA does everything in one kernel (decode: T·K ≤ 4096).
//
// Shared memory: ~23 KB (E ≤ kMoeMaxExperts = 512). Ids outside [0, E) are skipped.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>

#include "kernels/moe/moe.h"
#include "kernels/moe/moe_internal.h"

namespace kls::kernels {
namespace {

using moe_internal::kAlignChunk;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr size_t kSectionAlign = 256;

size_t AlignUp(size_t bytes) { return (bytes + kSectionAlign - 1) / kSectionAlign * kSectionAlign; }

struct Sizes {
  int64_t num_pairs = 0;
  int64_t max_tiles = 0;
  int64_t max_rows = 0;
  int64_t num_chunks = 0;
};

// Host-side validation and the derived sizes; false when unsupported.
bool ComputeSizes(int64_t num_tokens, int num_experts, int top_k, int tile_rows, Sizes* s) {
  if (num_tokens < 0 || num_experts < 1 || num_experts > kMoeMaxExperts || top_k < 1 ||
      top_k > kMoeMaxTopK || tile_rows < 1 || tile_rows > kMoeMaxTileRows) {
    return false;
  }
  // Pair indices, rows and the kernels' loop counters stay below 2^31.
  const int64_t headroom = int64_t{INT_MAX} - int64_t{num_experts} * tile_rows - kAlignChunk;
  if (num_tokens > headroom / top_k) return false;
  s->num_pairs = num_tokens * top_k;
  // Σ_e ⌈count_e / tile⌉ ≤ (pairs + nonempty·(tile − 1)) / tile with nonempty ≤ min(E, pairs).
  const int64_t nonempty = std::min<int64_t>(num_experts, s->num_pairs);
  s->max_tiles = (s->num_pairs + nonempty * (tile_rows - 1)) / tile_rows;
  s->max_rows = s->max_tiles * tile_rows;
  s->num_chunks = (s->num_pairs + kAlignChunk - 1) / kAlignChunk;
  return true;
}

struct Layout {
  size_t offsets, counts, num_tiles, tile_experts, sorted_pairs, block_counts, total;
};

Layout ComputeLayout(const Sizes& s, int num_experts) {
  Layout l{};
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const size_t here = at;
    at += AlignUp(bytes);
    return here;
  };
  l.offsets = take(sizeof(int32_t) * (num_experts + 1));
  l.counts = take(sizeof(int32_t) * num_experts);
  l.num_tiles = take(sizeof(int32_t));
  l.tile_experts = take(sizeof(int32_t) * s.max_tiles);
  l.sorted_pairs = take(sizeof(int32_t) * s.max_rows);
  l.block_counts = take(s.num_chunks > 1 ? sizeof(int32_t) * s.num_chunks * num_experts : 0);
  l.total = at;
  return l;
}

struct AlignArgs {
  const int32_t* expert_ids;
  int32_t num_pairs;
  int num_experts;
  int tile_rows;
  int32_t* sorted_pairs;
  int32_t* tile_experts;
  int32_t* expert_offsets;
  int32_t* expert_counts;
  int32_t* num_tiles;
  int32_t* block_counts;  // [num_chunks, E]; unused with one chunk
};

__device__ __forceinline__ int ChunkEnd(const AlignArgs& a) {
  return static_cast<int>(
      min(static_cast<int64_t>(blockIdx.x + 1) * kAlignChunk, static_cast<int64_t>(a.num_pairs)));
}

__device__ __forceinline__ bool ValidExpert(int e, int num_experts) {
  return e >= 0 && e < num_experts;
}

__global__ void __launch_bounds__(kThreads) MoeAlignCountKernel(AlignArgs a) {
  __shared__ int hist[kMoeMaxExperts];
  for (int e = threadIdx.x; e < a.num_experts; e += kThreads) hist[e] = 0;
  __syncthreads();
  const int end = ChunkEnd(a);
  for (int p = blockIdx.x * kAlignChunk + threadIdx.x; p < end; p += kThreads) {
    const int e = a.expert_ids[p];
    if (ValidExpert(e, a.num_experts)) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < a.num_experts; e += kThreads) {
    a.block_counts[static_cast<int64_t>(blockIdx.x) * a.num_experts + e] = hist[e];
  }
}

template <bool kSingleChunk>
__global__ void __launch_bounds__(kThreads) MoeAlignScatterKernel(AlignArgs a) {
  __shared__ int total[kMoeMaxExperts];        // count_e
  __shared__ int running[kMoeMaxExperts];      // this CTA's next row for expert e
  __shared__ int offsets[kMoeMaxExperts + 1];  // padded exclusive prefix sum
  __shared__ int warp_counts[kWarps][kMoeMaxExperts];
  __shared__ int warp_sums[kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int num_experts = a.num_experts, tile = a.tile_rows;

  // 1. count_e, and this CTA's pairs of e that precede its chunk.
  for (int e = tid; e < num_experts; e += kThreads) {
    int before = 0, after = 0;
    if constexpr (!kSingleChunk) {
      const int chunks = gridDim.x;
      for (int b = 0; b < chunks; ++b) {
        const int c = a.block_counts[static_cast<int64_t>(b) * num_experts + e];
        if (b < static_cast<int>(blockIdx.x)) {
          before += c;
        } else {
          after += c;
        }
      }
    }
    total[e] = before + after;
    running[e] = before;
    for (int w = 0; w < kWarps; ++w) warp_counts[w][e] = 0;
  }
  __syncthreads();
  if constexpr (kSingleChunk) {
    for (int p = tid; p < a.num_pairs; p += kThreads) {
      const int e = a.expert_ids[p];
      if (ValidExpert(e, num_experts)) atomicAdd(&total[e], 1);
    }
    __syncthreads();
  }

  // 2. offsets: exclusive scan of the padded counts, two experts per thread.
  {
    const int e0 = 2 * tid, e1 = 2 * tid + 1;
    const int p0 = e0 < num_experts ? (total[e0] + tile - 1) / tile * tile : 0;
    const int p1 = e1 < num_experts ? (total[e1] + tile - 1) / tile * tile : 0;
    int inclusive = p0 + p1;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += up;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    int warp_base = 0, grand = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) warp_base += warp_sums[w];
      grand += warp_sums[w];
    }
    const int exclusive = warp_base + inclusive - (p0 + p1);
    if (e0 < num_experts) offsets[e0] = exclusive;
    if (e1 < num_experts) offsets[e1] = exclusive + p0;
    if (tid == 0) offsets[num_experts] = grand;
  }
  __syncthreads();
  for (int e = tid; e < num_experts; e += kThreads) running[e] += offsets[e];
  if (blockIdx.x == 0) {
    for (int e = tid; e <= num_experts; e += kThreads) a.expert_offsets[e] = offsets[e];
    for (int e = tid; e < num_experts; e += kThreads) a.expert_counts[e] = total[e];
    if (tid == 0) *a.num_tiles = offsets[num_experts] / tile;
  }
  // Tile owners and padding rows: warp w of CTA b takes experts e ≡ b·8 + w (mod 8·CTAs).
  for (int e = blockIdx.x * kWarps + warp; e < num_experts; e += gridDim.x * kWarps) {
    const int begin = offsets[e], end = offsets[e + 1];
    for (int i = begin / tile + lane; i < end / tile; i += 32) a.tile_experts[i] = e;
    for (int r = begin + total[e] + lane; r < end; r += 32) a.sorted_pairs[r] = -1;
  }
  __syncthreads();

  // 3. Stable ranks, 256 pairs per round (the loop bounds are uniform over the CTA).
  const int chunk_begin = kSingleChunk ? 0 : blockIdx.x * kAlignChunk;
  const int chunk_end = kSingleChunk ? a.num_pairs : ChunkEnd(a);
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = chunk_begin; base < chunk_end; base += kThreads) {
    const int p = base + tid;
    const int e = p < chunk_end ? a.expert_ids[p] : -1;
    const bool valid = ValidExpert(e, num_experts);
    const unsigned peers = __match_any_sync(0xffffffffu, valid ? e : -1);
    const int rank = __popc(peers & lanes_below);
    if (valid && rank == 0) warp_counts[warp][e] = __popc(peers);
    __syncthreads();
    if (valid) {
      int row = running[e] + rank;
      for (int w = 0; w < warp; ++w) row += warp_counts[w][e];
      a.sorted_pairs[row] = p;
    }
    __syncthreads();
    for (int x = tid; x < num_experts; x += kThreads) {
      int sum = 0;
      for (int w = 0; w < kWarps; ++w) {
        sum += warp_counts[w][x];
        warp_counts[w][x] = 0;
      }
      running[x] += sum;
    }
    __syncthreads();
  }
}

}  // namespace

namespace moe_internal {

bool AlignMaxTiles(int64_t num_tokens, int num_experts, int top_k, int tile_rows,
                   int64_t* max_tiles) {
  Sizes s;
  if (!ComputeSizes(num_tokens, num_experts, top_k, tile_rows, &s)) return false;
  *max_tiles = s.max_tiles;
  return true;
}

}  // namespace moe_internal

cudaError_t MoeAlignWorkspaceBytes(int64_t num_tokens, int num_experts, int top_k, int tile_rows,
                                   size_t* bytes) {
  Sizes s;
  if (bytes == nullptr || !ComputeSizes(num_tokens, num_experts, top_k, tile_rows, &s)) {
    return cudaErrorInvalidValue;
  }
  *bytes = ComputeLayout(s, num_experts).total;
  return cudaSuccess;
}

cudaError_t MoeAlignmentLayout(void* workspace, size_t workspace_bytes, int64_t num_tokens,
                               int num_experts, int top_k, int tile_rows, MoeAlignment* alignment) {
  Sizes s;
  if (workspace == nullptr || alignment == nullptr ||
      !ComputeSizes(num_tokens, num_experts, top_k, tile_rows, &s)) {
    return cudaErrorInvalidValue;
  }
  const Layout l = ComputeLayout(s, num_experts);
  if (workspace_bytes < l.total) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  alignment->sorted_pairs = reinterpret_cast<int32_t*>(base + l.sorted_pairs);
  alignment->tile_experts = reinterpret_cast<int32_t*>(base + l.tile_experts);
  alignment->expert_offsets = reinterpret_cast<int32_t*>(base + l.offsets);
  alignment->expert_counts = reinterpret_cast<int32_t*>(base + l.counts);
  alignment->num_tiles = reinterpret_cast<int32_t*>(base + l.num_tiles);
  alignment->max_rows = s.max_rows;
  alignment->max_tiles = s.max_tiles;
  return cudaSuccess;
}

cudaError_t LaunchMoeAlign(const int32_t* expert_ids, int64_t num_tokens, int num_experts,
                           int top_k, int tile_rows, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  Sizes s;
  if (!ComputeSizes(num_tokens, num_experts, top_k, tile_rows, &s)) return cudaErrorInvalidValue;
  if (expert_ids == nullptr && s.num_pairs > 0) return cudaErrorInvalidValue;
  MoeAlignment view;
  const cudaError_t err = MoeAlignmentLayout(workspace, workspace_bytes, num_tokens, num_experts,
                                             top_k, tile_rows, &view);
  if (err != cudaSuccess) return err;
  const Layout l = ComputeLayout(s, num_experts);
  AlignArgs a;
  a.expert_ids = expert_ids;
  a.num_pairs = static_cast<int32_t>(s.num_pairs);
  a.num_experts = num_experts;
  a.tile_rows = tile_rows;
  a.sorted_pairs = view.sorted_pairs;
  a.tile_experts = view.tile_experts;
  a.expert_offsets = view.expert_offsets;
  a.expert_counts = view.expert_counts;
  a.num_tiles = view.num_tiles;
  a.block_counts = reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + l.block_counts);
  // Even with no pairs the single-chunk kernel runs, so offsets and the tile count read 0.
  if (s.num_chunks <= 1) {
    MoeAlignScatterKernel<true><<<1, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  const unsigned chunks = static_cast<unsigned>(s.num_chunks);
  MoeAlignCountKernel<<<chunks, kThreads, 0, stream>>>(a);
  const cudaError_t count_err = cudaGetLastError();
  if (count_err != cudaSuccess) return count_err;
  MoeAlignScatterKernel<false><<<chunks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace kls::kernels

// KDA prefill: the chunked algorithm of README.md "Chunked form" (C = 64, sub-chunks of 16 with
// the anchoring of "Sub-chunk anchoring"), with the exact gate, the q/k L2 norms, the q scale and
// sigmoid(β) fused in (contract: kda.h; design notes: README.md "CUDA chunk kernel"). Device
// code: kda_chunk_kernels.cuh. Three launches on the caller's stream:
//
// 1. Plan (1 CTA of 1024 threads): chunk_start[n] = Σ_{m<n} ceil(len_m / 64), so chunks never
//    span sequences and a sequence's tail chunk is short. Chunk slots in the workspace are sized
//    for total_tokens / 64 + N chunks (an upper bound known on the host).
//
// 2. Prepare (KdaChunkPrepareKernel, one CTA of 256 threads per (chunk, head), chunk-major so
//    the heads of a chunk read adjacent bytes; 2 CTAs per SM): everything that does not depend
//    on the state entering the chunk. It stages q, k, f (and later v) in shared memory with
//    cp.async (rows past the sequence end are zero-filled; their α is 1 and β 0, so they change
//    nothing), then
//      - row norms of q, k and α = exp(g) with the exact gate, all in fp32;
//      - decay factors as running PRODUCTS of α (never exp of a difference, never a division):
//        every factor is a product of numbers in [0, 1], so gates of −400 per step underflow to 0
//        and nothing overflows. e^G, e^{G_last−G} and the sub-chunk anchors come out this way;
//      - the diagonal 16×16 blocks of A and P, each split at its row 8 (warp task = one block
//        and one half): the two 8×8 pieces on the diagonal pairwise in fp32 on the CUDA cores
//        (lane = 2 columns × 16 channels; e^{G_r − G_c} is the running product of α down the
//        rows, then a shuffle reduction over channels), the lower-left 8×8 piece as an fp16
//        tensor-core product anchored at row 8 (Π_{c<m≤8} α · Π_{8<m≤r} α, both ≤ 1; the two
//        warps of a block take half the channels each and meet at a named barrier);
//      - the off-diagonal blocks as fp16 tensor-core products of the anchored factors
//        Q̃ = Q ⊙ e^{G−G_n}, K̃ = K ⊙ e^{G−G_n}, K̂ = K ⊙ e^{G_n−G} (n = first row of the row
//        sub-chunk; both factors ≤ 1);
//      - T = (I + A)⁻¹ in fp32: forward substitution in the four diagonal 16-blocks, then the
//        block formula T_ij = −T_ii Σ_{m=j}^{i−1} A_im T_mj; M = T·Diag(β);
//      - W = M (e^G ⊙ K) and U = M V on the tensor cores, V scaled by 2^−e_v first.
//    It writes per (chunk, head): Qg = Q ⊙ e^G, Kg = K ⊙ e^{G_last−G}, W, U·2^−e_v, P (fp16,
//    64 rows), γ = e^{G_last} (fp32) and e_v. Shared memory: 109 KB (K = 128), 82 KB (K = 64),
//    buffers reused across phases (see PrepareSmem).
//
// 3. State and output (KdaChunkStateKernel, one CTA of 256 threads per (sequence, head, tile of
//    BV value columns); BV = 32, or 64 when there are ≥ 4 CTAs per SM at BV = 32): the chain over
//    the chunks of one sequence, with the state slice S[:, tile] (K × BV fp32) in registers:
//        Δ = U − W·S,   O = Qg·S + P·Δ,   S ← γ ⊙ S + Kgᵀ·Δ
//    on the tensor cores. The next chunk's operands are prefetched with cp.async into a second
//    buffer while the current one is used; two __syncthreads per chunk. At B = 1, H = 32,
//    K = 128 that is 128 CTAs, one per SM; the chain over T/64 chunks is the critical path of
//    long prefills. Shared memory: 146 KB (BV = 32) / 166 KB (BV = 64) at K = 128.
//
// Numerics. fp32: g, α, the norms, every decay factor, the 8×8 diagonal pieces of A and P, T, the
// state and all accumulators. The tensor-core operands are fp16 (3 more mantissa bits than
// bf16, same speed): Q̃, K̃, K̂, M, Kw, Qg, Kg, W, P are bounded by ~1 (normalized keys times
// decays ≤ 1); the value side (V, U, S, Δ) is scaled by exact powers of two so that it fits
// fp16: 2^−e_v per chunk in the prepare kernel, one 2^−e per state CTA (e = max over the
// sequence's chunks of e_v and the exponent of max |S₀|, so max(|v|, |S₀|)·2^−e < 1/4), undone
// on the outputs and the final state. The recurrence is linear in (v, S), so the scaling is
// exact. Measured in a model of these roundings: outputs ~1.7e-3 relative RMS vs fp64 (the
// bf16 output rounding itself), states ~3e-4 — where the all-bf16 design (fla's) reaches
// 3–5e-3 and grows with T for slow decays.
//
// Limits (checked on the host, cudaErrorInvalidValue): K == V ∈ {64, 128}; N ≥ 1, H ≥ 1;
// q, k, v, f, out, state_pool 16-byte aligned, dt_bias 8-byte aligned; every pointer non-null when
// there are tokens; workspace of KdaChunkWorkspaceBytes bytes, 16-byte aligned; grid sizes < 2³¹.
// Not checked: state entries beyond 2^17 · max(|v|, |S₀|) of the sequence would overflow the
// fp16 operand copy (the delta rule keeps ‖S‖ near the scale of v; this is far outside it).
// Workspace ≈ 1.13 KB per token per head at K = 128 (4.9 GB for T = 128K, H = 32).
// Trusted (device data): cu_seqlens non-decreasing from 0 with cu_seqlens[N] == total_tokens;
// slots distinct and inside the pool. Empty sequences keep their state untouched.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/kda/kda.h"
#include "kernels/kda/kda_chunk_kernels.cuh"
#include "kernels/kda/kda_chunk_tuning.h"

namespace kls::kernels {
namespace kda_chunk {
namespace {

// ---------------------------------------------------------------------------------------------
// Workspace
// ---------------------------------------------------------------------------------------------

struct WorkspaceLayout {
  int64_t chunk_slots = 0;  // upper bound on the number of chunks
  size_t chunk_start = 0;   // int32 [N + 1]
  size_t qg = 0;            // fp16 [slots, H, 64, K]
  size_t kg = 0;            // fp16 [slots, H, 64, K]
  size_t w = 0;             // fp16 [slots, H, 64, K]
  size_t u = 0;             // fp16 [slots, H, 64, V], scaled by 2^−vexp
  size_t p = 0;             // fp16 [slots, H, 64, 64]  (lower blocks and diagonal written)
  size_t gamma = 0;         // fp32 [slots, H, K]
  size_t vexp = 0;          // int32 [slots, H]
  size_t total = 0;
};

bool SupportedShape(const KdaParams& p) {
  const int64_t hk = static_cast<int64_t>(p.num_heads) * p.head_dim;
  return p.num_seqs >= 1 && p.num_heads >= 1 && p.total_tokens >= 0 &&
         (p.head_dim == 64 || p.head_dim == 128) &&
         (p.qkv_token_stride == 0 || (p.qkv_token_stride >= hk && p.qkv_token_stride % 8 == 0));
}

WorkspaceLayout Layout(const KdaParams& p) {
  const auto align = [](size_t x) { return (x + 255) & ~static_cast<size_t>(255); };
  WorkspaceLayout l;
  // Σ ceil(len_n / 64) ≤ Σ (floor(len_n / 64) + 1) ≤ floor(total / 64) + N.
  l.chunk_slots = p.total_tokens / kChunk + p.num_seqs;
  const size_t tiles = static_cast<size_t>(l.chunk_slots) * static_cast<size_t>(p.num_heads);
  const size_t kd = static_cast<size_t>(p.head_dim);
  size_t off = 0;
  l.chunk_start = off;
  off += align(static_cast<size_t>(p.num_seqs + 1) * sizeof(int32_t));
  l.qg = off;
  off += align(tiles * kChunk * kd * sizeof(f16));
  l.kg = off;
  off += align(tiles * kChunk * kd * sizeof(f16));
  l.w = off;
  off += align(tiles * kChunk * kd * sizeof(f16));
  l.u = off;
  off += align(tiles * kChunk * kd * sizeof(f16));
  l.p = off;
  off += align(tiles * kChunk * kChunk * sizeof(f16));
  l.gamma = off;
  off += align(tiles * kd * sizeof(float));
  l.vexp = off;
  off += align(tiles * sizeof(int32_t));
  l.total = off;
  return l;
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

bool Aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Raises a kernel's dynamic shared-memory limit once per device (bit d of the mask), so that
// launches captured into a CUDA graph after a warm-up make no attribute calls.
template <typename Kernel>
cudaError_t EnsureSmemLimit(Kernel kernel, int bytes, std::atomic<uint64_t>& configured) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (configured.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  configured.fetch_or(bit, std::memory_order_acq_rel);
  return cudaSuccess;
}

template <int K, int BV>
cudaError_t LaunchState(const StateArgs& args, int64_t blocks, cudaStream_t stream) {
  static std::atomic<uint64_t> configured{0};
  constexpr int kBytes = StateSmem<K, BV>::kBytes;
  const cudaError_t err = EnsureSmemLimit(KdaChunkStateKernel<K, BV>, kBytes, configured);
  if (err != cudaSuccess) return err;
  KdaChunkStateKernel<K, BV><<<static_cast<unsigned>(blocks), kThreads, kBytes, stream>>>(args);
  return cudaGetLastError();
}

template <int K>
cudaError_t LaunchAll(const KdaParams& p, const WorkspaceLayout& l, unsigned char* ws,
                      int state_tile_v, cudaStream_t stream) {
  int32_t* const chunk_start = reinterpret_cast<int32_t*>(ws + l.chunk_start);
  KdaChunkPlanKernel<<<1, kPlanThreads, kPlanSmemBytes, stream>>>(p.cu_seqlens, p.num_seqs,
                                                                  chunk_start);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  PrepareArgs pa;
  pa.q = p.q;
  pa.k = p.k;
  pa.v = p.v;
  pa.f = p.f;
  pa.qkv_token_stride =
      p.qkv_token_stride != 0 ? p.qkv_token_stride : static_cast<int64_t>(p.num_heads) * K;
  pa.beta_logits = p.beta_logits;
  pa.a_log = p.a_log;
  pa.dt_bias = p.dt_bias;
  pa.cu_seqlens = p.cu_seqlens;
  pa.chunk_start = chunk_start;
  pa.qg = reinterpret_cast<f16*>(ws + l.qg);
  pa.kg = reinterpret_cast<f16*>(ws + l.kg);
  pa.w = reinterpret_cast<f16*>(ws + l.w);
  pa.u = reinterpret_cast<f16*>(ws + l.u);
  pa.p = reinterpret_cast<f16*>(ws + l.p);
  pa.gamma = reinterpret_cast<float*>(ws + l.gamma);
  pa.vexp = reinterpret_cast<int32_t*>(ws + l.vexp);
  pa.num_seqs = p.num_seqs;
  pa.num_heads = p.num_heads;
  pa.scale = p.scale;
  {
    static std::atomic<uint64_t> configured{0};
    constexpr int kBytes = PrepareSmem<K>::kBytes;
    err = EnsureSmemLimit(KdaChunkPrepareKernel<K>, kBytes, configured);
    if (err != cudaSuccess) return err;
    const int64_t blocks = l.chunk_slots * p.num_heads;
    KdaChunkPrepareKernel<K><<<static_cast<unsigned>(blocks), kThreads, kBytes, stream>>>(pa);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  StateArgs sa;
  sa.qg = pa.qg;
  sa.kg = pa.kg;
  sa.w = pa.w;
  sa.u = pa.u;
  sa.p = pa.p;
  sa.gamma = pa.gamma;
  sa.vexp = pa.vexp;
  sa.cu_seqlens = p.cu_seqlens;
  sa.chunk_start = chunk_start;
  sa.state_slots = p.state_slots;
  sa.state_pool = p.state_pool;
  sa.out = p.out;
  sa.num_seqs = p.num_seqs;
  sa.num_heads = p.num_heads;
  // BV = 32 keeps more SMs on the chain at B = 1; with ≥ 4 CTAs per SM at BV = 32, BV = 64
  // halves the redundant (L2) loads of W, Qg, Kg and P per value column.
  const int64_t seq_heads = static_cast<int64_t>(p.num_seqs) * p.num_heads;
  if (state_tile_v == 0) {
    int device = 0, sms = 0;
    err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    state_tile_v = seq_heads * (K / 32) >= 4 * static_cast<int64_t>(sms) ? 64 : 32;
  }
  if (state_tile_v == 64) return LaunchState<K, 64>(sa, seq_heads * (K / 64), stream);
  return LaunchState<K, 32>(sa, seq_heads * (K / 32), stream);
}

}  // namespace
}  // namespace kda_chunk

size_t KdaChunkWorkspaceBytes(const KdaParams& params) {
  if (!kda_chunk::SupportedShape(params)) return 0;
  return kda_chunk::Layout(params).total;
}

cudaError_t LaunchKdaChunk(const KdaParams& params, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  return LaunchKdaChunkWithStateTile(params, workspace, workspace_bytes, 0, stream);
}

cudaError_t LaunchKdaChunkWithStateTile(const KdaParams& params, void* workspace,
                                        size_t workspace_bytes, int state_tile_v,
                                        cudaStream_t stream) {
  using kda_chunk::Aligned;
  if (state_tile_v != 0 && state_tile_v != 32 && state_tile_v != 64) return cudaErrorInvalidValue;
  const KdaParams& p = params;
  if (!kda_chunk::SupportedShape(p) || !std::isfinite(p.scale)) return cudaErrorInvalidValue;
  if (p.cu_seqlens == nullptr || p.state_pool == nullptr || p.state_slots == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.total_tokens == 0) return cudaSuccess;  // every sequence is empty
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.f == nullptr ||
      p.beta_logits == nullptr || p.a_log == nullptr || p.dt_bias == nullptr || p.out == nullptr ||
      workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (!Aligned(p.q, 16) || !Aligned(p.k, 16) || !Aligned(p.v, 16) || !Aligned(p.f, 16) ||
      !Aligned(p.out, 16) || !Aligned(p.state_pool, 16) || !Aligned(p.dt_bias, 8) ||
      !Aligned(workspace, 16)) {
    return cudaErrorInvalidValue;
  }
  const kda_chunk::WorkspaceLayout layout = kda_chunk::Layout(p);
  if (workspace_bytes < layout.total) return cudaErrorInvalidValue;
  const int64_t prep_blocks = layout.chunk_slots * p.num_heads;
  const int64_t state_blocks = static_cast<int64_t>(p.num_seqs) * p.num_heads * (p.head_dim / 32);
  if (prep_blocks > INT32_MAX || state_blocks > INT32_MAX) return cudaErrorInvalidValue;
  unsigned char* const ws = static_cast<unsigned char*>(workspace);
  return p.head_dim == 128 ? kda_chunk::LaunchAll<128>(p, layout, ws, state_tile_v, stream)
                           : kda_chunk::LaunchAll<64>(p, layout, ws, state_tile_v, stream);
}

}  // namespace kls::kernels

// GPU token sampling that reproduces SampleReference (contract: sampling.h; procedure and the
// derivation of the cuts: README.md).
//
// Mapping. One CTA of 1024 threads per row; the row (up to 640 KB for 163840 fp32 logits) is
// re-read from global memory (L2 after the first pass) by every pass below. No sort.
//   Greedy rows (temperature <= 0 or NaN): one pass, per-thread (max, lowest id), block reduce.
//   Otherwise:
//   1. max finite logit and the number of finite logits (one pass);
//   2. z = Σ exp((ℓ − max) / T) in fp64 (one pass); p(ℓ) = exp((ℓ − max) / T) / z as in the
//      reference, recomputed wherever needed (fp64 exp);
//   3. top-k: a radix select over the order keys (the logit's bits made monotone; −0 == +0) in
//      digits of 11, 11 and 10 bits (three passes of shared-memory histograms) finds the key of
//      the k-th token in the order (logit desc, id asc); if that key's group straddles the cut,
//      an ordered count (contiguous id segments per thread + a block scan) finds the id of its
//      last kept member. The kept set is a "cut": {key > c.key} ∪ {key == c.key, id <= c.id};
//   4. top-p: the mass of the top-k set, then the same radix select weighted by p in 2⁻⁶⁰ fixed
//      point (exact integer sums, so the three passes agree with each other), restricted to the
//      top-k cut: the shortest prefix of the order whose mass reaches top_p · mass;
//   5. the draw: per-thread fp64 sums of p over the kept set on contiguous id segments, a block
//      exclusive scan, and the thread whose segment holds u · total walks it in id order (the
//      reference's CDF order).
// Shared memory: 2048 uint32 counts + 2048 uint64 masses + scan scratch ≈ 25 KB (static).
// Integer histograms and fixed-point masses make every cut exact and deterministic; fp64 sums
// differ from the reference's sequential sums only by rounding.
//
// Limits: vocab_size <= 2³⁰ (ids, and loop indices one stride past them, fit in int; INT32_MAX
// is the "no id" sentinel); any number of rows.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/sampling/sampling.h"

namespace kls::kernels {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBins = 2048;
constexpr int kNone = INT_MAX;  // "no id" / "no candidate"
// Ids, and loop indices one stride past them, must fit in int.
constexpr int64_t kMaxVocab = int64_t{1} << 30;
constexpr double kFixedOne = 0x1.0p60;  // probability 1 in fixed point
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kWarps == 32, "BlockAllReduce needs exactly 32 warps");

using u64 = unsigned long long;

// The kept prefix of the order (logit desc, id asc): {key > key} ∪ {key == key, id <= id}.
struct Cut {
  uint32_t key;
  int id;
};
// Every finite logit's key is >= 0x00800000 (that of −FLT_MAX), so this keeps all of them.
constexpr Cut kWholeVocab{0u, kNone};

struct SharedStorage {
  uint32_t count[kMaxBins];
  u64 weight[kMaxBins];
  double f64[kWarps + 1];
  u64 u64s[kWarps + 1];
  float f32[kWarps];
  int i32[kWarps];
  u64 sel_above;
  u64 sel_weight;
  uint32_t sel_count;
  int sel_id;
};

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct MinOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a < b ? a : b;
  }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

__device__ __forceinline__ bool IsFinite(float v) { return fabsf(v) < INFINITY; }

// Monotone map of a float to uint32 (larger logit → larger key); −0 and +0 share a key because
// the reference compares logits as values.
__device__ __forceinline__ uint32_t OrderKey(float v) {
  const uint32_t bits = v == 0.0f ? 0u : __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ bool InCut(uint32_t key, int id, Cut cut) {
  return key > cut.key || (key == cut.key && id <= cut.id);
}

__device__ __forceinline__ u64 ToFixed(double p) { return __double2ull_rz(p * kFixedOne); }

template <typename T, typename Op>
__device__ __forceinline__ T WarpAllReduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Every thread gets op over the block's values. `scratch` holds kWarps values.
template <typename T, typename Op>
__device__ T BlockAllReduce(T v, Op op, T* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = WarpAllReduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = WarpAllReduce(scratch[lane], op);
  __syncthreads();  // scratch is free again
  return v;
}

// Exclusive prefix sum over threads in threadIdx order; *total gets the block sum. `scratch`
// holds kWarps + 1 values.
template <typename T>
__device__ T BlockExclusiveScan(T v, T* scratch, T* total) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  T inclusive = v;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  T exclusive = __shfl_up_sync(kFullMask, inclusive, 1);
  if (lane == 0) exclusive = T{};
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    T warp_inclusive = scratch[lane];
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const T other = __shfl_up_sync(kFullMask, warp_inclusive, offset);
      if (lane >= offset) warp_inclusive += other;
    }
    T warp_exclusive = __shfl_up_sync(kFullMask, warp_inclusive, 1);
    if (lane == 0) warp_exclusive = T{};
    scratch[lane] = warp_exclusive;
    if (lane == 31) scratch[kWarps] = warp_inclusive;
  }
  __syncthreads();
  const T result = scratch[warp] + exclusive;
  *total = scratch[kWarps];
  __syncthreads();
  return result;
}

// Thread t's contiguous id segment [begin, end) for the passes that must walk ids in order.
struct Segment {
  int begin;
  int end;
};
__device__ __forceinline__ Segment ThreadSegment(int vocab) {
  const int64_t per = (static_cast<int64_t>(vocab) + kThreads - 1) / kThreads;
  const int64_t begin = min(static_cast<int64_t>(vocab), threadIdx.x * per);
  const int64_t end = min(static_cast<int64_t>(vocab), begin + per);
  return {static_cast<int>(begin), static_cast<int>(end)};
}

struct Row {
  const float* __restrict__ x;
  int vocab;
  double max_logit;
  double temperature;
  double z;
  __device__ __forceinline__ double Unnormalized(float v) const {
    return exp((static_cast<double>(v) - max_logit) / temperature);
  }
  // The reference's prob[i]: exp(...) first, then divided by z.
  __device__ __forceinline__ double Prob(float v) const { return Unnormalized(v) / z; }
};

// argmax over finite logits, lowest id on ties; 0 when none is finite.
__device__ int GreedyToken(const float* __restrict__ x, int vocab, SharedStorage& s) {
  float best = -INFINITY;
  int best_id = kNone;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = x[i];
    if (IsFinite(v) && v > best) {  // ids rise within a thread: strict > keeps the lowest
      best = v;
      best_id = i;
    }
  }
  const float row_best = BlockAllReduce(best, MaxOp{}, s.f32);
  const int candidate = best_id != kNone && best == row_best ? best_id : kNone;
  const int id = BlockAllReduce(candidate, MinOp{}, s.i32);
  return id == kNone ? 0 : id;
}

template <bool kMass>
__device__ __forceinline__ u64 BinWeight(const SharedStorage& s, int bin) {
  if constexpr (kMass) {
    return s.weight[bin];
  } else {
    return s.count[bin];
  }
}

// The id of the m-th lowest (1-based) token with key `key` inside `restrict`. The group must
// hold at least m tokens.
__device__ int MthInGroup(const Row& row, uint32_t key, Cut restrict, u64 m, SharedStorage& s) {
  const Segment seg = ThreadSegment(row.vocab);
  u64 local = 0;
  for (int i = seg.begin; i < seg.end; ++i) {
    const float v = row.x[i];
    if (IsFinite(v) && OrderKey(v) == key && InCut(key, i, restrict)) ++local;
  }
  u64 total = 0;
  const u64 before = BlockExclusiveScan(local, s.u64s, &total);
  if (before < m && m <= before + local) {
    u64 remaining = m - before;
    for (int i = seg.begin; i < seg.end; ++i) {
      const float v = row.x[i];
      if (IsFinite(v) && OrderKey(v) == key && InCut(key, i, restrict) && --remaining == 0) {
        s.sel_id = i;
        break;
      }
    }
  }
  __syncthreads();
  const int id = s.sel_id;
  __syncthreads();
  return id;
}

// The shortest prefix of the order (restricted to `restrict`) whose weight reaches `target`:
// weight 1 per token (kMass = false: top-k, target = k) or ToFixed(p) (top-p). Returns false,
// leaving *out alone, when the whole restricted set weighs less than target.
template <bool kMass>
__device__ bool SelectCut(const Row& row, Cut restrict, u64 target, SharedStorage& s, Cut* out) {
  const int tid = threadIdx.x;
  uint32_t prefix = 0;  // key bits fixed so far
  u64 above = 0;        // weight of the restricted tokens whose key is above the current bin
  u64 group_weight = 0;
  uint32_t group_count = 0;
#pragma unroll 1
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
    const int bits = pass == 2 ? 10 : 11;
    const int num_bins = 1 << bits;
    const uint32_t high_mask = pass == 0 ? 0u : ~0u << (shift + bits);
    for (int b = tid; b < num_bins; b += kThreads) {
      s.count[b] = 0;
      if constexpr (kMass) s.weight[b] = 0;
    }
    __syncthreads();
    for (int i = tid; i < row.vocab; i += kThreads) {
      const float v = row.x[i];
      if (!IsFinite(v)) continue;
      const uint32_t key = OrderKey(v);
      if ((key & high_mask) != prefix || !InCut(key, i, restrict)) continue;
      const int bin = static_cast<int>((key >> shift) & static_cast<uint32_t>(num_bins - 1));
      atomicAdd(&s.count[bin], 1u);
      if constexpr (kMass) atomicAdd(&s.weight[bin], ToFixed(row.Prob(v)));
    }
    __syncthreads();

    // Bins from the highest key down: position j is bin num_bins − 1 − j; thread t owns positions
    // [t·per, t·per + per). The cut's bin is the first non-empty one where the running weight
    // reaches the target.
    const int per = num_bins / kThreads;
    u64 local = 0;
    for (int q = 0; q < per; ++q) local += BinWeight<kMass>(s, num_bins - 1 - (tid * per + q));
    u64 total = 0;
    const u64 before = BlockExclusiveScan(local, s.u64s, &total);
    int candidate = kNone;
    u64 running = above + before;
    for (int q = 0; q < per; ++q) {
      const int bin = num_bins - 1 - (tid * per + q);
      running += BinWeight<kMass>(s, bin);
      if (s.count[bin] > 0 && running >= target) {
        candidate = tid * per + q;
        break;
      }
    }
    const int chosen = BlockAllReduce(candidate, MinOp{}, s.i32);
    if (chosen == kNone) return false;  // only in pass 0: integer weights add up exactly
    if (tid == chosen / per) {
      u64 start = above + before;
      for (int q = tid * per; q < chosen; ++q) start += BinWeight<kMass>(s, num_bins - 1 - q);
      const int bin = num_bins - 1 - chosen;
      s.sel_above = start;
      s.sel_count = s.count[bin];
      s.sel_weight = BinWeight<kMass>(s, bin);
    }
    __syncthreads();
    above = s.sel_above;
    group_count = s.sel_count;
    group_weight = s.sel_weight;
    prefix |= static_cast<uint32_t>(num_bins - 1 - chosen) << shift;
    __syncthreads();  // the next pass clears the histogram
  }

  // `prefix` is now the key of the group the cut falls in: group_count tokens of equal logit,
  // hence equal weight, after `above`. Keep its m lowest ids, m the fewest reaching the target.
  const u64 unit = group_weight / group_count;
  const u64 need = target > above ? target - above : 0;
  u64 m = unit == 0 ? 1 : (need + unit - 1) / unit;
  if (m < 1) m = 1;
  Cut cut{prefix, 0};
  if (m >= group_count) {
    cut.id = prefix == restrict.key ? restrict.id : kNone;  // the whole (restricted) group
  } else {
    cut.id = MthInGroup(row, prefix, restrict, m, s);
  }
  *out = cut;
  return true;
}

// Inverts the CDF of the kept tokens, in ascending id order, at u: the first kept id with
// u · Σ_kept p < cumsum and p > 0 (the last positive kept id if rounding puts u · total on top).
__device__ int DrawFromCut(const Row& row, Cut cut, double u, SharedStorage& s) {
  const Segment seg = ThreadSegment(row.vocab);
  double local = 0.0;
  int last_positive = -1;
  for (int i = seg.begin; i < seg.end; ++i) {
    const float v = row.x[i];
    if (!IsFinite(v) || !InCut(OrderKey(v), i, cut)) continue;
    const double p = row.Prob(v);
    if (p > 0.0) {
      local += p;
      last_positive = i;
    }
  }
  double total = 0.0;
  const double before = BlockExclusiveScan(local, s.f64, &total);
  const double target = u * total;
  const int candidate =
      local > 0.0 && target < before + local ? static_cast<int>(threadIdx.x) : kNone;
  const int owner = BlockAllReduce(candidate, MinOp{}, s.i32);
  if (owner == kNone) return BlockAllReduce(last_positive, MaxOp{}, s.i32);
  if (static_cast<int>(threadIdx.x) == owner) {
    double cum = before;
    int token = last_positive;
    for (int i = seg.begin; i < seg.end; ++i) {
      const float v = row.x[i];
      if (!IsFinite(v) || !InCut(OrderKey(v), i, cut)) continue;
      const double p = row.Prob(v);
      if (p <= 0.0) continue;
      cum += p;
      if (target < cum) {
        token = i;
        break;
      }
    }
    s.sel_id = token;
  }
  __syncthreads();
  const int token = s.sel_id;
  __syncthreads();
  return token;
}

__global__ void __launch_bounds__(kThreads)
    SampleKernel(const float* __restrict__ logits, int64_t row_stride, int vocab,
                 const SamplerConfig* __restrict__ configs, const uint64_t* __restrict__ counters,
                 int32_t* __restrict__ tokens) {
  __shared__ SharedStorage s;
  const int r = blockIdx.x;
  const float* __restrict__ x = logits + static_cast<int64_t>(r) * row_stride;
  const SamplerConfig config = configs[r];

  if (!(config.temperature > 0.0f)) {
    const int token = GreedyToken(x, vocab, s);
    if (threadIdx.x == 0) tokens[r] = token;
    return;
  }

  // 1. Max and count of the finite logits.
  float local_max = -INFINITY;
  int local_finite = 0;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = x[i];
    if (IsFinite(v)) {
      local_max = fmaxf(local_max, v);
      ++local_finite;
    }
  }
  const float max_logit = BlockAllReduce(local_max, MaxOp{}, s.f32);
  const int num_finite = BlockAllReduce(local_finite, SumOp{}, s.i32);
  if (num_finite == 0) {
    if (threadIdx.x == 0) tokens[r] = 0;
    return;
  }

  // 2. The softmax normalizer.
  Row row{x, vocab, static_cast<double>(max_logit), static_cast<double>(config.temperature), 1.0};
  double local_z = 0.0;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = x[i];
    if (IsFinite(v)) local_z += row.Unnormalized(v);
  }
  row.z = BlockAllReduce(local_z, SumOp{}, s.f64);

  // 3. top-k (the reference's k = min(top_k, number of finite logits); no cut when that is all).
  Cut cut = kWholeVocab;
  if (config.top_k > 0 && config.top_k < vocab && config.top_k < num_finite) {
    SelectCut<false>(row, kWholeVocab, static_cast<u64>(config.top_k), s, &cut);
  }

  // 4. top-p over the top-k set renormalized (NaN compares false: disabled).
  if (config.top_p < 1.0f) {
    u64 local_mass = 0;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float v = x[i];
      if (IsFinite(v) && InCut(OrderKey(v), i, cut)) local_mass += ToFixed(row.Prob(v));
    }
    const u64 mass = BlockAllReduce(local_mass, SumOp{}, s.u64s);
    const double threshold =
        static_cast<double>(config.top_p) * (static_cast<double>(mass) / kFixedOne);
    // cum >= threshold  ⇔  fixed cum >= ceil(threshold · 2⁶⁰); threshold <= 0 keeps one token.
    const u64 target = threshold > 0.0 ? __double2ull_ru(threshold * kFixedOne) : 0;
    Cut nucleus;
    if (SelectCut<true>(row, cut, target, s, &nucleus)) cut = nucleus;
  }

  // 5. The draw.
  const double u = SamplerUniformPortable(config.seed, counters[r]);
  const int token = DrawFromCut(row, cut, u, s);
  if (threadIdx.x == 0) tokens[r] = token;
}

}  // namespace

cudaError_t LaunchSampleTokens(const float* logits, int64_t logits_row_stride, int64_t vocab_size,
                               int num_rows, const SamplerConfig* configs, const uint64_t* counters,
                               int32_t* tokens, cudaStream_t stream) {
  if (num_rows < 0 || vocab_size < 1 || vocab_size > kMaxVocab || logits_row_stride < vocab_size) {
    return cudaErrorInvalidValue;
  }
  if (num_rows == 0) return cudaSuccess;
  if (logits == nullptr || configs == nullptr || counters == nullptr || tokens == nullptr) {
    return cudaErrorInvalidValue;
  }
  SampleKernel<<<num_rows, kThreads, 0, stream>>>(
      logits, logits_row_stride, static_cast<int>(vocab_size), configs, counters, tokens);
  return cudaGetLastError();
}

}  // namespace kls::kernels

// bf16 GEMMs through cuBLASLt with fp32 accumulation: the model's linear layers (nn.Linear
// weights, y = x·Wᵀ), fp32 accumulate-into for residual adds, and a strided-batched form for MLA's
// per-head W_UK / W_UV absorption. CPU reference: gemm_ref.h; layouts and limits: README.md.
//
// All matrices are row-major with explicit row strides (leading dimensions, in elements) and,
// for batched calls, batch strides (in elements). For b < batch, i < m, o < n, j < k:
//   y[b, i, o] = Σ_j x[b, i, j] · W[b, o, j]          (+ y[b, i, o] in kAccumulate mode)
//   x[b, i, j]  at  x[b·batch_stride_x + i·ldx + j]                              bf16
//   W[b, o, j]  at  w[b·batch_stride_w + o·ldw + j]   (kNK: nn.Linear weight [n, k])  bf16
//               or  w[b·batch_stride_w + j·ldw + o]   (kKN: a [k, n] matrix)        bf16
//   y[b, i, o]  at  y[b·batch_stride_y + i·ldy + o]                       bf16 or fp32
// Products and sums are fp32 (CUBLAS_COMPUTE_32F); a bf16 y is rounded once (round to nearest).
#ifndef KLS_KERNELS_GEMM_GEMM_H_
#define KLS_KERNELS_GEMM_GEMM_H_

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>

namespace kls::kernels {

enum class GemmWeightLayout {
  kNK,  // W[o, j] at w[o·ldw + j]: a PyTorch nn.Linear weight [n, k]; y = x·Wᵀ
  kKN,  // W[o, j] at w[j·ldw + o]: a [k, n] matrix; y = x·W
};

enum class GemmOutputType { kBf16, kFp32 };

enum class GemmOutputMode {
  kOverwrite,   // y = x·Wᵀ; y is never read (it may hold NaN)
  kAccumulate,  // y += x·Wᵀ (beta = 1): the residual add, in fp32 or bf16
};

// One GEMM (batch == 1) or a strided batch of independent GEMMs; see the file comment for the
// element addressing. Batch strides are ignored when batch == 1; a batch stride of 0 for x or w
// broadcasts it to every batch. y must not overlap x or w, and distinct (b, i, o) of y must be
// distinct elements (the caller's responsibility for interleaved batches).
struct GemmArgs {
  int64_t m = 0;                     // rows of x and y (tokens); m == 0 makes the call a no-op
  int64_t n = 0;                     // output features, >= 1
  int64_t k = 0;                     // input features (the reduction), >= 1
  int64_t batch = 1;                 // batch == 0 makes the call a no-op; <= INT32_MAX
  const __nv_bfloat16* x = nullptr;  // [batch][m, k]; ldx >= k
  int64_t ldx = 0;
  int64_t batch_stride_x = 0;
  const __nv_bfloat16* w =
      nullptr;  // [batch][n, k] (kNK, ldw >= k) or [batch][k, n] (kKN, ldw >= n)
  GemmWeightLayout w_layout = GemmWeightLayout::kNK;
  int64_t ldw = 0;
  int64_t batch_stride_w = 0;
  void* y = nullptr;  // [batch][m, n] of y_type; ldy >= n
  GemmOutputType y_type = GemmOutputType::kBf16;
  int64_t ldy = 0;
  int64_t batch_stride_y = 0;
  GemmOutputMode mode = GemmOutputMode::kOverwrite;
};

// The outcome of a GEMM call: ok() or the first failure. Invalid arguments give
// cublas == CUBLAS_STATUS_INVALID_VALUE; no cuBLASLt algorithm for the shape, layout and
// alignment gives CUBLAS_STATUS_NOT_SUPPORTED; a plan missing while `stream` is being captured
// gives cuda == cudaErrorStreamCaptureUnsupported. `message` names the offending field and value
// (or the cuBLASLt / CUDA call that failed); it is "" on success.
struct GemmStatus {
  cublasStatus_t cublas = CUBLAS_STATUS_SUCCESS;
  cudaError_t cuda = cudaSuccess;
  char message[160] = "";
  bool ok() const { return cublas == CUBLAS_STATUS_SUCCESS && cuda == cudaSuccess; }
};

struct CublasLtGemmOptions {
  // The cuBLASLt workspace. workspace == nullptr: the object allocates (cudaMalloc) and owns
  // workspace_bytes of device memory (0 allows only algorithms that need none). Otherwise the
  // caller's buffer of workspace_bytes bytes, 256-byte aligned, which must outlive the object and
  // must not be used by anything else while a GEMM issued through the object may be running.
  // 32 MiB is NVIDIA's recommendation for Hopper.
  void* workspace = nullptr;
  size_t workspace_bytes = size_t{32} << 20;
  // Plans (descriptors + algorithm) created by Run on a cache miss are dropped, all at once, when
  // the cache would exceed this many; plans created by Prepare are never dropped.
  size_t max_cached_plans = 4096;
};

class CublasLtGemm;
struct GemmCreateResult {
  GemmStatus status;
  std::unique_ptr<CublasLtGemm> gemm;  // non-null iff status.ok()
};

// A cuBLASLt handle, a device workspace and a cache of plans: per distinct (m, n, k, batch, weight
// layout, output type, strides, pointer alignments) the matmul/layout descriptors and the
// heuristic's first algorithm, so that a call after the first only launches.
//
// CUDA graphs: Run never allocates device memory and never synchronizes, so it may be captured;
// every plan a captured Run needs must already exist (Prepare it, or make the same call once
// outside capture), and a Run that would need a new plan while its stream is capturing fails
// (cudaErrorStreamCaptureUnsupported) without touching the capture. Alignments are part of the
// plan key, so prepare with pointers aligned like the captured ones (the same buffers are best).
//
// Thread-safety: not thread-safe (the engine thread owns it). GEMMs issued through one object
// share its workspace, so they must be serialized: one stream per object, or one object per
// stream.
class CublasLtGemm {
 public:
  // Creates the cuBLASLt handle and, when options.workspace is null, allocates the workspace.
  // Fails with CUBLAS_STATUS_INVALID_VALUE on a misaligned caller workspace, with a CUDA error
  // when the allocation fails, or with cuBLASLt's status when the handle cannot be created.
  static GemmCreateResult Create(const CublasLtGemmOptions& options);

  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;

  // Creates (or finds) the plan for `args` and pins it against eviction; launches nothing and
  // reads no device memory (the pointers matter only through their alignment). Same validation
  // as Run. m == 0 or batch == 0 needs no plan and succeeds.
  GemmStatus Prepare(const GemmArgs& args);

  // Enqueues y (+)= x·W on `stream`. Validates every argument on the host first (nothing is
  // launched on failure). m == 0 or batch == 0 launches nothing and succeeds (x, w and y may then
  // be null). Asynchronous: returns once the GEMM is enqueued.
  GemmStatus Run(const GemmArgs& args, cudaStream_t stream);

  // nn.Linear: y[m, n] (+)= x[m, k] · w[n, k]ᵀ with row strides ldx, ldy (w dense, ldw = k).
  GemmStatus Linear(const __nv_bfloat16* x, int64_t ldx, const __nv_bfloat16* w, __nv_bfloat16* y,
                    int64_t ldy, int64_t m, int64_t n, int64_t k, GemmOutputMode mode,
                    cudaStream_t stream);
  GemmStatus Linear(const __nv_bfloat16* x, int64_t ldx, const __nv_bfloat16* w, float* y,
                    int64_t ldy, int64_t m, int64_t n, int64_t k, GemmOutputMode mode,
                    cudaStream_t stream);

  // Plans currently cached (prepared and unprepared).
  size_t cached_plans() const { return plans_.size(); }

 private:
  struct PlanKey {
    int64_t m, n, k, batch, ldx, ldw, ldy, batch_stride_x, batch_stride_w, batch_stride_y;
    GemmWeightLayout w_layout;
    GemmOutputType y_type;
    uint32_t align_x, align_w, align_y;  // bytes, powers of two <= 256
    bool operator==(const PlanKey&) const = default;
  };
  struct PlanKeyHash {
    size_t operator()(const PlanKey& key) const;
  };
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr;  // W
    cublasLtMatrixLayout_t b = nullptr;  // x
    cublasLtMatrixLayout_t c = nullptr;  // y (C and D)
    cublasLtMatmulAlgo_t algo{};
    bool pinned = false;
  };

  CublasLtGemm(cublasLtHandle_t handle, void* workspace, size_t workspace_bytes,
               bool owns_workspace, size_t max_cached_plans);
  // The plan for `args` (already validated, m, batch >= 1), created on a miss. Fails on a miss
  // when `stream_to_check` is capturing.
  GemmStatus FindOrCreatePlan(const GemmArgs& args, bool pin, bool check_capture,
                              cudaStream_t stream_to_check, const Plan** plan);
  GemmStatus CreatePlan(const PlanKey& key, Plan* plan) const;
  static void DestroyPlan(Plan& plan);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  bool owns_workspace_ = false;
  size_t max_cached_plans_ = 0;
  std::unordered_map<PlanKey, Plan, PlanKeyHash> plans_;
};

// GemmArgs for nn.Linear (w dense [n, k], kNK, batch 1).
GemmArgs LinearArgs(const __nv_bfloat16* x, int64_t ldx, const __nv_bfloat16* w, __nv_bfloat16* y,
                    int64_t ldy, int64_t m, int64_t n, int64_t k, GemmOutputMode mode);
GemmArgs LinearArgs(const __nv_bfloat16* x, int64_t ldx, const __nv_bfloat16* w, float* y,
                    int64_t ldy, int64_t m, int64_t n, int64_t k, GemmOutputMode mode);

// MLA absorption (kernels/mla/README.md), one batched GEMM over heads (batch = heads, m = tokens).
// kv_b_proj is kv_b_proj.weight [heads·(dn + dv), dc] row-major: per head, dn rows of W_UK^h then
// dv rows of W_UV^h.
//
// Query: q_latent[t, h, :] = W_UK^hᵀ · q_nope[t, h, :]   (W_UK^h [dn, dc] read as kKN, k = dn, n =
// dc)
//   q_nope    element (t, h, i) at q_nope[t·q_row_stride + h·q_head_stride + i], i < dn (e.g. the
//             q_proj output [T, H, dn + dr]: q_row_stride = H·(dn + dr), q_head_stride = dn + dr)
//   q_latent  element (t, h, c) at q_latent[t·out_row_stride + h·out_head_stride + c], c < dc, bf16
GemmArgs MlaAbsorbQueryArgs(const __nv_bfloat16* q_nope, int64_t q_row_stride,
                            int64_t q_head_stride, const __nv_bfloat16* kv_b_proj,
                            __nv_bfloat16* q_latent, int64_t out_row_stride,
                            int64_t out_head_stride, int64_t tokens, int heads, int dn, int dv,
                            int dc);
// Output: out[t, h, :] = W_UV^h · o_latent[t, h, :]      (W_UV^h [dv, dc] read as kNK, k = dc, n =
// dv)
//   o_latent  element (t, h, c) at o_latent[t·o_row_stride + h·o_head_stride + c], c < dc
//   out       element (t, h, v) at out[t·out_row_stride + h·out_head_stride + v], v < dv, bf16
GemmArgs MlaAbsorbOutputArgs(const __nv_bfloat16* o_latent, int64_t o_row_stride,
                             int64_t o_head_stride, const __nv_bfloat16* kv_b_proj,
                             __nv_bfloat16* out, int64_t out_row_stride, int64_t out_head_stride,
                             int64_t tokens, int heads, int dn, int dv, int dc);

// ---- Skinny GEMMs: decode-sized steps (gemm_skinny.cu) ---------------------------------------
//
// y[i, o] (+)= Σ_j x[i, j] · W[o, j] for m <= kSkinnyGemmMaxRows token rows and an nn.Linear
// weight W [n, k], as one pass over W at memory speed: a decode step's projections are GEMVs whose
// cost is reading the weight, which cuBLASLt's tiles (and its split-K reductions) do at a fraction
// of the bandwidth. Up to kSkinnyGemmMaxProblems independent problems with the same m run in one
// launch (e.g. the projections that read the same normalized rows). Same numerics contract as
// CublasLtGemm: fp32 products and sums (in another order), y rounded once; kAccumulate adds the
// old y in fp32 before that rounding.
inline constexpr int64_t kSkinnyGemmMaxRows = 16;
inline constexpr int kSkinnyGemmMaxProblems = 4;

struct SkinnyGemmProblem {
  const __nv_bfloat16* x = nullptr;  // [m, k], row stride ldx >= k; x and ldx 16-byte aligned
  int64_t ldx = 0;
  const __nv_bfloat16* w = nullptr;  // [n, k] (nn.Linear), row stride ldw >= k; 16-byte aligned
  int64_t ldw = 0;
  void* y = nullptr;  // [m, n] of y_type, row stride ldy >= n; must not overlap any x, w or y
  GemmOutputType y_type = GemmOutputType::kBf16;
  int64_t ldy = 0;
  int64_t n = 0;  // >= 1
  int64_t k = 0;  // >= 1, a multiple of 8 (16-byte loads), <= 2^30
  GemmOutputMode mode = GemmOutputMode::kOverwrite;
};

struct SkinnyGemmArgs {
  int64_t m = 0;         // token rows, 0..kSkinnyGemmMaxRows; 0 makes the call a no-op
  int num_problems = 0;  // 1..kSkinnyGemmMaxProblems
  SkinnyGemmProblem problems[kSkinnyGemmMaxProblems];
  // Launch shape, for benchmarks: warps per CTA (4, 8 or 16; 0 picks from the grid size) and
  // 32-wide k chunks of loads in flight per warp (4 or 8; 0 = 4).
  int warps_per_cta = 0;
  int chunks_in_flight = 0;
  // Programmatic dependent launch: the kernel may start during the previous kernel on the stream
  // and prefetch its weights, reading x and writing y only once that kernel has completed.
  bool overlap_previous_kernel = false;
};

// Validates every problem on the host (CUBLAS_STATUS_INVALID_VALUE with the field named; nothing
// is launched on failure), then enqueues one kernel on `stream`. Never allocates or synchronizes,
// needs no plan: capturable in a CUDA graph as is. Thread-safe.
GemmStatus LaunchSkinnyGemm(const SkinnyGemmArgs& args, cudaStream_t stream);

}  // namespace kls::kernels

#endif  // KLS_KERNELS_GEMM_GEMM_H_

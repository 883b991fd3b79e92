// bf16 GEMMs through cuBLASLt (contract: gemm.h; layouts: README.md).
//
// Mapping. cuBLASLt is column-major; a row-major [r, c] matrix with row stride ld is the same
// memory as a column-major [c, r] matrix with leading dimension ld. So the row-major
//   y[m, n] = x[m, k] · op(W)
// is issued as the column-major D[n, m] = op_A(A) · B with A = W (TRANSA = T for kNK, whose memory
// is column-major [k, n]; TRANSA = N for kKN, column-major [n, k]), B = x (column-major [k, m],
// TRANSB = N) and C = D = y (column-major [n, m]). Batches are CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT
// with per-matrix STRIDED_BATCH_OFFSET. Compute CUBLAS_COMPUTE_32F, scale type fp32, alpha = 1,
// beta = 0 (kOverwrite) or 1 (kAccumulate, in place: C == D). Split-K algorithms may only reduce
// their partial sums in fp32 (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE), so y is rounded once.
//
// Plans. A plan holds the matmul descriptor, the three layouts and the heuristic's first
// algorithm for one PlanKey. The key carries every layout number and the alignment of each
// operand (lowest set bit of its address, its row stride in bytes and, when batched, its batch
// stride in bytes, capped at 256), which is also passed to the heuristic as
// CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*, so an algorithm is never used on a less aligned operand
// than it was chosen for.
//
// Limits: m, n, k <= INT32_MAX; batch <= INT32_MAX; every operand's extent must fit in int64.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <utility>

#include "kernels/gemm/gemm.h"
#include "kernels/gemm/gemm_internal.h"

namespace kls::kernels {
namespace {

using gemm_internal::ElementBytes;
using gemm_internal::Extent;
using gemm_internal::Failure;
using gemm_internal::Overlaps;

constexpr uint32_t kMaxAlignment = 256;

// Runs a cuBLASLt call inside a function returning GemmStatus.
#define KLS_CUBLASLT_RETURN_IF_ERROR(expr)                               \
  do {                                                                   \
    const cublasStatus_t kls_cublaslt_status_ = (expr);                  \
    if (kls_cublaslt_status_ != CUBLAS_STATUS_SUCCESS) {                 \
      return Failure(kls_cublaslt_status_, cudaSuccess, "%s: %s", #expr, \
                     cublasLtGetStatusString(kls_cublaslt_status_));     \
    }                                                                    \
  } while (0)

// The largest power of two <= 256 dividing the address, the row stride in bytes and (batched)
// the batch stride in bytes: the alignment every row of every batch starts at.
uint32_t Alignment(const void* p, int64_t ld, int64_t batch, int64_t batch_stride,
                   size_t element_bytes) {
  uint64_t bits =
      reinterpret_cast<uintptr_t>(p) | kMaxAlignment | static_cast<uint64_t>(ld) * element_bytes;
  if (batch > 1) bits |= static_cast<uint64_t>(batch_stride) * element_bytes;
  return static_cast<uint32_t>(bits & (~bits + 1));
}

GemmStatus Validate(const GemmArgs& a) {
  constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();
  if (a.m < 0 || a.m > kMaxDim) return KLS_GEMM_INVALID("GemmArgs.m=%lld", (long long)a.m);
  if (a.n < 1 || a.n > kMaxDim) return KLS_GEMM_INVALID("GemmArgs.n=%lld", (long long)a.n);
  if (a.k < 1 || a.k > kMaxDim) return KLS_GEMM_INVALID("GemmArgs.k=%lld", (long long)a.k);
  if (a.batch < 0 || a.batch > kMaxDim) {
    return KLS_GEMM_INVALID("GemmArgs.batch=%lld", (long long)a.batch);
  }
  if (a.w_layout != GemmWeightLayout::kNK && a.w_layout != GemmWeightLayout::kKN) {
    return KLS_GEMM_INVALID("GemmArgs.w_layout=%d", static_cast<int>(a.w_layout));
  }
  if (a.y_type != GemmOutputType::kBf16 && a.y_type != GemmOutputType::kFp32) {
    return KLS_GEMM_INVALID("GemmArgs.y_type=%d", static_cast<int>(a.y_type));
  }
  if (a.mode != GemmOutputMode::kOverwrite && a.mode != GemmOutputMode::kAccumulate) {
    return KLS_GEMM_INVALID("GemmArgs.mode=%d", static_cast<int>(a.mode));
  }
  const bool nk = a.w_layout == GemmWeightLayout::kNK;
  const int64_t w_rows = nk ? a.n : a.k;
  const int64_t w_cols = nk ? a.k : a.n;
  if (a.ldx < a.k) {
    return KLS_GEMM_INVALID("GemmArgs.ldx=%lld < k=%lld", (long long)a.ldx, (long long)a.k);
  }
  if (a.ldw < w_cols) {
    return KLS_GEMM_INVALID("GemmArgs.ldw=%lld < %s=%lld", (long long)a.ldw, nk ? "k" : "n",
                            (long long)w_cols);
  }
  if (a.ldy < a.n) {
    return KLS_GEMM_INVALID("GemmArgs.ldy=%lld < n=%lld", (long long)a.ldy, (long long)a.n);
  }
  if (a.batch > 1 && (a.batch_stride_x < 0 || a.batch_stride_w < 0 || a.batch_stride_y < 0)) {
    return KLS_GEMM_INVALID("negative batch stride (x %lld, w %lld, y %lld)",
                            (long long)a.batch_stride_x, (long long)a.batch_stride_w,
                            (long long)a.batch_stride_y);
  }
  if (a.m == 0 || a.batch == 0) return GemmStatus{};  // no-op; pointers unused
  if (a.x == nullptr) return KLS_GEMM_INVALID("GemmArgs.x is null");
  if (a.w == nullptr) return KLS_GEMM_INVALID("GemmArgs.w is null");
  if (a.y == nullptr) return KLS_GEMM_INVALID("GemmArgs.y is null");
  const int64_t batch_x = a.batch > 1 ? a.batch_stride_x : 0;
  const int64_t batch_w = a.batch > 1 ? a.batch_stride_w : 0;
  const int64_t batch_y = a.batch > 1 ? a.batch_stride_y : 0;
  int64_t extent_x = 0, extent_w = 0, extent_y = 0;
  if (!Extent(a.m, a.k, a.ldx, a.batch, batch_x, &extent_x) ||
      !Extent(w_rows, w_cols, a.ldw, a.batch, batch_w, &extent_w) ||
      !Extent(a.m, a.n, a.ldy, a.batch, batch_y, &extent_y) ||
      extent_x > std::numeric_limits<int64_t>::max() / 4 ||
      extent_w > std::numeric_limits<int64_t>::max() / 4 ||
      extent_y > std::numeric_limits<int64_t>::max() / 4) {
    return KLS_GEMM_INVALID("operand extent overflows int64 (strides too large)");
  }
  const int64_t bf16 = sizeof(__nv_bfloat16);
  const int64_t y_bytes = extent_y * static_cast<int64_t>(ElementBytes(a.y_type));
  if (Overlaps(a.y, y_bytes, a.x, extent_x * bf16)) {
    return KLS_GEMM_INVALID("GemmArgs.y overlaps x");
  }
  if (Overlaps(a.y, y_bytes, a.w, extent_w * bf16)) {
    return KLS_GEMM_INVALID("GemmArgs.y overlaps w");
  }
  return GemmStatus{};
}

}  // namespace

size_t CublasLtGemm::PlanKeyHash::operator()(const PlanKey& key) const {
  uint64_t h = 0x9E3779B97F4A7C15ull;
  const auto mix = [&h](uint64_t v) { h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2); };
  for (int64_t v : {key.m, key.n, key.k, key.batch, key.ldx, key.ldw, key.ldy, key.batch_stride_x,
                    key.batch_stride_w, key.batch_stride_y}) {
    mix(static_cast<uint64_t>(v));
  }
  mix(static_cast<uint64_t>(key.w_layout));
  mix(static_cast<uint64_t>(key.y_type));
  mix(key.align_x | (uint64_t{key.align_w} << 16) | (uint64_t{key.align_y} << 32));
  return static_cast<size_t>(h);
}

GemmCreateResult CublasLtGemm::Create(const CublasLtGemmOptions& options) {
  GemmCreateResult result;
  if (options.workspace != nullptr &&
      reinterpret_cast<uintptr_t>(options.workspace) % kMaxAlignment != 0) {
    result.status = KLS_GEMM_INVALID("CublasLtGemmOptions.workspace %p is not 256-byte aligned",
                                     options.workspace);
    return result;
  }
  void* workspace = options.workspace;
  const bool owns = workspace == nullptr && options.workspace_bytes > 0;
  if (owns) {
    const cudaError_t err = cudaMalloc(&workspace, options.workspace_bytes);
    if (err != cudaSuccess) {
      result.status = Failure(CUBLAS_STATUS_SUCCESS, err, "cudaMalloc(%zu bytes of workspace): %s",
                              options.workspace_bytes, cudaGetErrorString(err));
      return result;
    }
  }
  cublasLtHandle_t handle = nullptr;
  const cublasStatus_t st = cublasLtCreate(&handle);
  if (st != CUBLAS_STATUS_SUCCESS) {
    if (owns) static_cast<void>(cudaFree(workspace));  // best effort; the create error wins
    result.status = Failure(st, cudaSuccess, "cublasLtCreate: %s", cublasLtGetStatusString(st));
    return result;
  }
  result.gemm.reset(
      new CublasLtGemm(handle, workspace, options.workspace_bytes, owns, options.max_cached_plans));
  return result;
}

CublasLtGemm::CublasLtGemm(cublasLtHandle_t handle, void* workspace, size_t workspace_bytes,
                           bool owns_workspace, size_t max_cached_plans)
    : handle_(handle),
      workspace_(workspace),
      workspace_bytes_(workspace_bytes),
      owns_workspace_(owns_workspace),
      max_cached_plans_(max_cached_plans) {}

CublasLtGemm::~CublasLtGemm() {
  for (auto& [key, plan] : plans_) DestroyPlan(plan);
  plans_.clear();
  // Destructors never fail: statuses are dropped (cudaFree waits for pending work first).
  if (handle_ != nullptr) static_cast<void>(cublasLtDestroy(handle_));
  if (owns_workspace_) static_cast<void>(cudaFree(workspace_));
}

void CublasLtGemm::DestroyPlan(Plan& plan) {
  if (plan.c != nullptr) static_cast<void>(cublasLtMatrixLayoutDestroy(plan.c));
  if (plan.b != nullptr) static_cast<void>(cublasLtMatrixLayoutDestroy(plan.b));
  if (plan.a != nullptr) static_cast<void>(cublasLtMatrixLayoutDestroy(plan.a));
  if (plan.op != nullptr) static_cast<void>(cublasLtMatmulDescDestroy(plan.op));
  plan = Plan{};
}

GemmStatus CublasLtGemm::CreatePlan(const PlanKey& key, Plan* plan) const {
  const bool nk = key.w_layout == GemmWeightLayout::kNK;
  const cublasOperation_t trans_a = nk ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t trans_b = CUBLAS_OP_N;
  const cudaDataType_t y_type = key.y_type == GemmOutputType::kFp32 ? CUDA_R_32F : CUDA_R_16BF;
  KLS_CUBLASLT_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  KLS_CUBLASLT_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA,
                                                              &trans_a, sizeof(trans_a)));
  KLS_CUBLASLT_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB,
                                                              &trans_b, sizeof(trans_b)));
  // Stored (pre-op) shapes, column-major: A = W is [k, n] (kNK) or [n, k] (kKN); B = x is [k, m];
  // C = D = y is [n, m].
  KLS_CUBLASLT_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, static_cast<uint64_t>(nk ? key.k : key.n),
                                 static_cast<uint64_t>(nk ? key.n : key.k), key.ldw));
  KLS_CUBLASLT_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(
      &plan->b, CUDA_R_16BF, static_cast<uint64_t>(key.k), static_cast<uint64_t>(key.m), key.ldx));
  KLS_CUBLASLT_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(
      &plan->c, y_type, static_cast<uint64_t>(key.n), static_cast<uint64_t>(key.m), key.ldy));
  if (key.batch > 1) {
    const int32_t batch = static_cast<int32_t>(key.batch);
    const std::pair<cublasLtMatrixLayout_t, int64_t> layouts[] = {{plan->a, key.batch_stride_w},
                                                                  {plan->b, key.batch_stride_x},
                                                                  {plan->c, key.batch_stride_y}};
    for (const auto& [layout, stride] : layouts) {
      KLS_CUBLASLT_RETURN_IF_ERROR(cublasLtMatrixLayoutSetAttribute(
          layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
      KLS_CUBLASLT_RETURN_IF_ERROR(cublasLtMatrixLayoutSetAttribute(
          layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
    }
  }

  cublasLtMatmulPreference_t preference = nullptr;
  KLS_CUBLASLT_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&preference));
  const uint64_t workspace_bytes = workspace_bytes_;
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_w},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_x},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_y},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_y}};
  // Split-K partial sums only in fp32 (COMPUTE_TYPE): the INPLACE and OUTPUT_TYPE schemes add
  // partials in the output type, which would round a bf16 output more than once.
  const uint32_t reduction_mask = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  cublasStatus_t st =
      cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                           &workspace_bytes, sizeof(workspace_bytes));
  if (st == CUBLAS_STATUS_SUCCESS) {
    st =
        cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                             &reduction_mask, sizeof(reduction_mask));
  }
  for (const auto& [attribute, value] : alignments) {
    if (st != CUBLAS_STATUS_SUCCESS) break;
    st = cublasLtMatmulPreferenceSetAttribute(preference, attribute, &value, sizeof(value));
  }
  cublasLtMatmulHeuristicResult_t heuristic{};
  int returned = 0;
  if (st == CUBLAS_STATUS_SUCCESS) {
    st = cublasLtMatmulAlgoGetHeuristic(handle_, plan->op, plan->a, plan->b, plan->c, plan->c,
                                        preference, 1, &heuristic, &returned);
  }
  static_cast<void>(cublasLtMatmulPreferenceDestroy(preference));  // its status adds nothing
  if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED) {
    return Failure(st, cudaSuccess, "cublasLtMatmulAlgoGetHeuristic: %s",
                   cublasLtGetStatusString(st));
  }
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || returned < 1 ||
      heuristic.state != CUBLAS_STATUS_SUCCESS) {
    return Failure(CUBLAS_STATUS_NOT_SUPPORTED, cudaSuccess,
                   "no cuBLASLt algorithm for m=%lld n=%lld k=%lld batch=%lld %s %s ldx=%lld "
                   "ldw=%lld ldy=%lld align x/w/y=%u/%u/%u",
                   (long long)key.m, (long long)key.n, (long long)key.k, (long long)key.batch,
                   nk ? "kNK" : "kKN", key.y_type == GemmOutputType::kFp32 ? "fp32" : "bf16",
                   (long long)key.ldx, (long long)key.ldw, (long long)key.ldy, key.align_x,
                   key.align_w, key.align_y);
  }
  plan->algo = heuristic.algo;
  return GemmStatus{};
}

GemmStatus CublasLtGemm::FindOrCreatePlan(const GemmArgs& a, bool pin, bool check_capture,
                                          cudaStream_t stream_to_check, const Plan** plan) {
  const bool batched = a.batch > 1;
  const PlanKey key{
      .m = a.m,
      .n = a.n,
      .k = a.k,
      .batch = a.batch,
      .ldx = a.ldx,
      .ldw = a.ldw,
      .ldy = a.ldy,
      .batch_stride_x = batched ? a.batch_stride_x : 0,
      .batch_stride_w = batched ? a.batch_stride_w : 0,
      .batch_stride_y = batched ? a.batch_stride_y : 0,
      .w_layout = a.w_layout,
      .y_type = a.y_type,
      .align_x = Alignment(a.x, a.ldx, a.batch, a.batch_stride_x, sizeof(__nv_bfloat16)),
      .align_w = Alignment(a.w, a.ldw, a.batch, a.batch_stride_w, sizeof(__nv_bfloat16)),
      .align_y = Alignment(a.y, a.ldy, a.batch, a.batch_stride_y, ElementBytes(a.y_type)),
  };
  if (auto it = plans_.find(key); it != plans_.end()) {
    it->second.pinned |= pin;
    *plan = &it->second;
    return GemmStatus{};
  }
  if (check_capture) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    const cudaError_t err = cudaStreamIsCapturing(stream_to_check, &capture);
    if (err != cudaSuccess) {
      return Failure(CUBLAS_STATUS_SUCCESS, err, "cudaStreamIsCapturing: %s",
                     cudaGetErrorString(err));
    }
    if (capture != cudaStreamCaptureStatusNone) {
      return Failure(CUBLAS_STATUS_SUCCESS, cudaErrorStreamCaptureUnsupported,
                     "no plan for m=%lld n=%lld k=%lld batch=%lld while the stream is capturing: "
                     "call CublasLtGemm::Prepare (or run it once) before capture",
                     (long long)a.m, (long long)a.n, (long long)a.k, (long long)a.batch);
    }
  }
  Plan created;
  const GemmStatus status = CreatePlan(key, &created);
  if (!status.ok()) {
    DestroyPlan(created);
    return status;
  }
  created.pinned = pin;
  if (plans_.size() >= max_cached_plans_) {
    // Drop every unpinned plan: simple, and a captured graph does not reference descriptors.
    for (auto it = plans_.begin(); it != plans_.end();) {
      if (it->second.pinned) {
        ++it;
      } else {
        DestroyPlan(it->second);
        it = plans_.erase(it);
      }
    }
  }
  *plan = &plans_.emplace(key, created).first->second;
  return GemmStatus{};
}

GemmStatus CublasLtGemm::Prepare(const GemmArgs& args) {
  const GemmStatus status = Validate(args);
  if (!status.ok() || args.m == 0 || args.batch == 0) return status;
  const Plan* plan = nullptr;
  return FindOrCreatePlan(args, /*pin=*/true, /*check_capture=*/false, nullptr, &plan);
}

GemmStatus CublasLtGemm::Run(const GemmArgs& args, cudaStream_t stream) {
  GemmStatus status = Validate(args);
  if (!status.ok() || args.m == 0 || args.batch == 0) return status;
  const Plan* plan = nullptr;
  status = FindOrCreatePlan(args, /*pin=*/false, /*check_capture=*/true, stream, &plan);
  if (!status.ok()) return status;
  const float alpha = 1.0f;
  const float beta = args.mode == GemmOutputMode::kAccumulate ? 1.0f : 0.0f;
  KLS_CUBLASLT_RETURN_IF_ERROR(cublasLtMatmul(handle_, plan->op, &alpha, args.w, plan->a, args.x,
                                              plan->b, &beta, args.y, plan->c, args.y, plan->c,
                                              &plan->algo, workspace_, workspace_bytes_, stream));
  return GemmStatus{};
}

GemmStatus CublasLtGemm::Linear(const __nv_bfloat16* x, int64_t ldx, const __nv_bfloat16* w,
                                __nv_bfloat16* y, int64_t ldy, int64_t m, int64_t n, int64_t k,
                                GemmOutputMode mode, cudaStream_t stream) {
  return Run(LinearArgs(x, ldx, w, y, ldy, m, n, k, mode), stream);
}

GemmStatus CublasLtGemm::Linear(const __nv_bfloat16* x, int64_t ldx, const __nv_bfloat16* w,
                                float* y, int64_t ldy, int64_t m, int64_t n, int64_t k,
                                GemmOutputMode mode, cudaStream_t stream) {
  return Run(LinearArgs(x, ldx, w, y, ldy, m, n, k, mode), stream);
}

GemmArgs LinearArgs(const __nv_bfloat16* x, int64_t ldx, const __nv_bfloat16* w, __nv_bfloat16* y,
                    int64_t ldy, int64_t m, int64_t n, int64_t k, GemmOutputMode mode) {
  GemmArgs a;
  a.m = m;
  a.n = n;
  a.k = k;
  a.x = x;
  a.ldx = ldx;
  a.w = w;
  a.w_layout = GemmWeightLayout::kNK;
  a.ldw = k;
  a.y = y;
  a.y_type = GemmOutputType::kBf16;
  a.ldy = ldy;
  a.mode = mode;
  return a;
}

GemmArgs LinearArgs(const __nv_bfloat16* x, int64_t ldx, const __nv_bfloat16* w, float* y,
                    int64_t ldy, int64_t m, int64_t n, int64_t k, GemmOutputMode mode) {
  GemmArgs a = LinearArgs(x, ldx, w, static_cast<__nv_bfloat16*>(nullptr), ldy, m, n, k, mode);
  a.y = y;
  a.y_type = GemmOutputType::kFp32;
  return a;
}

GemmArgs MlaAbsorbQueryArgs(const __nv_bfloat16* q_nope, int64_t q_row_stride,
                            int64_t q_head_stride, const __nv_bfloat16* kv_b_proj,
                            __nv_bfloat16* q_latent, int64_t out_row_stride,
                            int64_t out_head_stride, int64_t tokens, int heads, int dn, int dv,
                            int dc) {
  GemmArgs a;
  a.m = tokens;
  a.n = dc;
  a.k = dn;
  a.batch = heads;
  a.x = q_nope;
  a.ldx = q_row_stride;
  a.batch_stride_x = q_head_stride;
  a.w = kv_b_proj;  // W_UK^h = rows [h·(dn+dv), h·(dn+dv)+dn): [dn, dc] = [k, n]
  a.w_layout = GemmWeightLayout::kKN;
  a.ldw = dc;
  a.batch_stride_w = static_cast<int64_t>(dn + dv) * dc;
  a.y = q_latent;
  a.y_type = GemmOutputType::kBf16;
  a.ldy = out_row_stride;
  a.batch_stride_y = out_head_stride;
  return a;
}

GemmArgs MlaAbsorbOutputArgs(const __nv_bfloat16* o_latent, int64_t o_row_stride,
                             int64_t o_head_stride, const __nv_bfloat16* kv_b_proj,
                             __nv_bfloat16* out, int64_t out_row_stride, int64_t out_head_stride,
                             int64_t tokens, int heads, int dn, int dv, int dc) {
  GemmArgs a;
  a.m = tokens;
  a.n = dv;
  a.k = dc;
  a.batch = heads;
  a.x = o_latent;
  a.ldx = o_row_stride;
  a.batch_stride_x = o_head_stride;
  // W_UV^h = rows [h·(dn+dv)+dn, (h+1)·(dn+dv)): [dv, dc] = [n, k]
  a.w = kv_b_proj == nullptr ? nullptr : kv_b_proj + static_cast<int64_t>(dn) * dc;
  a.w_layout = GemmWeightLayout::kNK;
  a.ldw = dc;
  a.batch_stride_w = static_cast<int64_t>(dn + dv) * dc;
  a.y = out;
  a.y_type = GemmOutputType::kBf16;
  a.ldy = out_row_stride;
  a.batch_stride_y = out_head_stride;
  return a;
}

}  // namespace kls::kernels

#include "engine/backend/cuda/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/backend/cuda/cuda_ops.h"
#include "engine/backend/cuda/cuda_util.h"
#include "engine/backend/cuda/state_memory.h"
#include "engine/model/safetensors.h"
#include "kernels/conv/conv.h"
#include "kernels/embed/embed.h"
#include "kernels/gemm/gemm.h"
#include "kernels/kda/kda.h"
#include "kernels/mla/mla.h"
#include "kernels/moe/moe.h"
#include "kernels/norm/norm.h"
#include "kernels/sampling/sampling.h"

namespace kls::engine {

using cuda::bf16;
using cuda::CudaStatus;
using cuda::DeviceMemory;
using cuda::PinnedMemory;

bool CudaDeviceAvailable() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

namespace {

absl::Status GemmStatusOf(const kernels::GemmStatus& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  if (s.cuda != cudaSuccess) return CudaStatus(s.cuda, absl::StrCat(what, ": ", s.message));
  return absl::InternalError(
      absl::StrCat(what, ": cuBLASLt status ", static_cast<int>(s.cublas), ": ", s.message));
}

#define KLS_GEMM(expr) KLS_RETURN_IF_ERROR(GemmStatusOf((expr), #expr))

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Host sizes of one step. Decode sequences (one new token each) come first, so their tokens
// are rows [0, nd); prefill sequences follow.
struct StepPlan {
  int n = 0, nd = 0, np = 0;
  int64_t t = 0;
  int table_width = 0;   // pages per block-table row
  int max_new = 1;       // longest new-token run
  int64_t ctx_rows = 0;  // Σ context tokens of the prefill group (decompressed MLA rows)
  int max_seq_len = 0;   // bound of the decode group's cache lengths (MLA split count)
};

// Offsets (in int32 elements) of the step's device metadata, a function of the plan's sizes
// only, so a captured graph keeps reading the same addresses. The block table [n, table_width]
// comes last: a decode step's rows are as wide as the longest context the model allows, and
// only their used prefix is written and uploaded.
struct MetaLayout {
  size_t ids, cu_all, slots, seq_starts, seq_lens_d, cu_p, cu_k, last_rows, block_table, total;
  explicit MetaLayout(const StepPlan& p) {
    size_t at = 0;
    const auto take = [&at](size_t n) {
      const size_t here = at;
      at += (n + 3) & ~size_t{3};  // 16-byte aligned sections
      return here;
    };
    ids = take(static_cast<size_t>(p.t));
    cu_all = take(p.n + 1);
    slots = take(p.n);
    seq_starts = take(p.n);
    seq_lens_d = take(std::max(p.nd, 1));
    cu_p = take(p.np + 1);
    cu_k = take(p.np + 1);
    last_rows = take(p.n);
    block_table = take(static_cast<size_t>(p.n) * p.table_width);
    total = at;
  }
};

}  // namespace

struct CudaBackend::Impl {
  // ---- Fixed at creation ---------------------------------------------------------------------
  const Backend* facade = nullptr;
  CudaBackendOptions options;
  cuda::DeviceWeights weights;
  ModelConfig c;
  cuda::CudaStream stream;
  std::unique_ptr<kernels::CublasLtGemm> gemm;
  // Dimensions.
  int64_t d = 0, v = 0;
  int h = 0, k = 0, hk = 0, width = 0;
  int nh = 0, dn = 0, dr = 0, dv = 0, dc = 0, dqk = 0, cd = 0;
  int experts = 0, top_k = 0, moe_width = 0, shared_width = 0, dense_width = 0;
  int num_kda = 0, num_mla = 0;
  int table_cap = 0;  // pages a full-context sequence needs
  float eps = 0.f;
  // State memory.
  cuda::StateMemoryPlan plan;
  std::unique_ptr<cuda::SlotAllocator> slots;
  std::unique_ptr<cuda::PagePool> pages;
  int64_t kda_slot_elems = 0, conv_slot_elems = 0, page_elems = 0;  // per layer
  DeviceMemory kda_state, conv_state, mla_cache;
  // Step buffers (sized for max_step_tokens / max_step_seqs).
  DeviceMemory x, normed, delta, proj, conv_out, low, f, g, beta, kda_out, mid, kv, rows, attn;
  DeviceMemory q_latent, q_pe, o_latent, router_logits, expert_ids, expert_weights, shared_out;
  DeviceMemory moe_ws, kda_ws, mla_ws, last, logits_dev, meta_dev, error_flag;
  // ForwardSample: per-row SamplerConfig [nm], counters [nm] uint64, tokens then ok flags
  // [2, nm] int32.
  DeviceMemory sample_configs, sample_counters, sample_out;
  size_t moe_ws_bytes = 0, kda_ws_bytes = 0, mla_ws_bytes = 0;
  PinnedMemory meta_host, logits_host;
  // Prefill decompression and import/export scratch, grown on demand (never inside a graph).
  DeviceMemory lat_ctx, kvb, keys, scratch_rows, scratch_meta;
  int64_t prefill_rows_cap = 0, scratch_rows_cap = 0;
  // Graphs of decode-only steps, by batch size; steps seen eagerly so far (a graph is captured
  // on the second step of a size, when every cuBLASLt plan and kernel attribute exists).
  std::map<int, cuda::CudaGraphExec> graphs;
  std::map<int, int> eager_steps;
  std::set<int> graph_failed;
  absl::Status sticky = absl::OkStatus();
  int64_t last_step_tokens = 0;  // tokens of the last successful Forward

  cudaStream_t s() const { return stream.get(); }
  // The CUDA device is per host thread: the engine thread that calls the backend selects it.
  absl::Status UseDevice() const {
    return CudaStatus(cudaSetDevice(options.device), "cudaSetDevice");
  }
  float* kda_pool(int slot_layer) const {
    return kda_state.as<float>() +
           static_cast<int64_t>(slot_layer) * plan.num_slots * kda_slot_elems;
  }
  bf16* conv_pool(int slot_layer) const {
    return conv_state.as<bf16>() +
           static_cast<int64_t>(slot_layer) * plan.num_slots * conv_slot_elems;
  }
  bf16* mla_pool(int slot_layer) const {
    return mla_cache.as<bf16>() + static_cast<int64_t>(slot_layer) * plan.num_pages * page_elems;
  }

  // Records a CUDA failure; sticky ones disable the backend for good.
  absl::Status Fail(absl::Status status) {
    const cudaError_t last = cudaPeekAtLastError();
    if (cuda::IsStickyCudaError(last) && sticky.ok()) {
      sticky = CudaStatus(last, "the GPU is in an unrecoverable state");
      KLS_LOG(ERROR) << sticky;
    }
    return status;
  }

  absl::Status Init();
  absl::Status ZeroSlot(int32_t slot);
  absl::Status CopySlot(int32_t from, int32_t to);
  absl::Status CopyPages(const std::vector<cuda::PageCopy>& copies);
  absl::Status EnsurePrefillScratch(int64_t rows);
  absl::Status EnsureScratchRows(int64_t rows);
  absl::Status RunModel(const StepPlan& p);
  absl::Status KdaLayer(const cuda::LayerDeviceWeights& L, const StepPlan& p, const MetaLayout& m);
  absl::Status MlaLayer(const cuda::LayerDeviceWeights& L, const StepPlan& p, const MetaLayout& m);
  absl::Status Ffn(const cuda::LayerDeviceWeights& L, const StepPlan& p);
  absl::Status RunStep(const StepPlan& p, bool decode_only);
  // One projection y = x·Wᵀ over a step's rows: x [rows, k] (row stride ldx), W an nn.Linear
  // weight [n, k] (dense), y [rows, n] (row stride ldy) of y_type, overwritten.
  struct Projection {
    const bf16* x;
    int64_t ldx;
    const bf16* w;
    void* y;
    kernels::GemmOutputType y_type;
    int64_t ldy, n, k;
  };
  // Runs independent projections of `rows` rows: for a decode-sized step (rows <=
  // options.skinny_gemm_max_rows) all in one skinny-GEMM launch, a pass over the weights at
  // memory speed; otherwise (or when a shape does not suit it) one cuBLASLt GEMM each.
  absl::Status Project(int64_t rows, std::initializer_list<Projection> projections);
  // Grows a state's page table by `tokens` (a model without MLA layers only counts tokens).
  bool AppendTokens(cuda::PageTable& table, int64_t tokens, std::vector<cuda::PageCopy>* copies) {
    if (num_mla == 0) {
      table.num_tokens += tokens;
      return true;
    }
    return pages->Append(table, tokens, copies);
  }
  int64_t PagesToAppend(const cuda::PageTable& table, int64_t tokens) const {
    return num_mla == 0 ? 0 : pages->PagesToAppend(table, tokens);
  }
  void ReleaseSlot(int32_t slot) { slots->Release(slot); }
  void ReleasePages(cuda::PageTable& table) { pages->ReleaseAll(table); }
};

namespace {

class CudaState final : public BackendState {
 public:
  CudaState(const Backend* owner, CudaBackend::Impl* impl, int32_t slot)
      : BackendState(owner), impl_(impl), slot(slot) {}
  ~CudaState() override {
    impl_->ReleasePages(pages);
    impl_->ReleaseSlot(slot);
  }
  int64_t num_tokens() const override { return pages.num_tokens; }
  int64_t ByteSize() const override {
    return impl_->plan.slot_bytes +
           static_cast<int64_t>(pages.pages.size()) * impl_->plan.page_bytes;
  }

  CudaBackend::Impl* impl_;
  int32_t slot;
  cuda::PageTable pages;
};

class CudaCheckpoint final : public StateCheckpoint {
 public:
  CudaCheckpoint(const Backend* owner, CudaBackend::Impl* impl, const BackendState& of,
                 int32_t slot, int64_t tokens)
      : StateCheckpoint(owner, of), impl_(impl), slot(slot), tokens(tokens) {}
  ~CudaCheckpoint() override { impl_->ReleaseSlot(slot); }
  int64_t num_tokens() const override { return tokens; }

  CudaBackend::Impl* impl_;
  int32_t slot;
  int64_t tokens;
};

}  // namespace

// ---- Creation ----------------------------------------------------------------------------------

absl::Status CudaBackend::Impl::Init() {
  c = weights.config();
  d = c.hidden_size;
  v = c.vocab_size;
  h = c.linear_attn_config.num_heads;
  k = c.linear_attn_config.head_dim;
  hk = h * k;
  width = c.linear_attn_config.short_conv_kernel_size;
  nh = c.num_attention_heads;
  dn = c.qk_nope_head_dim;
  dr = c.qk_rope_head_dim;
  dv = c.v_head_dim;
  dc = c.kv_lora_rank;
  dqk = dn + dr;
  cd = dc + dr;
  experts = c.num_experts;
  top_k = c.num_experts_per_token;
  moe_width = c.moe_intermediate_size;
  shared_width = c.num_shared_experts * c.moe_intermediate_size;
  dense_width = c.intermediate_size;
  num_kda = c.num_kda_layers();
  num_mla = c.num_mla_layers();
  eps = static_cast<float>(c.rms_norm_eps);
  if (options.page_size < 16 || options.page_size > 256 || options.page_size % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: page size ", options.page_size,
                                                   " is not a multiple of 16 in [16, 256]"));
  }
  if (options.max_step_tokens < 1 || options.max_step_seqs < 1 || options.max_sessions < 1) {
    return absl::InvalidArgumentError("cuda backend: step and session limits must be >= 1");
  }
  if (options.skinny_gemm_max_rows < 0 ||
      options.skinny_gemm_max_rows > kernels::kSkinnyGemmMaxRows) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: skinny_gemm_max_rows ",
                                                   options.skinny_gemm_max_rows, " is not in [0, ",
                                                   kernels::kSkinnyGemmMaxRows, "]"));
  }
  table_cap = static_cast<int>(CeilDiv(c.model_max_length, options.page_size));
  KLS_RETURN_IF_ERROR(stream.Create());

  kernels::CublasLtGemmOptions gemm_options;
  kernels::GemmCreateResult created = kernels::CublasLtGemm::Create(gemm_options);
  KLS_RETURN_IF_ERROR(GemmStatusOf(created.status, "creating cuBLASLt"));
  gemm = std::move(created.gemm);

  // Step buffers.
  const int64_t tm = options.max_step_tokens, nm = options.max_step_seqs;
  const auto alloc = [](DeviceMemory& m, int64_t bytes, const char* what) -> absl::Status {
    KLS_ASSIGN_OR_RETURN(
        m, DeviceMemory::Allocate(static_cast<size_t>(std::max<int64_t>(bytes, 16)), what));
    return absl::OkStatus();
  };
  const int64_t proj_width = std::max<int64_t>(
      {3 * hk, int64_t{nh} * dqk, 2 * int64_t{dense_width}, 2 * int64_t{shared_width}});
  KLS_RETURN_IF_ERROR(alloc(x, tm * d * 4, "residual (fp32)"));
  KLS_RETURN_IF_ERROR(alloc(normed, tm * d * 2, "normed activations"));
  KLS_RETURN_IF_ERROR(alloc(delta, tm * d * 2, "layer outputs"));
  KLS_RETURN_IF_ERROR(alloc(proj, tm * proj_width * 2, "projections"));
  KLS_RETURN_IF_ERROR(alloc(conv_out, tm * 3 * hk * 2, "conv outputs"));
  KLS_RETURN_IF_ERROR(alloc(low, tm * 2 * k * 2, "low-rank gates"));
  KLS_RETURN_IF_ERROR(alloc(f, tm * hk * 2, "KDA gate"));
  KLS_RETURN_IF_ERROR(alloc(g, tm * hk * 2, "KDA output gate"));
  KLS_RETURN_IF_ERROR(alloc(beta, tm * h * 2, "KDA beta"));
  KLS_RETURN_IF_ERROR(alloc(kda_out, tm * hk * 2, "KDA outputs"));
  KLS_RETURN_IF_ERROR(
      alloc(mid, tm * std::max<int64_t>({dense_width, shared_width, 1}) * 2, "SwiGLU"));
  KLS_RETURN_IF_ERROR(alloc(kv, tm * cd * 2, "MLA kv_a"));
  KLS_RETURN_IF_ERROR(alloc(rows, tm * cd * 2, "MLA cache rows"));
  KLS_RETURN_IF_ERROR(alloc(attn, tm * nh * dv * 2, "MLA outputs"));
  KLS_RETURN_IF_ERROR(alloc(q_latent, nm * nh * dc * 2, "MLA absorbed queries"));
  KLS_RETURN_IF_ERROR(alloc(q_pe, nm * nh * std::max(dr, 1) * 2, "MLA rope queries"));
  KLS_RETURN_IF_ERROR(alloc(o_latent, nm * nh * dc * 2, "MLA latent outputs"));
  KLS_RETURN_IF_ERROR(alloc(router_logits, tm * std::max(experts, 1) * 4, "router logits"));
  KLS_RETURN_IF_ERROR(alloc(expert_ids, tm * std::max(top_k, 1) * 4, "expert ids"));
  KLS_RETURN_IF_ERROR(alloc(expert_weights, tm * std::max(top_k, 1) * 4, "expert weights"));
  KLS_RETURN_IF_ERROR(alloc(shared_out, tm * d * 2, "shared expert"));
  KLS_RETURN_IF_ERROR(alloc(last, nm * d * 2, "last positions"));
  KLS_RETURN_IF_ERROR(alloc(logits_dev, nm * v * 4, "logits"));
  KLS_RETURN_IF_ERROR(alloc(error_flag, 4, "error flag"));
  KLS_RETURN_IF_ERROR(
      alloc(sample_configs, nm * static_cast<int64_t>(sizeof(kernels::SamplerConfig)), "sampling"));
  KLS_RETURN_IF_ERROR(alloc(sample_counters, nm * 8, "sampling"));
  KLS_RETURN_IF_ERROR(alloc(sample_out, 2 * nm * 4, "sampled tokens"));
  KLS_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(error_flag.get(), 0, 4, s()));

  // Kernel workspaces at their largest.
  if (experts > 0) {
    for (kernels::MoePath path : {kernels::MoePath::kDecode, kernels::MoePath::kPrefill}) {
      kernels::MoeExpertsParams mp;
      mp.num_tokens = tm;
      mp.hidden_size = static_cast<int>(d);
      mp.intermediate_size = moe_width;
      mp.num_experts = experts;
      mp.top_k = top_k;
      mp.path = path;
      size_t bytes = 0;
      KLS_CUDA_RETURN_IF_ERROR(kernels::MoeExpertsWorkspaceBytes(mp, &bytes));
      moe_ws_bytes = std::max(moe_ws_bytes, bytes);
    }
    KLS_RETURN_IF_ERROR(alloc(moe_ws, static_cast<int64_t>(moe_ws_bytes), "MoE workspace"));
  }
  if (num_kda > 0) {
    kernels::KdaParams kp;
    kp.num_seqs = static_cast<int>(nm);
    kp.total_tokens = tm;
    kp.max_seqlen = static_cast<int>(tm);
    kp.num_heads = h;
    kp.head_dim = k;
    kda_ws_bytes = kernels::KdaChunkWorkspaceBytes(kp);
    if (kda_ws_bytes == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda backend: KDA head dim ", k, " is not supported (64 or 128)"));
    }
    KLS_RETURN_IF_ERROR(alloc(kda_ws, static_cast<int64_t>(kda_ws_bytes), "KDA workspace"));
  }
  if (num_mla > 0) {
    // The split count is not monotone in the batch size: size for every one.
    for (int64_t n = 1; n <= nm; ++n) {
      kernels::MlaDecodeParams mp;
      mp.num_seqs = static_cast<int>(n);
      mp.num_heads = nh;
      mp.head_dim_latent = dc;
      mp.head_dim_rope = dr;
      mp.page_size = options.page_size;
      mp.max_seq_len = static_cast<int>(c.model_max_length);
      mp.max_pages_per_seq = table_cap;
      mp.num_pages = 1;
      mla_ws_bytes = std::max(mla_ws_bytes, kernels::MlaDecodeWorkspaceBytes(mp));
    }
    KLS_RETURN_IF_ERROR(alloc(mla_ws, static_cast<int64_t>(mla_ws_bytes), "MLA workspace"));
  }

  // Metadata for the largest step (a decode step uses the full table width).
  StepPlan biggest;
  biggest.n = static_cast<int>(nm);
  biggest.nd = static_cast<int>(nm);
  biggest.np = static_cast<int>(nm);
  biggest.t = tm;
  biggest.table_width = table_cap;
  const size_t meta_bytes = MetaLayout(biggest).total * 4;
  KLS_RETURN_IF_ERROR(alloc(meta_dev, static_cast<int64_t>(meta_bytes), "step metadata"));
  KLS_ASSIGN_OR_RETURN(meta_host, PinnedMemory::Allocate(meta_bytes, "step metadata"));
  // Logits, then the device-side gather error flag (read with them, after each step).
  KLS_ASSIGN_OR_RETURN(logits_host,
                       PinnedMemory::Allocate(static_cast<size_t>(nm * v * 4) + 16, "logits"));

  // State memory: what is left.
  kda_slot_elems = int64_t{h} * k * k;
  conv_slot_elems = int64_t{3} * (width - 1) * hk;
  page_elems = int64_t{options.page_size} * cd;
  cuda::StateMemoryInput in;
  size_t free_bytes = 0, total_bytes = 0;
  KLS_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  in.available_bytes = options.state_memory_bytes > 0
                           ? options.state_memory_bytes
                           : static_cast<int64_t>(free_bytes) - options.reserve_bytes;
  in.slot_bytes = num_kda * (kda_slot_elems * 4 + conv_slot_elems * 2);
  in.page_bytes = num_mla * page_elems * 2;
  if (in.slot_bytes == 0) in.slot_bytes = 256;  // a model without KDA layers still needs ids
  in.page_size = options.page_size;
  in.max_sessions = options.max_sessions;
  in.max_context = c.model_max_length;
  KLS_ASSIGN_OR_RETURN(plan, cuda::PlanStateMemory(in));
  KLS_RETURN_IF_ERROR(
      alloc(kda_state, num_kda * plan.num_slots * kda_slot_elems * 4, "KDA states"));
  KLS_RETURN_IF_ERROR(
      alloc(conv_state, num_kda * plan.num_slots * conv_slot_elems * 2, "conv states"));
  KLS_RETURN_IF_ERROR(alloc(mla_cache, num_mla * plan.num_pages * page_elems * 2, "MLA cache"));
  slots = std::make_unique<cuda::SlotAllocator>(plan.num_slots);
  pages = std::make_unique<cuda::PagePool>(plan.num_pages, options.page_size);
  KLS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s()));
  KLS_LOG(INFO) << "cuda backend: " << (weights.bytes() >> 20) << " MiB of weights, "
                << plan.num_slots << " KDA slots of " << (plan.slot_bytes >> 20) << " MiB, "
                << plan.num_pages << " cache pages of " << options.page_size << " tokens ("
                << (plan.bytes() >> 20) << " MiB of state)";
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(
    cuda::DeviceWeights weights, const CudaBackendOptions& options) {
  KLS_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->weights = std::move(weights);
  KLS_RETURN_IF_ERROR(impl->Init());
  auto backend = std::unique_ptr<CudaBackend>(new CudaBackend(std::move(impl)));
  backend->impl_->facade = backend.get();
  return backend;
}

CudaBackend::CudaBackend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaBackend::~CudaBackend() {
  if (impl_ != nullptr && impl_->stream.get() != nullptr) cudaStreamSynchronize(impl_->s());
}

const ModelConfig& CudaBackend::config() const { return impl_->c; }
absl::Status CudaBackend::healthy() const {
  if (impl_->sticky.ok() && cuda::IsStickyCudaError(cudaPeekAtLastError())) {
    return CudaStatus(cudaPeekAtLastError(), "the GPU is in an unrecoverable state");
  }
  return impl_->sticky;
}
int32_t CudaBackend::num_slots() const { return impl_->plan.num_slots; }
int32_t CudaBackend::num_pages() const { return impl_->plan.num_pages; }
int32_t CudaBackend::free_slots() const { return impl_->slots->num_free(); }
int32_t CudaBackend::free_pages() const { return impl_->pages->num_free(); }
int64_t CudaBackend::weight_bytes() const { return impl_->weights.bytes(); }
int64_t CudaBackend::state_bytes() const { return impl_->plan.bytes(); }
int CudaBackend::graphs_captured() const { return static_cast<int>(impl_->graphs.size()); }

// ---- State memory -------------------------------------------------------------------------------

absl::Status CudaBackend::Impl::ZeroSlot(int32_t slot) {
  if (num_kda == 0) return absl::OkStatus();
  // Slot `slot` of every layer: rows of a [layers][slots][elems] array, one pitched memset each.
  KLS_CUDA_RETURN_IF_ERROR(cudaMemset2DAsync(kda_state.as<float>() + slot * kda_slot_elems,
                                             plan.num_slots * kda_slot_elems * 4, 0,
                                             kda_slot_elems * 4, num_kda, s()));
  KLS_CUDA_RETURN_IF_ERROR(cudaMemset2DAsync(conv_state.as<bf16>() + slot * conv_slot_elems,
                                             plan.num_slots * conv_slot_elems * 2, 0,
                                             conv_slot_elems * 2, num_kda, s()));
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::CopySlot(int32_t from, int32_t to) {
  if (num_kda == 0) return absl::OkStatus();
  const size_t kda_pitch = plan.num_slots * kda_slot_elems * 4;
  const size_t conv_pitch = plan.num_slots * conv_slot_elems * 2;
  KLS_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(kda_state.as<float>() + to * kda_slot_elems, kda_pitch,
                                             kda_state.as<float>() + from * kda_slot_elems,
                                             kda_pitch, kda_slot_elems * 4, num_kda,
                                             cudaMemcpyDeviceToDevice, s()));
  KLS_CUDA_RETURN_IF_ERROR(
      cudaMemcpy2DAsync(conv_state.as<bf16>() + to * conv_slot_elems, conv_pitch,
                        conv_state.as<bf16>() + from * conv_slot_elems, conv_pitch,
                        conv_slot_elems * 2, num_kda, cudaMemcpyDeviceToDevice, s()));
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::CopyPages(const std::vector<cuda::PageCopy>& copies) {
  const size_t page_bytes = static_cast<size_t>(page_elems) * 2;
  const size_t pitch = static_cast<size_t>(plan.num_pages) * page_bytes;
  for (const cuda::PageCopy& cp : copies) {
    if (num_mla == 0) break;
    KLS_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(mla_cache.as<bf16>() + cp.to * page_elems, pitch,
                                               mla_cache.as<bf16>() + cp.from * page_elems, pitch,
                                               page_bytes, num_mla, cudaMemcpyDeviceToDevice, s()));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::EnsurePrefillScratch(int64_t need) {
  if (need <= prefill_rows_cap) return absl::OkStatus();
  const int64_t rows_cap = std::max(need, prefill_rows_cap * 2);
  lat_ctx.Reset();
  kvb.Reset();
  keys.Reset();
  prefill_rows_cap = 0;
  KLS_ASSIGN_OR_RETURN(lat_ctx, DeviceMemory::Allocate(rows_cap * cd * 2, "MLA context rows"));
  KLS_ASSIGN_OR_RETURN(kvb, DeviceMemory::Allocate(rows_cap * nh * (dn + dv) * 2,
                                                   "decompressed MLA keys and values"));
  KLS_ASSIGN_OR_RETURN(keys, DeviceMemory::Allocate(rows_cap * nh * dqk * 2, "MLA keys"));
  prefill_rows_cap = rows_cap;
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::EnsureScratchRows(int64_t need) {
  if (scratch_meta.get() == nullptr) {
    KLS_ASSIGN_OR_RETURN(scratch_meta,
                         DeviceMemory::Allocate((table_cap + 8) * 4, "state transfer metadata"));
  }
  if (need <= scratch_rows_cap) return absl::OkStatus();
  scratch_rows.Reset();
  scratch_rows_cap = 0;
  const int64_t cap = std::max<int64_t>(need, 4096);
  KLS_ASSIGN_OR_RETURN(scratch_rows, DeviceMemory::Allocate(cap * cd * 2, "state transfer rows"));
  scratch_rows_cap = cap;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<BackendState>> CudaBackend::NewState() {
  KLS_RETURN_IF_ERROR(impl_->sticky);
  KLS_RETURN_IF_ERROR(impl_->Fail(impl_->UseDevice()));
  std::optional<int32_t> slot = impl_->slots->Acquire();
  if (!slot.has_value()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("all ", impl_->plan.num_slots, " KDA state slots of the GPU are in use"));
  }
  auto state = std::make_unique<CudaState>(this, impl_.get(), *slot);
  KLS_RETURN_IF_ERROR(impl_->Fail(impl_->ZeroSlot(*slot)));
  return state;
}

absl::StatusOr<std::unique_ptr<BackendState>> CudaBackend::CloneState(const BackendState& state) {
  KLS_RETURN_IF_ERROR(impl_->sticky);
  KLS_RETURN_IF_ERROR(impl_->Fail(impl_->UseDevice()));
  if (state.owner() != this) return absl::InvalidArgumentError("clone: a state of another backend");
  const auto& source = static_cast<const CudaState&>(state);
  std::optional<int32_t> slot = impl_->slots->Acquire();
  if (!slot.has_value()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("all ", impl_->plan.num_slots, " KDA state slots of the GPU are in use"));
  }
  auto copy = std::make_unique<CudaState>(this, impl_.get(), *slot);
  KLS_RETURN_IF_ERROR(impl_->Fail(impl_->CopySlot(source.slot, *slot)));
  copy->pages = impl_->pages->Share(source.pages);
  return copy;
}

absl::StatusOr<std::unique_ptr<StateCheckpoint>> CudaBackend::Checkpoint(
    const BackendState& state) {
  KLS_RETURN_IF_ERROR(impl_->sticky);
  KLS_RETURN_IF_ERROR(impl_->Fail(impl_->UseDevice()));
  if (state.owner() != this) {
    return absl::InvalidArgumentError("checkpoint: a state of another backend");
  }
  const auto& source = static_cast<const CudaState&>(state);
  std::optional<int32_t> slot = impl_->slots->Acquire();
  if (!slot.has_value()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "all ", impl_->plan.num_slots, " KDA state slots of the GPU are in use (checkpoints)"));
  }
  auto checkpoint =
      std::make_unique<CudaCheckpoint>(this, impl_.get(), state, *slot, source.pages.num_tokens);
  KLS_RETURN_IF_ERROR(impl_->Fail(impl_->CopySlot(source.slot, *slot)));
  return checkpoint;
}

absl::Status CudaBackend::Rollback(const StateCheckpoint& checkpoint, BackendState* state) {
  KLS_RETURN_IF_ERROR(impl_->sticky);
  KLS_RETURN_IF_ERROR(impl_->Fail(impl_->UseDevice()));
  KLS_RETURN_IF_ERROR(CheckRollback(this, checkpoint, state));
  const auto& cp = static_cast<const CudaCheckpoint&>(checkpoint);
  auto& target = static_cast<CudaState&>(*state);
  KLS_RETURN_IF_ERROR(impl_->Fail(impl_->CopySlot(cp.slot, target.slot)));
  impl_->pages->Truncate(target.pages, cp.tokens);
  state->NoteRollback(cp.tokens);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<BackendState>> CudaBackend::ImportState(const SessionState& host) {
  KLS_RETURN_IF_ERROR(impl_->sticky);
  KLS_RETURN_IF_ERROR(impl_->Fail(impl_->UseDevice()));
  Impl& m = *impl_;
  if (!host.MatchesConfig(m.c) || host.mla_first_row() != 0) {
    return absl::InvalidArgumentError(
        "import: the state does not match the model's shapes or lacks MLA cache rows");
  }
  const int64_t n = host.num_tokens();
  if (n > m.c.model_max_length) {
    return absl::InvalidArgumentError(
        absl::StrCat("import: ", n, " tokens exceed the context limit"));
  }
  KLS_ASSIGN_OR_RETURN(std::unique_ptr<BackendState> fresh, NewState());
  auto& state = static_cast<CudaState&>(*fresh);
  std::vector<cuda::PageCopy> none;
  if (m.PagesToAppend(state.pages, n) > m.pages->num_free() ||
      !m.AppendTokens(state.pages, n, &none)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("import: the GPU's MLA cache has ", m.pages->num_free(),
                     " free pages, the session needs ", CeilDiv(n, m.options.page_size)));
  }
  cudaStream_t s = m.s();
  std::vector<uint16_t> bf(0);
  for (int l = 0; l < m.num_kda; ++l) {
    const KdaLayerState& layer = host.kda()[l];
    KLS_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.kda_pool(l) + state.slot * m.kda_slot_elems,
                                             layer.recurrent.data(), m.kda_slot_elems * 4,
                                             cudaMemcpyHostToDevice, s));
    bf.resize(layer.conv.size());
    for (size_t i = 0; i < bf.size(); ++i) bf[i] = FloatToBf16(layer.conv[i]);
    KLS_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.conv_pool(l) + state.slot * m.conv_slot_elems,
                                             bf.data(), bf.size() * 2, cudaMemcpyHostToDevice, s));
    KLS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));  // `bf` is reused
  }
  if (n > 0 && m.num_mla > 0) {
    KLS_RETURN_IF_ERROR(m.EnsureScratchRows(n));
    std::vector<int32_t> meta(state.pages.pages.begin(), state.pages.pages.end());
    const int32_t table_width = static_cast<int32_t>(meta.size());
    meta.push_back(0);  // seq_starts
    meta.push_back(0);  // cu_seqlens
    meta.push_back(static_cast<int32_t>(n));
    KLS_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.scratch_meta.get(), meta.data(), meta.size() * 4,
                                             cudaMemcpyHostToDevice, s));
    const int32_t* table = m.scratch_meta.as<int32_t>();
    for (int l = 0; l < m.num_mla; ++l) {
      const std::vector<float>& latent = host.mla()[l].latent;
      bf.resize(latent.size());
      for (size_t i = 0; i < bf.size(); ++i) bf[i] = FloatToBf16(latent[i]);
      KLS_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.scratch_rows.get(), bf.data(), bf.size() * 2,
                                               cudaMemcpyHostToDevice, s));
      kernels::MlaCacheAppendParams ap;
      ap.rows = m.scratch_rows.as<bf16>();
      ap.row_stride = m.cd;
      ap.cache_pages = m.mla_pool(l);
      ap.num_pages = m.plan.num_pages;
      ap.block_table = table;
      ap.max_pages_per_seq = table_width;
      ap.seq_starts = table + table_width;
      ap.cu_seqlens = table + table_width + 1;
      ap.num_seqs = 1;
      ap.total_new = n;
      ap.row_dim = m.cd;
      ap.page_size = m.options.page_size;
      KLS_CUDA_RETURN_IF_ERROR(kernels::LaunchMlaCacheAppend(ap, s));
      KLS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    }
  }
  KLS_RETURN_IF_ERROR(m.Fail(CudaStatus(cudaStreamSynchronize(s), "import")));
  return fresh;
}

absl::Status CudaBackend::ExportState(const BackendState& state, int64_t mla_first_row,
                                      SessionState* host) {
  KLS_RETURN_IF_ERROR(impl_->sticky);
  KLS_RETURN_IF_ERROR(impl_->Fail(impl_->UseDevice()));
  Impl& m = *impl_;
  if (state.owner() != this)
    return absl::InvalidArgumentError("export: a state of another backend");
  if (host == nullptr) return absl::InvalidArgumentError("export: no destination");
  const auto& source = static_cast<const CudaState&>(state);
  const int64_t n = source.pages.num_tokens;
  if (mla_first_row < 0 || mla_first_row > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("export: MLA row ", mla_first_row, " is outside [0, ", n, "]"));
  }
  cudaStream_t s = m.s();
  SessionState out(m.c);
  std::vector<uint16_t> bf;
  for (int l = 0; l < m.num_kda; ++l) {
    KdaLayerState& layer = out.kda()[l];
    KLS_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(layer.recurrent.data(),
                                             m.kda_pool(l) + source.slot * m.kda_slot_elems,
                                             m.kda_slot_elems * 4, cudaMemcpyDeviceToHost, s));
    bf.resize(layer.conv.size());
    KLS_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(bf.data(),
                                             m.conv_pool(l) + source.slot * m.conv_slot_elems,
                                             bf.size() * 2, cudaMemcpyDeviceToHost, s));
    KLS_RETURN_IF_ERROR(m.Fail(CudaStatus(cudaStreamSynchronize(s), "export")));
    for (size_t i = 0; i < bf.size(); ++i) layer.conv[i] = Bf16ToFloat(bf[i]);
  }
  // MLA rows from the page holding mla_first_row on; the rows before it are dropped on the host.
  const int ps = m.options.page_size;
  const int64_t first_page = mla_first_row / ps;
  const int64_t rows = n - first_page * ps;
  if (rows > 0 && m.num_mla > 0) {
    KLS_RETURN_IF_ERROR(m.EnsureScratchRows(rows));
    std::vector<int32_t> meta(source.pages.pages.begin() + first_page, source.pages.pages.end());
    const int32_t table_width = static_cast<int32_t>(meta.size());
    meta.push_back(0);
    meta.push_back(static_cast<int32_t>(rows));
    KLS_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.scratch_meta.get(), meta.data(), meta.size() * 4,
                                             cudaMemcpyHostToDevice, s));
    const int32_t* table = m.scratch_meta.as<int32_t>();
    const int64_t skip = mla_first_row - first_page * ps;
    for (int l = 0; l < m.num_mla; ++l) {
      KLS_CUDA_RETURN_IF_ERROR(cuda::LaunchGatherPagedRows(m.mla_pool(l), ps, m.cd, table,
                                                           table_width, table + table_width, 1,
                                                           rows, m.scratch_rows.as<bf16>(), s));
      bf.resize(static_cast<size_t>(rows * m.cd));
      KLS_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(bf.data(), m.scratch_rows.get(), bf.size() * 2,
                                               cudaMemcpyDeviceToHost, s));
      KLS_RETURN_IF_ERROR(m.Fail(CudaStatus(cudaStreamSynchronize(s), "export")));
      std::vector<float>& latent = out.mla()[l].latent;
      latent.resize(static_cast<size_t>((n - mla_first_row) * m.cd));
      for (size_t i = 0; i < latent.size(); ++i) latent[i] = Bf16ToFloat(bf[skip * m.cd + i]);
    }
  } else {
    for (MlaLayerState& layer : out.mla()) layer.latent.clear();
  }
  out.set_num_tokens(n);
  out.set_mla_first_row(mla_first_row);
  *host = std::move(out);
  return absl::OkStatus();
}

absl::Status CudaBackend::FillStateMemoryRandom(uint64_t seed) {
  Impl& m = *impl_;
  KLS_RETURN_IF_ERROR(m.Fail(m.UseDevice()));
  const int64_t kda = int64_t{m.num_kda} * m.plan.num_slots * m.kda_slot_elems;
  const int64_t conv = int64_t{m.num_kda} * m.plan.num_slots * m.conv_slot_elems;
  const int64_t cache = int64_t{m.num_mla} * m.plan.num_pages * m.page_elems;
  KLS_CUDA_RETURN_IF_ERROR(cuda::LaunchRandomFill(m.kda_state.get(), true, kda, seed,
                                                  cuda::RandomFill::kNormal, 0.f, 0.05f, m.s()));
  KLS_CUDA_RETURN_IF_ERROR(cuda::LaunchRandomFill(m.conv_state.get(), false, conv, seed + 1,
                                                  cuda::RandomFill::kNormal, 0.f, 1.f, m.s()));
  KLS_CUDA_RETURN_IF_ERROR(cuda::LaunchRandomFill(m.mla_cache.get(), false, cache, seed + 2,
                                                  cuda::RandomFill::kNormal, 0.f, 1.f, m.s()));
  return m.Fail(CudaStatus(cudaStreamSynchronize(m.s()), "filling state memory"));
}

absl::Status CudaBackend::ExtendContext(BackendState* state, int64_t tokens) {
  if (state == nullptr || state->owner() != this || tokens < 0) {
    return absl::InvalidArgumentError("extend: a state of another backend or a negative count");
  }
  auto& st = static_cast<CudaState&>(*state);
  if (st.pages.num_tokens + tokens > impl_->c.model_max_length) {
    return absl::InvalidArgumentError("extend: past the context limit");
  }
  std::vector<cuda::PageCopy> copies;
  if (impl_->PagesToAppend(st.pages, tokens) > impl_->pages->num_free() ||
      !impl_->AppendTokens(st.pages, tokens, &copies)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("extend: ", impl_->pages->num_free(), " free cache pages are too few"));
  }
  return impl_->Fail(impl_->CopyPages(copies));
}

absl::StatusOr<int> CudaBackend::LastMoeLayerDistinctExperts() {
  Impl& m = *impl_;
  if (m.experts == 0 || m.last_step_tokens == 0) return 0;
  std::vector<int32_t> ids(static_cast<size_t>(m.last_step_tokens) * m.top_k);
  KLS_RETURN_IF_ERROR(m.Fail(
      CudaStatus(cudaMemcpy(ids.data(), m.expert_ids.get(), ids.size() * 4, cudaMemcpyDeviceToHost),
                 "reading expert ids")));
  std::sort(ids.begin(), ids.end());
  return static_cast<int>(std::unique(ids.begin(), ids.end()) - ids.begin());
}

absl::Status CudaBackend::Synchronize() {
  return impl_->Fail(CudaStatus(cudaStreamSynchronize(impl_->s()), "synchronize"));
}

// ---- The forward pass ------------------------------------------------------------------------

absl::Status CudaBackend::Impl::KdaLayer(const cuda::LayerDeviceWeights& L, const StepPlan& p,
                                         const MetaLayout& ml) {
  const cudaStream_t st = s();
  const int32_t* meta = meta_dev.as<int32_t>();
  const cuda::KdaDeviceWeights& w = L.kda;
  bf16* qkv = proj.as<bf16>();
  const bf16* in = normed.as<bf16>();
  constexpr kernels::GemmOutputType kBf16 = kernels::GemmOutputType::kBf16;
  KLS_RETURN_IF_ERROR(Project(p.t, {{in, d, w.qkv_proj, qkv, kBf16, 3 * hk, 3 * hk, d},
                                    {in, d, w.fa_ga, low.get(), kBf16, 2 * k, 2 * k, d},
                                    {in, d, w.b_proj, beta.get(), kBf16, h, h, d}}));
  kernels::CausalConvParams cp;
  cp.x = qkv;
  cp.weight = w.conv;
  cp.conv_state = conv_pool(L.state_slot);
  cp.conv_slots = meta + ml.slots;
  cp.cu_seqlens = meta + ml.cu_all;
  cp.out = conv_out.as<bf16>();
  cp.num_seqs = p.n;
  cp.total_tokens = p.t;
  cp.max_seqlen = p.max_new;
  cp.num_streams = 3;
  cp.stream_dim = hk;
  cp.width = width;
  KLS_CUDA_RETURN_IF_ERROR(kernels::LaunchCausalConv1dSilu(cp, st));
  KLS_RETURN_IF_ERROR(
      Project(p.t, {{low.as<bf16>(), 2 * k, w.f_b, f.get(), kBf16, hk, hk, k},
                    {low.as<bf16>() + k, 2 * k, w.g_b, g.get(), kBf16, hk, hk, k}}));

  kernels::KdaParams kp;
  kp.qkv_token_stride = 3 * hk;
  kp.a_log = w.a_log;
  kp.dt_bias = w.dt_bias;
  kp.state_pool = kda_pool(L.state_slot);
  kp.num_heads = h;
  kp.head_dim = k;
  kp.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k)));
  const auto rows_from = [&](int64_t first, kernels::KdaParams& q) {
    q.q = conv_out.as<bf16>() + first * 3 * hk;
    q.k = q.q + hk;
    q.v = q.q + 2 * hk;
    q.f = f.as<bf16>() + first * hk;
    q.beta_logits = beta.as<bf16>() + first * h;
    q.out = kda_out.as<bf16>() + first * hk;
  };
  if (p.nd > 0) {
    kernels::KdaParams q = kp;
    rows_from(0, q);
    q.cu_seqlens = meta + ml.cu_all;  // the first nd + 1 entries are 0, 1, …, nd
    q.state_slots = meta + ml.slots;
    q.num_seqs = p.nd;
    q.total_tokens = p.nd;
    q.max_seqlen = 1;
    KLS_CUDA_RETURN_IF_ERROR(kernels::LaunchKdaRecurrent(q, st));
  }
  if (p.np > 0) {
    kernels::KdaParams q = kp;
    rows_from(p.nd, q);
    q.cu_seqlens = meta + ml.cu_p;
    q.state_slots = meta + ml.slots + p.nd;
    q.num_seqs = p.np;
    q.total_tokens = p.t - p.nd;
    q.max_seqlen = p.max_new;
    KLS_CUDA_RETURN_IF_ERROR(kernels::LaunchKdaChunk(q, kda_ws.get(), kda_ws_bytes, st));
  }
  KLS_CUDA_RETURN_IF_ERROR(kernels::LaunchGatedRmsNorm(kda_out.as<bf16>(), g.as<bf16>(), w.o_norm,
                                                       p.t, h, k, eps, kda_out.as<bf16>(), st));
  return Project(p.t, {{kda_out.as<bf16>(), hk, w.o_proj, delta.get(), kBf16, d, d, hk}});
}

absl::Status CudaBackend::Impl::MlaLayer(const cuda::LayerDeviceWeights& L, const StepPlan& p,
                                         const MetaLayout& ml) {
  const cudaStream_t st = s();
  const int32_t* meta = meta_dev.as<int32_t>();
  const kernels::GemmOutputMode over = kernels::GemmOutputMode::kOverwrite;
  const cuda::MlaDeviceWeights& w = L.mla;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dqk)));
  bf16* q = proj.as<bf16>();  // [T, NH, Dn + Dr]
  constexpr kernels::GemmOutputType kBf16 = kernels::GemmOutputType::kBf16;
  const bf16* in = normed.as<bf16>();
  KLS_RETURN_IF_ERROR(Project(p.t, {{in, d, w.q_proj, q, kBf16, nh * dqk, nh * dqk, d},
                                    {in, d, w.kv_a, kv.get(), kBf16, cd, cd, d}}));
  KLS_CUDA_RETURN_IF_ERROR(cuda::LaunchLatentNormPack(kv.as<bf16>(), w.kv_a_norm, p.t, dc, dr, eps,
                                                      rows.as<bf16>(), st));
  kernels::MlaCacheAppendParams ap;
  ap.rows = rows.as<bf16>();
  ap.row_stride = cd;
  ap.cache_pages = mla_pool(L.state_slot);
  ap.num_pages = plan.num_pages;
  ap.block_table = meta + ml.block_table;
  ap.max_pages_per_seq = p.table_width;
  ap.seq_starts = meta + ml.seq_starts;
  ap.cu_seqlens = meta + ml.cu_all;
  ap.num_seqs = p.n;
  ap.total_new = p.t;
  ap.row_dim = cd;
  ap.page_size = options.page_size;
  KLS_CUDA_RETURN_IF_ERROR(kernels::LaunchMlaCacheAppend(ap, st));

  if (p.nd > 0) {  // absorbed attention over the paged cache
    KLS_GEMM(gemm->Run(
        kernels::MlaAbsorbQueryArgs(q, int64_t{nh} * dqk, dqk, w.kv_b, q_latent.as<bf16>(),
                                    int64_t{nh} * dc, dc, p.nd, nh, dn, dv, dc),
        st));
    KLS_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(q_pe.get(), dr * 2, q + dn, dqk * 2, dr * 2,
                                               static_cast<size_t>(p.nd) * nh,
                                               cudaMemcpyDeviceToDevice, st));
    kernels::MlaDecodeParams dp;
    dp.q_latent = q_latent.as<bf16>();
    dp.q_pe = q_pe.as<bf16>();
    dp.cache_pages = mla_pool(L.state_slot);
    dp.block_table = meta + ml.block_table;
    dp.max_pages_per_seq = p.table_width;
    dp.seq_lens = meta + ml.seq_lens_d;
    dp.out_latent = o_latent.as<bf16>();
    dp.num_seqs = p.nd;
    dp.num_heads = nh;
    dp.head_dim_latent = dc;
    dp.head_dim_rope = dr;
    dp.page_size = options.page_size;
    dp.max_seq_len = p.max_seq_len;
    dp.scale = scale;
    dp.num_pages = plan.num_pages;
    KLS_CUDA_RETURN_IF_ERROR(kernels::LaunchMlaDecode(dp, mla_ws.get(), mla_ws_bytes, st));
    KLS_GEMM(gemm->Run(
        kernels::MlaAbsorbOutputArgs(o_latent.as<bf16>(), int64_t{nh} * dc, dc, w.kv_b,
                                     attn.as<bf16>(), int64_t{nh} * dv, dv, p.nd, nh, dn, dv, dc),
        st));
  }
  if (p.np > 0) {  // non-absorbed attention over the decompressed context
    const int32_t* table = meta + ml.block_table + static_cast<int64_t>(p.nd) * p.table_width;
    KLS_CUDA_RETURN_IF_ERROR(cuda::LaunchGatherPagedRows(mla_pool(L.state_slot), options.page_size,
                                                         cd, table, p.table_width, meta + ml.cu_k,
                                                         p.np, p.ctx_rows, lat_ctx.as<bf16>(), st));
    KLS_GEMM(gemm->Linear(lat_ctx.as<bf16>(), cd, w.kv_b, kvb.as<bf16>(), int64_t{nh} * (dn + dv),
                          p.ctx_rows, int64_t{nh} * (dn + dv), dc, over, st));
    KLS_CUDA_RETURN_IF_ERROR(cuda::LaunchBuildMlaKeys(
        kvb.as<bf16>(), lat_ctx.as<bf16>(), p.ctx_rows, nh, dn, dv, dc, dr, keys.as<bf16>(), st));
    kernels::MlaPrefillParams pp;
    pp.q = q + static_cast<int64_t>(p.nd) * nh * dqk;
    pp.q_token_stride = int64_t{nh} * dqk;
    pp.q_head_stride = dqk;
    pp.k = keys.as<bf16>();
    pp.k_token_stride = int64_t{nh} * dqk;
    pp.k_head_stride = dqk;
    pp.v = kvb.as<bf16>() + dn;
    pp.v_token_stride = int64_t{nh} * (dn + dv);
    pp.v_head_stride = dn + dv;
    pp.out = attn.as<bf16>() + static_cast<int64_t>(p.nd) * nh * dv;
    pp.cu_seqlens_q = meta + ml.cu_p;
    pp.cu_seqlens_k = meta + ml.cu_k;
    pp.num_seqs = p.np;
    pp.max_seqlen_q = p.max_new;
    pp.total_q = p.t - p.nd;
    pp.num_heads = nh;
    pp.head_dim_qk = dqk;
    pp.head_dim_v = dv;
    pp.scale = scale;
    KLS_CUDA_RETURN_IF_ERROR(kernels::LaunchMlaPrefill(pp, st));
  }
  const int64_t attn_width = int64_t{nh} * dv;
  return Project(p.t,
                 {{attn.as<bf16>(), attn_width, w.o_proj, delta.get(), kBf16, d, d, attn_width}});
}

absl::Status CudaBackend::Impl::Ffn(const cuda::LayerDeviceWeights& L, const StepPlan& p) {
  const cudaStream_t st = s();
  constexpr kernels::GemmOutputType kBf16 = kernels::GemmOutputType::kBf16;
  const bf16* in = normed.as<bf16>();
  // SwiGLU of `w` on the normed rows into `out`, its gate_up already in `proj`.
  const auto silu_down = [&](const cuda::SwiGluDeviceWeights& w, bf16* out) -> absl::Status {
    KLS_CUDA_RETURN_IF_ERROR(
        cuda::LaunchSiluMul(proj.as<bf16>(), p.t, w.width, mid.as<bf16>(), st));
    return Project(p.t, {{mid.as<bf16>(), w.width, w.down, out, kBf16, d, d, w.width}});
  };
  const auto gate_up = [&](const cuda::SwiGluDeviceWeights& w) -> Projection {
    return {in, d, w.gate_up, proj.get(), kBf16, 2 * w.width, 2 * w.width, d};
  };
  if (L.ffn == FfnKind::kDense) {
    KLS_RETURN_IF_ERROR(Project(p.t, {gate_up(L.mlp)}));
    return silu_down(L.mlp, delta.as<bf16>());
  }

  const cuda::MoeDeviceWeights& w = L.moe;
  // The router and the shared expert's gate_up read the same rows: one launch when skinny.
  KLS_RETURN_IF_ERROR(Project(p.t, {{in, d, w.router, router_logits.get(),
                                     kernels::GemmOutputType::kFp32, experts, experts, d},
                                    gate_up(w.shared)}));
  KLS_CUDA_RETURN_IF_ERROR(
      kernels::LaunchMoeRoute(router_logits.as<float>(), experts, w.bias, p.t, experts, top_k,
                              c.moe_renormalize, c.routed_scaling_factor, options.router_weighting,
                              expert_ids.as<int32_t>(), expert_weights.as<float>(), st));
  KLS_RETURN_IF_ERROR(silu_down(w.shared, shared_out.as<bf16>()));
  kernels::MoeExpertsParams mp;
  mp.hidden = normed.as<bf16>();
  mp.expert_ids = expert_ids.as<int32_t>();
  mp.expert_weights = expert_weights.as<float>();
  mp.w_gate_up = w.w_gate_up;
  mp.w_down = w.w_down;
  mp.shared_out = shared_out.as<bf16>();
  mp.out = delta.as<bf16>();
  mp.num_tokens = p.t;
  mp.hidden_size = static_cast<int>(d);
  mp.intermediate_size = moe_width;
  mp.num_experts = experts;
  mp.top_k = top_k;
  mp.path = kernels::MoeSelectPath(p.t, experts, top_k);
  KLS_CUDA_RETURN_IF_ERROR(kernels::LaunchMoeExperts(mp, moe_ws.get(), moe_ws_bytes, st));
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::RunModel(const StepPlan& p) {
  const cudaStream_t st = s();
  const MetaLayout ml(p);
  const int32_t* meta = meta_dev.as<int32_t>();
  const std::vector<cuda::LayerDeviceWeights>& layers = weights.layers();
  // The residual stream is fp32 (cuda_ops.h, LaunchAddRmsNormF32).
  KLS_CUDA_RETURN_IF_ERROR(kernels::LaunchEmbeddingGather(weights.embed(), v, static_cast<int>(d),
                                                          meta + ml.ids, p.t, delta.as<bf16>(),
                                                          error_flag.as<int32_t>(), st));
  KLS_CUDA_RETURN_IF_ERROR(cuda::LaunchBf16ToFloat(delta.as<bf16>(), p.t * d, x.as<float>(), st));
  KLS_CUDA_RETURN_IF_ERROR(cuda::LaunchAddRmsNormF32(nullptr, x.as<float>(), layers[0].input_norm,
                                                     p.t, static_cast<int>(d), eps,
                                                     normed.as<bf16>(), st));
  for (size_t i = 0; i < layers.size(); ++i) {
    const cuda::LayerDeviceWeights& L = layers[i];
    if (L.kind == LayerKind::kKda) {
      KLS_RETURN_IF_ERROR(KdaLayer(L, p, ml));
    } else {
      KLS_RETURN_IF_ERROR(MlaLayer(L, p, ml));
    }
    KLS_CUDA_RETURN_IF_ERROR(cuda::LaunchAddRmsNormF32(delta.as<bf16>(), x.as<float>(),
                                                       L.post_attn_norm, p.t, static_cast<int>(d),
                                                       eps, normed.as<bf16>(), st));
    KLS_RETURN_IF_ERROR(Ffn(L, p));
    const bf16* next_norm = i + 1 < layers.size() ? layers[i + 1].input_norm : weights.final_norm();
    KLS_CUDA_RETURN_IF_ERROR(cuda::LaunchAddRmsNormF32(delta.as<bf16>(), x.as<float>(), next_norm,
                                                       p.t, static_cast<int>(d), eps,
                                                       normed.as<bf16>(), st));
  }
  // lm_head on the last position of each sequence only.
  KLS_CUDA_RETURN_IF_ERROR(kernels::LaunchGatherRows(normed.as<bf16>(), d, p.t, static_cast<int>(d),
                                                     meta + ml.last_rows, p.n, last.as<bf16>(), d,
                                                     error_flag.as<int32_t>(), st));
  // cuBLASLt even for one row: on a weight this large it streams faster than the skinny GEMM
  // (H200, m = 1: 175 vs 193 µs for 755 MB, bench/gemm_bench.py).
  KLS_GEMM(gemm->Linear(last.as<bf16>(), d, weights.lm_head(), logits_dev.as<float>(), v, p.n, v, d,
                        kernels::GemmOutputMode::kOverwrite, st));
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::Project(int64_t rows,
                                        std::initializer_list<Projection> projections) {
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  bool skinny = rows <= options.skinny_gemm_max_rows &&
                static_cast<int>(projections.size()) <= kernels::kSkinnyGemmMaxProblems;
  for (const Projection& q : projections) {
    skinny = skinny && q.k % 8 == 0 && q.ldx % 8 == 0 && aligned16(q.x) && aligned16(q.w);
  }
  if (skinny) {
    kernels::SkinnyGemmArgs args;
    args.m = rows;
    args.overlap_previous_kernel = options.overlap_projections;
    for (const Projection& q : projections) {
      kernels::SkinnyGemmProblem& problem = args.problems[args.num_problems++];
      problem.x = q.x;
      problem.ldx = q.ldx;
      problem.w = q.w;
      problem.ldw = q.k;
      problem.y = q.y;
      problem.y_type = q.y_type;
      problem.ldy = q.ldy;
      problem.n = q.n;
      problem.k = q.k;
    }
    return GemmStatusOf(kernels::LaunchSkinnyGemm(args, s()), "skinny projection");
  }
  for (const Projection& q : projections) {
    KLS_GEMM(
        gemm->Run(q.y_type == kernels::GemmOutputType::kFp32
                      ? kernels::LinearArgs(q.x, q.ldx, q.w, static_cast<float*>(q.y), q.ldy, rows,
                                            q.n, q.k, kernels::GemmOutputMode::kOverwrite)
                      : kernels::LinearArgs(q.x, q.ldx, q.w, static_cast<bf16*>(q.y), q.ldy, rows,
                                            q.n, q.k, kernels::GemmOutputMode::kOverwrite),
                  s()));
  }
  return absl::OkStatus();
}

// Runs the step: eagerly, or for a decode-only step through its batch size's CUDA graph
// (captured on the second step of that size, after an eager one created every plan).
absl::Status CudaBackend::Impl::RunStep(const StepPlan& p, bool decode_only) {
  const bool graphable = decode_only && options.cuda_graphs && !graph_failed.contains(p.n);
  if (graphable) {
    auto it = graphs.find(p.n);
    if (it != graphs.end()) {
      return CudaStatus(cudaGraphLaunch(it->second.get(), s()), "replaying a decode graph");
    }
    if (eager_steps[p.n]++ >= 1) {
      cudaGraph_t graph = nullptr;
      KLS_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(s(), cudaStreamCaptureModeThreadLocal));
      absl::Status recorded = RunModel(p);
      const cudaError_t ended = cudaStreamEndCapture(s(), &graph);
      cuda::CudaGraphExec exec;
      cudaError_t made = cudaErrorUnknown;
      if (recorded.ok() && ended == cudaSuccess) {
        made = cudaGraphInstantiate(exec.out(), graph, 0);
      }
      if (graph != nullptr) cudaGraphDestroy(graph);
      if (made == cudaSuccess) {
        const cudaGraphExec_t launch = exec.get();
        graphs.emplace(p.n, std::move(exec));
        return CudaStatus(cudaGraphLaunch(launch, s()), "replaying a decode graph");
      }
      (void)cudaGetLastError();
      KLS_LOG(WARNING) << "cuda backend: decode steps of " << p.n
                       << " sequences run without a CUDA graph: "
                       << (recorded.ok()
                               ? CudaStatus(ended != cudaSuccess ? ended : made, "capture")
                               : recorded);
      graph_failed.insert(p.n);
    }
  }
  return RunModel(p);
}

absl::Status CudaBackend::Forward(std::span<const SequenceInput> batch, std::span<float> logits) {
  return Step(batch, logits, {}, {});
}

absl::Status CudaBackend::ForwardSample(std::span<const SequenceInput> batch,
                                        std::span<const SampleRequest> requests,
                                        std::span<int32_t> tokens) {
  KLS_RETURN_IF_ERROR(CheckSampleSpans(batch, requests, tokens));
  return Step(batch, {}, requests, tokens);
}

absl::Status CudaBackend::Step(std::span<const SequenceInput> batch, std::span<float> logits,
                               std::span<const SampleRequest> requests, std::span<int32_t> tokens) {
  KLS_RETURN_IF_ERROR(impl_->sticky);
  KLS_RETURN_IF_ERROR(impl_->Fail(impl_->UseDevice()));
  Impl& m = *impl_;
  const ModelConfig& c = m.c;
  // ---- Validation: nothing changes before it passes.
  if (batch.empty()) return absl::InvalidArgumentError("forward: empty batch");
  if (static_cast<int>(batch.size()) > m.options.max_step_seqs) {
    return absl::InvalidArgumentError(absl::StrCat("forward: ", batch.size(),
                                                   " sequences exceed the step limit of ",
                                                   m.options.max_step_seqs));
  }
  const bool sampling = !requests.empty();
  if (!sampling && logits.size() != batch.size() * static_cast<size_t>(c.vocab_size)) {
    return absl::InvalidArgumentError(absl::StrCat("forward: logits buffer holds ", logits.size(),
                                                   " values, need ", batch.size() * c.vocab_size));
  }
  std::set<const BackendState*> seen;
  int64_t total = 0;
  for (size_t n = 0; n < batch.size(); ++n) {
    const SequenceInput& in = batch[n];
    if (in.state == nullptr || in.state->owner() != this) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: sequence ", n, " has no state of this backend"));
    }
    if (!seen.insert(in.state).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: sequence ", n, " repeats a state of the batch"));
    }
    if (in.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", n, " has no tokens"));
    }
    for (int32_t id : in.tokens) {
      if (id < 0 || id >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "forward: token id ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
    const int64_t context = in.state->num_tokens() + static_cast<int64_t>(in.tokens.size());
    if (context > c.model_max_length) {
      return absl::InvalidArgumentError(absl::StrCat("context of ", context,
                                                     " tokens exceeds the model's limit of ",
                                                     c.model_max_length, " (model_max_length)"));
    }
    total += static_cast<int64_t>(in.tokens.size());
  }
  if (total > m.options.max_step_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "forward: ", total, " tokens exceed the step limit of ", m.options.max_step_tokens));
  }

  // ---- Order (decode first) and cache pages.
  std::vector<int> order;
  for (size_t n = 0; n < batch.size(); ++n) {
    if (batch[n].tokens.size() == 1) order.push_back(static_cast<int>(n));
  }
  const int nd = static_cast<int>(order.size());
  for (size_t n = 0; n < batch.size(); ++n) {
    if (batch[n].tokens.size() != 1) order.push_back(static_cast<int>(n));
  }
  int64_t pages_needed = 0;
  for (int n : order) {
    const auto& st = static_cast<const CudaState&>(*batch[n].state);
    pages_needed += m.PagesToAppend(st.pages, static_cast<int64_t>(batch[n].tokens.size()));
  }
  if (pages_needed > m.pages->num_free()) {
    return absl::ResourceExhaustedError(absl::StrCat("the GPU's MLA cache has ",
                                                     m.pages->num_free(),
                                                     " free pages, the step needs ", pages_needed));
  }

  StepPlan p;
  p.n = static_cast<int>(batch.size());
  p.nd = nd;
  p.np = p.n - nd;
  p.t = total;
  p.table_width = 1;
  int64_t prefill_ctx = 0;
  for (int i = 0; i < p.n; ++i) {
    const SequenceInput& in = batch[order[i]];
    const int64_t after = in.state->num_tokens() + static_cast<int64_t>(in.tokens.size());
    p.table_width =
        std::max<int>(p.table_width, static_cast<int>(CeilDiv(after, m.options.page_size)));
    p.max_new = std::max<int>(p.max_new, static_cast<int>(in.tokens.size()));
    if (i >= nd) prefill_ctx += after;
  }
  const bool decode_only = p.np == 0;
  const int table_used = p.table_width;  // the widest row's pages after this step
  if (decode_only) {
    // A fixed table width and split bound, so every decode step of a size shares one graph.
    p.table_width = m.table_cap;
    p.max_seq_len = static_cast<int>(c.model_max_length);
  }
  p.ctx_rows = prefill_ctx;
  if (p.np > 0 && m.num_mla > 0) KLS_RETURN_IF_ERROR(m.EnsurePrefillScratch(prefill_ctx));

  std::vector<int64_t> old_tokens(p.n);
  std::vector<cuda::PageCopy> copies;
  for (int i = 0; i < p.n; ++i) {
    auto& st = static_cast<CudaState&>(*batch[order[i]].state);
    old_tokens[i] = st.pages.num_tokens;
    const bool ok =
        m.AppendTokens(st.pages, static_cast<int64_t>(batch[order[i]].tokens.size()), &copies);
    KLS_CHECK(ok) << "pages were counted before appending";
  }

  // ---- Metadata.
  const MetaLayout ml(p);
  int32_t* meta = m.meta_host.as<int32_t>();
  // Every section but the block table; of its rows only the first table_used entries are filled
  // (pages, then zeros) and uploaded: no kernel reads a row past its sequence's pages.
  std::memset(meta, 0, ml.block_table * 4);
  int32_t row = 0, ctx = 0;
  meta[ml.cu_all] = 0;
  meta[ml.cu_p] = 0;
  meta[ml.cu_k] = 0;
  for (int i = 0; i < p.n; ++i) {
    const SequenceInput& in = batch[order[i]];
    const auto& st = static_cast<const CudaState&>(*in.state);
    for (int32_t id : in.tokens) meta[ml.ids + row++] = id;
    meta[ml.cu_all + i + 1] = row;
    meta[ml.slots + i] = st.slot;
    meta[ml.seq_starts + i] = static_cast<int32_t>(old_tokens[i]);
    int32_t* const table_row = meta + ml.block_table + static_cast<size_t>(i) * p.table_width;
    std::copy(st.pages.pages.begin(), st.pages.pages.end(), table_row);
    std::fill(table_row + st.pages.pages.size(), table_row + table_used, 0);
    meta[ml.last_rows + i] = row - 1;
    if (i < nd) {
      meta[ml.seq_lens_d + i] = static_cast<int32_t>(st.pages.num_tokens);
      p.max_seq_len = std::max<int>(p.max_seq_len, static_cast<int>(st.pages.num_tokens));
    } else {
      ctx += static_cast<int32_t>(st.pages.num_tokens);
      meta[ml.cu_p + (i - nd) + 1] = row - nd;
      meta[ml.cu_k + (i - nd) + 1] = ctx;
    }
  }

  absl::Status status = m.CopyPages(copies);
  if (status.ok() && table_used == p.table_width) {
    status = CudaStatus(
        cudaMemcpyAsync(m.meta_dev.get(), meta, ml.total * 4, cudaMemcpyHostToDevice, m.s()),
        "uploading step metadata");
  } else if (status.ok()) {  // a decode step: the sections, then the used part of each row
    status = CudaStatus(
        cudaMemcpyAsync(m.meta_dev.get(), meta, ml.block_table * 4, cudaMemcpyHostToDevice, m.s()),
        "uploading step metadata");
    const size_t pitch = static_cast<size_t>(p.table_width) * 4;
    if (status.ok()) {
      status = CudaStatus(
          cudaMemcpy2DAsync(m.meta_dev.as<int32_t>() + ml.block_table, pitch, meta + ml.block_table,
                            pitch, static_cast<size_t>(table_used) * 4, static_cast<size_t>(p.n),
                            cudaMemcpyHostToDevice, m.s()),
          "uploading block tables");
    }
  }
  if (status.ok()) status = m.RunStep(p, decode_only);
  // Sampling: the configs and counters in device row order go up through the (pinned) logits
  // staging buffer, the tokens and samplable flags come back through it; else the logits.
  auto* const sample_host = m.logits_host.as<char>();
  const size_t configs_bytes = static_cast<size_t>(p.n) * sizeof(kernels::SamplerConfig);
  if (status.ok() && sampling) {
    auto* configs = reinterpret_cast<kernels::SamplerConfig*>(sample_host);
    auto* counters = reinterpret_cast<uint64_t*>(sample_host + configs_bytes);
    for (int i = 0; i < p.n; ++i) {
      configs[i] = requests[order[i]].config;
      counters[i] = requests[order[i]].counter;
    }
    status = CudaStatus(cudaMemcpyAsync(m.sample_configs.get(), configs, configs_bytes,
                                        cudaMemcpyHostToDevice, m.s()),
                        "uploading sampler configs");
    if (status.ok()) {
      status = CudaStatus(cudaMemcpyAsync(m.sample_counters.get(), counters, p.n * 8,
                                          cudaMemcpyHostToDevice, m.s()),
                          "uploading sampler counters");
    }
    int32_t* const out_dev = m.sample_out.as<int32_t>();
    if (status.ok()) {
      status = CudaStatus(
          kernels::LaunchSampleTokens(m.logits_dev.as<float>(), c.vocab_size, c.vocab_size, p.n,
                                      m.sample_configs.as<kernels::SamplerConfig>(),
                                      m.sample_counters.as<uint64_t>(), out_dev, m.s()),
          "sampling");
    }
    if (status.ok()) {
      status = CudaStatus(cuda::LaunchLogitsSamplable(m.logits_dev.as<float>(), p.n, c.vocab_size,
                                                      out_dev + p.n, m.s()),
                          "checking logits");
    }
    // Into the staging right after the counters, so the uploads' bytes are left alone.
    if (status.ok()) {
      status =
          CudaStatus(cudaMemcpyAsync(sample_host + configs_bytes + p.n * 8, out_dev,
                                     static_cast<size_t>(p.n) * 8, cudaMemcpyDeviceToHost, m.s()),
                     "downloading sampled tokens");
    }
  } else if (status.ok()) {
    status = CudaStatus(
        cudaMemcpyAsync(m.logits_host.as<float>(), m.logits_dev.get(),
                        static_cast<size_t>(p.n) * c.vocab_size * 4, cudaMemcpyDeviceToHost, m.s()),
        "downloading logits");
  }
  int32_t* const flag_host =
      reinterpret_cast<int32_t*>(m.logits_host.as<char>() + m.logits_host.bytes() - 16);
  if (status.ok()) {
    status =
        CudaStatus(cudaMemcpyAsync(flag_host, m.error_flag.get(), 4, cudaMemcpyDeviceToHost, m.s()),
                   "downloading the gather flag");
  }
  if (status.ok()) status = CudaStatus(cudaStreamSynchronize(m.s()), "forward");
  if (!status.ok()) {
    // Let whatever was enqueued finish before the metadata buffer or the pages are reused; the
    // states of the batch are unspecified now, but their page tables stay consistent.
    (void)cudaStreamSynchronize(m.s());
    for (int i = 0; i < p.n; ++i) {
      m.pages->Truncate(static_cast<CudaState&>(*batch[order[i]].state).pages, old_tokens[i]);
    }
    return m.Fail(status);
  }
  m.last_step_tokens = p.t;
  const float* rows_out = m.logits_host.as<float>();
  // Ids were validated above, so the gathers' device-side range flag can only be set by a bug.
  if (*flag_host != 0) {
    (void)cudaMemset(m.error_flag.get(), 0, 4);
    return absl::InternalError("forward: a gather index was out of range on the device");
  }
  if (sampling) {
    const auto* sampled = reinterpret_cast<const int32_t*>(sample_host + configs_bytes + p.n * 8);
    for (int i = 0; i < p.n; ++i) tokens[order[i]] = sampled[p.n + i] != 0 ? sampled[i] : -1;
    return absl::OkStatus();
  }
  for (int i = 0; i < p.n; ++i) {
    std::memcpy(logits.data() + static_cast<size_t>(order[i]) * c.vocab_size,
                rows_out + static_cast<size_t>(i) * c.vocab_size, c.vocab_size * 4);
  }
  return absl::OkStatus();
}

}  // namespace kls::engine

// C ABI over the MoE launchers for bench/moe_bench.py (ctypes). Every pointer is a raw device
// pointer (a torch tensor's data_ptr()) in the layouts of kernels/moe/moe.h; `stream` is a
// cudaStream_t (torch.cuda.Stream.cuda_stream). `path` is 0 = kAuto, 1 = kDecode,
// 2 = kPrefill. Functions return a cudaError_t value (0 on success) and never synchronize. Not
// for production use: the engine calls moe.h directly.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/moe/moe.h"

namespace {

kls::kernels::MoeExpertsParams MakeParams(int64_t num_tokens, int hidden_size,
                                          int intermediate_size, int num_experts, int top_k,
                                          int path) {
  kls::kernels::MoeExpertsParams p;
  p.num_tokens = num_tokens;
  p.hidden_size = hidden_size;
  p.intermediate_size = intermediate_size;
  p.num_experts = num_experts;
  p.top_k = top_k;
  p.path = static_cast<kls::kernels::MoePath>(path);
  return p;
}

}  // namespace

extern "C" {

// LaunchMoeRoute; biased != 0 selects RouterWeighting::kBiased.
int kls_moe_route(const void* logits, int64_t row_stride, const void* bias, int64_t num_tokens,
                  int num_experts, int top_k, int renormalize, double scaling, int biased,
                  void* expert_ids, void* expert_weights, void* stream) {
  return static_cast<int>(kls::kernels::LaunchMoeRoute(
      static_cast<const float*>(logits), row_stride, static_cast<const float*>(bias), num_tokens,
      num_experts, top_k, renormalize != 0, scaling,
      biased != 0 ? kls::kernels::RouterWeighting::kBiased
                  : kls::kernels::RouterWeighting::kUnbiased,
      static_cast<int32_t*>(expert_ids), static_cast<float*>(expert_weights),
      static_cast<cudaStream_t>(stream)));
}

// MoeExpertsWorkspaceBytes into *bytes.
int kls_moe_experts_workspace_bytes(int64_t num_tokens, int hidden_size, int intermediate_size,
                                    int num_experts, int top_k, int path, uint64_t* bytes) {
  size_t b = 0;
  const cudaError_t err = kls::kernels::MoeExpertsWorkspaceBytes(
      MakeParams(num_tokens, hidden_size, intermediate_size, num_experts, top_k, path), &b);
  if (err == cudaSuccess) *bytes = b;
  return static_cast<int>(err);
}

// MoeExpertsTileRows: 16 (decode), 64 or 128 (prefill).
int kls_moe_tile_rows(int64_t num_tokens, int hidden_size, int intermediate_size, int num_experts,
                      int top_k, int path) {
  return kls::kernels::MoeExpertsTileRows(
      MakeParams(num_tokens, hidden_size, intermediate_size, num_experts, top_k, path));
}

// LaunchMoeExperts; shared_out may be null.
int kls_moe_experts(const void* hidden, const void* expert_ids, const void* expert_weights,
                    const void* w_gate_up, const void* w_down, const void* shared_out, void* out,
                    int64_t num_tokens, int hidden_size, int intermediate_size, int num_experts,
                    int top_k, int path, void* workspace, uint64_t workspace_bytes, void* stream) {
  kls::kernels::MoeExpertsParams p =
      MakeParams(num_tokens, hidden_size, intermediate_size, num_experts, top_k, path);
  p.hidden = static_cast<const __nv_bfloat16*>(hidden);
  p.expert_ids = static_cast<const int32_t*>(expert_ids);
  p.expert_weights = static_cast<const float*>(expert_weights);
  p.w_gate_up = static_cast<const __nv_bfloat16*>(w_gate_up);
  p.w_down = static_cast<const __nv_bfloat16*>(w_down);
  p.shared_out = static_cast<const __nv_bfloat16*>(shared_out);
  p.out = static_cast<__nv_bfloat16*>(out);
  return static_cast<int>(kls::kernels::LaunchMoeExperts(p, workspace, workspace_bytes,
                                                         static_cast<cudaStream_t>(stream)));
}

const char* kls_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // extern "C"

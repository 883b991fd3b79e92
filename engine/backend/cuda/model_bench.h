// `kls bench gpu`: the whole model on one GPU (PERFORMANCE.md §1 protocol, P5–P7): the copy and
// GEMM ceilings measured in the same process, time to first token of chunked prefills, decode
// time per output token for batches × contexts (contexts filled with random cache rows, not
// prefilled, so a 1M-token context takes seconds), bytes moved per step and the ratio to the
// bytes floor, for Kimi Linear and (optionally) the same model with every layer MLA.
#ifndef KLS_ENGINE_BACKEND_CUDA_MODEL_BENCH_H_
#define KLS_ENGINE_BACKEND_CUDA_MODEL_BENCH_H_

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/model/config.h"

namespace kls::engine::cuda {

struct ModelBenchOptions {
  // The model: a checkpoint directory, or a config with seeded random weights made on the GPU.
  std::string model_dir;
  ModelConfig config;  // used when model_dir is empty
  uint64_t seed = 1;
  // Variants measured one after the other in this process: "kimi-linear" (the config as is)
  // and "all-mla" (every layer MLA: the paper's baseline).
  std::vector<std::string> variants = {"kimi-linear"};
  std::vector<int64_t> ttft_tokens = {4096, 32768, 131072};
  std::vector<int> decode_batches = {1, 8, 32, 64};
  std::vector<int64_t> decode_contexts = {4096, 131072, 524288, 1048576};
  int decode_steps = 20;
  int prefill_chunk = 8192;
  // CudaBackendOptions of the same names: the decode path's projection kernels (A/B in one run).
  int skinny_gemm_max_rows = 8;
  bool overlap_projections = false;
  std::string card;  // printed name of the GPU (filled in when empty)
};

// Runs the benchmark, writing one JSON line per measurement to `json` and a table to stderr.
// Cases that do not fit the GPU's memory are reported as skipped, not failed.
absl::Status RunModelBench(const ModelBenchOptions& options, std::FILE* json);

// The config with every layer full attention (MLA), the rest unchanged.
ModelConfig AllMlaVariant(const ModelConfig& config);

}  // namespace kls::engine::cuda

#endif  // KLS_ENGINE_BACKEND_CUDA_MODEL_BENCH_H_

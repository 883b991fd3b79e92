#include "engine/backend/cuda/model_bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "engine/backend/cuda/cuda_backend.h"
#include "engine/backend/cuda/cuda_ops.h"
#include "engine/backend/cuda/cuda_util.h"
#include "engine/backend/cuda/device_weights.h"
#include "kernels/gemm/gemm.h"

namespace kls::engine::cuda {
namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Median seconds of `run` on `stream` over `timed` calls after `warmup` calls, each timed with
// CUDA events.
absl::StatusOr<double> MedianSeconds(cudaStream_t stream, int warmup, int timed,
                                     const std::function<absl::Status()>& run) {
  cudaEvent_t start, stop;
  KLS_CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
  KLS_CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop));
  std::vector<double> times;
  absl::Status status = absl::OkStatus();
  for (int i = 0; i < warmup + timed && status.ok(); ++i) {
    status = CudaStatus(cudaEventRecord(start, stream), "event");
    if (status.ok()) status = run();
    if (status.ok()) status = CudaStatus(cudaEventRecord(stop, stream), "event");
    if (status.ok()) status = CudaStatus(cudaEventSynchronize(stop), "event");
    float ms = 0;
    if (status.ok()) status = CudaStatus(cudaEventElapsedTime(&ms, start, stop), "event");
    if (i >= warmup) times.push_back(ms * 1e-3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  KLS_RETURN_IF_ERROR(status);
  return Median(times);
}

// Bytes per second of a 1 GiB device-to-device copy (read + written).
absl::StatusOr<double> CopyCeiling(cudaStream_t stream) {
  const size_t bytes = size_t{1} << 30;
  KLS_ASSIGN_OR_RETURN(DeviceMemory a, DeviceMemory::Allocate(bytes, "copy ceiling"));
  KLS_ASSIGN_OR_RETURN(DeviceMemory b, DeviceMemory::Allocate(bytes, "copy ceiling"));
  KLS_ASSIGN_OR_RETURN(
      const double secs, MedianSeconds(stream, 10, 50, [&] {
        return CudaStatus(
            cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, stream), "copy");
      }));
  return 2.0 * static_cast<double>(bytes) / secs;
}

// FLOP/s of an 8192³ bf16 GEMM through cuBLASLt (fp32 accumulation).
absl::StatusOr<double> GemmCeiling(cudaStream_t stream) {
  const int64_t n = 8192;
  KLS_ASSIGN_OR_RETURN(DeviceMemory x, DeviceMemory::Allocate(n * n * 2, "GEMM ceiling"));
  KLS_ASSIGN_OR_RETURN(DeviceMemory w, DeviceMemory::Allocate(n * n * 2, "GEMM ceiling"));
  KLS_ASSIGN_OR_RETURN(DeviceMemory y, DeviceMemory::Allocate(n * n * 2, "GEMM ceiling"));
  KLS_CUDA_RETURN_IF_ERROR(
      LaunchRandomFill(x.get(), false, n * n, 1, RandomFill::kNormal, 0, 1, stream));
  KLS_CUDA_RETURN_IF_ERROR(
      LaunchRandomFill(w.get(), false, n * n, 2, RandomFill::kNormal, 0, 1, stream));
  kernels::GemmCreateResult made = kernels::CublasLtGemm::Create({});
  if (!made.status.ok()) return absl::InternalError(made.status.message);
  KLS_ASSIGN_OR_RETURN(const double secs, MedianSeconds(stream, 10, 20, [&]() -> absl::Status {
                         const kernels::GemmStatus s =
                             made.gemm->Linear(x.as<bf16>(), n, w.as<bf16>(), y.as<bf16>(), n, n, n,
                                               n, kernels::GemmOutputMode::kOverwrite, stream);
                         if (!s.ok()) return absl::InternalError(s.message);
                         return absl::OkStatus();
                       }));
  return 2.0 * n * n * n / secs;
}

struct ModelSizes {
  double dense_params = 0;   // read by every step whatever the routing (bf16 elements)
  double expert_params = 0;  // one routed expert of one MoE layer
  int moe_layers = 0;
  double active_params = 0;     // multiplied per token (linear layers, top-k experts)
  double kda_state_bytes = 0;   // per sequence per step: read + write, all KDA layers
  double mla_row_bytes = 0;     // per cached token, all MLA layers
  double attn_flops_coeff = 0;  // causal attention FLOPs = coeff · T² (all MLA layers)
  double decompress_flops = 0;  // per context token, all MLA layers (kv_b_proj)
};

ModelSizes Sizes(const ModelConfig& c) {
  ModelSizes s;
  const double d = c.hidden_size, h = c.linear_attn_config.num_heads,
               k = c.linear_attn_config.head_dim, hk = h * k,
               w = c.linear_attn_config.short_conv_kernel_size;
  const double nh = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim,
               dv = c.v_head_dim, dc = c.kv_lora_rank;
  const double im = c.moe_intermediate_size, e = c.num_experts, top = c.num_experts_per_token;
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    double mixer;
    if (c.layer_kind(i) == LayerKind::kKda) {
      mixer = 3 * hk * d + 2 * k * d + 2 * hk * k + h * d + d * hk;
      s.kda_state_bytes += 2 * (h * k * k * 4) + 2 * (3 * (w - 1) * hk * 2);
    } else {
      mixer = nh * (dn + dr) * d + (dc + dr) * d + nh * (dn + dv) * dc + d * nh * dv;
      s.mla_row_bytes += (dc + dr) * 2;
      s.attn_flops_coeff += nh * (dn + dr + dv);  // 2·T²/2 per head per (qk + pv) dim
      s.decompress_flops += 2 * nh * (dn + dv) * dc;
    }
    double ffn_dense, ffn_active;
    if (c.ffn_kind(i) == FfnKind::kDense) {
      ffn_dense = ffn_active = 3 * c.intermediate_size * d;
    } else {
      ffn_dense = e * d + 3 * c.num_shared_experts * im * d;
      ffn_active = ffn_dense + top * 3 * im * d;
      s.expert_params = 3 * im * d;
      ++s.moe_layers;
    }
    s.dense_params += mixer + ffn_dense + 2 * d;
    s.active_params += mixer + ffn_active;
  }
  s.dense_params += c.vocab_size * d;  // lm_head is read every step (embedding rows: few)
  return s;
}

std::vector<int32_t> RandomIds(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return ids;
}

}  // namespace

ModelConfig AllMlaVariant(const ModelConfig& config) {
  ModelConfig c = config;
  c.linear_attn_config.kda_layers.clear();
  c.linear_attn_config.full_attn_layers.clear();
  for (int i = 1; i <= c.num_hidden_layers; ++i) c.linear_attn_config.full_attn_layers.push_back(i);
  return c;
}

absl::Status RunModelBench(const ModelBenchOptions& options, std::FILE* json) {
  cudaDeviceProp prop{};
  KLS_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, 0));
  const std::string card = options.card.empty() ? prop.name : options.card;
  CudaStream stream;
  KLS_RETURN_IF_ERROR(stream.Create());
  KLS_ASSIGN_OR_RETURN(const double copy_bw, CopyCeiling(stream.get()));
  KLS_ASSIGN_OR_RETURN(const double gemm_flops, GemmCeiling(stream.get()));
  std::fprintf(json,
               "{\"bench\": \"model\", \"case\": \"ceilings\", \"card\": \"%s\", "
               "\"copy_bytes_per_s\": %.4g, \"gemm_flops\": %.4g}\n",
               card.c_str(), copy_bw, gemm_flops);
  std::fprintf(stderr, "%s: copy %.2f TB/s, bf16 GEMM %.0f TFLOP/s\n", card.c_str(), copy_bw / 1e12,
               gemm_flops / 1e12);

  ModelConfig base = options.config;
  if (!options.model_dir.empty()) {
    KLS_ASSIGN_OR_RETURN(base, LoadModelConfig(options.model_dir));
  }
  const int max_batch =
      std::max(1, *std::max_element(options.decode_batches.begin(), options.decode_batches.end()));
  const int64_t max_ttft =
      options.ttft_tokens.empty()
          ? 0
          : *std::max_element(options.ttft_tokens.begin(), options.ttft_tokens.end());

  for (const std::string& variant : options.variants) {
    if (variant != "kimi-linear" && variant != "all-mla") {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown variant '", variant, "' (kimi-linear or all-mla)"));
    }
    const ModelConfig c = variant == "all-mla" ? AllMlaVariant(base) : base;
    const ModelSizes sizes = Sizes(c);
    absl::StatusOr<DeviceWeights> weights =
        (!options.model_dir.empty() && variant == "kimi-linear")
            ? DeviceWeights::FromCheckpoint(options.model_dir, stream.get(), nullptr)
            : DeviceWeights::Random(c, options.seed, stream.get());
    KLS_RETURN_IF_ERROR(weights.status());
    CudaBackendOptions bo;
    bo.max_sessions = max_batch;
    bo.max_step_seqs = max_batch;
    bo.max_step_tokens = options.prefill_chunk;
    bo.skinny_gemm_max_rows = options.skinny_gemm_max_rows;
    bo.overlap_projections = options.overlap_projections;
    // Room for the decompressed context of the longest prefill, beyond the state memory.
    const int64_t per_row =
        (int64_t{c.kv_lora_rank} + c.qk_rope_head_dim +
         int64_t{c.num_attention_heads} *
             (c.qk_nope_head_dim + c.v_head_dim + c.qk_nope_head_dim + c.qk_rope_head_dim)) *
        2;
    bo.reserve_bytes = (int64_t{3} << 30) + 2 * max_ttft * per_row;
    KLS_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> backend,
                         CudaBackend::Create(*std::move(weights), bo));
    KLS_RETURN_IF_ERROR(backend->FillStateMemoryRandom(options.seed));
    std::fprintf(stderr, "%s %s: %.1f GiB of weights, %d slots, %d pages\n", card.c_str(),
                 variant.c_str(), backend->weight_bytes() / double(1 << 30), backend->num_slots(),
                 backend->num_pages());

    // ---- Time to first token (chunked prefill of a fresh session).
    std::vector<float> logits(static_cast<size_t>(c.vocab_size) * max_batch);
    {
      KLS_ASSIGN_OR_RETURN(std::unique_ptr<BackendState> warm, backend->NewState());
      const std::vector<int32_t> ids = RandomIds(512, c.vocab_size, 3);
      SequenceInput in{ids, warm.get()};
      KLS_RETURN_IF_ERROR(backend->Forward({&in, 1}, {logits.data(), size_t(c.vocab_size)}));
    }
    for (int64_t t : options.ttft_tokens) {
      if (t >= c.model_max_length) continue;
      KLS_ASSIGN_OR_RETURN(std::unique_ptr<BackendState> state, backend->NewState());
      const std::vector<int32_t> ids = RandomIds(t, c.vocab_size, 7);
      const auto t0 = std::chrono::steady_clock::now();
      absl::Status s = absl::OkStatus();
      for (int64_t at = 0; at < t && s.ok(); at += options.prefill_chunk) {
        const int64_t n = std::min<int64_t>(options.prefill_chunk, t - at);
        SequenceInput in{std::span<const int32_t>(ids.data() + at, n), state.get()};
        s = backend->Forward({&in, 1}, {logits.data(), size_t(c.vocab_size)});
      }
      const double secs = Seconds(t0, std::chrono::steady_clock::now());
      if (!s.ok()) {
        std::fprintf(json,
                     "{\"bench\": \"model\", \"card\": \"%s\", \"variant\": \"%s\", \"case\": "
                     "\"ttft\", \"tokens\": %lld, \"skipped\": \"%s\"}\n",
                     card.c_str(), variant.c_str(), static_cast<long long>(t),
                     std::string(s.message()).c_str());
        if (!backend->healthy().ok()) return backend->healthy();
        continue;
      }
      const double td = static_cast<double>(t);
      const double flops = 2 * sizes.active_params * td + sizes.attn_flops_coeff * td * td +
                           sizes.decompress_flops * td;
      const double floor = flops / gemm_flops;
      std::fprintf(json,
                   "{\"bench\": \"model\", \"card\": \"%s\", \"variant\": \"%s\", \"case\": "
                   "\"ttft\", \"tokens\": %lld, \"chunk\": %d, \"ttft_ms\": %.2f, "
                   "\"tokens_per_s\": %.0f, \"flops\": %.4g, \"mfu\": %.3f, "
                   "\"floor_ms\": %.2f, \"ratio_to_floor\": %.2f}\n",
                   card.c_str(), variant.c_str(), static_cast<long long>(t), options.prefill_chunk,
                   secs * 1e3, td / secs, flops, flops / secs / gemm_flops, floor * 1e3,
                   secs / floor);
      std::fprintf(stderr, "  TTFT %7lld tokens: %9.1f ms (%.2f× the FLOP floor, MFU %.0f%%)\n",
                   static_cast<long long>(t), secs * 1e3, secs / floor,
                   100 * flops / secs / gemm_flops);
    }

    // ---- Decode: time per output token at each batch × context.
    for (int64_t context : options.decode_contexts) {
      const int64_t ctx = std::min<int64_t>(context, c.model_max_length - options.decode_steps - 8);
      for (int batch : options.decode_batches) {
        std::vector<std::unique_ptr<BackendState>> states;
        absl::Status s = absl::OkStatus();
        for (int b = 0; b < batch && s.ok(); ++b) {
          absl::StatusOr<std::unique_ptr<BackendState>> st = backend->NewState();
          if (!st.ok()) {
            s = st.status();
            break;
          }
          s = backend->ExtendContext(st->get(), ctx);
          states.push_back(*std::move(st));
        }
        std::vector<double> steps;
        std::vector<int32_t> tokens = RandomIds(batch, c.vocab_size, 11);
        for (int i = 0; i < options.decode_steps + 3 && s.ok(); ++i) {
          std::vector<SequenceInput> in;
          for (int b = 0; b < batch; ++b) {
            in.push_back({std::span<const int32_t>(&tokens[b], 1), states[b].get()});
          }
          // The serving path: greedy tokens sampled on the GPU and fed back (the worker's
          // ForwardSample), not the logits copied to the host.
          std::vector<SampleRequest> requests(batch);
          for (int b = 0; b < batch; ++b) {
            requests[b].counter = static_cast<uint64_t>(states[b]->num_tokens() + 1);
          }
          std::vector<int32_t> sampled(batch);
          const auto t0 = std::chrono::steady_clock::now();
          s = backend->ForwardSample(in, requests, sampled);
          if (i >= 3) steps.push_back(Seconds(t0, std::chrono::steady_clock::now()));
          for (int b = 0; b < batch && s.ok(); ++b) {
            if (sampled[b] >= 0) tokens[b] = sampled[b];
          }
        }
        if (!s.ok()) {
          std::fprintf(json,
                       "{\"bench\": \"model\", \"card\": \"%s\", \"variant\": \"%s\", \"case\": "
                       "\"decode\", \"batch\": %d, \"context\": %lld, \"skipped\": \"%s\"}\n",
                       card.c_str(), variant.c_str(), batch, static_cast<long long>(ctx),
                       std::string(s.message()).c_str());
          std::fprintf(stderr, "  decode B=%3d ctx %8lld: does not fit (%s)\n", batch,
                       static_cast<long long>(ctx), std::string(s.message()).c_str());
          if (!backend->healthy().ok()) return backend->healthy();
          continue;
        }
        const double tpot = Median(steps);
        // Bytes a step must move: weights read once (dense part, lm_head, and the experts the
        // batch touches — counted in the last MoE layer of the last step and taken for every
        // MoE layer), each sequence's KDA state read and written, and each sequence's MLA cache
        // read.
        KLS_ASSIGN_OR_RETURN(const int touched_experts, backend->LastMoeLayerDistinctExperts());
        const double touched = touched_experts;
        const double weight_bytes =
            2 * (sizes.dense_params + sizes.moe_layers * touched * sizes.expert_params);
        const double state_bytes =
            batch * (sizes.kda_state_bytes + sizes.mla_row_bytes * static_cast<double>(ctx + 1));
        const double bytes = weight_bytes + state_bytes;
        const double floor = bytes / copy_bw;
        std::fprintf(json,
                     "{\"bench\": \"model\", \"card\": \"%s\", \"variant\": \"%s\", \"case\": "
                     "\"decode\", \"batch\": %d, \"context\": %lld, \"tpot_ms\": %.3f, "
                     "\"tokens_per_s\": %.0f, \"bytes_per_step\": %.4g, \"floor_ms\": %.3f, "
                     "\"ratio_to_floor\": %.2f, \"experts_touched\": %d, \"graphs\": %d, "
                     "\"skinny_gemm_max_rows\": %d, \"overlap_projections\": %s}\n",
                     card.c_str(), variant.c_str(), batch, static_cast<long long>(ctx), tpot * 1e3,
                     batch / tpot, bytes, floor * 1e3, tpot / floor, touched_experts,
                     backend->graphs_captured(), options.skinny_gemm_max_rows,
                     options.overlap_projections ? "true" : "false");
        std::fprintf(stderr,
                     "  decode B=%3d ctx %8lld: TPOT %8.3f ms, %8.0f tok/s, %.2f GB/step, %.2f× "
                     "the bytes floor\n",
                     batch, static_cast<long long>(ctx), tpot * 1e3, batch / tpot, bytes / 1e9,
                     tpot / floor);
      }
    }
    std::fflush(json);
  }
  return absl::OkStatus();
}

}  // namespace kls::engine::cuda

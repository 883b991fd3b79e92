#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "engine/backend/cpu/cpu_backend.h"
#include "engine/model/make_model.h"
#include "engine/scheduler/generator.h"
#include "services/cli/commands.h"

#if KLS_HAVE_CUDA_BACKEND
#include "engine/backend/cuda/model_bench.h"
#endif

namespace kls::cli {
namespace {

struct BenchFlags {
  std::string mode;
  std::string model;
  int prompt_tokens = 128;
  int decode_tokens = 256;
  int repeats = 3;
  // gpu
  std::string preset;
  uint64_t seed = 1;
  std::string variants = "kimi-linear";
  std::string ttft = "4096,32768,131072";
  std::string batches = "1,8,32,64";
  std::string contexts = "4096,131072,524288,1048576";
  int decode_steps = 20;
  int prefill_chunk = 8192;
  int skinny_gemm_rows = 8;
  bool overlap_projections = false;
  std::string out;
};

// Parses "a,b,c" into positive integers; false on anything else.
template <typename T>
bool ParseList(const std::string& text, std::vector<T>* out) {
  out->clear();
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    T value = 0;
    if (!absl::SimpleAtoi(part, &value) || value <= 0) return false;
    out->push_back(value);
  }
  return !out->empty();
}

// The whole model on the GPU (engine/backend/cuda/model_bench.h).
int RunGpuBench(const BenchFlags& flags) {
#if KLS_HAVE_CUDA_BACKEND
  engine::cuda::ModelBenchOptions o;
  if (flags.model.empty() == flags.preset.empty()) {
    std::fprintf(stderr, "kls bench gpu: give exactly one of --model and --preset\n");
    return 2;
  }
  o.model_dir = flags.model;
  if (!flags.preset.empty()) {
    absl::StatusOr<engine::ModelConfig> config = engine::PresetConfig(flags.preset);
    if (!config.ok()) {
      std::fprintf(stderr, "kls bench gpu: %s\n", config.status().ToString().c_str());
      return 2;
    }
    o.config = *config;
  }
  o.seed = flags.seed;
  o.variants = absl::StrSplit(flags.variants, ',', absl::SkipEmpty());
  o.decode_steps = flags.decode_steps;
  o.prefill_chunk = flags.prefill_chunk;
  o.skinny_gemm_max_rows = flags.skinny_gemm_rows;
  o.overlap_projections = flags.overlap_projections;
  if (!ParseList(flags.ttft, &o.ttft_tokens) || !ParseList(flags.batches, &o.decode_batches) ||
      !ParseList(flags.contexts, &o.decode_contexts)) {
    std::fprintf(stderr,
                 "kls bench gpu: --ttft, --batches and --contexts take positive integers "
                 "separated by commas\n");
    return 2;
  }
  std::FILE* json = stdout;
  if (!flags.out.empty()) {
    json = std::fopen(flags.out.c_str(), "a");
    if (json == nullptr) {
      std::fprintf(stderr, "kls bench gpu: cannot append to %s\n", flags.out.c_str());
      return 1;
    }
  }
  const absl::Status s = engine::cuda::RunModelBench(o, json);
  if (json != stdout) std::fclose(json);
  if (!s.ok()) {
    std::fprintf(stderr, "kls bench gpu: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
#else
  (void)flags;
  std::fprintf(stderr, "kls bench gpu: this build has no CUDA backend (configure with CUDA)\n");
  return 1;
#endif
}

// Decode and prefill throughput of the CPU backend on one session (single thread), greedy,
// stop tokens ignored so every run decodes exactly decode_tokens. Prints one JSON line per
// repeat and a summary line with the best run (the least disturbed by other load).
int RunCpuDecode(const BenchFlags& flags) {
  absl::StatusOr<engine::LoadedModel> model = engine::LoadModel(flags.model);
  if (!model.ok()) {
    std::fprintf(stderr, "kls bench: %s\n", model.status().ToString().c_str());
    return 1;
  }
  absl::StatusOr<std::unique_ptr<engine::CpuBackend>> backend =
      engine::CpuBackend::Create(model->weights);
  if (!backend.ok()) {
    std::fprintf(stderr, "kls bench: %s\n", backend.status().ToString().c_str());
    return 1;
  }
  const engine::ModelConfig& config = model->weights->config;
  if (int64_t{flags.prompt_tokens} + flags.decode_tokens >= config.model_max_length) {
    std::fprintf(stderr,
                 "kls bench: --prompt-tokens + --decode-tokens must stay below the "
                 "context limit of %lld tokens\n",
                 static_cast<long long>(config.model_max_length));
    return 2;
  }
  // A fixed pseudo-random prompt of ordinary (non-special) tokens.
  std::vector<int32_t> prompt(flags.prompt_tokens);
  uint64_t x = 0x9E3779B97F4A7C15ull;
  for (int32_t& id : prompt) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    id = static_cast<int32_t>(x % static_cast<uint64_t>(model->tokenizer->num_ranks()));
  }
  engine::GenerateOptions options;
  options.sampler.temperature = 0;
  options.max_tokens = flags.decode_tokens;
  double best_decode = 0, best_prefill = 0;
  for (int r = 0; r < flags.repeats; ++r) {
    absl::StatusOr<std::unique_ptr<engine::BackendState>> state = (*backend)->NewState();
    if (!state.ok()) {
      std::fprintf(stderr, "kls bench: %s\n", state.status().ToString().c_str());
      return 1;
    }
    absl::StatusOr<engine::GenerateResult> result =
        engine::Generate(**backend, state->get(), prompt, options);
    if (!result.ok()) {
      std::fprintf(stderr, "kls bench: %s\n", result.status().ToString().c_str());
      return 1;
    }
    // The first sampled token comes from the prefill's logits; each later one costs a step.
    const double steps = static_cast<double>(result->tokens.size() - 1);
    const double decode_tps = steps > 0 ? steps / result->decode_seconds : 0;
    const double prefill_tps = flags.prompt_tokens / result->prefill_seconds;
    best_decode = std::max(best_decode, decode_tps);
    best_prefill = std::max(best_prefill, prefill_tps);
    std::printf(
        "{\"bench\": \"cpu-decode\", \"model\": \"%s\", \"repeat\": %d, \"threads\": 1, "
        "\"prompt_tokens\": %d, \"decode_tokens\": %zu, \"prefill_tokens_per_s\": %.1f, "
        "\"decode_tokens_per_s\": %.1f, \"decode_ms_per_token\": %.3f}\n",
        flags.model.c_str(), r, flags.prompt_tokens, result->tokens.size(), prefill_tps, decode_tps,
        decode_tps > 0 ? 1e3 / decode_tps : 0.0);
  }
  std::printf("cpu-decode best of %d: decode %.1f tokens/s, prefill %.1f tokens/s\n", flags.repeats,
              best_decode, best_prefill);
  return 0;
}

}  // namespace

std::function<int()> AddBenchCommand(CLI::App& app) {
  auto flags = std::make_shared<BenchFlags>();
  CLI::App* cmd = app.add_subcommand("bench", "Benchmarks (JSON lines on stdout)");
  cmd->add_option("mode", flags->mode,
                  "What to measure: cpu-decode (CPU backend, one session) or gpu (the whole "
                  "model on one GPU: TTFT, decode TPOT by batch and context, bytes floor)")
      ->required()
      ->check(CLI::IsMember({"cpu-decode", "gpu"}));
  cmd->add_option("--model", flags->model, "Model directory");
  cmd->add_option("--preset", flags->preset,
                  "gpu: a preset config with seeded random weights made on the GPU "
                  "(tiny, mid, kimi-linear-48b)");
  cmd->add_option("--seed", flags->seed, "gpu: random weights' seed");
  cmd->add_option("--variants", flags->variants,
                  "gpu: kimi-linear and/or all-mla (every layer MLA), comma-separated")
      ->capture_default_str();
  cmd->add_option("--ttft", flags->ttft, "gpu: prompt lengths for time to first token")
      ->capture_default_str();
  cmd->add_option("--batches", flags->batches, "gpu: decode batch sizes")->capture_default_str();
  cmd->add_option("--contexts", flags->contexts,
                  "gpu: decode context lengths (cache filled "
                  "with random rows, not prefilled)")
      ->capture_default_str();
  cmd->add_option("--decode-steps", flags->decode_steps, "gpu: timed decode steps per case")
      ->check(CLI::Range(1, 100000));
  cmd->add_option("--prefill-chunk", flags->prefill_chunk, "gpu: tokens per prefill step")
      ->check(CLI::Range(16, 1 << 20));
  cmd->add_option("--skinny-gemm-rows", flags->skinny_gemm_rows,
                  "gpu: steps of at most this many rows project through the skinny GEMM, "
                  "larger ones through cuBLASLt (0: always cuBLASLt)")
      ->check(CLI::Range(0, 16))
      ->capture_default_str();
  cmd->add_flag("--overlap-projections", flags->overlap_projections,
                "gpu: launch the skinny GEMMs with programmatic dependent launch");
  cmd->add_option("--out", flags->out, "gpu: append the JSON lines to this file");
  cmd->add_option("--prompt-tokens", flags->prompt_tokens, "Prompt length")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--decode-tokens", flags->decode_tokens, "Tokens to decode per run")
      ->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--repeats", flags->repeats, "Runs")->check(CLI::PositiveNumber);
  return [flags]() -> int {
    if (flags->mode == "gpu") return RunGpuBench(*flags);
    if (flags->model.empty()) {
      std::fprintf(stderr, "kls bench cpu-decode: --model is required\n");
      return 2;
    }
    return RunCpuDecode(*flags);
  };
}

}  // namespace kls::cli

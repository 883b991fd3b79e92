#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "engine/backend/cpu/cpu_backend.h"
#include "engine/scheduler/generator.h"
#include "services/cli/commands.h"

namespace kls::cli {
namespace {

struct BenchFlags {
  std::string mode;
  std::string model;
  int prompt_tokens = 128;
  int decode_tokens = 256;
  int repeats = 3;
};

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
  cmd->add_option("mode", flags->mode, "What to measure: cpu-decode")
      ->required()
      ->check(CLI::IsMember({"cpu-decode"}));
  cmd->add_option("--model", flags->model, "Model directory")->required();
  cmd->add_option("--prompt-tokens", flags->prompt_tokens, "Prompt length")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--decode-tokens", flags->decode_tokens, "Tokens to decode per run")
      ->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--repeats", flags->repeats, "Runs")->check(CLI::PositiveNumber);
  return [flags]() -> int { return RunCpuDecode(*flags); };
}

}  // namespace kls::cli

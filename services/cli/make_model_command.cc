#include <cstdio>
#include <string>

#include "absl/strings/str_join.h"
#include "engine/model/make_model.h"
#include "services/cli/commands.h"

namespace kls::cli {

std::function<int()> AddMakeModelCommand(CLI::App& app) {
  struct Flags {
    std::string preset;
    std::string out;
    uint64_t seed = 0;
    std::string dtype = "bf16";
    bool config_only = false;
    int64_t shard_mb = 0;
    double residual_scale = 1.0;
  };
  auto flags = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand(
      "make-model", "Write a Hugging Face-layout checkpoint with seeded random weights");
  cmd->add_option("--preset", flags->preset,
                  "Model shape: " + absl::StrJoin(engine::PresetNames(), ", "))
      ->required();
  cmd->add_option("--out", flags->out, "Output directory (created if missing)")->required();
  cmd->add_option("--seed", flags->seed, "Seed of the random weights");
  cmd->add_option("--dtype", flags->dtype, "Weight dtype: bf16, f16 or f32")
      ->check(CLI::IsMember({"bf16", "f16", "f32"}));
  cmd->add_flag("--config-only", flags->config_only,
                "Write config and tokenizer only (no weights)");
  cmd->add_option("--shard-mb", flags->shard_mb,
                  "Split weights into shards of at most this many MiB (0: one file)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  cmd->add_option("--residual-scale", flags->residual_scale,
                  "Scale of the residual branches' output projections (GPT-2's scaled init is "
                  "1/sqrt(2*layers); 1: unscaled)");
  return [flags]() -> int {
    absl::StatusOr<engine::ModelConfig> config = engine::PresetConfig(flags->preset);
    if (!config.ok()) {
      std::fprintf(stderr, "kls make-model: %s\n", config.status().ToString().c_str());
      return 2;
    }
    engine::MakeModelOptions options;
    options.out_dir = flags->out;
    options.seed = flags->seed;
    options.dtype = flags->dtype == "f32"   ? engine::DType::kF32
                    : flags->dtype == "f16" ? engine::DType::kF16
                                            : engine::DType::kBF16;
    options.with_weights = !flags->config_only;
    options.max_shard_bytes = flags->shard_mb << 20;
    options.residual_scale = flags->residual_scale;
    if (absl::Status s = engine::MakeModel(*config, options); !s.ok()) {
      std::fprintf(stderr, "kls make-model: %s\n", s.ToString().c_str());
      return 1;
    }
    std::fprintf(stderr, "kls make-model: wrote %s model to %s\n", flags->preset.c_str(),
                 flags->out.c_str());
    return 0;
  };
}

}  // namespace kls::cli

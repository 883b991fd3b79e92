#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "engine/backend/factory.h"
#include "engine/scheduler/generator.h"
#include "engine/tokenizer/chat_format.h"
#include "services/cli/commands.h"

namespace kls::cli {
namespace {

struct GenerateFlags {
  std::string model;
  std::string prompt;
  std::string prompt_ids;
  std::string system;
  bool chat = false;
  bool interactive = false;
  bool print_ids = false;
  int max_tokens = 128;
  float temperature = 1.0f;
  float top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  std::string router = "unbiased";
  std::string dump_logits;
  std::string backend = "auto";  // auto | cpu | cuda
  int cuda_device = 0;
};

absl::StatusOr<std::vector<int32_t>> ParseIds(const std::string& text) {
  std::vector<int32_t> ids;
  for (absl::string_view piece :
       absl::StrSplit(text, absl::ByAnyChar(" ,\t\n"), absl::SkipEmpty())) {
    int32_t id;
    if (!absl::SimpleAtoi(piece, &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--prompt-ids: '", piece, "' is not a token id"));
    }
    ids.push_back(id);
  }
  if (ids.empty()) return absl::InvalidArgumentError("--prompt-ids: no token ids given");
  return ids;
}

std::vector<int32_t> StopTokens(const engine::LoadedModel& model) {
  std::vector<int32_t> stop = {static_cast<int32_t>(model.weights->config.eos_token_id)};
  if (model.tokenizer->eos_id() != stop[0]) stop.push_back(model.tokenizer->eos_id());
  return stop;
}

// Runs one turn and streams its text (or ids) to stdout.
absl::StatusOr<engine::GenerateResult> RunTurn(const GenerateFlags& flags,
                                               const engine::LoadedModel& model,
                                               engine::Backend& backend,
                                               engine::BackendState* state,
                                               const std::vector<int32_t>& prompt) {
  engine::GenerateOptions options;
  options.sampler = {flags.temperature, flags.top_p, flags.top_k, flags.seed};
  options.max_tokens = flags.max_tokens;
  options.stop_token_ids = StopTokens(model);
  std::FILE* dump = nullptr;
  if (!flags.dump_logits.empty()) {
    dump = std::fopen(flags.dump_logits.c_str(), "wb");
    if (dump == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("--dump-logits: cannot open ", flags.dump_logits, " for writing"));
    }
    options.observe_logits = [dump](std::span<const float> logits) {
      std::fwrite(logits.data(), sizeof(float), logits.size(), dump);
    };
  }
  engine::StreamingDecoder decoder(*model.tokenizer, /*skip_special=*/true);
  absl::Status stream_status;
  auto on_token = [&](int32_t id) {
    if (flags.print_ids) return true;
    absl::StatusOr<std::string> text = decoder.Push(id);
    if (!text.ok()) {
      stream_status = text.status();
      return false;
    }
    std::fwrite(text->data(), 1, text->size(), stdout);
    std::fflush(stdout);
    return true;
  };
  absl::StatusOr<engine::GenerateResult> result =
      engine::Generate(backend, state, prompt, options, on_token);
  if (dump != nullptr && std::fclose(dump) != 0) {
    return absl::InternalError(absl::StrCat("--dump-logits: cannot write ", flags.dump_logits));
  }
  if (!stream_status.ok()) return stream_status;
  if (!result.ok()) return result.status();
  if (flags.print_ids) {
    std::string line;
    for (size_t i = 0; i < result->tokens.size(); ++i) {
      absl::StrAppend(&line, i ? " " : "", result->tokens[i]);
    }
    std::printf("%s\n", line.c_str());
  } else {
    const std::string rest = decoder.Flush();
    std::printf("%s\n", rest.c_str());
  }
  std::fflush(stdout);
  return result;
}

// Multi-turn chat on one session: each line is a user message appended to the session state;
// history is never re-sent.
int RunInteractive(const GenerateFlags& flags, const engine::LoadedModel& model,
                   engine::Backend& backend) {
  const engine::ModelConfig& config = model.weights->config;
  absl::StatusOr<std::unique_ptr<engine::BackendState>> state = backend.NewState();
  if (!state.ok()) {
    std::fprintf(stderr, "error: %s\n", state.status().ToString().c_str());
    return 1;
  }
  int32_t pending = -1;
  bool first = true;
  std::fprintf(stderr,
               "kls chat on %s (%lld KDA + %lld MLA layers). Type a message; /reset starts over, "
               "/quit or end of input leaves.\n",
               flags.model.c_str(), static_cast<long long>(config.num_kda_layers()),
               static_cast<long long>(config.num_mla_layers()));
  std::string line;
  while (true) {
    std::fprintf(stderr, "> ");
    if (!std::getline(std::cin, line)) break;
    if (line == "/quit") break;
    if (line == "/reset") {
      state = backend.NewState();
      if (!state.ok()) {
        std::fprintf(stderr, "error: %s\n", state.status().ToString().c_str());
        return 1;
      }
      pending = -1;
      first = true;
      continue;
    }
    if (line.empty()) continue;
    std::vector<engine::ChatMessage> messages;
    if (first && !flags.system.empty()) messages.push_back({"system", flags.system, ""});
    messages.push_back({"user", line, ""});
    absl::StatusOr<std::vector<int32_t>> rendered =
        engine::RenderChat(*model.tokenizer, messages, /*add_generation_prompt=*/true);
    if (!rendered.ok()) {
      std::fprintf(stderr, "error: %s\n", rendered.status().ToString().c_str());
      continue;
    }
    // The previous turn's last token was kept out of the state; it opens this turn. A turn cut
    // by the token limit is closed with <|im_end|> so the chat format stays well formed.
    std::vector<int32_t> prompt;
    if (pending >= 0) {
      prompt.push_back(pending);
      if (pending != static_cast<int32_t>(config.eos_token_id)) {
        prompt.push_back(static_cast<int32_t>(config.eos_token_id));
      }
    }
    prompt.insert(prompt.end(), rendered->begin(), rendered->end());
    // A failed turn leaves the session as it was.
    absl::StatusOr<std::unique_ptr<engine::StateCheckpoint>> before = backend.Checkpoint(**state);
    if (!before.ok()) {
      std::fprintf(stderr, "error: %s\n", before.status().ToString().c_str());
      continue;
    }
    absl::StatusOr<engine::GenerateResult> result =
        RunTurn(flags, model, backend, state->get(), prompt);
    if (!result.ok()) {
      if (absl::Status s = backend.Rollback(**before, state->get()); !s.ok()) {
        std::fprintf(stderr, "error: %s\n", s.ToString().c_str());
        return 1;
      }
      std::fprintf(stderr, "error: %s\n", result.status().ToString().c_str());
      continue;
    }
    pending = result->pending_token;
    first = false;
    std::fprintf(stderr, "[%zu tokens, %s; session at %lld tokens; prefill %.1f ms, %.0f tok/s]\n",
                 result->tokens.size(), std::string(FinishReasonName(result->finish)).c_str(),
                 static_cast<long long>((*state)->num_tokens()), result->prefill_seconds * 1e3,
                 result->decode_seconds > 0
                     ? static_cast<double>(result->tokens.size()) / result->decode_seconds
                     : 0.0);
  }
  return 0;
}

}  // namespace

std::function<int()> AddGenerateCommand(CLI::App& app) {
  auto flags = std::make_shared<GenerateFlags>();
  CLI::App* cmd =
      app.add_subcommand("generate", "Generate text from a prompt, on the GPU or the CPU backend");
  cmd->add_option("--model", flags->model, "Model directory (config.json, weights, tokenizer)")
      ->required();
  auto* prompt = cmd->add_option("--prompt", flags->prompt, "Prompt text (no BOS is added)");
  auto* ids = cmd->add_option("--prompt-ids", flags->prompt_ids, "Prompt as token ids \"ID ID …\"");
  auto* interactive = cmd->add_flag("--interactive", flags->interactive,
                                    "Multi-turn chat on one session, one user message per line");
  auto* chat = cmd->add_flag("--chat", flags->chat,
                             "Render the prompt as one user message of the chat format");
  prompt->excludes(ids);
  interactive->excludes(prompt)->excludes(ids);
  chat->excludes(ids);
  cmd->add_option("--system", flags->system, "System message (with --chat or --interactive)");
  cmd->add_option("--max-tokens", flags->max_tokens, "Most tokens to generate")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--temperature", flags->temperature, "Sampling temperature; 0 is greedy");
  cmd->add_option("--top-p", flags->top_p, "Nucleus sampling mass in (0, 1]");
  cmd->add_option("--top-k", flags->top_k, "Keep the k most likely tokens (0: all)");
  cmd->add_option("--seed", flags->seed, "Sampling seed");
  cmd->add_flag("--print-ids", flags->print_ids, "Print generated token ids on one line");
  cmd->add_option("--dump-logits", flags->dump_logits,
                  "Write the logits of every sampled step to this file (fp32, [steps, vocab])");
  cmd->add_option("--router", flags->router,
                  "MoE routing weights: unbiased (vLLM, default) or biased (HF remote code)")
      ->check(CLI::IsMember({"unbiased", "biased"}));
  AddBackendFlags(cmd, &flags->backend, &flags->cuda_device);
  return [flags]() -> int {
    if (!flags->interactive && flags->prompt.empty() && flags->prompt_ids.empty()) {
      std::fprintf(stderr, "kls generate: give --prompt, --prompt-ids or --interactive\n");
      return 2;
    }
    if (!flags->system.empty() && !flags->chat && !flags->interactive) {
      std::fprintf(stderr, "kls generate: --system needs --chat or --interactive\n");
      return 2;
    }
    if (absl::Status s = engine::ValidateSamplerConfig(
            {flags->temperature, flags->top_p, flags->top_k, flags->seed});
        !s.ok()) {
      std::fprintf(stderr, "kls generate: %s\n", std::string(s.message()).c_str());
      return 2;
    }
    // Checked before the (slow) model load.
    if (absl::Status s = engine::CheckBackendAvailable(flags->backend); !s.ok()) {
      std::fprintf(stderr, "kls generate: %s\n", std::string(s.message()).c_str());
      return 2;
    }
    engine::BackendChoice choice;
    choice.kind = flags->backend;
    choice.cuda_device = flags->cuda_device;
    choice.cpu.router_weighting = flags->router == "biased" ? kernels::RouterWeighting::kBiased
                                                            : kernels::RouterWeighting::kUnbiased;
    absl::StatusOr<engine::ModelAndBackend> loaded =
        engine::LoadModelAndBackend(flags->model, choice);
    if (!loaded.ok()) {
      std::fprintf(stderr, "kls generate: %s\n", loaded.status().ToString().c_str());
      return 1;
    }
    const engine::LoadedModel& model = *loaded->model;
    engine::Backend& backend = *loaded->backend;
    if (flags->interactive) return RunInteractive(*flags, model, backend);

    std::vector<int32_t> prompt;
    if (!flags->prompt_ids.empty()) {
      absl::StatusOr<std::vector<int32_t>> parsed = ParseIds(flags->prompt_ids);
      if (!parsed.ok()) {
        std::fprintf(stderr, "kls generate: %s\n", std::string(parsed.status().message()).c_str());
        return 2;
      }
      prompt = *std::move(parsed);
    } else if (flags->chat) {
      std::vector<engine::ChatMessage> messages;
      if (!flags->system.empty()) messages.push_back({"system", flags->system, ""});
      messages.push_back({"user", flags->prompt, ""});
      absl::StatusOr<std::vector<int32_t>> rendered =
          engine::RenderChat(*model.tokenizer, messages, /*add_generation_prompt=*/true);
      if (!rendered.ok()) {
        std::fprintf(stderr, "kls generate: %s\n", rendered.status().ToString().c_str());
        return 2;
      }
      prompt = *std::move(rendered);
    } else {
      absl::StatusOr<std::vector<int32_t>> encoded = model.tokenizer->Encode(flags->prompt);
      if (!encoded.ok()) {
        std::fprintf(stderr, "kls generate: %s\n", encoded.status().ToString().c_str());
        return 2;
      }
      prompt = *std::move(encoded);
    }
    absl::StatusOr<std::unique_ptr<engine::BackendState>> state = backend.NewState();
    if (!state.ok()) {
      std::fprintf(stderr, "kls generate: %s\n", state.status().ToString().c_str());
      return 1;
    }
    absl::StatusOr<engine::GenerateResult> result =
        RunTurn(*flags, model, backend, state->get(), prompt);
    if (!result.ok()) {
      std::fprintf(stderr, "kls generate: %s\n", result.status().ToString().c_str());
      return absl::IsInvalidArgument(result.status()) ? 2 : 1;
    }
    return 0;
  };
}

}  // namespace kls::cli

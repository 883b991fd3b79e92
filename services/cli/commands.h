// Subcommands of the `kls` program. Each registers its flags on the CLI11 app and runs when
// selected; Run functions return the process exit code (0 ok, 1 failure, 2 bad usage).
#ifndef KLS_SERVICES_CLI_COMMANDS_H_
#define KLS_SERVICES_CLI_COMMANDS_H_

#include <functional>
#include <string>

#include "CLI/CLI.hpp"

namespace kls::cli {

// --backend auto|cpu|cuda and --cuda-device N, for the commands that run the model.
inline void AddBackendFlags(CLI::App* cmd, std::string* backend, int* cuda_device) {
  cmd->add_option("--backend", *backend,
                  "Compute backend: cpu (the reference), cuda (a CUDA build on a GPU), or auto "
                  "(cuda when a GPU is visible, else cpu)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--cuda-device", *cuda_device, "GPU ordinal for the cuda backend")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
}

// Adds the subcommand to `app`; the returned callable runs it (after parsing succeeded).
std::function<int()> AddMakeModelCommand(CLI::App& app);
std::function<int()> AddGenerateCommand(CLI::App& app);
std::function<int()> AddBenchCommand(CLI::App& app);
std::function<int()> AddServeCommand(CLI::App& app);
std::function<int()> AddRouterCommand(CLI::App& app);
std::function<int()> AddWorkerCommand(CLI::App& app);
std::function<int()> AddStoreCommand(CLI::App& app);

}  // namespace kls::cli

#endif  // KLS_SERVICES_CLI_COMMANDS_H_

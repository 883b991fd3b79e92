// kls — Kimi Linear Serve. One program, one subcommand per role.
#include <cstdio>
#include <functional>
#include <vector>

#include "CLI/CLI.hpp"
#include "services/cli/client_commands.h"
#include "services/cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"kls — Kimi Linear Serve"};
  app.require_subcommand(1);
  std::vector<std::pair<CLI::App*, std::function<int()>>> commands;
  auto add = [&](std::function<int()> (*adder)(CLI::App&)) {
    std::function<int()> run = adder(app);
    commands.push_back({app.get_subcommands({}).back(), std::move(run)});
  };
  add(kls::cli::AddMakeModelCommand);
  add(kls::cli::AddGenerateCommand);
  add(kls::cli::AddBenchCommand);
  add(kls::cli::AddServeCommand);
  add(kls::cli::AddRouterCommand);
  add(kls::cli::AddWorkerCommand);
  add(kls::cli::AddStoreCommand);
  add(kls::cli::AddChatCommand);
  add(kls::cli::AddSessionsCommand);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11 reports parse errors by exception; this is the one place we catch one.
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  for (auto& [sub, run] : commands) {
    if (sub->parsed()) return run();
  }
  return 2;
}

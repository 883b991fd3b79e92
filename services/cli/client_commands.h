// Client subcommands of `kls`: `chat` and `sessions`, which talk to a router's public
// kls.v1.Sessions API over gRPC. Like commands.h, each Add function registers one top-level
// subcommand; the returned callable runs it and returns the exit code (0 ok, 1 failure, 2 bad
// usage).
#ifndef KLS_SERVICES_CLI_CLIENT_COMMANDS_H_
#define KLS_SERVICES_CLI_CLIENT_COMMANDS_H_

#include <grpcpp/client_context.h>
#include <grpcpp/support/status.h>

#include <functional>
#include <memory>
#include <string>

#include "CLI/CLI.hpp"
#include "kls/v1/sessions.grpc.pb.h"

namespace kls::cli {

// `kls chat`: an interactive session client (a REPL on stdin; see chat_command.cc).
std::function<int()> AddChatCommand(CLI::App& app);
// `kls sessions ls|show ID|rm ID`.
std::function<int()> AddSessionsCommand(CLI::App& app);

// What the client commands share (defined in sessions_command.cc).

// How to reach and authenticate to the router.
struct ClientFlags {
  std::string target = "127.0.0.1:50051";
  std::string api_key;      // empty: no "authorization" metadata
  double timeout_s = 30.0;  // deadline of each unary RPC; 0: none. Generate has no deadline.
};

// Registers --target, --api-key (also from $KLS_API_KEY) and --timeout on `cmd`.
void AddClientFlags(CLI::App* cmd, ClientFlags* flags);

// A stub on an insecure channel to flags.target. Never fails: connection errors surface as
// UNAVAILABLE on the first RPC.
std::unique_ptr<kls::v1::Sessions::Stub> NewSessionsStub(const ClientFlags& flags);

// Adds the "authorization: Bearer <key>" metadata to `context` when an API key is set, and
// the --timeout deadline when `unary`. Call before starting the RPC.
void PrepareContext(const ClientFlags& flags, bool unary, grpc::ClientContext* context);

// "<CODE>: <message>", e.g. "NOT_FOUND: session 'x' not found".
std::string RpcErrorText(const grpc::Status& status);

}  // namespace kls::cli

#endif  // KLS_SERVICES_CLI_CLIENT_COMMANDS_H_

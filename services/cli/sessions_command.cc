// `kls sessions ls|show ID|rm ID`: list, inspect and delete sessions through a router, plus the
// gRPC plumbing shared with `kls chat` (client_commands.h).
#include <grpcpp/channel.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "kls/v1/sessions.grpc.pb.h"
#include "services/cli/client_commands.h"
#include "services/common/grpc_status.h"

namespace kls::cli {

void AddClientFlags(CLI::App* cmd, ClientFlags* flags) {
  cmd->add_option("--target", flags->target, "Router address HOST:PORT")->capture_default_str();
  cmd->add_option("--api-key", flags->api_key,
                  "API key, sent as \"authorization: Bearer <key>\" (default: $KLS_API_KEY)")
      ->envname("KLS_API_KEY");
  cmd->add_option("--timeout", flags->timeout_s, "Deadline of each non-streaming call, seconds")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
}

std::unique_ptr<kls::v1::Sessions::Stub> NewSessionsStub(const ClientFlags& flags) {
  grpc::ChannelArguments args;
  // A session's history (GetSession include_history) can outgrow gRPC's 4 MiB default.
  args.SetMaxReceiveMessageSize(256 << 20);
  return kls::v1::Sessions::NewStub(
      grpc::CreateCustomChannel(flags.target, grpc::InsecureChannelCredentials(), args));
}

void PrepareContext(const ClientFlags& flags, bool unary, grpc::ClientContext* context) {
  if (!flags.api_key.empty()) context->AddMetadata("authorization", "Bearer " + flags.api_key);
  if (unary && flags.timeout_s > 0) {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::microseconds(static_cast<int64_t>(flags.timeout_s * 1e6)));
  }
}

std::string RpcErrorText(const grpc::Status& status) {
  const absl::Status s = services::FromGrpcStatus(status);
  return absl::StrCat(absl::StatusCodeToString(s.code()), ": ", s.message());
}

namespace {

struct SessionsFlags {
  ClientFlags client;
  std::string session_id;
  bool history = false;
  int page_size = 100;
};

// "2025-01-31 17:04:05" in local time; "-" for 0 (unset).
std::string FormatTimeMs(int64_t ms) {
  if (ms == 0) return "-";
  return absl::FormatTime("%Y-%m-%d %H:%M:%S", absl::FromUnixMillis(ms), absl::LocalTimeZone());
}

std::string ParentText(const kls::v1::Session& s) {
  if (s.parent_session_id().empty()) return "-";
  return absl::StrCat(s.parent_session_id(), "@", s.parent_version());
}

int Fail(const grpc::Status& status) {
  std::fprintf(stderr, "error: %s\n", RpcErrorText(status).c_str());
  return 1;
}

// Pages through ListSessions and prints one table row per session.
int RunList(kls::v1::Sessions::Stub& stub, const SessionsFlags& flags) {
  std::vector<kls::v1::Session> sessions;
  kls::v1::ListSessionsRequest request;
  request.set_page_size(flags.page_size);
  while (true) {
    grpc::ClientContext context;
    PrepareContext(flags.client, /*unary=*/true, &context);
    kls::v1::ListSessionsResponse response;
    const grpc::Status status = stub.ListSessions(&context, request, &response);
    if (!status.ok()) return Fail(status);
    for (kls::v1::Session& s : *response.mutable_sessions()) sessions.push_back(std::move(s));
    if (response.next_page_token().empty()) break;
    if (response.next_page_token() == request.page_token()) {
      // A server that hands back the token it was given would keep us here forever.
      std::fprintf(stderr, "error: ListSessions returned the same page token twice\n");
      return 1;
    }
    request.set_page_token(response.next_page_token());
  }
  size_t id_width = 7;  // "SESSION"
  for (const kls::v1::Session& s : sessions) id_width = std::max(id_width, s.session_id().size());
  std::printf("%-*s  %7s  %8s  %-19s  %s\n", static_cast<int>(id_width), "SESSION", "VERSION",
              "TOKENS", "UPDATED", "PARENT");
  for (const kls::v1::Session& s : sessions) {
    std::printf("%-*s  %7llu  %8llu  %-19s  %s\n", static_cast<int>(id_width),
                s.session_id().c_str(), static_cast<unsigned long long>(s.version()),
                static_cast<unsigned long long>(s.num_tokens()),
                FormatTimeMs(s.update_time_ms()).c_str(), ParentText(s).c_str());
  }
  return 0;
}

int RunShow(kls::v1::Sessions::Stub& stub, const SessionsFlags& flags) {
  grpc::ClientContext context;
  PrepareContext(flags.client, /*unary=*/true, &context);
  kls::v1::GetSessionRequest request;
  request.set_session_id(flags.session_id);
  request.set_include_history(flags.history);
  kls::v1::Session s;
  const grpc::Status status = stub.GetSession(&context, request, &s);
  if (!status.ok()) return Fail(status);
  std::printf("session_id:        %s\n", s.session_id().c_str());
  std::printf("version:           %llu\n", static_cast<unsigned long long>(s.version()));
  std::printf("num_tokens:        %llu\n", static_cast<unsigned long long>(s.num_tokens()));
  std::printf("created:           %s\n", FormatTimeMs(s.create_time_ms()).c_str());
  std::printf("updated:           %s\n", FormatTimeMs(s.update_time_ms()).c_str());
  std::printf("expires:           %s\n",
              s.expire_time_ms() == 0 ? "never" : FormatTimeMs(s.expire_time_ms()).c_str());
  std::printf("parent:            %s\n", ParentText(s).c_str());
  std::printf("model_fingerprint: %s\n", s.model_fingerprint().c_str());
  // Sorted, since proto maps iterate in no particular order.
  std::vector<std::pair<std::string, std::string>> metadata(s.metadata().begin(),
                                                            s.metadata().end());
  std::sort(metadata.begin(), metadata.end());
  for (const auto& [key, value] : metadata) {
    std::printf("metadata:          %s=%s\n", key.c_str(), value.c_str());
  }
  if (flags.history) {
    std::printf("history_tokens:    %d\n", s.history_tokens_size());
    std::printf("history:\n");
    std::fwrite(s.history_text().data(), 1, s.history_text().size(), stdout);
    if (!s.history_text().empty() && s.history_text().back() != '\n') std::printf("\n");
  }
  return 0;
}

int RunRemove(kls::v1::Sessions::Stub& stub, const SessionsFlags& flags) {
  grpc::ClientContext context;
  PrepareContext(flags.client, /*unary=*/true, &context);
  kls::v1::DeleteSessionRequest request;
  request.set_session_id(flags.session_id);
  kls::v1::DeleteSessionResponse response;
  const grpc::Status status = stub.DeleteSession(&context, request, &response);
  if (!status.ok()) return Fail(status);
  std::printf("deleted %s\n", flags.session_id.c_str());
  return 0;
}

}  // namespace

std::function<int()> AddSessionsCommand(CLI::App& app) {
  auto flags = std::make_shared<SessionsFlags>();
  CLI::App* cmd = app.add_subcommand("sessions", "List, show or delete sessions on a router");
  cmd->require_subcommand(1);
  AddClientFlags(cmd, &flags->client);
  // fallthrough: the client flags may also follow the action (`kls sessions ls --target X`).
  CLI::App* ls = cmd->add_subcommand("ls", "List the caller's sessions")->fallthrough();
  ls->add_option("--page-size", flags->page_size, "Sessions fetched per ListSessions call")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  CLI::App* show = cmd->add_subcommand("show", "Print one session's fields")->fallthrough();
  show->add_option("ID", flags->session_id, "Session id")->required();
  show->add_flag("--history", flags->history, "Also print the session's history text");
  CLI::App* rm = cmd->add_subcommand("rm", "Delete a session")->fallthrough();
  rm->add_option("ID", flags->session_id, "Session id")->required();
  return [flags, ls, show, rm]() -> int {
    std::unique_ptr<kls::v1::Sessions::Stub> stub = NewSessionsStub(flags->client);
    if (ls->parsed()) return RunList(*stub, *flags);
    if (show->parsed()) return RunShow(*stub, *flags);
    if (rm->parsed()) return RunRemove(*stub, *flags);
    return 2;
  };
}

}  // namespace kls::cli

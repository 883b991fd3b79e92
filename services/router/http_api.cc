#include "services/router/http_api.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <grpcpp/client_context.h>
#include <grpcpp/support/client_callback.h>
#include <httplib.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <optional>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"
#include "absl/memory/memory.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "kls/v1/sessions.grpc.pb.h"
#include "services/common/grpc_status.h"
#include "services/common/http_socket.h"
#include "services/common/session_ids.h"
#include "services/router/kimi_tool_calls.h"
#include "services/router/openai_protocol.h"

namespace kls::router {
namespace {

using openai::ApiError;
using openai::Json;

constexpr char kJson[] = "application/json";
constexpr char kEventStream[] = "text/event-stream";
constexpr char kSessionHeader[] = "X-KLS-Session";
constexpr char kSseHeartbeat[] = ": keep-alive\n\n";
// Ephemeral sessions (stateless chat completions, store=false responses) are deleted after their
// request; the TTL bounds how long one outlives a failed delete or a router that died meanwhile.
constexpr int64_t kEphemeralTtlSeconds = 300;

int64_t NowSeconds() { return absl::ToUnixSeconds(absl::Now()); }

void SendError(httplib::Response& res, const ApiError& error) {
  res.status = error.http_status;
  res.set_content(openai::ErrorBody(error), kJson);
}

void SendStatus(httplib::Response& res, const absl::Status& status) {
  SendError(res, openai::ErrorFromStatus(status));
}

void SendJson(httplib::Response& res, const Json& json) {
  res.status = 200;
  res.set_content(openai::Dump(json), kJson);
}

// One Generate call, read by a gRPC callback reactor into a buffer that the HTTP thread drains.
// Thread-safe: reactor callbacks (gRPC threads) and the owning HTTP thread meet under mu_; the
// callbacks never block. The HTTP thread owns it; the destructor cancels the call if it is still
// running and waits for the reactor's OnDone, so no callback outlives it.
class GenerateCall final : public grpc::ClientReadReactor<kls::v1::GenerateResponse> {
 public:
  enum class Wait { kText, kDone, kTimeout };

  GenerateCall(kls::v1::Sessions::Stub* stub, kls::v1::GenerateRequest request,
               const std::string& authorization)
      : request_(std::move(request)) {
    if (!authorization.empty()) context_.AddMetadata("authorization", authorization);
    stub->async()->Generate(&context_, &request_, this);
    StartRead(&response_);
    StartCall();
  }

  ~GenerateCall() override {
    Cancel();
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&done_));
  }

  // Waits up to `timeout` for new text or the end of the call; moves new text into *text.
  Wait Next(absl::Duration timeout, std::string* text) {
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithTimeout(absl::Condition(this, &GenerateCall::Ready), timeout);
    if (!text_.empty()) {
      text->append(text_);
      text_.clear();
      return Wait::kText;
    }
    return done_ ? Wait::kDone : Wait::kTimeout;
  }

  // After Next returned kDone: the call's status, and the final message when it is OK.
  grpc::Status status() const {
    absl::MutexLock lock(&mu_);
    return status_;
  }
  const kls::v1::GenerateResponse& final() const {
    absl::MutexLock lock(&mu_);
    return final_;
  }

  void Cancel() { context_.TryCancel(); }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // OnDone follows
    {
      absl::MutexLock lock(&mu_);
      text_ += response_.text();
      if (response_.finish_reason() != kls::v1::FINISH_REASON_UNSPECIFIED) {
        final_ = response_;
        final_.clear_text();
        final_.clear_token_ids();
      }
    }
    response_.Clear();
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    absl::MutexLock lock(&mu_);
    status_ = status;
    // A stream that ends OK without its final message did not commit anything we can report.
    if (status.ok() && final_.finish_reason() == kls::v1::FINISH_REASON_UNSPECIFIED) {
      status_ = grpc::Status(grpc::StatusCode::INTERNAL, "the turn ended without a final message");
    }
    done_ = true;
  }

 private:
  bool Ready() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return done_ || !text_.empty(); }

  kls::v1::GenerateRequest request_;
  grpc::ClientContext context_;
  kls::v1::GenerateResponse response_;  // the read target (reactor only)

  mutable absl::Mutex mu_;
  std::string text_ ABSL_GUARDED_BY(mu_);
  kls::v1::GenerateResponse final_ ABSL_GUARDED_BY(mu_);
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
};

// Splits "host:port" (host may be "[v6]").
absl::StatusOr<std::pair<std::string, int>> SplitListen(const std::string& listen) {
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("http listen address '", listen, "' is not HOST:PORT"));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return std::make_pair(host, port);
}

// Whether the client of a request hung up, from its socket. cpp-httplib 0.11 (Debian 12) exposes
// neither the socket nor Request::is_connection_closed (0.15+) to a handler, and a handler has
// written nothing before it returns, so the socket is found once among the process's descriptors
// by the request's addresses: a connection's 4-tuple is unique, and httplib closes the socket only
// after the response (and its content provider) is gone, so the descriptor stays this
// connection's for as long as the request is served. A client that shuts down only its sending
// side counts as gone (HTTP clients do not). Copyable; Closed() is a non-blocking poll.
class ClientConnection {
 public:
  static ClientConnection Of(const httplib::Request& req) {
    DIR* dir = opendir("/proc/self/fd");
    if (dir == nullptr) return ClientConnection(-1);
    int found = -1;
    while (const dirent* entry = readdir(dir)) {
      int fd = -1;
      if (!absl::SimpleAtoi(entry->d_name, &fd) || fd == dirfd(dir)) continue;
      std::optional<Endpoint> peer = EndpointOf(fd, getpeername);
      if (!peer.has_value() || peer->port != req.remote_port || peer->host != req.remote_addr) {
        continue;
      }
      std::optional<Endpoint> local = EndpointOf(fd, getsockname);
      if (local.has_value() && local->port == req.local_port &&
          (req.local_addr.empty() || local->host == req.local_addr)) {
        found = fd;
        break;
      }
    }
    closedir(dir);
    if (found < 0) {
      KLS_LOG(WARNING) << "http: the socket of " << req.remote_addr << ":" << req.remote_port
                       << " was not found; its disconnect is noticed only by a failed write";
    }
    return ClientConnection(found);
  }

  // True once the peer closed or reset the connection; false while it is open or unknown.
  bool Closed() const {
    if (fd_ < 0) return false;
    pollfd p{fd_, POLLIN | POLLRDHUP, 0};
    if (poll(&p, 1, 0) <= 0) return false;
    return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
  }

 private:
  struct Endpoint {
    std::string host;  // numeric, as httplib writes Request::remote_addr
    int port = -1;
  };

  explicit ClientConnection(int fd) : fd_(fd) {}

  static std::optional<Endpoint> EndpointOf(int fd, int (*name)(int, sockaddr*, socklen_t*)) {
    sockaddr_storage addr{};
    socklen_t length = sizeof(addr);
    if (name(fd, reinterpret_cast<sockaddr*>(&addr), &length) != 0) return std::nullopt;
    Endpoint e;
    if (addr.ss_family == AF_INET) {
      e.port = ntohs(reinterpret_cast<const sockaddr_in*>(&addr)->sin_port);
    } else if (addr.ss_family == AF_INET6) {
      e.port = ntohs(reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_port);
    } else {
      return std::nullopt;
    }
    char host[NI_MAXHOST] = {};
    if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), length, host, sizeof(host), nullptr,
                    0, NI_NUMERICHOST) != 0) {
      return std::nullopt;
    }
    e.host = host;
    return e;
  }

  int fd_;
};

}  // namespace

class HttpApi::Impl {
 public:
  Impl(const HttpApiOptions& options, std::shared_ptr<grpc::Channel> channel,
       const ApiKeys* api_keys)
      : options_(options),
        stub_(kls::v1::Sessions::NewStub(std::move(channel))),
        api_keys_(api_keys),
        created_(NowSeconds()) {}

  ~Impl() { Stop(); }

  absl::Status Start() {
    KLS_ASSIGN_OR_RETURN(auto address, SplitListen(options_.listen));
    // A running turn holds its handler's thread, so turns alone never take the whole pool.
    const int threads = options_.max_inflight + options_.threads;
    server_.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    server_.set_socket_options(services::ExclusivePortSocketOptions);
    server_.set_payload_max_length(options_.max_body_bytes);
    server_.set_keep_alive_timeout(2);  // bounds how long Stop waits for idle connections
    server_.set_error_handler([](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty() || res.status == 499) return;
      ApiError e;
      e.http_status = res.status;
      e.type = res.status >= 500 ? "server_error" : "invalid_request_error";
      if (res.status == 413) {
        e.code = "request_too_large";
        e.message = "the request body is too large";
      } else if (res.status == 404) {
        e.code = "not_found";
        e.message = "no such endpoint";
      } else {
        e.message = absl::StrCat("HTTP ", res.status);
      }
      SendError(res, e);
    });
    Route();
    const bool bound = address.second == 0 ? (port_ = server_.bind_to_any_port(address.first)) > 0
                                           : server_.bind_to_port(address.first, address.second);
    if (!bound) {
      return absl::UnavailableError(absl::StrCat("cannot listen for HTTP on ", options_.listen));
    }
    if (address.second != 0) port_ = address.second;
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    // cpp-httplib 0.11 has no wait_until_ready: poll is_running.
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (!server_.is_running() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
    if (!server_.is_running()) {
      return absl::UnavailableError(
          absl::StrCat("the HTTP server on ", options_.listen, " did not start"));
    }
    return absl::OkStatus();
  }

  int port() const { return port_; }

  void Stop() {
    {
      absl::MutexLock lock(&mu_);
      if (stopped_) return;
      stopped_ = true;
    }
    server_.stop();
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(
          absl::Condition(
              +[](absl::flat_hash_set<GenerateCall*>* calls) { return calls->empty(); }, &calls_),
          options_.stop_grace);
      for (GenerateCall* call : calls_) call->Cancel();
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  // ---- Plumbing ---------------------------------------------------------------------------------

  void Route() {
    server_.Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("ok\n", "text/plain");
    });
    server_.Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
      const bool ready = !options_.ready || options_.ready();
      res.status = ready ? 200 : 503;
      res.set_content(ready ? "ready\n" : "no ready worker\n", "text/plain");
    });
    server_.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
      if (!Authorized(req, res)) return;
      SendJson(res, {{"object", "list"}, {"data", Json::array({ModelJson()})}});
    });
    server_.Get(R"(/v1/models/([^/]+))",
                [this](const httplib::Request& req, httplib::Response& res) {
                  if (!Authorized(req, res)) return;
                  if (req.matches[1].str() != options_.model_name)
                    return SendError(res, UnknownModel(req.matches[1].str()));
                  SendJson(res, ModelJson());
                });
    server_.Post("/v1/chat/completions",
                 [this](const httplib::Request& req, httplib::Response& res) { Chat(req, res); });
    server_.Post("/v1/responses", [this](const httplib::Request& req, httplib::Response& res) {
      CreateResponse(req, res);
    });
    server_.Get(R"(/v1/responses/([^/]+))",
                [this](const httplib::Request& req, httplib::Response& res) {
                  GetResponse(req, res, req.matches[1].str());
                });
    server_.Delete(R"(/v1/responses/([^/]+))",
                   [this](const httplib::Request& req, httplib::Response& res) {
                     DeleteResponse(req, res, req.matches[1].str());
                   });
  }

  Json ModelJson() const {
    return {{"id", options_.model_name},
            {"object", "model"},
            {"created", created_},
            {"owned_by", "kls"}};
  }

  ApiError UnknownModel(const std::string& model) const {
    ApiError e;
    e.http_status = 404;
    e.type = "invalid_request_error";
    e.code = "model_not_found";
    e.param = "model";
    e.message = absl::StrCat("the model '", model.substr(0, 200), "' does not exist; this server ",
                             "serves '", options_.model_name, "'");
    return e;
  }

  // 401 when keys are configured and the Bearer key is missing or unknown.
  bool Authorized(const httplib::Request& req, httplib::Response& res) const {
    if (api_keys_ == nullptr) return true;
    std::optional<std::string_view> value;
    const std::string header = req.get_header_value("Authorization");
    if (req.has_header("Authorization")) value = header;
    absl::StatusOr<std::string> tenant = api_keys_->Authenticate(value);
    if (tenant.ok()) return true;
    SendStatus(res, tenant.status());
    return false;
  }

  // ---- Sessions calls (unary, with the client's credentials and rpc_timeout) --------------------

  void Prepare(const std::string& authorization, grpc::ClientContext* context) const {
    if (!authorization.empty()) context->AddMetadata("authorization", authorization);
    context->set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_timeout));
  }

  absl::StatusOr<kls::v1::Session> GetSession(const std::string& authorization,
                                              const std::string& session_id, bool turns) {
    grpc::ClientContext context;
    Prepare(authorization, &context);
    kls::v1::GetSessionRequest request;
    request.set_session_id(session_id);
    request.set_include_turns(turns);
    kls::v1::Session session;
    KLS_RETURN_IF_ERROR(services::FromGrpcStatus(stub_->GetSession(&context, request, &session)));
    return session;
  }

  // `ttl_seconds` 0: no expiry.
  absl::StatusOr<kls::v1::Session> CreateSession(const std::string& authorization,
                                                 const std::string& session_id,
                                                 int64_t ttl_seconds) {
    grpc::ClientContext context;
    Prepare(authorization, &context);
    kls::v1::CreateSessionRequest request;
    request.set_session_id(session_id);
    request.set_ttl_seconds(ttl_seconds);
    kls::v1::Session session;
    KLS_RETURN_IF_ERROR(
        services::FromGrpcStatus(stub_->CreateSession(&context, request, &session)));
    return session;
  }

  // `ttl_seconds` 0: the source's.
  absl::StatusOr<kls::v1::Session> ForkSession(const std::string& authorization,
                                               const std::string& session_id, uint64_t version,
                                               int64_t ttl_seconds) {
    grpc::ClientContext context;
    Prepare(authorization, &context);
    kls::v1::ForkSessionRequest request;
    request.set_session_id(session_id);
    request.set_version(version);
    request.set_ttl_seconds(ttl_seconds);
    kls::v1::Session session;
    KLS_RETURN_IF_ERROR(services::FromGrpcStatus(stub_->ForkSession(&context, request, &session)));
    return session;
  }

  absl::Status DeleteSession(const std::string& authorization, const std::string& session_id) {
    grpc::ClientContext context;
    Prepare(authorization, &context);
    kls::v1::DeleteSessionRequest request;
    request.set_session_id(session_id);
    kls::v1::DeleteSessionResponse response;
    return services::FromGrpcStatus(stub_->DeleteSession(&context, request, &response));
  }

  // Deletes an ephemeral session. A cancelled turn may still be unwinding on the worker
  // (ABORTED: busy), so that is retried briefly; what is left expires (kEphemeralTtlSeconds).
  void DeleteEphemeral(const std::string& authorization, const std::string& session_id) {
    absl::Duration backoff = absl::Milliseconds(5);
    for (int attempt = 0; attempt < 8; ++attempt) {
      const absl::Status s = DeleteSession(authorization, session_id);
      if (s.ok() || absl::IsNotFound(s)) return;
      if (!absl::IsAborted(s)) {
        KLS_LOG(WARNING) << "http: ephemeral session " << session_id << " not deleted: " << s;
        return;
      }
      absl::SleepFor(backoff);
      backoff *= 2;
    }
    KLS_LOG(WARNING) << "http: ephemeral session " << session_id << " still busy; not deleted";
  }

  // ---- Admission --------------------------------------------------------------------------------

  // One of the max_inflight turn slots, released on destruction.
  class Slot {
   public:
    explicit Slot(Impl* impl) : impl_(impl) {}
    ~Slot() {
      absl::MutexLock lock(&impl_->mu_);
      --impl_->inflight_;
    }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;

   private:
    Impl* const impl_;
  };

  // A slot, or null (after answering 429) when max_inflight turns are running.
  std::unique_ptr<Slot> Admit(httplib::Response& res) {
    {
      absl::MutexLock lock(&mu_);
      if (inflight_ < options_.max_inflight) {
        ++inflight_;
        return std::make_unique<Slot>(this);
      }
    }
    res.set_header("Retry-After", "1");
    SendStatus(res, absl::ResourceExhaustedError(
                        absl::StrCat("this server is already running ", options_.max_inflight,
                                     " requests (--http-max-inflight); retry later")));
    return nullptr;
  }

  // ---- Turns ------------------------------------------------------------------------------------

  // One running turn: its admission slot, the call, the ephemeral session to delete afterwards,
  // and the registry entry that lets Stop cancel it. Destroyed once the reply has been written
  // (the last owner is the reply's content provider), so the slot is held until then.
  struct Turn {
    Impl* impl = nullptr;
    std::unique_ptr<Slot> slot;
    std::string authorization;
    std::string ephemeral_session;  // empty: keep the session
    std::unique_ptr<GenerateCall> call;
    std::string text;  // text read but not yet handed on

    ~Turn() {
      if (call != nullptr) {
        impl->Unregister(call.get());
        call.reset();  // cancels a running call and waits for it
      }
      if (!ephemeral_session.empty()) impl->DeleteEphemeral(authorization, ephemeral_session);
    }
  };

  void Register(GenerateCall* call) {
    absl::MutexLock lock(&mu_);
    calls_.insert(call);
    if (stopped_) call->Cancel();
  }
  void Unregister(GenerateCall* call) {
    absl::MutexLock lock(&mu_);
    calls_.erase(call);
  }

  std::shared_ptr<Turn> StartTurn(std::unique_ptr<Slot> slot, const std::string& authorization,
                                  kls::v1::GenerateRequest request, std::string ephemeral_session) {
    auto turn = std::make_shared<Turn>();
    turn->impl = this;
    turn->slot = std::move(slot);
    turn->authorization = authorization;
    turn->ephemeral_session = std::move(ephemeral_session);
    turn->call = std::make_unique<GenerateCall>(stub_.get(), std::move(request), authorization);
    Register(turn->call.get());
    return turn;
  }

  // The status a finished call reports to the client; a turn cancelled by Stop says so.
  absl::Status TurnStatus(const GenerateCall& call) {
    const grpc::Status status = call.status();
    if (status.error_code() == grpc::StatusCode::CANCELLED) {
      absl::MutexLock lock(&mu_);
      if (stopped_) {
        return absl::UnavailableError(
            "the server is shutting down: the turn was cancelled and rolled back");
      }
    }
    return services::FromGrpcStatus(status);
  }

  // Waits for the turn's first text (or its end) when `first_text`, else for its end, moving
  // text into turn.text. Every heartbeat it checks whether the client hung up; then it cancels
  // the turn (the worker rolls it back) and returns false.
  bool Await(Turn& turn, const ClientConnection& client, bool first_text) {
    absl::Time checked = absl::Now();
    while (true) {
      const GenerateCall::Wait wait = turn.call->Next(options_.heartbeat, &turn.text);
      if (wait == GenerateCall::Wait::kDone) return true;
      if (first_text && wait == GenerateCall::Wait::kText) return true;
      if (const absl::Time now = absl::Now(); now - checked >= options_.heartbeat) {
        checked = now;
        if (client.Closed()) {
          turn.call->Cancel();
          return false;
        }
      }
    }
  }

  // Nobody reads it; httplib's log and error handler still see a status.
  static void ClientGone(httplib::Response& res) {
    res.status = 499;
    res.set_content("", kJson);
  }

  // A non-streaming reply: the whole turn, then the status line and the body — so every error
  // gets its HTTP status. `body` builds the JSON of a finished turn.
  using BodyBuilder =
      absl::FunctionRef<Json(const ParsedReply& reply, const kls::v1::GenerateResponse& final)>;
  void ServeWhole(httplib::Response& res, std::shared_ptr<Turn> turn,
                  const ClientConnection& client, bool tools, BodyBuilder body) {
    if (!Await(*turn, client, /*first_text=*/false)) return ClientGone(res);
    if (absl::Status s = TurnStatus(*turn->call); !s.ok()) return SendStatus(res, s);
    auto bytes = std::make_shared<const std::string>(
        openai::Dump(body(ParseReply(turn->text, tools), turn->call->final())));
    res.status = 200;
    // The turn (its ephemeral session's delete, its slot) goes when the body has been written.
    res.set_content_provider(
        bytes->size(), kJson,
        [bytes](size_t offset, size_t length, httplib::DataSink& sink) {
          return sink.write(bytes->data() + offset, length);
        },
        [turn = std::move(turn)](bool) mutable { turn.reset(); });
  }

  // A streamed reply: the status line goes out with the first text (errors before it get their
  // HTTP status), then the stream's events; an SSE comment whenever nothing was written for a
  // heartbeat; the client is checked every heartbeat. A failure after the status line ends the
  // stream with the API's error event.
  void ServeStream(httplib::Response& res, std::shared_ptr<Turn> turn,
                   const ClientConnection& client, std::shared_ptr<openai::EventStream> stream) {
    if (!Await(*turn, client, /*first_text=*/true)) return ClientGone(res);
    if (turn->text.empty()) {  // the call ended before any text
      if (absl::Status s = TurnStatus(*turn->call); !s.ok()) return SendStatus(res, s);
    }
    res.status = 200;
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        kEventStream, [this, turn, client, stream](size_t, httplib::DataSink& sink) {
          absl::Time written = absl::Now(), checked = written;
          auto write = [&](const std::string& bytes) {
            if (bytes.empty()) return true;
            if (!sink.write(bytes.data(), bytes.size())) {
              turn->call->Cancel();  // the client is gone: roll the turn back
              return false;
            }
            written = absl::Now();
            return true;
          };
          if (!write(stream->OnStart())) return false;
          while (true) {
            if (!turn->text.empty()) {
              const std::string delta = std::exchange(turn->text, std::string());
              if (!write(stream->OnText(delta))) return false;
            }
            const absl::Duration idle = absl::Now() - written;
            const GenerateCall::Wait wait = turn->call->Next(
                std::max(options_.heartbeat - idle, absl::Milliseconds(1)), &turn->text);
            if (wait == GenerateCall::Wait::kDone) break;
            // Tokens may keep coming while nothing is written (held-back tool calls).
            const absl::Time now = absl::Now();
            if (now - written >= options_.heartbeat && !write(kSseHeartbeat)) return false;
            if (now - checked >= options_.heartbeat) {
              checked = now;
              if (client.Closed()) {
                turn->call->Cancel();
                return false;
              }
            }
          }
          if (absl::Status s = TurnStatus(*turn->call); s.ok()) {
            const kls::v1::GenerateResponse& final = turn->call->final();
            write(stream->OnFinish(final.finish_reason(), openai::UsageFromKls(final.usage())));
          } else {
            write(stream->OnError(openai::ErrorFromStatus(s)));
          }
          sink.done();
          return true;
        });
  }

  // ---- /v1/chat/completions ---------------------------------------------------------------------

  void Chat(const httplib::Request& req, httplib::Response& res) {
    if (!Authorized(req, res)) return;
    std::unique_ptr<Slot> slot = Admit(res);
    if (slot == nullptr) return;
    absl::StatusOr<openai::ChatCompletionRequest> parsed =
        openai::ParseChatCompletionRequest(req.body);
    if (!parsed.ok()) return SendStatus(res, parsed.status());
    openai::ChatCompletionRequest& r = *parsed;
    if (r.model != options_.model_name) return SendError(res, UnknownModel(r.model));
    const std::string authorization = req.get_header_value("Authorization");

    kls::v1::GenerateRequest generate;
    *generate.mutable_sampling() = r.sampling;
    generate.set_special_tokens_in_text(r.tools);
    std::string ephemeral;
    if (req.has_header(kSessionHeader)) {
      const std::string session_id = req.get_header_value(kSessionHeader);
      if (absl::Status s = services::ValidateSessionId(kSessionHeader, session_id); !s.ok()) {
        return SendStatus(res, s);
      }
      absl::StatusOr<kls::v1::Session> session = GetSession(authorization, session_id, false);
      if (absl::IsNotFound(session.status())) {
        session = CreateSession(authorization, session_id, /*ttl_seconds=*/0);
      }
      if (!session.ok()) return SendStatus(res, session.status());
      const std::map<std::string, std::string> metadata(session->metadata().begin(),
                                                        session->metadata().end());
      absl::StatusOr<size_t> first =
          openai::FirstNewMessage(r.messages, session->version(), metadata);
      if (!first.ok()) return SendStatus(res, first.status());
      generate.set_session_id(session_id);
      for (size_t i = *first; i < r.messages.size(); ++i) *generate.add_messages() = r.messages[i];
      generate.set_expected_version(session->version());
      for (auto& [key, value] : openai::ChainMetadata(r.messages, session->version() + 1)) {
        (*generate.mutable_metadata())[key] = value;
      }
      generate.set_commit(kls::v1::COMMIT_POLICY_SYNC);
    } else {
      absl::StatusOr<kls::v1::Session> session =
          CreateSession(authorization, "", kEphemeralTtlSeconds);
      if (!session.ok()) return SendStatus(res, session.status());
      ephemeral = session->session_id();
      generate.set_session_id(ephemeral);
      for (kls::v1::Message& m : r.messages) *generate.add_messages() = std::move(m);
      generate.set_commit(kls::v1::COMMIT_POLICY_NONE);
    }
    const ClientConnection client = ClientConnection::Of(req);
    std::shared_ptr<Turn> turn =
        StartTurn(std::move(slot), authorization, std::move(generate), std::move(ephemeral));
    const std::string id = absl::StrCat("chatcmpl-", services::NewSessionId());
    const int64_t created = NowSeconds();
    if (r.stream) {
      return ServeStream(res, std::move(turn), client,
                         std::make_shared<openai::ChatStream>(id, created, options_.model_name,
                                                              r.tools, r.include_usage));
    }
    ServeWhole(res, std::move(turn), client, r.tools,
               [&](const ParsedReply& reply, const kls::v1::GenerateResponse& final) {
                 return openai::ChatCompletionJson(id, created, options_.model_name, reply,
                                                   final.finish_reason(),
                                                   openai::UsageFromKls(final.usage()));
               });
  }

  // ---- /v1/responses ----------------------------------------------------------------------------

  void CreateResponse(const httplib::Request& req, httplib::Response& res) {
    if (!Authorized(req, res)) return;
    std::unique_ptr<Slot> slot = Admit(res);
    if (slot == nullptr) return;
    absl::StatusOr<openai::ResponsesRequest> parsed = openai::ParseResponsesRequest(req.body);
    if (!parsed.ok()) return SendStatus(res, parsed.status());
    openai::ResponsesRequest& r = *parsed;
    if (r.model != options_.model_name) return SendError(res, UnknownModel(r.model));
    const std::string authorization = req.get_header_value("Authorization");

    // The session the turn runs on and the version it continues. A session made here for
    // store=false is ephemeral: deleted afterwards, and expiring in case that fails.
    const int64_t ttl = r.store ? 0 : kEphemeralTtlSeconds;
    std::string target;
    uint64_t version = 0;
    bool made_here = false;  // created or forked by this request
    if (r.previous_response_id.empty()) {
      absl::StatusOr<kls::v1::Session> session = CreateSession(authorization, "", ttl);
      if (!session.ok()) return SendStatus(res, session.status());
      target = session->session_id();
      made_here = true;
    } else {
      absl::StatusOr<openai::ResponseRef> ref = openai::DecodeResponseId(r.previous_response_id);
      if (!ref.ok()) return SendStatus(res, ref.status());
      absl::StatusOr<kls::v1::Session> session = GetSession(authorization, ref->session_id, false);
      if (absl::IsNotFound(session.status()) ||
          (session.ok() && session->version() < ref->version)) {
        return SendStatus(res, absl::NotFoundError(absl::StrCat(
                                   "previous response '", r.previous_response_id, "' not found")));
      }
      if (!session.ok()) return SendStatus(res, session.status());
      if (ref->version == session->version() && r.store) {
        target = ref->session_id;  // the latest response: a plain turn
        version = ref->version;
      } else {
        // An older response (or one not to be stored on): a fork at that version.
        absl::StatusOr<kls::v1::Session> fork =
            ForkSession(authorization, ref->session_id, ref->version, ttl);
        if (!fork.ok()) return SendStatus(res, fork.status());
        target = fork->session_id();
        version = fork->version();
        made_here = true;
      }
    }
    // The turn commits `version` + 1 or fails (expected_version): a request that lost a race for
    // the same latest response gets 409, and the id names exactly the version this turn made.
    openai::ResponseHeader header;
    header.id = openai::EncodeResponseId({target, version + 1});
    header.created_at = NowSeconds();
    header.model = options_.model_name;
    header.instructions = r.instructions;
    header.previous_response_id = r.previous_response_id;
    header.store = r.store;
    header.tools = r.tools_json;
    if (r.sampling.has_temperature()) header.temperature = r.sampling.temperature();
    if (r.sampling.has_top_p()) header.top_p = r.sampling.top_p();
    if (r.sampling.has_max_tokens()) header.max_output_tokens = r.sampling.max_tokens();

    kls::v1::GenerateRequest generate;
    generate.set_session_id(target);
    for (kls::v1::Message& m : r.input) *generate.add_messages() = std::move(m);
    *generate.mutable_sampling() = r.sampling;
    generate.set_special_tokens_in_text(r.tools);
    generate.set_expected_version(version);
    std::string ephemeral;
    if (r.store) {
      // Recorded with the session, for GET (which matches the version). Unique per request: an
      // id shared by racing requests would replay the winner's turn to the loser.
      generate.set_request_id(absl::StrCat("http_", services::NewSessionId()));
      generate.set_commit(kls::v1::COMMIT_POLICY_SYNC);
    } else {
      generate.set_commit(kls::v1::COMMIT_POLICY_NONE);
      if (made_here) ephemeral = target;
    }
    const ClientConnection client = ClientConnection::Of(req);
    std::shared_ptr<Turn> turn =
        StartTurn(std::move(slot), authorization, std::move(generate), std::move(ephemeral));
    if (r.stream) {
      return ServeStream(res, std::move(turn), client,
                         std::make_shared<openai::ResponsesStream>(header, r.tools));
    }
    ServeWhole(res, std::move(turn), client, r.tools,
               [&](const ParsedReply& reply, const kls::v1::GenerateResponse& final) {
                 return openai::ResponseJson(header, openai::ResponseStatus(final.finish_reason()),
                                             openai::ResponseOutput(header.id, reply),
                                             openai::UsageFromKls(final.usage()));
               });
  }

  // GET returns the recorded turn (its text comes from the session's recent turn results, which
  // the worker keeps for the last few turns); an older response has an empty output.
  void GetResponse(const httplib::Request& req, httplib::Response& res, const std::string& id) {
    if (!Authorized(req, res)) return;
    absl::StatusOr<openai::ResponseRef> ref = openai::DecodeResponseId(id);
    if (!ref.ok()) return SendStatus(res, ref.status());
    absl::StatusOr<kls::v1::Session> session =
        GetSession(req.get_header_value("Authorization"), ref->session_id, true);
    if (absl::IsNotFound(session.status()) || (session.ok() && session->version() < ref->version)) {
      return SendStatus(res, absl::NotFoundError(absl::StrCat("response '", id, "' not found")));
    }
    if (!session.ok()) return SendStatus(res, session.status());
    openai::ResponseHeader header;
    header.id = id;
    header.model = options_.model_name;
    header.created_at = (ref->version == session->version() ? session->update_time_ms()
                                                            : session->create_time_ms()) /
                        1000;
    // The first turn of a fork continues the parent's response at the fork's version.
    if (!session->parent_session_id().empty() && session->parent_version() > 0 &&
        ref->version == session->parent_version() + 1) {
      header.previous_response_id =
          openai::EncodeResponseId({session->parent_session_id(), session->parent_version()});
    } else if (ref->version > 1) {
      header.previous_response_id = openai::EncodeResponseId({ref->session_id, ref->version - 1});
    }
    // One turn commits each version of a session, so the version finds the response.
    for (const kls::v1::TurnResult& turn : session->recent_turns()) {
      if (turn.version() != ref->version) continue;
      const ParsedReply reply = ParseKimiToolCalls(turn.text());
      openai::TurnUsage usage;
      usage.completion_tokens = turn.completion_tokens();
      usage.prompt_tokens = turn.prompt_tokens();
      return SendJson(res,
                      openai::ResponseJson(header, openai::ResponseStatus(turn.finish_reason()),
                                           openai::ResponseOutput(id, reply), usage));
    }
    SendJson(res, openai::ResponseJson(header, "completed", Json::array(), std::nullopt));
  }

  // DELETE removes the session that holds the response: every response of that conversation
  // (forks are separate sessions and stay).
  void DeleteResponse(const httplib::Request& req, httplib::Response& res, const std::string& id) {
    if (!Authorized(req, res)) return;
    absl::StatusOr<openai::ResponseRef> ref = openai::DecodeResponseId(id);
    if (!ref.ok()) return SendStatus(res, ref.status());
    const std::string authorization = req.get_header_value("Authorization");
    absl::StatusOr<kls::v1::Session> session = GetSession(authorization, ref->session_id, false);
    if (absl::IsNotFound(session.status()) || (session.ok() && session->version() < ref->version)) {
      return SendStatus(res, absl::NotFoundError(absl::StrCat("response '", id, "' not found")));
    }
    if (!session.ok()) return SendStatus(res, session.status());
    if (absl::Status s = DeleteSession(authorization, ref->session_id); !s.ok()) {
      return SendStatus(res, s);
    }
    SendJson(res, {{"id", id}, {"object", "response"}, {"deleted", true}});
  }

  const HttpApiOptions options_;
  const std::unique_ptr<kls::v1::Sessions::Stub> stub_;
  const ApiKeys* const api_keys_;
  const int64_t created_;
  httplib::Server server_;
  std::thread thread_;
  int port_ = 0;

  absl::Mutex mu_;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  int inflight_ ABSL_GUARDED_BY(mu_) = 0;  // admitted turns (Slots)
  absl::flat_hash_set<GenerateCall*> calls_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<std::unique_ptr<HttpApi>> HttpApi::Start(const HttpApiOptions& options,
                                                        std::shared_ptr<grpc::Channel> channel,
                                                        const ApiKeys* api_keys) {
  if (options.model_name.empty()) {
    return absl::InvalidArgumentError("the served model name must not be empty");
  }
  if (options.threads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("http threads must be >= 1, got ", options.threads));
  }
  if (options.max_inflight < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("http max in-flight requests must be >= 1, got ", options.max_inflight));
  }
  auto impl = std::make_unique<Impl>(options, std::move(channel), api_keys);
  KLS_RETURN_IF_ERROR(impl->Start());
  return absl::WrapUnique(new HttpApi(std::move(impl)));
}

HttpApi::HttpApi(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpApi::~HttpApi() { Stop(); }
int HttpApi::port() const { return impl_->port(); }
void HttpApi::Stop() { impl_->Stop(); }

}  // namespace kls::router

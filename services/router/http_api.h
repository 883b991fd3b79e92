// The router's OpenAI-compatible HTTP API (ARCHITECTURE.md §7), on its own port:
//
//   POST   /v1/chat/completions     stateless (one ephemeral session per request), or with
//                                   "X-KLS-Session: <id>" appended to that session
//   POST   /v1/responses            previous_response_id continues (latest) or forks (older)
//   GET    /v1/responses/{id}       DELETE /v1/responses/{id}
//   GET    /v1/models               GET /v1/models/{model}
//   GET    /healthz                 GET /readyz
//
// Every request goes through the router's own kls.v1.Sessions service over `channel` (an
// in-process channel in kls serve and kls router), so API keys, tenants, placement, retries and
// errors are exactly those of the gRPC API; "Authorization: Bearer <key>" is passed on as is.
// Request/response mapping, errors and event streams are in openai_protocol.h.
//
// Threads: cpp-httplib serves each connection on a pool thread; a handler blocks that thread on
// unary RPCs and waits for a turn's tokens, which a gRPC callback reactor delivers. At most
// `max_inflight` turns run at once (more get 429 at once instead of queueing); the pool has
// max_inflight + `threads` threads, so running turns never starve the other endpoints.
//
// While a turn runs, its handler checks every `heartbeat` whether the client hung up (its
// socket) and then cancels the turn, which the worker rolls back. A non-streaming reply is sent
// whole, status line included, when the turn has ended, so every error gets its HTTP status. A
// stream's status line goes out with its first text (earlier errors get their status); then an
// SSE comment is written whenever nothing was for `heartbeat`, and a failure ends the stream with
// the API's error event (response.failed, or a chat error chunk).
#ifndef KLS_SERVICES_ROUTER_HTTP_API_H_
#define KLS_SERVICES_ROUTER_HTTP_API_H_

#include <grpcpp/channel.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/router/api_keys.h"

namespace kls::router {

struct HttpApiOptions {
  std::string listen = "127.0.0.1:8080";     // HOST:PORT; port 0 picks a free one
  std::string model_name = "kls";            // the one model /v1/models lists and requests name
  size_t max_body_bytes = size_t{16} << 20;  // larger requests get 413
  int max_inflight = 256;  // turns (chat completions, responses) running at once; more get 429
  int threads = 32;        // connections served besides the running turns
  // Deadline of the unary Sessions calls, i.e. of a whole non-streamed turn (prefill and every
  // generated token): past it the request gets 504. The openai SDK's own default is 600 s.
  absl::Duration rpc_timeout = absl::Seconds(600);
  absl::Duration heartbeat = absl::Milliseconds(500);  // see the file comment
  absl::Duration stop_grace = absl::Seconds(10);       // Stop: in-flight turns then get cancelled
  std::function<bool()> ready;  // /readyz (e.g. "a worker is ready"); null: always ready
};

// Thread-safe. The channel's server must outlive the HttpApi (Stop it first).
class HttpApi {
 public:
  // Binds the port and starts serving. `api_keys` (may be null: open) answers 401 before any
  // RPC; it must outlive the HttpApi. INVALID_ARGUMENT for a bad listen address or model name,
  // threads or max_inflight < 1; UNAVAILABLE when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpApi>> Start(const HttpApiOptions& options,
                                                        std::shared_ptr<grpc::Channel> channel,
                                                        const ApiKeys* api_keys);
  ~HttpApi();  // Stop()
  HttpApi(const HttpApi&) = delete;
  HttpApi& operator=(const HttpApi&) = delete;

  int port() const;  // the bound port

  // Stops accepting connections, lets running turns finish for up to stop_grace, cancels the
  // rest and waits for every handler. Idempotent.
  void Stop();

  class Impl;

 private:
  explicit HttpApi(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kls::router

#endif  // KLS_SERVICES_ROUTER_HTTP_API_H_

// kls.v1.Worker over the engine: request validation, rendering chat messages into tokens, and
// the token stream. Uses the gRPC callback API; reactor callbacks never block and never touch
// model state (HOUSE_STYLE.md H11): they validate, hand the request to the engine thread and
// write what the engine sends back.
#ifndef KLS_SERVICES_WORKER_WORKER_SERVICE_H_
#define KLS_SERVICES_WORKER_WORKER_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "kls/v1/worker.grpc.pb.h"
#include "services/worker/engine.h"

namespace kls::worker {

// Checks a Generate request and turns it into engine input (INVALID_ARGUMENT naming the field
// otherwise): session id syntax; exactly one of messages / input_tokens, non-empty; valid UTF-8;
// token ids inside the vocabulary; sampling values finite and in range (temperature >= 0,
// top_p in (0, 1], top_k >= 0, 1 <= max_tokens <= max_tokens_limit); stop strings. Unset
// sampling fields take their defaults (temperature 1, top_p 1, max_tokens min(256, limit),
// a random seed). The model's <|im_end|> stops the turn unless ignore_eos.
absl::StatusOr<TurnParams> ValidateGenerateRequest(const kls::v1::WorkerGenerateRequest& request,
                                                   const engine::Tokenizer& tokenizer,
                                                   const engine::ModelConfig& config,
                                                   int max_tokens_limit);

// Thread-safe (gRPC calls it from its threads). The engine must outlive the service.
class WorkerService final : public kls::v1::Worker::CallbackService {
 public:
  explicit WorkerService(Engine* engine) : engine_(engine) {}

  grpc::ServerWriteReactor<kls::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const kls::v1::WorkerGenerateRequest* request) override;
  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* context,
                                          const kls::v1::WorkerCreateSessionRequest* request,
                                          kls::v1::Session* response) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* context,
                                       const kls::v1::WorkerGetSessionRequest* request,
                                       kls::v1::Session* response) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* context,
                                         const kls::v1::WorkerListSessionsRequest* request,
                                         kls::v1::ListSessionsResponse* response) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* context,
                                          const kls::v1::WorkerDeleteSessionRequest* request,
                                          kls::v1::DeleteSessionResponse* response) override;
  grpc::ServerUnaryReactor* ForkSession(grpc::CallbackServerContext* context,
                                        const kls::v1::WorkerForkSessionRequest* request,
                                        kls::v1::Session* response) override;
  grpc::ServerUnaryReactor* GetLoad(grpc::CallbackServerContext* context,
                                    const kls::v1::GetLoadRequest* request,
                                    kls::v1::Load* response) override;

 private:
  Engine* const engine_;
};

}  // namespace kls::worker

#endif  // KLS_SERVICES_WORKER_WORKER_SERVICE_H_

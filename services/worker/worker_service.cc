#include "services/worker/worker_service.h"

#include <cmath>
#include <deque>
#include <memory>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "engine/tokenizer/chat_format.h"
#include "services/common/grpc_status.h"
#include "services/common/session_ids.h"

namespace kls::worker {
namespace {

constexpr int kMaxStopStrings = 16;
constexpr size_t kMaxStopStringBytes = 256;
constexpr size_t kMaxRequestIdBytes = 256;
constexpr int kMaxMetadataEntries = 64;
constexpr size_t kMaxMetadataKeyBytes = 256;
constexpr size_t kMaxMetadataValueBytes = 4096;

std::string TenantOf(const std::string& tenant) { return tenant.empty() ? "default" : tenant; }

uint64_t RandomSeed() {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  return rng();
}

// The token stream of one Generate call. The engine (through Sink) queues responses; the
// reactor writes them one at a time. Two owners — gRPC (until OnDone) and the engine (until it
// delivers the final status) — so whichever finishes last deletes it.
class GenerateStream : public grpc::ServerWriteReactor<kls::v1::GenerateResponse> {
 public:
  class Sink : public TurnSink {
   public:
    explicit Sink(GenerateStream* stream) : stream_(stream) {}
    void OnTokens(std::span<const int32_t> ids, std::string text) override {
      kls::v1::GenerateResponse response;
      response.mutable_token_ids()->Assign(ids.begin(), ids.end());
      response.set_text(std::move(text));
      stream_->Enqueue(std::move(response), std::nullopt);
    }
    void OnDone(const absl::Status& status, kls::v1::GenerateResponse final) override {
      GenerateStream* stream = stream_;
      stream_ = nullptr;
      stream->Enqueue(std::move(final), status);
      stream->Unref();
    }
    bool IsCancelled() const override { return cancelled_.load(); }
    void Cancel() { cancelled_ = true; }

   private:
    GenerateStream* stream_;  // valid until OnDone
    std::atomic<bool> cancelled_{false};
  };

  GenerateStream() : sink_(std::make_shared<Sink>(this)) {}
  std::shared_ptr<Sink> sink() { return sink_; }

  void OnWriteDone(bool ok) override {
    if (!ok) sink_->Cancel();  // the client went away
    Pump(/*wrote=*/true);
  }
  void OnCancel() override { sink_->Cancel(); }
  void OnDone() override {
    {
      absl::MutexLock lock(&mu_);
      rpc_done_ = true;
    }
    Unref();
  }

 private:
  void Unref() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }

  void Enqueue(kls::v1::GenerateResponse response, std::optional<absl::Status> done) {
    {
      absl::MutexLock lock(&mu_);
      if (done.has_value()) {
        final_status_ = services::ToGrpcStatus(*done);
        finished_ = true;
        if (done->ok()) queue_.push_back(std::move(response));
      } else if (queue_.size() > (writing_ ? 1u : 0u)) {
        // Coalesce tokens produced while a write is outstanding.
        kls::v1::GenerateResponse& back = queue_.back();
        back.mutable_token_ids()->MergeFrom(response.token_ids());
        back.mutable_text()->append(response.text());
      } else {
        queue_.push_back(std::move(response));
      }
    }
    Pump(/*wrote=*/false);
  }

  // Starts the next write or the Finish. Decisions under the lock, calls outside it.
  void Pump(bool wrote) {
    const kls::v1::GenerateResponse* next = nullptr;
    bool finish = false;
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      if (wrote) {
        queue_.pop_front();
        writing_ = false;
      }
      if (writing_ || finish_called_ || rpc_done_) return;
      if (!queue_.empty()) {
        writing_ = true;
        next = &queue_.front();
      } else if (finished_) {
        finish_called_ = true;
        finish = true;
        status = final_status_;
      }
    }
    if (next != nullptr) StartWrite(next);
    if (finish) Finish(status);
  }

  std::shared_ptr<Sink> sink_;
  std::atomic<int> refs_{2};
  absl::Mutex mu_;
  std::deque<kls::v1::GenerateResponse> queue_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  bool rpc_done_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
};

// A stream that fails before reaching the engine.
class FailedStream : public grpc::ServerWriteReactor<kls::v1::GenerateResponse> {
 public:
  explicit FailedStream(const absl::Status& status) { Finish(services::ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

template <typename T>
Callback<T> FinishWith(grpc::ServerUnaryReactor* reactor, T* response) {
  return [reactor, response](absl::StatusOr<T> result) {
    if (result.ok()) *response = *std::move(result);
    reactor->Finish(services::ToGrpcStatus(result.status()));
  };
}

}  // namespace

absl::StatusOr<TurnParams> ValidateGenerateRequest(const kls::v1::WorkerGenerateRequest& wrapped,
                                                   const engine::Tokenizer& tokenizer,
                                                   const engine::ModelConfig& config,
                                                   int max_tokens_limit) {
  const kls::v1::GenerateRequest& request = wrapped.request();
  TurnParams p;
  p.enqueue_time = absl::Now();
  p.tenant = TenantOf(wrapped.tenant());
  KLS_RETURN_IF_ERROR(services::ValidateSessionId("session_id", request.session_id()));
  p.session_id = request.session_id();
  if (request.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id is longer than ", kMaxRequestIdBytes, " bytes"));
  }
  p.request_id = request.request_id();

  // Input: messages rendered with the chat format, or raw token ids.
  if (request.messages_size() > 0 && request.input_tokens_size() > 0) {
    return absl::InvalidArgumentError("give either messages or input_tokens, not both");
  }
  if (request.messages_size() == 0 && request.input_tokens_size() == 0) {
    return absl::InvalidArgumentError("the input is empty: give messages or input_tokens");
  }
  if (request.messages_size() > 0) {
    std::vector<engine::ChatMessage> messages;
    for (int i = 0; i < request.messages_size(); ++i) {
      const kls::v1::Message& m = request.messages(i);
      size_t bad = 0;
      if (!IsValidUtf8(m.content(), &bad)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "messages[", i, "].content is not valid UTF-8 (first bad byte at offset ", bad, ")"));
      }
      engine::ChatMessage message{m.role(), m.content(), m.name()};
      for (int j = 0; j < m.tool_calls_size(); ++j) {
        const kls::v1::ToolCall& call = m.tool_calls(j);
        if (!IsValidUtf8(call.id()) || !IsValidUtf8(call.arguments())) {
          return absl::InvalidArgumentError(
              absl::StrCat("messages[", i, "].tool_calls[", j, "] is not valid UTF-8"));
        }
        message.tool_calls.push_back({call.id(), call.arguments()});
      }
      messages.push_back(std::move(message));
    }
    KLS_ASSIGN_OR_RETURN(p.input, engine::RenderChat(tokenizer, messages,
                                                     /*add_generation_prompt=*/true));
  } else {
    for (int i = 0; i < request.input_tokens_size(); ++i) {
      const uint32_t id = request.input_tokens(i);
      if (id >= static_cast<uint32_t>(config.vocab_size)) {
        return absl::InvalidArgumentError(absl::StrCat("input_tokens[", i, "] = ", id,
                                                       " is outside the vocabulary [0, ",
                                                       config.vocab_size, ")"));
      }
      p.input.push_back(static_cast<int32_t>(id));
    }
  }
  if (static_cast<int64_t>(p.input.size()) >= config.model_max_length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the input has ", p.input.size(), " tokens; the context limit is ", config.model_max_length,
        " tokens including the session's history and the reply"));
  }

  // Sampling.
  const kls::v1::SamplingParams& s = request.sampling();
  p.sampler.temperature = s.has_temperature() ? s.temperature() : 1.0f;
  if (!std::isfinite(p.sampler.temperature) || p.sampler.temperature < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampling.temperature must be a finite number >= 0, got ", p.sampler.temperature));
  }
  p.sampler.top_p = s.has_top_p() ? s.top_p() : 1.0f;
  if (!(p.sampler.top_p > 0 && p.sampler.top_p <= 1)) {  // also rejects NaN
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_p must be in (0, 1], got ", p.sampler.top_p));
  }
  if (s.top_k() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.top_k must be >= 0, got ", s.top_k()));
  }
  p.sampler.top_k = s.top_k();
  p.sampler.seed = s.has_seed() ? s.seed() : RandomSeed();
  p.max_tokens = s.has_max_tokens() ? s.max_tokens() : std::min(256, max_tokens_limit);
  if (p.max_tokens < 1 || p.max_tokens > max_tokens_limit) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.max_tokens must be in [1, ",
                                                   max_tokens_limit, "], got ", p.max_tokens));
  }
  if (s.stop_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", kMaxStopStrings, " stop strings, got ", s.stop_size()));
  }
  for (int i = 0; i < s.stop_size(); ++i) {
    const std::string& stop = s.stop(i);
    if (stop.empty() || stop.size() > kMaxStopStringBytes || !IsValidUtf8(stop)) {
      return absl::InvalidArgumentError(absl::StrCat("sampling.stop[", i,
                                                     "] must be non-empty valid UTF-8 of at most ",
                                                     kMaxStopStringBytes, " bytes"));
    }
    p.stop_strings.push_back(stop);
  }
  for (int i = 0; i < s.stop_token_ids_size(); ++i) {
    const uint32_t id = s.stop_token_ids(i);
    if (id >= static_cast<uint32_t>(config.vocab_size)) {
      return absl::InvalidArgumentError(
          absl::StrCat("sampling.stop_token_ids[", i, "] = ", id, " is outside the vocabulary"));
    }
    p.stop_token_ids.push_back(static_cast<int32_t>(id));
  }
  if (!s.ignore_eos()) {
    if (std::optional<int32_t> im_end = tokenizer.SpecialTokenId("<|im_end|>")) {
      p.stop_token_ids.push_back(*im_end);
    }
  }

  if (request.metadata_size() > kMaxMetadataEntries) {
    return absl::InvalidArgumentError(absl::StrCat(
        "at most ", kMaxMetadataEntries, " metadata entries, got ", request.metadata_size()));
  }
  for (const auto& [key, value] : request.metadata()) {
    if (key.empty() || key.size() > kMaxMetadataKeyBytes || !IsValidUtf8(key) ||
        value.size() > kMaxMetadataValueBytes || !IsValidUtf8(value)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "metadata key '", key.substr(0, 64), "': keys must be 1..", kMaxMetadataKeyBytes,
          " bytes and values at most ", kMaxMetadataValueBytes, " bytes of valid UTF-8"));
    }
    p.metadata.emplace_back(key, value);
  }
  p.special_tokens_in_text = request.special_tokens_in_text();
  if (request.has_expected_version()) p.expected_version = request.expected_version();

  switch (request.commit()) {
    case kls::v1::COMMIT_POLICY_UNSPECIFIED:
    case kls::v1::COMMIT_POLICY_SYNC:
      p.commit = kls::v1::COMMIT_POLICY_SYNC;
      break;
    case kls::v1::COMMIT_POLICY_ASYNC:
    case kls::v1::COMMIT_POLICY_NONE:
      p.commit = request.commit();
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("commit policy ", static_cast<int>(request.commit()), " is unknown"));
  }
  return p;
}

grpc::ServerWriteReactor<kls::v1::GenerateResponse>* WorkerService::Generate(
    grpc::CallbackServerContext* /*context*/, const kls::v1::WorkerGenerateRequest* request) {
  absl::StatusOr<TurnParams> params = ValidateGenerateRequest(
      *request, engine_->tokenizer(), engine_->config(), engine_->options().max_tokens_limit);
  if (!params.ok()) return new FailedStream(params.status());
  auto* stream = new GenerateStream();
  engine_->Generate(*std::move(params), stream->sink());
  return stream;
}

grpc::ServerUnaryReactor* WorkerService::CreateSession(
    grpc::CallbackServerContext* context, const kls::v1::WorkerCreateSessionRequest* request,
    kls::v1::Session* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const kls::v1::CreateSessionRequest& r = request->request();
  absl::Status valid = services::ValidateSessionId("session_id", r.session_id());
  if (valid.ok() && r.ttl_seconds() < 0) {
    valid =
        absl::InvalidArgumentError(absl::StrCat("ttl_seconds must be >= 0, got ", r.ttl_seconds()));
  }
  std::vector<int32_t> system_tokens;
  if (valid.ok() && !r.system_prompt().empty()) {
    if (!IsValidUtf8(r.system_prompt())) {
      valid = absl::InvalidArgumentError("system_prompt is not valid UTF-8");
    } else {
      const engine::ChatMessage system{"system", r.system_prompt(), ""};
      absl::StatusOr<std::vector<int32_t>> tokens =
          engine::RenderChat(engine_->tokenizer(), {&system, 1}, false);
      if (tokens.ok()) {
        system_tokens = *std::move(tokens);
      } else {
        valid = tokens.status();
      }
    }
  }
  if (valid.ok() &&
      static_cast<int64_t>(system_tokens.size()) >= engine_->config().model_max_length) {
    valid = absl::InvalidArgumentError("system_prompt exceeds the context limit");
  }
  if (!valid.ok()) {
    reactor->Finish(services::ToGrpcStatus(valid));
    return reactor;
  }
  engine_->CreateSession(TenantOf(request->tenant()), r, std::move(system_tokens),
                         FinishWith(reactor, response));
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::GetSession(grpc::CallbackServerContext* context,
                                                    const kls::v1::WorkerGetSessionRequest* request,
                                                    kls::v1::Session* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::Status valid =
          services::ValidateSessionId("session_id", request->request().session_id());
      !valid.ok()) {
    reactor->Finish(services::ToGrpcStatus(valid));
    return reactor;
  }
  engine_->GetSession(TenantOf(request->tenant()), request->request(),
                      FinishWith(reactor, response));
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::ListSessions(
    grpc::CallbackServerContext* context, const kls::v1::WorkerListSessionsRequest* request,
    kls::v1::ListSessionsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  engine_->ListSessions(TenantOf(request->tenant()), request->request(),
                        FinishWith(reactor, response));
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::DeleteSession(
    grpc::CallbackServerContext* context, const kls::v1::WorkerDeleteSessionRequest* request,
    kls::v1::DeleteSessionResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::Status valid =
          services::ValidateSessionId("session_id", request->request().session_id());
      !valid.ok()) {
    reactor->Finish(services::ToGrpcStatus(valid));
    return reactor;
  }
  engine_->DeleteSession(TenantOf(request->tenant()), request->request(),
                         FinishWith(reactor, response));
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::ForkSession(
    grpc::CallbackServerContext* context, const kls::v1::WorkerForkSessionRequest* request,
    kls::v1::Session* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const kls::v1::ForkSessionRequest& r = request->request();
  absl::Status valid = services::ValidateSessionId("session_id", r.session_id());
  if (valid.ok()) valid = services::ValidateSessionId("new_session_id", r.new_session_id());
  if (valid.ok() && r.ttl_seconds() < 0) {
    valid = absl::InvalidArgumentError("ttl_seconds must be >= 0");
  }
  if (valid.ok() && r.session_id() == r.new_session_id()) {
    valid = absl::InvalidArgumentError("new_session_id must differ from session_id");
  }
  if (!valid.ok()) {
    reactor->Finish(services::ToGrpcStatus(valid));
    return reactor;
  }
  engine_->ForkSession(TenantOf(request->tenant()), r, FinishWith(reactor, response));
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::GetLoad(grpc::CallbackServerContext* context,
                                                 const kls::v1::GetLoadRequest* /*request*/,
                                                 kls::v1::Load* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  *response = engine_->GetLoad();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kls::worker

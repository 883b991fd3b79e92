// The OpenAI-compatible HTTP API's pure parts (services/router/http_api.h serves them): request
// parsing and validation, the mapping onto kls.v1 messages and sampling, errors in OpenAI's
// shape, response ids, the message chain that guards X-KLS-Session conversations, and the JSON
// and server-sent events of replies. No I/O; every function is thread-compatible.
//
// JSON is parsed without exceptions (nlohmann's allow_exceptions=false, types checked before
// every access), refused beyond kMaxJsonDepth levels of nesting (nlohmann parses iteratively, but
// dump(), copies and comparisons recurse, so a deeply nested body would overflow the stack), and
// written with invalid UTF-8 replaced, so no request can make it throw or crash.
#ifndef KLS_SERVICES_ROUTER_OPENAI_PROTOCOL_H_
#define KLS_SERVICES_ROUTER_OPENAI_PROTOCOL_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kls/v1/common.pb.h"
#include "nlohmann/json.hpp"
#include "services/router/kimi_tool_calls.h"

namespace kls::router::openai {

// Keys keep their order (tools are rendered into the prompt exactly as the client sent them).
using Json = nlohmann::ordered_json;

// The deepest nesting of arrays and objects a request body may have; the body itself is level 1.
inline constexpr int kMaxJsonDepth = 64;

// Serializes compactly ({"a":1}); invalid UTF-8 becomes U+FFFD instead of throwing.
std::string Dump(const Json& json);

// ---- Errors -------------------------------------------------------------------------------------

// An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int http_status = 500;
  std::string type = "server_error";
  std::string code;   // empty: null
  std::string param;  // empty: null
  std::string message;
};

std::string ErrorBody(const ApiError& error);

// The HTTP status and OpenAI type/code of a kls status: INVALID_ARGUMENT and OUT_OF_RANGE 400,
// UNAUTHENTICATED 401 (code invalid_api_key), PERMISSION_DENIED 403, NOT_FOUND 404,
// ALREADY_EXISTS, ABORTED and FAILED_PRECONDITION 409, RESOURCE_EXHAUSTED 429, CANCELLED 499,
// UNIMPLEMENTED 501, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, anything else 500. The message is the
// status message.
ApiError ErrorFromStatus(const absl::Status& status);

// ---- Requests -----------------------------------------------------------------------------------

// POST /v1/chat/completions, validated.
struct ChatCompletionRequest {
  std::string model;
  // The conversation as kls messages: the tool declaration first (when tools are on), then the
  // request's messages ("developer" becomes "system"; tool results read "## Return of <id>").
  std::vector<kls::v1::Message> messages;
  bool tools = false;  // tools declared and tool_choice is not "none": parse tool calls
  kls::v1::SamplingParams sampling;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
};

// INVALID_ARGUMENT naming the field for bad JSON, nesting deeper than kMaxJsonDepth, a missing
// or mistyped field, n != 1, a negative or zero max_tokens, max_tokens and max_completion_tokens
// that differ, unsupported features (logprobs, non-text content parts, response formats other
// than text, parallel_tool_calls false). Unknown fields are ignored, as OpenAI clients send many.
absl::StatusOr<ChatCompletionRequest> ParseChatCompletionRequest(std::string_view body);

// POST /v1/responses, validated.
struct ResponsesRequest {
  std::string model;
  // instructions (as a system message), the tool declaration (when tools are on), the input.
  std::vector<kls::v1::Message> input;
  bool tools = false;
  Json tools_json = Json::array();  // the tools as given, echoed in the response object
  std::optional<std::string> instructions;
  std::string previous_response_id;  // empty: a new conversation
  bool store = true;
  bool stream = false;
  kls::v1::SamplingParams sampling;
};

// The errors of ParseChatCompletionRequest, for `input` items (strings, messages,
// function_call and function_call_output items) and the Responses fields; also INVALID_ARGUMENT
// for what the Responses API has no equivalent of here: background true, truncation other than
// "disabled", and `stop` (not a Responses parameter).
absl::StatusOr<ResponsesRequest> ParseResponsesRequest(std::string_view body);

// ---- Response ids -------------------------------------------------------------------------------

// A response id names a committed session version: "resp_<session_id>_<version>".
struct ResponseRef {
  std::string session_id;
  uint64_t version = 0;  // >= 1
  friend bool operator==(const ResponseRef&, const ResponseRef&) = default;
};

std::string EncodeResponseId(const ResponseRef& ref);
// NOT_FOUND (naming the id) unless `id` is "resp_", a valid session id, "_", and a version in
// [1, 2^63) written without sign or leading zeros — so a malformed id reads like an unknown one.
absl::StatusOr<ResponseRef> DecodeResponseId(std::string_view id);

// ---- X-KLS-Session conversations ----------------------------------------------------------------
//
// The session keeps, in its metadata, a hash chain over every message it consumed through this
// API and the number of those messages and the version they led to (kChain*, written when the
// turn commits). A request's messages must start with exactly those messages; the next one is the
// session's own reply (it must be an assistant message; the session keeps the tokens it
// generated, so the reply's text is not compared — from then on it is part of the chain); the
// rest are new and are the only ones sent to the session.

inline constexpr char kChainHashKey[] = "kls.chat.chain";
inline constexpr char kChainMessagesKey[] = "kls.chat.messages";
inline constexpr char kChainVersionKey[] = "kls.chat.version";

// XXH3-128 over every field of every message, each length-prefixed; 32 hex digits.
std::string MessageChainHash(std::span<const kls::v1::Message> messages);

// The index of the first message the session has not consumed, given its committed version and
// metadata. A session at version 0 without a chain has consumed nothing (0). FAILED_PRECONDITION
// (a message saying what differs) when the session has turns not made through this API, another
// client advanced it, the messages do not start with the consumed ones, the reply is missing or
// not an assistant message, or no new message follows.
absl::StatusOr<size_t> FirstNewMessage(std::span<const kls::v1::Message> messages,
                                       uint64_t session_version,
                                       const std::map<std::string, std::string>& metadata);

// The metadata the turn that consumes `messages` (all of them) and commits `next_version`
// writes.
std::map<std::string, std::string> ChainMetadata(std::span<const kls::v1::Message> messages,
                                                 uint64_t next_version);

// ---- Replies ------------------------------------------------------------------------------------

// Token counts of a turn in OpenAI's terms: the context before generation is the prompt, and the
// part of it the session already held is cached (0 for a fresh session).
struct TurnUsage {
  uint64_t prompt_tokens = 0;
  uint64_t cached_tokens = 0;
  uint64_t completion_tokens = 0;
};
TurnUsage UsageFromKls(const kls::v1::Usage& usage);

// "stop", "length", or "tool_calls" when calls were parsed.
std::string ChatFinishReason(kls::v1::FinishReason reason, bool has_tool_calls);

// The non-streaming chat.completion object.
Json ChatCompletionJson(const std::string& id, int64_t created, const std::string& model,
                        const ParsedReply& reply, kls::v1::FinishReason finish,
                        const TurnUsage& usage);

// The event stream of one turn in an API's format. OnStart's bytes go out with the status line,
// then OnText's for each text delta, then those of exactly one of OnFinish or OnError (a failure
// after the status line was sent, which only the stream itself can report).
class EventStream {
 public:
  virtual ~EventStream() = default;
  virtual std::string OnStart() { return ""; }
  virtual std::string OnText(std::string_view delta) = 0;
  virtual std::string OnFinish(kls::v1::FinishReason finish, const TurnUsage& usage) = 0;
  virtual std::string OnError(const ApiError& error) = 0;
};

// Turns the text deltas of one turn into chat.completion.chunk events ("data: {json}\n\n"),
// ending with "data: [DONE]\n\n". With tools, content is streamed up to the tool-call section
// and the calls follow in one chunk once the reply is complete. A failure is one
// "data: {"error": {...}}" event (OpenAI's shape; the SDKs raise it), with no [DONE].
class ChatStream final : public EventStream {
 public:
  ChatStream(std::string id, int64_t created, std::string model, bool tools, bool include_usage);
  // The events for the next piece of text (may be empty). The first call also sends the role.
  std::string OnText(std::string_view delta) override;
  // The remaining content, the tool calls, the finish chunk, the usage chunk (when asked for)
  // and [DONE].
  std::string OnFinish(kls::v1::FinishReason finish, const TurnUsage& usage) override;
  std::string OnError(const ApiError& error) override;

 private:
  Json ChunkJson() const;  // the fields every chunk has
  std::string Chunk(const Json& delta, const Json& finish_reason) const;

  const std::string id_, model_;
  const int64_t created_;
  const bool include_usage_;
  bool role_sent_ = false;
  StreamingReply reply_;
};

// The parts of a Responses API response object that do not depend on the output.
struct ResponseHeader {
  std::string id;
  int64_t created_at = 0;
  std::string model;
  std::optional<std::string> instructions;
  std::string previous_response_id;  // empty: null
  bool store = true;
  Json tools = Json::array();
  std::optional<float> temperature, top_p;
  std::optional<int32_t> max_output_tokens;
};

// The response object. `status` "in_progress" has no output and no usage; "completed" and
// "incomplete" (finish LENGTH: incomplete_details.reason "max_output_tokens") have both;
// "failed" (ResponsesStream::OnError) has the output streamed so far and no usage.
Json ResponseJson(const ResponseHeader& header, const std::string& status, const Json& output,
                  const std::optional<TurnUsage>& usage);

// The output items of a finished reply: a message (when it has text, or nothing else) and one
// function_call per tool call. Item ids derive from the response id.
Json ResponseOutput(const std::string& response_id, const ParsedReply& reply);

// "completed", or "incomplete" after max_output_tokens.
std::string ResponseStatus(kls::v1::FinishReason finish);

// The Responses event stream of one turn ("event: <type>\ndata: {json}\n\n"): response.created,
// response.in_progress, then per output item output_item.added / content_part.added /
// output_text.delta... / output_text.done / content_part.done / output_item.done (function calls:
// output_item.added / function_call_arguments.delta / .done / output_item.done), and
// response.completed (or response.incomplete). A failure ends it with response.failed: the
// response with status "failed", `error` {code, message} and the output streamed so far.
class ResponsesStream final : public EventStream {
 public:
  explicit ResponsesStream(ResponseHeader header, bool tools);
  std::string OnStart() override;  // response.created + response.in_progress
  std::string OnText(std::string_view delta) override;
  std::string OnFinish(kls::v1::FinishReason finish, const TurnUsage& usage) override;
  std::string OnError(const ApiError& error) override;

 private:
  std::string Event(Json event);
  std::string OpenMessage();
  std::string SendContent(std::string_view content);

  const ResponseHeader header_;
  int64_t sequence_ = 0;
  bool message_open_ = false;
  StreamingReply reply_;
  std::string content_sent_;
};

// Server-sent event framing.
std::string SseData(const Json& json);
std::string SseEvent(std::string_view type, const Json& json);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

}  // namespace kls::router::openai

#endif  // KLS_SERVICES_ROUTER_OPENAI_PROTOCOL_H_

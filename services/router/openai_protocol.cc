#include "services/router/openai_protocol.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/hash.h"
#include "common/status_macros.h"
#include "services/common/session_ids.h"

namespace kls::router::openai {
namespace {

constexpr char kResponsePrefix[] = "resp_";
constexpr size_t kResponsePrefixSize = sizeof(kResponsePrefix) - 1;
constexpr int kMaxStopStrings = 16;

absl::Status Invalid(std::string_view message) {
  return absl::InvalidArgumentError(std::string(message));
}

// The member `key` of `object`, or nullptr when absent or null (OpenAI clients send null for
// "not given").
const Json* Field(const Json& object, const char* key) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<std::string> StringField(const Json& object, const char* key, bool required,
                                        const std::string& where = "") {
  const Json* value = Field(object, key);
  if (value == nullptr) {
    if (required) return Invalid(absl::StrCat("missing required parameter '", where, key, "'"));
    return std::string();
  }
  if (!value->is_string()) {
    return Invalid(absl::StrCat("'", where, key, "' must be a string"));
  }
  return value->get<std::string>();
}

absl::StatusOr<std::optional<bool>> BoolField(const Json& object, const char* key) {
  const Json* value = Field(object, key);
  if (value == nullptr) return std::optional<bool>();
  if (!value->is_boolean()) return Invalid(absl::StrCat("'", key, "' must be a boolean"));
  return std::optional<bool>(value->get<bool>());
}

absl::StatusOr<std::optional<double>> NumberField(const Json& object, const char* key) {
  const Json* value = Field(object, key);
  if (value == nullptr) return std::optional<double>();
  if (!value->is_number()) return Invalid(absl::StrCat("'", key, "' must be a number"));
  const double v = value->get<double>();
  if (!std::isfinite(v)) return Invalid(absl::StrCat("'", key, "' must be finite"));
  return std::optional<double>(v);
}

absl::StatusOr<std::optional<int64_t>> IntegerField(const Json& object, const char* key) {
  const Json* value = Field(object, key);
  if (value == nullptr) return std::optional<int64_t>();
  if (!value->is_number_integer()) return Invalid(absl::StrCat("'", key, "' must be an integer"));
  if (value->is_number_unsigned() &&
      value->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return Invalid(absl::StrCat("'", key, "' is too large"));
  }
  return std::optional<int64_t>(value->get<int64_t>());
}

// nlohmann's DOM builder behind a filter that stops the parse at the first array or object
// nested deeper than kMaxJsonDepth, before it is built: parsing is iterative, but dump(), copies
// and comparisons of the result recurse once per level. (nlohmann's public parser callback can
// only discard a value, not stop, so a body of 16 MiB of '[' would still cost a pointer per
// level.) json_sax_dom_parser is the builder Json::parse itself uses.
class DepthLimitedDom {
 public:
  explicit DepthLimitedDom(Json* root) : dom_(*root, /*allow_exceptions_=*/false) {}

  bool null() { return dom_.null(); }
  bool boolean(bool value) { return dom_.boolean(value); }
  bool number_integer(Json::number_integer_t value) { return dom_.number_integer(value); }
  bool number_unsigned(Json::number_unsigned_t value) { return dom_.number_unsigned(value); }
  bool number_float(Json::number_float_t value, const Json::string_t& text) {
    return dom_.number_float(value, text);
  }
  bool string(Json::string_t& value) { return dom_.string(value); }
  bool binary(Json::binary_t& value) { return dom_.binary(value); }
  bool start_object(std::size_t size) { return Enter() && dom_.start_object(size); }
  bool key(Json::string_t& key) { return dom_.key(key); }
  bool end_object() {
    --depth_;
    return dom_.end_object();
  }
  bool start_array(std::size_t size) { return Enter() && dom_.start_array(size); }
  bool end_array() {
    --depth_;
    return dom_.end_array();
  }
  template <class Exception>
  bool parse_error(std::size_t position, const std::string& token, const Exception& error) {
    return dom_.parse_error(position, token, error);
  }

  bool too_deep() const { return too_deep_; }

 private:
  bool Enter() {
    if (++depth_ <= kMaxJsonDepth) return true;
    too_deep_ = true;
    return false;
  }

  nlohmann::detail::json_sax_dom_parser<Json> dom_;
  int depth_ = 0;
  bool too_deep_ = false;
};

absl::StatusOr<Json> ParseObject(std::string_view body) {
  Json root;
  DepthLimitedDom dom(&root);
  if (!Json::sax_parse(body.begin(), body.end(), &dom)) {
    if (dom.too_deep()) {
      return Invalid(absl::StrCat("the request body nests arrays and objects more than ",
                                  kMaxJsonDepth, " levels deep"));
    }
    return Invalid("the request body is not valid JSON");
  }
  if (!root.is_object()) return Invalid("the request body must be a JSON object");
  return root;
}

// A message's content: a string, null, or text parts ({"type": "text" | "input_text" |
// "output_text", "text": ...}) joined.
absl::StatusOr<std::string> ContentText(const Json& message, const std::string& where) {
  const Json* content = Field(message, "content");
  if (content == nullptr) return std::string();
  if (content->is_string()) return content->get<std::string>();
  if (!content->is_array()) {
    return Invalid(absl::StrCat("'", where, "content' must be a string or an array of parts"));
  }
  std::string text;
  for (size_t i = 0; i < content->size(); ++i) {
    const Json& part = (*content)[i];
    const std::string at = absl::StrCat(where, "content[", i, "]");
    if (!part.is_object()) return Invalid(absl::StrCat("'", at, "' must be an object"));
    KLS_ASSIGN_OR_RETURN(std::string type, StringField(part, "type", true, at + "."));
    if (type != "text" && type != "input_text" && type != "output_text") {
      return Invalid(absl::StrCat("'", at, ".type' ", type.substr(0, 40),
                                  " is not supported: kls models take text only"));
    }
    KLS_ASSIGN_OR_RETURN(std::string piece, StringField(part, "text", true, at + "."));
    text += piece;
  }
  return text;
}

// Arguments are JSON text; an object given instead is serialized.
std::string ArgumentsText(const Json* arguments) {
  if (arguments == nullptr) return "{}";
  if (arguments->is_string()) return arguments->get<std::string>();
  return Dump(*arguments);
}

kls::v1::Message ToolResult(const std::string& call_id, const std::string& output) {
  // The K2 chat template's tool message: <|im_system|>tool<|im_middle|>## Return of <id>\n...
  kls::v1::Message m;
  m.set_role("tool");
  m.set_content(absl::StrCat("## Return of ", call_id, "\n", output));
  return m;
}

// The tool declaration message: K2's <|im_system|>tool_declare<|im_middle|>{tools}<|im_end|>,
// tools in the chat-completions form, serialized compactly in the client's key order.
kls::v1::Message ToolDeclaration(const Json& chat_tools) {
  kls::v1::Message m;
  m.set_role("tool");
  m.set_name("tool_declare");
  m.set_content(Dump(chat_tools));
  return m;
}

// tool_choice: "none" turns tools off; "auto", "required" and a named function keep them on (the
// model is not constrained: the choice is rendered nowhere, as in the K2 template).
absl::StatusOr<bool> ToolsWanted(const Json& root) {
  const Json* choice = Field(root, "tool_choice");
  if (choice == nullptr) return true;
  if (choice->is_string()) {
    const std::string& c = choice->get_ref<const std::string&>();
    if (c == "none") return false;
    if (c == "auto" || c == "required") return true;
    return Invalid(
        absl::StrCat("'tool_choice' ", c.substr(0, 40), " is not one of none, auto, required"));
  }
  if (choice->is_object()) return true;
  return Invalid("'tool_choice' must be a string or an object");
}

// Sampling fields shared by both APIs. `alt_max_tokens_key` (may be null) is a synonym of
// `max_tokens_key`; both given must agree. `stop` only where `allow_stop`.
absl::Status ParseSampling(const Json& root, const char* max_tokens_key,
                           const char* alt_max_tokens_key, bool allow_stop,
                           kls::v1::SamplingParams* s) {
  KLS_ASSIGN_OR_RETURN(std::optional<double> temperature, NumberField(root, "temperature"));
  if (temperature.has_value()) {
    if (*temperature < 0) return Invalid("'temperature' must be >= 0");
    s->set_temperature(static_cast<float>(*temperature));
  }
  KLS_ASSIGN_OR_RETURN(std::optional<double> top_p, NumberField(root, "top_p"));
  if (top_p.has_value()) {
    if (!(*top_p > 0 && *top_p <= 1)) return Invalid("'top_p' must be in (0, 1]");
    s->set_top_p(static_cast<float>(*top_p));
  }
  for (const char* key : {max_tokens_key, alt_max_tokens_key}) {
    if (key == nullptr) continue;
    KLS_ASSIGN_OR_RETURN(std::optional<int64_t> max_tokens, IntegerField(root, key));
    if (!max_tokens.has_value()) continue;
    if (*max_tokens < 1) {
      return Invalid(absl::StrCat("'", key, "' must be >= 1, got ", *max_tokens));
    }
    if (*max_tokens > std::numeric_limits<int32_t>::max()) {
      return Invalid(absl::StrCat("'", key, "' is too large: ", *max_tokens));
    }
    if (s->has_max_tokens() && s->max_tokens() != *max_tokens) {
      return Invalid(absl::StrCat("'", max_tokens_key, "' (", s->max_tokens(), ") and '", key,
                                  "' (", *max_tokens, ") differ; give one of them"));
    }
    s->set_max_tokens(static_cast<int32_t>(*max_tokens));
  }
  KLS_ASSIGN_OR_RETURN(std::optional<int64_t> seed, IntegerField(root, "seed"));
  if (seed.has_value()) s->set_seed(static_cast<uint64_t>(*seed));
  KLS_ASSIGN_OR_RETURN(std::optional<int64_t> top_k, IntegerField(root, "top_k"));  // extension
  if (top_k.has_value()) {
    if (*top_k < 0 || *top_k > std::numeric_limits<int32_t>::max()) {
      return Invalid("'top_k' must be >= 0");
    }
    s->set_top_k(static_cast<int32_t>(*top_k));
  }
  // Extension (as vLLM's): generate past <|im_end|>, for benchmarks and tests.
  KLS_ASSIGN_OR_RETURN(std::optional<bool> ignore_eos, BoolField(root, "ignore_eos"));
  s->set_ignore_eos(ignore_eos.value_or(false));
  if (const Json* stop = Field(root, "stop"); stop != nullptr) {
    if (!allow_stop) {
      return Invalid(
          "'stop' is not a parameter of the Responses API (use /v1/chat/completions for stop "
          "sequences)");
    }
    if (stop->is_string()) {
      s->add_stop(stop->get<std::string>());
    } else if (stop->is_array()) {
      if (stop->size() > kMaxStopStrings) {
        return Invalid(absl::StrCat("'stop' has more than ", kMaxStopStrings, " strings"));
      }
      for (const Json& one : *stop) {
        if (!one.is_string()) return Invalid("'stop' must be a string or an array of strings");
        s->add_stop(one.get<std::string>());
      }
    } else {
      return Invalid("'stop' must be a string or an array of strings");
    }
  }
  for (const char* penalty : {"presence_penalty", "frequency_penalty"}) {
    KLS_ASSIGN_OR_RETURN(std::optional<double> value, NumberField(root, penalty));
    if (value.has_value() && *value != 0) {
      return Invalid(absl::StrCat("'", penalty, "' is not supported (only 0)"));
    }
  }
  return absl::OkStatus();
}

// Chat-completions tools: [{"type": "function", "function": {"name", ...}}].
absl::Status ValidateChatTools(const Json& tools) {
  if (!tools.is_array()) return Invalid("'tools' must be an array");
  for (size_t i = 0; i < tools.size(); ++i) {
    const Json& tool = tools[i];
    const std::string at = absl::StrCat("tools[", i, "].");
    if (!tool.is_object()) return Invalid(absl::StrCat("'tools[", i, "]' must be an object"));
    KLS_ASSIGN_OR_RETURN(std::string type, StringField(tool, "type", true, at));
    if (type != "function") {
      return Invalid(
          absl::StrCat("'", at, "type' ", type.substr(0, 40), " is not supported (only function)"));
    }
    const Json* function = Field(tool, "function");
    if (function == nullptr || !function->is_object()) {
      return Invalid(absl::StrCat("'", at, "function' must be an object"));
    }
    KLS_ASSIGN_OR_RETURN(std::string name, StringField(*function, "name", true, at + "function."));
    if (name.empty()) return Invalid(absl::StrCat("'", at, "function.name' is empty"));
  }
  return absl::OkStatus();
}

absl::Status ParseChatMessage(const Json& message, size_t i, std::vector<kls::v1::Message>* out) {
  const std::string at = absl::StrCat("messages[", i, "].");
  if (!message.is_object()) return Invalid(absl::StrCat("'messages[", i, "]' must be an object"));
  KLS_ASSIGN_OR_RETURN(std::string role, StringField(message, "role", true, at));
  KLS_ASSIGN_OR_RETURN(std::string content, ContentText(message, at));
  kls::v1::Message m;
  if (role == "system" || role == "developer") {
    m.set_role("system");
  } else if (role == "user") {
    m.set_role("user");
  } else if (role == "assistant") {
    m.set_role("assistant");
    if (const Json* calls = Field(message, "tool_calls"); calls != nullptr) {
      if (!calls->is_array()) return Invalid(absl::StrCat("'", at, "tool_calls' must be an array"));
      for (size_t j = 0; j < calls->size(); ++j) {
        const Json& call = (*calls)[j];
        const std::string call_at = absl::StrCat(at, "tool_calls[", j, "].");
        if (!call.is_object()) return Invalid(absl::StrCat("'", call_at, "' must be an object"));
        const Json* function = Field(call, "function");
        if (function == nullptr || !function->is_object()) {
          return Invalid(absl::StrCat("'", call_at, "function' must be an object"));
        }
        KLS_ASSIGN_OR_RETURN(std::string name,
                             StringField(*function, "name", true, call_at + "function."));
        KLS_ASSIGN_OR_RETURN(std::string id, StringField(call, "id", false, call_at));
        kls::v1::ToolCall* tc = m.add_tool_calls();
        // Kimi's ids name the function; one the client made up is kept (tool results cite it).
        tc->set_id(id.empty() ? absl::StrCat("functions.", name, ":", j) : id);
        tc->set_arguments(ArgumentsText(Field(*function, "arguments")));
      }
    }
  } else if (role == "tool") {
    KLS_ASSIGN_OR_RETURN(std::string call_id, StringField(message, "tool_call_id", true, at));
    out->push_back(ToolResult(call_id, content));
    return absl::OkStatus();
  } else {
    return Invalid(absl::StrCat("'", at, "role' ", role.substr(0, 40),
                                " is not one of system, developer, user, assistant, tool"));
  }
  m.set_content(std::move(content));
  out->push_back(std::move(m));
  return absl::OkStatus();
}

// parallel_tool_calls: true (the default) or absent; the model may always call several tools at
// once and nothing here can stop it, so false is refused rather than ignored.
absl::Status RejectSequentialToolCalls(const Json& root) {
  KLS_ASSIGN_OR_RETURN(std::optional<bool> parallel, BoolField(root, "parallel_tool_calls"));
  if (!parallel.value_or(true)) {
    return Invalid(
        "'parallel_tool_calls' false is not supported: the model may call several tools in one "
        "reply");
  }
  return absl::OkStatus();
}

absl::Status RejectUnsupported(const Json& root) {
  KLS_ASSIGN_OR_RETURN(std::optional<bool> logprobs, BoolField(root, "logprobs"));
  if (logprobs.value_or(false)) return Invalid("'logprobs' is not supported");
  KLS_RETURN_IF_ERROR(RejectSequentialToolCalls(root));
  if (const Json* format = Field(root, "response_format"); format != nullptr) {
    if (!format->is_object()) return Invalid("'response_format' must be an object");
    KLS_ASSIGN_OR_RETURN(std::string type, StringField(*format, "type", true, "response_format."));
    if (type != "text") {
      return Invalid(absl::StrCat("'response_format.type' ", type.substr(0, 40),
                                  " is not supported (only text)"));
    }
  }
  return absl::OkStatus();
}

void Put(Hasher128& h, const std::string& s) { h.Add(s); }

Json UsageChatJson(const TurnUsage& u) {
  Json usage = Json::object();
  usage["prompt_tokens"] = u.prompt_tokens;
  usage["completion_tokens"] = u.completion_tokens;
  usage["total_tokens"] = u.prompt_tokens + u.completion_tokens;
  usage["prompt_tokens_details"] = {{"cached_tokens", u.cached_tokens}};
  usage["completion_tokens_details"] = {{"reasoning_tokens", 0}};
  return usage;
}

Json UsageResponsesJson(const TurnUsage& u) {
  Json usage = Json::object();
  usage["input_tokens"] = u.prompt_tokens;
  usage["input_tokens_details"] = {{"cached_tokens", u.cached_tokens}};
  usage["output_tokens"] = u.completion_tokens;
  usage["output_tokens_details"] = {{"reasoning_tokens", 0}};
  usage["total_tokens"] = u.prompt_tokens + u.completion_tokens;
  return usage;
}

Json ToolCallsJson(const std::vector<ParsedToolCall>& calls) {
  Json out = Json::array();
  for (size_t i = 0; i < calls.size(); ++i) {
    Json call = Json::object();
    call["index"] = i;
    call["id"] = calls[i].id;
    call["type"] = "function";
    call["function"] = {{"name", calls[i].name}, {"arguments", calls[i].arguments}};
    out.push_back(std::move(call));
  }
  return out;
}

Json OutputTextPart(const std::string& text) {
  return {{"type", "output_text"},
          {"text", text},
          {"annotations", Json::array()},
          {"logprobs", Json::array()}};
}

Json MessageItem(const std::string& id, const std::string& status, Json content) {
  return {{"id", id},
          {"type", "message"},
          {"status", status},
          {"role", "assistant"},
          {"content", std::move(content)}};
}

Json FunctionCallItem(const std::string& id, const ParsedToolCall& call, const std::string& status,
                      const std::string& arguments) {
  return {{"id", id},           {"type", "function_call"}, {"status", status},
          {"call_id", call.id}, {"name", call.name},       {"arguments", arguments}};
}

std::string MessageItemId(const std::string& response_id) {
  return absl::StrCat("msg_", response_id.substr(kResponsePrefixSize));
}

std::string FunctionCallItemId(const std::string& response_id, size_t i) {
  return absl::StrCat("fc_", response_id.substr(kResponsePrefixSize), "_", i);
}

}  // namespace

std::string Dump(const Json& json) {
  return json.dump(-1, ' ', /*ensure_ascii=*/false, Json::error_handler_t::replace);
}

// ---- Errors -------------------------------------------------------------------------------------

std::string ErrorBody(const ApiError& e) {
  Json error = Json::object();
  error["message"] = e.message;
  error["type"] = e.type;
  error["param"] = e.param.empty() ? Json(nullptr) : Json(e.param);
  error["code"] = e.code.empty() ? Json(nullptr) : Json(e.code);
  return Dump(Json{{"error", std::move(error)}});
}

ApiError ErrorFromStatus(const absl::Status& status) {
  ApiError e;
  e.message = std::string(status.message());
  e.type = "invalid_request_error";
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      e.http_status = 400;
      break;
    case absl::StatusCode::kUnauthenticated:
      e.http_status = 401;
      e.code = "invalid_api_key";
      break;
    case absl::StatusCode::kPermissionDenied:
      e.http_status = 403;
      e.type = "permission_error";
      break;
    case absl::StatusCode::kNotFound:
      e.http_status = 404;
      e.code = "not_found";
      break;
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kFailedPrecondition:
      e.http_status = 409;
      e.code = "conflict";
      break;
    case absl::StatusCode::kResourceExhausted:
      e.http_status = 429;
      e.type = "rate_limit_error";
      e.code = "rate_limit_exceeded";
      break;
    case absl::StatusCode::kCancelled:
      e.http_status = 499;
      e.code = "cancelled";
      break;
    case absl::StatusCode::kUnimplemented:
      e.http_status = 501;
      e.type = "server_error";
      break;
    case absl::StatusCode::kUnavailable:
      e.http_status = 503;
      e.type = "server_error";
      e.code = "service_unavailable";
      break;
    case absl::StatusCode::kDeadlineExceeded:
      e.http_status = 504;
      e.type = "server_error";
      e.code = "timeout";
      break;
    default:
      e.http_status = 500;
      e.type = "server_error";
      break;
  }
  return e;
}

// ---- Requests -----------------------------------------------------------------------------------

absl::StatusOr<ChatCompletionRequest> ParseChatCompletionRequest(std::string_view body) {
  KLS_ASSIGN_OR_RETURN(const Json root, ParseObject(body));
  ChatCompletionRequest r;
  KLS_ASSIGN_OR_RETURN(r.model, StringField(root, "model", true));
  KLS_ASSIGN_OR_RETURN(std::optional<int64_t> n, IntegerField(root, "n"));
  if (n.has_value() && *n != 1) {
    return Invalid(absl::StrCat("'n' must be 1 (one choice per request), got ", *n));
  }
  KLS_RETURN_IF_ERROR(RejectUnsupported(root));
  KLS_RETURN_IF_ERROR(ParseSampling(root, "max_tokens", "max_completion_tokens",
                                    /*allow_stop=*/true, &r.sampling));
  KLS_ASSIGN_OR_RETURN(std::optional<bool> stream, BoolField(root, "stream"));
  r.stream = stream.value_or(false);
  if (const Json* options = Field(root, "stream_options"); options != nullptr) {
    if (!options->is_object()) return Invalid("'stream_options' must be an object");
    KLS_ASSIGN_OR_RETURN(std::optional<bool> usage, BoolField(*options, "include_usage"));
    r.include_usage = usage.value_or(false);
  }

  const Json* tools = Field(root, "tools");
  KLS_ASSIGN_OR_RETURN(const bool wanted, ToolsWanted(root));
  if (tools != nullptr) {
    KLS_RETURN_IF_ERROR(ValidateChatTools(*tools));
    r.tools = wanted && !tools->empty();
  }
  if (r.tools) r.messages.push_back(ToolDeclaration(*tools));

  const Json* messages = Field(root, "messages");
  if (messages == nullptr) return Invalid("missing required parameter 'messages'");
  if (!messages->is_array() || messages->empty()) {
    return Invalid("'messages' must be a non-empty array");
  }
  for (size_t i = 0; i < messages->size(); ++i) {
    KLS_RETURN_IF_ERROR(ParseChatMessage((*messages)[i], i, &r.messages));
  }
  return r;
}

absl::StatusOr<ResponsesRequest> ParseResponsesRequest(std::string_view body) {
  KLS_ASSIGN_OR_RETURN(const Json root, ParseObject(body));
  ResponsesRequest r;
  KLS_ASSIGN_OR_RETURN(r.model, StringField(root, "model", true));
  KLS_RETURN_IF_ERROR(
      ParseSampling(root, "max_output_tokens", nullptr, /*allow_stop=*/false, &r.sampling));
  KLS_ASSIGN_OR_RETURN(std::optional<bool> background, BoolField(root, "background"));
  if (background.value_or(false)) {
    return Invalid("'background' true is not supported: responses run while the request waits");
  }
  KLS_ASSIGN_OR_RETURN(std::string truncation, StringField(root, "truncation", false));
  if (!truncation.empty() && truncation != "disabled") {
    return Invalid(absl::StrCat("'truncation' ", truncation.substr(0, 40),
                                " is not supported (only disabled: an input that does not fit "
                                "the context is refused)"));
  }
  KLS_RETURN_IF_ERROR(RejectSequentialToolCalls(root));
  KLS_ASSIGN_OR_RETURN(std::optional<bool> stream, BoolField(root, "stream"));
  r.stream = stream.value_or(false);
  KLS_ASSIGN_OR_RETURN(std::optional<bool> store, BoolField(root, "store"));
  r.store = store.value_or(true);
  KLS_ASSIGN_OR_RETURN(r.previous_response_id, StringField(root, "previous_response_id", false));
  if (const Json* text = Field(root, "text"); text != nullptr) {
    if (!text->is_object()) return Invalid("'text' must be an object");
    if (const Json* format = Field(*text, "format"); format != nullptr) {
      if (!format->is_object()) return Invalid("'text.format' must be an object");
      KLS_ASSIGN_OR_RETURN(std::string type, StringField(*format, "type", true, "text.format."));
      if (type != "text") {
        return Invalid(absl::StrCat("'text.format.type' ", type.substr(0, 40),
                                    " is not supported (only text)"));
      }
    }
  }
  if (const Json* instructions = Field(root, "instructions"); instructions != nullptr) {
    if (!instructions->is_string()) return Invalid("'instructions' must be a string");
    r.instructions = instructions->get<std::string>();
    kls::v1::Message system;
    system.set_role("system");
    system.set_content(*r.instructions);
    r.input.push_back(std::move(system));
  }

  // Responses tools are flat ({"type": "function", "name", "description", "parameters"}); the
  // prompt gets the chat-completions form the K2 template was trained on.
  KLS_ASSIGN_OR_RETURN(const bool wanted, ToolsWanted(root));
  if (const Json* tools = Field(root, "tools"); tools != nullptr) {
    if (!tools->is_array()) return Invalid("'tools' must be an array");
    Json chat_tools = Json::array();
    for (size_t i = 0; i < tools->size(); ++i) {
      const Json& tool = (*tools)[i];
      const std::string at = absl::StrCat("tools[", i, "].");
      if (!tool.is_object()) return Invalid(absl::StrCat("'tools[", i, "]' must be an object"));
      KLS_ASSIGN_OR_RETURN(std::string type, StringField(tool, "type", true, at));
      if (type != "function") {
        return Invalid(absl::StrCat("'", at, "type' ", type.substr(0, 40),
                                    " is not supported (only function)"));
      }
      KLS_ASSIGN_OR_RETURN(std::string name, StringField(tool, "name", true, at));
      if (name.empty()) return Invalid(absl::StrCat("'", at, "name' is empty"));
      Json function = Json::object();
      for (auto it = tool.begin(); it != tool.end(); ++it) {
        if (it.key() != "type") function[it.key()] = it.value();
      }
      chat_tools.push_back({{"type", "function"}, {"function", std::move(function)}});
    }
    r.tools_json = *tools;
    r.tools = wanted && !tools->empty();
    if (r.tools) r.input.push_back(ToolDeclaration(chat_tools));
  }

  const Json* input = Field(root, "input");
  if (input == nullptr) return Invalid("missing required parameter 'input'");
  if (input->is_string()) {
    kls::v1::Message user;
    user.set_role("user");
    user.set_content(input->get<std::string>());
    r.input.push_back(std::move(user));
    return r;
  }
  if (!input->is_array() || input->empty()) {
    return Invalid("'input' must be a string or a non-empty array of items");
  }
  for (size_t i = 0; i < input->size(); ++i) {
    const Json& item = (*input)[i];
    const std::string at = absl::StrCat("input[", i, "].");
    if (!item.is_object()) return Invalid(absl::StrCat("'input[", i, "]' must be an object"));
    KLS_ASSIGN_OR_RETURN(std::string type, StringField(item, "type", false, at));
    if (type.empty() || type == "message") {
      KLS_ASSIGN_OR_RETURN(std::string role, StringField(item, "role", true, at));
      KLS_ASSIGN_OR_RETURN(std::string content, ContentText(item, at));
      kls::v1::Message m;
      if (role == "system" || role == "developer") {
        m.set_role("system");
      } else if (role == "user" || role == "assistant") {
        m.set_role(role);
      } else {
        return Invalid(absl::StrCat("'", at, "role' ", role.substr(0, 40),
                                    " is not one of system, developer, user, assistant"));
      }
      m.set_content(std::move(content));
      r.input.push_back(std::move(m));
    } else if (type == "function_call") {
      KLS_ASSIGN_OR_RETURN(std::string call_id, StringField(item, "call_id", true, at));
      KLS_ASSIGN_OR_RETURN(std::string name, StringField(item, "name", true, at));
      (void)name;  // Kimi's call id names the function
      // Consecutive calls belong to one assistant message.
      if (r.input.empty() || r.input.back().role() != "assistant") {
        kls::v1::Message m;
        m.set_role("assistant");
        r.input.push_back(std::move(m));
      }
      kls::v1::ToolCall* call = r.input.back().add_tool_calls();
      call->set_id(call_id);
      call->set_arguments(ArgumentsText(Field(item, "arguments")));
    } else if (type == "function_call_output") {
      KLS_ASSIGN_OR_RETURN(std::string call_id, StringField(item, "call_id", true, at));
      KLS_ASSIGN_OR_RETURN(std::string output, StringField(item, "output", true, at));
      r.input.push_back(ToolResult(call_id, output));
    } else {
      return Invalid(absl::StrCat("'", at, "type' ", type.substr(0, 40),
                                  " is not supported (message, function_call, "
                                  "function_call_output)"));
    }
  }
  return r;
}

// ---- Response ids -------------------------------------------------------------------------------

std::string EncodeResponseId(const ResponseRef& ref) {
  return absl::StrCat(kResponsePrefix, ref.session_id, "_", ref.version);
}

absl::StatusOr<ResponseRef> DecodeResponseId(std::string_view id) {
  auto not_found = [&] {
    return absl::NotFoundError(absl::StrCat("response '", std::string(id.substr(0, 200)),
                                            "' not found (ids read resp_<session>_<n>)"));
  };
  if (id.substr(0, kResponsePrefixSize) != std::string_view(kResponsePrefix)) return not_found();
  const std::string_view rest = id.substr(kResponsePrefixSize);
  const size_t sep = rest.rfind('_');
  if (sep == std::string_view::npos) return not_found();
  const std::string_view session = rest.substr(0, sep);
  const std::string_view digits = rest.substr(sep + 1);
  if (digits.empty() || digits.size() > 19 || digits[0] == '0') return not_found();
  for (char c : digits) {
    if (c < '0' || c > '9') return not_found();
  }
  uint64_t version = 0;
  if (!absl::SimpleAtoi(absl::string_view(digits.data(), digits.size()), &version) ||
      version > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return not_found();
  }
  if (!services::ValidateSessionId("session_id", session).ok()) return not_found();
  return ResponseRef{std::string(session), version};
}

// ---- X-KLS-Session conversations ----------------------------------------------------------------

std::string MessageChainHash(std::span<const kls::v1::Message> messages) {
  Hasher128 h;
  h.AddU64(messages.size());
  for (const kls::v1::Message& m : messages) {
    Put(h, m.role());
    Put(h, m.name());
    Put(h, m.content());
    h.AddU64(m.tool_calls_size());
    for (const kls::v1::ToolCall& call : m.tool_calls()) {
      Put(h, call.id());
      Put(h, call.arguments());
    }
  }
  return h.Finish().ToHex();
}

absl::StatusOr<size_t> FirstNewMessage(std::span<const kls::v1::Message> messages,
                                       uint64_t session_version,
                                       const std::map<std::string, std::string>& metadata) {
  auto value = [&](const char* key) -> const std::string* {
    auto it = metadata.find(key);
    return it == metadata.end() ? nullptr : &it->second;
  };
  const std::string* chain = value(kChainHashKey);
  const std::string* count_text = value(kChainMessagesKey);
  const std::string* version_text = value(kChainVersionKey);
  if (chain == nullptr || count_text == nullptr || version_text == nullptr) {
    if (session_version == 0) return size_t{0};
    return absl::FailedPreconditionError(absl::StrCat(
        "the session has ", session_version,
        " turns that were not made through /v1/chat/completions; use a new X-KLS-Session id"));
  }
  uint64_t count = 0, version = 0;
  if (!absl::SimpleAtoi(*count_text, &count) || !absl::SimpleAtoi(*version_text, &version)) {
    return absl::FailedPreconditionError("the session's conversation metadata is malformed");
  }
  if (version != session_version) {
    return absl::FailedPreconditionError(
        absl::StrCat("the session is at version ", session_version,
                     " but its conversation was last extended at version ", version,
                     " (another client or the gRPC API added turns)"));
  }
  if (count > messages.size() || MessageChainHash(messages.first(count)) != *chain) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the messages do not start with the ", count,
        " messages this session has consumed; send the whole conversation unchanged, or use a "
        "new X-KLS-Session id"));
  }
  if (version == 0) {
    // Only a session that has not replied yet has no reply to skip.
    if (count == messages.size()) {
      return absl::FailedPreconditionError("no new message after the consumed ones");
    }
    return count;
  }
  if (count == messages.size() || messages[count].role() != "assistant") {
    return absl::FailedPreconditionError(
        absl::StrCat("message ", count, " must be the session's last reply (role assistant)"));
  }
  if (count + 1 == messages.size()) {
    return absl::FailedPreconditionError("no new message after the session's last reply");
  }
  return count + 1;
}

std::map<std::string, std::string> ChainMetadata(std::span<const kls::v1::Message> messages,
                                                 uint64_t next_version) {
  return {{kChainHashKey, MessageChainHash(messages)},
          {kChainMessagesKey, absl::StrCat(messages.size())},
          {kChainVersionKey, absl::StrCat(next_version)}};
}

// ---- Replies ------------------------------------------------------------------------------------

TurnUsage UsageFromKls(const kls::v1::Usage& usage) {
  TurnUsage u;
  u.completion_tokens = usage.completion_tokens();
  const uint64_t context = usage.context_tokens();
  u.prompt_tokens = context >= u.completion_tokens ? context - u.completion_tokens : 0;
  u.cached_tokens =
      u.prompt_tokens >= usage.prompt_tokens() ? u.prompt_tokens - usage.prompt_tokens() : 0;
  return u;
}

std::string ChatFinishReason(kls::v1::FinishReason reason, bool has_tool_calls) {
  if (has_tool_calls) return "tool_calls";
  return reason == kls::v1::FINISH_REASON_LENGTH ? "length" : "stop";
}

Json ChatCompletionJson(const std::string& id, int64_t created, const std::string& model,
                        const ParsedReply& reply, kls::v1::FinishReason finish,
                        const TurnUsage& usage) {
  Json message = Json::object();
  message["role"] = "assistant";
  const bool calls = !reply.tool_calls.empty();
  message["content"] = calls && reply.content.empty() ? Json(nullptr) : Json(reply.content);
  message["refusal"] = nullptr;
  if (calls) message["tool_calls"] = ToolCallsJson(reply.tool_calls);
  Json choice = Json::object();
  choice["index"] = 0;
  choice["message"] = std::move(message);
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = ChatFinishReason(finish, calls);
  Json out = Json::object();
  out["id"] = id;
  out["object"] = "chat.completion";
  out["created"] = created;
  out["model"] = model;
  out["choices"] = Json::array({std::move(choice)});
  out["usage"] = UsageChatJson(usage);
  out["system_fingerprint"] = nullptr;
  return out;
}

ChatStream::ChatStream(std::string id, int64_t created, std::string model, bool tools,
                       bool include_usage)
    : id_(std::move(id)),
      model_(std::move(model)),
      created_(created),
      include_usage_(include_usage),
      reply_(tools) {}

Json ChatStream::ChunkJson() const {
  Json chunk = Json::object();
  chunk["id"] = id_;
  chunk["object"] = "chat.completion.chunk";
  chunk["created"] = created_;
  chunk["model"] = model_;
  chunk["system_fingerprint"] = nullptr;
  return chunk;
}

std::string ChatStream::Chunk(const Json& delta, const Json& finish_reason) const {
  Json choice = Json::object();
  choice["index"] = 0;
  choice["delta"] = delta;
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_reason;
  Json chunk = ChunkJson();
  chunk["choices"] = Json::array({std::move(choice)});
  if (include_usage_) chunk["usage"] = nullptr;
  return SseData(chunk);
}

std::string ChatStream::OnText(std::string_view delta) {
  std::string out;
  if (!role_sent_) {
    role_sent_ = true;
    out += Chunk({{"role", "assistant"}, {"content", ""}}, nullptr);
  }
  if (std::string content = reply_.Append(delta); !content.empty()) {
    out += Chunk({{"content", std::move(content)}}, nullptr);
  }
  return out;
}

std::string ChatStream::OnFinish(kls::v1::FinishReason finish, const TurnUsage& usage) {
  std::string out = OnText("");
  std::string rest;
  const ParsedReply reply = reply_.Finish(&rest);
  if (!rest.empty()) out += Chunk({{"content", std::move(rest)}}, nullptr);
  if (!reply.tool_calls.empty()) {
    out += Chunk({{"tool_calls", ToolCallsJson(reply.tool_calls)}}, nullptr);
  }
  out += Chunk(Json::object(), ChatFinishReason(finish, !reply.tool_calls.empty()));
  if (include_usage_) {
    Json chunk = ChunkJson();
    chunk["choices"] = Json::array();
    chunk["usage"] = UsageChatJson(usage);
    out += SseData(chunk);
  }
  out += kSseDone;
  return out;
}

std::string ChatStream::OnError(const ApiError& error) {
  return absl::StrCat("data: ", ErrorBody(error), "\n\n");
}

Json ResponseJson(const ResponseHeader& h, const std::string& status, const Json& output,
                  const std::optional<TurnUsage>& usage) {
  Json r = Json::object();
  r["id"] = h.id;
  r["object"] = "response";
  r["created_at"] = h.created_at;
  r["status"] = status;
  r["error"] = nullptr;
  r["incomplete_details"] =
      status == "incomplete" ? Json{{"reason", "max_output_tokens"}} : Json(nullptr);
  r["instructions"] = h.instructions.has_value() ? Json(*h.instructions) : Json(nullptr);
  r["max_output_tokens"] =
      h.max_output_tokens.has_value() ? Json(*h.max_output_tokens) : Json(nullptr);
  r["model"] = h.model;
  r["output"] = output;
  r["parallel_tool_calls"] = true;
  r["previous_response_id"] =
      h.previous_response_id.empty() ? Json(nullptr) : Json(h.previous_response_id);
  r["reasoning"] = {{"effort", nullptr}, {"summary", nullptr}};
  r["store"] = h.store;
  r["temperature"] = h.temperature.has_value() ? Json(*h.temperature) : Json(1.0);
  r["text"] = {{"format", {{"type", "text"}}}};
  r["tool_choice"] = "auto";
  r["tools"] = h.tools;
  r["top_p"] = h.top_p.has_value() ? Json(*h.top_p) : Json(1.0);
  r["truncation"] = "disabled";
  r["usage"] = usage.has_value() ? UsageResponsesJson(*usage) : Json(nullptr);
  r["user"] = nullptr;
  r["metadata"] = Json::object();
  return r;
}

Json ResponseOutput(const std::string& response_id, const ParsedReply& reply) {
  Json output = Json::array();
  if (!reply.content.empty() || reply.tool_calls.empty()) {
    output.push_back(MessageItem(MessageItemId(response_id), "completed",
                                 Json::array({OutputTextPart(reply.content)})));
  }
  for (size_t i = 0; i < reply.tool_calls.size(); ++i) {
    const ParsedToolCall& call = reply.tool_calls[i];
    output.push_back(
        FunctionCallItem(FunctionCallItemId(response_id, i), call, "completed", call.arguments));
  }
  return output;
}

std::string ResponseStatus(kls::v1::FinishReason finish) {
  return finish == kls::v1::FINISH_REASON_LENGTH ? "incomplete" : "completed";
}

ResponsesStream::ResponsesStream(ResponseHeader header, bool tools)
    : header_(std::move(header)), reply_(tools) {}

std::string ResponsesStream::Event(Json event) {
  const std::string type = event["type"].get<std::string>();
  event["sequence_number"] = sequence_++;
  return SseEvent(type, event);
}

std::string ResponsesStream::OnStart() {
  const Json response = ResponseJson(header_, "in_progress", Json::array(), std::nullopt);
  std::string out = Event({{"type", "response.created"}, {"response", response}});
  out += Event({{"type", "response.in_progress"}, {"response", response}});
  return out;
}

std::string ResponsesStream::OpenMessage() {
  message_open_ = true;
  const std::string item_id = MessageItemId(header_.id);
  std::string out = Event({{"type", "response.output_item.added"},
                           {"output_index", 0},
                           {"item", MessageItem(item_id, "in_progress", Json::array())}});
  out += Event({{"type", "response.content_part.added"},
                {"item_id", item_id},
                {"output_index", 0},
                {"content_index", 0},
                {"part", OutputTextPart("")}});
  return out;
}

std::string ResponsesStream::SendContent(std::string_view content) {
  if (content.empty()) return "";
  std::string out = message_open_ ? "" : OpenMessage();
  content_sent_.append(content);
  out += Event({{"type", "response.output_text.delta"},
                {"item_id", MessageItemId(header_.id)},
                {"output_index", 0},
                {"content_index", 0},
                {"delta", std::string(content)},
                {"logprobs", Json::array()}});
  return out;
}

std::string ResponsesStream::OnText(std::string_view delta) {
  return SendContent(reply_.Append(delta));
}

std::string ResponsesStream::OnFinish(kls::v1::FinishReason finish, const TurnUsage& usage) {
  std::string rest;
  const ParsedReply reply = reply_.Finish(&rest);
  std::string out = SendContent(rest);
  // A reply with neither text nor calls still gets its (empty) message, as ResponseOutput does.
  if (!message_open_ && reply.tool_calls.empty()) out += OpenMessage();
  const std::string item_id = MessageItemId(header_.id);
  if (message_open_) {
    out += Event({{"type", "response.output_text.done"},
                  {"item_id", item_id},
                  {"output_index", 0},
                  {"content_index", 0},
                  {"text", content_sent_},
                  {"logprobs", Json::array()}});
    out += Event({{"type", "response.content_part.done"},
                  {"item_id", item_id},
                  {"output_index", 0},
                  {"content_index", 0},
                  {"part", OutputTextPart(content_sent_)}});
    out += Event({{"type", "response.output_item.done"},
                  {"output_index", 0},
                  {"item", MessageItem(item_id, "completed",
                                       Json::array({OutputTextPart(content_sent_)}))}});
  }
  const size_t first_call = message_open_ ? 1 : 0;
  for (size_t i = 0; i < reply.tool_calls.size(); ++i) {
    const ParsedToolCall& call = reply.tool_calls[i];
    const std::string call_item = FunctionCallItemId(header_.id, i);
    const size_t index = first_call + i;
    out += Event({{"type", "response.output_item.added"},
                  {"output_index", index},
                  {"item", FunctionCallItem(call_item, call, "in_progress", "")}});
    out += Event({{"type", "response.function_call_arguments.delta"},
                  {"item_id", call_item},
                  {"output_index", index},
                  {"delta", call.arguments}});
    out += Event({{"type", "response.function_call_arguments.done"},
                  {"item_id", call_item},
                  {"output_index", index},
                  {"name", call.name},
                  {"arguments", call.arguments}});
    out += Event({{"type", "response.output_item.done"},
                  {"output_index", index},
                  {"item", FunctionCallItem(call_item, call, "completed", call.arguments)}});
  }
  // The final object lists exactly the items streamed (the content that was sent).
  Json output = Json::array();
  if (message_open_) {
    output.push_back(
        MessageItem(item_id, "completed", Json::array({OutputTextPart(content_sent_)})));
  }
  for (size_t i = 0; i < reply.tool_calls.size(); ++i) {
    const ParsedToolCall& call = reply.tool_calls[i];
    output.push_back(
        FunctionCallItem(FunctionCallItemId(header_.id, i), call, "completed", call.arguments));
  }
  const std::string status = ResponseStatus(finish);
  out += Event({{"type", status == "completed" ? "response.completed" : "response.incomplete"},
                {"response", ResponseJson(header_, status, output, usage)}});
  return out;
}

std::string ResponsesStream::OnError(const ApiError& error) {
  Json output = Json::array();
  if (message_open_) {
    output.push_back(MessageItem(MessageItemId(header_.id), "incomplete",
                                 Json::array({OutputTextPart(content_sent_)})));
  }
  Json response = ResponseJson(header_, "failed", output, std::nullopt);
  // OpenAI's codes for a failed response; what fails after the stream started is the server's.
  response["error"] = {
      {"code", error.code == "rate_limit_exceeded" ? error.code : std::string("server_error")},
      {"message", error.message}};
  return Event({{"type", "response.failed"}, {"response", std::move(response)}});
}

std::string SseData(const Json& json) { return absl::StrCat("data: ", Dump(json), "\n\n"); }

std::string SseEvent(std::string_view type, const Json& json) {
  return absl::StrCat("event: ", std::string(type), "\ndata: ", Dump(json), "\n\n");
}

}  // namespace kls::router::openai

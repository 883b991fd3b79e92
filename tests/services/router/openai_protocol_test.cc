// The OpenAI-compatible API's pure parts: request parsing and validation (chat completions and
// responses), errors in OpenAI's shape, response ids, the X-KLS-Session message chain, usage,
// the chat-completion and Responses event streams (errors after the start included), and the
// nesting limit on request bodies.
#include "services/router/openai_protocol.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kls::router::openai {
namespace {

using ::testing::HasSubstr;

kls::v1::Message Msg(const std::string& role, const std::string& content,
                     const std::string& name = "") {
  kls::v1::Message m;
  m.set_role(role);
  m.set_content(content);
  m.set_name(name);
  return m;
}

// Parses the "data:" payloads of an SSE byte stream ("[DONE]" kept as a string).
std::vector<Json> SseEvents(const std::string& bytes, std::vector<std::string>* types = nullptr) {
  std::vector<Json> out;
  size_t pos = 0;
  while (pos < bytes.size()) {
    const size_t end = bytes.find("\n\n", pos);
    EXPECT_NE(end, std::string::npos) << "unterminated event: " << bytes.substr(pos);
    if (end == std::string::npos) break;
    const std::string event = bytes.substr(pos, end - pos);
    pos = end + 2;
    std::string type, data;
    size_t line_start = 0;
    while (line_start <= event.size()) {
      size_t line_end = event.find('\n', line_start);
      if (line_end == std::string::npos) line_end = event.size();
      const std::string line = event.substr(line_start, line_end - line_start);
      if (line.rfind("event: ", 0) == 0) type = line.substr(7);
      if (line.rfind("data: ", 0) == 0) data = line.substr(6);
      line_start = line_end + 1;
    }
    if (types != nullptr) types->push_back(type);
    if (data == "[DONE]") {
      out.push_back("[DONE]");
    } else {
      Json json = Json::parse(data, nullptr, false);
      EXPECT_FALSE(json.is_discarded()) << data;
      out.push_back(json);
    }
  }
  return out;
}

// ---- Chat completions requests ------------------------------------------------------------------

TEST(ChatRequestTest, FullRequest) {
  const std::string body = R"({
    "model": "tiny", "temperature": 0, "top_p": 0.5, "max_tokens": 12, "seed": 7, "ignore_eos": true,
    "stop": ["x", "y"], "stream": true, "stream_options": {"include_usage": true},
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"b": 1, "a": 2}}}],
    "tool_choice": "auto", "user": "ignored", "presence_penalty": 0,
    "messages": [
      {"role": "developer", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "weather "}, {"type": "text", "text": "now?"}]},
      {"role": "assistant", "content": null, "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"type": "function", "function": {"name": "other", "arguments": {"k": true}}}]},
      {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}
    ]})";
  auto r = ParseChatCompletionRequest(body);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->model, "tiny");
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  EXPECT_TRUE(r->tools);
  EXPECT_EQ(r->sampling.temperature(), 0.0f);
  EXPECT_EQ(r->sampling.top_p(), 0.5f);
  EXPECT_EQ(r->sampling.max_tokens(), 12);
  EXPECT_EQ(r->sampling.seed(), 7u);
  EXPECT_TRUE(r->sampling.ignore_eos());
  ASSERT_EQ(r->sampling.stop_size(), 2);
  ASSERT_EQ(r->messages.size(), 5u);
  // The declaration keeps the client's key order, compact.
  EXPECT_EQ(r->messages[0].role(), "tool");
  EXPECT_EQ(r->messages[0].name(), "tool_declare");
  EXPECT_EQ(
      r->messages[0].content(),
      R"([{"type":"function","function":{"name":"get_weather","parameters":{"b":1,"a":2}}}])");
  EXPECT_EQ(r->messages[1].role(), "system");
  EXPECT_EQ(r->messages[1].content(), "be brief");
  EXPECT_EQ(r->messages[2].content(), "weather now?");
  const kls::v1::Message& assistant = r->messages[3];
  EXPECT_EQ(assistant.role(), "assistant");
  EXPECT_EQ(assistant.content(), "");
  ASSERT_EQ(assistant.tool_calls_size(), 2);
  EXPECT_EQ(assistant.tool_calls(0).id(), "functions.get_weather:0");
  EXPECT_EQ(assistant.tool_calls(0).arguments(), R"({"city":"Paris"})");
  EXPECT_EQ(assistant.tool_calls(1).id(), "functions.other:1");  // made from the name
  EXPECT_EQ(assistant.tool_calls(1).arguments(), R"({"k":true})");
  EXPECT_EQ(r->messages[4].role(), "tool");
  EXPECT_EQ(r->messages[4].content(), "## Return of functions.get_weather:0\nsunny");
}

TEST(ChatRequestTest, DefaultsAndToolChoiceNone) {
  auto r = ParseChatCompletionRequest(
      R"({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1,
          "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none",
          "max_completion_tokens": 3, "stop": "END"})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->stream);
  EXPECT_FALSE(r->tools);
  ASSERT_EQ(r->messages.size(), 1u);  // no declaration
  EXPECT_FALSE(r->sampling.has_temperature());
  EXPECT_EQ(r->sampling.max_tokens(), 3);
  ASSERT_EQ(r->sampling.stop_size(), 1);
  EXPECT_EQ(r->sampling.stop(0), "END");
}

TEST(ChatRequestTest, Errors) {
  const std::string user = R"("messages": [{"role": "user", "content": "hi"}])";
  const struct {
    std::string body;
    std::string needle;
  } cases[] = {
      {"{not json", "not valid JSON"},
      {"[1, 2]", "must be a JSON object"},
      {"{" + user + "}", "'model'"},
      {R"({"model": 3, )" + user + "}", "'model' must be a string"},
      {R"({"model": "m"})", "'messages'"},
      {R"({"model": "m", "messages": []})", "non-empty array"},
      {R"({"model": "m", "n": 2, )" + user + "}", "'n' must be 1"},
      {R"({"model": "m", "n": 0, )" + user + "}", "'n' must be 1"},
      {R"({"model": "m", "max_tokens": -5, )" + user + "}", "'max_tokens' must be >= 1, got -5"},
      {R"({"model": "m", "max_tokens": 0, )" + user + "}", "'max_tokens' must be >= 1"},
      {R"({"model": "m", "max_tokens": 1.5, )" + user + "}", "'max_tokens' must be an integer"},
      {R"({"model": "m", "max_completion_tokens": -1, )" + user + "}", "max_completion_tokens"},
      {R"({"model": "m", "max_tokens": 99999999999, )" + user + "}", "too large"},
      {R"({"model": "m", "temperature": -1, )" + user + "}", "'temperature' must be >= 0"},
      {R"({"model": "m", "temperature": "hot", )" + user + "}", "'temperature' must be a number"},
      {R"({"model": "m", "top_p": 0, )" + user + "}", "'top_p'"},
      {R"({"model": "m", "logprobs": true, )" + user + "}", "'logprobs'"},
      {R"({"model": "m", "frequency_penalty": 1, )" + user + "}", "frequency_penalty"},
      {R"({"model": "m", "stream": "yes", )" + user + "}", "'stream' must be a boolean"},
      {R"({"model": "m", "stop": 3, )" + user + "}", "'stop'"},
      {R"({"model": "m", "ignore_eos": 1, )" + user + "}", "'ignore_eos' must be a boolean"},
      {R"({"model": "m", "response_format": {"type": "json_object"}, )" + user + "}",
       "json_object"},
      {R"({"model": "m", "messages": [{"role": "wizard", "content": "x"}]})", "wizard"},
      {R"({"model": "m", "messages": [{"content": "x"}]})", "'messages[0].role'"},
      {R"({"model": "m", "messages": ["x"]})", "'messages[0]' must be an object"},
      {R"({"model": "m", "messages": [{"role": "tool", "content": "x"}]})", "tool_call_id"},
      {R"({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "image_url"},
      {R"({"model": "m", "messages": [{"role": "user", "content": 5}]})", "content"},
      {R"({"model": "m", "tools": [{"type": "retrieval"}], )" + user + "}", "retrieval"},
      {R"({"model": "m", "tools": [{"type": "function"}], )" + user + "}", "'tools[0].function'"},
      {R"({"model": "m", "tool_choice": "sometimes", )" + user + "}", "sometimes"},
      {R"({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "x"}]}]})",
       "function"},
      {R"({"model": "m", "parallel_tool_calls": false, )" + user + "}", "'parallel_tool_calls'"},
      {R"({"model": "m", "max_tokens": 3, "max_completion_tokens": 4, )" + user + "}",
       "'max_tokens' (3) and 'max_completion_tokens' (4) differ"},
  };
  for (const auto& c : cases) {
    auto r = ParseChatCompletionRequest(c.body);
    ASSERT_FALSE(r.ok()) << c.body;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.body;
    EXPECT_THAT(r.status().message(), HasSubstr(c.needle)) << c.body;
  }
}

// ---- Responses requests -------------------------------------------------------------------------

TEST(ResponsesRequestTest, StringInputWithInstructions) {
  auto r = ParseResponsesRequest(
      R"({"model": "m", "input": "hello", "instructions": "be kind", "max_output_tokens": 9,
          "store": false, "previous_response_id": "resp_abc_2", "text": {"format": {"type": "text"}}})");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->input.size(), 2u);
  EXPECT_EQ(r->input[0].role(), "system");
  EXPECT_EQ(r->input[0].content(), "be kind");
  EXPECT_EQ(r->input[1].role(), "user");
  EXPECT_EQ(r->input[1].content(), "hello");
  EXPECT_EQ(r->sampling.max_tokens(), 9);
  EXPECT_FALSE(r->store);
  EXPECT_EQ(r->previous_response_id, "resp_abc_2");
  EXPECT_EQ(r->instructions, "be kind");
}

TEST(ResponsesRequestTest, ItemsAndTools) {
  auto r = ParseResponsesRequest(R"({
    "model": "m", "stream": true,
    "tools": [{"type": "function", "name": "get_weather", "description": "d", "parameters": {}}],
    "input": [
      {"role": "user", "content": "weather?"},
      {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
      {"type": "function_call", "call_id": "functions.get_weather:0", "name": "get_weather",
       "arguments": "{\"city\":\"Oslo\"}"},
      {"type": "function_call", "call_id": "functions.get_weather:1", "name": "get_weather",
       "arguments": "{}"},
      {"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "cold"}
    ]})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->store);
  EXPECT_TRUE(r->tools);
  ASSERT_EQ(r->input.size(), 4u);
  EXPECT_EQ(r->input[0].name(), "tool_declare");
  EXPECT_EQ(
      r->input[0].content(),
      R"([{"type":"function","function":{"name":"get_weather","description":"d","parameters":{}}}])");
  EXPECT_EQ(r->input[1].content(), "weather?");
  // The calls join the assistant message before them.
  EXPECT_EQ(r->input[2].role(), "assistant");
  EXPECT_EQ(r->input[2].content(), "ok");
  ASSERT_EQ(r->input[2].tool_calls_size(), 2);
  EXPECT_EQ(r->input[2].tool_calls(0).arguments(), R"({"city":"Oslo"})");
  EXPECT_EQ(r->input[3].content(), "## Return of functions.get_weather:0\ncold");
  EXPECT_EQ(r->tools_json.size(), 1u);  // echoed as given
}

TEST(ResponsesRequestTest, Errors) {
  const struct {
    std::string body;
    std::string needle;
  } cases[] = {
      {"nope", "not valid JSON"},
      {R"({"input": "x"})", "'model'"},
      {R"({"model": "m"})", "'input'"},
      {R"({"model": "m", "input": []})", "non-empty"},
      {R"({"model": "m", "input": 4})", "'input'"},
      {R"({"model": "m", "input": "x", "max_output_tokens": -1})", "'max_output_tokens'"},
      {R"({"model": "m", "input": "x", "store": 1})", "'store'"},
      {R"({"model": "m", "input": "x", "previous_response_id": 3})", "previous_response_id"},
      {R"({"model": "m", "input": [{"type": "item_reference", "id": "x"}]})", "item_reference"},
      {R"({"model": "m", "input": [{"role": "tool", "content": "x"}]})", "'input[0].role'"},
      {R"({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]})",
       "'input[0].call_id'"},
      {R"({"model": "m", "input": "x", "tools": [{"type": "web_search"}]})", "web_search"},
      {R"({"model": "m", "input": "x", "text": {"format": {"type": "json_schema"}}})",
       "json_schema"},
      {R"({"model": "m", "input": "x", "background": true})", "'background'"},
      {R"({"model": "m", "input": "x", "truncation": "auto"})", "'truncation' auto"},
      {R"({"model": "m", "input": "x", "truncation": 1})", "'truncation' must be a string"},
      {R"({"model": "m", "input": "x", "parallel_tool_calls": false})", "'parallel_tool_calls'"},
      {R"({"model": "m", "input": "x", "stop": ["a"]})", "'stop' is not a parameter"},
  };
  for (const auto& c : cases) {
    auto r = ParseResponsesRequest(c.body);
    ASSERT_FALSE(r.ok()) << c.body;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.body;
    EXPECT_THAT(r.status().message(), HasSubstr(c.needle)) << c.body;
  }
}

TEST(ResponsesRequestTest, AcceptedValuesOfTheRefusedFields) {
  auto r = ParseResponsesRequest(
      R"({"model": "m", "input": "x", "background": false, "truncation": "disabled",
          "parallel_tool_calls": true})");
  EXPECT_TRUE(r.ok()) << r.status();
  auto c = ParseChatCompletionRequest(
      R"({"model": "m", "max_tokens": 4, "max_completion_tokens": 4, "parallel_tool_calls": true,
          "messages": [{"role": "user", "content": "hi"}]})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sampling.max_tokens(), 4);
}

// ---- Nesting depth ------------------------------------------------------------------------------

// `depth` levels of {"a": ...} around 1.
std::string NestedObjects(int depth) {
  std::string s;
  for (int i = 0; i < depth; ++i) s += R"({"a":)";
  s += "1";
  s.append(depth, '}');
  return s;
}

TEST(JsonDepthTest, SixtyFourLevelsAreAcceptedSixtyFiveAreNot) {
  // The request object is level 1, tools 2, the tool 3, function 4, parameters 5.
  auto chat_with_parameters = [](int depth) {
    return R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type":
        "function", "function": {"name": "f", "parameters": )" +
           NestedObjects(depth) + "}}]}";
  };
  auto ok = ParseChatCompletionRequest(chat_with_parameters(kMaxJsonDepth - 4));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->messages[0].name(), "tool_declare");  // rendered, i.e. dumped, fine
  auto deep = ParseChatCompletionRequest(chat_with_parameters(kMaxJsonDepth - 3));
  ASSERT_FALSE(deep.ok());
  EXPECT_EQ(deep.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(deep.status().message(), HasSubstr("more than 64 levels deep"));
  // Brackets inside strings are text, not nesting.
  auto text =
      ParseChatCompletionRequest(R"({"model": "m", "messages": [{"role": "user", "content": ")" +
                                 std::string(10000, '[') + R"("}]})");
  EXPECT_TRUE(text.ok()) << text.status();
}

TEST(JsonDepthTest, MillionLevelBodiesAreRefusedWithoutRecursing) {
  constexpr int kDeep = 1'000'000;
  const std::string arrays = std::string(kDeep, '[') + std::string(kDeep, ']');
  const std::string objects = NestedObjects(kDeep);
  const std::string user = R"("messages": [{"role": "user", "content": "x"}])";
  const std::string chat_bodies[] = {
      arrays, R"({"model": "m", "messages": )" + arrays + "}",
      R"({"model": "m", "tools": [{"type": "function", "function": {"name": "f", "parameters": )" +
          objects + "}}], " + user + "}",
      // Arguments given as an object are serialized: deep ones must not get that far.
      R"({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "i", "function":
          {"name": "f", "arguments": )" +
          objects + "}}]}]}",
      std::string(kDeep, '['),  // unterminated
  };
  for (const std::string& body : chat_bodies) {
    auto r = ParseChatCompletionRequest(body);
    ASSERT_FALSE(r.ok()) << body.substr(0, 80);
    EXPECT_THAT(r.status().message(), HasSubstr("levels deep")) << body.substr(0, 80);
  }
  auto r = ParseResponsesRequest(R"({"model": "m", "input": "x", "tools": [{"type": "function",
      "name": "f", "parameters": )" +
                                 objects + "}]}");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("levels deep"));
  // Still just a syntax error when shallow.
  EXPECT_THAT(ParseChatCompletionRequest("[[]").status().message(), HasSubstr("not valid JSON"));
}

// ---- Errors and ids -----------------------------------------------------------------------------

TEST(ErrorsTest, StatusMapping) {
  const struct {
    absl::Status status;
    int http;
    std::string type;
  } cases[] = {
      {absl::InvalidArgumentError("a"), 400, "invalid_request_error"},
      {absl::OutOfRangeError("a"), 400, "invalid_request_error"},
      {absl::UnauthenticatedError("a"), 401, "invalid_request_error"},
      {absl::PermissionDeniedError("a"), 403, "permission_error"},
      {absl::NotFoundError("a"), 404, "invalid_request_error"},
      {absl::AlreadyExistsError("a"), 409, "invalid_request_error"},
      {absl::AbortedError("a"), 409, "invalid_request_error"},
      {absl::FailedPreconditionError("a"), 409, "invalid_request_error"},
      {absl::ResourceExhaustedError("a"), 429, "rate_limit_error"},
      {absl::CancelledError("a"), 499, "invalid_request_error"},
      {absl::UnimplementedError("a"), 501, "server_error"},
      {absl::UnavailableError("a"), 503, "server_error"},
      {absl::DeadlineExceededError("a"), 504, "server_error"},
      {absl::InternalError("a"), 500, "server_error"},
      {absl::DataLossError("a"), 500, "server_error"},
  };
  for (const auto& c : cases) {
    const ApiError e = ErrorFromStatus(c.status);
    EXPECT_EQ(e.http_status, c.http) << c.status;
    EXPECT_EQ(e.type, c.type) << c.status;
    EXPECT_EQ(e.message, "a");
  }
  EXPECT_EQ(ErrorFromStatus(absl::UnauthenticatedError("x")).code, "invalid_api_key");
  EXPECT_EQ(ErrorFromStatus(absl::ResourceExhaustedError("x")).code, "rate_limit_exceeded");
}

TEST(ErrorsTest, BodyShape) {
  ApiError e;
  e.http_status = 404;
  e.type = "invalid_request_error";
  e.code = "model_not_found";
  e.param = "model";
  e.message = "no \xFF model";  // invalid UTF-8 is replaced, never thrown
  const Json body = Json::parse(ErrorBody(e));
  EXPECT_EQ(body["error"]["type"], "invalid_request_error");
  EXPECT_EQ(body["error"]["code"], "model_not_found");
  EXPECT_EQ(body["error"]["param"], "model");
  EXPECT_EQ(body["error"]["message"], "no \xEF\xBF\xBD model");
  const Json nulls = Json::parse(ErrorBody(ErrorFromStatus(absl::InvalidArgumentError("bad"))));
  EXPECT_TRUE(nulls["error"]["param"].is_null());
  EXPECT_TRUE(nulls["error"]["code"].is_null());
}

TEST(ResponseIdTest, RoundTrip) {
  for (const ResponseRef& ref : {ResponseRef{"abc", 1}, ResponseRef{"my_session_1", 42},
                                 ResponseRef{"a.b-c_", 9223372036854775807ull}}) {
    const std::string id = EncodeResponseId(ref);
    auto back = DecodeResponseId(id);
    ASSERT_TRUE(back.ok()) << id << ": " << back.status();
    EXPECT_EQ(*back, ref);
  }
  EXPECT_EQ(EncodeResponseId({"s", 3}), "resp_s_3");
}

TEST(ResponseIdTest, RejectsMalformedAsNotFound) {
  for (const std::string& id : std::vector<std::string>{
           "", "resp_", "resp_abc", "resp__1", "resp_abc_", "resp_abc_0", "resp_abc_01",
           "resp_abc_-1", "resp_abc_1x", "resp_abc_+1", "response_abc_1", "chatcmpl-1",
           "resp_a/b_1", "resp_a b_1", "resp_abc_9223372036854775808",
           "resp_abc_99999999999999999999", "resp_" + std::string(129, 'a') + "_1"}) {
    auto r = DecodeResponseId(id);
    ASSERT_FALSE(r.ok()) << id;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << id;
  }
}

// ---- X-KLS-Session chain ------------------------------------------------------------------------

TEST(ChainTest, HashCoversEveryField) {
  const std::vector<kls::v1::Message> base = {Msg("user", "hi")};
  const std::string h = MessageChainHash(base);
  EXPECT_EQ(h.size(), 32u);
  EXPECT_EQ(h, MessageChainHash(base));
  std::vector<kls::v1::Message> other = base;
  other[0].set_role("system");
  EXPECT_NE(MessageChainHash(other), h);
  other = base;
  other[0].set_name("x");
  EXPECT_NE(MessageChainHash(other), h);
  other = base;
  other[0].add_tool_calls()->set_id("functions.f:0");
  EXPECT_NE(MessageChainHash(other), h);
  // Field boundaries count: ("ab", "c") differs from ("a", "bc").
  EXPECT_NE(MessageChainHash(std::vector<kls::v1::Message>{Msg("ab", "c")}),
            MessageChainHash(std::vector<kls::v1::Message>{Msg("a", "bc")}));
  EXPECT_NE(MessageChainHash({}), MessageChainHash(base));
}

TEST(ChainTest, ConversationAdvances) {
  std::vector<kls::v1::Message> conv = {Msg("system", "s"), Msg("user", "u1")};
  // A fresh session has consumed nothing.
  auto first = FirstNewMessage(conv, 0, {});
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first, 0u);
  std::map<std::string, std::string> meta = ChainMetadata(conv, 1);
  EXPECT_EQ(meta.at(kChainMessagesKey), "2");
  EXPECT_EQ(meta.at(kChainVersionKey), "1");

  // Turn 2: the reply, then a new user message.
  conv.push_back(Msg("assistant", "reply one"));
  conv.push_back(Msg("user", "u2"));
  auto second = FirstNewMessage(conv, 1, meta);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(*second, 3u);
  meta = ChainMetadata(conv, 2);

  // Turn 3 with two new messages (a tool result and a user message).
  conv.push_back(Msg("assistant", "reply two"));
  conv.push_back(Msg("tool", "## Return of x\ny"));
  conv.push_back(Msg("user", "u3"));
  auto third = FirstNewMessage(conv, 2, meta);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(*third, 5u);
}

TEST(ChainTest, MismatchesAreRefused) {
  std::vector<kls::v1::Message> conv = {Msg("user", "u1")};
  const std::map<std::string, std::string> meta = ChainMetadata(conv, 1);
  auto expect_refused = [](const absl::StatusOr<size_t>& r, const std::string& needle) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(r.status().message(), HasSubstr(needle));
  };
  std::vector<kls::v1::Message> next = {Msg("user", "u1"), Msg("assistant", "r"),
                                        Msg("user", "u2")};
  // An edited history.
  std::vector<kls::v1::Message> edited = next;
  edited[0].set_content("U1");
  expect_refused(FirstNewMessage(edited, 1, meta), "do not start with");
  // The session moved on without this client (e.g. a gRPC turn).
  expect_refused(FirstNewMessage(next, 2, meta), "version 2");
  // Turns made elsewhere, no chain at all.
  expect_refused(FirstNewMessage(next, 3, {}), "not made through");
  // No reply, or no new message.
  expect_refused(
      FirstNewMessage(std::vector<kls::v1::Message>{Msg("user", "u1"), Msg("user", "x")}, 1, meta),
      "last reply");
  expect_refused(
      FirstNewMessage(std::vector<kls::v1::Message>{Msg("user", "u1"), Msg("assistant", "r")}, 1,
                      meta),
      "no new message");
  // Fewer messages than consumed.
  expect_refused(FirstNewMessage(std::vector<kls::v1::Message>{}, 1, meta), "do not start with");
  // Malformed metadata.
  std::map<std::string, std::string> bad = meta;
  bad[kChainMessagesKey] = "lots";
  expect_refused(FirstNewMessage(next, 1, bad), "malformed");
}

// ---- Replies ------------------------------------------------------------------------------------

TEST(RepliesTest, UsageCountsTheSessionAsCached) {
  kls::v1::Usage usage;
  usage.set_prompt_tokens(10);  // fed this turn
  usage.set_completion_tokens(4);
  usage.set_context_tokens(120);  // in the session after the turn
  const TurnUsage u = UsageFromKls(usage);
  EXPECT_EQ(u.prompt_tokens, 116u);
  EXPECT_EQ(u.cached_tokens, 106u);
  EXPECT_EQ(u.completion_tokens, 4u);
}

TEST(RepliesTest, ChatCompletionWithToolCalls) {
  ParsedReply reply;
  reply.tool_calls.push_back({"functions.f:0", "f", "{}"});
  const Json j = ChatCompletionJson("chatcmpl-1", 5, "m", reply, kls::v1::FINISH_REASON_STOP,
                                    TurnUsage{3, 1, 2});
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "tool_calls");
  EXPECT_TRUE(j["choices"][0]["message"]["content"].is_null());
  EXPECT_EQ(j["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "f");
  EXPECT_EQ(j["choices"][0]["message"]["tool_calls"][0]["id"], "functions.f:0");
  EXPECT_EQ(j["usage"]["total_tokens"], 5);
  EXPECT_EQ(j["usage"]["prompt_tokens_details"]["cached_tokens"], 1);

  ParsedReply text;
  text.content = "hi";
  const Json t = ChatCompletionJson("c", 5, "m", text, kls::v1::FINISH_REASON_LENGTH, {});
  EXPECT_EQ(t["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(t["choices"][0]["message"]["content"], "hi");
  EXPECT_FALSE(t["choices"][0]["message"].contains("tool_calls"));
}

TEST(ChatStreamTest, TextChunksThenUsageAndDone) {
  ChatStream stream("chatcmpl-1", 5, "m", /*tools=*/false, /*include_usage=*/true);
  std::string bytes = stream.OnText("Hel");
  bytes += stream.OnText("lo");
  bytes += stream.OnFinish(kls::v1::FINISH_REASON_LENGTH, TurnUsage{7, 0, 2});
  const std::vector<Json> events = SseEvents(bytes);
  ASSERT_EQ(events.size(), 6u);
  EXPECT_EQ(events[0]["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(events[1]["choices"][0]["delta"]["content"], "Hel");
  EXPECT_EQ(events[2]["choices"][0]["delta"]["content"], "lo");
  EXPECT_EQ(events[3]["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(events[3]["usage"].is_null());
  EXPECT_TRUE(events[4]["choices"].empty());
  EXPECT_EQ(events[4]["usage"]["prompt_tokens"], 7);
  EXPECT_EQ(events[4]["usage"]["completion_tokens"], 2);
  EXPECT_EQ(events[5], "[DONE]");
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(events[i]["id"], "chatcmpl-1");
    EXPECT_EQ(events[i]["object"], "chat.completion.chunk");
  }
}

TEST(ChatStreamTest, ToolCallsAreHeldBackAndSentWhole) {
  ChatStream stream("c", 5, "m", /*tools=*/true, /*include_usage=*/false);
  std::string content;
  std::string bytes;
  for (const std::string piece :
       {"Sure", ". <|tool_calls", "_section_begin|><|tool_call_begin|>functions.f:0",
        "<|tool_call_argument_begin|>{\"a\":1}<|tool_call_end|><|tool_calls_section_end|>"}) {
    bytes += stream.OnText(piece);
  }
  bytes += stream.OnFinish(kls::v1::FINISH_REASON_STOP, {});
  const std::vector<Json> events = SseEvents(bytes);
  Json calls;
  std::string finish;
  for (const Json& e : events) {
    if (e == "[DONE]") continue;
    EXPECT_FALSE(e.contains("usage"));
    const Json& delta = e["choices"][0]["delta"];
    if (delta.contains("content")) content += delta["content"].get<std::string>();
    if (delta.contains("tool_calls")) calls = delta["tool_calls"];
    if (!e["choices"][0]["finish_reason"].is_null()) finish = e["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(content, "Sure. ");  // no marker text ever reaches the client
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0]["index"], 0);
  EXPECT_EQ(calls[0]["function"]["arguments"], "{\"a\":1}");
  EXPECT_EQ(finish, "tool_calls");
  EXPECT_EQ(events.back(), "[DONE]");
}

TEST(ChatStreamTest, HeldBackPrefixIsFlushedWhenNoCallFollows) {
  ChatStream stream("c", 5, "m", /*tools=*/true, /*include_usage=*/false);
  std::string bytes = stream.OnText("a <|tool_calls_sec");
  bytes += stream.OnFinish(kls::v1::FINISH_REASON_LENGTH, {});
  std::string content;
  for (const Json& e : SseEvents(bytes)) {
    if (e != "[DONE]" && e["choices"][0]["delta"].contains("content")) {
      content += e["choices"][0]["delta"]["content"].get<std::string>();
    }
  }
  EXPECT_EQ(content, "a <|tool_calls_sec");
}

TEST(ChatStreamTest, ErrorAfterTheStartIsOneErrorEventWithoutDone) {
  ChatStream stream("c", 5, "m", /*tools=*/false, /*include_usage=*/true);
  std::string bytes = stream.OnText("partial");
  bytes += stream.OnError(ErrorFromStatus(absl::UnavailableError("worker lost")));
  const std::vector<Json> events = SseEvents(bytes);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[2]["error"]["message"], "worker lost");
  EXPECT_EQ(events[2]["error"]["type"], "server_error");
  EXPECT_EQ(events[2]["error"]["code"], "service_unavailable");
  EXPECT_FALSE(events[2].contains("choices"));
}

ResponseHeader Header() {
  ResponseHeader h;
  h.id = "resp_sess_3";
  h.created_at = 100;
  h.model = "m";
  h.previous_response_id = "resp_sess_2";
  return h;
}

TEST(ResponsesStreamTest, TextEventsInOrder) {
  ResponsesStream stream(Header(), /*tools=*/false);
  std::string bytes = stream.OnStart();
  bytes += stream.OnText("Hi");
  bytes += stream.OnText(" there");
  bytes += stream.OnFinish(kls::v1::FINISH_REASON_STOP, TurnUsage{5, 2, 2});
  std::vector<std::string> types;
  const std::vector<Json> events = SseEvents(bytes, &types);
  const std::vector<std::string> expected = {
      "response.created",           "response.in_progress",
      "response.output_item.added", "response.content_part.added",
      "response.output_text.delta", "response.output_text.delta",
      "response.output_text.done",  "response.content_part.done",
      "response.output_item.done",  "response.completed"};
  EXPECT_EQ(types, expected);
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i]["type"], types[i]);
    EXPECT_EQ(events[i]["sequence_number"], i);
  }
  EXPECT_EQ(events[0]["response"]["id"], "resp_sess_3");
  EXPECT_EQ(events[0]["response"]["status"], "in_progress");
  EXPECT_EQ(events[2]["item"]["id"], "msg_sess_3");
  EXPECT_EQ(events[6]["text"], "Hi there");
  const Json& done = events[9]["response"];
  EXPECT_EQ(done["id"], "resp_sess_3");
  EXPECT_EQ(done["status"], "completed");
  EXPECT_EQ(done["previous_response_id"], "resp_sess_2");
  EXPECT_EQ(done["output"][0]["content"][0]["text"], "Hi there");
  EXPECT_EQ(done["usage"]["input_tokens"], 5);
  EXPECT_EQ(done["usage"]["input_tokens_details"]["cached_tokens"], 2);
  EXPECT_EQ(done["usage"]["total_tokens"], 7);
}

TEST(ResponsesStreamTest, FunctionCallsAndIncomplete) {
  ResponsesStream stream(Header(), /*tools=*/true);
  std::string bytes = stream.OnStart();
  bytes += stream.OnText(
      "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
      "{}<|tool_call_end|><|tool_calls_section_end|>");
  bytes += stream.OnFinish(kls::v1::FINISH_REASON_LENGTH, {});
  std::vector<std::string> types;
  const std::vector<Json> events = SseEvents(bytes, &types);
  const std::vector<std::string> expected = {"response.created",
                                             "response.in_progress",
                                             "response.output_item.added",
                                             "response.function_call_arguments.delta",
                                             "response.function_call_arguments.done",
                                             "response.output_item.done",
                                             "response.incomplete"};
  EXPECT_EQ(types, expected);
  EXPECT_EQ(events[2]["item"]["type"], "function_call");
  EXPECT_EQ(events[2]["output_index"], 0);
  EXPECT_EQ(events[5]["item"]["call_id"], "functions.f:0");
  EXPECT_EQ(events[5]["item"]["name"], "f");
  const Json& r = events[6]["response"];
  EXPECT_EQ(r["status"], "incomplete");
  EXPECT_EQ(r["incomplete_details"]["reason"], "max_output_tokens");
  ASSERT_EQ(r["output"].size(), 1u);
  EXPECT_EQ(r["output"][0]["type"], "function_call");
}

TEST(ResponsesStreamTest, ErrorEndsWithResponseFailed) {
  ResponsesStream stream(Header(), /*tools=*/false);
  std::string bytes = stream.OnStart() + stream.OnText("so far");
  bytes += stream.OnError(ErrorFromStatus(absl::InternalError("commit failed")));
  std::vector<std::string> types;
  const std::vector<Json> events = SseEvents(bytes, &types);
  ASSERT_EQ(types.back(), "response.failed");
  const Json& failed = events.back();
  EXPECT_EQ(failed["type"], "response.failed");
  EXPECT_EQ(failed["sequence_number"], events.size() - 1);
  EXPECT_EQ(failed["response"]["id"], "resp_sess_3");
  EXPECT_EQ(failed["response"]["status"], "failed");
  EXPECT_EQ(failed["response"]["error"]["code"], "server_error");
  EXPECT_EQ(failed["response"]["error"]["message"], "commit failed");
  EXPECT_TRUE(failed["response"]["usage"].is_null());
  ASSERT_EQ(failed["response"]["output"].size(), 1u);
  EXPECT_EQ(failed["response"]["output"][0]["status"], "incomplete");
  EXPECT_EQ(failed["response"]["output"][0]["content"][0]["text"], "so far");
  // Before any text: no output item.
  ResponsesStream early(Header(), /*tools=*/false);
  const std::vector<Json> early_events = SseEvents(
      early.OnStart() + early.OnError(ErrorFromStatus(absl::ResourceExhaustedError("busy"))));
  EXPECT_TRUE(early_events.back()["response"]["output"].empty());
  EXPECT_EQ(early_events.back()["response"]["error"]["code"], "rate_limit_exceeded");
}

TEST(ResponsesStreamTest, EmptyReplyStillHasAMessage) {
  ResponsesStream stream(Header(), /*tools=*/false);
  std::string bytes = stream.OnStart() + stream.OnFinish(kls::v1::FINISH_REASON_STOP, {});
  std::vector<std::string> types;
  const std::vector<Json> events = SseEvents(bytes, &types);
  ASSERT_EQ(types.size(), 8u);
  EXPECT_EQ(types[2], "response.output_item.added");
  EXPECT_EQ(events.back()["response"]["output"][0]["content"][0]["text"], "");
  // The non-streaming object has the same output.
  EXPECT_EQ(ResponseOutput("resp_sess_3", ParsedReply{}), events.back()["response"]["output"]);
}

}  // namespace
}  // namespace kls::router::openai

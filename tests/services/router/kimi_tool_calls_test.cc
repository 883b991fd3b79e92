// ParseKimiToolCalls, StreamableContentBytes and StreamingReply on Kimi's tool-call markers: one
// and several calls, content before the section, truncated sections, malformed calls, marker
// prefixes, and streamed replies cut into pieces of every size.
#include "services/router/kimi_tool_calls.h"

#include <gtest/gtest.h>

#include <string>
#include <utility>

namespace kls::router {
namespace {

std::string Call(const std::string& id, const std::string& args) {
  return "<|tool_call_begin|>" + id + "<|tool_call_argument_begin|>" + args + "<|tool_call_end|>";
}

std::string Section(const std::string& calls) {
  return "<|tool_calls_section_begin|>" + calls + "<|tool_calls_section_end|>";
}

TEST(KimiToolCallsTest, PlainTextHasNoCalls) {
  const ParsedReply reply = ParseKimiToolCalls("Hello <|im_user|> world");
  EXPECT_EQ(reply.content, "Hello <|im_user|> world");
  EXPECT_TRUE(reply.tool_calls.empty());
}

TEST(KimiToolCallsTest, OneCall) {
  const ParsedReply reply =
      ParseKimiToolCalls(Section(Call("functions.get_weather:0", R"({"city": "Paris"})")));
  EXPECT_EQ(reply.content, "");
  ASSERT_EQ(reply.tool_calls.size(), 1u);
  EXPECT_EQ(reply.tool_calls[0],
            (ParsedToolCall{"functions.get_weather:0", "get_weather", R"({"city": "Paris"})"}));
}

TEST(KimiToolCallsTest, ContentThenSeveralCallsWithWhitespace) {
  const std::string text = "Checking both.\n" +
                           Section("\n" + Call(" functions.a:0 ", " {\"x\":1} \n") + "\n" +
                                   Call("functions.b_c:1", "{}")) +
                           "trailing";
  const ParsedReply reply = ParseKimiToolCalls(text);
  EXPECT_EQ(reply.content, "Checking both.\n");
  ASSERT_EQ(reply.tool_calls.size(), 2u);
  EXPECT_EQ(reply.tool_calls[0], (ParsedToolCall{"functions.a:0", "a", "{\"x\":1}"}));
  EXPECT_EQ(reply.tool_calls[1], (ParsedToolCall{"functions.b_c:1", "b_c", "{}"}));
}

TEST(KimiToolCallsTest, IdWithoutNamespace) {
  const ParsedReply reply = ParseKimiToolCalls(Section(Call("search:3", "{}")));
  ASSERT_EQ(reply.tool_calls.size(), 1u);
  EXPECT_EQ(reply.tool_calls[0].name, "search");
}

// max_tokens can cut the section: complete calls survive, the partial one is dropped.
TEST(KimiToolCallsTest, TruncatedSectionKeepsCompleteCalls) {
  const std::string text = "<|tool_calls_section_begin|>" + Call("functions.f:0", "{}") +
                           "<|tool_call_begin|>functions.g:1<|tool_call_argument_begin|>{\"a\":";
  const ParsedReply reply = ParseKimiToolCalls(text);
  ASSERT_EQ(reply.tool_calls.size(), 1u);
  EXPECT_EQ(reply.tool_calls[0].name, "f");
  EXPECT_EQ(reply.content, "");
}

TEST(KimiToolCallsTest, MalformedCallsAreDroppedAndNothingIsLost) {
  // No argument marker, a bad id, and a call interrupted by the next begin marker.
  const std::string bad = Section("<|tool_call_begin|>functions.f:0{}<|tool_call_end|>" +
                                  Call("functions.f:x", "{}") + Call("not an id", "{}") +
                                  "<|tool_call_begin|>functions.h:0" + Call("functions.k:2", "[]"));
  const ParsedReply reply = ParseKimiToolCalls("text " + bad);
  ASSERT_EQ(reply.tool_calls.size(), 1u);
  EXPECT_EQ(reply.tool_calls[0].id, "functions.k:2");
  EXPECT_EQ(reply.content, "text ");

  // When no call parses, the whole text stays content.
  const std::string none = "say " + Section(Call("???", "{}"));
  const ParsedReply kept = ParseKimiToolCalls(none);
  EXPECT_TRUE(kept.tool_calls.empty());
  EXPECT_EQ(kept.content, none);
}

TEST(KimiToolCallsTest, ToolNameFromCallId) {
  EXPECT_EQ(ToolNameFromCallId("functions.get_weather:0"), "get_weather");
  EXPECT_EQ(ToolNameFromCallId("functions.a.b:12"), "a.b");
  EXPECT_EQ(ToolNameFromCallId("plain:1"), "plain");
  EXPECT_EQ(ToolNameFromCallId("functions.f"), "");
  EXPECT_EQ(ToolNameFromCallId("functions.f:"), "");
  EXPECT_EQ(ToolNameFromCallId("functions.f:1a"), "");
  EXPECT_EQ(ToolNameFromCallId(":1"), "");
  EXPECT_EQ(ToolNameFromCallId("two words:1"), "");
}

TEST(KimiToolCallsTest, StreamableContentHoldsBackMarkerPrefixes) {
  EXPECT_EQ(StreamableContentBytes(""), 0u);
  EXPECT_EQ(StreamableContentBytes("hello"), 5u);
  EXPECT_EQ(StreamableContentBytes("hello <"), 6u);
  EXPECT_EQ(StreamableContentBytes("hello <|tool_calls_sec"), 6u);
  EXPECT_EQ(StreamableContentBytes("hello <|im_user|>"), 17u);  // another marker: content
  EXPECT_EQ(StreamableContentBytes("ab<|tool_calls_section_begin|><|tool_call_begin|>"), 2u);
  // Every prefix of the marker is held back whole.
  const std::string marker = "<|tool_calls_section_begin|>";
  for (size_t n = 1; n < marker.size(); ++n) {
    EXPECT_EQ(StreamableContentBytes("x" + marker.substr(0, n)), 1u) << n;
  }
}

// Streams `text` in pieces of `step` bytes; returns the content sent (Append results, then the
// rest from Finish) and the final reply.
std::pair<std::string, ParsedReply> Stream(const std::string& text, bool tools, size_t step) {
  StreamingReply streaming(tools);
  std::string sent;
  for (size_t i = 0; i < text.size(); i += step) sent += streaming.Append(text.substr(i, step));
  std::string rest;
  ParsedReply reply = streaming.Finish(&rest);
  return {sent + rest, std::move(reply)};
}

TEST(StreamingReplyTest, EveryContentByteIsSentOnceInAnyPiecing) {
  const std::string calls = Section(Call("functions.f:0", "{}") + Call("functions.g:1", "[1]"));
  const std::string texts[] = {"",
                               "plain text",
                               "text <|tool_calls_sec",  // a marker prefix, no call follows
                               "before " + calls,
                               calls,
                               "x <|tool_calls_section_begin|><|tool_call_begin|>broken",
                               "a <|im_user|> b"};
  for (const std::string& text : texts) {
    for (bool tools : {false, true}) {
      for (size_t step : {size_t{1}, size_t{3}, size_t{7}, size_t{1000}}) {
        auto [sent, reply] = Stream(text, tools, step);
        EXPECT_EQ(reply.content, ParseReply(text, tools).content) << text;
        EXPECT_EQ(sent, reply.content) << text << " tools " << tools << " step " << step;
        EXPECT_EQ(reply.tool_calls.size(), ParseReply(text, tools).tool_calls.size()) << text;
      }
    }
  }
}

TEST(StreamingReplyTest, ContentStopsBeforeTheSectionWhileStreaming) {
  StreamingReply streaming(/*tools=*/true);
  EXPECT_EQ(streaming.Append("Sure. <|tool_calls_"), "Sure. ");
  EXPECT_EQ(streaming.Append("section_begin|><|tool_call_begin|>functions.f:0"), "");
  EXPECT_EQ(streaming.Append("<|tool_call_argument_begin|>{}<|tool_call_end|>"), "");
  std::string rest;
  const ParsedReply reply = streaming.Finish(&rest);
  EXPECT_EQ(rest, "");
  EXPECT_EQ(reply.content, "Sure. ");
  ASSERT_EQ(reply.tool_calls.size(), 1u);
  EXPECT_EQ(reply.tool_calls[0].name, "f");
  // Without tools the markers are text like any other.
  StreamingReply plain(/*tools=*/false);
  EXPECT_EQ(plain.Append("a <|tool_calls_"), "a <|tool_calls_");
  EXPECT_TRUE(ParseReply("<|tool_calls_section_begin|>", false).tool_calls.empty());
}

}  // namespace
}  // namespace kls::router

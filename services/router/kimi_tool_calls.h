// Kimi's tool calls in generated text (KIMI_LINEAR.md §7). A reply that calls tools ends with
//
//   <|tool_calls_section_begin|>
//   <|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city":"Paris"}
//   <|tool_call_end|> ... <|tool_calls_section_end|>
//
// where the markers are special tokens that the worker spells out when a turn asks for
// GenerateRequest.special_tokens_in_text. Pure functions; thread-compatible.
#ifndef KLS_SERVICES_ROUTER_KIMI_TOOL_CALLS_H_
#define KLS_SERVICES_ROUTER_KIMI_TOOL_CALLS_H_

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace kls::router {

inline constexpr std::string_view kToolCallsSectionBegin = "<|tool_calls_section_begin|>";
inline constexpr std::string_view kToolCallsSectionEnd = "<|tool_calls_section_end|>";
inline constexpr std::string_view kToolCallBegin = "<|tool_call_begin|>";
inline constexpr std::string_view kToolCallArgumentBegin = "<|tool_call_argument_begin|>";
inline constexpr std::string_view kToolCallEnd = "<|tool_call_end|>";

struct ParsedToolCall {
  std::string id;         // as generated, e.g. "functions.get_weather:0"
  std::string name;       // from the id: "get_weather"
  std::string arguments;  // the text between the markers, surrounding whitespace trimmed
  friend bool operator==(const ParsedToolCall&, const ParsedToolCall&) = default;
};

struct ParsedReply {
  std::string content;  // the text before the tool-call section (all of it when none parsed)
  std::vector<ParsedToolCall> tool_calls;
};

// Splits a reply into content and tool calls. Calls are read from the first section on (a
// missing section end, e.g. after max_tokens, ends the section at the end of the text); a call
// whose markers are incomplete or whose id is not "[functions.]name:index" is dropped. When no
// call survives, the whole text is content, so nothing the model wrote is lost. Never fails.
ParsedReply ParseKimiToolCalls(std::string_view text);

// How many leading bytes of a growing reply are content that can be streamed now: everything
// before the section marker, less a trailing piece that may still grow into the marker.
size_t StreamableContentBytes(std::string_view text);

// A finished reply: with `tools`, ParseKimiToolCalls; without, all of it is content (the worker
// spelled out no markers).
ParsedReply ParseReply(std::string_view text, bool tools);

// A reply as it streams in, for the event streams of both APIs: Append returns the content that
// can be sent now (with tools, content stops before the tool-call section and a possible partial
// marker is held back); Finish parses the whole reply and returns, in *rest, the content not yet
// returned (a held-back prefix when no call followed). Every byte of the final content is
// returned exactly once, in order. Thread-compatible.
class StreamingReply {
 public:
  explicit StreamingReply(bool tools) : tools_(tools) {}
  std::string Append(std::string_view delta);
  ParsedReply Finish(std::string* rest);

 private:
  const bool tools_;
  std::string text_;
  size_t sent_ = 0;  // bytes of text_ returned as content
};

// The function name in a Kimi tool-call id: "functions.get_weather:0" -> "get_weather" (the part
// before ":<digits>", without a "functions." prefix); empty when the id has no such form.
std::string ToolNameFromCallId(std::string_view id);

}  // namespace kls::router

#endif  // KLS_SERVICES_ROUTER_KIMI_TOOL_CALLS_H_

#include "services/router/kimi_tool_calls.h"

#include <algorithm>

#include "absl/strings/ascii.h"

namespace kls::router {
namespace {

std::string_view Trim(std::string_view s) {
  const absl::string_view t = absl::StripAsciiWhitespace(absl::string_view(s.data(), s.size()));
  return std::string_view(t.data(), t.size());
}

}  // namespace

std::string ToolNameFromCallId(std::string_view id) {
  const size_t colon = id.rfind(':');
  if (colon == std::string_view::npos || colon + 1 == id.size()) return "";
  for (size_t i = colon + 1; i < id.size(); ++i) {
    if (id[i] < '0' || id[i] > '9') return "";
  }
  std::string_view name = id.substr(0, colon);
  constexpr std::string_view kNamespace = "functions.";
  if (name.substr(0, kNamespace.size()) == kNamespace) name.remove_prefix(kNamespace.size());
  // Whitespace or markup in a name means the model did not write an id.
  for (char c : name) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c)) || c == '<' || c == '>') return "";
  }
  return std::string(name);
}

ParsedReply ParseKimiToolCalls(std::string_view text) {
  ParsedReply reply;
  const size_t section = text.find(kToolCallsSectionBegin);
  if (section == std::string_view::npos) {
    reply.content = std::string(text);
    return reply;
  }
  std::string_view body = text.substr(section + kToolCallsSectionBegin.size());
  if (const size_t end = body.find(kToolCallsSectionEnd); end != std::string_view::npos) {
    body = body.substr(0, end);
  }
  while (true) {
    const size_t begin = body.find(kToolCallBegin);
    if (begin == std::string_view::npos) break;
    body.remove_prefix(begin + kToolCallBegin.size());
    // The call ends at its end marker; a new begin marker first means this one is incomplete.
    const size_t end = body.find(kToolCallEnd);
    const size_t next = body.find(kToolCallBegin);
    if (end == std::string_view::npos) break;
    if (next != std::string_view::npos && next < end) continue;
    const std::string_view call = body.substr(0, end);
    body.remove_prefix(end + kToolCallEnd.size());
    const size_t args = call.find(kToolCallArgumentBegin);
    if (args == std::string_view::npos) continue;
    ParsedToolCall parsed;
    parsed.id = std::string(Trim(call.substr(0, args)));
    parsed.name = ToolNameFromCallId(parsed.id);
    if (parsed.name.empty()) continue;
    parsed.arguments = std::string(Trim(call.substr(args + kToolCallArgumentBegin.size())));
    reply.tool_calls.push_back(std::move(parsed));
  }
  reply.content = std::string(reply.tool_calls.empty() ? text : text.substr(0, section));
  return reply;
}

size_t StreamableContentBytes(std::string_view text) {
  const size_t section = text.find(kToolCallsSectionBegin);
  if (section != std::string_view::npos) return section;
  // Hold back the longest suffix that is a proper prefix of the marker.
  const size_t longest = std::min(text.size(), kToolCallsSectionBegin.size() - 1);
  for (size_t len = longest; len > 0; --len) {
    if (text.substr(text.size() - len) == kToolCallsSectionBegin.substr(0, len)) {
      return text.size() - len;
    }
  }
  return text.size();
}

ParsedReply ParseReply(std::string_view text, bool tools) {
  if (tools) return ParseKimiToolCalls(text);
  ParsedReply reply;
  reply.content = std::string(text);
  return reply;
}

std::string StreamingReply::Append(std::string_view delta) {
  text_.append(delta);
  const size_t ready = tools_ ? StreamableContentBytes(text_) : text_.size();
  if (ready <= sent_) return "";
  std::string out = text_.substr(sent_, ready - sent_);
  sent_ = ready;
  return out;
}

ParsedReply StreamingReply::Finish(std::string* rest) {
  ParsedReply reply = ParseReply(text_, tools_);
  // The content is a prefix of the text that covers what was sent (the sent part stops before
  // the section marker, and without calls the content is the whole text).
  rest->assign(reply.content.size() > sent_ ? reply.content.substr(sent_) : "");
  sent_ = std::max(sent_, reply.content.size());
  return reply;
}

}  // namespace kls::router

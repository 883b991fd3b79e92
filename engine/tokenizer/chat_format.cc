#include "engine/tokenizer/chat_format.h"

#include <optional>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kls::engine {
namespace {

struct Markers {
  int32_t im_system;
  int32_t im_user;
  int32_t im_assistant;
  int32_t im_middle;
  int32_t im_end;
};

absl::StatusOr<int32_t> RequireSpecial(const Tokenizer& tokenizer, const char* name) {
  const std::optional<int32_t> id = tokenizer.SpecialTokenId(name);
  if (!id.has_value()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the tokenizer has no special token ", name, " needed by the chat format"));
  }
  return *id;
}

absl::StatusOr<Markers> LookUpMarkers(const Tokenizer& tokenizer) {
  Markers m;
  KLS_ASSIGN_OR_RETURN(m.im_system, RequireSpecial(tokenizer, "<|im_system|>"));
  KLS_ASSIGN_OR_RETURN(m.im_user, RequireSpecial(tokenizer, "<|im_user|>"));
  KLS_ASSIGN_OR_RETURN(m.im_assistant, RequireSpecial(tokenizer, "<|im_assistant|>"));
  KLS_ASSIGN_OR_RETURN(m.im_middle, RequireSpecial(tokenizer, "<|im_middle|>"));
  KLS_ASSIGN_OR_RETURN(m.im_end, RequireSpecial(tokenizer, "<|im_end|>"));
  return m;
}

struct ToolMarkers {
  int32_t section_begin;
  int32_t section_end;
  int32_t call_begin;
  int32_t argument_begin;
  int32_t call_end;
};

absl::StatusOr<ToolMarkers> LookUpToolMarkers(const Tokenizer& tokenizer) {
  ToolMarkers t;
  KLS_ASSIGN_OR_RETURN(t.section_begin, RequireSpecial(tokenizer, "<|tool_calls_section_begin|>"));
  KLS_ASSIGN_OR_RETURN(t.section_end, RequireSpecial(tokenizer, "<|tool_calls_section_end|>"));
  KLS_ASSIGN_OR_RETURN(t.call_begin, RequireSpecial(tokenizer, "<|tool_call_begin|>"));
  KLS_ASSIGN_OR_RETURN(t.argument_begin, RequireSpecial(tokenizer, "<|tool_call_argument_begin|>"));
  KLS_ASSIGN_OR_RETURN(t.call_end, RequireSpecial(tokenizer, "<|tool_call_end|>"));
  return t;
}

// Encodes plain text onto *out; errors name the message and field.
absl::Status AppendText(const Tokenizer& tokenizer, std::string_view text, size_t index,
                        const char* field, std::vector<int32_t>* out) {
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(text);
  if (!ids.ok()) {
    return absl::Status(ids.status().code(),
                        absl::StrCat("message ", index, " ", field, ": ", ids.status().message()));
  }
  out->insert(out->end(), ids->begin(), ids->end());
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<int32_t>> RenderChat(const Tokenizer& tokenizer,
                                                std::span<const ChatMessage> messages,
                                                bool add_generation_prompt) {
  KLS_ASSIGN_OR_RETURN(const Markers m, LookUpMarkers(tokenizer));
  std::vector<int32_t> ids;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& msg = messages[i];
    int32_t opener;
    std::string_view header;
    if (msg.role == "system") {
      opener = m.im_system;
      header = "system";
    } else if (msg.role == "user") {
      opener = m.im_user;
      header = "user";
    } else if (msg.role == "assistant") {
      opener = m.im_assistant;
      header = "assistant";
    } else if (msg.role == "tool") {
      opener = m.im_system;
      header = msg.name.empty() ? std::string_view("tool") : std::string_view(msg.name);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("message ", i, ": unknown role '", msg.role.substr(0, 40),
                       "' (expected system, user, assistant or tool)"));
    }
    ids.push_back(opener);
    KLS_RETURN_IF_ERROR(AppendText(tokenizer, header, i, "role/name", &ids));
    ids.push_back(m.im_middle);
    KLS_RETURN_IF_ERROR(AppendText(tokenizer, msg.content, i, "content", &ids));
    if (!msg.tool_calls.empty()) {
      if (msg.role != "assistant") {
        return absl::InvalidArgumentError(absl::StrCat(
            "message ", i, ": only assistant messages carry tool calls, not '", msg.role, "'"));
      }
      KLS_ASSIGN_OR_RETURN(const ToolMarkers t, LookUpToolMarkers(tokenizer));
      ids.push_back(t.section_begin);
      for (const ChatToolCall& call : msg.tool_calls) {
        ids.push_back(t.call_begin);
        KLS_RETURN_IF_ERROR(AppendText(tokenizer, call.id, i, "tool call id", &ids));
        ids.push_back(t.argument_begin);
        KLS_RETURN_IF_ERROR(AppendText(tokenizer, call.arguments, i, "tool call arguments", &ids));
        ids.push_back(t.call_end);
      }
      ids.push_back(t.section_end);
    }
    ids.push_back(m.im_end);
  }
  if (add_generation_prompt) {
    ids.push_back(m.im_assistant);
    KLS_RETURN_IF_ERROR(
        AppendText(tokenizer, "assistant", messages.size(), "generation prompt", &ids));
    ids.push_back(m.im_middle);
  }
  return ids;
}

}  // namespace kls::engine

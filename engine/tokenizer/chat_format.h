// The Kimi (K2-family) chat format, rendered straight to token ids (KIMI_LINEAR.md §7).
#ifndef KLS_ENGINE_TOKENIZER_CHAT_FORMAT_H_
#define KLS_ENGINE_TOKENIZER_CHAT_FORMAT_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/tokenizer/tokenizer.h"

namespace kls::engine {

struct ChatToolCall {
  std::string id;         // Kimi's form is "functions.<name>:<index>"
  std::string arguments;  // JSON text
};

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" or "tool"
  std::string content;
  std::string name;                           // tool name for role "tool"; empty means "tool"
  std::vector<ChatToolCall> tool_calls = {};  // role "assistant" only
};

// K2-family chat templates insert a default system prompt when the conversation has none, but the
// exact Kimi-Linear chat_template.jinja is unverified (KIMI_LINEAR.md §11). So RenderChat renders
// exactly the given messages, and callers add a system message when they want one.

// Renders `messages` as
//   system:    <|im_system|>system<|im_middle|>{content}<|im_end|>
//   user:      <|im_user|>user<|im_middle|>{content}<|im_end|>
//   assistant: <|im_assistant|>assistant<|im_middle|>{content}<|im_end|>
//   tool:      <|im_system|>{name or "tool"}<|im_middle|>{content}<|im_end|>
// An assistant message with tool calls has, between its content and <|im_end|>,
//   <|tool_calls_section_begin|>
//   <|tool_call_begin|>{id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>  (each call)
//   <|tool_calls_section_end|>
// (the K2 template; tool declarations are a message {role "tool", name "tool_declare", content
// the tools' JSON}, which renders as K2's <|im_system|>tool_declare<|im_middle|>...). Then,, if
// add_generation_prompt, by <|im_assistant|>assistant<|im_middle|>. Role words, names and contents
// are encoded as plain text (special-token strings in them stay text); the markers come from their
// ids. No [BOS], no default system prompt. INVALID_ARGUMENT (naming the message index) on an
// unknown role, tool calls on a message that is not the assistant's, or invalid UTF-8;
// FAILED_PRECONDITION if the tokenizer lacks a marker that the messages need.
absl::StatusOr<std::vector<int32_t>> RenderChat(const Tokenizer& tokenizer,
                                                std::span<const ChatMessage> messages,
                                                bool add_generation_prompt);

}  // namespace kls::engine

#endif  // KLS_ENGINE_TOKENIZER_CHAT_FORMAT_H_

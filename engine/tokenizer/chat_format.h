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

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" or "tool"
  std::string content;
  std::string name;  // tool name for role "tool"; empty means "tool"
};

// K2-family chat templates insert a default system prompt when the conversation has none, but the
// exact Kimi-Linear chat_template.jinja is unverified (KIMI_LINEAR.md §11). So RenderChat renders
// exactly the given messages, and callers add a system message when they want one.

// Renders `messages` as
//   system:    <|im_system|>system<|im_middle|>{content}<|im_end|>
//   user:      <|im_user|>user<|im_middle|>{content}<|im_end|>
//   assistant: <|im_assistant|>assistant<|im_middle|>{content}<|im_end|>
//   tool:      <|im_system|>{name or "tool"}<|im_middle|>{content}<|im_end|>
// followed, if add_generation_prompt, by <|im_assistant|>assistant<|im_middle|>. Role words, names
// and contents are encoded as plain text (special-token strings in them stay text); the markers
// come from their ids. No [BOS], no default system prompt. INVALID_ARGUMENT (naming the message
// index) on an unknown role or invalid UTF-8; FAILED_PRECONDITION if the tokenizer lacks a marker.
absl::StatusOr<std::vector<int32_t>> RenderChat(const Tokenizer& tokenizer,
                                                std::span<const ChatMessage> messages,
                                                bool add_generation_prompt);

}  // namespace kls::engine

#endif  // KLS_ENGINE_TOKENIZER_CHAT_FORMAT_H_

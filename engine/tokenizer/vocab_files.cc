#include "engine/tokenizer/vocab_files.h"

#include <array>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace kls::engine {
namespace {

// Named Kimi-K2 special tokens by offset from num_ranks (KIMI_LINEAR.md §7).
constexpr std::pair<int, std::string_view> kNamedSpecials[] = {
    {0, "[BOS]"},
    {1, "[EOS]"},
    {2, "<|im_end|>"},
    {3, "<|im_user|>"},
    {4, "<|im_assistant|>"},
    {6, "<|start_header_id|>"},
    {7, "<|end_header_id|>"},
    {9, "[EOT]"},
    {10, "<|im_system|>"},
    {11, "<|tool_calls_section_begin|>"},
    {12, "<|tool_calls_section_end|>"},
    {13, "<|tool_call_begin|>"},
    {14, "<|tool_call_argument_begin|>"},
    {15, "<|tool_call_end|>"},
    {17, "<|im_middle|>"},
    {18, "<|media_begin|>"},
    {19, "<|media_content|>"},
    {20, "<|media_end|>"},
    {21, "<|media_pad|>"},
    {22, "<think>"},
    {23, "</think>"},
    {254, "[UNK]"},
    {255, "[PAD]"},
};

}  // namespace

std::string MakeByteLevelTiktokenModel() {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve(256 * 8);
  for (int b = 0; b < 256; ++b) {
    // One byte is two base64 digits and "==".
    out.push_back(kAlphabet[b >> 2]);
    out.push_back(kAlphabet[(b & 3) << 4]);
    absl::StrAppend(&out, "== ", b, "\n");
  }
  return out;
}

std::string MakeKimiTokenizerConfigJson(int64_t num_ranks) {
  std::array<std::string, kNumSpecialTokenSlots> names;
  for (int s = 0; s < kNumSpecialTokenSlots; ++s) {
    names[static_cast<size_t>(s)] = absl::StrCat("<|reserved_token_", num_ranks + s, "|>");
  }
  for (const auto& [offset, name] : kNamedSpecials) {
    names[static_cast<size_t>(offset)] = std::string(name);
  }
  nlohmann::ordered_json added = nlohmann::ordered_json::object();
  for (int s = 0; s < kNumSpecialTokenSlots; ++s) {
    added[std::to_string(num_ranks + s)] = {{"content", names[static_cast<size_t>(s)]},
                                            {"lstrip", false},
                                            {"normalized", false},
                                            {"rstrip", false},
                                            {"single_word", false},
                                            {"special", true}};
  }
  nlohmann::ordered_json config = {
      {"added_tokens_decoder", std::move(added)},
      {"bos_token", "[BOS]"},
      {"eos_token", "[EOS]"},
      {"unk_token", "[UNK]"},
      {"pad_token", "[PAD]"},
      {"clean_up_tokenization_spaces", false},
      {"tokenizer_class", "TikTokenTokenizer"},
  };
  // All strings are ASCII; `replace` only keeps dump() from ever throwing.
  return config.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
}

}  // namespace kls::engine

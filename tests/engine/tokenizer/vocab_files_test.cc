// vocab_files: the byte-level tiktoken.model and the Kimi tokenizer_config.json table.
#include "engine/tokenizer/vocab_files.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace kls::engine {
namespace {

TEST(VocabFilesTest, ByteLevelModelHas256ByteTokens) {
  const std::string model = MakeByteLevelTiktokenModel();
  EXPECT_EQ(std::count(model.begin(), model.end(), '\n'), 256);
  EXPECT_EQ(model.substr(0, 7), "AA== 0\n");
  EXPECT_NE(model.find("QQ== 65\n"), std::string::npos);
  EXPECT_NE(model.find("/w== 255\n"), std::string::npos);
  auto tok = Tokenizer::FromContents(model, MakeKimiTokenizerConfigJson(256));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->num_ranks(), 256);
  EXPECT_EQ((*tok)->vocab_size(), 512);
  for (int b = 0; b < 256; ++b) {
    EXPECT_EQ(*(*tok)->TokenBytes(b), std::string(1, static_cast<char>(b)));
  }
  auto ids = (*tok)->Encode("h\xC3\xA9llo");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, (std::vector<int32_t>{'h', 0xC3, 0xA9, 'l', 'l', 'o'}));
}

TEST(VocabFilesTest, KimiConfigPlacesNamedSpecialsAtTheRealOffsets) {
  const struct {
    int offset;
    const char* name;
  } kTable[] = {{0, "[BOS]"},
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
                {255, "[PAD]"}};
  for (const int64_t n : {int64_t{256}, int64_t{163584}}) {
    const nlohmann::json config =
        nlohmann::json::parse(MakeKimiTokenizerConfigJson(n), nullptr, false);
    ASSERT_TRUE(config.is_object());
    const nlohmann::json& added = config["added_tokens_decoder"];
    ASSERT_EQ(added.size(), 256u);
    std::vector<std::string> names(256);
    for (int s = 0; s < 256; ++s) {
      names[static_cast<size_t>(s)] = "<|reserved_token_" + std::to_string(n + s) + "|>";
    }
    for (const auto& e : kTable) names[static_cast<size_t>(e.offset)] = e.name;
    for (int s = 0; s < 256; ++s) {
      const std::string key = std::to_string(n + s);
      ASSERT_TRUE(added.contains(key)) << key;
      EXPECT_EQ(added[key].value("content", ""), names[static_cast<size_t>(s)]) << key;
      EXPECT_EQ(added[key].value("special", false), true);
    }
    EXPECT_EQ(config.value("bos_token", ""), "[BOS]");
    EXPECT_EQ(config.value("eos_token", ""), "[EOS]");
  }
  // The real model's ids (KIMI_LINEAR.md §7).
  const nlohmann::json real =
      nlohmann::json::parse(MakeKimiTokenizerConfigJson(163584), nullptr, false);
  EXPECT_EQ(real["added_tokens_decoder"]["163584"]["content"], "[BOS]");
  EXPECT_EQ(real["added_tokens_decoder"]["163586"]["content"], "<|im_end|>");
  EXPECT_EQ(real["added_tokens_decoder"]["163601"]["content"], "<|im_middle|>");
  EXPECT_EQ(real["added_tokens_decoder"]["163607"]["content"], "</think>");
  EXPECT_EQ(real["added_tokens_decoder"]["163839"]["content"], "[PAD]");
}

TEST(VocabFilesTest, ByteLevelTokenizerResolvesChatMarkers) {
  auto tok =
      Tokenizer::FromContents(MakeByteLevelTiktokenModel(), MakeKimiTokenizerConfigJson(256));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), 256);
  EXPECT_EQ((*tok)->eos_id(), 257);
  EXPECT_EQ((*tok)->SpecialTokenId("<|im_end|>"), 258);
  EXPECT_EQ((*tok)->SpecialTokenId("<|im_system|>"), 266);
  EXPECT_EQ((*tok)->SpecialTokenId("<|im_middle|>"), 273);
  EXPECT_EQ((*tok)->SpecialTokenId("[PAD]"), 511);
  EXPECT_EQ((*tok)->SpecialTokenId("<|reserved_token_261|>"), 261);
}

}  // namespace
}  // namespace kls::engine

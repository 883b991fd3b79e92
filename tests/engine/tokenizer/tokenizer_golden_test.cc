// Goldens from tiktoken 0.14.0 with the original K2 pat_str (scripts/gen_tokenizer_goldens.py):
// every case must encode to exactly the recorded ids, and the chat rendering must equal the
// reference's encoding of the template text with special tokens allowed.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "common/file_util.h"
#include "engine/tokenizer/chat_format.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/vocab_files.h"
#include "nlohmann/json.hpp"

namespace kls::engine {
namespace {

std::string TestDataDir() {
  if (const char* src = std::getenv("KLS_SOURCE_DIR"); src != nullptr) {
    return std::string(src) + "/tests/engine/tokenizer/testdata";
  }
  return (std::filesystem::path(__FILE__).parent_path() / "testdata").string();
}

class TokenizerGoldenTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto tok = Tokenizer::Load(TestDataDir());
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = std::move(*tok);
    auto text = ReadFileToString(TestDataDir() + "/goldens.json");
    ASSERT_TRUE(text.ok()) << text.status();
    goldens_ = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
    ASSERT_FALSE(goldens_.is_discarded());
    ASSERT_TRUE(goldens_.is_object());
  }

  std::unique_ptr<Tokenizer> tok_;
  nlohmann::json goldens_;
};

TEST_F(TokenizerGoldenTest, PatternAndVocabularyMatchTheGenerator) {
  EXPECT_EQ(goldens_.value("pat_str", ""), kKimiPatternTiktoken);
  EXPECT_EQ(goldens_.value("num_ranks", int64_t{-1}), tok_->num_ranks());
}

TEST_F(TokenizerGoldenTest, EncodesLikeTiktoken) {
  const nlohmann::json& cases = goldens_["cases"];
  ASSERT_TRUE(cases.is_array());
  ASSERT_GE(cases.size(), 400u);
  int checked = 0;
  for (const nlohmann::json& c : cases) {
    const std::string name = c.value("name", "?");
    std::string text;
    if (c.contains("text")) {
      text = c["text"].get<std::string>();
    } else {
      ASSERT_TRUE(c.contains("repeat")) << name;
      for (const auto& part : c["repeat"]) {
        const std::string unit = part[0].get<std::string>();
        for (int64_t k = 0; k < part[1].get<int64_t>(); ++k) text += unit;
      }
    }
    std::vector<int32_t> expected;
    if (c.contains("ids")) {
      expected = c["ids"].get<std::vector<int32_t>>();
    } else {
      ASSERT_TRUE(c.contains("ids_rle")) << name;
      for (const auto& run : c["ids_rle"]) {
        expected.insert(expected.end(), run[1].get<size_t>(), run[0].get<int32_t>());
      }
    }
    auto ids = tok_->Encode(text);
    ASSERT_TRUE(ids.ok()) << name << ": " << ids.status();
    EXPECT_EQ(*ids, expected) << "case " << name << " text '" << text.substr(0, 200) << "'";
    auto back = tok_->Decode(expected);
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, text) << name;
    ++checked;
  }
  EXPECT_EQ(checked, static_cast<int>(cases.size()));
}

TEST_F(TokenizerGoldenTest, RendersChatLikeTheReference) {
  const nlohmann::json& chat = goldens_["chat"];
  ASSERT_TRUE(chat.is_object());
  std::vector<ChatMessage> messages;
  for (const auto& m : chat["messages"]) {
    messages.push_back({m.value("role", ""), m.value("content", ""), m.value("name", "")});
  }
  ASSERT_EQ(messages.size(), 5u);
  auto ids = RenderChat(*tok_, messages, chat.value("add_generation_prompt", false));
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, chat["ids"].get<std::vector<int32_t>>());
}

// The generator's special table and MakeKimiTokenizerConfigJson agree slot for slot.
TEST_F(TokenizerGoldenTest, GeneratorSpecialTableMatchesVocabFiles) {
  auto model = ReadFileToString(TestDataDir() + "/tiktoken.model");
  ASSERT_TRUE(model.ok());
  auto ours = Tokenizer::FromContents(*model, MakeKimiTokenizerConfigJson(tok_->num_ranks()));
  ASSERT_TRUE(ours.ok()) << ours.status();
  for (int32_t id = static_cast<int32_t>(tok_->num_ranks()); id < tok_->vocab_size(); ++id) {
    EXPECT_EQ(*(*ours)->TokenBytes(id), *tok_->TokenBytes(id)) << id;
  }
  EXPECT_EQ((*ours)->bos_id(), tok_->bos_id());
  EXPECT_EQ((*ours)->eos_id(), tok_->eos_id());
}

}  // namespace
}  // namespace kls::engine

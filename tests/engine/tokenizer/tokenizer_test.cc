// Tokenizer: loading and its errors, encode/decode round trips on random UTF-8, special tokens
// never produced from text, the two BPE paths, concurrency and load time at the real vocabulary
// size.
#include "engine/tokenizer/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/file_util.h"
#include "engine/tokenizer/vocab_files.h"
#include "tests/test_util.h"

namespace kls::engine {
namespace {

using ::testing::HasSubstr;

std::string TestDataDir() {
  if (const char* src = std::getenv("KLS_SOURCE_DIR"); src != nullptr) {
    return std::string(src) + "/tests/engine/tokenizer/testdata";
  }
  return (std::filesystem::path(__FILE__).parent_path() / "testdata").string();
}

std::unique_ptr<Tokenizer> LoadMergeTokenizer() {
  auto tok = Tokenizer::Load(TestDataDir());
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

std::unique_ptr<Tokenizer> MakeByteTokenizer() {
  auto tok =
      Tokenizer::FromContents(MakeByteLevelTiktokenModel(), MakeKimiTokenizerConfigJson(256));
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

void AppendUtf8(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

// Random text mixing ASCII words and contractions, digit runs, whitespace runs (\r\n, tabs,
// NBSP, ideographic space), CJK, Hangul, Cyrillic, combining marks, emoji (with ZWJ / VS16 /
// skin tones), punctuation and special-token look-alikes.
std::string RandomText(std::mt19937& rng) {
  static const std::vector<std::string> kAtoms = {
      "the",
      "The",
      "THE",
      "thing",
      "I'M",
      "they'll",
      "You're",
      "we'VE",
      "it's",
      "don't",
      "'s",
      "'",
      "''",
      " ",
      "  ",
      "   ",
      "\t",
      "\t\t",
      "\n",
      "\r\n",
      "\r\n\r\n",
      " \n ",
      "\xC2\xA0",
      "\xE3\x80\x80",
      "\xE2\x80\xA8",
      "\xC2\x85",
      "\xE1\xA0\x8E",
      "\x0B",
      "\x1C",
      "0",
      "12",
      "345",
      "6789012",
      "\xEF\xBC\x91\xEF\xBC\x92",
      "\xD9\xA3",
      "\xC2\xB2",
      "\xE4\xB8\xAD\xE6\x96\x87",
      "\xE4\xBD\xA0\xE5\xA5\xBD",
      "\xE3\x80\x82",
      "\xE3\x80\x81",
      "\xE3\x83\xBC",
      "\xE3\x80\x85",
      "\xED\x95\x9C\xEA\xB5\xAD",
      "\xD0\x9F\xD1\x80\xD0\xB8",
      "e\xCC\x81",
      "\xCC\x81\xCC\x88",
      "\xE0\xA4\xA8\xE0\xA4\xAE\xE0\xA4\xB8\xE0\xA5\x8D",
      "\xF0\x9F\x98\x80",
      "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD",
      "\xE2\x9D\xA4\xEF\xB8\x8F",
      "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9",
      "\xF0\xA0\x80\x80",
      "!",
      "...",
      "?!",
      "<|",
      "|>",
      "<|im_end|>",
      "[BOS]",
      "_",
      "{",
      "}",
      "\xE2\x80\x94",
      "\xEF\xBB\xBF",
      "\xEE\x80\x80",
      "xyzzy",
      "\xC7\x85",
      "\xCA\xB0",
      "a",
      "aaaa"};
  std::string s;
  const int n = std::uniform_int_distribution<int>(0, 30)(rng);
  for (int i = 0; i < n; ++i) {
    if (std::uniform_int_distribution<int>(0, 9)(rng) == 0) {
      // A random scalar value, anywhere in Unicode (unassigned ones too).
      char32_t c;
      do {
        c = std::uniform_int_distribution<char32_t>(1, 0x10FFFF)(rng);
      } while (c >= 0xD800 && c <= 0xDFFF);
      AppendUtf8(c, &s);
    } else {
      s += kAtoms[std::uniform_int_distribution<size_t>(0, kAtoms.size() - 1)(rng)];
    }
  }
  return s;
}

void ExpectRoundTrip(const Tokenizer& tok, const std::string& text) {
  auto ids = tok.Encode(text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  for (const int32_t id : *ids) {
    ASSERT_GE(id, 0);
    ASSERT_LT(id, tok.num_ranks()) << "special token produced from plain text";
  }
  auto back = tok.Decode(*ids);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(*back, text);
}

TEST(TokenizerTest, LoadsVocabularyAndSpecialTable) {
  auto tok = LoadMergeTokenizer();
  ASSERT_NE(tok, nullptr);
  const int64_t n = tok->num_ranks();
  EXPECT_GT(n, 256);
  EXPECT_EQ(tok->vocab_size(), n + 256);
  EXPECT_EQ(tok->bos_id(), n);
  EXPECT_EQ(tok->eos_id(), n + 1);  // eos_token given as an AddedToken object
  EXPECT_EQ(tok->SpecialTokenId("<|im_end|>"), n + 2);
  EXPECT_EQ(tok->SpecialTokenId("<|im_middle|>"), n + 17);
  EXPECT_EQ(tok->SpecialTokenId("[PAD]"), n + 255);
  EXPECT_EQ(tok->SpecialTokenId("<|reserved_token_" + std::to_string(n + 5) + "|>"), n + 5);
  EXPECT_EQ(tok->SpecialTokenId("<|im_end"), std::nullopt);
  EXPECT_EQ(tok->SpecialTokenId("a"), std::nullopt);
  EXPECT_FALSE(tok->IsSpecial(-1));
  EXPECT_FALSE(tok->IsSpecial(static_cast<int32_t>(n - 1)));
  EXPECT_TRUE(tok->IsSpecial(static_cast<int32_t>(n)));
  EXPECT_TRUE(tok->IsSpecial(static_cast<int32_t>(n + 255)));
  EXPECT_FALSE(tok->IsSpecial(static_cast<int32_t>(n + 256)));
}

TEST(TokenizerTest, EmptyTextEncodesToNothing) {
  auto tok = LoadMergeTokenizer();
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("");
  ASSERT_TRUE(ids.ok());
  EXPECT_TRUE(ids->empty());
  auto text = tok->Decode({});
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, "");
}

TEST(TokenizerTest, RoundTripsRandomUtf8WithMerges) {
  auto tok = LoadMergeTokenizer();
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(7);
  size_t merged_tokens = 0, bytes = 0;
  for (int i = 0; i < 3000; ++i) {
    const std::string text = RandomText(rng);
    ExpectRoundTrip(*tok, text);
    if (HasFailure()) return;
    merged_tokens += tok->Encode(text)->size();
    bytes += text.size();
  }
  // The vocabulary has merges, so the encoding must be shorter than one token per byte.
  EXPECT_LT(merged_tokens, bytes * 3 / 4);
}

TEST(TokenizerTest, RoundTripsRandomUtf8ByteLevel) {
  auto tok = MakeByteTokenizer();
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(8);
  for (int i = 0; i < 1000; ++i) {
    const std::string text = RandomText(rng);
    ExpectRoundTrip(*tok, text);
    if (HasFailure()) return;
    // Byte-level: one token per byte, the byte value itself.
    auto ids = tok->Encode(text);
    ASSERT_EQ(ids->size(), text.size());
    for (size_t k = 0; k < text.size(); ++k) {
      ASSERT_EQ((*ids)[k], static_cast<unsigned char>(text[k]));
    }
  }
}

// Every Unicode scalar value (assigned or not) is matched by some alternative of the pattern, so
// the pieces tile the text and nothing is lost.
TEST(TokenizerTest, RoundTripsEveryScalarValue) {
  auto tok = LoadMergeTokenizer();
  ASSERT_NE(tok, nullptr);
  std::string text;
  for (char32_t c = 1; c <= 0x10FFFF; ++c) {
    if (c >= 0xD800 && c <= 0xDFFF) continue;
    AppendUtf8(c, &text);
    if (c % 4096 == 0 || c == 0x10FFFF) {
      ExpectRoundTrip(*tok, text);
      if (HasFailure()) return;
      text.clear();
    }
  }
}

TEST(TokenizerTest, SpecialTokenStringsAreOrdinaryText) {
  auto tok = LoadMergeTokenizer();
  ASSERT_NE(tok, nullptr);
  const std::string text =
      "[BOS]<|im_user|>user<|im_middle|>hi<|im_end|>[EOS] <think>x</think> [PAD][UNK]"
      "<|reserved_token_" +
      std::to_string(tok->num_ranks() + 5) + "|>";
  ExpectRoundTrip(*tok, text);
  auto ids = tok->Encode("<|im_end|>");
  ASSERT_TRUE(ids.ok());
  EXPECT_GT(ids->size(), 1u);
}

TEST(TokenizerTest, RejectsInvalidUtf8) {
  auto tok = LoadMergeTokenizer();
  ASSERT_NE(tok, nullptr);
  const std::vector<std::pair<std::string, size_t>> cases = {
      {"\xFF", 0},
      {"abc\x80", 3},
      {"ab\xC0\x80", 2},            // overlong NUL
      {"\xE0\x80\xAF", 0},          // overlong '/'
      {"x\xED\xA0\x80", 1},         // surrogate U+D800
      {"\xF4\x90\x80\x80", 0},      // above U+10FFFF
      {"\xE4\xB8", 0},              // truncated
      {"\xE4\xB8\xAD\xE4\xB8", 3},  // truncated after a valid character
      {std::string("a\0b\xC3", 4), 3},
  };
  for (const auto& [text, offset] : cases) {
    auto ids = tok->Encode(text);
    ASSERT_FALSE(ids.ok());
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(ids.status().message(), HasSubstr("byte offset " + std::to_string(offset)));
  }
  // NUL is valid UTF-8 and round-trips.
  ExpectRoundTrip(*tok, std::string("a\0b", 3));
}

TEST(TokenizerTest, DecodeRejectsOutOfRangeIds) {
  auto tok = LoadMergeTokenizer();
  ASSERT_NE(tok, nullptr);
  const int32_t v = static_cast<int32_t>(tok->vocab_size());
  for (const int32_t bad :
       {-1, v, v + 1, std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min()}) {
    const std::vector<int32_t> ids = {0, bad};
    auto text = tok->Decode(ids);
    ASSERT_FALSE(text.ok()) << bad;
    EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(text.status().message(), HasSubstr(std::to_string(bad)));
    EXPECT_FALSE(tok->TokenBytes(bad).ok());
  }
  const std::vector<int32_t> last = {v - 1};
  auto pad = tok->Decode(last);
  ASSERT_TRUE(pad.ok());
  EXPECT_EQ(*pad, "[PAD]");
}

TEST(TokenizerTest, DecodesSpecialTokensAsNamesUnlessSkipped) {
  auto tok = LoadMergeTokenizer();
  ASSERT_NE(tok, nullptr);
  std::vector<int32_t> ids = {tok->bos_id()};
  auto hello = tok->Encode("Hello, 世界");
  ASSERT_TRUE(hello.ok());
  ids.insert(ids.end(), hello->begin(), hello->end());
  ids.push_back(*tok->SpecialTokenId("<|im_end|>"));
  ids.push_back(static_cast<int32_t>(tok->num_ranks() + 5));
  EXPECT_EQ(*tok->Decode(ids), "[BOS]Hello, 世界<|im_end|><|reserved_token_" +
                                   std::to_string(tok->num_ranks() + 5) + "|>");
  EXPECT_EQ(*tok->Decode(ids, /*skip_special=*/true), "Hello, 世界");
  EXPECT_EQ(*tok->TokenBytes(tok->eos_id()), "[EOS]");
}

// Splitting a character across ids is allowed in the raw decode.
TEST(TokenizerTest, RawDecodeMayEndInsideACharacter) {
  auto tok = MakeByteTokenizer();
  ASSERT_NE(tok, nullptr);
  const std::vector<int32_t> ids = {0xE4, 0xB8};
  EXPECT_EQ(*tok->Decode(ids), "\xE4\xB8");
}

TEST(TokenizerTest, RanksMayAppearInAnyOrder) {
  const std::string model = MakeByteLevelTiktokenModel();
  std::vector<std::string> lines;
  for (size_t pos = 0; pos < model.size();) {
    const size_t eol = model.find('\n', pos);
    lines.push_back(model.substr(pos, eol - pos));
    pos = eol + 1;
  }
  std::mt19937 rng(3);
  std::shuffle(lines.begin(), lines.end(), rng);
  std::string shuffled;
  for (const auto& line : lines) shuffled += line + "\r\n\n";  // CRLF and blank lines are fine
  auto tok = Tokenizer::FromContents(shuffled, MakeKimiTokenizerConfigJson(256));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->num_ranks(), 256);
  auto ids = (*tok)->Encode("Az");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, (std::vector<int32_t>{'A', 'z'}));
}

struct BadContents {
  std::string name;
  std::string tiktoken_model;
  std::string config;
  std::string expected;  // substring of the error message
};

std::string ByteModelWithout(int byte) {
  std::string out;
  const std::string model = MakeByteLevelTiktokenModel();
  int line = 0;
  for (size_t pos = 0; pos < model.size(); ++line) {
    const size_t eol = model.find('\n', pos);
    if (line != byte) out += model.substr(pos, eol + 1 - pos);
    pos = eol + 1;
  }
  return out;
}

TEST(TokenizerTest, MalformedContentsGiveClearErrors) {
  const std::string model = MakeByteLevelTiktokenModel();
  const std::string config = MakeKimiTokenizerConfigJson(256);
  const std::string no_byte_65_model = ByteModelWithout(65) + "QUI= 65\n";  // "AB" replaces "A"
  const std::vector<BadContents> cases = {
      {"empty model", "", config, "tiktoken.model: no tokens"},
      {"only blank lines", "\n\n\r\n", config, "tiktoken.model: no tokens"},
      {"bad base64", "!!!! 0\n", config, "tiktoken.model:1: token is not valid base64"},
      {"bad base64 length", model + "QUJ 256\n", config, "tiktoken.model:257: token is not valid"},
      {"padding inside", model + "QQ==QUJD 256\n", config, "tiktoken.model:257: token is not"},
      {"missing rank", model + "QUJD\n", config, "tiktoken.model:257: expected 'base64token rank'"},
      {"missing rank after space", model + "QUJD \n", config, "tiktoken.model:257: missing rank"},
      {"three fields", model + "QUJD 256 7\n", config, "tiktoken.model:257: expected exactly two"},
      {"negative rank", model + "QUJD -256\n", config, "tiktoken.model:257: rank is not"},
      {"rank not a number", model + "QUJD 25x\n", config, "tiktoken.model:257: rank is not"},
      {"huge rank", model + "QUJD 99999999999\n", config, "tiktoken.model:257: rank is not"},
      {"duplicate rank", model + "QUJD 255\n", config,
       "tiktoken.model:257: duplicate rank 255 (also on line 256)"},
      {"gap in ranks", model + "QUJD 300\n", config,
       "tiktoken.model:257: rank 300 is not below the number of tokens (257)"},
      {"duplicate token", model + "QQ== 256\n", config,
       "ranks 65 and 256 have the same token bytes 'A'"},
      {"missing single byte", no_byte_65_model, config, "no token for the single byte 0x41"},
      {"config not json", model, "{\"added_tokens_decoder\": ", "tokenizer_config.json: not valid"},
      {"config array", model, "[]", "tokenizer_config.json: top level must be an object"},
      {"decoder not object", model, R"({"added_tokens_decoder": []})",
       "added_tokens_decoder must be an object"},
      {"decoder key not id", model, R"({"added_tokens_decoder": {"x": {"content": "a"}}})",
       "added_tokens_decoder key 'x' is not a token id"},
      {"decoder key negative", model, R"({"added_tokens_decoder": {"-3": {"content": "a"}}})",
       "key '-3' is not a token id"},
      {"decoder id is a rank", model, R"({"added_tokens_decoder": {"100": {"content": "a"}}})",
       "added_tokens_decoder id 100 is below 256, the first special-token id: it would shadow "
       "mergeable rank 100"},
      {"decoder id is the last rank", model,
       R"({"added_tokens_decoder": {"255": {"content": "a"}}})", "id 255 is below 256"},
      {"decoder id past reference slots", model,
       R"({"added_tokens_decoder": {"514": {"content": "a"}}})",
       "id 514 is past the 258 special-token ids [256, 514) of the reference tokenizer"},
      {"decoder no content", model, R"({"added_tokens_decoder": {"300": {"special": true}}})",
       "added_tokens_decoder[\"300\"].content must be a non-empty string"},
      {"decoder content not string", model, R"({"added_tokens_decoder": {"300": {"content": 1}}})",
       "added_tokens_decoder[\"300\"].content must be"},
      {"decoder value string", model, R"({"added_tokens_decoder": {"300": "x"}})",
       "added_tokens_decoder[\"300\"].content must be"},
      {"duplicate names", model,
       R"({"added_tokens_decoder": {"300": {"content": "[X]"}, "301": {"content": "[X]"}}})",
       "special token name '[X]' is used by ids 300 and 301"},
      {"name collides with reserved", model,
       R"({"added_tokens_decoder": {"300": {"content": "<|reserved_token_301|>"}}})",
       "is used by ids 300 and 301"},
      {"bos unknown", model, R"({"bos_token": "<s>"})", "bos_token '<s>' is not a special token"},
      {"eos wrong type", model, R"({"eos_token": 5})", "eos_token must be a string or an object"},
      {"default names missing", model, R"({"added_tokens_decoder": {"256": {"content": "<s>"}}})",
       "bos_token '[BOS]' is not a special token"},
  };
  for (const auto& c : cases) {
    auto tok = Tokenizer::FromContents(c.tiktoken_model, c.config);
    ASSERT_FALSE(tok.ok()) << c.name;
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(tok.status().message(), HasSubstr(c.expected)) << c.name;
  }
}

TEST(TokenizerTest, ConfigDefaultsAndAddedTokenObjects) {
  const std::string model = MakeByteLevelTiktokenModel();
  // No added_tokens_decoder: every slot is reserved, so the default [BOS] cannot resolve...
  EXPECT_FALSE(Tokenizer::FromContents(model, "{}").ok());
  // ...unless bos/eos name reserved slots.
  auto tok = Tokenizer::FromContents(
      model,
      R"({"bos_token": {"content": "<|reserved_token_256|>"}, "eos_token": "<|reserved_token_300|>",
          "added_tokens_decoder": null, "chat_template": "ignored"})");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), 256);
  EXPECT_EQ((*tok)->eos_id(), 300);
  // Missing / null bos and eos mean [BOS] / [EOS].
  auto tok2 = Tokenizer::FromContents(
      model, R"({"bos_token": null, "added_tokens_decoder": {"257": {"content": "[EOS]"},
                 "256": {"content": "[BOS]"}}})");
  ASSERT_TRUE(tok2.ok()) << tok2.status();
  EXPECT_EQ((*tok2)->bos_id(), 256);
  EXPECT_EQ((*tok2)->eos_id(), 257);
}

// The reference tokenizer builds 258 special slots, so a released tokenizer_config.json may name
// ids n + 256 and n + 257. They are outside the model's embedding: ignored, not an error.
TEST(TokenizerTest, AddedTokensPastTheEmbeddingAreIgnored) {
  const std::string model = MakeByteLevelTiktokenModel();
  auto tok = Tokenizer::FromContents(model, R"({"added_tokens_decoder": {
      "256": {"content": "[BOS]"}, "257": {"content": "[EOS]"},
      "511": {"content": "[PAD]"},
      "512": {"content": "[EXTRA_0]", "special": true},
      "513": {"content": "[EXTRA_1]", "special": true}}})");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 512);
  EXPECT_EQ((*tok)->SpecialTokenId("[PAD]"), 511);
  EXPECT_EQ((*tok)->SpecialTokenId("[EXTRA_0]"), std::nullopt);
  EXPECT_EQ((*tok)->SpecialTokenId("[EXTRA_1]"), std::nullopt);
  EXPECT_FALSE((*tok)->TokenBytes(512).ok());
  // Ignored entries are not validated either (their content is irrelevant to this model)...
  EXPECT_TRUE(Tokenizer::FromContents(model, R"({"added_tokens_decoder": {
      "256": {"content": "[BOS]"}, "257": {"content": "[EOS]"}, "513": {"special": true}}})")
                  .ok());
  // ...and cannot make an ignored name resolve.
  auto bad_bos =
      Tokenizer::FromContents(model, R"({"bos_token": "[EXTRA_0]", "added_tokens_decoder": {
      "257": {"content": "[EOS]"}, "512": {"content": "[EXTRA_0]"}}})");
  ASSERT_FALSE(bad_bos.ok());
  EXPECT_THAT(bad_bos.status().message(),
              HasSubstr("bos_token '[EXTRA_0]' is not a special token"));
}

TEST(TokenizerTest, LoadReportsMissingAndMalformedFiles) {
  const std::string dir = kls::testing::MakeTempDir();
  auto missing_dir = Tokenizer::Load(dir + "/nope");
  ASSERT_FALSE(missing_dir.ok());
  EXPECT_EQ(missing_dir.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing_dir.status().message(), HasSubstr(dir + "/nope/tiktoken.model"));

  ASSERT_TRUE(WriteStringToFile(dir + "/tiktoken.model", MakeByteLevelTiktokenModel()).ok());
  auto missing_config = Tokenizer::Load(dir);
  ASSERT_FALSE(missing_config.ok());
  EXPECT_EQ(missing_config.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing_config.status().message(), HasSubstr(dir + "/tokenizer_config.json"));

  ASSERT_TRUE(
      WriteStringToFile(dir + "/tokenizer_config.json", MakeKimiTokenizerConfigJson(256)).ok());
  auto ok = Tokenizer::Load(dir);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->num_ranks(), 256);

  ASSERT_TRUE(WriteStringToFile(dir + "/tiktoken.model", "QQ== 0\nnot base64! 1\n").ok());
  auto bad = Tokenizer::Load(dir);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr(dir + "/tiktoken.model:2: "));

  ASSERT_TRUE(WriteStringToFile(dir + "/tiktoken.model", MakeByteLevelTiktokenModel()).ok());
  ASSERT_TRUE(WriteStringToFile(dir + "/tokenizer_config.json", "{").ok());
  auto bad_config = Tokenizer::Load(dir);
  ASSERT_FALSE(bad_config.ok());
  EXPECT_THAT(bad_config.status().message(), HasSubstr(dir + "/tokenizer_config.json: not valid"));
  kls::testing::RemoveTree(dir);
}

// The heap path (long pieces) must reproduce tiktoken's linear-scan merge order exactly.
TEST(TokenizerTest, HeapAndLinearScanBpeAgree) {
  auto tok = LoadMergeTokenizer();
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(11);
  const std::vector<std::string> alphabets = {"a",
                                              "ab",
                                              "the thing ",
                                              "0123456789",
                                              " \n\t",
                                              "\xE4\xB8\xAD\xE6\x96\x87\xF0\x9F\x98\x80",
                                              "xyzzy Kimi'sll.!"};
  for (int i = 0; i < 400; ++i) {
    const std::string& alpha = alphabets[static_cast<size_t>(i) % alphabets.size()];
    const size_t len = std::uniform_int_distribution<size_t>(2, 700)(rng);
    std::string piece;
    for (size_t k = 0; k < len; ++k) {
      // Mostly the alphabet, sometimes any byte (BPE works on bytes, valid UTF-8 or not).
      piece.push_back(std::uniform_int_distribution<int>(0, 15)(rng) == 0
                          ? static_cast<char>(std::uniform_int_distribution<int>(0, 255)(rng))
                          : alpha[std::uniform_int_distribution<size_t>(0, alpha.size() - 1)(rng)]);
    }
    auto linear = tok->TEST_BytePairEncode(piece, /*use_heap=*/false);
    auto heap = tok->TEST_BytePairEncode(piece, /*use_heap=*/true);
    ASSERT_TRUE(linear.ok() && heap.ok());
    ASSERT_EQ(*linear, *heap) << "piece " << i << " of length " << len;
    ASSERT_EQ(*tok->Decode(*heap), piece);
  }
}

TEST(TokenizerTest, ConcurrentEncodeMatchesSerial) {
  auto tok = LoadMergeTokenizer();
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(5);
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back(RandomText(rng));
  texts.push_back(std::string(30000, 'a'));  // long run: the large JIT stack path
  std::vector<std::vector<int32_t>> serial;
  for (const auto& t : texts) serial.push_back(*tok->Encode(t));
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 2; ++rep) {
        for (size_t i = 0; i < texts.size(); ++i) {
          auto ids = tok->Encode(texts[(i + static_cast<size_t>(t) * 37) % texts.size()]);
          if (!ids.ok() || *ids != serial[(i + static_cast<size_t>(t) * 37) % texts.size()]) {
            ++mismatches[static_cast<size_t>(t)];
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

// Pathologically long runs (one pre-token per 25,000 code points) stay fast and exact.
TEST(TokenizerTest, LongRunsEncodeQuickly) {
  auto tok = LoadMergeTokenizer();
  ASSERT_NE(tok, nullptr);
  std::string emoji;
  for (int i = 0; i < 15000; ++i) emoji += "\xF0\x9F\x98\x80\xF0\x9F\x98\x83";  // 120 KB
  // U+001C counts as whitespace for the reference's run splitting (Python isspace) but not for
  // the regex, so this whole text is a single 300 KB pre-token.
  std::string one_piece;
  for (int i = 0; i < 60000; ++i) one_piece += "\xF0\x9F\x98\x80\x1C";
  const std::vector<std::string> texts = {std::string(60001, 'a'), std::string(60001, ' '),
                                          std::string(100000, '!'), emoji, one_piece};
  const auto start = std::chrono::steady_clock::now();
  for (const auto& t : texts) {
    ExpectRoundTrip(*tok, t);
    if (HasFailure()) return;
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << "[          ] long runs took " << secs * 1e3 << " ms\n";
#if defined(NDEBUG) && !defined(__SANITIZE_ADDRESS__)
  EXPECT_LT(secs, 2.0);  // ~0.1 s optimized; quadratic BPE on these pieces would take minutes
#endif
}

// A vocabulary of the real size (163,584 ranks) loads fast and places the specials as the real
// model does.
TEST(TokenizerTest, LoadsRealSizeVocabularyQuickly) {
  constexpr int64_t kNumRanks = 163584;
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  auto base64 = [](const std::string& in) {
    std::string out;
    for (size_t i = 0; i < in.size(); i += 3) {
      uint32_t v = static_cast<unsigned char>(in[i]) << 16;
      if (i + 1 < in.size()) v |= static_cast<unsigned char>(in[i + 1]) << 8;
      if (i + 2 < in.size()) v |= static_cast<unsigned char>(in[i + 2]);
      out.push_back(kAlphabet[(v >> 18) & 63]);
      out.push_back(kAlphabet[(v >> 12) & 63]);
      out.push_back(i + 1 < in.size() ? kAlphabet[(v >> 6) & 63] : '=');
      out.push_back(i + 2 < in.size() ? kAlphabet[v & 63] : '=');
    }
    return out;
  };
  std::string model;
  model.reserve(kNumRanks * 16);
  for (int64_t r = 0; r < kNumRanks; ++r) {
    std::string token;
    if (r < 256) {
      token.push_back(static_cast<char>(r));
    } else if (r < 256 + 65536) {
      token = {static_cast<char>((r - 256) >> 8), static_cast<char>((r - 256) & 255)};
    } else {
      const int64_t x = r - 256 - 65536;
      token = {static_cast<char>('x' + (x >> 16)), static_cast<char>((x >> 8) & 255),
               static_cast<char>(x & 255)};
    }
    model += base64(token) + " " + std::to_string(r) + "\n";
  }
  const std::string config = MakeKimiTokenizerConfigJson(kNumRanks);
  const auto start = std::chrono::steady_clock::now();
  auto tok = Tokenizer::FromContents(model, config);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::cout << "[          ] loaded " << kNumRanks << " ranks in " << secs * 1e3 << " ms\n";
#if defined(NDEBUG) && !defined(__SANITIZE_ADDRESS__)
  EXPECT_LT(secs, 2.0);  // ~30 ms optimized; generous for a shared CI core
#endif
  EXPECT_EQ((*tok)->num_ranks(), kNumRanks);
  EXPECT_EQ((*tok)->vocab_size(), 163840);
  EXPECT_EQ((*tok)->bos_id(), 163584);
  EXPECT_EQ((*tok)->eos_id(), 163585);
  EXPECT_EQ((*tok)->SpecialTokenId("<|im_end|>"), 163586);
  EXPECT_EQ((*tok)->SpecialTokenId("<|im_user|>"), 163587);
  EXPECT_EQ((*tok)->SpecialTokenId("<|im_assistant|>"), 163588);
  EXPECT_EQ((*tok)->SpecialTokenId("<|im_system|>"), 163594);
  EXPECT_EQ((*tok)->SpecialTokenId("<|im_middle|>"), 163601);
  EXPECT_EQ((*tok)->SpecialTokenId("<think>"), 163606);
  EXPECT_EQ((*tok)->SpecialTokenId("[PAD]"), 163839);
  EXPECT_EQ((*tok)->SpecialTokenId("<|reserved_token_163589|>"), 163589);
  // 2-byte tokens merge: "hi" is rank 256 + 'h' * 256 + 'i'.
  auto ids = (*tok)->Encode("hi");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, (std::vector<int32_t>{256 + 'h' * 256 + 'i'}));
}

}  // namespace
}  // namespace kls::engine

// StreamingDecoder: complete characters only, held-back partial characters, U+FFFD for bytes that
// can never form a character (checked against an independent oracle), special-token handling.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/vocab_files.h"

namespace kls::engine {
namespace {

constexpr char kFffd[] = "\xEF\xBF\xBD";

std::string TestDataDir() {
  if (const char* src = std::getenv("KLS_SOURCE_DIR"); src != nullptr) {
    return std::string(src) + "/tests/engine/tokenizer/testdata";
  }
  return (std::filesystem::path(__FILE__).parent_path() / "testdata").string();
}

std::string EncodeScalar(char32_t c) {
  std::string out;
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out = {static_cast<char>(0xC0 | (c >> 6)), static_cast<char>(0x80 | (c & 0x3F))};
  } else if (c < 0x10000) {
    out = {static_cast<char>(0xE0 | (c >> 12)), static_cast<char>(0x80 | ((c >> 6) & 0x3F)),
           static_cast<char>(0x80 | (c & 0x3F))};
  } else {
    out = {static_cast<char>(0xF0 | (c >> 18)), static_cast<char>(0x80 | ((c >> 12) & 0x3F)),
           static_cast<char>(0x80 | ((c >> 6) & 0x3F)), static_cast<char>(0x80 | (c & 0x3F))};
  }
  return out;
}

// Oracle built by enumeration, independent of the decoder: the set of every well-formed
// character's byte sequence and of all their proper prefixes.
struct Utf8Oracle {
  absl::flat_hash_set<std::string> complete;
  absl::flat_hash_set<std::string> proper_prefixes;
  Utf8Oracle() {
    for (char32_t c = 0; c <= 0x10FFFF; ++c) {
      if (c >= 0xD800 && c <= 0xDFFF) continue;
      const std::string s = EncodeScalar(c);
      complete.insert(s);
      for (size_t k = 1; k < s.size(); ++k) proper_prefixes.insert(s.substr(0, k));
    }
  }
  bool IsValid(const std::string& s) const {
    size_t i = 0;
    while (i < s.size()) {
      size_t k = 1;
      while (k <= 4 && i + k <= s.size() && !complete.contains(s.substr(i, k))) ++k;
      if (k > 4 || i + k > s.size()) return false;
      i += k;
    }
    return true;
  }
  // Unicode §3.9 "maximal subpart" replacement (what Python's errors="replace" does).
  std::string Replace(const std::string& s) const {
    std::string out;
    size_t i = 0;
    while (i < s.size()) {
      size_t best = 0;  // longest proper prefix or complete character starting at i
      bool is_complete = false;
      for (size_t k = 1; k <= 4 && i + k <= s.size(); ++k) {
        const std::string sub = s.substr(i, k);
        if (complete.contains(sub)) {
          best = k;
          is_complete = true;
          break;
        }
        if (!proper_prefixes.contains(sub)) break;
        best = k;
      }
      if (is_complete) {
        out += s.substr(i, best);
      } else {
        out += kFffd;
      }
      i += best == 0 ? 1 : best;
    }
    return out;
  }
};

const Utf8Oracle& Oracle() {
  static const Utf8Oracle* oracle = new Utf8Oracle();
  return *oracle;
}

std::unique_ptr<Tokenizer> MakeByteTokenizer() {
  auto tok =
      Tokenizer::FromContents(MakeByteLevelTiktokenModel(), MakeKimiTokenizerConfigJson(256));
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

// Pushes every id; each Push result must be valid UTF-8. Returns the concatenation incl. Flush.
std::string StreamAll(StreamingDecoder& dec, const std::vector<int32_t>& ids) {
  std::string out;
  for (const int32_t id : ids) {
    auto piece = dec.Push(id);
    EXPECT_TRUE(piece.ok()) << piece.status();
    if (!piece.ok()) return out;
    EXPECT_TRUE(Oracle().IsValid(*piece)) << "partial character emitted after id " << id;
    out += *piece;
  }
  const std::string tail = dec.Flush();
  EXPECT_TRUE(Oracle().IsValid(tail));
  return out + tail;
}

TEST(StreamingDecoderTest, HoldsBackSplitCharacters) {
  auto tok = MakeByteTokenizer();
  ASSERT_NE(tok, nullptr);
  StreamingDecoder dec(*tok);
  // "中" = E4 B8 AD, "😀" = F0 9F 98 80.
  EXPECT_EQ(*dec.Push(0xE4), "");
  EXPECT_EQ(*dec.Push(0xB8), "");
  EXPECT_EQ(*dec.Push(0xAD), "中");
  EXPECT_EQ(*dec.Push('a'), "a");
  EXPECT_EQ(*dec.Push(0xF0), "");
  EXPECT_EQ(*dec.Push(0x9F), "");
  EXPECT_EQ(*dec.Push(0x98), "");
  EXPECT_EQ(*dec.Push(0x80), "😀");
  EXPECT_EQ(dec.Flush(), "");
}

TEST(StreamingDecoderTest, StreamsTextSplitAcrossByteTokens) {
  auto tok = MakeByteTokenizer();
  ASSERT_NE(tok, nullptr);
  const std::string text =
      "Hello, 世界! Привет 😀👍🏽 e\xCC\x81 \xF0\xA0\x80\x80 "
      "नमस्ते\r\n\ttabs";
  auto ids = tok->Encode(text);
  ASSERT_TRUE(ids.ok());
  ASSERT_EQ(ids->size(), text.size());  // byte-level: every multi-byte character is split
  StreamingDecoder dec(*tok);
  EXPECT_EQ(StreamAll(dec, *ids), text);
}

TEST(StreamingDecoderTest, StreamsRandomTextWithMergeVocabulary) {
  auto tok = Tokenizer::Load(TestDataDir());
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::mt19937 rng(17);
  for (int i = 0; i < 300; ++i) {
    std::string text;
    const int n = std::uniform_int_distribution<int>(0, 40)(rng);
    for (int k = 0; k < n; ++k) {
      char32_t c;
      switch (std::uniform_int_distribution<int>(0, 3)(rng)) {
        case 0:
          c = std::uniform_int_distribution<char32_t>(0x20, 0x7E)(rng);
          break;
        case 1:
          c = std::uniform_int_distribution<char32_t>(0x4E00, 0x9FA5)(rng);
          break;
        case 2:
          c = std::uniform_int_distribution<char32_t>(0x1F600, 0x1F64F)(rng);
          break;
        default:
          c = std::uniform_int_distribution<char32_t>(0x80, 0x2FFF)(rng);
          break;
      }
      if (c >= 0xD800 && c <= 0xDFFF) c = 'x';
      text += EncodeScalar(c);
    }
    auto ids = (*tok)->Encode(text);
    ASSERT_TRUE(ids.ok());
    StreamingDecoder dec(**tok);
    ASSERT_EQ(StreamAll(dec, *ids), text) << i;
  }
}

TEST(StreamingDecoderTest, ReplacesInvalidBytesLikePython) {
  auto tok = MakeByteTokenizer();
  ASSERT_NE(tok, nullptr);
  // Expected values from Python: bytes(...).decode("utf-8", "replace").
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"\xFF", "\xEF\xBF\xBD"},
      {"\xE4\xB8"
       "A",
       "\xEF\xBF\xBD"
       "A"},
      {"\xED\xA0\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
      {"\xF0\x9F\x98", "\xEF\xBF\xBD"},
      {"\xC0\xAF", "\xEF\xBF\xBD\xEF\xBF\xBD"},
      {"\xF4\x90\x80\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
      {"\xE0\x80\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
      {"\xF1\x80\x80\xE4\xB8\xAD", "\xEF\xBF\xBD\xE4\xB8\xAD"},
      {"a\x80"
       "b",
       "a\xEF\xBF\xBD"
       "b"},
  };
  for (const auto& [bytes, expected] : cases) {
    std::vector<int32_t> ids(bytes.begin(), bytes.end());
    for (auto& id : ids) id &= 0xFF;
    StreamingDecoder dec(*tok);
    EXPECT_EQ(StreamAll(dec, ids), expected);
    EXPECT_EQ(Oracle().Replace(bytes), expected);  // the oracle agrees with Python too
  }
  // An impossible byte is replaced at once, not held back.
  StreamingDecoder dec(*tok);
  EXPECT_EQ(*dec.Push(0xFF), kFffd);
  EXPECT_EQ(*dec.Push(0xE4), "");
  EXPECT_EQ(*dec.Push('x'), std::string(kFffd) + "x");
}

TEST(StreamingDecoderTest, RandomBytesMatchReplaceDecode) {
  auto tok = MakeByteTokenizer();
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(23);
  // Bytes drawn to hit lead/continuation boundaries often.
  const std::vector<int> interesting = {0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF,
                                        0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE,
                                        0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF};
  for (int i = 0; i < 3000; ++i) {
    const int n = std::uniform_int_distribution<int>(0, 12)(rng);
    std::vector<int32_t> ids;
    std::string bytes;
    for (int k = 0; k < n; ++k) {
      const int b =
          std::uniform_int_distribution<int>(0, 1)(rng)
              ? interesting[std::uniform_int_distribution<size_t>(0, interesting.size() - 1)(rng)]
              : std::uniform_int_distribution<int>(0, 255)(rng);
      ids.push_back(b);
      bytes.push_back(static_cast<char>(b));
    }
    StreamingDecoder dec(*tok);
    ASSERT_EQ(StreamAll(dec, ids), Oracle().Replace(bytes)) << "case " << i;
  }
}

TEST(StreamingDecoderTest, SpecialTokens) {
  auto tok = MakeByteTokenizer();
  ASSERT_NE(tok, nullptr);
  const int32_t im_end = *tok->SpecialTokenId("<|im_end|>");
  StreamingDecoder skipping(*tok);
  EXPECT_EQ(*skipping.Push('a'), "a");
  EXPECT_EQ(*skipping.Push(0xE4), "");
  EXPECT_EQ(*skipping.Push(im_end), "");  // skipped; the partial character stays pending
  EXPECT_EQ(*skipping.Push(0xB8), "");
  EXPECT_EQ(*skipping.Push(0xAD), "中");

  StreamingDecoder named(*tok, /*skip_special=*/false);
  EXPECT_EQ(*named.Push('a'), "a");
  EXPECT_EQ(*named.Push(im_end), "<|im_end|>");
  EXPECT_EQ(*named.Push(0xE4), "");
  // A special token interrupts the character: the partial bytes become U+FFFD.
  EXPECT_EQ(*named.Push(tok->bos_id()), std::string(kFffd) + "[BOS]");
  EXPECT_EQ(named.Flush(), "");
}

TEST(StreamingDecoderTest, RejectsOutOfRangeIdsWithoutLosingState) {
  auto tok = MakeByteTokenizer();
  ASSERT_NE(tok, nullptr);
  StreamingDecoder dec(*tok);
  EXPECT_EQ(*dec.Push(0xE4), "");
  for (const int32_t bad : {-1, static_cast<int32_t>(tok->vocab_size()), 1 << 30}) {
    auto r = dec.Push(bad);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(*dec.Push(0xB8), "");
  EXPECT_EQ(*dec.Push(0xAD), "中");
  // Flush of a truncated character gives one U+FFFD and resets the decoder.
  EXPECT_EQ(*dec.Push(0xF0), "");
  EXPECT_EQ(dec.Flush(), kFffd);
  EXPECT_EQ(dec.Flush(), "");
  EXPECT_EQ(*dec.Push('z'), "z");
}

}  // namespace
}  // namespace kls::engine

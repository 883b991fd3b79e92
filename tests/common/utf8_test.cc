#include "common/utf8.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <string_view>

namespace kls {
namespace {

// Independent reference: decode by bit pattern, then reject overlongs, surrogates and
// > U+10FFFF by value. Returns the sequence length at s[i], or 0 if ill-formed.
size_t ReferenceLength(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  size_t len;
  uint32_t cp;
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) {
    len = 2, cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    len = 3, cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    len = 4, cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + len > s.size()) return 0;
  for (size_t k = 1; k < len; ++k) {
    const auto cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (cc & 0x3F);
  }
  static constexpr uint32_t kMinForLen[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMinForLen[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return len;
}

bool ReferenceValid(std::string_view s, size_t* bad) {
  size_t i = 0;
  while (i < s.size()) {
    const size_t len = ReferenceLength(s, i);
    if (len == 0) {
      *bad = i;
      return false;
    }
    i += len;
  }
  return true;
}

std::string Encode(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return out;
}

TEST(Utf8Test, AcceptsBoundaryCodePoints) {
  for (std::string_view s :
       {std::string_view(""), std::string_view("plain ascii"), std::string_view("nul\0inside", 10),
        std::string_view("\xC2\x80"), std::string_view("\xDF\xBF"),
        std::string_view("\xE0\xA0\x80"), std::string_view("\xED\x9F\xBF"),
        std::string_view("\xEE\x80\x80"), std::string_view("\xEF\xBF\xBF"),
        std::string_view("\xF0\x90\x80\x80"), std::string_view("\xF4\x8F\xBF\xBF"),
        std::string_view("h\xC3\xA9llo \xE4\xBD\xA0\xE5\xA5\xBD \xF0\x9F\x98\x80")}) {
    SCOPED_TRACE(testing::PrintToString(s));
    size_t bad = 12345;
    EXPECT_TRUE(IsValidUtf8(s, &bad));
    EXPECT_EQ(bad, 12345u) << "offset written on success";
    EXPECT_TRUE(IsValidUtf8(s));
  }
}

TEST(Utf8Test, RejectsWithFirstBadOffset) {
  struct Case {
    std::string_view text;
    size_t offset;
  };
  const Case cases[] = {
      {"\xC0\x80", 0},                  // overlong NUL
      {"ab\xC1\xBF", 2},                // overlong U+007F
      {"\xE0\x80\x80", 0},              // overlong 3-byte
      {"x\xE0\x9F\xBF", 1},             // overlong U+07FF
      {"\xF0\x80\x80\x80", 0},          // overlong 4-byte
      {"\xF0\x8F\xBF\xBF", 0},          // overlong U+FFFF
      {"ok\xED\xA0\x80", 2},            // U+D800, high surrogate
      {"\xED\xBF\xBF", 0},              // U+DFFF, low surrogate
      {"\xED\xA0\xBD\xED\xB8\x80", 0},  // CESU-8 surrogate pair
      {"\xF4\x90\x80\x80", 0},          // U+110000
      {"\xF5\x80\x80\x80", 0},          // lead byte past F4
      {"\xFF", 0},
      {"\xFE", 0},
      {"abc\x80", 3},                       // stray continuation
      {"\xC3\xA9\xBF", 2},                  // continuation after a complete character
      {"\xE4\xBD", 0},                      // truncated at the end
      {"\xE4\xBD\xA0\xF0\x9F\x98", 3},      // truncated 4-byte after a good character
      {"\xE4\x41\x41", 0},                  // bad continuation
      {"\xC3\xA9\xC3\xA9\xC3\xA9\xC3", 6},  // truncated after several good ones
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::PrintToString(c.text));
    size_t bad = 12345;
    EXPECT_FALSE(IsValidUtf8(c.text, &bad));
    EXPECT_EQ(bad, c.offset);
    EXPECT_FALSE(IsValidUtf8(c.text));
  }
}

TEST(Utf8Test, EveryCodePointRoundTrips) {
  for (uint32_t cp = 0; cp <= 0x10FFFF; ++cp) {
    const std::string s = Encode(cp);
    const bool surrogate = cp >= 0xD800 && cp <= 0xDFFF;
    ASSERT_EQ(IsValidUtf8(s), !surrogate) << "U+" << std::hex << cp;
    if (!surrogate) {
      ASSERT_EQ(ScanUtf8Sequence(s, 0).length, s.size()) << "U+" << std::hex << cp;
    }
  }
}

TEST(Utf8Test, MatchesReferenceOnEveryOneToThreeByteString) {
  std::string s;
  for (uint32_t v = 0; v < (1u << 24); ++v) {
    for (size_t len = 1; len <= 3; ++len) {
      if (len < 3 && (v >> (8 * len)) != 0) continue;
      s.clear();
      for (size_t k = 0; k < len; ++k) s.push_back(static_cast<char>(v >> (8 * (len - 1 - k))));
      size_t bad = 0, ref_bad = 0;
      const bool ok = IsValidUtf8(s, &bad);
      ASSERT_EQ(ok, ReferenceValid(s, &ref_bad)) << testing::PrintToString(s);
      if (!ok) {
        ASSERT_EQ(bad, ref_bad) << testing::PrintToString(s);
      }
    }
  }
}

TEST(Utf8Test, MatchesReferenceOnRandomStrings) {
  std::mt19937 rng(20240613);
  // Bytes biased towards lead and continuation bytes so that most strings are near-valid.
  const unsigned char kAlphabet[] = {'a',  0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF,
                                     0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE,
                                     0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xF8, 0xFF};
  std::uniform_int_distribution<size_t> pick(0, sizeof(kAlphabet) - 1);
  std::uniform_int_distribution<size_t> length(0, 12);
  std::string s;
  int valid = 0;
  for (int iter = 0; iter < 500'000; ++iter) {
    s.clear();
    const size_t n = length(rng);
    for (size_t k = 0; k < n; ++k) s.push_back(static_cast<char>(kAlphabet[pick(rng)]));
    size_t bad = 0, ref_bad = 0;
    const bool ok = IsValidUtf8(s, &bad);
    ASSERT_EQ(ok, ReferenceValid(s, &ref_bad)) << testing::PrintToString(s);
    if (!ok) {
      ASSERT_EQ(bad, ref_bad) << testing::PrintToString(s);
    }
    valid += ok ? 1 : 0;
  }
  EXPECT_GT(valid, 10'000) << "the generator should produce valid strings too";
}

TEST(Utf8Test, ScanReportsMaximalSubparts) {
  struct Case {
    std::string_view text;
    size_t length;
    size_t maximal_subpart;
    bool truncated;
  };
  const Case cases[] = {
      {"a", 1, 0, false},
      {"\xE4\xBD\xA0", 3, 0, false},
      {"\x80", 0, 1, false},
      {"\xC0\x80", 0, 1, false},          // C0 can start nothing
      {"\xC2\x62", 0, 1, false},          // lead, then a non-continuation
      {"\xED\xA0\x80", 0, 1, false},      // A0 is outside ED's range: the subpart is just ED
      {"\xF4\x90\x80\x80", 0, 1, false},  // 90 is outside F4's range
      {"\xF1\x80\x80\xE1", 0, 3, false},  // Unicode Table 3-8: F1 80 80 is one subpart
      {"\xE1\x80", 0, 2, true},           // a valid prefix cut off by the end
      {"\xF0\x9F\x98", 0, 3, true},
      {"\xF0", 0, 1, true},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::PrintToString(c.text));
    const Utf8Sequence seq = ScanUtf8Sequence(c.text, 0);
    EXPECT_EQ(seq.length, c.length);
    if (c.length == 0) {
      EXPECT_EQ(seq.maximal_subpart, c.maximal_subpart);
      EXPECT_EQ(seq.truncated, c.truncated);
    }
  }
  // A position inside the string.
  EXPECT_EQ(ScanUtf8Sequence("ab\xC3\xA9", 2).length, 2u);
  EXPECT_TRUE(ScanUtf8Sequence("ab\xC3", 2).truncated);
}

}  // namespace
}  // namespace kls

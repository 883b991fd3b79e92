// Strict UTF-8 (Unicode 15, §3.9 and Table 3-7): no overlong forms, no surrogates
// (U+D800..U+DFFF), nothing above U+10FFFF. One definition for every component that checks text.
#ifndef KLS_COMMON_UTF8_H_
#define KLS_COMMON_UTF8_H_

#include <cstddef>
#include <string_view>

namespace kls {

// What the bytes at one position of a string hold.
struct Utf8Sequence {
  // Byte length (1..4) of the well-formed sequence there, or 0 if it is ill-formed.
  size_t length = 0;
  // When ill-formed: the length of the maximal subpart (Unicode §3.9 D93b), i.e. the bytes that
  // one U+FFFD replaces under the W3C/Python "replace" practice; always >= 1.
  size_t maximal_subpart = 0;
  // When ill-formed: true if the sequence is a valid prefix cut off by the end of the string, so
  // more bytes could still complete it (what a streaming decoder holds back).
  bool truncated = false;
};

// Classifies the sequence starting at s[pos]. Requires pos < s.size().
Utf8Sequence ScanUtf8Sequence(std::string_view s, size_t pos);

// True if `s` is well-formed UTF-8 (the empty string is). Otherwise false, and
// *first_bad_offset (when not null) is set to the byte offset of the first ill-formed sequence
// (a truncated sequence at the end counts as ill-formed).
bool IsValidUtf8(std::string_view s, size_t* first_bad_offset = nullptr);

}  // namespace kls

#endif  // KLS_COMMON_UTF8_H_

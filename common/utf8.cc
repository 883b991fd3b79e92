#include "common/utf8.h"

namespace kls {

Utf8Sequence ScanUtf8Sequence(std::string_view s, size_t pos) {
  const auto b = static_cast<unsigned char>(s[pos]);
  if (b < 0x80) return {.length = 1};
  // Table 3-7: the lead byte fixes the number of continuation bytes and the range of the first
  // one; the narrowed ranges exclude overlongs (E0, F0), surrogates (ED) and > U+10FFFF (F4).
  int need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    need = 1;
  } else if (b == 0xE0) {
    need = 2;
    lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    need = 2;
  } else if (b == 0xED) {
    need = 2;
    hi = 0x9F;
  } else if (b == 0xF0) {
    need = 3;
    lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 3;
  } else if (b == 0xF4) {
    need = 3;
    hi = 0x8F;
  } else {
    // A continuation byte, an overlong lead (C0, C1) or F5..FF: nothing can follow.
    return {.length = 0, .maximal_subpart = 1};
  }
  for (int got = 0; got < need; ++got) {
    const size_t j = pos + 1 + static_cast<size_t>(got);
    if (j >= s.size()) {
      return {.length = 0, .maximal_subpart = j - pos, .truncated = true};
    }
    const auto c = static_cast<unsigned char>(s[j]);
    if (c < (got == 0 ? lo : 0x80) || c > (got == 0 ? hi : 0xBF)) {
      return {.length = 0, .maximal_subpart = j - pos};
    }
  }
  return {.length = static_cast<size_t>(need) + 1};
}

bool IsValidUtf8(std::string_view s, size_t* first_bad_offset) {
  size_t i = 0;
  while (i < s.size()) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {  // ASCII fast path
      ++i;
      continue;
    }
    const Utf8Sequence seq = ScanUtf8Sequence(s, i);
    if (seq.length == 0) {
      if (first_bad_offset != nullptr) *first_bad_offset = i;
      return false;
    }
    i += seq.length;
  }
  return true;
}

}  // namespace kls

#include "engine/tokenizer/tokenizer.h"

#include <charconv>
#include <functional>
#include <limits>
#include <optional>
#include <queue>
#include <tuple>
#include <utility>

// PCRE2's 8-bit API (UTF-8 subjects); the width must be set before the header.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "nlohmann/json.hpp"

namespace kls::engine {

// Eight alternatives, KIMI_LINEAR.md §7 (tokenization_kimi.py `pat_str`).
// clang-format off
const std::string_view kKimiPatternTiktoken =
    R"([\p{Han}]+|)"
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|)"
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|)"
    R"(\p{N}{1,3}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|)"
    R"(\s*[\r\n]+|)"
    R"(\s+(?!\S)|)"
    R"(\s+)";

// The same alternatives for PCRE2 (see tokenizer.h). KLS_WS is the body of a class of Unicode
// White_Space, which is what Rust's `\s` matches: \t \n \v \f \r, space, U+0085, U+00A0, U+1680,
// U+2000-200A, U+2028, U+2029, U+202F, U+205F, U+3000.
#define KLS_WS R"(\t\n\x{0B}\f\r\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})"
#define KLS_UPPERISH R"((?:(?!\p{sc=Han})[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]))"
#define KLS_LOWERISH R"((?:(?!\p{sc=Han})[\p{Ll}\p{Lm}\p{Lo}\p{M}]))"
#define KLS_CONTRACTION R"((?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
const std::string_view kKimiPatternPcre2 =
    R"([\p{sc=Han}]+)" "|"
    R"([^\r\n\p{L}\p{N}]?)" KLS_UPPERISH "*" KLS_LOWERISH "+" KLS_CONTRACTION "|"
    R"([^\r\n\p{L}\p{N}]?)" KLS_UPPERISH "+" KLS_LOWERISH "*" KLS_CONTRACTION "|"
    R"(\p{N}{1,3})" "|"
    R"( ?[^)" KLS_WS R"(\p{L}\p{N}]+[\r\n]*)" "|"
    "[" KLS_WS "]*" R"([\r\n]+)" "|"
    "[" KLS_WS "]+(?![^" KLS_WS "])" "|"
    "[" KLS_WS "]+";
#undef KLS_WS
#undef KLS_UPPERISH
#undef KLS_LOWERISH
#undef KLS_CONTRACTION
// clang-format on

namespace {

// Limits of the reference encode (tokenization_kimi.py): tiktoken is called on chunks of at most
// 400,000 code points, each further cut so that no run of whitespace (or of non-whitespace)
// exceeds 25,000 code points. The cuts change tokens only at those boundaries, and bound the
// length of every pre-token.
constexpr int64_t kMaxEncodeCodePoints = 400'000;
constexpr int64_t kMaxConsecutiveRun = 25'000;

// Pieces longer than this use the heap BPE; shorter ones tiktoken's linear-scan loop, which is
// faster for the short pieces that dominate real text.
constexpr size_t kHeapBpeMinBytes = 256;

constexpr uint32_t kNoRank = std::numeric_limits<uint32_t>::max();
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// tokenization_kimi.py reserves 258 special ids after the ranks; the model's embedding holds the
// first kNumSpecialTokenSlots of them.
constexpr int64_t kNumReferenceSpecialTokenIds = kNumSpecialTokenSlots + 2;

absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// Printable, length-limited rendering of untrusted text for error messages.
std::string Excerpt(std::string_view s) {
  constexpr size_t kMax = 40;
  std::string out;
  for (size_t i = 0; i < s.size() && i < kMax; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  if (s.size() > kMax) out += "...";
  return out;
}

// ---------------------------------------------------------------------------------------------
// Base64 (RFC 4648 standard alphabet, padded), strict: what tiktoken.model files contain.

int Base64Value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

// Appends the decoded bytes to *out; false on any malformed input (out is then unspecified).
bool Base64DecodeAppend(std::string_view in, std::string* out) {
  if (in.empty() || in.size() % 4 != 0) return false;
  for (size_t g = 0; g < in.size(); g += 4) {
    const bool last = g + 4 == in.size();
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      const unsigned char c = static_cast<unsigned char>(in[g + k]);
      if (c == '=' && last && k >= 2) {
        v[k] = 0;
        ++pad;
        continue;
      }
      if (pad > 0) return false;  // data after '='
      v[k] = Base64Value(c);
      if (v[k] < 0) return false;
    }
    const uint32_t bits = (static_cast<uint32_t>(v[0]) << 18) |
                          (static_cast<uint32_t>(v[1]) << 12) | (static_cast<uint32_t>(v[2]) << 6) |
                          static_cast<uint32_t>(v[3]);
    out->push_back(static_cast<char>(bits >> 16));
    if (pad < 2) out->push_back(static_cast<char>((bits >> 8) & 0xFF));
    if (pad < 1) out->push_back(static_cast<char>(bits & 0xFF));
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// UTF-8.

// Appends `s` decoded with U+FFFD for each maximal ill-formed subpart (Unicode §3.9, as Python's
// "replace"). Unless `final`, a valid but truncated trailing sequence is not consumed. Returns the
// number of bytes consumed.
size_t AppendUtf8WithReplacement(std::string_view s, bool final, std::string* out) {
  size_t i = 0;
  while (i < s.size()) {
    const size_t run_start = i;
    while (i < s.size() && static_cast<unsigned char>(s[i]) < 0x80) ++i;
    out->append(s.data() + run_start, i - run_start);
    if (i == s.size()) break;
    const Utf8Sequence seq = ScanUtf8Sequence(s, i);
    if (seq.length > 0) {
      out->append(s.data() + i, seq.length);
      i += seq.length;
    } else if (seq.truncated && !final) {
      return i;
    } else {
      out->append(kReplacementChar);
      i += seq.maximal_subpart;
    }
  }
  return s.size();
}

// Decodes the code point at s[i] of valid UTF-8; sets *len to its byte length.
char32_t DecodeValidUtf8At(std::string_view s, size_t i, size_t* len) {
  const unsigned char b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) {
    *len = 1;
    return b;
  }
  const int n = b >= 0xF0 ? 4 : (b >= 0xE0 ? 3 : 2);
  char32_t cp = b & (0x7F >> n);
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  *len = static_cast<size_t>(n);
  return cp;
}

// Python's str.isspace(): bidirectional class WS, B or S, or category Zs.
bool IsPythonSpace(char32_t c) {
  if (c <= 0x20) return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20);
  if (c < 0x85) return false;
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
         c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Calls fn(segment) for each substring that the reference encode hands to tiktoken separately
// (tokenization_kimi.py: `_split_whitespaces_or_nonwhitespaces` over 400,000-code-point chunks).
// `text` must be valid UTF-8.
template <typename Fn>
absl::Status ForEachReferenceSegment(std::string_view text, Fn&& fn) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t slice_start = pos;
    int64_t run = 0;
    bool run_is_space = false;
    for (int64_t cps = 0; pos < text.size() && cps < kMaxEncodeCodePoints; ++cps) {
      size_t len;
      const bool space = IsPythonSpace(DecodeValidUtf8At(text, pos, &len));
      if (cps == 0) run_is_space = space;
      if (space != run_is_space) {
        run = 1;
        run_is_space = space;
      } else if (++run > kMaxConsecutiveRun) {
        KLS_RETURN_IF_ERROR(fn(text.substr(slice_start, pos - slice_start)));
        slice_start = pos;
        run = 1;
      }
      pos += len;
    }
    KLS_RETURN_IF_ERROR(fn(text.substr(slice_start, pos - slice_start)));
  }
  return absl::OkStatus();
}

std::string Pcre2ErrorMessage(int code) {
  PCRE2_UCHAR buf[256];
  if (pcre2_get_error_message(code, buf, sizeof(buf)) < 0) {
    return absl::StrCat("PCRE2 error ", code);
  }
  return std::string(reinterpret_cast<const char*>(buf));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// PreTokenizer: the compiled K2 pattern. pcre2_code (and its JIT code) is read-only after
// compilation and may be matched from many threads at once; match data and JIT stacks are per call.

class PreTokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<PreTokenizer>> Create() {
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kKimiPatternPcre2.data()),
                                     kKimiPatternPcre2.size(), PCRE2_UTF | PCRE2_UCP, &error_code,
                                     &error_offset, nullptr);
    if (code == nullptr) {
      return absl::InternalError(absl::StrCat("cannot compile the pre-tokenizer pattern at offset ",
                                              error_offset, ": ", Pcre2ErrorMessage(error_code)));
    }
    auto pre = std::unique_ptr<PreTokenizer>(new PreTokenizer(code));
    const int jit_rc = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    if (jit_rc != 0) {
      KLS_LOG(WARNING) << "PCRE2 JIT unavailable (" << Pcre2ErrorMessage(jit_rc)
                       << "); the tokenizer uses the PCRE2 interpreter";
    }
    return pre;
  }

  ~PreTokenizer() { pcre2_code_free(code_); }
  PreTokenizer(const PreTokenizer&) = delete;
  PreTokenizer& operator=(const PreTokenizer&) = delete;

  // Calls fn(piece) for each match of the pattern in `text` (valid UTF-8), in order. The pattern
  // matches at every position (each code point is Han, a letter, a number, White_Space or other),
  // so the pieces tile the text; INTERNAL if they ever do not, or if PCRE2 fails.
  template <typename Fn>
  absl::Status ForEachPiece(std::string_view text, Fn&& fn) const {
    MatchResources res;
    res.match_data = pcre2_match_data_create(1, nullptr);
    if (res.match_data == nullptr) return absl::ResourceExhaustedError("pcre2_match_data_create");
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t offset = 0;
    while (offset < text.size()) {
      int rc = pcre2_match(code_, subject, text.size(), offset, PCRE2_NO_UTF_CHECK, res.match_data,
                           res.match_context);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT && res.jit_stack == nullptr) {
        // The default 32 KiB JIT stack is too small for very long runs (the lookahead-guarded
        // letter classes push a frame per code point). Retry with a large one.
        KLS_RETURN_IF_ERROR(res.AddLargeJitStack());
        rc = pcre2_match(code_, subject, text.size(), offset, PCRE2_NO_UTF_CHECK, res.match_data,
                         res.match_context);
      }
      if (rc < 0) {
        return absl::InternalError(absl::StrCat("pre-tokenizer match failed at byte ", offset, ": ",
                                                Pcre2ErrorMessage(rc)));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(res.match_data);
      if (ov[0] != offset || ov[1] <= ov[0] || ov[1] > text.size()) {
        return absl::InternalError(absl::StrCat("pre-tokenizer left bytes ", offset, "..", ov[0],
                                                " unmatched (match end ", ov[1], ")"));
      }
      KLS_RETURN_IF_ERROR(fn(text.substr(ov[0], ov[1] - ov[0])));
      offset = ov[1];
    }
    return absl::OkStatus();
  }

 private:
  struct MatchResources {
    pcre2_match_data* match_data = nullptr;
    pcre2_match_context* match_context = nullptr;
    pcre2_jit_stack* jit_stack = nullptr;
    ~MatchResources() {
      pcre2_match_data_free(match_data);
      pcre2_match_context_free(match_context);
      pcre2_jit_stack_free(jit_stack);
    }
    absl::Status AddLargeJitStack() {
      // A reference-encode segment has at most 25,000 consecutive non-space code points; 64 MiB
      // is far above what the pattern needs for that (pages are committed only when touched).
      jit_stack = pcre2_jit_stack_create(1 << 16, 64 << 20, nullptr);
      match_context = pcre2_match_context_create(nullptr);
      if (jit_stack == nullptr || match_context == nullptr) {
        return absl::ResourceExhaustedError("cannot allocate a PCRE2 JIT stack");
      }
      pcre2_jit_stack_assign(match_context, nullptr, jit_stack);
      return absl::OkStatus();
    }
  };

  explicit PreTokenizer(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

// ---------------------------------------------------------------------------------------------
// Loading.

namespace {

struct ParsedRanks {
  std::string token_bytes;  // in rank order
  std::vector<uint32_t> offsets;
};

absl::StatusOr<ParsedRanks> ParseTiktokenModel(std::string_view contents, std::string_view name) {
  const absl::string_view file = AsAbsl(name);
  if (contents.size() >= std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": file too large"));
  }
  // Pass 1: decode tokens in file order.
  struct Entry {
    uint32_t offset;
    uint32_t size;
    int64_t rank;
    int64_t line;
  };
  std::vector<Entry> entries;
  entries.reserve(contents.size() / 12 + 1);
  std::string decoded;
  decoded.reserve(contents.size() * 3 / 4);
  int64_t line_no = 0;
  size_t pos = 0;
  while (pos < contents.size()) {
    size_t eol = contents.find('\n', pos);
    if (eol == std::string_view::npos) eol = contents.size();
    std::string_view line = contents.substr(pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    auto error = [&](std::string_view what) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ":", line_no, ": ", AsAbsl(what), " in line '", Excerpt(line), "'"));
    };
    const size_t sep = line.find_first_of(" \t");
    if (sep == std::string_view::npos) return error("expected 'base64token rank'");
    const std::string_view token = line.substr(0, sep);
    const size_t rank_begin = line.find_first_not_of(" \t", sep);
    if (rank_begin == std::string_view::npos) return error("missing rank");
    const std::string_view rank_text = line.substr(rank_begin);
    if (rank_text.find_first_of(" \t") != std::string_view::npos) {
      return error("expected exactly two fields");
    }
    int64_t rank = -1;
    const auto [ptr, ec] =
        std::from_chars(rank_text.data(), rank_text.data() + rank_text.size(), rank);
    if (ec != std::errc() || ptr != rank_text.data() + rank_text.size() || rank < 0 ||
        rank > std::numeric_limits<int32_t>::max() - kNumSpecialTokenSlots) {
      return error("rank is not a non-negative 32-bit integer");
    }
    const size_t before = decoded.size();
    if (!Base64DecodeAppend(token, &decoded)) return error("token is not valid base64");
    entries.push_back({static_cast<uint32_t>(before),
                       static_cast<uint32_t>(decoded.size() - before), rank, line_no});
  }
  const int64_t n = static_cast<int64_t>(entries.size());
  if (n == 0) return absl::InvalidArgumentError(absl::StrCat(file, ": no tokens"));
  if (n > std::numeric_limits<int32_t>::max() - kNumSpecialTokenSlots) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": too many tokens (", n, ")"));
  }

  // Pass 2: ranks must be exactly 0..n-1, because the special tokens start at n.
  std::vector<int64_t> entry_of_rank(static_cast<size_t>(n), -1);
  for (int64_t e = 0; e < n; ++e) {
    const Entry& entry = entries[static_cast<size_t>(e)];
    if (entry.rank >= n) {
      return absl::InvalidArgumentError(absl::StrCat(file, ":", entry.line, ": rank ", entry.rank,
                                                     " is not below the number of tokens (", n,
                                                     "); ranks must be contiguous from 0"));
    }
    int64_t& slot = entry_of_rank[static_cast<size_t>(entry.rank)];
    if (slot >= 0) {
      return absl::InvalidArgumentError(absl::StrCat(file, ":", entry.line, ": duplicate rank ",
                                                     entry.rank, " (also on line ",
                                                     entries[static_cast<size_t>(slot)].line, ")"));
    }
    slot = e;
  }
  // n distinct ranks in [0, n) cover it exactly.

  ParsedRanks out;
  out.token_bytes.reserve(decoded.size());
  out.offsets.reserve(static_cast<size_t>(n) + 1);
  for (int64_t r = 0; r < n; ++r) {
    const Entry& entry = entries[static_cast<size_t>(entry_of_rank[static_cast<size_t>(r)])];
    out.offsets.push_back(static_cast<uint32_t>(out.token_bytes.size()));
    out.token_bytes.append(decoded, entry.offset, entry.size);
  }
  out.offsets.push_back(static_cast<uint32_t>(out.token_bytes.size()));
  return out;
}

// bos_token / eos_token: a string, or an AddedToken object {"content": ...}; missing or null means
// the reference default.
absl::StatusOr<std::string> SpecialTokenField(const nlohmann::json& config, const char* key,
                                              const char* default_name, absl::string_view file) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::string(default_name);
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) return content->get<std::string>();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(file, ": ", key, " must be a string or an object with a string \"content\""));
}

}  // namespace

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& model_dir) {
  const std::string model_path = absl::StrCat(model_dir, "/tiktoken.model");
  const std::string config_path = absl::StrCat(model_dir, "/tokenizer_config.json");
  KLS_ASSIGN_OR_RETURN(const std::string model, ReadFileToString(model_path));
  KLS_ASSIGN_OR_RETURN(const std::string config, ReadFileToString(config_path));
  return Build(model, model_path, config, config_path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromContents(
    std::string_view tiktoken_model, std::string_view tokenizer_config_json) {
  return Build(tiktoken_model, "tiktoken.model", tokenizer_config_json, "tokenizer_config.json");
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Build(std::string_view tiktoken_model,
                                                            std::string_view model_name,
                                                            std::string_view config_json,
                                                            std::string_view config_name) {
  auto tok = std::unique_ptr<Tokenizer>(new Tokenizer());
  KLS_ASSIGN_OR_RETURN(ParsedRanks ranks, ParseTiktokenModel(tiktoken_model, model_name));
  tok->num_ranks_ = static_cast<int32_t>(ranks.offsets.size() - 1);
  tok->token_bytes_ = std::move(ranks.token_bytes);
  tok->token_offsets_ = std::move(ranks.offsets);
  tok->rank_of_.reserve(static_cast<size_t>(tok->num_ranks_));
  for (int32_t r = 0; r < tok->num_ranks_; ++r) {
    const std::string_view bytes = tok->MergeableBytes(r);
    auto [it, inserted] = tok->rank_of_.emplace(bytes, r);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(AsAbsl(model_name), ": ranks ", it->second,
                                                     " and ", r, " have the same token bytes '",
                                                     Excerpt(bytes), "'"));
    }
  }
  // Every final BPE part is a single byte or a merge that exists, so with all 256 bytes present
  // encoding cannot fail.
  for (int b = 0; b < 256; ++b) {
    const char c = static_cast<char>(b);
    if (tok->Rank(std::string_view(&c, 1)) < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(AsAbsl(model_name), ": no token for the single byte 0x",
                       absl::Hex(b, absl::kZeroPad2), " (byte-level BPE needs all 256)"));
    }
  }

  // tokenizer_config.json.
  const absl::string_view cfg_file = AsAbsl(config_name);
  const nlohmann::json config =
      nlohmann::json::parse(config_json.begin(), config_json.end(), nullptr,
                            /*allow_exceptions=*/false);
  if (config.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_file, ": not valid JSON"));
  }
  if (!config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_file, ": top level must be an object"));
  }
  const int64_t n = tok->num_ranks_;
  tok->special_names_.resize(kNumSpecialTokenSlots);
  for (int32_t s = 0; s < kNumSpecialTokenSlots; ++s) {
    tok->special_names_[static_cast<size_t>(s)] = absl::StrCat("<|reserved_token_", n + s, "|>");
  }
  if (auto it = config.find("added_tokens_decoder"); it != config.end() && !it->is_null()) {
    if (!it->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(cfg_file, ": added_tokens_decoder must be an object"));
    }
    for (const auto& [key, value] : it->items()) {
      int64_t id = -1;
      const auto [ptr, ec] = std::from_chars(key.data(), key.data() + key.size(), id);
      if (ec != std::errc() || ptr != key.data() + key.size() || id < 0) {
        return absl::InvalidArgumentError(absl::StrCat(cfg_file, ": added_tokens_decoder key '",
                                                       Excerpt(key), "' is not a token id"));
      }
      if (id < n) {
        return absl::InvalidArgumentError(
            absl::StrCat(cfg_file, ": added_tokens_decoder id ", id, " is below ", n,
                         ", the first special-token id: it would shadow mergeable rank ", id,
                         " of ", AsAbsl(model_name)));
      }
      if (id >= n + kNumSpecialTokenSlots) {
        // The reference tokenizer builds kNumReferenceSpecialTokenIds slots, so a released config
        // may name the last two; they are outside the embedding (vocab_size) and never produced.
        if (id < n + kNumReferenceSpecialTokenIds) continue;
        return absl::InvalidArgumentError(absl::StrCat(
            cfg_file, ": added_tokens_decoder id ", id, " is past the ",
            kNumReferenceSpecialTokenIds, " special-token ids [", n, ", ",
            n + kNumReferenceSpecialTokenIds, ") of the reference tokenizer, after the ", n,
            " ranks of ", AsAbsl(model_name), " (is tiktoken.model from another model?)"));
      }
      const nlohmann::json* content = nullptr;
      if (value.is_object()) {
        if (auto c = value.find("content"); c != value.end()) content = &*c;
      }
      if (content == nullptr || !content->is_string() ||
          content->get_ref<const std::string&>().empty()) {
        return absl::InvalidArgumentError(absl::StrCat(cfg_file, ": added_tokens_decoder[\"", key,
                                                       "\"].content must be a non-empty string"));
      }
      tok->special_names_[static_cast<size_t>(id - n)] = content->get<std::string>();
    }
  }
  tok->special_ids_.reserve(kNumSpecialTokenSlots);
  for (int32_t s = 0; s < kNumSpecialTokenSlots; ++s) {
    const std::string& name = tok->special_names_[static_cast<size_t>(s)];
    auto [it, inserted] = tok->special_ids_.emplace(name, static_cast<int32_t>(n + s));
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(cfg_file, ": special token name '",
                                                     Excerpt(name), "' is used by ids ", it->second,
                                                     " and ", n + s));
    }
  }
  KLS_ASSIGN_OR_RETURN(const std::string bos_name,
                       SpecialTokenField(config, "bos_token", "[BOS]", cfg_file));
  KLS_ASSIGN_OR_RETURN(const std::string eos_name,
                       SpecialTokenField(config, "eos_token", "[EOS]", cfg_file));
  const std::optional<int32_t> bos = tok->SpecialTokenId(bos_name);
  const std::optional<int32_t> eos = tok->SpecialTokenId(eos_name);
  if (!bos.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(cfg_file, ": bos_token '", Excerpt(bos_name), "' is not a special token"));
  }
  if (!eos.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(cfg_file, ": eos_token '", Excerpt(eos_name), "' is not a special token"));
  }
  tok->bos_id_ = *bos;
  tok->eos_id_ = *eos;

  KLS_ASSIGN_OR_RETURN(tok->pre_tokenizer_, PreTokenizer::Create());
  return tok;
}

// ---------------------------------------------------------------------------------------------
// Lookups.

std::string_view Tokenizer::MergeableBytes(int32_t rank) const {
  const size_t r = static_cast<size_t>(rank);
  return std::string_view(token_bytes_)
      .substr(token_offsets_[r], token_offsets_[r + 1] - token_offsets_[r]);
}

int32_t Tokenizer::Rank(std::string_view bytes) const {
  auto it = rank_of_.find(bytes);
  return it == rank_of_.end() ? -1 : it->second;
}

std::optional<int32_t> Tokenizer::SpecialTokenId(std::string_view name) const {
  auto it = special_ids_.find(AsAbsl(name));
  if (it == special_ids_.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<std::string_view> Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("token id ", id, " is outside the vocabulary [0, ", vocab_size(), ")"));
  }
  if (id >= num_ranks_)
    return std::string_view(special_names_[static_cast<size_t>(id - num_ranks_)]);
  return MergeableBytes(id);
}

// ---------------------------------------------------------------------------------------------
// Encoding.

// tiktoken's `_byte_pair_merge`: parts[k] = (start byte, rank of the pair starting at part k);
// repeatedly merge the leftmost pair of lowest rank, where a pair's rank is the rank of its two
// parts' concatenated bytes. O(n^2) in the piece length, fast for short pieces.
absl::Status Tokenizer::BytePairEncodeLinearScan(std::string_view piece,
                                                 std::vector<int32_t>* out) const {
  const size_t n = piece.size();
  auto bytes_rank = [&](size_t begin, size_t end) -> uint32_t {
    const int32_t r = Rank(piece.substr(begin, end - begin));
    return r < 0 ? kNoRank : static_cast<uint32_t>(r);
  };
  std::vector<std::pair<size_t, uint32_t>> parts;
  parts.reserve(n + 1);
  std::pair<uint32_t, size_t> min_rank = {kNoRank, 0};
  for (size_t i = 0; i + 1 < n; ++i) {
    const uint32_t r = bytes_rank(i, i + 2);
    if (r < min_rank.first) min_rank = {r, i};
    parts.emplace_back(i, r);
  }
  parts.emplace_back(n - 1, kNoRank);
  parts.emplace_back(n, kNoRank);
  // Rank of part i merged with part i + 1, as if part i + 1 were already merged into i (the +3 of
  // tiktoken: parts[i + 1] is removed after the neighbours are updated).
  auto get_rank = [&](size_t i) -> uint32_t {
    return i + 3 < parts.size() ? bytes_rank(parts[i].first, parts[i + 3].first) : kNoRank;
  };
  while (min_rank.first != kNoRank) {
    const size_t i = min_rank.second;
    if (i > 0) parts[i - 1].second = get_rank(i - 1);
    parts[i].second = get_rank(i);
    parts.erase(parts.begin() + static_cast<std::ptrdiff_t>(i) + 1);
    min_rank = {kNoRank, 0};
    for (size_t k = 0; k + 1 < parts.size(); ++k) {
      if (parts[k].second < min_rank.first) min_rank = {parts[k].second, k};
    }
  }
  for (size_t k = 0; k + 1 < parts.size(); ++k) {
    const uint32_t r = bytes_rank(parts[k].first, parts[k + 1].first);
    if (r == kNoRank) return absl::InternalError("BPE produced a part that is not a token");
    out->push_back(static_cast<int32_t>(r));
  }
  return absl::OkStatus();
}

// The same merge order in O(n log n): parts form a linked list over byte positions; a min-heap on
// (pair rank, start byte) with per-part version stamps replaces the linear scan. Ties go to the
// smallest start, i.e. the leftmost pair, exactly as the scan's strict `<` does.
absl::Status Tokenizer::BytePairEncodeHeap(std::string_view piece,
                                           std::vector<int32_t>* out) const {
  const uint32_t n = static_cast<uint32_t>(piece.size());
  // Node i is the part starting at byte i; node n is the end sentinel.
  std::vector<uint32_t> next(n + 1), prev(n + 1), version(n + 1, 0);
  for (uint32_t i = 0; i <= n; ++i) {
    next[i] = i + 1;
    prev[i] = i == 0 ? 0 : i - 1;
  }
  auto pair_rank = [&](uint32_t i) -> uint32_t {
    const uint32_t j = next[i];
    if (j >= n) return kNoRank;
    const int32_t r = Rank(piece.substr(i, next[j] - i));
    return r < 0 ? kNoRank : static_cast<uint32_t>(r);
  };
  using Entry = std::tuple<uint32_t, uint32_t, uint32_t>;  // (rank, start, version)
  std::vector<Entry> storage;
  storage.reserve(n);
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap(std::greater<Entry>(),
                                                                           std::move(storage));
  for (uint32_t i = 0; i + 1 < n; ++i) {
    const uint32_t r = pair_rank(i);
    if (r != kNoRank) heap.emplace(r, i, 0);
  }
  auto refresh = [&](uint32_t i) {
    ++version[i];
    const uint32_t r = pair_rank(i);
    if (r != kNoRank) heap.emplace(r, i, version[i]);
  };
  while (!heap.empty()) {
    const auto [r, i, v] = heap.top();
    heap.pop();
    if (v != version[i]) continue;  // stale (also covers merged-away nodes, whose version moved)
    const uint32_t j = next[i];
    next[i] = next[j];
    prev[next[j]] = i;
    ++version[j];  // j is gone; its entries are stale
    refresh(i);
    if (i > 0) refresh(prev[i]);
  }
  for (uint32_t i = 0; i < n; i = next[i]) {
    const int32_t r = Rank(piece.substr(i, next[i] - i));
    if (r < 0) return absl::InternalError("BPE produced a part that is not a token");
    out->push_back(r);
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::EncodePiece(std::string_view piece, std::vector<int32_t>* out) const {
  if (const int32_t r = Rank(piece); r >= 0) {
    out->push_back(r);
    return absl::OkStatus();
  }
  if (piece.size() < 2) return absl::InternalError("single byte without a rank");
  if (piece.size() >= kHeapBpeMinBytes) return BytePairEncodeHeap(piece, out);
  return BytePairEncodeLinearScan(piece, out);
}

absl::Status Tokenizer::EncodeSegment(std::string_view segment, std::vector<int32_t>* out) const {
  return pre_tokenizer_->ForEachPiece(
      segment, [&](std::string_view piece) { return EncodePiece(piece, out); });
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text) const {
  if (size_t bad = 0; !IsValidUtf8(text, &bad)) {
    return absl::InvalidArgumentError(absl::StrCat("text is not valid UTF-8 (byte offset ", bad,
                                                   ": '", Excerpt(text.substr(bad, 4)), "')"));
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  KLS_RETURN_IF_ERROR(ForEachReferenceSegment(
      text, [&](std::string_view segment) { return EncodeSegment(segment, &ids); }));
  return ids;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::TEST_BytePairEncode(std::string_view piece,
                                                                    bool use_heap) const {
  std::vector<int32_t> ids;
  if (piece.empty()) return ids;
  if (piece.size() == 1) {
    KLS_RETURN_IF_ERROR(EncodePiece(piece, &ids));
    return ids;
  }
  KLS_RETURN_IF_ERROR(use_heap ? BytePairEncodeHeap(piece, &ids)
                               : BytePairEncodeLinearScan(piece, &ids));
  return ids;
}

// ---------------------------------------------------------------------------------------------
// Decoding.

absl::StatusOr<std::string> Tokenizer::Decode(std::span<const int32_t> ids,
                                              bool skip_special) const {
  std::string out;
  out.reserve(ids.size() * 4);
  for (const int32_t id : ids) {
    KLS_ASSIGN_OR_RETURN(const std::string_view bytes, TokenBytes(id));
    if (skip_special && id >= num_ranks_) continue;
    out.append(bytes);
  }
  return out;
}

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, bool skip_special)
    : tokenizer_(tokenizer), skip_special_(skip_special) {}

absl::StatusOr<std::string> StreamingDecoder::Push(int32_t id) {
  KLS_ASSIGN_OR_RETURN(const std::string_view bytes, tokenizer_.TokenBytes(id));
  if (skip_special_ && tokenizer_.IsSpecial(id)) return std::string();
  pending_.append(bytes);
  std::string out;
  const size_t consumed = AppendUtf8WithReplacement(pending_, /*final=*/false, &out);
  pending_.erase(0, consumed);
  return out;
}

std::string StreamingDecoder::Flush() {
  std::string out;
  AppendUtf8WithReplacement(pending_, /*final=*/true, &out);
  pending_.clear();
  return out;
}

}  // namespace kls::engine

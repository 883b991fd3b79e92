#include "services/router/api_keys.h"

#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "services/common/session_ids.h"

namespace kls::router {

absl::StatusOr<ApiKeys> ApiKeys::Parse(std::string_view text, std::string_view source_view) {
  const std::string source(source_view);
  ApiKeys keys;
  std::unordered_map<std::string, int> line_of_key;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(absl::string_view(text.data(), text.size()), '\n')) {
    ++line_number;
    std::vector<absl::string_view> fields;
    for (absl::string_view field :
         absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty())) {
      if (absl::StartsWith(field, "#")) break;
      fields.push_back(field);
    }
    if (fields.empty()) continue;
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ":", line_number, ": want \"<key> <tenant>\", got ", fields.size(), " fields"));
    }
    std::string key(fields[0]);
    std::string tenant(fields[1]);
    if (absl::Status s = services::ValidateSessionId("tenant", tenant); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ":", line_number, ": ", s.message()));
    }
    auto [it, inserted] = line_of_key.emplace(key, line_number);
    if (!inserted) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ":", line_number, ": repeats the key of line ", it->second));
    }
    keys.tenant_by_key_.emplace(std::move(key), std::move(tenant));
  }
  if (keys.tenant_by_key_.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source,
                     ": no API keys (lines \"<key> <tenant>\"); every caller would be "
                     "refused"));
  }
  return keys;
}

absl::StatusOr<ApiKeys> ApiKeys::Load(const std::string& path) {
  KLS_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return Parse(text, path);
}

absl::StatusOr<std::string> ApiKeys::Authenticate(
    std::optional<std::string_view> authorization) const {
  if (!authorization.has_value()) {
    return absl::UnauthenticatedError(
        "missing \"authorization\" metadata; send \"authorization: Bearer <api key>\"");
  }
  absl::string_view value(authorization->data(), authorization->size());
  constexpr absl::string_view kScheme = "bearer ";
  if (value.size() < kScheme.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme)) {
    return absl::UnauthenticatedError(
        "\"authorization\" metadata is not a Bearer credential; send \"Bearer <api key>\"");
  }
  const absl::string_view key = absl::StripAsciiWhitespace(value.substr(kScheme.size()));
  auto it = tenant_by_key_.find(std::string(key));
  if (it == tenant_by_key_.end()) return absl::UnauthenticatedError("unknown API key");
  return it->second;
}

}  // namespace kls::router

#include "services/common/session_ids.h"

#include <algorithm>
#include <cstdint>
#include <random>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kls::services {
namespace {

bool IsIdChar(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

}  // namespace

absl::Status ValidateSessionId(std::string_view field, std::string_view id) {
  if (id.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(field), " is required"));
  }
  // Quote at most 64 bytes so a hostile id cannot flood the message or the logs.
  const auto shown = [&id] {
    const size_t n = std::min<size_t>(id.size(), 64);
    return absl::StrCat(absl::CHexEscape(absl::string_view(id.data(), n)),
                        id.size() > n ? "..." : "");
  };
  if (id.size() > kMaxSessionIdBytes) {
    return absl::InvalidArgumentError(absl::StrFormat("%s \"%s\" is %d bytes; at most %d allowed",
                                                      std::string(field), shown(), id.size(),
                                                      kMaxSessionIdBytes));
  }
  for (size_t i = 0; i < id.size(); ++i) {
    if (!IsIdChar(id[i])) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s \"%s\" has a byte outside [A-Za-z0-9._-] at offset %d",
                          std::string(field), shown(), i));
    }
  }
  return absl::OkStatus();
}

std::string NewSessionId() {
  // std::random_device reads getrandom(2) on Linux; one device per call keeps this thread-safe.
  std::random_device device;
  uint32_t words[4];
  for (uint32_t& w : words) w = device();
  return absl::StrFormat("%08x%08x%08x%08x", words[0], words[1], words[2], words[3]);
}

std::string PlacementKey(std::string_view tenant, std::string_view session_id) {
  return absl::StrCat(absl::string_view(tenant.data(), tenant.size()), "/",
                      absl::string_view(session_id.data(), session_id.size()));
}

}  // namespace kls::services

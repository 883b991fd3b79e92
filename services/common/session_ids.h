// Session ids and tenant names as kls accepts them (router and worker): [A-Za-z0-9._-], 1 to 128
// bytes. The charset keeps ids safe inside store keys ("<tenant>/<session_id>"), logs and URLs.
#ifndef KLS_SERVICES_COMMON_SESSION_IDS_H_
#define KLS_SERVICES_COMMON_SESSION_IDS_H_

#include <cstddef>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace kls::services {

inline constexpr size_t kMaxSessionIdBytes = 128;

// OK when `id` is 1 to 128 bytes of [A-Za-z0-9._-]; else INVALID_ARGUMENT naming `field` and
// the offending value (truncated when long, with non-printable bytes escaped).
absl::Status ValidateSessionId(std::string_view field, std::string_view id);

// A fresh random 128-bit id: 32 lowercase hex digits from the OS entropy source.
// Thread-safe.
std::string NewSessionId();

// The key that places a session and names it in the affinity map: "<tenant>/<session_id>"
// (the store's session key). Tenants contain no '/', so the key is unambiguous.
std::string PlacementKey(std::string_view tenant, std::string_view session_id);

}  // namespace kls::services

#endif  // KLS_SERVICES_COMMON_SESSION_IDS_H_

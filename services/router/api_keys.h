// API keys: the router's authentication. A keys file maps each key to a tenant, one per line:
//
//   # comment
//   <key> <tenant>        # trailing comment
//
// Fields are separated by spaces or tabs; a field starting with '#' starts a comment. Tenants
// follow the session id charset ([A-Za-z0-9._-], 1..128 bytes) because they prefix store keys.
// Clients send the key as gRPC metadata "authorization: Bearer <key>".
#ifndef KLS_SERVICES_ROUTER_API_KEYS_H_
#define KLS_SERVICES_ROUTER_API_KEYS_H_

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kls::router {

// Immutable after construction, so any number of threads may call Authenticate concurrently.
class ApiKeys {
 public:
  // Parses the text of a keys file; `source` names it in errors. INVALID_ARGUMENT (naming the
  // source and line, never the key) for a malformed line, a bad tenant, a repeated key, or a
  // file with no keys (which would lock every caller out).
  static absl::StatusOr<ApiKeys> Parse(std::string_view text, std::string_view source);
  // Reads and parses `path`. NOT_FOUND if it does not exist; else the errors of Parse.
  static absl::StatusOr<ApiKeys> Load(const std::string& path);

  // The tenant of an "authorization" metadata value "Bearer <key>" (scheme case-insensitive).
  // UNAUTHENTICATED when the value is absent, not a Bearer credential, or an unknown key; the
  // message never echoes the key.
  absl::StatusOr<std::string> Authenticate(std::optional<std::string_view> authorization) const;

  size_t size() const { return tenant_by_key_.size(); }

 private:
  std::unordered_map<std::string, std::string> tenant_by_key_;
};

}  // namespace kls::router

#endif  // KLS_SERVICES_ROUTER_API_KEYS_H_

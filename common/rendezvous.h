// Rendezvous (highest-random-weight) hashing: every process that knows the same candidate set
// picks the same owners for a key, with no coordination, and removing a candidate moves only
// the keys it owned.
#ifndef KLS_COMMON_RENDEZVOUS_H_
#define KLS_COMMON_RENDEZVOUS_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace kls {

// The weight of `candidate` for `key`; higher wins. Stable across processes and builds.
uint64_t RendezvousWeight(std::string_view key, std::string_view candidate);

// Indices into `candidates` of the top `count` owners of `key`, best first (fewer if there are
// fewer candidates). Ties (identical names) break by index.
std::vector<size_t> RendezvousRank(std::string_view key, const std::vector<std::string>& candidates,
                                   size_t count);

}  // namespace kls

#endif  // KLS_COMMON_RENDEZVOUS_H_

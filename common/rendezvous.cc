#include "common/rendezvous.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "common/hash.h"
#include "common/splitmix64.h"

namespace kls {

uint64_t RendezvousWeight(std::string_view key, std::string_view candidate) {
  // Hash the pair with length prefixes (so "ab"+"c" != "a"+"bc"), then mix once more: XXH3's
  // low bits are already uniform, the extra mix only guards against structured names.
  Hasher128 hasher;
  hasher.Add(key).Add(candidate);
  return SplitMix64Mix(hasher.Finish().low);
}

std::vector<size_t> RendezvousRank(std::string_view key, const std::vector<std::string>& candidates,
                                   size_t count) {
  std::vector<uint64_t> weights(candidates.size());
  for (size_t i = 0; i < candidates.size(); ++i) weights[i] = RendezvousWeight(key, candidates[i]);
  std::vector<size_t> order(candidates.size());
  std::iota(order.begin(), order.end(), size_t{0});
  count = std::min(count, order.size());
  std::partial_sort(order.begin(), order.begin() + count, order.end(), [&](size_t a, size_t b) {
    return weights[a] != weights[b] ? weights[a] > weights[b] : a < b;
  });
  order.resize(count);
  return order;
}

}  // namespace kls

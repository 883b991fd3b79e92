#include "services/router/affinity_map.h"

#include <algorithm>

namespace kls::router {

AffinityMap::AffinityMap(size_t capacity) : capacity_(std::max<size_t>(capacity, 1)) {}

std::optional<std::string> AffinityMap::Get(const std::string& key) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(key);
  if (it == index_.end()) return std::nullopt;
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->second;
}

void AffinityMap::Put(const std::string& key, const std::string& endpoint) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(key);
  if (it != index_.end()) {
    it->second->second = endpoint;
    lru_.splice(lru_.begin(), lru_, it->second);
    return;
  }
  lru_.emplace_front(key, endpoint);
  index_.emplace(key, lru_.begin());
  if (lru_.size() > capacity_) {
    index_.erase(lru_.back().first);
    lru_.pop_back();
  }
}

void AffinityMap::Erase(const std::string& key) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(key);
  if (it == index_.end()) return;
  lru_.erase(it->second);
  index_.erase(it);
}

size_t AffinityMap::size() const {
  absl::MutexLock lock(&mu_);
  return lru_.size();
}

}  // namespace kls::router

// Session -> worker affinity: the endpoint that last served a session successfully, so a
// session that is hot on a live worker stays there even when the ready set (and with it the
// rendezvous order) changes. Bounded LRU; losing an entry costs only a restore from the store.
#ifndef KLS_SERVICES_ROUTER_AFFINITY_MAP_H_
#define KLS_SERVICES_ROUTER_AFFINITY_MAP_H_

#include <cstddef>
#include <list>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace kls::router {

// Thread-safe: every method takes the internal mutex; none blocks on I/O.
class AffinityMap {
 public:
  // `capacity` >= 1 entries; inserting beyond it evicts the least recently used entry.
  explicit AffinityMap(size_t capacity);
  AffinityMap(const AffinityMap&) = delete;
  AffinityMap& operator=(const AffinityMap&) = delete;

  // The endpoint recorded for `key` (and marks the entry recently used); nullopt if none.
  std::optional<std::string> Get(const std::string& key) ABSL_LOCKS_EXCLUDED(mu_);
  // Records (or replaces) `key` -> `endpoint` as the most recently used entry.
  void Put(const std::string& key, const std::string& endpoint) ABSL_LOCKS_EXCLUDED(mu_);
  // Forgets `key`; no-op if absent.
  void Erase(const std::string& key) ABSL_LOCKS_EXCLUDED(mu_);
  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  using Entry = std::pair<std::string, std::string>;  // key, endpoint; front = most recent

  const size_t capacity_;
  mutable absl::Mutex mu_;
  std::list<Entry> lru_ ABSL_GUARDED_BY(mu_);
  std::unordered_map<std::string, std::list<Entry>::iterator> index_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kls::router

#endif  // KLS_SERVICES_ROUTER_AFFINITY_MAP_H_

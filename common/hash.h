// Hashing: XXH3 (64 and 128 bit) for fingerprints, content addressing and checksums.
#ifndef KLS_COMMON_HASH_H_
#define KLS_COMMON_HASH_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kls {

struct Hash128 {
  uint64_t high = 0;
  uint64_t low = 0;
  // 32 lowercase hex digits, high word first.
  std::string ToHex() const;
  friend bool operator==(const Hash128&, const Hash128&) = default;
};

uint64_t Xxh3_64(const void* data, size_t size, uint64_t seed = 0);
inline uint64_t Xxh3_64(std::string_view s, uint64_t seed = 0) {
  return Xxh3_64(s.data(), s.size(), seed);
}
Hash128 Xxh3_128(const void* data, size_t size, uint64_t seed = 0);

// Incremental XXH3-128 over a sequence of fields. Each field is length-prefixed, so
// ("ab", "c") and ("a", "bc") hash differently. Not thread-safe.
class Hasher128 {
 public:
  Hasher128();
  ~Hasher128();
  Hasher128(const Hasher128&) = delete;
  Hasher128& operator=(const Hasher128&) = delete;

  Hasher128& Add(const void* data, size_t size);
  Hasher128& Add(std::string_view s) { return Add(s.data(), s.size()); }
  Hasher128& AddU64(uint64_t v);
  Hash128 Finish() const;

 private:
  void* state_;  // XXH3_state_t*, kept opaque so xxhash.h stays out of our headers.
};

}  // namespace kls

#endif  // KLS_COMMON_HASH_H_

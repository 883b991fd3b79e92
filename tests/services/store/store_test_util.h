// Small builders shared by the store tests.
#ifndef KLS_TESTS_SERVICES_STORE_STORE_TEST_UTIL_H_
#define KLS_TESTS_SERVICES_STORE_STORE_TEST_UTIL_H_

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kls/v1/store.pb.h"
#include "services/store/shard.h"

namespace kls::store {

inline constexpr Family kSessions = kls::v1::COLUMN_FAMILY_SESSIONS;
inline constexpr Family kState = kls::v1::COLUMN_FAMILY_STATE;
inline constexpr Family kBlocks = kls::v1::COLUMN_FAMILY_BLOCKS;
inline constexpr Family kTokens = kls::v1::COLUMN_FAMILY_TOKENS;

// `n` seeded random bytes (values that do not compress and are not all zeros).
inline std::string RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string bytes(n, '\0');
  for (size_t i = 0; i < n; ++i) bytes[i] = static_cast<char>(rng() & 0xff);
  return bytes;
}

// A serialized session record of tenant "t", session "s" at `version`.
inline std::string RecordValue(uint64_t version) {
  kls::v1::SessionRecord record;
  record.set_tenant("t");
  record.set_session_id("s");
  record.set_version(version);
  return record.SerializeAsString();
}

inline WriteOp Put(Family family, std::string key, std::string value) {
  return WriteOp{family, std::move(key), false, std::move(value)};
}
inline WriteOp Delete(Family family, std::string key) {
  return WriteOp{family, std::move(key), true, {}};
}
inline WriteBatchSpec Batch(std::vector<WriteOp> ops, bool sync = false) {
  WriteBatchSpec batch;
  batch.ops = std::move(ops);
  batch.sync = sync;
  return batch;
}

}  // namespace kls::store

#endif  // KLS_TESTS_SERVICES_STORE_STORE_TEST_UTIL_H_

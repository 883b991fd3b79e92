#include "services/common/session_ids.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

#include "absl/strings/match.h"

namespace kls::services {
namespace {

TEST(SessionIdsTest, AcceptsTheCharsetUpTo128Bytes) {
  for (const std::string& id :
       {std::string("a"), std::string("Session_01.fork-2"), std::string(128, 'z'),
        std::string("0123456789abcdef0123456789abcdef")}) {
    EXPECT_TRUE(ValidateSessionId("session_id", id).ok()) << id;
  }
}

TEST(SessionIdsTest, RejectsNamingFieldAndValue) {
  absl::Status empty = ValidateSessionId("session_id", "");
  EXPECT_EQ(empty.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(empty.message(), "session_id is required");

  absl::Status slash = ValidateSessionId("new_session_id", "a/b");
  EXPECT_EQ(slash.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(slash.message(), "new_session_id \"a/b\"")) << slash;
  EXPECT_TRUE(absl::StrContains(slash.message(), "offset 1")) << slash;

  absl::Status too_long = ValidateSessionId("session_id", std::string(129, 'x'));
  EXPECT_EQ(too_long.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(too_long.message(), "129 bytes")) << too_long;
  EXPECT_LT(too_long.message().size(), 200u);  // the value is quoted truncated

  for (const std::string& bad : {std::string("sp ace"), std::string("nul\0x", 5),
                                 std::string("caf\xc3\xa9"), std::string("a:b")}) {
    absl::Status status = ValidateSessionId("session_id", bad);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_FALSE(absl::StrContains(status.message(), std::string("\0", 1)));
  }
}

TEST(SessionIdsTest, NewIdsAre128BitHexAndDistinct) {
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    std::string id = NewSessionId();
    ASSERT_EQ(id.size(), 32u);
    ASSERT_EQ(id.find_first_not_of("0123456789abcdef"), std::string::npos) << id;
    ASSERT_TRUE(ValidateSessionId("id", id).ok());
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 1000u);
}

TEST(SessionIdsTest, PlacementKeyIsTheStoreKey) {
  EXPECT_EQ(PlacementKey("default", "s1"), "default/s1");
}

}  // namespace
}  // namespace kls::services

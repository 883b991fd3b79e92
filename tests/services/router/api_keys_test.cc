#include "services/router/api_keys.h"

#include <gtest/gtest.h>

#include <string>

#include "absl/strings/match.h"
#include "common/file_util.h"
#include "tests/test_util.h"

namespace kls::router {
namespace {

TEST(ApiKeysTest, ParsesKeysCommentsAndBlankLines) {
  absl::StatusOr<ApiKeys> keys = ApiKeys::Parse(
      "# kls keys\n"
      "\n"
      "sk-alpha tenant-a\n"
      "  sk-beta\ttenant_b   # trailing comment\r\n"
      "sk#not-a-comment tenant.c\n",
      "keys.txt");
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_EQ(keys->size(), 3u);
  EXPECT_EQ(keys->Authenticate("Bearer sk-alpha").value(), "tenant-a");
  EXPECT_EQ(keys->Authenticate("Bearer sk-beta").value(), "tenant_b");
  EXPECT_EQ(keys->Authenticate("Bearer sk#not-a-comment").value(), "tenant.c");
  // The scheme is case-insensitive (RFC 7235); surrounding spaces around the key are ignored.
  EXPECT_EQ(keys->Authenticate("bearer sk-alpha").value(), "tenant-a");
  EXPECT_EQ(keys->Authenticate("BEARER  sk-alpha ").value(), "tenant-a");
}

TEST(ApiKeysTest, RefusesMalformedFilesNamingTheLineNotTheKey) {
  struct Case {
    const char* text;
    const char* want;  // substring of the message
  };
  const Case cases[] = {
      {"sk-only-a-key\n", "keys.txt:1: want \"<key> <tenant>\", got 1 fields"},
      {"# c\nsk-1 t1 extra\n", "keys.txt:2:"},
      {"sk-1 bad/tenant\n", "keys.txt:1: tenant"},
      {"sk-1 t1\nsk-1 t2\n", "keys.txt:2: repeats the key of line 1"},
      {"# nothing\n\n", "no API keys"},
      {"", "no API keys"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ApiKeys> keys = ApiKeys::Parse(c.text, "keys.txt");
    ASSERT_FALSE(keys.ok()) << c.text;
    EXPECT_EQ(keys.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_TRUE(absl::StrContains(keys.status().message(), c.want)) << keys.status();
    EXPECT_FALSE(absl::StrContains(keys.status().message(), "sk-1")) << keys.status();
  }
}

TEST(ApiKeysTest, AuthenticateRefusesMissingMalformedAndUnknownCredentials) {
  absl::StatusOr<ApiKeys> keys = ApiKeys::Parse("sk-alpha tenant-a\n", "keys.txt");
  ASSERT_TRUE(keys.ok());
  for (const std::optional<std::string_view>& value :
       {std::optional<std::string_view>(), std::optional<std::string_view>(""),
        std::optional<std::string_view>("sk-alpha"),
        std::optional<std::string_view>("Basic sk-alpha"),
        std::optional<std::string_view>("Bearer"), std::optional<std::string_view>("Bearer "),
        std::optional<std::string_view>("Bearer sk-alph"),
        std::optional<std::string_view>("Bearer sk-alpha2")}) {
    absl::StatusOr<std::string> tenant = keys->Authenticate(value);
    EXPECT_EQ(tenant.status().code(), absl::StatusCode::kUnauthenticated)
        << (value ? *value : "<none>");
    EXPECT_FALSE(absl::StrContains(tenant.status().message(), "sk-al")) << tenant.status();
  }
}

TEST(ApiKeysTest, LoadsFromFile) {
  const std::string dir = kls::testing::MakeTempDir();
  EXPECT_EQ(ApiKeys::Load(dir + "/missing").status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(WriteStringToFile(dir + "/keys", "sk-x team-x\n").ok());
  absl::StatusOr<ApiKeys> keys = ApiKeys::Load(dir + "/keys");
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_EQ(keys->Authenticate("Bearer sk-x").value(), "team-x");
  ASSERT_TRUE(WriteStringToFile(dir + "/bad", "sk-x\n").ok());
  absl::StatusOr<ApiKeys> bad = ApiKeys::Load(dir + "/bad");
  EXPECT_TRUE(absl::StrContains(bad.status().message(), dir + "/bad:1")) << bad.status();
  kls::testing::RemoveTree(dir);
}

}  // namespace
}  // namespace kls::router

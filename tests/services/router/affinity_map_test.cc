#include "services/router/affinity_map.h"

#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kls::router {
namespace {

TEST(AffinityMapTest, PutGetReplaceErase) {
  AffinityMap map(10);
  EXPECT_FALSE(map.Get("t/a").has_value());
  map.Put("t/a", "w1");
  EXPECT_EQ(map.Get("t/a"), "w1");
  map.Put("t/a", "w2");
  EXPECT_EQ(map.Get("t/a"), "w2");
  EXPECT_EQ(map.size(), 1u);
  map.Erase("t/a");
  map.Erase("t/never");
  EXPECT_FALSE(map.Get("t/a").has_value());
  EXPECT_EQ(map.size(), 0u);
}

TEST(AffinityMapTest, EvictsLeastRecentlyUsed) {
  AffinityMap map(3);
  map.Put("a", "w");
  map.Put("b", "w");
  map.Put("c", "w");
  ASSERT_TRUE(map.Get("a").has_value());  // a is now the most recent; b the least
  map.Put("d", "w");
  EXPECT_EQ(map.size(), 3u);
  EXPECT_FALSE(map.Get("b").has_value());
  EXPECT_TRUE(map.Get("a").has_value());
  EXPECT_TRUE(map.Get("c").has_value());
  EXPECT_TRUE(map.Get("d").has_value());
  map.Put("c", "w2");  // a replace refreshes too: a is now the least recent
  map.Put("e", "w");
  EXPECT_FALSE(map.Get("a").has_value());
  EXPECT_EQ(map.Get("c"), "w2");
}

TEST(AffinityMapTest, CapacityOneAndZero) {
  AffinityMap one(1);
  one.Put("a", "w");
  one.Put("b", "w");
  EXPECT_FALSE(one.Get("a").has_value());
  EXPECT_TRUE(one.Get("b").has_value());
  AffinityMap zero(0);  // clamped to 1
  zero.Put("a", "w");
  EXPECT_EQ(zero.size(), 1u);
}

TEST(AffinityMapTest, ConcurrentUseStaysBounded) {
  AffinityMap map(100);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&map, t] {
      for (int i = 0; i < 2000; ++i) {
        const std::string key = absl::StrCat("k", (i * 7 + t) % 300);
        map.Put(key, absl::StrCat("w", t));
        if (std::optional<std::string> got = map.Get(key); got.has_value()) {
          EXPECT_EQ(got->front(), 'w');
        }
        if (i % 5 == 0) map.Erase(key);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_LE(map.size(), 100u);
}

}  // namespace
}  // namespace kls::router

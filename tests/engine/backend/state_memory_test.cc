// The CUDA backend's host bookkeeping: KDA slots, reference-counted MLA pages with copy on
// write, and the memory plan.
#include "engine/backend/cuda/state_memory.h"

#include <gtest/gtest.h>

#include <numeric>
#include <set>

namespace kls::engine::cuda {
namespace {

TEST(SlotAllocatorTest, HandsOutLowestFreeSlotsAndRunsOut) {
  SlotAllocator slots(3);
  EXPECT_EQ(slots.Acquire(), 0);
  EXPECT_EQ(slots.Acquire(), 1);
  EXPECT_EQ(slots.Acquire(), 2);
  EXPECT_EQ(slots.Acquire(), std::nullopt);
  slots.Release(1);
  slots.Release(0);
  EXPECT_EQ(slots.num_free(), 2);
  EXPECT_EQ(slots.Acquire(), 0);
  EXPECT_EQ(slots.Acquire(), 1);
}

TEST(SlotAllocatorDeathTest, DoubleReleaseIsABug) {
  SlotAllocator slots(2);
  const int32_t s = *slots.Acquire();
  slots.Release(s);
  EXPECT_DEATH(slots.Release(s), "free slot");
}

TEST(PagePoolTest, AppendTakesPagesAsTokensCrossPageBoundaries) {
  PagePool pool(10, 4);
  PageTable t;
  std::vector<PageCopy> copies;
  EXPECT_EQ(pool.PagesToAppend(t, 1), 1);
  ASSERT_TRUE(pool.Append(t, 1, &copies));
  EXPECT_EQ(t.pages.size(), 1u);
  EXPECT_EQ(pool.PagesToAppend(t, 3), 0);  // fills page 0
  ASSERT_TRUE(pool.Append(t, 3, &copies));
  EXPECT_EQ(t.pages.size(), 1u);
  EXPECT_EQ(pool.PagesToAppend(t, 9), 3);  // 13 tokens need 4 pages
  ASSERT_TRUE(pool.Append(t, 9, &copies));
  EXPECT_EQ(t.num_tokens, 13);
  EXPECT_EQ(t.pages.size(), 4u);
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(pool.num_free(), 6);
  EXPECT_EQ(std::set<int32_t>(t.pages.begin(), t.pages.end()).size(), 4u);
}

TEST(PagePoolTest, AppendIsAllOrNothing) {
  PagePool pool(2, 4);
  PageTable t;
  std::vector<PageCopy> copies;
  ASSERT_TRUE(pool.Append(t, 5, &copies));
  const PageTable before = t;
  EXPECT_FALSE(pool.Append(t, 4, &copies));  // needs a third page
  EXPECT_EQ(t.pages, before.pages);
  EXPECT_EQ(t.num_tokens, before.num_tokens);
  EXPECT_EQ(pool.num_free(), 0);
  EXPECT_TRUE(pool.Append(t, 3, &copies));  // fits the second page exactly
  EXPECT_EQ(t.num_tokens, 8);
}

TEST(PagePoolTest, TruncateReleasesPagesPastTheEnd) {
  PagePool pool(8, 4);
  PageTable t;
  std::vector<PageCopy> copies;
  ASSERT_TRUE(pool.Append(t, 14, &copies));
  EXPECT_EQ(pool.num_free(), 4);
  pool.Truncate(t, 5);
  EXPECT_EQ(t.pages.size(), 2u);
  EXPECT_EQ(t.num_tokens, 5);
  EXPECT_EQ(pool.num_free(), 6);
  pool.Truncate(t, 0);
  EXPECT_TRUE(t.pages.empty());
  EXPECT_EQ(pool.num_free(), 8);
}

// A fork shares full pages forever and copies a shared partial page before writing into it;
// each side keeps its own copy, and pages return to the pool only when both let go.
TEST(PagePoolTest, ForksShareFullPagesAndCopyThePartialPageOnWrite) {
  PagePool pool(16, 4);
  PageTable parent;
  std::vector<PageCopy> copies;
  ASSERT_TRUE(pool.Append(parent, 10, &copies));  // pages: full, full, partial (2 of 4)
  PageTable child = pool.Share(parent);
  for (int32_t p : parent.pages) EXPECT_EQ(pool.refcount(p), 2);
  EXPECT_EQ(pool.num_free(), 13);

  EXPECT_EQ(pool.PagesToAppend(child, 1), 1);  // the copy of the partial page
  ASSERT_TRUE(pool.Append(child, 1, &copies));
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].from, parent.pages[2]);
  EXPECT_EQ(copies[0].to, child.pages[2]);
  EXPECT_NE(child.pages[2], parent.pages[2]);
  EXPECT_EQ(child.pages[0], parent.pages[0]);
  EXPECT_EQ(pool.refcount(parent.pages[2]), 1);
  EXPECT_EQ(pool.refcount(child.pages[2]), 1);

  // The parent now owns its partial page alone: no copy when it appends.
  copies.clear();
  ASSERT_TRUE(pool.Append(parent, 1, &copies));
  EXPECT_TRUE(copies.empty());

  pool.ReleaseAll(parent);
  EXPECT_EQ(pool.refcount(child.pages[0]), 1);
  pool.ReleaseAll(child);
  EXPECT_EQ(pool.num_free(), 16);
}

TEST(PagePoolTest, ForkAtAPageBoundaryNeedsNoCopy) {
  PagePool pool(8, 4);
  PageTable parent;
  std::vector<PageCopy> copies;
  ASSERT_TRUE(pool.Append(parent, 8, &copies));
  PageTable child = pool.Share(parent);
  EXPECT_EQ(pool.PagesToAppend(child, 1), 1);
  ASSERT_TRUE(pool.Append(child, 1, &copies));
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(child.pages[0], parent.pages[0]);
  EXPECT_NE(child.pages[2], -1);
}

// Truncating a fork below a shared page releases only its reference.
TEST(PagePoolTest, TruncatingAForkKeepsTheOtherSidesPages) {
  PagePool pool(8, 4);
  PageTable parent;
  std::vector<PageCopy> copies;
  ASSERT_TRUE(pool.Append(parent, 12, &copies));
  PageTable child = pool.Share(parent);
  pool.Truncate(child, 3);
  EXPECT_EQ(pool.refcount(parent.pages[0]), 2);
  EXPECT_EQ(pool.refcount(parent.pages[1]), 1);
  EXPECT_EQ(pool.refcount(parent.pages[2]), 1);
  // The child's last page is now shared and partial: writing copies it.
  ASSERT_TRUE(pool.Append(child, 1, &copies));
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].from, parent.pages[0]);
}

TEST(PlanStateMemoryTest, TwoSlotsPerSessionCappedAtHalfAndPagesTakeTheRest) {
  StateMemoryInput in;
  in.available_bytes = 1000;
  in.slot_bytes = 10;
  in.page_bytes = 3;
  in.page_size = 64;
  in.max_sessions = 8;
  in.max_context = 64;
  absl::StatusOr<StateMemoryPlan> plan = PlanStateMemory(in);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->num_slots, 16);
  EXPECT_EQ(plan->num_pages, (1000 - 160) / 3);
  EXPECT_LE(plan->bytes(), in.available_bytes);

  in.max_sessions = 1000;  // slots capped at half the memory
  plan = PlanStateMemory(in);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->num_slots, 50);
  EXPECT_EQ(plan->num_pages, 500 / 3);
}

TEST(PlanStateMemoryTest, RefusesMemoryThatCannotHoldOneFullContextSession) {
  StateMemoryInput in;
  in.slot_bytes = 100 << 20;
  in.page_bytes = 1 << 20;
  in.page_size = 64;
  in.max_sessions = 4;
  in.max_context = 64 * 100;  // 100 pages
  in.available_bytes = (200 << 20) + (99 << 20);
  absl::StatusOr<StateMemoryPlan> plan = PlanStateMemory(in);
  ASSERT_FALSE(plan.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(plan.status())) << plan.status();
  EXPECT_NE(plan.status().message().find("299 MiB"), std::string_view::npos) << plan.status();
  in.available_bytes += 1 << 20;
  EXPECT_TRUE(PlanStateMemory(in).ok());
  in.slot_bytes = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(PlanStateMemory(in).status()));
}

}  // namespace
}  // namespace kls::engine::cuda

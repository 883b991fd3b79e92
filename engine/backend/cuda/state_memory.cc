#include "engine/backend/cuda/state_memory.h"

#include <algorithm>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace kls::engine::cuda {

SlotAllocator::SlotAllocator(int32_t capacity) : in_use_(std::max(capacity, 0), false) {
  for (int32_t s = capacity - 1; s >= 0; --s) free_.push_back(s);
}

std::optional<int32_t> SlotAllocator::Acquire() {
  if (free_.empty()) return std::nullopt;
  const int32_t slot = free_.back();
  free_.pop_back();
  in_use_[slot] = true;
  return slot;
}

void SlotAllocator::Release(int32_t slot) {
  KLS_CHECK(slot >= 0 && slot < capacity() && in_use_[slot]) << "releasing free slot " << slot;
  in_use_[slot] = false;
  // Keep the list descending so the lowest slot is reused first (compact working set).
  free_.insert(std::upper_bound(free_.begin(), free_.end(), slot, std::greater<int32_t>()), slot);
}

PagePool::PagePool(int32_t capacity, int page_size)
    : page_size_(page_size), refs_(std::max(capacity, 0), 0) {
  KLS_CHECK(page_size > 0) << "page size " << page_size;
  for (int32_t p = capacity - 1; p >= 0; --p) free_.push_back(p);
}

int32_t PagePool::Take() {
  const int32_t page = free_.back();
  free_.pop_back();
  refs_[page] = 1;
  return page;
}

void PagePool::Release(int32_t page) {
  KLS_CHECK(page >= 0 && page < capacity() && refs_[page] > 0) << "releasing free page " << page;
  if (--refs_[page] == 0) {
    free_.insert(std::upper_bound(free_.begin(), free_.end(), page, std::greater<int32_t>()), page);
  }
}

int64_t PagePool::PagesToAppend(const PageTable& table, int64_t new_tokens) const {
  const int64_t have = static_cast<int64_t>(table.pages.size());
  const int64_t need = (table.num_tokens + new_tokens + page_size_ - 1) / page_size_;
  int64_t pages = std::max<int64_t>(need - have, 0);
  const bool partial_last = table.num_tokens % page_size_ != 0;
  if (new_tokens > 0 && partial_last && refs_[table.pages.back()] > 1) ++pages;
  return pages;
}

bool PagePool::Append(PageTable& table, int64_t new_tokens, std::vector<PageCopy>* copies) {
  if (new_tokens <= 0) return true;
  if (PagesToAppend(table, new_tokens) > num_free()) return false;
  if (table.num_tokens % page_size_ != 0 && refs_[table.pages.back()] > 1) {
    const int32_t shared = table.pages.back();
    const int32_t own = Take();
    copies->push_back({shared, own});
    Release(shared);
    table.pages.back() = own;
  }
  const int64_t need = (table.num_tokens + new_tokens + page_size_ - 1) / page_size_;
  while (static_cast<int64_t>(table.pages.size()) < need) table.pages.push_back(Take());
  table.num_tokens += new_tokens;
  return true;
}

void PagePool::Truncate(PageTable& table, int64_t num_tokens) {
  KLS_CHECK(num_tokens >= 0 && num_tokens <= table.num_tokens)
      << "truncating " << table.num_tokens << " tokens to " << num_tokens;
  const size_t keep = static_cast<size_t>((num_tokens + page_size_ - 1) / page_size_);
  while (table.pages.size() > keep) {
    Release(table.pages.back());
    table.pages.pop_back();
  }
  table.num_tokens = num_tokens;
}

PageTable PagePool::Share(const PageTable& table) {
  for (int32_t page : table.pages) {
    KLS_CHECK(refs_[page] > 0) << "sharing free page " << page;
    ++refs_[page];
  }
  return table;
}

void PagePool::ReleaseAll(PageTable& table) {
  for (int32_t page : table.pages) Release(page);
  table.pages.clear();
  table.num_tokens = 0;
}

absl::StatusOr<StateMemoryPlan> PlanStateMemory(const StateMemoryInput& in) {
  if (in.slot_bytes <= 0 || in.page_bytes < 0 || in.page_size <= 0 || in.max_sessions < 1 ||
      in.max_context < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("state memory plan: slot bytes ", in.slot_bytes, ", page bytes ",
                     in.page_bytes, ", page size ", in.page_size, ", max sessions ",
                     in.max_sessions, ", max context ", in.max_context, " (all must be positive)"));
  }
  StateMemoryPlan plan;
  plan.slot_bytes = in.slot_bytes;
  plan.page_bytes = in.page_bytes;
  const int64_t full_context_pages =
      in.page_bytes == 0 ? 0 : (in.max_context + in.page_size - 1) / in.page_size;
  const int64_t minimum = 2 * in.slot_bytes + full_context_pages * in.page_bytes;
  if (in.available_bytes < minimum) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "device memory left for session state is ", in.available_bytes / (1 << 20),
        " MiB, less than the ", minimum / (1 << 20), " MiB one session of ", in.max_context,
        " tokens needs (2 KDA slots of ", in.slot_bytes / (1 << 20), " MiB and ",
        full_context_pages, " cache pages); lower the memory use of weights or the context limit"));
  }
  const int64_t slot_cap = std::max<int64_t>(2, (in.available_bytes / 2) / in.slot_bytes);
  plan.num_slots = static_cast<int32_t>(
      std::min<int64_t>({int64_t{2} * in.max_sessions, slot_cap, int64_t{1} << 30}));
  const int64_t rest = in.available_bytes - plan.num_slots * in.slot_bytes;
  plan.num_pages = in.page_bytes == 0
                       ? 0
                       : static_cast<int32_t>(std::min<int64_t>(rest / in.page_bytes, INT32_MAX));
  return plan;
}

}  // namespace kls::engine::cuda

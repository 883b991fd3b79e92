// Host-side bookkeeping of the CUDA backend's session-state memory (no CUDA in here, so it is
// tested on any machine):
//   - KDA state slots: a fixed number of equal slots, each holding one session's recurrent and
//     conv state for every KDA layer (or a checkpoint of them);
//   - MLA cache pages: a fixed number of pages of `page_size` tokens, each holding those tokens'
//     latent rows for every MLA layer. A session's PageTable lists its pages in token order.
//     Pages are reference-counted so that a fork shares its parent's pages; a shared page is
//     copied before anyone writes into it (copy on write), so forks never see each other.
// And the plan that sizes both from a memory budget.
//
// Not thread-safe: the engine thread that owns the backend owns these too.
#ifndef KLS_ENGINE_BACKEND_CUDA_STATE_MEMORY_H_
#define KLS_ENGINE_BACKEND_CUDA_STATE_MEMORY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kls::engine::cuda {

// A free list over slots [0, capacity).
class SlotAllocator {
 public:
  explicit SlotAllocator(int32_t capacity);
  // The lowest free slot, or nullopt when every slot is taken.
  std::optional<int32_t> Acquire();
  // Returns a slot taken by Acquire (anything else is a bug and aborts).
  void Release(int32_t slot);
  int32_t capacity() const { return static_cast<int32_t>(in_use_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }

 private:
  std::vector<int32_t> free_;  // descending, so back() is the lowest
  std::vector<bool> in_use_;
};

// The pages of one session, in token order: page i holds tokens [i·page_size, (i+1)·page_size).
struct PageTable {
  std::vector<int32_t> pages;
  int64_t num_tokens = 0;
};

// A device-side copy the caller must perform (every MLA layer's rows of page `from` into page
// `to`) before writing into `to`.
struct PageCopy {
  int32_t from = 0;
  int32_t to = 0;
};

// Reference-counted pages [0, capacity).
class PagePool {
 public:
  PagePool(int32_t capacity, int page_size);

  int page_size() const { return page_size_; }
  int32_t capacity() const { return static_cast<int32_t>(refs_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t refcount(int32_t page) const { return refs_[page]; }

  // Pages `table` needs from the pool to grow by `new_tokens`: new pages past its end, plus one
  // for its last page when that page is shared and only partly filled (it will be written).
  int64_t PagesToAppend(const PageTable& table, int64_t new_tokens) const;

  // Grows `table` by `new_tokens` tokens (num_tokens included), taking PagesToAppend pages.
  // A shared, partly filled last page is replaced by a private copy: the copy to make is
  // appended to `copies`. Returns false and changes nothing when the pool lacks pages.
  bool Append(PageTable& table, int64_t new_tokens, std::vector<PageCopy>* copies);

  // Shrinks `table` to its first `num_tokens` tokens (<= table.num_tokens), releasing the pages
  // no longer needed.
  void Truncate(PageTable& table, int64_t num_tokens);

  // A table that shares every page of `table` (a fork).
  PageTable Share(const PageTable& table);

  // Releases every page of `table` and empties it.
  void ReleaseAll(PageTable& table);

 private:
  int32_t Take();
  void Release(int32_t page);

  int page_size_;
  std::vector<int32_t> refs_;
  std::vector<int32_t> free_;  // descending
};

// How the CUDA backend divides device memory.
struct StateMemoryInput {
  int64_t available_bytes = 0;  // device memory left for state after weights and workspaces
  int64_t slot_bytes = 0;       // one KDA slot: recurrent + conv state of every KDA layer
  int64_t page_bytes = 0;       // one page: page_size tokens × every MLA layer's latent row
  int page_size = 0;
  int32_t max_sessions = 0;  // sessions held at once (each may also hold a checkpoint)
  int64_t max_context = 0;   // the model's context limit, in tokens
};

struct StateMemoryPlan {
  int32_t num_slots = 0;
  int32_t num_pages = 0;
  int64_t slot_bytes = 0, page_bytes = 0;
  int64_t bytes() const { return num_slots * slot_bytes + num_pages * page_bytes; }
};

// Two slots per session (its state and a turn's checkpoint), capped at half the memory (at
// least the slots two sessions need); the rest becomes pages. RESOURCE_EXHAUSTED, naming the
// bytes, when the memory cannot hold one session with a full context (2 slots + the pages of
// max_context tokens) — a worker that cannot serve one full request must not start.
absl::StatusOr<StateMemoryPlan> PlanStateMemory(const StateMemoryInput& input);

}  // namespace kls::engine::cuda

#endif  // KLS_ENGINE_BACKEND_CUDA_STATE_MEMORY_H_

// A fixed set of threads running queued closures in FIFO order. With one thread it is an
// ordered executor (the engine's commit lane relies on that: a session's commits land in order).
#ifndef KLS_SERVICES_WORKER_TASK_POOL_H_
#define KLS_SERVICES_WORKER_TASK_POOL_H_

#include <deque>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace kls::worker {

// Thread-safe. The destructor runs every task already queued, then joins.
class TaskPool {
 public:
  explicit TaskPool(int num_threads);
  ~TaskPool();
  TaskPool(const TaskPool&) = delete;
  TaskPool& operator=(const TaskPool&) = delete;

  void Schedule(absl::AnyInvocable<void()> task) ABSL_LOCKS_EXCLUDED(mu_);
  // Tasks queued or running.
  int Pending() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Loop();

  mutable absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace kls::worker

#endif  // KLS_SERVICES_WORKER_TASK_POOL_H_

// Executor: runs the scheduler's batches on one device (docs/ARCHITECTURE.md). A launcher thread
// takes a batch, copies its jobs' tensors to the device and queues the core's packed forward
// (LMHead::ForwardBatch) on the executor's own CUDA stream; a completer thread waits for the
// device and answers the jobs. The launcher runs at most one batch ahead of the completer, so the
// host prepares batch k+1 while the device computes batch k.
#ifndef LMHEAD_SERVER_EXECUTOR_EXECUTOR_H_
#define LMHEAD_SERVER_EXECUTOR_EXECUTOR_H_

#include <deque>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/scheduler/scheduler.h"

namespace lmhead {

class Executor {
 public:
  // Starts the threads: they take batches from `scheduler` until the scheduler is closed and
  // empty. `replica` selects the model weights' copy that lives on `device` (Model::HeadFor).
  Executor(Scheduler* scheduler, std::string device, int replica);
  // Waits for the threads; close the scheduler first.
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  const std::string& device() const { return device_; }

  // A batch whose work is queued on the device (defined in executor.cc).
  struct Launched;

 private:
  void Launch();
  void Complete();

  Scheduler* const scheduler_;
  const std::string device_;
  const int replica_;
  absl::Mutex mu_;
  std::deque<std::unique_ptr<Launched>> launched_ ABSL_GUARDED_BY(mu_);
  bool launcher_done_ ABSL_GUARDED_BY(mu_) = false;
  // Last: they start once the members above exist.
  std::thread completer_;
  std::thread launcher_;
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_EXECUTOR_EXECUTOR_H_

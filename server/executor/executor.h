// Executor: runs the scheduler's batches on one device, one batch at a time, on a thread of its
// own (docs/ARCHITECTURE.md). It copies each job's tensors to its device, runs the packed forward
// of the core (LMHead::ForwardBatch) on its own CUDA stream, and answers each job.
#ifndef LMHEAD_SERVER_EXECUTOR_EXECUTOR_H_
#define LMHEAD_SERVER_EXECUTOR_EXECUTOR_H_

#include <memory>
#include <string>
#include <thread>

#include "server/scheduler/scheduler.h"

namespace lmhead {

class Executor {
 public:
  // Starts the thread: it takes batches from `scheduler` until the scheduler is closed and
  // empty. `replica` selects the model weights' copy that lives on `device` (Model::HeadFor).
  Executor(Scheduler* scheduler, std::string device, int replica);
  // Waits for the thread; close the scheduler first.
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  const std::string& device() const { return device_; }

 private:
  void Run();

  Scheduler* const scheduler_;
  const std::string device_;
  const int replica_;
  std::thread thread_;  // last: starts once the members above exist
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_EXECUTOR_EXECUTOR_H_

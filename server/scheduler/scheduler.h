// Scheduler: the server's request queue and dynamic batcher (docs/ARCHITECTURE.md). The frontend
// submits one Job per Forward call or stream micro-batch; executors take batches of jobs that can
// share one packed forward. Thread-safe.
#ifndef LMHEAD_SERVER_SCHEDULER_SCHEDULER_H_
#define LMHEAD_SERVER_SCHEDULER_SCHEDULER_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/forward_request.h"

namespace lmhead {

// One unit of work: a Forward call or one micro-batch of a stream, decoded on the host.
struct Job {
  // What to run: the checked plan (model, configuration, options with host index tensors) and
  // the hidden states (B, S, d_model) on the host in their wire dtype.
  ForwardPlan plan;
  at::Tensor x;
  // Jobs with equal keys may share a packed forward: the same model and weights variant.
  std::string batch_key;
  // B * S: what the job costs of --max_batch_tokens and --max_queue_tokens.
  int64_t tokens = 0;
  // OK while the caller still wants the answer (polled before the job runs).
  std::function<absl::Status()> still_wanted;

  // Filled by the executor (or the scheduler, for a job dropped or aborted), then `done` is
  // notified. queue_us: from Submit to the start of its batch; compute_us: that batch's, until
  // the device finished it; launch_us: the executor's host time queuing that batch (copies,
  // launches); device_us: the device's time from the batch's first queued work to its last
  // (CUDA; 0 elsewhere); batch_size: jobs in that batch; nonfinite: NaN/infinite values in x.
  absl::StatusOr<LMOutput> result = absl::UnknownError("not run");
  int64_t queue_us = 0;
  int64_t compute_us = 0;
  int64_t launch_us = 0;
  int64_t device_us = 0;
  int batch_size = 0;
  int64_t nonfinite = 0;
  absl::Notification done;
};

struct SchedulerLimits {
  int64_t max_batch_tokens = 8192;    // tokens one packed forward takes
  int64_t max_queue_tokens = 262144;  // tokens waiting at once (a job alone always fits)
  absl::Duration max_queue_delay = absl::ZeroDuration();  // how long a batch waits for company
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerLimits& limits) : limits_(limits) {}

  // Queues `job`. RESOURCE_EXHAUSTED naming --max_queue_tokens when the queue holds too many
  // tokens already (unless `wait_for_room`: then it waits until there is room, the job is no
  // longer wanted, or the queue closes), UNAVAILABLE once Close() was called.
  absl::Status Submit(std::shared_ptr<Job> job, bool wait_for_room = false);

  // Removes `job` if it is still queued (true); false if an executor has taken it (the caller
  // then waits for `done`).
  bool Withdraw(const Job& job);

  // The next batch for an executor: jobs with one batch_key, oldest first, at most
  // max_batch_tokens in all (a larger job runs alone). Waits for work; empty once the scheduler
  // is closed and its queue empty. Jobs no longer wanted are answered here and never returned.
  // `ahead`: the executor still has a batch in flight, and gets work only while no executor
  // without one is waiting (so an idle device is served first).
  std::vector<std::shared_ptr<Job>> NextBatch(bool ahead = false);
  // An executor finished a batch that NextBatch gave it.
  void BatchDone();

  // No further Submit; queued jobs still run.
  void Close();
  // Answers every queued job with `status` (draining past its grace period).
  void AbortQueued(const absl::Status& status);
  // Waits until no job is queued or running, or until `deadline`; true when idle.
  bool WaitIdle(absl::Time deadline);

  int64_t queued_tokens() const;

 private:
  struct Queued {
    std::shared_ptr<Job> job;
    absl::Time submitted;
  };

  // The queue whose oldest job is the oldest of all; null when every queue is empty.
  std::deque<Queued>* OldestQueue() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const SchedulerLimits limits_;
  mutable absl::Mutex mu_;
  // A FIFO per batch key (a model and its weights variant); a batch comes from one of them.
  std::map<std::string, std::deque<Queued>> queues_ ABSL_GUARDED_BY(mu_);
  int64_t queued_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  // Tokens of the Submit calls waiting for room; executors waiting in NextBatch with nothing in
  // flight.
  int64_t waiting_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int idle_executors_ ABSL_GUARDED_BY(mu_) = 0;
  int running_batches_ ABSL_GUARDED_BY(mu_) = 0;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_SCHEDULER_SCHEDULER_H_

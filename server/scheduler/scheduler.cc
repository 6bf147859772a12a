#include "server/scheduler/scheduler.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace lmhead {
namespace {

int64_t MicrosSince(absl::Time start) { return absl::ToInt64Microseconds(absl::Now() - start); }

void Answer(Job& job, absl::Status status) {
  job.result = std::move(status);
  job.done.Notify();
}

}  // namespace

absl::Status Scheduler::Submit(std::shared_ptr<Job> job, bool wait_for_room) {
  absl::MutexLock lock(&mu_);
  // Calls that wait for room (a stream's later micro-batches) go first: while one waits, others
  // are admitted only if they leave room for it, so a flow of small calls cannot starve it.
  const int64_t ahead = wait_for_room ? 0 : waiting_tokens_;
  const auto has_room = [this, &job, ahead]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return closed_ || queued_tokens_ + ahead == 0 ||
           queued_tokens_ + ahead + job->tokens <= limits_.max_queue_tokens;
  };
  if (wait_for_room && !has_room()) {
    waiting_tokens_ += job->tokens;
    // Woken every 10 ms to ask whether the caller still wants the answer.
    absl::Status wanted;
    while (!has_room() && (wanted = job->still_wanted()).ok()) {
      mu_.AwaitWithTimeout(absl::Condition(&has_room), absl::Milliseconds(10));
    }
    waiting_tokens_ -= job->tokens;
    if (!wanted.ok()) return wanted;
  }
  if (closed_) return absl::UnavailableError("the server is shutting down");
  if (!has_room()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the request queue is full: ", queued_tokens_ + ahead, " tokens wait and this call has ",
        job->tokens, " (--max_queue_tokens=", limits_.max_queue_tokens, "); retry later"));
  }
  queued_tokens_ += job->tokens;
  queues_[job->batch_key].push_back({std::move(job), absl::Now()});
  return absl::OkStatus();
}

bool Scheduler::Withdraw(const Job& job) {
  absl::MutexLock lock(&mu_);
  auto it = queues_.find(job.batch_key);
  if (it == queues_.end()) return false;
  std::deque<Queued>& queue = it->second;
  for (auto entry = queue.begin(); entry != queue.end(); ++entry) {
    if (entry->job.get() == &job) {
      queued_tokens_ -= job.tokens;
      queue.erase(entry);
      if (queue.empty()) queues_.erase(it);
      return true;
    }
  }
  return false;
}

std::deque<Scheduler::Queued>* Scheduler::OldestQueue() {
  std::deque<Queued>* oldest = nullptr;
  for (auto& [key, queue] : queues_) {
    if (!queue.empty() &&
        (oldest == nullptr || queue.front().submitted < oldest->front().submitted)) {
      oldest = &queue;
    }
  }
  return oldest;
}

std::vector<std::shared_ptr<Job>> Scheduler::NextBatch(bool ahead) {
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Job>> batch;
  while (batch.empty()) {
    // An executor with a batch in flight takes work only when no idle executor waits for it.
    const auto has_work_or_closed = [this, ahead]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return closed_ || (OldestQueue() != nullptr && (!ahead || idle_executors_ == 0));
    };
    if (!ahead) ++idle_executors_;
    mu_.Await(absl::Condition(&has_work_or_closed));
    if (!ahead) --idle_executors_;
    std::deque<Queued>* queue = OldestQueue();
    if (queue == nullptr) return batch;  // closed and empty

    // Waits up to max_queue_delay after the oldest job's arrival for a fuller batch.
    if (limits_.max_queue_delay > absl::ZeroDuration()) {
      const std::string key = queue->front().job->batch_key;
      const absl::Time until = queue->front().submitted + limits_.max_queue_delay;
      const auto full = [this, &key]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        auto it = queues_.find(key);
        if (it == queues_.end()) return true;  // withdrawn meanwhile: pick again
        int64_t tokens = 0;
        for (const Queued& queued : it->second) tokens += queued.job->tokens;
        return closed_ || tokens >= limits_.max_batch_tokens;
      };
      mu_.AwaitWithDeadline(absl::Condition(&full), until);
      queue = OldestQueue();
      if (queue == nullptr) continue;
    }

    int64_t tokens = 0;
    while (!queue->empty()) {
      Queued& next = queue->front();
      if (!batch.empty() && tokens + next.job->tokens > limits_.max_batch_tokens) break;
      std::shared_ptr<Job> job = std::move(next.job);
      const absl::Time submitted = next.submitted;
      queue->pop_front();
      queued_tokens_ -= job->tokens;
      if (absl::Status wanted = job->still_wanted(); !wanted.ok()) {
        Answer(*job, std::move(wanted));  // dropped without compute
        continue;
      }
      job->queue_us = MicrosSince(submitted);
      tokens += job->tokens;
      batch.push_back(std::move(job));
    }
    for (auto it = queues_.begin(); it != queues_.end();) {
      it = it->second.empty() ? queues_.erase(it) : std::next(it);
    }
  }
  for (const auto& job : batch) job->batch_size = static_cast<int>(batch.size());
  ++running_batches_;
  return batch;
}

void Scheduler::BatchDone() {
  absl::MutexLock lock(&mu_);
  --running_batches_;
}

void Scheduler::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
}

void Scheduler::AbortQueued(const absl::Status& status) {
  std::vector<std::shared_ptr<Job>> aborted;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [key, queue] : queues_) {
      for (Queued& queued : queue) aborted.push_back(std::move(queued.job));
    }
    queues_.clear();
    queued_tokens_ = 0;
  }
  for (const auto& job : aborted) Answer(*job, status);
}

bool Scheduler::WaitIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  const auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return queued_tokens_ == 0 && queues_.empty() && running_batches_ == 0;
  };
  return mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

int64_t Scheduler::queued_tokens() const {
  absl::MutexLock lock(&mu_);
  return queued_tokens_;
}

}  // namespace lmhead

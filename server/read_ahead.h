// ReadAhead: a producer on its own thread, one item ahead of its consumer. While the consumer
// works on item k, the producer makes item k+1, then waits until the consumer takes it. The
// server uses it to read, decode and upload a stream's next micro-batch while the current one
// computes.
#ifndef LMHEAD_SERVER_READ_AHEAD_H_
#define LMHEAD_SERVER_READ_AHEAD_H_

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

namespace lmhead {

template <typename Item>
class ReadAhead {
 public:
  // `produce` returns the next item, or nullopt when there is none. It is not called again after
  // nullopt, after an item for which `is_last(item)` holds, or after Stop().
  ReadAhead(std::function<std::optional<Item>()> produce, std::function<bool(const Item&)> is_last)
      : produce_(std::move(produce)), is_last_(std::move(is_last)), thread_([this] { Run(); }) {}

  // Stops the producer and waits for it: if Stop() said it was still inside `produce`, the caller
  // must have unblocked that call (for a gRPC read: by cancelling the call).
  ~ReadAhead() {
    Stop(std::chrono::milliseconds(0));
    thread_.join();
  }
  ReadAhead(const ReadAhead&) = delete;
  ReadAhead& operator=(const ReadAhead&) = delete;

  // The next item, waiting for it; nullopt when the producer has no more.
  std::optional<Item> Next() {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [this] { return ready_.has_value() || finished_; });
    if (!ready_.has_value()) return std::nullopt;
    std::optional<Item> item = std::move(ready_);
    ready_.reset();
    changed_.notify_all();
    return item;
  }

  // Asks the producer to make no further item, and waits up to `grace` for a `produce` call in
  // progress to return. Returns false if it is still inside that call.
  bool Stop(std::chrono::milliseconds grace) {
    std::unique_lock<std::mutex> lock(mutex_);
    stopped_ = true;
    changed_.notify_all();
    return changed_.wait_for(lock, grace, [this] { return !producing_; });
  }

 private:
  void Run() {
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [this] { return !ready_.has_value() || stopped_; });
        if (stopped_) break;
        producing_ = true;
      }
      std::optional<Item> item = produce_();
      std::lock_guard<std::mutex> lock(mutex_);
      producing_ = false;
      const bool last = !item.has_value() || is_last_(*item);
      ready_ = std::move(item);
      changed_.notify_all();
      if (last) break;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    finished_ = true;
    changed_.notify_all();
  }

  const std::function<std::optional<Item>()> produce_;
  const std::function<bool(const Item&)> is_last_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::optional<Item> ready_;  // made, not yet taken
  bool producing_ = false;     // inside produce_
  bool stopped_ = false;       // Stop() was called
  bool finished_ = false;      // produce_ will not be called again
  std::thread thread_;         // last: starts once the members above exist
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_READ_AHEAD_H_

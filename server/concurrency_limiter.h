// ConcurrencyLimiter: a non-blocking counting semaphore that caps the calls running at once.
// Thread-safe. Header-only.
#ifndef LMHEAD_SERVER_CONCURRENCY_LIMITER_H_
#define LMHEAD_SERVER_CONCURRENCY_LIMITER_H_

#include <atomic>

namespace lmhead {

class ConcurrencyLimiter {
 public:
  // A held slot; releases it when destroyed. Empty (false) when none was free.
  class Slot {
   public:
    Slot() = default;
    explicit Slot(std::atomic<int>* in_use) : in_use_(in_use) {}
    Slot(Slot&& other) noexcept : in_use_(other.in_use_) { other.in_use_ = nullptr; }
    Slot& operator=(Slot&&) = delete;
    Slot(const Slot&) = delete;
    ~Slot() {
      if (in_use_ != nullptr) in_use_->fetch_sub(1);
    }
    explicit operator bool() const { return in_use_ != nullptr; }

   private:
    std::atomic<int>* in_use_ = nullptr;
  };

  explicit ConcurrencyLimiter(int max_in_use) : max_in_use_(max_in_use) {}

  // Takes a slot if fewer than max_in_use are held; never waits.
  Slot TryAcquire() {
    int current = in_use_.load();
    while (current < max_in_use_) {
      if (in_use_.compare_exchange_weak(current, current + 1)) return Slot(&in_use_);
    }
    return Slot();
  }

  int in_use() const { return in_use_.load(); }
  int max_in_use() const { return max_in_use_; }

 private:
  const int max_in_use_;
  std::atomic<int> in_use_{0};
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_CONCURRENCY_LIMITER_H_

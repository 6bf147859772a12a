// A CPU allocator for benchmarks that counts LibTorch's live host bytes and their peak.
#ifndef LMHEAD_BENCH_TRACKING_ALLOCATOR_H_
#define LMHEAD_BENCH_TRACKING_ALLOCATOR_H_

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace lmhead {

// Wraps c10's CPU allocation and keeps live/peak byte counts. Install() makes it LibTorch's
// CPU allocator for the rest of the process; allocations made earlier are freed by their own
// deleters and never counted. Thread-safe (one mutex; fine for benchmarks, not for serving).
class TrackingCpuAllocator final : public c10::Allocator {
 public:
  static TrackingCpuAllocator& Install() {
    static TrackingCpuAllocator* allocator = [] {
      auto* a = new TrackingCpuAllocator();
      c10::SetAllocator(c10::DeviceType::CPU, a, /*priority=*/100);
      return a;
    }();
    return *allocator;
  }

  c10::DataPtr allocate(size_t bytes) override {
    void* data = c10::alloc_cpu(bytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      sizes_[data] = bytes;
      live_ += static_cast<int64_t>(bytes);
      peak_ = std::max(peak_, live_);
    }
    // Some kernels (oneDNN) require the context to be the data pointer itself.
    return {data, data, &Free, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &Free; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  int64_t live_bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return live_;
  }
  int64_t peak_bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return peak_;
  }
  // Starts a new peak measurement from the bytes live now.
  void ResetPeak() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_ = live_;
  }

 private:
  TrackingCpuAllocator() = default;

  static void Free(void* data) {
    TrackingCpuAllocator& self = Install();
    {
      std::lock_guard<std::mutex> lock(self.mu_);
      auto it = self.sizes_.find(data);
      if (it != self.sizes_.end()) {
        self.live_ -= static_cast<int64_t>(it->second);
        self.sizes_.erase(it);
      }
    }
    c10::free_cpu(data);
  }

  mutable std::mutex mu_;
  std::unordered_map<void*, size_t> sizes_;  // guarded by mu_
  int64_t live_ = 0;                         // guarded by mu_
  int64_t peak_ = 0;                         // guarded by mu_
};

}  // namespace lmhead

#endif  // LMHEAD_BENCH_TRACKING_ALLOCATOR_H_

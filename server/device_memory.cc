#include "server/device_memory.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"

#ifdef LMHEAD_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif

namespace lmhead {

std::vector<DeviceMemory> ReadDeviceMemory(const std::vector<std::string>& devices) {
  std::vector<DeviceMemory> memory;
#ifdef LMHEAD_WITH_CUDA
  for (const std::string& device : devices) {
    int index = 0;
    if (!absl::StartsWith(device, "cuda:") || !absl::SimpleAtoi(device.substr(5), &index) ||
        std::any_of(memory.begin(), memory.end(),
                    [&](const DeviceMemory& seen) { return seen.device == device; })) {
      continue;
    }
    // The runtime's current device is per thread: this thread's is set, and put back.
    int current = 0;
    size_t free = 0, total = 0;
    if (cudaGetDevice(&current) != cudaSuccess || cudaSetDevice(index) != cudaSuccess) continue;
    const bool read = cudaMemGetInfo(&free, &total) == cudaSuccess;
    cudaSetDevice(current);
    if (!read) {
      cudaGetLastError();  // not sticky; cleared so that it is not reported elsewhere
      continue;
    }
    const c10::CachingDeviceAllocator::DeviceStats stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(index));
    constexpr size_t kAll = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    DeviceMemory entry;
    entry.device = device;
    entry.total = static_cast<int64_t>(total);
    entry.used = static_cast<int64_t>(total - free);
    entry.reserved = stats.reserved_bytes[kAll].current;
    entry.allocated = stats.allocated_bytes[kAll].current;
    memory.push_back(std::move(entry));
  }
#else
  (void)devices;
#endif
  return memory;
}

}  // namespace lmhead

// The memory of the server's CUDA devices, for the metrics endpoint (docs/OPERATIONS.md). Reads
// LibTorch's caching allocator and the CUDA runtime; in builds without CUDA there is nothing to
// read. Thread-safe.
#ifndef LMHEAD_SERVER_DEVICE_MEMORY_H_
#define LMHEAD_SERVER_DEVICE_MEMORY_H_

#include <cstdint>
#include <string>
#include <vector>

namespace lmhead {

// One CUDA device's memory, in bytes.
struct DeviceMemory {
  std::string device;     // "cuda:N"
  int64_t total = 0;      // the device's memory (cudaMemGetInfo)
  int64_t used = 0;       // in use on the device by every process: total less free
  int64_t reserved = 0;   // held by this server's LibTorch caching allocator
  int64_t allocated = 0;  // of that, in tensors now (weights, work in flight)
};

// One entry per distinct "cuda:N" of `devices` (the executors' devices), in first-seen order;
// CPU devices have none, and neither has anything in a build without CUDA. A device that cannot
// be read is left out.
std::vector<DeviceMemory> ReadDeviceMemory(const std::vector<std::string>& devices);

}  // namespace lmhead

#endif  // LMHEAD_SERVER_DEVICE_MEMORY_H_

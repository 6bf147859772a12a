// Moving request tensors from the host to the compute device without waiting for the device.
#ifndef LMHEAD_CORE_DEVICE_COPY_H_
#define LMHEAD_CORE_DEVICE_COPY_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace lmhead {

// `host` on `device`: `host` itself when it is there already. From the CPU to CUDA the bytes go
// through a pinned staging buffer (LibTorch's caching host allocator keeps and reuses it; skipped
// when `host` is pinned already) and a non-blocking copy on the current stream: the call returns
// without waiting for the device, and the copy runs at full PCIe speed. Other moves are ordinary
// copies. May throw c10::Error.
at::Tensor CopyToDevice(const at::Tensor& host, const c10::Device& device);

}  // namespace lmhead

#endif  // LMHEAD_CORE_DEVICE_COPY_H_

#include "core/device_copy.h"

#include <ATen/ATen.h>

namespace lmhead {

at::Tensor CopyToDevice(const at::Tensor& host, const c10::Device& device) {
  if (host.device() == device) return host;
  if (!device.is_cuda() || !host.is_cpu()) return host.to(device);
  at::Tensor staged = host;
  if (!host.is_pinned()) {
    staged = at::empty(host.sizes(), host.options().pinned_memory(true));
    staged.copy_(host);
  }
  return staged.to(device, /*non_blocking=*/true);
}

}  // namespace lmhead

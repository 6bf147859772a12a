#include "server/executor/executor.h"

#include <ATen/ATen.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <chrono>
#include <optional>
#include <utility>
#include <variant>
#include <vector>

#include "core/device_copy.h"
#include "core/dtype.h"
#include "core/lm_head.h"
#include "core/torch_errors.h"
#include "server/model_registry.h"
#include "server/status.h"

namespace lmhead {
namespace {

using Clock = std::chrono::steady_clock;

// The job's tensors on `device`: x in the compute dtype, a tensor divisor beside it. Index tensors
// stay on the host, where the core checks them without a device synchronisation. May throw
// c10::Error.
ForwardItem ToDevice(const Job& job, const c10::Device& device) {
  ForwardItem item{CopyToDevice(job.x, device).to(ToScalarType(job.plan.config.dtype)),
                   job.plan.options};
  if (auto* factor = std::get_if<at::Tensor>(&item.options.loss_div_factor)) {
    *factor = CopyToDevice(*factor, device);
  }
  item.options.interrupt_check = job.still_wanted;
  return item;
}

// Runs `batch` (one batch key) on `device` and answers its jobs.
void RunBatch(const std::vector<std::shared_ptr<Job>>& batch, const c10::Device& device,
              int replica) {
  const Clock::time_point start = Clock::now();
  absl::StatusOr<std::shared_ptr<const LMHead>> head =
      batch.front()->plan.model->HeadFor(batch.front()->plan.config, replica);
  std::vector<absl::StatusOr<LMOutput>> results(batch.size(), absl::UnknownError("not run"));
  if (!head.ok()) {
    // No room for another converted copy of the weights: the same request would fail again.
    const absl::Status status =
        absl::IsResourceExhausted(head.status()) ? NotRetryable(head.status()) : head.status();
    std::fill(results.begin(), results.end(), status);
  } else {
    // Jobs whose tensors cannot be placed get their error; the others run packed.
    std::vector<ForwardItem> items;
    std::vector<size_t> runs;  // items[k] is batch[runs[k]]
    for (size_t i = 0; i < batch.size(); ++i) {
      absl::Status placed = CatchTorchErrors([&]() -> absl::Status {
        items.push_back(ToDevice(*batch[i], device));
        return absl::OkStatus();
      });
      if (placed.ok()) {
        runs.push_back(i);
      } else {
        results[i] = placed;
      }
    }
    std::vector<absl::StatusOr<LMOutput>> outputs = (*head)->ForwardBatch(items);
    absl::Status synced = CatchTorchErrors([&]() -> absl::Status {
      // Encoding reads the outputs on the frontend's threads: they must be complete.
      if (!device.is_cpu()) {
        const c10::impl::VirtualGuardImpl guard(device.type());
        guard.synchronizeStream(guard.getStream(device));
      }
      return absl::OkStatus();
    });
    for (size_t k = 0; k < runs.size(); ++k) {
      results[runs[k]] = synced.ok() ? std::move(outputs[k]) : synced;
    }
  }
  const int64_t compute_us =
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count();
  for (size_t i = 0; i < batch.size(); ++i) {
    batch[i]->result = std::move(results[i]);
    batch[i]->compute_us = compute_us;
    batch[i]->done.Notify();
  }
}

}  // namespace

Executor::Executor(Scheduler* scheduler, std::string device, int replica)
    : scheduler_(scheduler),
      device_(std::move(device)),
      replica_(replica),
      thread_([this] { Run(); }) {}

Executor::~Executor() { thread_.join(); }

void Executor::Run() {
  const c10::Device device(device_);
  // On CUDA every batch of this executor runs on a stream of its own, so that executors of one
  // device (and the frontend's copies) overlap.
  std::optional<c10::StreamGuard> on_stream;
  if (device.is_cuda()) {
    on_stream.emplace(c10::impl::VirtualGuardImpl(device.type()).getStreamFromGlobalPool(device));
  }
  while (true) {
    std::vector<std::shared_ptr<Job>> batch = scheduler_->NextBatch();
    if (batch.empty()) return;
    RunBatch(batch, device, replica_);
    scheduler_->BatchDone();
  }
}

}  // namespace lmhead

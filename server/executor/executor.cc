#include "server/executor/executor.h"

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <chrono>
#include <optional>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "core/device_copy.h"
#include "core/dtype.h"
#include "core/lm_head.h"
#include "core/torch_errors.h"
#include "server/model_registry.h"
#include "server/status.h"
#include "server/tensor_codec.h"

namespace lmhead {

using Clock = std::chrono::steady_clock;

struct Executor::Launched {
  std::vector<std::shared_ptr<Job>> batch;
  std::vector<absl::StatusOr<LMOutput>> results;
  // Per job: its count of non-finite hidden-state values, on the device (undefined: none made).
  std::vector<at::Tensor> nonfinite;
  // Recorded on the executor's stream after the batch's work (CUDA only).
  std::optional<c10::Event> finished;
  Clock::time_point start;
};

namespace {

// The job's tensors on `device`: x in the compute dtype, a tensor divisor beside it; `nonfinite`
// receives the count of x's NaN/infinite values (as sent, before the conversion), on the device.
// Index tensors stay on the host, where the core checks them without a device synchronisation.
// May throw c10::Error.
ForwardItem ToDevice(const Job& job, const c10::Device& device, at::Tensor* nonfinite) {
  const at::Tensor sent = CopyToDevice(job.x, device);
  *nonfinite = at::isfinite(sent).logical_not().sum();
  ForwardItem item{sent.to(ToScalarType(job.plan.config.dtype)), job.plan.options};
  if (auto* factor = std::get_if<at::Tensor>(&item.options.loss_div_factor)) {
    *factor = CopyToDevice(*factor, device);
  }
  item.options.interrupt_check = job.still_wanted;
  item.validated = true;  // by the frontend (server/frontend/service.cc Decode)
  return item;
}

// Queues the copy of `output`'s tensors to pinned host memory (logits converted to
// `logits_dtype` on the device first), so that a finished batch holds no device memory while
// its callers encode their answers. May throw c10::Error.
void ToHost(LMOutput& output, v1::DataType logits_dtype) {
  const auto to_host = [](const at::Tensor& device) {
    at::Tensor host = at::empty(device.sizes(),
                                device.options().device(at::kCPU).pinned_memory(true).memory_format(
                                    at::MemoryFormat::Contiguous));
    host.copy_(device, /*non_blocking=*/true);
    return host;
  };
  if (output.logits.has_value()) {
    output.logits = to_host(output.logits->to(ScalarTypeOf(logits_dtype)));
  }
  for (std::optional<at::Tensor>* tensor :
       {&output.loss, &output.ce_loss, &output.z_loss, &output.argmax}) {
    if (tensor->has_value()) *tensor = to_host(**tensor);
  }
}

// Queues `batch` (one batch key) on the current stream of `device`. Never throws.
std::unique_ptr<Executor::Launched> LaunchBatch(std::vector<std::shared_ptr<Job>> batch,
                                                const c10::Device& device, int replica) {
  auto launched = std::make_unique<Executor::Launched>();
  launched->start = Clock::now();
  launched->batch = std::move(batch);
  const size_t n = launched->batch.size();
  launched->results.assign(n, absl::UnknownError("not run"));
  launched->nonfinite.resize(n);
  absl::StatusOr<std::shared_ptr<const LMHead>> head =
      launched->batch.front()->plan.model->HeadFor(launched->batch.front()->plan.config, replica);
  if (!head.ok()) {
    const absl::Status status = head.status();
    std::fill(launched->results.begin(), launched->results.end(), status);
    return launched;
  }
  // Jobs whose tensors cannot be placed get their error; the others run packed.
  std::vector<ForwardItem> items;
  std::vector<size_t> runs;  // items[k] is batch[runs[k]]
  for (size_t i = 0; i < n; ++i) {
    absl::Status placed = CatchTorchErrors([&]() -> absl::Status {
      items.push_back(ToDevice(*launched->batch[i], device, &launched->nonfinite[i]));
      return absl::OkStatus();
    });
    if (placed.ok()) {
      runs.push_back(i);
    } else {
      launched->results[i] = placed;
    }
  }
  std::vector<absl::StatusOr<LMOutput>> outputs = (*head)->ForwardBatch(items);
  for (size_t k = 0; k < runs.size(); ++k) {
    absl::StatusOr<LMOutput>& output = outputs[k];
    if (output.ok() && !device.is_cpu()) {
      absl::Status copied = CatchTorchErrors([&]() -> absl::Status {
        ToHost(*output, launched->batch[runs[k]]->plan.logits_dtype);
        return absl::OkStatus();
      });
      if (!copied.ok()) output = copied;
    }
    launched->results[runs[k]] = std::move(output);
  }
  if (device.is_cuda()) {
    absl::Status recorded = CatchTorchErrors([&]() -> absl::Status {
      const c10::impl::VirtualGuardImpl guard(device.type());
      c10::Event finished(device.type());
      finished.record(guard.getStream(device));
      launched->finished = std::move(finished);
      return absl::OkStatus();
    });
    if (!recorded.ok()) {
      std::fill(launched->results.begin(), launched->results.end(), recorded);
    }
  }
  return launched;
}

// Waits for `launched`'s work and answers its jobs. Never throws.
void CompleteBatch(Executor::Launched& launched) {
  absl::Status finished = CatchTorchErrors([&]() -> absl::Status {
    // Polled rather than synchronized: a CUDA event's wait spins a CPU core by default, which
    // the frontend's threads need.
    if (launched.finished.has_value()) {
      while (!launched.finished->query()) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    }
    return absl::OkStatus();
  });
  const int64_t compute_us =
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - launched.start).count();
  for (size_t i = 0; i < launched.batch.size(); ++i) {
    Job& job = *launched.batch[i];
    job.result = finished.ok() ? std::move(launched.results[i]) : finished;
    job.compute_us = compute_us;
    if (finished.ok() && launched.nonfinite[i].defined()) {
      CatchTorchErrors([&]() -> absl::Status {
        job.nonfinite = launched.nonfinite[i].item<int64_t>();
        return absl::OkStatus();
      }).IgnoreError();
    }
    job.done.Notify();
  }
}

}  // namespace

Executor::Executor(Scheduler* scheduler, std::string device, int replica)
    : scheduler_(scheduler),
      device_(std::move(device)),
      replica_(replica),
      completer_([this] { Complete(); }),
      launcher_([this] { Launch(); }) {}

Executor::~Executor() {
  launcher_.join();
  completer_.join();
}

void Executor::Launch() {
  const c10::Device device(device_);
  // On CUDA every batch of this executor runs on a stream of its own, so that executors of one
  // device overlap.
  std::optional<c10::StreamGuard> on_stream;
  if (device.is_cuda()) {
    on_stream.emplace(c10::impl::VirtualGuardImpl(device.type()).getStreamFromGlobalPool(device));
  }
  while (true) {
    bool ahead = false;
    {
      // At most one batch launched ahead of the one completing: enough to keep the device busy,
      // and memory for two batches at most.
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](std::deque<std::unique_ptr<Launched>>* launched) { return launched->size() < 2; },
          &launched_));
      ahead = !launched_.empty();
    }
    std::vector<std::shared_ptr<Job>> batch = scheduler_->NextBatch(ahead);
    if (batch.empty()) break;
    std::unique_ptr<Launched> launched = LaunchBatch(std::move(batch), device, replica_);
    absl::MutexLock lock(&mu_);
    launched_.push_back(std::move(launched));
  }
  absl::MutexLock lock(&mu_);
  launcher_done_ = true;
}

void Executor::Complete() {
  while (true) {
    std::unique_ptr<Launched> launched;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Executor* self) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return !self->launched_.empty() || self->launcher_done_;
          },
          this));
      if (launched_.empty()) return;
      launched = std::move(launched_.front());
    }
    CompleteBatch(*launched);
    {
      absl::MutexLock lock(&mu_);
      launched_.pop_front();
    }
    scheduler_->BatchDone();
  }
}

}  // namespace lmhead

#include "server/executor/executor.h"

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <chrono>
#include <map>
#include <numeric>
#include <optional>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "core/device_copy.h"
#include "core/dtype.h"
#include "core/lm_head.h"
#include "core/torch_errors.h"
#include "server/forward_request.h"
#include "server/model_registry.h"
#include "server/status.h"
#include "server/tensor_codec.h"

namespace lmhead {

using Clock = std::chrono::steady_clock;

struct Executor::Launched {
  std::vector<std::shared_ptr<Job>> batch;
  std::vector<absl::StatusOr<LMOutput>> results;
  // Each token's count of non-finite hidden-state values, as sent: job i's tokens are
  // nonfinite[i] (on the host once `finished`; undefined for a job whose inputs were not placed).
  std::vector<at::Tensor> nonfinite;
  // Recorded on the executor's stream before and after the batch's work (CUDA only), timing.
  std::optional<c10::Event> started;
  std::optional<c10::Event> finished;
  Clock::time_point start;
  int64_t launch_us = 0;  // host time LaunchBatch took
};

namespace {

// The batch's inputs on `device` as the core takes them, per job, or the error that kept that job
// from being placed: hidden states in the compute dtype, a tensor divisor beside them. On a GPU
// the hidden states of the jobs sent in one dtype go into one buffer (one copy each) and are
// counted for non-finite values there, in one pass for the batch; index tensors stay on the
// host, where the core reads them without a device synchronisation. Sets launched.nonfinite (on
// the device) for the jobs placed. Never throws.
std::vector<absl::StatusOr<ForwardItem>> PlaceInputs(Executor::Launched& launched,
                                                     const c10::Device& device) {
  const std::vector<std::shared_ptr<Job>>& batch = launched.batch;
  std::vector<absl::StatusOr<ForwardItem>> items(batch.size());
  // (B * S, d_model): one row per token, also for B or S = 0.
  const auto rows = [](const at::Tensor& x) {
    return x.reshape({x.numel() / std::max<int64_t>(x.size(-1), 1), x.size(-1)});
  };
  for (size_t i = 0; i < batch.size(); ++i) {
    const Job& job = *batch[i];
    items[i] = CatchTorchErrors([&]() -> absl::StatusOr<ForwardItem> {
      ForwardItem item;
      item.options = job.plan.options;
      if (auto* factor = std::get_if<at::Tensor>(&item.options.loss_div_factor)) {
        *factor = CopyToDevice(*factor, device);
      }
      item.options.interrupt_check = job.still_wanted;
      item.validated = true;  // by the frontend (server/frontend/service.cc Decode)
      if (device.is_cpu()) {
        // Hidden states in a CUDA shared-memory region come to the host first.
        const at::Tensor x = job.x.is_cpu() ? job.x : job.x.to(at::kCPU);
        launched.nonfinite[i] = at::isfinite(rows(x)).logical_not().sum(-1);
        item.x = x.to(ScalarTypeOf(job.plan.config.dtype));
      }
      return item;
    });
  }
  if (device.is_cpu()) return items;
  // Jobs by wire dtype (almost always one).
  std::map<at::ScalarType, std::vector<size_t>> by_dtype;
  for (size_t i = 0; i < batch.size(); ++i) {
    if (items[i].ok()) by_dtype[batch[i]->x.scalar_type()].push_back(i);
  }
  for (const auto& [dtype, group] : by_dtype) {
    // Each job's rows in pinned host memory: a large call comes in pageable memory (the frontend
    // pins small ones) and is staged here, so that its transfer is asynchronous too; rows in a
    // CUDA shared-memory region are copied from their device as they are. A job that cannot be
    // staged gets its error alone.
    std::vector<size_t> jobs;
    std::vector<at::Tensor> sources;
    for (const size_t i : group) {
      absl::StatusOr<at::Tensor> source = CatchTorchErrors([&]() -> absl::StatusOr<at::Tensor> {
        at::Tensor x = rows(batch[i]->x);
        if (x.is_cpu() && !x.is_pinned()) {
          x = at::empty(x.sizes(), x.options().pinned_memory(true)).copy_(x);
        }
        return x;
      });
      if (source.ok()) {
        jobs.push_back(i);
        sources.push_back(*std::move(source));
      } else {
        items[i] = source.status();
      }
    }
    if (jobs.empty()) continue;
    // One buffer for the group: if it cannot be had, no job of the group runs.
    const absl::Status placed = CatchTorchErrors([&]() -> absl::Status {
      int64_t total = 0;
      for (const at::Tensor& source : sources) total += source.size(0);
      const int64_t width = batch[jobs.front()]->x.size(-1);
      const at::Tensor sent =
          at::empty({total, width}, at::TensorOptions().dtype(dtype).device(device));
      int64_t row = 0;
      for (const at::Tensor& source : sources) {
        sent.narrow(0, row, source.size(0)).copy_(source, /*non_blocking=*/true);
        row += source.size(0);
      }
      const at::Tensor nonfinite = at::isfinite(sent).logical_not().sum(-1);
      const at::Tensor converted = sent.to(ScalarTypeOf(batch[jobs.front()]->plan.config.dtype));
      row = 0;
      for (const size_t i : jobs) {
        const at::Tensor& x = batch[i]->x;
        const int64_t n = rows(x).size(0);
        items[i]->x = converted.narrow(0, row, n).view(x.sizes());
        launched.nonfinite[i] = nonfinite.narrow(0, row, n);
        row += n;
      }
      return absl::OkStatus();
    });
    if (!placed.ok()) {
      for (const size_t i : jobs) {
        items[i] = placed;
        launched.nonfinite[i] = at::Tensor();
      }
    }
  }
  return items;
}

// Queues the copy of `tensors` to pinned host memory and points each at its copy (same dtype,
// sizes, strides): once per device storage, however many of them view it (a packed batch's
// losses are views of a few tensors). May throw c10::Error.
void ToHostOrThrow(const std::vector<at::Tensor*>& tensors) {
  std::map<const void*, at::Tensor> copies;  // device storage -> its bytes on the host
  for (at::Tensor* tensor : tensors) {
    if (!tensor->defined() || tensor->is_cpu()) continue;
    const c10::Storage& storage = tensor->storage();
    at::Tensor& host = copies[storage.data()];
    if (!host.defined()) {
      const at::Tensor bytes = at::empty({0}, tensor->options().dtype(at::kByte)).set_(storage);
      host = at::empty({bytes.numel()}, bytes.options().device(at::kCPU).pinned_memory(true));
      host.copy_(bytes, /*non_blocking=*/true);
    }
    *tensor =
        at::empty({0}, tensor->options().device(at::kCPU))
            .set_(host.storage(), tensor->storage_offset(), tensor->sizes(), tensor->strides());
  }
}

// `output`'s logits converted to `logits_dtype` (on the device) and copied to pinned host memory
// on their own (each caller's logits are large: none keeps another's alive). May throw.
void LogitsToHostOrThrow(LMOutput& output, v1::DataType logits_dtype) {
  if (!output.logits.has_value()) return;
  const at::Tensor converted = output.logits->to(ScalarTypeOf(logits_dtype));
  at::Tensor host = at::empty(
      converted.sizes(), converted.options().device(at::kCPU).pinned_memory(true).memory_format(
                             at::MemoryFormat::Contiguous));
  host.copy_(converted, /*non_blocking=*/true);
  output.logits = std::move(host);
}

// Queues `batch` (one batch key) on the current stream of `device`, with the copies of its
// outputs to the host, so that a finished batch holds no device memory while its callers encode
// their answers. Never throws.
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
  if (device.is_cuda()) {
    absl::Status recorded = CatchTorchErrors([&]() -> absl::Status {
      launched->started.emplace(device.type(), c10::EventFlag::BACKEND_DEFAULT);
      launched->started->record(c10::impl::VirtualGuardImpl(device.type()).getStream(device));
      return absl::OkStatus();
    });
    if (!recorded.ok()) launched->started.reset();
  }
  if (!head.ok()) {
    std::fill(launched->results.begin(), launched->results.end(), head.status());
    return launched;
  }
  // Jobs whose inputs cannot be placed get their error; the others run packed.
  std::vector<ForwardItem> items;
  std::vector<size_t> runs;  // items[k] is batch[runs[k]]
  std::vector<absl::StatusOr<ForwardItem>> placed = PlaceInputs(*launched, device);
  for (size_t i = 0; i < n; ++i) {
    if (placed[i].ok()) {
      items.push_back(*std::move(placed[i]));
      runs.push_back(i);
    } else {
      launched->results[i] = placed[i].status();
    }
  }
  std::vector<absl::StatusOr<LMOutput>> outputs = (*head)->ForwardBatch(items);
  for (size_t k = 0; k < runs.size(); ++k) launched->results[runs[k]] = std::move(outputs[k]);
  absl::Status queued = CatchTorchErrors([&]() -> absl::Status {
    if (device.is_cpu()) return absl::OkStatus();
    std::vector<at::Tensor*> tensors;
    for (size_t i = 0; i < n; ++i) {
      tensors.push_back(&launched->nonfinite[i]);
      absl::StatusOr<LMOutput>& output = launched->results[i];
      if (!output.ok()) continue;
      // Large, so a failure (out of memory) is this caller's alone.
      absl::Status copied = CatchTorchErrors([&]() -> absl::Status {
        LogitsToHostOrThrow(*output, launched->batch[i]->plan.logits_dtype);
        return absl::OkStatus();
      });
      if (!copied.ok()) {
        output = std::move(copied);
        continue;
      }
      for (std::optional<at::Tensor>* tensor :
           {&output->loss, &output->ce_loss, &output->z_loss, &output->argmax}) {
        if (tensor->has_value()) tensors.push_back(&**tensor);
      }
      for (const auto& [name, tensor] : ScoringTensors(output->scoring)) {
        if (tensor->has_value()) tensors.push_back(&**tensor);
      }
    }
    ToHostOrThrow(tensors);
    const c10::impl::VirtualGuardImpl guard(device.type());
    c10::Event finished(device.type(), c10::EventFlag::BACKEND_DEFAULT);
    finished.record(guard.getStream(device));
    launched->finished = std::move(finished);
    return absl::OkStatus();
  });
  if (!queued.ok()) {
    // The outputs share storages: none can be trusted. Calls that had failed keep their error.
    for (absl::StatusOr<LMOutput>& result : launched->results) {
      if (result.ok()) result = queued;
    }
    launched->nonfinite.assign(n, at::Tensor());
  }
  launched->launch_us =
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - launched->start).count();
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
  int64_t device_us = 0;
  if (finished.ok() && launched.started.has_value() && launched.finished.has_value()) {
    CatchTorchErrors([&]() -> absl::Status {
      device_us = static_cast<int64_t>(launched.started->elapsedTime(*launched.finished) * 1e3);
      return absl::OkStatus();
    }).IgnoreError();
  }
  const int64_t compute_us =
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - launched.start).count();
  for (size_t i = 0; i < launched.batch.size(); ++i) {
    Job& job = *launched.batch[i];
    job.result = finished.ok() ? std::move(launched.results[i]) : finished;
    job.compute_us = compute_us;
    job.launch_us = launched.launch_us;
    job.device_us = device_us;
    const at::Tensor& nonfinite = launched.nonfinite[i];
    if (finished.ok() && nonfinite.defined()) {
      // Host memory now (the copy finished with the batch): int64 per token.
      const at::Tensor counts = nonfinite.contiguous();
      const int64_t* count = counts.data_ptr<int64_t>();
      job.nonfinite = std::accumulate(count, count + counts.numel(), int64_t{0});
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

// lmhead_executor_bench: the serving path without gRPC. --clients threads each submit Forward
// jobs of (1, --tokens, d_model) hidden states (sent as bf16) with labels (fused_linear, sum)
// straight to the server's scheduler, one job in flight each, the way the frontend does once a
// call is decoded; the server's executors (one per --device entry) run them, with the demo head
// in --dtype. Prints, per --max_batch_tokens value, tokens/s against the kernel-only rate of the
// same head (forwards of --kernel_tokens tokens on the first device, measured first in the same
// run), latency percentiles, the mean batch, and per job the executor's host time to queue its
// batch (copies, launches, copies back) and, on a GPU, the device's time on it. On the CPU the
// host time is the compute itself, and the rates may exceed kernel-only's (smaller forwards use
// the caches better). Issue 12's serving benchmark without the transport (docs/BENCHMARKS.md
// "Serving").
//
//   bazel build //bench:lmhead_executor_bench    # or tools/gpu/bench.sh executor on a GPU machine
//   lmhead_executor_bench --device cuda:0 --clients 64 --tokens 256 --seconds 10
//   lmhead_executor_bench --device cpu --d_model 256 --vocab_size 8192 --dtype float32 \
//       --tokens 64 --clients 16 --kernel_tokens 512
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "bench/results_table.h"
#include "core/dtype.h"
#include "core/lm_head.h"
#include "server/executor/executor.h"
#include "server/forward_request.h"
#include "server/model_registry.h"
#include "server/options.h"
#include "server/scheduler/scheduler.h"

ABSL_FLAG(std::string, device, "cpu",
          "Executors' devices, as the server's --device (cpu, cuda, cuda:0,cuda:1, ...).");
ABSL_FLAG(int64_t, d_model, 4096, "Hidden size of the demo head.");
ABSL_FLAG(int64_t, vocab_size, 128256, "Vocabulary size of the demo head.");
ABSL_FLAG(std::string, dtype, "bfloat16",
          "Demo head's parameters and compute dtype (the hidden states are sent as bf16).");
ABSL_FLAG(int, clients, 64, "Submitting threads, one job in flight each.");
ABSL_FLAG(int64_t, tokens, 256, "Tokens per job: hidden states (1, tokens, d_model).");
ABSL_FLAG(std::string, max_batch_tokens, "1,8192",
          "Comma-separated --max_batch_tokens values to measure, one run each (1: no packing).");
ABSL_FLAG(int64_t, kernel_tokens, 8192, "Tokens per forward of the kernel-only baseline.");
ABSL_FLAG(double, seconds, 10, "Measured time per run.");
ABSL_FLAG(double, warmup_seconds, 2, "Load before each measurement (not counted).");
ABSL_FLAG(bool, count_ops, false,
          "Also count the ATen operators the executors run per job (each a kernel launch or a "
          "host-side step on a GPU), by name, during the measured time.");

namespace lmhead {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Waits for every queued kernel of the devices in `devices`.
void Synchronize(const std::vector<std::string>& devices) {
  for (const std::string& device : devices) {
    const at::Tensor probe = at::zeros({1}, at::Device(device));
    (void)probe.cpu();  // a copy to the host waits for the device's current stream
  }
}

v1::ForwardRequest MakeRequest(int64_t tokens, int64_t d_model, int64_t vocab_size, uint64_t seed) {
  at::manual_seed(seed);
  v1::ForwardRequest request;
  v1::Tensor* x = request.mutable_hidden_states();
  x->set_dtype(v1::DATA_TYPE_BF16);
  for (int64_t size : {int64_t{1}, tokens, d_model}) x->add_shape(size);
  const at::Tensor values = at::randn({tokens, d_model}).to(at::kBFloat16);
  x->set_data(values.data_ptr(), values.nbytes());
  v1::Tensor* labels = request.mutable_labels();
  labels->set_dtype(v1::DATA_TYPE_INT64);
  labels->add_shape(1);
  labels->add_shape(tokens);
  const at::Tensor ids = at::randint(vocab_size, {tokens}, at::kLong);
  labels->set_data(ids.data_ptr(), ids.nbytes());
  request.mutable_config()->set_loss_implementation(v1::LOSS_IMPLEMENTATION_FUSED_LINEAR);
  request.mutable_options()->set_loss_reduction(v1::LOSS_REDUCTION_SUM);
  request.mutable_options()->set_return_logits(false);
  return request;
}

// One client's decoded call, as the frontend queues it (server/frontend/service.cc Decode).
struct Template {
  ForwardPlan plan;
  at::Tensor x;
  std::string batch_key;
};

Template Decode(const ModelRegistry& registry, const Options& options,
                const v1::ForwardRequest& request) {
  absl::StatusOr<ForwardPlan> plan = PlanForward(registry, options, request);
  if (!plan.ok()) {
    std::fprintf(stderr, "plan: %s\n", plan.status().ToString().c_str());
    std::exit(1);
  }
  absl::StatusOr<at::Tensor> x = DecodeInputs(request, &*plan);
  if (!x.ok()) {
    std::fprintf(stderr, "decode: %s\n", x.status().ToString().c_str());
    std::exit(1);
  }
  // The decoded tensors alias `request`, which the caller does not keep: each gets its own copy
  // (the frontend keeps the request instead).
  ForwardOptions& decoded = plan->options;
  if (decoded.labels.has_value()) decoded.labels = decoded.labels->clone();
  if (auto* positions = std::get_if<at::Tensor>(&decoded.logits_to_keep)) {
    *positions = positions->clone();
  }
  if (auto* factor = std::get_if<at::Tensor>(&decoded.loss_div_factor)) *factor = factor->clone();
  Template call{*plan, *x, plan->model->name() + "\n" + plan->model->VariantKey(plan->config)};
  call.x = plan->model->head().device().is_cuda() ? call.x.pin_memory() : call.x.clone();
  return call;
}

double Percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[std::min(values.size() - 1, static_cast<size_t>(q * values.size()))];
}

// How KernelOnly's items reach the device.
enum class Inputs {
  kOnDevice,  // hidden states already there
  kCopied,    // copied there from pinned host memory into one buffer first, as the executor does
  kCopiedAndCounted,  // and counted for non-finite values there, as the executor does
  kVaryingCount,      // on the device, but each forward packs 5/8 to all of the items in turn
  kPoolStream,        // on the device, run on a stream from LibTorch's pool, as the executor does
};

// Kernel-only tokens/s on the first device, back to back: one Forward of `tokens` tokens at a
// time (pieces 1), or the core's packed forward of `pieces` items that share them (ForwardBatch,
// labels on the host as the server passes them).
double KernelOnly(const ModelRegistry& registry, int64_t tokens, int64_t vocab_size, int64_t pieces,
                  Inputs inputs = Inputs::kOnDevice) {
  const LMHead& head = registry.Find("").value()->head();
  const at::Device device = head.device();
  const int64_t length = tokens / pieces;
  std::vector<ForwardItem> items;
  std::vector<at::Tensor> host_x;
  for (int64_t i = 0; i < pieces; ++i) {
    ForwardItem item;
    item.x = at::randn({1, length, head.d_model()}, at::TensorOptions().device(device))
                 .to(ScalarTypeOf(head.config().dtype));
    host_x.push_back(device.is_cuda() ? item.x.cpu().pin_memory() : item.x);
    ForwardOptions& options = item.options;
    options.labels = at::randint(vocab_size, {1, length}, at::kLong);
    if (pieces == 1) options.labels = options.labels->to(device);
    options.loss_reduction = LossReduction::kSum;
    options.loss_implementation = LossImplementation::kFusedLinear;
    options.return_logits = false;
    item.validated = true;
    items.push_back(std::move(item));
  }
  at::Tensor nonfinite;
  std::optional<c10::StreamGuard> on_stream;
  if (inputs == Inputs::kPoolStream) {
    on_stream.emplace(c10::impl::VirtualGuardImpl(device.type()).getStreamFromGlobalPool(device));
  }
  int64_t round = 0;
  int64_t packed_tokens = 0;
  const auto run = [&] {
    std::vector<ForwardItem> some = items;
    if (inputs == Inputs::kVaryingCount) some.resize(pieces - (round % (pieces * 3 / 8 + 1)));
    ++round;
    packed_tokens += static_cast<int64_t>(some.size()) * length;
    if (inputs != Inputs::kOnDevice) {
      const at::Tensor buffer =
          at::empty({pieces * length, head.d_model()}, items.front().x.options());
      for (int64_t i = 0; i < pieces; ++i) {
        buffer.narrow(0, i * length, length)
            .copy_(host_x[i].view({length, -1}), /*non_blocking=*/true);
        items[i].x = buffer.narrow(0, i * length, length).view({1, length, -1});
      }
      if (inputs == Inputs::kCopiedAndCounted) {
        nonfinite = at::isfinite(buffer).logical_not().sum(-1);
      }
    }
    absl::Status status = absl::OkStatus();
    if (pieces == 1) {
      status = head.Forward(items.front().x, items.front().options).status();
    } else {
      for (const absl::StatusOr<LMOutput>& out : head.ForwardBatch(some)) {
        status.Update(out.status());
      }
    }
    if (!status.ok()) {
      std::fprintf(stderr, "kernel-only: %s\n", status.ToString().c_str());
      std::exit(1);
    }
  };
  for (int i = 0; i < 3; ++i) run();
  Synchronize({device.str()});
  int rounds = 0;
  packed_tokens = 0;
  const Clock::time_point start = Clock::now();
  while (Seconds(Clock::now() - start) < 3) {
    run();
    ++rounds;
    if (rounds % 4 == 0) Synchronize({device.str()});
  }
  Synchronize({device.str()});
  return packed_tokens / Seconds(Clock::now() - start);
}

// Counts the ATen operators started on any thread while counting is on, by name (nested
// operators included: aten::to counts, and so does the aten::copy_ it runs), and the host time
// of the outermost ones (an operator called by none), by name.
class OpCounter {
 public:
  struct Entry {
    int64_t count = 0;
    int64_t outermost_ns = 0;
  };

  OpCounter() {
    instance_ = this;
    handle_ = at::addGlobalCallback(at::RecordFunctionCallback(&OpCounter::Enter, &OpCounter::Leave)
                                        .scopes({at::RecordScope::FUNCTION}));
  }
  ~OpCounter() { at::removeCallback(handle_); }
  void Start() { counting_ = true; }
  std::map<std::string, Entry> Stop() {
    counting_ = false;
    absl::MutexLock lock(&mu_);
    return std::exchange(entries_, {});
  }

 private:
  struct Started : at::ObserverContext {
    Clock::time_point start;
    bool outermost = false;
  };
  static inline thread_local int depth_ = 0;

  static std::unique_ptr<at::ObserverContext> Enter(const at::RecordFunction& fn) {
    auto started = std::make_unique<Started>();
    started->outermost = depth_++ == 0;
    if (!instance_->counting_.load()) return started;
    {
      absl::MutexLock lock(&instance_->mu_);
      ++instance_->entries_[fn.name()].count;
    }
    started->start = Clock::now();
    return started;
  }
  static void Leave(const at::RecordFunction& fn, at::ObserverContext* context) {
    --depth_;
    auto* started = static_cast<Started*>(context);
    if (!started->outermost || !instance_->counting_.load() ||
        started->start == Clock::time_point()) {
      return;
    }
    const int64_t ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started->start).count();
    absl::MutexLock lock(&instance_->mu_);
    instance_->entries_[fn.name()].outermost_ns += ns;
  }

  static inline OpCounter* instance_ = nullptr;
  at::CallbackHandle handle_;
  std::atomic<bool> counting_{false};
  absl::Mutex mu_;
  std::map<std::string, Entry> entries_;
};

struct Totals {
  std::vector<double> latencies_ms;
  int64_t jobs = 0;
  int64_t errors = 0;
  int64_t batch_size_sum = 0;
  int64_t launch_us_sum = 0;  // per job: its batch's launch_us / batch_size
  int64_t device_us_sum = 0;  // per job: its batch's device_us / batch_size
  std::string first_error;
};

void Measure(const ModelRegistry& registry, const std::vector<Template>& calls,
             int64_t max_batch_tokens, double kernel_tokens_per_s, OpCounter* ops) {
  Scheduler scheduler(SchedulerLimits{max_batch_tokens, int64_t{1} << 40, absl::ZeroDuration()});
  std::vector<std::unique_ptr<Executor>> executors;
  const std::vector<std::string>& devices = registry.devices();
  for (size_t i = 0; i < devices.size(); ++i) {
    executors.push_back(std::make_unique<Executor>(&scheduler, devices[i], static_cast<int>(i)));
  }
  const double warmup = absl::GetFlag(FLAGS_warmup_seconds);
  const double seconds = absl::GetFlag(FLAGS_seconds);
  const Clock::time_point start = Clock::now();
  const Clock::time_point measured =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(warmup));
  const Clock::time_point end = measured + std::chrono::duration_cast<Clock::duration>(
                                               std::chrono::duration<double>(seconds));
  absl::Mutex mu;
  Totals totals;
  std::thread counting;
  if (ops != nullptr) {
    counting = std::thread([&] {
      std::this_thread::sleep_until(measured);
      ops->Start();
    });
  }
  std::vector<std::thread> clients;
  for (const Template& call : calls) {
    clients.emplace_back([&, call] {
      Totals mine;
      while (true) {
        const Clock::time_point sent = Clock::now();
        if (sent >= end) break;
        auto job = std::make_shared<Job>();
        job->plan = call.plan;
        job->x = call.x;
        job->batch_key = call.batch_key;
        job->tokens = call.plan.batch * call.plan.length;
        job->still_wanted = [] { return absl::OkStatus(); };
        absl::Status submitted = scheduler.Submit(job, /*wait_for_room=*/true);
        if (submitted.ok()) job->done.WaitForNotification();
        const Clock::time_point answered = Clock::now();
        if (sent < measured || answered > end) continue;
        const absl::Status status = submitted.ok() ? job->result.status() : submitted;
        if (!status.ok()) {
          if (mine.errors++ == 0) mine.first_error = status.ToString();
          continue;
        }
        ++mine.jobs;
        mine.latencies_ms.push_back(Seconds(answered - sent) * 1e3);
        mine.batch_size_sum += job->batch_size;
        mine.launch_us_sum += job->launch_us / std::max(1, job->batch_size);
        mine.device_us_sum += job->device_us / std::max(1, job->batch_size);
      }
      absl::MutexLock lock(&mu);
      totals.jobs += mine.jobs;
      totals.errors += mine.errors;
      totals.batch_size_sum += mine.batch_size_sum;
      totals.launch_us_sum += mine.launch_us_sum;
      totals.device_us_sum += mine.device_us_sum;
      totals.latencies_ms.insert(totals.latencies_ms.end(), mine.latencies_ms.begin(),
                                 mine.latencies_ms.end());
      if (totals.first_error.empty()) totals.first_error = mine.first_error;
    });
  }
  for (std::thread& client : clients) client.join();
  std::map<std::string, OpCounter::Entry> op_counts;
  if (ops != nullptr) {
    counting.join();
    op_counts = ops->Stop();
  }
  scheduler.Close();
  executors.clear();
  const double tokens_per_s = totals.jobs * calls.front().plan.length / seconds;
  const double mean_batch = totals.jobs > 0 ? double(totals.batch_size_sum) / totals.jobs : 0;
  const double launch_us = totals.jobs > 0 ? double(totals.launch_us_sum) / totals.jobs : 0;
  const double device_us = totals.jobs > 0 ? double(totals.device_us_sum) / totals.jobs : 0;
  const double p50 = Percentile(totals.latencies_ms, 0.5);
  const double p99 = Percentile(totals.latencies_ms, 0.99);
  std::printf(
      "max_batch_tokens %-6lld %10.0f tokens/s  %5.1f%% of kernel-only  p50 %6.2f ms  p99 %6.2f "
      "ms  mean batch %5.1f  per job: host launch %6.1f us, device %s  errors %lld\n",
      static_cast<long long>(max_batch_tokens), tokens_per_s,
      100 * tokens_per_s / kernel_tokens_per_s, p50, p99, mean_batch, launch_us,
      device_us > 0 ? absl::StrFormat("%6.1f us", device_us).c_str() : "n/a",
      static_cast<long long>(totals.errors));
  if (!totals.first_error.empty()) std::printf("  first error: %s\n", totals.first_error.c_str());
  AppendResult("executor",
               {absl::GetFlag(FLAGS_d_model), absl::GetFlag(FLAGS_vocab_size),
                calls.front().plan.length, absl::GetFlag(FLAGS_dtype),
                absl::StrFormat("scheduler and executors, max_batch_tokens %d", max_batch_tokens),
                p50, "kernel-only", tokens_per_s / kernel_tokens_per_s, NAN, tokens_per_s, p99});
  if (ops != nullptr && totals.jobs > 0) {
    // Counted until the last job ended, a little past the measured jobs: per job, approximately.
    std::vector<std::pair<OpCounter::Entry, std::string>> sorted;
    int64_t all = 0;
    int64_t all_ns = 0;
    for (const auto& [name, entry] : op_counts) {
      sorted.emplace_back(entry, name);
      all += entry.count;
      all_ns += entry.outermost_ns;
    }
    std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) {
      return std::make_pair(a.first.outermost_ns, a.first.count) >
             std::make_pair(b.first.outermost_ns, b.first.count);
    });
    const double jobs = totals.jobs;
    std::printf("  ATen operators per job: %.1f, %.1f us of host time in the outermost ones:\n",
                all / jobs, all_ns / jobs / 1e3);
    for (const auto& [entry, name] : sorted) {
      if (entry.count * 20 < totals.jobs) continue;  // fewer than one in 20 jobs
      std::printf("    %7.2f  %8.2f us  %s\n", entry.count / jobs, entry.outermost_ns / jobs / 1e3,
                  name.c_str());
    }
  }
  std::fflush(stdout);
}

int Run() {
  Options options;
  options.device = absl::GetFlag(FLAGS_device);
  options.demo_d_model = absl::GetFlag(FLAGS_d_model);
  options.demo_vocab_size = absl::GetFlag(FLAGS_vocab_size);
  options.demo_dtype = absl::GetFlag(FLAGS_dtype);
  absl::StatusOr<std::unique_ptr<ModelRegistry>> registry = ModelRegistry::Load(options);
  if (!registry.ok()) {
    std::fprintf(stderr, "%s\n", registry.status().ToString().c_str());
    return 1;
  }
  const int64_t tokens = absl::GetFlag(FLAGS_tokens);
  std::vector<Template> calls;
  for (int c = 0; c < absl::GetFlag(FLAGS_clients); ++c) {
    calls.push_back(Decode(**registry, options,
                           MakeRequest(tokens, options.demo_d_model, options.demo_vocab_size, c)));
  }
  const int64_t kernel_tokens = absl::GetFlag(FLAGS_kernel_tokens);
  const double kernel = KernelOnly(**registry, kernel_tokens, options.demo_vocab_size, 1);
  const double packed =
      KernelOnly(**registry, kernel_tokens, options.demo_vocab_size, kernel_tokens / tokens);
  std::printf("executor-only: devices %s, %d clients x %lld tokens, d_model %lld, vocab %lld, %s\n",
              options.device.c_str(), absl::GetFlag(FLAGS_clients), static_cast<long long>(tokens),
              static_cast<long long>(options.demo_d_model),
              static_cast<long long>(options.demo_vocab_size), options.demo_dtype.c_str());
  std::printf("kernel-only (%lld tokens a forward, first device): %.0f tokens/s\n",
              static_cast<long long>(kernel_tokens), kernel);
  std::printf(
      "core's packed forward of %lld items of %lld tokens (ForwardBatch): %.0f tokens/s "
      "(%.1f%%)\n",
      static_cast<long long>(kernel_tokens / tokens), static_cast<long long>(tokens), packed,
      100 * packed / kernel);
  const auto result = [&](const std::string& what, double rate) {
    AppendResult("executor",
                 {options.demo_d_model, options.demo_vocab_size, kernel_tokens, options.demo_dtype,
                  what, NAN, "kernel-only", rate / kernel, NAN, rate});
  };
  result("kernel-only", kernel);
  result(absl::StrFormat("packed forward of %d items (ForwardBatch)", kernel_tokens / tokens),
         packed);
  if (options.device != "cpu") {
    for (const auto& [inputs, what] :
         {std::make_pair(Inputs::kCopied, "copied from pinned host memory first"),
          std::make_pair(Inputs::kCopiedAndCounted, "copied and counted for non-finite values"),
          std::make_pair(Inputs::kVaryingCount, "on the device, 5/8 to all of the items in turn"),
          std::make_pair(Inputs::kPoolStream, "on the device, on a stream of LibTorch's pool")}) {
      const double rate = KernelOnly(**registry, kernel_tokens, options.demo_vocab_size,
                                     kernel_tokens / tokens, inputs);
      std::printf("  the same, hidden states %s: %.0f tokens/s (%.1f%%)\n", what, rate,
                  100 * rate / kernel);
      result(absl::StrFormat("packed, hidden states %s", what), rate);
    }
  }
  for (absl::string_view value : absl::StrSplit(absl::GetFlag(FLAGS_max_batch_tokens), ',')) {
    int64_t max_batch_tokens = 0;
    if (!absl::SimpleAtoi(value, &max_batch_tokens) || max_batch_tokens < 1) {
      std::fprintf(stderr, "--max_batch_tokens: not a positive integer: %s\n",
                   std::string(value).c_str());
      return 1;
    }
    std::optional<OpCounter> ops;
    if (absl::GetFlag(FLAGS_count_ops)) ops.emplace();
    Measure(**registry, calls, max_batch_tokens, kernel, ops.has_value() ? &*ops : nullptr);
  }
  return 0;
}

}  // namespace
}  // namespace lmhead

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "The serving path without gRPC: jobs submitted straight to the scheduler and executors.\n"
      "  lmhead_executor_bench --device cuda:0 --clients 64 --tokens 256 --seconds 10");
  absl::FlagsUsageConfig usage;  // --help lists this file's flags
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "executor_bench");
  };
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  return lmhead::Run();
}

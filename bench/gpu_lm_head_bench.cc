// GPU benchmark (issue 4): for bf16 LM-head shapes, the time and peak extra device memory of
//   cublas  x @ W^T alone (at::mm into a preallocated output), the floor for any forward;
//   eager   PyTorch eager: bf16 matmul -> fp32 -> logsumexp and label gather;
//   ours    LMHead fused_linear forward (reduction sum, z-loss on, labels on the host);
// all measured in this process, with ours/cublas printed as `fused/cublas=<ratio>`.
// bench/gpu_baselines.py measures Liger-Kernel and Cut Cross-Entropy the same way. The default
// grid, --scoring and --serving also append their rows to the tables fused_linear_forward,
// scoring and serving under $LMHEAD_RESULTS (bench/results_table.h).
//
//   gpu_lm_head_bench [--quick | --breakdown | --tile_sweep | --paths [--quick] | --sustained |
//                      --serving | --scoring]
// (--chunk_sweep, --tile_sweep's old name, still works for one release.)
// --scoring times issue 14's scoring outputs against the loss alone (Scoring, below).
// --serving prints the kernel-only tokens/s that bench/load_generator.cc's serving benchmark
// divides by: LMHead::Forward as an executor runs it (bf16, fused_linear, sum, host labels, no
// z-loss) on a batch of --max_batch_tokens (8192) tokens already on the device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/results_table.h"
#include "core/device_copy.h"
#include "core/lm_head.h"
#include "core/losses.h"
#include "core/ops/logit_stats.h"

namespace lmhead {
namespace {

struct Timing {
  double median_ms = 0;
  double min_ms = 0;
  double max_ms = 0;
  double host_median_ms = 0;  // the host's time in the call: queueing, and any wait inside it
  double peak_extra_mb = 0;
  bool oom = false;
};

constexpr int64_t kSpinCycles = 4'000'000;  // ~2 ms at the H100's and H200's clocks

int64_t AllocatedBytes() {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(0)
      .allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
      .current;
}
int64_t PeakBytes() {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(0)
      .allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
      .peak;
}

// Times implementations of one shape under the same conditions. Each is warmed up alone (2 runs,
// which also give its peak extra memory); then the timed runs alternate, one run of each per
// round for `rounds` rounds, so that the card's clock and power changes during the measurement
// reach all of them alike. Median, min and max of each from CUDA events on the current stream.
// `device_only` queues a ~2 ms spin kernel before each timed run, so that the host has queued the
// run's work before the device reaches it: the time is then the device's alone, without the gaps
// the host's queueing leaves when the device is idle (as in a pipeline that keeps it busy).
std::vector<Timing> MeasureInterleaved(const std::vector<std::function<void()>>& fns, int rounds,
                                       bool device_only = false) {
  std::vector<Timing> timings(fns.size());
  std::vector<std::vector<double>> ms(fns.size());
  std::vector<std::vector<double>> host_ms(fns.size());
  const auto guarded = [&](size_t i, const std::function<void()>& step) {
    if (timings[i].oom) return;
    try {
      step();
    } catch (const std::exception& e) {  // out of memory, reported by LibTorch or by our Status
      std::fprintf(stderr, "failed: %.200s\n", e.what());
      timings[i].oom = true;
    }
  };
  for (size_t i = 0; i < fns.size(); ++i) {
    guarded(i, [&] {
      c10::cuda::device_synchronize();
      const int64_t before = AllocatedBytes();
      c10::cuda::CUDACachingAllocator::resetPeakStats(0);
      fns[i]();
      fns[i]();
      c10::cuda::device_synchronize();
      timings[i].peak_extra_mb = (PeakBytes() - before) / 1e6;
    });
  }
  for (int round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < fns.size(); ++i) {
      guarded(i, [&] {
        at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
        if (device_only) at::cuda::sleep(kSpinCycles);
        start.record();
        const auto host_start = std::chrono::steady_clock::now();
        fns[i]();
        host_ms[i].push_back(
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - host_start)
                .count());
        stop.record();
        stop.synchronize();
        ms[i].push_back(start.elapsed_time(stop));
      });
    }
  }
  for (size_t i = 0; i < fns.size(); ++i) {
    if (timings[i].oom) continue;
    std::sort(ms[i].begin(), ms[i].end());
    timings[i].median_ms = ms[i][ms[i].size() / 2];
    timings[i].min_ms = ms[i].front();
    timings[i].max_ms = ms[i].back();
    std::sort(host_ms[i].begin(), host_ms[i].end());
    timings[i].host_median_ms = host_ms[i][host_ms[i].size() / 2];
  }
  c10::cuda::CUDACachingAllocator::emptyCache();
  return timings;
}

Timing Measure(const std::function<void()>& fn, int reps) {
  return MeasureInterleaved({fn}, reps)[0];
}

void Row(const char* impl, int64_t d, int64_t v, int64_t n, const Timing& t, double flops,
         double cublas_ms) {
  if (t.oom) {
    std::printf("| %d | %lld | %lld | %s | failed (OOM) | | | | |\n", static_cast<int>(d),
                static_cast<long long>(v), static_cast<long long>(n), impl);
    AppendResult("fused_linear_forward",
                 {d, v, n, "bf16", std::string(impl) + " (out of memory)", NAN, "cublas"});
    return;
  }
  std::printf("| %d | %lld | %lld | %s | %.2f | %.2f–%.2f | %.0f | %.0f | %s%.3f |\n",
              static_cast<int>(d), static_cast<long long>(v), static_cast<long long>(n), impl,
              t.median_ms, t.min_ms, t.max_ms, flops / (t.median_ms * 1e-3) / 1e12, t.peak_extra_mb,
              std::string(impl) == "ours" ? "fused/cublas=" : "x", t.median_ms / cublas_ms);
  std::fflush(stdout);
  AppendResult("fused_linear_forward",
               {d, v, n, "bf16", impl, t.median_ms, "cublas", t.median_ms / cublas_ms,
                t.peak_extra_mb, n / (t.median_ms * 1e-3)});
}

// A bf16 LMHead without bias or norm using fused_linear, random weights, on cuda:0; exits on
// failure.
std::unique_ptr<LMHead> BenchHead(int64_t d, int64_t v) {
  LMHeadConfig config;
  config.dtype = DType::kBFloat16;
  config.bias = false;
  config.loss_implementation = LossImplementation::kFusedLinear;
  auto head = LMHead::Build(config, d, v, "cuda:0", 0);
  if (!head.ok()) {
    std::fprintf(stderr, "%s\n", std::string(head.status().message()).c_str());
    std::exit(1);
  }
  return std::move(*head);
}

// The forward being measured: reduction sum, z-loss on, labels as given, argmax if asked, the
// default tile budget unless one is given.
void ForwardOrThrow(const LMHead& head, const at::Tensor& x, const at::Tensor& labels,
                    bool return_argmax = false, int64_t tile_bytes = 0) {
  ForwardOptions options;
  options.labels = labels;
  options.return_argmax = return_argmax;
  options.logit_tile_bytes = tile_bytes;
  options.loss_reduction = LossReduction::kSum;
  options.z_loss_multiplier = 1e-4;
  auto result = head.Forward(x, options);
  if (!result.ok()) throw std::runtime_error(std::string(result.status().message()));
}

// One shape's head and inputs on cuda:0: x (N, d) bf16, labels (N,) on the device and the same
// labels on the host, pinned.
struct BenchInputs {
  std::unique_ptr<LMHead> head;
  at::Tensor w;
  at::Tensor x;
  at::Tensor labels;
  at::Tensor host_labels;
};
BenchInputs MakeBenchInputs(int64_t d, int64_t v, int64_t n) {
  BenchInputs in;
  in.head = BenchHead(d, v);
  in.w = in.head->NamedParameters()[0].second;
  in.x = at::randn({n, d}, at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16));
  in.labels = at::randint(v, {n}, at::TensorOptions().device(at::kCUDA).dtype(at::kLong));
  in.host_labels = in.labels.cpu().pin_memory();
  return in;
}

// Where ours spends its time at one shape, measured interleaved: one GEMM over everything (its
// output allocated), the GEMMs over tiles of `tile` alone, the epilogue alone over the same
// tiles, and the whole forward with its labels on the device and on the host (pinned), and
// with return_argmax (labels on the host).
void Breakdown(int64_t d, int64_t v, int64_t n, const LogitTileShape& tile, int reps) {
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  const BenchInputs in = MakeBenchInputs(d, v, n);
  const LMHead* head = in.head.get();
  const at::Tensor &w = in.w, &x = in.x, &labels = in.labels, &host_labels = in.host_labels;
  at::Tensor buffer = at::empty({tile.token_rows, tile.vocab_columns}, opts);
  at::Tensor lse = at::full({n}, -INFINITY, opts.dtype(at::kFloat));
  at::Tensor picked = at::zeros({n}, opts.dtype(at::kFloat));
  const auto for_each_tile =
      [&](const std::function<void(int64_t, int64_t, int64_t, int64_t)>& fn) {
        for (int64_t t0 = 0; t0 < n; t0 += tile.token_rows) {
          const int64_t rows = std::min(tile.token_rows, n - t0);
          for (int64_t v0 = 0; v0 < v; v0 += tile.vocab_columns) {
            fn(t0, rows, v0, std::min(tile.vocab_columns, v - v0));
          }
        }
      };
  const std::vector<Timing> timed = MeasureInterleaved(
      {[&] { at::mm(x, w.t()); },
       [&] {
         for_each_tile([&](int64_t t0, int64_t rows, int64_t v0, int64_t cols) {
           at::Tensor out = buffer.narrow(0, 0, rows).narrow(1, 0, cols);
           at::mm_out(out, x.narrow(0, t0, rows), w.narrow(0, v0, cols).t());
         });
       },
       [&] {
         for_each_tile([&](int64_t t0, int64_t rows, int64_t v0, int64_t cols) {
           at::Tensor lse_rows = lse.narrow(0, t0, rows);
           at::Tensor picked_rows = picked.narrow(0, t0, rows);
           AccumulateLogitStats(buffer.narrow(0, 0, rows).narrow(1, 0, cols), v0,
                                labels.narrow(0, t0, rows), lse_rows, picked_rows);
         });
       },
       [&] {
         ForwardOrThrow(*head, x.view({1, n, d}), labels.view({1, n}));
       },
       [&] {
         ForwardOrThrow(*head, x.view({1, n, d}), host_labels.view({1, n}));
       },
       [&] {
         ForwardOrThrow(*head, x.view({1, n, d}), host_labels.view({1, n}), true);
       }},
      reps);
  const Timing& full_gemm = timed[0];
  const Timing& gemms = timed[1];
  const Timing& epilogue = timed[2];
  const Timing& forward_device_labels = timed[3];
  const Timing& forward_host_labels = timed[4];
  const Timing& forward_argmax = timed[5];
  const std::vector<Timing> device_only =
      MeasureInterleaved({[&] { at::mm(x, w.t()); },
                          [&] {
                            ForwardOrThrow(*head, x.view({1, n, d}), host_labels.view({1, n}));
                          }},
                         reps, /*device_only=*/true);
  std::printf(
      "breakdown d=%lld V=%lld N=%lld tile=%lldx%lld: full GEMM %.2f ms, tiled GEMMs %.2f ms, "
      "epilogue %.2f ms (%.0f GB/s); forward with labels on the device %.2f ms, on the host "
      "%.2f ms (%.2f ms over GEMMs + epilogue), with return_argmax %.2f ms; the host queues the "
      "forward in %.2f ms; device only (queued behind a spin kernel): full GEMM %.2f ms, forward "
      "%.2f ms, ratio %.3f\n",
      static_cast<long long>(d), static_cast<long long>(v), static_cast<long long>(n),
      static_cast<long long>(tile.token_rows), static_cast<long long>(tile.vocab_columns),
      full_gemm.median_ms, gemms.median_ms, epilogue.median_ms,
      2.0 * n * v / (epilogue.median_ms * 1e-3) / 1e9, forward_device_labels.median_ms,
      forward_host_labels.median_ms,
      forward_host_labels.median_ms - gemms.median_ms - epilogue.median_ms,
      forward_argmax.median_ms, forward_host_labels.host_median_ms, device_only[0].median_ms,
      device_only[1].median_ms, device_only[1].median_ms / device_only[0].median_ms);
}

// Ours at several tile budgets against one GEMM into a preallocated output, all interleaved:
// small tiles leave each tile's logits in L2 for the epilogue that follows its GEMM, at the
// price of more, smaller GEMMs.
void TileSweep(int64_t d, int64_t v, int64_t n, int reps) {
  const BenchInputs in = MakeBenchInputs(d, v, n);
  const LMHead* head = in.head.get();
  const at::Tensor w = in.w, x = in.x.view({1, n, d}), host_labels = in.host_labels.view({1, n});
  const std::vector<int64_t> budgets_mib = {12, 16, 24, 32, 48, 64, 224};
  at::Tensor out = at::empty({n, v}, in.x.options());
  std::vector<std::function<void()>> fns = {[&] { at::mm_out(out, x.view({n, d}), w.t()); }};
  for (const int64_t mib : budgets_mib) {
    fns.push_back([&, mib] { ForwardOrThrow(*head, x, host_labels, false, mib << 20); });
  }
  const std::vector<Timing> timed = MeasureInterleaved(fns, reps);
  std::printf("tiles d=%lld V=%lld N=%lld: cublas %.2f ms", static_cast<long long>(d),
              static_cast<long long>(v), static_cast<long long>(n), timed[0].median_ms);
  for (size_t i = 0; i < budgets_mib.size(); ++i) {
    const LogitTileShape tile = LogitTiling(n, v, 2, budgets_mib[i] << 20);
    std::printf("; %lld MiB (%lldx%lld) %.2f ms x%.3f", static_cast<long long>(budgets_mib[i]),
                static_cast<long long>(tile.token_rows), static_cast<long long>(tile.vocab_columns),
                timed[i + 1].median_ms, timed[i + 1].median_ms / timed[0].median_ms);
  }
  std::printf("\n");
  std::fflush(stdout);
}

// The two ways to the statistics against one GEMM into a preallocated output, all interleaved:
// the fused GEMM, the tiled GEMMs and epilogue, the fused GEMM with argmax, and the whole
// forward (which takes one of the two: ComputeLogitStats).
void Paths(int64_t d, int64_t v, int64_t n, int reps) {
  const BenchInputs in = MakeBenchInputs(d, v, n);
  const at::Tensor &w = in.w, &x = in.x, &labels = in.labels;
  const int64_t tile_bytes = DefaultLogitTileBytes(at::kCUDA);
  at::Tensor out = at::empty({n, v}, x.options());
  const std::vector<Timing> timed = MeasureInterleaved(
      {[&] { at::mm_out(out, x, w.t()); },
       [&] { ComputeLogitStatsFusedGemm(x, w, labels, tile_bytes); },
       [&] { ComputeLogitStatsTiled(x, w, at::Tensor(), labels, tile_bytes); },
       [&] { ComputeLogitStatsFusedGemm(x, w, labels, tile_bytes, {}, true); },
       [&] {
         ForwardOrThrow(*in.head, x.view({1, n, d}), in.host_labels.view({1, n}));
       }},
      reps);
  const double cublas = timed[0].median_ms;
  std::printf(
      "paths d=%lld V=%lld N=%lld: cublas %.2f ms; fused GEMM stats %.2f ms x%.3f (peak %.0f "
      "MB); tiled stats %.2f ms x%.3f; fused GEMM stats with argmax %.2f ms x%.3f; forward "
      "%.2f ms x%.3f\n",
      static_cast<long long>(d), static_cast<long long>(v), static_cast<long long>(n), cublas,
      timed[1].median_ms, timed[1].median_ms / cublas, timed[1].peak_extra_mb, timed[2].median_ms,
      timed[2].median_ms / cublas, timed[3].median_ms, timed[3].median_ms / cublas,
      timed[4].median_ms, timed[4].median_ms / cublas);
  std::fflush(stdout);
}

// Each path run back to back for `seconds`, with the card's SM clock and power read from
// nvidia-smi halfway: whether a path is slowed by the power cap more than the GEMM is.
void Sustained(int64_t d, int64_t v, int64_t n, double seconds) {
  const BenchInputs in = MakeBenchInputs(d, v, n);
  const at::Tensor &w = in.w, &x = in.x, &labels = in.labels;
  const int64_t tile_bytes = DefaultLogitTileBytes(at::kCUDA);
  at::Tensor out = at::empty({n, v}, x.options());
  const std::vector<std::pair<const char*, std::function<void()>>> fns = {
      {"cublas", [&] { at::mm_out(out, x, w.t()); }},
      {"fused GEMM stats", [&] { ComputeLogitStatsFusedGemm(x, w, labels, tile_bytes); }},
      {"tiled stats", [&] { ComputeLogitStatsTiled(x, w, at::Tensor(), labels, tile_bytes); }}};
  std::printf("sustained d=%lld V=%lld N=%lld, %.0f s each:\n", static_cast<long long>(d),
              static_cast<long long>(v), static_cast<long long>(n), seconds);
  double cublas_ms = 0;
  for (const auto& [name, fn] : fns) {
    fn();
    fn();
    c10::cuda::device_synchronize();
    std::string reading;
    std::thread reader([&] {
      std::this_thread::sleep_for(std::chrono::duration<double>(seconds / 2));
      FILE* pipe = popen(
          "nvidia-smi -i 0 --format=csv,noheader "
          "--query-gpu=clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active",
          "r");
      char line[256] = {};
      if (pipe != nullptr && std::fgets(line, sizeof(line), pipe) != nullptr) reading = line;
      if (pipe != nullptr) pclose(pipe);
      if (!reading.empty() && reading.back() == '\n') reading.pop_back();
    });
    at::cuda::CUDAEvent start(cudaEventDefault), end(cudaEventDefault);
    start.record();
    int calls = 0;
    const auto t0 = std::chrono::steady_clock::now();
    while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < seconds) {
      fn();
      ++calls;
    }
    end.record();
    end.synchronize();
    reader.join();
    const double ms = start.elapsed_time(end) / calls;
    if (cublas_ms == 0) cublas_ms = ms;
    std::printf("  %-17s %7.2f ms x%.3f over %d calls; mid-run: %s\n", name, ms, ms / cublas_ms,
                calls, reading.c_str());
  }
  std::fflush(stdout);
}

// The host's time in each part of a forward (median of `reps`; the device is synchronised
// between calls, outside the timing): what the host spends before the device has work.
void HostProfile(int64_t d, int64_t v, int64_t n, int reps) {
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  const BenchInputs in = MakeBenchInputs(d, v, n);
  const LMHead* head = in.head.get();
  const at::Tensor &w = in.w, &x = in.x, &labels = in.labels, &host_labels = in.host_labels;
  const at::Tensor small = at::zeros({n}, opts.dtype(at::kFloat));
  ForwardOptions options;
  options.labels = host_labels.view({1, n});
  options.loss_reduction = LossReduction::kSum;
  options.z_loss_multiplier = 1e-4;
  const int64_t tile_bytes = DefaultLogitTileBytes(at::kCUDA);
  const auto host_ms = [&](const std::function<void()>& fn) {
    std::vector<double> ms;
    for (int i = 0; i < reps + 2; ++i) {
      c10::cuda::device_synchronize();
      const auto start = std::chrono::steady_clock::now();
      fn();
      ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count());
    }
    c10::cuda::device_synchronize();
    std::sort(ms.begin() + 2, ms.end());  // the first two are warm-up
    return ms[2 + reps / 2];
  };
  std::printf(
      "host d=%lld V=%lld N=%lld: small add %.3f ms, one GEMM %.3f ms, validate %.3f ms, copy "
      "labels %.3f ms, tile loop %.3f ms, fused loss %.3f ms, forward %.3f ms\n",
      static_cast<long long>(d), static_cast<long long>(v), static_cast<long long>(n),
      host_ms([&] { small.add_(1.0); }), host_ms([&] { at::mm(x, w.t()); }), host_ms([&] {
        if (!head->ValidateForward(x.view({1, n, d}), options).ok()) std::abort();
      }),
      host_ms([&] { CopyToDevice(host_labels, x.device()); }),
      host_ms([&] { ComputeLogitStats(x, w, at::Tensor(), labels, tile_bytes); }), host_ms([&] {
        FusedLinearLoss(x, w, at::Tensor(), labels, -100, LossReduction::kSum, 1e-4, tile_bytes, {},
                        false);
      }),
      host_ms([&] {
        if (!head->Forward(x.view({1, n, d}), options).ok()) std::abort();
      }));
}

}  // namespace
}  // namespace lmhead

namespace lmhead {
namespace {

void Serving(int64_t d, int64_t v, int64_t n, int rounds) {
  BenchInputs in = MakeBenchInputs(d, v, n);
  ForwardOptions options;
  options.labels = in.host_labels.view({1, n});
  options.loss_reduction = LossReduction::kSum;
  const at::Tensor x = in.x.view({1, n, d});
  const auto run = [&] {
    auto result = in.head->Forward(x, options);
    if (!result.ok()) throw std::runtime_error(std::string(result.status().message()));
  };
  const std::vector<Timing> timing = MeasureInterleaved({run}, rounds);
  std::printf(
      "kernel-only: d=%lld V=%lld N=%lld bf16 fused_linear sum: %.2f ms median, %.0f "
      "tokens/s\n",
      static_cast<long long>(d), static_cast<long long>(v), static_cast<long long>(n),
      timing[0].median_ms, n / (timing[0].median_ms / 1000.0));
  AppendResult("serving", {d, v, n, "bf16", "kernel-only (LMHead::Forward, batch on the device)",
                           timing[0].median_ms, "", NAN, timing[0].peak_extra_mb,
                           n / (timing[0].median_ms / 1000.0)});
}

// Issue 14's scoring outputs at one shape, measured interleaved against the loss alone (the
// fused kernel, ComputeLogitStats): fused_linear with label log-probabilities, entropy and rank;
// with top-5 or top-64 as well; with the continuation sums; and `default` (logits, then
// ScoreLogits) with the same outputs. Each row prints its time, its ratio to the loss alone and its
// peak extra device memory.
void Scoring(int64_t d, int64_t v, int64_t n, int reps) {
  BenchInputs in = MakeBenchInputs(d, v, n);
  const at::Tensor x = in.x.view({1, n, d});
  const at::Tensor labels = in.host_labels.view({1, n});
  const at::Tensor segments = at::floor_divide(at::arange(n, at::kLong), 256).view({1, n});
  struct Variant {
    const char* name;
    LossImplementation implementation;
    bool per_token;
    int64_t top_k;
    bool segments;
  };
  const Variant variants[] = {
      {"fused_linear, loss only", LossImplementation::kFusedLinear, false, 0, false},
      {"fused_linear + logprobs, entropy, rank", LossImplementation::kFusedLinear, true, 0, false},
      {"fused_linear + those and top-5", LossImplementation::kFusedLinear, true, 5, false},
      {"fused_linear + those and top-64", LossImplementation::kFusedLinear, true, 64, false},
      {"fused_linear + continuation sums", LossImplementation::kFusedLinear, false, 0, true},
      {"default + logprobs, entropy, rank, top-5", LossImplementation::kDefault, true, 5, false},
  };
  std::vector<std::function<void()>> runs;
  for (const Variant& variant : variants) {
    runs.push_back([&, variant] {
      ForwardOptions options;
      options.labels = labels;
      options.loss_reduction = LossReduction::kSum;
      options.loss_implementation = variant.implementation;
      options.return_logits = false;
      options.scoring.label_logprobs = variant.per_token;
      options.scoring.entropy = variant.per_token;
      options.scoring.label_rank = variant.per_token;
      options.scoring.top_k = variant.top_k;
      if (variant.segments) options.scoring.segment_ids = segments;
      auto result = in.head->Forward(x, options);
      if (!result.ok()) throw std::runtime_error(std::string(result.status().message()));
    });
  }
  const std::vector<Timing> timing = MeasureInterleaved(runs, reps);
  for (size_t i = 0; i < runs.size(); ++i) {
    if (timing[i].oom) {
      std::printf("scoring: d=%lld V=%lld N=%lld bf16 %s: failed (OOM)\n",
                  static_cast<long long>(d), static_cast<long long>(v), static_cast<long long>(n),
                  variants[i].name);
      AppendResult("scoring", {d, v, n, "bf16", std::string(variants[i].name) + " (out of memory)",
                               NAN, variants[0].name});
      continue;
    }
    AppendResult("scoring", {d, v, n, "bf16", variants[i].name, timing[i].median_ms,
                             variants[0].name, timing[i].median_ms / timing[0].median_ms,
                             timing[i].peak_extra_mb, n / (timing[i].median_ms * 1e-3)});
    std::printf(
        "scoring: d=%lld V=%lld N=%lld bf16 %-42s %8.2f ms  x%.2f of loss only  peak extra %.0f "
        "MB\n",
        static_cast<long long>(d), static_cast<long long>(v), static_cast<long long>(n),
        variants[i].name, timing[i].median_ms, timing[i].median_ms / timing[0].median_ms,
        timing[i].peak_extra_mb);
  }
}

}  // namespace
}  // namespace lmhead

int main(int argc, char** argv) {
  using namespace lmhead;
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const bool breakdown = argc > 1 && std::string(argv[1]) == "--breakdown";
  const bool old_tile_sweep = argc > 1 && std::string(argv[1]) == "--chunk_sweep";
  if (old_tile_sweep) std::fprintf(stderr, "--chunk_sweep is deprecated, use --tile_sweep\n");
  const bool tile_sweep = old_tile_sweep || (argc > 1 && std::string(argv[1]) == "--tile_sweep");
  const bool paths = argc > 1 && std::string(argv[1]) == "--paths";
  const bool sustained = argc > 1 && std::string(argv[1]) == "--sustained";
  if (c10::cuda::device_count() == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("card: %s\n\n", prop.name);
  if (argc > 1 && std::string(argv[1]) == "--scoring") {
    Scoring(4096, 128256, 8192, 7);
    Scoring(2048, 128256, 8192, 7);  // rows of 4 KiB: the loss and the scores in the fused GEMM
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "--serving") {
    Serving(4096, 128256, 8192, 15);
    Serving(4096, 128256, 256, 15);
    return 0;
  }
  if (sustained) {
    Sustained(2048, 128256, 8192, 3);
    Sustained(4096, 256000, 8192, 3);
    return 0;
  }
  if (paths && argc > 2 && std::string(argv[2]) == "--quick") {
    for (int64_t d : {2048, 4096}) Paths(d, 128256, 8192, 9);
    Paths(4096, 256000, 8192, 9);
    return 0;
  }
  if (paths) {
    for (int64_t d : {2048, 4096}) {
      for (int64_t v : {100352, 128256, 256000}) {
        for (int64_t n : {8192, 32768}) Paths(d, v, n, 9);
      }
    }
    return 0;
  }
  if (tile_sweep) {
    for (int64_t d : {2048, 4096}) {
      for (int64_t n : {8192, 32768}) TileSweep(d, 128256, n, 9);
    }
    TileSweep(4096, 256000, 8192, 9);
    return 0;
  }
  if (breakdown) {
    HostProfile(2048, 128256, 8192, 15);
    HostProfile(4096, 128256, 8192, 15);
    for (int64_t d : {2048, 4096}) {
      for (int64_t v : {100352, 128256}) {
        Breakdown(d, v, 8192, LogitTiling(8192, v, 2, DefaultLogitTileBytes(at::kCUDA)), 15);
      }
    }
    return 0;
  }
  std::printf(
      "| d | V | N | impl | ms (median) | min–max ms | TFLOP/s | peak extra MB | ratio to cublas "
      "|\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  const std::vector<int64_t> ds = {2048, 4096};
  const std::vector<int64_t> vs =
      quick ? std::vector<int64_t>{128256} : std::vector<int64_t>{100352, 128256, 256000};
  const std::vector<int64_t> ns =
      quick ? std::vector<int64_t>{8192} : std::vector<int64_t>{8192, 32768};
  const int reps = quick ? 5 : 15;
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  for (int64_t d : ds) {
    for (int64_t v : vs) {
      const std::unique_ptr<LMHead> head = BenchHead(d, v);
      const at::Tensor w = head->NamedParameters()[0].second;
      for (int64_t n : ns) {
        const double flops = 2.0 * n * d * v;
        const at::Tensor x = at::randn({1, n, d}, opts);
        const at::Tensor labels =
            at::randint(v, {1, n}, at::TensorOptions().device(at::kCUDA).dtype(at::kLong));
        const at::Tensor x2 = x.view({n, d});
        // cuBLAS and ours alternate run by run (MeasureInterleaved); eager, whose logits alone
        // may not fit beside cuBLAS's output buffer, is measured on its own afterwards.
        // Ours gets its labels on the host, pinned, as the server passes them (`--breakdown`
        // also times them on the device).
        const at::Tensor host_labels = labels.cpu().pin_memory();
        std::vector<Timing> timed;
        {
          at::Tensor out = at::empty({n, v}, opts);
          timed = MeasureInterleaved(
              {[&] { at::mm_out(out, x2, w.t()); }, [&] { ForwardOrThrow(*head, x, host_labels); }},
              reps);
        }
        const Timing& cublas = timed[0];
        const Timing& ours = timed[1];
        Row("cublas", d, v, n, cublas, flops, cublas.median_ms);
        const Timing eager = Measure(
            [&] {
              const at::Tensor logits = at::mm(x2, w.t()).to(at::kFloat);
              const at::Tensor lse = at::logsumexp(logits, {1});
              const at::Tensor picked = logits.gather(1, labels.view({n, 1})).squeeze(1);
              (lse - picked).sum();
            },
            reps);
        Row("eager", d, v, n, eager, flops, cublas.median_ms);
        Row("ours", d, v, n, ours, flops, cublas.median_ms);
      }
    }
  }
  return 0;
}

// CPU benchmark of the two loss implementations (issue 2, item 5): forward with labels at
// N=4096 tokens, d_model=1024, vocab 50304, fp32 and bf16. For each it reports the time per
// forward and the peak extra host memory (bytes LibTorch allocated above what was live before
// the call), then prints fused_linear against default measured in the same run.
//
//   bazel run //bench:cpu_lm_head_bench -- [--benchmark_filter=...] [--tokens=N]
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>

#include "bench/tracking_allocator.h"
#include "core/lm_head.h"

namespace lmhead {
namespace {

constexpr int64_t kDModel = 1024;
constexpr int64_t kVocab = 50304;
int64_t g_tokens = 4096;

struct Result {
  double seconds = 0;
  double peak_extra_bytes = 0;
};
std::map<std::string, Result>& Results() {
  static auto* results = new std::map<std::string, Result>();
  return *results;
}

void BM_Forward(benchmark::State& state, LossImplementation impl, DType dtype) {
  TrackingCpuAllocator& allocator = TrackingCpuAllocator::Install();
  LMHeadConfig config;
  config.bias = false;
  config.dtype = dtype;
  auto head = LMHead::Build(config, kDModel, kVocab, "cpu", /*seed=*/0);
  if (!head.ok()) {
    state.SkipWithError(std::string(head.status().message()).c_str());
    return;
  }
  at::Generator gen = at::detail::createCPUGenerator(1);
  const at::Tensor x = at::randn({1, g_tokens, kDModel}, gen)
                           .to(dtype == DType::kBFloat16 ? at::kBFloat16 : at::kFloat);
  at::Tensor labels = at::randint(kVocab, {1, g_tokens}, gen, at::TensorOptions(at::kLong));
  labels.slice(1, 0, g_tokens / 8).fill_(-100);  // some ignored tokens, as in real batches
  ForwardOptions options;
  options.labels = labels;
  options.loss_reduction = LossReduction::kSum;
  options.z_loss_multiplier = 1e-4;
  options.loss_implementation = impl;
  options.return_logits = false;

  double total_seconds = 0;
  int64_t peak_extra = 0;
  for (auto _ : state) {
    allocator.ResetPeak();
    const int64_t before = allocator.live_bytes();
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<LMOutput> out = (*head)->Forward(x, options);
    benchmark::DoNotOptimize(out);
    total_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    peak_extra = std::max(peak_extra, allocator.peak_bytes() - before);
    if (!out.ok()) {
      state.SkipWithError(std::string(out.status().message()).c_str());
      return;
    }
  }
  state.counters["peak_extra_MiB"] = peak_extra / double(1 << 20);
  state.counters["GFLOP/s"] = benchmark::Counter(
      2.0 * g_tokens * kDModel * kVocab * 1e-9 * state.iterations(), benchmark::Counter::kIsRate);
  Results()[std::string(Name(impl)) + "/" + std::string(Name(dtype))] = {
      total_seconds / state.iterations(), static_cast<double>(peak_extra)};
}

void PrintComparison() {
  std::printf("\nfused_linear vs default, N=%lld d=%lld V=%lld, same run:\n",
              static_cast<long long>(g_tokens), static_cast<long long>(kDModel),
              static_cast<long long>(kVocab));
  std::printf("%-9s %12s %12s %10s %14s %14s %12s\n", "dtype", "default_ms", "fused_ms",
              "time_ratio", "default_MiB", "fused_MiB", "mem_ratio");
  for (const char* dtype : {"float32", "bfloat16"}) {
    auto d = Results().find(std::string("default/") + dtype);
    auto f = Results().find(std::string("fused_linear/") + dtype);
    if (d == Results().end() || f == Results().end()) continue;
    std::printf("%-9s %12.1f %12.1f %10.3f %14.1f %14.1f %12.4f\n", dtype, d->second.seconds * 1e3,
                f->second.seconds * 1e3, f->second.seconds / d->second.seconds,
                d->second.peak_extra_bytes / (1 << 20), f->second.peak_extra_bytes / (1 << 20),
                f->second.peak_extra_bytes / d->second.peak_extra_bytes);
  }
}

}  // namespace
}  // namespace lmhead

int main(int argc, char** argv) {
  using lmhead::DType;
  using lmhead::LossImplementation;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]).rfind("--tokens=", 0) == 0) lmhead::g_tokens = std::stoll(argv[i] + 9);
  }
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (LossImplementation impl :
         {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
      const std::string name = std::string("Forward/") + std::string(lmhead::Name(impl)) + "/" +
                               std::string(lmhead::Name(dtype));
      benchmark::RegisterBenchmark(name.c_str(), lmhead::BM_Forward, impl, dtype)
          ->Unit(benchmark::kMillisecond)
          ->Iterations(3)
          ->UseRealTime();
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  lmhead::PrintComparison();
  return 0;
}

// GPU benchmark (issue 4): for bf16 LM-head shapes, the time and peak extra device memory of
//   cublas  x @ W^T alone (at::mm into a preallocated output), the floor for any forward;
//   eager   PyTorch eager: bf16 matmul -> fp32 -> logsumexp and label gather;
//   ours    LMHead fused_linear forward (reduction sum, z-loss on);
// all measured in this process, with ours/cublas printed as `fused/cublas=<ratio>`.
// bench/gpu_baselines.py measures Liger-Kernel and Cut Cross-Entropy the same way.
//
//   gpu_lm_head_bench [--quick]
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "core/lm_head.h"
#include "core/losses.h"
#include "core/ops/logit_stats.h"

namespace lmhead {
namespace {

struct Timing {
  double median_ms = 0;
  double peak_extra_mb = 0;
  bool oom = false;
};

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

// Median over `reps` timed runs (CUDA events on the current stream) after 2 warm-up runs.
Timing Measure(const std::function<void()>& fn, int reps) {
  Timing t;
  try {
    c10::cuda::device_synchronize();
    const int64_t before = AllocatedBytes();
    c10::cuda::CUDACachingAllocator::resetPeakStats(0);
    fn();
    fn();
    c10::cuda::device_synchronize();
    t.peak_extra_mb = (PeakBytes() - before) / 1e6;
    std::vector<double> ms;
    for (int i = 0; i < reps; ++i) {
      at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
      start.record();
      fn();
      stop.record();
      stop.synchronize();
      ms.push_back(start.elapsed_time(stop));
    }
    std::sort(ms.begin(), ms.end());
    t.median_ms = ms[ms.size() / 2];
  } catch (const std::exception& e) {  // out of memory, reported by LibTorch or by our Status
    std::fprintf(stderr, "failed: %.200s\n", e.what());
    t.oom = true;
  }
  c10::cuda::CUDACachingAllocator::emptyCache();
  return t;
}

void Row(const char* impl, int64_t d, int64_t v, int64_t n, const Timing& t, double flops,
         double cublas_ms) {
  if (t.oom) {
    std::printf("| %d | %lld | %lld | %s | failed (OOM) | | | |\n", static_cast<int>(d),
                static_cast<long long>(v), static_cast<long long>(n), impl);
    return;
  }
  std::printf("| %d | %lld | %lld | %s | %.2f | %.0f | %.0f | %s%.3f |\n", static_cast<int>(d),
              static_cast<long long>(v), static_cast<long long>(n), impl, t.median_ms,
              flops / (t.median_ms * 1e-3) / 1e12, t.peak_extra_mb,
              std::string(impl) == "ours" ? "fused/cublas=" : "x", t.median_ms / cublas_ms);
  std::fflush(stdout);
}

// Where ours spends its time at one shape: the chunked GEMMs alone, the epilogue alone over
// the same chunks, and the whole forward.
void Breakdown(int64_t d, int64_t v, int64_t n, int reps) {
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  const at::Tensor x = at::randn({n, d}, opts);
  const at::Tensor w = at::randn({v, d}, opts) * 0.02;
  const at::Tensor labels =
      at::randint(v, {n}, at::TensorOptions().device(at::kCUDA).dtype(at::kLong));
  const FusedChunkShape chunk = FusedChunking(n, v, 2, DefaultFusedChunkBytes(x.device()));
  at::Tensor buffer = at::empty({chunk.token_rows, chunk.vocab_columns}, opts);
  at::Tensor lse = at::full({n}, -INFINITY, opts.dtype(at::kFloat));
  at::Tensor picked = at::zeros({n}, opts.dtype(at::kFloat));
  const auto for_each_chunk =
      [&](const std::function<void(int64_t, int64_t, int64_t, int64_t)>& fn) {
        for (int64_t t0 = 0; t0 < n; t0 += chunk.token_rows) {
          const int64_t rows = std::min(chunk.token_rows, n - t0);
          for (int64_t v0 = 0; v0 < v; v0 += chunk.vocab_columns) {
            fn(t0, rows, v0, std::min(chunk.vocab_columns, v - v0));
          }
        }
      };
  const Timing full_gemm = Measure([&] { at::mm(x, w.t()); }, reps);
  const Timing gemms = Measure(
      [&] {
        for_each_chunk([&](int64_t t0, int64_t rows, int64_t v0, int64_t cols) {
          at::Tensor out = buffer.narrow(0, 0, rows).narrow(1, 0, cols);
          at::mm_out(out, x.narrow(0, t0, rows), w.narrow(0, v0, cols).t());
        });
      },
      reps);
  const Timing epilogue = Measure(
      [&] {
        for_each_chunk([&](int64_t t0, int64_t rows, int64_t v0, int64_t cols) {
          at::Tensor lse_rows = lse.narrow(0, t0, rows);
          at::Tensor picked_rows = picked.narrow(0, t0, rows);
          AccumulateLogitStats(buffer.narrow(0, 0, rows).narrow(1, 0, cols), v0,
                               labels.narrow(0, t0, rows), lse_rows, picked_rows);
        });
      },
      reps);
  std::printf(
      "breakdown d=%lld V=%lld N=%lld chunk=%lldx%lld: full GEMM %.2f ms, chunked GEMMs %.2f ms, "
      "epilogue %.2f ms (%.0f GB/s)\n",
      static_cast<long long>(d), static_cast<long long>(v), static_cast<long long>(n),
      static_cast<long long>(chunk.token_rows), static_cast<long long>(chunk.vocab_columns),
      full_gemm.median_ms, gemms.median_ms, epilogue.median_ms,
      2.0 * n * v / (epilogue.median_ms * 1e-3) / 1e9);
}

}  // namespace
}  // namespace lmhead

int main(int argc, char** argv) {
  using namespace lmhead;
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const bool breakdown = argc > 1 && std::string(argv[1]) == "--breakdown";
  if (c10::cuda::device_count() == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("card: %s\n\n", prop.name);
  if (breakdown) {
    for (int64_t d : {2048, 4096}) Breakdown(d, 128256, 8192, 10);
    return 0;
  }
  std::printf("| d | V | N | impl | ms | TFLOP/s | peak extra MB | ratio to cublas |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  const std::vector<int64_t> ds = {2048, 4096};
  const std::vector<int64_t> vs =
      quick ? std::vector<int64_t>{128256} : std::vector<int64_t>{100352, 128256, 256000};
  const std::vector<int64_t> ns =
      quick ? std::vector<int64_t>{8192} : std::vector<int64_t>{8192, 32768};
  const int reps = quick ? 5 : 10;
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  for (int64_t d : ds) {
    for (int64_t v : vs) {
      LMHeadConfig config;
      config.dtype = DType::kBFloat16;
      config.bias = false;
      config.loss_implementation = LossImplementation::kFusedLinear;
      auto head = LMHead::Build(config, d, v, "cuda:0", 0);
      if (!head.ok()) {
        std::fprintf(stderr, "%s\n", std::string(head.status().message()).c_str());
        return 1;
      }
      const at::Tensor w = (*head)->NamedParameters()[0].second;
      for (int64_t n : ns) {
        const double flops = 2.0 * n * d * v;
        const at::Tensor x = at::randn({1, n, d}, opts);
        const at::Tensor labels =
            at::randint(v, {1, n}, at::TensorOptions().device(at::kCUDA).dtype(at::kLong));
        const at::Tensor x2 = x.view({n, d});
        Timing cublas;
        {
          at::Tensor out = at::empty({n, v}, opts);
          cublas = Measure([&] { at::mm_out(out, x2, w.t()); }, reps);
        }
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
        ForwardOptions options;
        options.labels = labels;
        options.loss_reduction = LossReduction::kSum;
        options.z_loss_multiplier = 1e-4;
        const Timing ours = Measure(
            [&] {
              auto out = (*head)->Forward(x, options);
              if (!out.ok()) throw std::runtime_error(std::string(out.status().message()));
            },
            reps);
        Row("ours", d, v, n, ours, flops, cublas.median_ms);
      }
    }
  }
  return 0;
}

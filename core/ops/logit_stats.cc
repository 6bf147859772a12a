#include "core/ops/logit_stats.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <limits>

#include "core/ops/cpu/logit_stats_cpu.h"

#ifdef LMHEAD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "core/ops/cuda/fused_logit_stats_cuda.h"
#include "core/ops/cuda/logit_stats_cuda.h"
#endif

namespace lmhead {
namespace {

#ifdef LMHEAD_WITH_CUDA
cuda::LogitType CudaLogitType(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return cuda::LogitType::kFloat32;
    case at::kBFloat16:
      return cuda::LogitType::kBFloat16;
    case at::kHalf:
      return cuda::LogitType::kFloat16;
    default:
      TORCH_CHECK(false, "unsupported logit dtype ", dtype);
  }
}

void AccumulateWithCuda(const at::Tensor& logits, int64_t col0, const at::Tensor& safe_labels,
                        at::Tensor& lse, at::Tensor& label_logit, RunningArgmax* argmax) {
  TORCH_CHECK(logits.stride(1) == 1, "logit tile must have unit column stride");
  TORCH_CHECK(lse.is_contiguous() && label_logit.is_contiguous() && safe_labels.is_contiguous(),
              "per-token statistics must be contiguous");
  TORCH_CHECK(argmax == nullptr || (argmax->value.is_contiguous() && argmax->index.is_contiguous()),
              "the running argmax must be contiguous");
  const cuda::LogitType type = CudaLogitType(logits.scalar_type());
  C10_CUDA_CHECK(cuda::AccumulateLogitStats(
      logits.data_ptr(), type, logits.size(0), logits.size(1), logits.stride(0), col0,
      safe_labels.data_ptr<int64_t>(), lse.data_ptr<float>(), label_logit.data_ptr<float>(),
      argmax != nullptr ? argmax->value.data_ptr<float>() : nullptr,
      argmax != nullptr ? argmax->index.data_ptr<int64_t>() : nullptr,
      c10::cuda::getCurrentCUDAStream(logits.device().index()).stream()));
}

#endif

}  // namespace

bool ScoringKernelApplies(const at::Tensor& h) {
#ifdef LMHEAD_WITH_CUDA
  return h.is_cuda();
#else
  (void)h;
  return false;
#endif
}

bool AccumulateScoringStats(const at::Tensor& logits, int64_t col0, const at::Tensor& safe_labels,
                            const at::Tensor& threshold, at::Tensor& max, at::Tensor& sum,
                            at::Tensor& weighted, at::Tensor& label_logit, at::Tensor& above,
                            RunningArgmax* argmax) {
#ifdef LMHEAD_WITH_CUDA
  if (!ScoringKernelApplies(logits)) return false;
  const c10::DeviceGuard on_logits_device(logits.device());  // the kernel launches there
  TORCH_CHECK(logits.stride(1) == 1, "logit tile must have unit column stride");
  for (const at::Tensor* state : std::initializer_list<const at::Tensor*>{
           &safe_labels, &max, &sum, &weighted, &label_logit}) {
    TORCH_CHECK(state->is_contiguous(), "per-token scoring state must be contiguous");
  }
  TORCH_CHECK(threshold.defined() == above.defined(), "threshold and above go together");
  TORCH_CHECK(!above.defined() || (above.is_contiguous() && threshold.is_contiguous()),
              "per-token scoring state must be contiguous");
  TORCH_CHECK(argmax == nullptr || (argmax->value.is_contiguous() && argmax->index.is_contiguous()),
              "the running argmax must be contiguous");
  C10_CUDA_CHECK(cuda::AccumulateScoringStats(
      logits.data_ptr(), CudaLogitType(logits.scalar_type()), logits.size(0), logits.size(1),
      logits.stride(0), col0, safe_labels.data_ptr<int64_t>(),
      threshold.defined() ? threshold.data_ptr<float>() : nullptr, max.data_ptr<float>(),
      sum.data_ptr<float>(), weighted.data_ptr<float>(), label_logit.data_ptr<float>(),
      above.defined() ? above.data_ptr<int64_t>() : nullptr,
      argmax != nullptr ? argmax->value.data_ptr<float>() : nullptr,
      argmax != nullptr ? argmax->index.data_ptr<int64_t>() : nullptr,
      c10::cuda::getCurrentCUDAStream(logits.device().index()).stream()));
  return true;
#else
  (void)logits, (void)col0, (void)safe_labels, (void)threshold, (void)max, (void)sum;
  (void)weighted, (void)label_logit, (void)above, (void)argmax;
  return false;
#endif
}

bool AccumulateTopK(const at::Tensor& logits, int64_t col0, at::Tensor& values, at::Tensor& ids) {
#ifdef LMHEAD_WITH_CUDA
  if (!ScoringKernelApplies(logits)) return false;
  const c10::DeviceGuard on_logits_device(logits.device());  // the kernel launches there
  TORCH_CHECK(logits.stride(1) == 1, "logit tile must have unit column stride");
  TORCH_CHECK(values.is_contiguous() && ids.is_contiguous() && values.dim() == 2 &&
                  ids.sizes() == values.sizes() && values.size(0) == logits.size(0),
              "the running top-k must be contiguous (rows, k)");
  C10_CUDA_CHECK(cuda::AccumulateTopK(
      logits.data_ptr(), CudaLogitType(logits.scalar_type()), logits.size(0), logits.size(1),
      logits.stride(0), col0, static_cast<int>(values.size(1)), values.data_ptr<float>(),
      ids.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream(logits.device().index()).stream()));
  return true;
#else
  (void)logits, (void)col0, (void)values, (void)ids;
  return false;
#endif
}

LogitTileShape LogitTiling(int64_t num_tokens, int64_t vocab_size, int64_t bytes_per_logit,
                           int64_t tile_bytes) {
  const int64_t budget = std::max<int64_t>(tile_bytes / bytes_per_logit, 1);  // logits
  LogitTileShape shape;
  // Many tokens per GEMM keep the weight from being re-read; wide vocabulary slices keep each
  // GEMM large. Tokens first, down to what still leaves room for kMinVocabColumns.
  constexpr int64_t kMaxTokenRows = 8192;
  constexpr int64_t kMinVocabColumns = 1024;
  shape.token_rows = std::clamp<int64_t>(budget / std::min(vocab_size, kMinVocabColumns), 1,
                                         std::max<int64_t>(std::min(num_tokens, kMaxTokenRows), 1));
  shape.vocab_columns = std::clamp<int64_t>(budget / shape.token_rows, 1, vocab_size);
  // A slice narrower than the vocabulary is a whole number of kColumnAlignment columns: the
  // tile's rows (its GEMM's leading dimension) then start 16-byte aligned and GEMM tiles stay
  // whole. An odd width (budget / token_rows for most token counts) made cuBLAS fall back to
  // kernels 3.5x slower on an H200 (docs/notes/fused_gemm_dispatch.md).
  constexpr int64_t kColumnAlignment = 128;
  if (shape.vocab_columns < vocab_size && shape.vocab_columns >= kColumnAlignment) {
    shape.vocab_columns -= shape.vocab_columns % kColumnAlignment;
  }
  return shape;
}

void ForEachLogitTile(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                      int64_t working_bytes_per_logit, int64_t tile_bytes,
                      const std::function<void()>& between_tiles,
                      const std::function<void(int64_t t0, int64_t rows)>& begin_rows,
                      const std::function<void(const at::Tensor& logits, int64_t v0)>& fold) {
  const int64_t num_tokens = h.size(0);
  const int64_t vocab_size = weight.size(0);
  const LogitTileShape tile =
      LogitTiling(num_tokens, vocab_size, h.element_size() + working_bytes_per_logit, tile_bytes);
  // One buffer for every tile's logits; each tile is a contiguous view of its front.
  const at::Tensor buffer =
      at::empty({std::min(tile.token_rows, num_tokens) * tile.vocab_columns}, h.options());
  for (int64_t t0 = 0; t0 < num_tokens; t0 += tile.token_rows) {
    const int64_t rows = std::min(tile.token_rows, num_tokens - t0);
    const at::Tensor h_rows = h.narrow(0, t0, rows);
    if (begin_rows) begin_rows(t0, rows);
    for (int64_t v0 = 0; v0 < vocab_size; v0 += tile.vocab_columns) {
      const int64_t cols = std::min(tile.vocab_columns, vocab_size - v0);
      if (between_tiles) between_tiles();
      const at::Tensor w_cols = weight.narrow(0, v0, cols).t();
      at::Tensor logits = buffer.narrow(0, 0, rows * cols).view({rows, cols});
      if (bias.defined()) {
        at::addmm_out(logits, bias.narrow(0, v0, cols), h_rows, w_cols);
      } else {
        at::mm_out(logits, h_rows, w_cols);
      }
      fold(logits, v0);
    }
  }
}

LogitStats ComputeLogitStatsTiled(const at::Tensor& h, const at::Tensor& weight,
                                  const at::Tensor& bias, const at::Tensor& safe_labels,
                                  int64_t tile_bytes, const std::function<void()>& between_tiles,
                                  bool with_argmax) {
  const c10::DeviceGuard on_h_device(h.device());  // our kernels launch on the current device
  const int64_t num_tokens = h.size(0);
  const auto fp32 = h.options().dtype(at::kFloat);
  constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();
  LogitStats stats{at::full({num_tokens}, kMinusInfinity, fp32), at::zeros({num_tokens}, fp32)};
  RunningArgmax best;
  if (with_argmax) {
    best.value = at::full({num_tokens}, kMinusInfinity, fp32);
    best.index =
        at::full({num_tokens}, std::numeric_limits<int64_t>::max(), h.options().dtype(at::kLong));
  }
  // The CUDA kernel reads the tile as it is; the ATen path also holds two fp32 copies.
  int64_t working_bytes = cpu::kLogitStatsWorkingBytes;
#ifdef LMHEAD_WITH_CUDA
  if (h.is_cuda()) working_bytes = 0;
#endif
  // The statistics of the current token slice: views of the whole pass's.
  at::Tensor labels_rows;
  at::Tensor lse_rows;
  at::Tensor label_logit_rows;
  RunningArgmax best_rows;
  ForEachLogitTile(
      h, weight, bias, working_bytes, tile_bytes, between_tiles,
      [&](int64_t t0, int64_t rows) {
        labels_rows = safe_labels.narrow(0, t0, rows);
        lse_rows = stats.lse.narrow(0, t0, rows);
        label_logit_rows = stats.label_logit.narrow(0, t0, rows);
        if (with_argmax) {
          best_rows = {best.value.narrow(0, t0, rows), best.index.narrow(0, t0, rows)};
        }
      },
      [&](const at::Tensor& logits, int64_t v0) {
        AccumulateLogitStats(logits, v0, labels_rows, lse_rows, label_logit_rows,
                             with_argmax ? &best_rows : nullptr);
      });
  stats.argmax = best.index;
  return stats;
}

bool FusedGemmApplies(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
#ifdef LMHEAD_WITH_CUDA
  if (!h.is_cuda() || bias.defined() || h.scalar_type() != weight.scalar_type() ||
      h.stride(1) != 1 || weight.stride(1) != 1) {
    return false;
  }
  const at::ScalarType dtype = h.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  const auto* properties = at::cuda::getDeviceProperties(h.device().index());
  return cuda::FusedLogitStatsSupported(CudaLogitType(dtype), properties->major, properties->minor,
                                        h.size(1), h.data_ptr(), h.stride(0), weight.data_ptr(),
                                        weight.stride(0));
#else
  (void)h, (void)weight, (void)bias;
  return false;
#endif
}

int64_t FusedGemmMinTileBytes(int64_t vocab_size, bool with_argmax, bool with_scoring) {
#ifdef LMHEAD_WITH_CUDA
  return 128 * cuda::FusedLogitStatsScratchBytesPerRow(vocab_size, with_argmax, with_scoring);
#else
  (void)vocab_size, (void)with_argmax, (void)with_scoring;
  return 0;
#endif
}

bool FusedGemmPreferred(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                        int64_t tile_bytes, bool with_argmax, bool with_scoring) {
  // At d=4096, run back to back at the cards' power cap, the fused GEMM is slower than the
  // tiled path on both the H100 and the H200 (docs/notes/fused_gemm_dispatch.md).
  constexpr int64_t kFusedGemmMaxRowBytes = 4096;
  return FusedGemmApplies(h, weight, bias) &&
         h.size(1) * h.element_size() <= kFusedGemmMaxRowBytes &&
         tile_bytes >= FusedGemmMinTileBytes(weight.size(0), with_argmax, with_scoring);
}

LogitStats ComputeLogitStatsFusedGemm(const at::Tensor& h, const at::Tensor& weight,
                                      const at::Tensor& safe_labels, int64_t tile_bytes,
                                      const std::function<void()>& between_tiles, bool with_argmax,
                                      FusedGemmScoring* scoring) {
#ifdef LMHEAD_WITH_CUDA
  const bool with_scoring = scoring != nullptr;
  TORCH_CHECK(FusedGemmApplies(h, weight, at::Tensor()),
              "the fused GEMM does not apply to these operands (see FusedGemmApplies)");
  TORCH_CHECK(tile_bytes >= FusedGemmMinTileBytes(weight.size(0), with_argmax, with_scoring),
              "tile_bytes is below one 128-token slice of the fused GEMM's partials");
  const c10::DeviceGuard on_h_device(h.device());  // our kernels launch on the current device
  const int64_t num_tokens = h.size(0);
  const int64_t vocab_size = weight.size(0);
  const auto fp32 = h.options().dtype(at::kFloat);
  LogitStats stats{at::empty({num_tokens}, fp32), at::empty({num_tokens}, fp32)};
  if (with_argmax) stats.argmax = at::empty({num_tokens}, h.options().dtype(at::kLong));
  at::Tensor threshold;
  if (with_scoring) {
    scoring->entropy = at::empty({num_tokens}, fp32);
    if (scoring->threshold.defined()) {
      threshold = scoring->threshold.to(h.device(), at::kFloat).contiguous();
      TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == num_tokens,
                  "the scoring threshold must be (N,)");
      scoring->above = at::empty({num_tokens}, h.options().dtype(at::kLong));
    }
  }
  const int64_t bytes_per_row =
      cuda::FusedLogitStatsScratchBytesPerRow(vocab_size, with_argmax, with_scoring);
  const auto* properties = at::cuda::getDeviceProperties(h.device().index());
  // Whole 128-row tiles per slice, as many as the scratch budget holds (at least one, checked
  // above).
  const int64_t slice_rows =
      std::min(num_tokens, std::max<int64_t>(tile_bytes / bytes_per_row / 128, 1) * 128);
  const at::Tensor scratch =
      at::empty({std::max<int64_t>(slice_rows, 1) * bytes_per_row}, h.options().dtype(at::kByte));
  const at::Tensor labels = safe_labels.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(h.device().index()).stream();
  for (int64_t t0 = 0; t0 < num_tokens; t0 += slice_rows) {
    const int64_t rows = std::min(slice_rows, num_tokens - t0);
    if (between_tiles) between_tiles();
    cuda::FusedScoringTerms terms;
    if (with_scoring) {
      terms.entropy = scoring->entropy.data_ptr<float>() + t0;
      if (threshold.defined()) {
        terms.threshold = threshold.data_ptr<float>() + t0;
        terms.above = scoring->above.data_ptr<int64_t>() + t0;
      }
    }
    C10_CUDA_CHECK(cuda::FusedLogitStats(
        h.narrow(0, t0, rows).data_ptr(), h.stride(0), weight.data_ptr(), weight.stride(0),
        CudaLogitType(h.scalar_type()), rows, vocab_size, h.size(1),
        labels.data_ptr<int64_t>() + t0, stats.lse.data_ptr<float>() + t0,
        stats.label_logit.data_ptr<float>() + t0,
        with_argmax ? stats.argmax.data_ptr<int64_t>() + t0 : nullptr, scratch.data_ptr(),
        properties->multiProcessorCount, stream, with_scoring ? &terms : nullptr));
  }
  return stats;
#else
  (void)h, (void)weight, (void)safe_labels, (void)tile_bytes, (void)between_tiles,
      (void)with_argmax, (void)scoring;
  TORCH_CHECK(false, "the fused GEMM needs a --config=cuda build");
#endif
}

LogitStats ComputeLogitStats(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& safe_labels, int64_t tile_bytes,
                             const std::function<void()>& between_tiles, bool with_argmax) {
  if (FusedGemmPreferred(h, weight, bias, tile_bytes, with_argmax)) {
    return ComputeLogitStatsFusedGemm(h, weight, safe_labels, tile_bytes, between_tiles,
                                      with_argmax);
  }
  return ComputeLogitStatsTiled(h, weight, bias, safe_labels, tile_bytes, between_tiles,
                                with_argmax);
}

void AccumulateLogitStats(const at::Tensor& logits, int64_t col0, const at::Tensor& safe_labels,
                          at::Tensor& lse, at::Tensor& label_logit, RunningArgmax* argmax) {
  const c10::DeviceGuard on_logits_device(logits.device());
#ifdef LMHEAD_WITH_CUDA
  if (logits.is_cuda()) {
    AccumulateWithCuda(logits, col0, safe_labels, lse, label_logit, argmax);
    return;
  }
#endif
  cpu::AccumulateLogitStats(logits, col0, safe_labels, lse, label_logit,
                            argmax != nullptr ? &argmax->value : nullptr,
                            argmax != nullptr ? &argmax->index : nullptr);
}

}  // namespace lmhead

#include "core/losses.h"

#include <ATen/ATen.h>
#include <ATen/core/Reduction.h>

#include <algorithm>
#include <limits>

#include "core/ops/logit_stats.h"

namespace lmhead {
namespace {

int64_t ToAtenReduction(LossReduction reduction) {
  switch (reduction) {
    case LossReduction::kMean: return at::Reduction::Mean;
    case LossReduction::kSum: return at::Reduction::Sum;
    case LossReduction::kNone: return at::Reduction::None;
  }
  return at::Reduction::Mean;
}

}  // namespace

double EffectiveZLossMultiplier(std::optional<double> z_loss_multiplier) {
  const double multiplier = z_loss_multiplier.value_or(0.0);
  return multiplier != 0.0 ? multiplier : 1e-4;
}

LossTerms DefaultLoss(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                      LossReduction reduction, std::optional<double> z_loss_multiplier) {
  const at::Tensor logits_fp32 = logits.to(at::kFloat);
  at::Tensor ce = at::cross_entropy_loss(logits_fp32, labels, /*weight=*/{},
                                         ToAtenReduction(reduction), ignore_index,
                                         /*label_smoothing=*/0.0);
  if (!z_loss_multiplier.has_value()) return {ce, ce, std::nullopt};

  at::Tensor z_squared = at::logsumexp(logits_fp32, {-1}).pow(2);
  const at::Tensor mask = labels.ne(ignore_index);
  if (reduction == LossReduction::kMean) {
    z_squared = (z_squared * mask).sum() / mask.sum();
  } else if (reduction == LossReduction::kSum) {
    z_squared = (z_squared * mask).sum();
  }
  at::Tensor z = z_squared * EffectiveZLossMultiplier(z_loss_multiplier);
  return {ce + z, ce, z};
}

int64_t DefaultFusedChunkBytes(const c10::Device& device) {
  return (device.is_cuda() ? int64_t{224} : int64_t{128}) << 20;
}

FusedChunkShape FusedChunking(int64_t num_tokens, int64_t vocab_size, int64_t bytes_per_logit,
                              int64_t chunk_bytes) {
  const int64_t budget = std::max<int64_t>(chunk_bytes / bytes_per_logit, 1);  // logits
  FusedChunkShape shape;
  // Many tokens per GEMM keep the weight from being re-read; wide vocabulary slices keep each
  // GEMM large. Tokens first, down to what still leaves room for kMinVocabColumns.
  constexpr int64_t kMaxTokenRows = 8192;
  constexpr int64_t kMinVocabColumns = 1024;
  shape.token_rows = std::clamp<int64_t>(budget / std::min(vocab_size, kMinVocabColumns), 1,
                                         std::max<int64_t>(std::min(num_tokens, kMaxTokenRows), 1));
  shape.vocab_columns = std::clamp<int64_t>(budget / shape.token_rows, 1, vocab_size);
  return shape;
}

LossTerms FusedLinearLoss(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& labels, int64_t ignore_index,
                          LossReduction reduction, std::optional<double> z_loss_multiplier,
                          int64_t chunk_bytes) {
  const int64_t num_tokens = h.size(0);
  const int64_t vocab_size = weight.size(0);
  const auto fp32 = h.options().dtype(at::kFloat);
  const at::Tensor valid = labels.ne(ignore_index);
  const at::Tensor safe_labels = at::where(valid, labels, at::zeros_like(labels));

  // Per-token log-sum-exp and label logit, one (tokens x vocabulary slice) chunk of logits at a
  // time; the log-sum-exp of the slices is merged as it goes.
  at::Tensor lse = at::full({num_tokens}, -std::numeric_limits<float>::infinity(), fp32);
  at::Tensor label_logit = at::zeros({num_tokens}, fp32);
  const FusedChunkShape chunk = FusedChunking(
      num_tokens, vocab_size, h.element_size() + LogitStatsWorkingBytes(h.device()), chunk_bytes);
  for (int64_t t0 = 0; t0 < num_tokens; t0 += chunk.token_rows) {
    const int64_t rows = std::min(chunk.token_rows, num_tokens - t0);
    const at::Tensor h_rows = h.narrow(0, t0, rows);
    const at::Tensor labels_rows = safe_labels.narrow(0, t0, rows);
    at::Tensor lse_rows = lse.narrow(0, t0, rows);
    at::Tensor label_logit_rows = label_logit.narrow(0, t0, rows);
    for (int64_t v0 = 0; v0 < vocab_size; v0 += chunk.vocab_columns) {
      const int64_t cols = std::min(chunk.vocab_columns, vocab_size - v0);
      const at::Tensor w_cols = weight.narrow(0, v0, cols).t();
      const at::Tensor logits = bias.defined()
                                    ? at::addmm(bias.narrow(0, v0, cols), h_rows, w_cols)
                                    : at::mm(h_rows, w_cols);
      AccumulateLogitStats(logits, v0, labels_rows, lse_rows, label_logit_rows);
    }
  }

  const double s = EffectiveZLossMultiplier(z_loss_multiplier);
  at::Tensor ce_rows = at::where(valid, lse - label_logit, at::zeros_like(lse));
  at::Tensor z_rows = at::where(valid, lse * lse * s, at::zeros_like(lse));
  if (reduction == LossReduction::kMean) {
    // Stays on the device: with no valid token every row is 0 and the divisor is irrelevant.
    const at::Tensor num_valid = valid.sum().to(at::kFloat).clamp_min(1.0);
    ce_rows = ce_rows / num_valid;
    z_rows = z_rows / num_valid;
  }
  const at::Tensor loss_rows = ce_rows + z_rows;
  const at::Tensor z_rows_input_dtype = z_rows.to(h.scalar_type());

  at::Tensor loss = reduction == LossReduction::kNone ? loss_rows : loss_rows.sum();
  if (!z_loss_multiplier.has_value()) return {loss, loss, std::nullopt};
  at::Tensor z = reduction == LossReduction::kNone ? z_rows_input_dtype : z_rows_input_dtype.sum();
  return {loss, loss - z, z};
}

}  // namespace lmhead

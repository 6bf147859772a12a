#include "core/losses.h"

#include <ATen/ATen.h>
#include <ATen/core/Reduction.h>

#include <algorithm>

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

int64_t FusedChunkRows(int64_t vocab_size, int64_t input_element_size, int64_t chunk_bytes) {
  const int64_t bytes_per_row = std::max<int64_t>(1, vocab_size) * (input_element_size + 8);
  return std::max<int64_t>(1, chunk_bytes / bytes_per_row);
}

LossTerms FusedLinearLoss(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& labels, int64_t ignore_index,
                          LossReduction reduction, std::optional<double> z_loss_multiplier,
                          int64_t chunk_bytes) {
  const int64_t num_tokens = h.size(0);
  const auto fp32 = h.options().dtype(at::kFloat);
  const at::Tensor valid = labels.ne(ignore_index);
  const at::Tensor safe_labels = at::where(valid, labels, at::zeros_like(labels));

  // Per-token log-sum-exp and label logit, one chunk of logits at a time.
  at::Tensor lse = at::empty({num_tokens}, fp32);
  at::Tensor label_logit = at::empty({num_tokens}, fp32);
  const int64_t rows = FusedChunkRows(weight.size(0), h.element_size(), chunk_bytes);
  const at::Tensor weight_t = weight.t();
  for (int64_t start = 0; start < num_tokens; start += rows) {
    const int64_t count = std::min(rows, num_tokens - start);
    const at::Tensor h_chunk = h.narrow(0, start, count);
    const at::Tensor logits =
        bias.defined() ? at::addmm(bias, h_chunk, weight_t) : at::mm(h_chunk, weight_t);
    const at::Tensor logits_fp32 = logits.to(at::kFloat);
    at::Tensor lse_chunk = lse.narrow(0, start, count);
    at::logsumexp_out(lse_chunk, logits_fp32, {1});
    label_logit.narrow(0, start, count)
        .copy_(logits_fp32.gather(1, safe_labels.narrow(0, start, count).unsqueeze(1))
                   .squeeze(1));
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

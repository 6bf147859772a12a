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
    case LossReduction::kMean:
      return at::Reduction::Mean;
    case LossReduction::kSum:
      return at::Reduction::Sum;
    case LossReduction::kNone:
      return at::Reduction::None;
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

at::Tensor FusedSafeLabels(const at::Tensor& labels, int64_t ignore_index) {
  return at::where(labels.ne(ignore_index), labels, at::zeros_like(labels));
}

LossTerms FusedLinearLoss(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& labels, int64_t ignore_index, LossReduction reduction,
                          std::optional<double> z_loss_multiplier, int64_t chunk_bytes,
                          const std::function<void()>& between_chunks, bool with_argmax) {
  // Per-token log-sum-exp and label logit, never more than chunk_bytes of logits at a time.
  const LogitStats stats = ComputeLogitStats(h, weight, bias, FusedSafeLabels(labels, ignore_index),
                                             chunk_bytes, between_chunks, with_argmax);
  return FinishFusedLinearLoss(stats, labels, ignore_index, reduction, z_loss_multiplier,
                               h.scalar_type(), with_argmax);
}

LossTerms FinishFusedLinearLoss(const LogitStats& stats, const at::Tensor& labels,
                                int64_t ignore_index, LossReduction reduction,
                                std::optional<double> z_loss_multiplier,
                                c10::ScalarType input_dtype, bool with_argmax) {
  const at::Tensor valid = labels.ne(ignore_index);
  const at::Tensor& lse = stats.lse;
  const at::Tensor& label_logit = stats.label_logit;

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
  const at::Tensor z_rows_input_dtype = z_rows.to(input_dtype);

  at::Tensor loss = reduction == LossReduction::kNone ? loss_rows : loss_rows.sum();
  std::optional<at::Tensor> argmax;
  if (with_argmax) argmax = stats.argmax;
  if (!z_loss_multiplier.has_value()) return {loss, loss, std::nullopt, argmax};
  at::Tensor z = reduction == LossReduction::kNone ? z_rows_input_dtype : z_rows_input_dtype.sum();
  return {loss, loss - z, z, argmax};
}

}  // namespace lmhead

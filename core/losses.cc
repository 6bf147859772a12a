#include "core/losses.h"

#include <ATen/ATen.h>
#include <ATen/core/Reduction.h>

#include <algorithm>
#include <limits>

#include "core/device_copy.h"
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

int64_t DefaultLogitTileBytes(const c10::Device& device) {
  return (device.is_cuda() ? int64_t{224} : int64_t{128}) << 20;
}

at::Tensor FusedSafeLabels(const at::Tensor& labels, int64_t ignore_index) {
  return at::where(labels.ne(ignore_index), labels, at::zeros_like(labels));
}

LossTerms FusedLinearLoss(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& labels, int64_t ignore_index, LossReduction reduction,
                          std::optional<double> z_loss_multiplier, int64_t tile_bytes,
                          const std::function<void()>& between_tiles, bool with_argmax) {
  // Per-token log-sum-exp and label logit, never more than tile_bytes of logits at a time.
  const LogitStats stats = ComputeLogitStats(h, weight, bias, FusedSafeLabels(labels, ignore_index),
                                             tile_bytes, between_tiles, with_argmax);
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

std::vector<PackedLoss> PackedFusedLinearLoss(const at::Tensor& h, const at::Tensor& weight,
                                              const at::Tensor& bias,
                                              const std::vector<PackedLossRequest>& requests,
                                              int64_t tile_bytes, bool with_argmax) {
  const int64_t count = static_cast<int64_t>(requests.size());
  const int64_t vocab_size = weight.size(0);
  const c10::Device device = h.device();
  std::vector<at::Tensor> labels;
  int64_t rows = 0;
  for (const PackedLossRequest& request : requests) {
    labels.push_back(request.labels.cpu().to(at::kLong).contiguous().view(-1));
    rows += labels.back().numel();
  }
  TORCH_CHECK(rows == h.size(0), "PackedFusedLinearLoss: ", rows, " labels for ", h.size(0),
              " rows");

  // The host tables, in pinned memory when they go to a GPU (one asynchronous copy each): per
  // row its label, or -1 where ignored, its request's z-loss multiplier and "mean" divisor (1
  // for the other reductions: dividing by it is exact); per request its first row.
  const auto host = [&](at::IntArrayRef sizes, at::ScalarType dtype) {
    return at::empty(sizes, at::TensorOptions(dtype).pinned_memory(device.is_cuda()));
  };
  at::Tensor marked = host({rows}, at::kLong);
  at::Tensor scales = host({2, rows}, at::kFloat);
  at::Tensor offsets = host({count + 1}, at::kLong);
  int64_t* marked_rows = marked.data_ptr<int64_t>();
  float* multiplier_rows = scales.data_ptr<float>();
  float* divisor_rows = multiplier_rows + rows;
  int64_t* first_rows = offsets.data_ptr<int64_t>();
  std::vector<PackedLoss> out(count);
  bool any_reduced = false;
  bool any_reduced_z = false;
  bool any_unreduced_z = false;
  int64_t row = 0;
  for (int64_t m = 0; m < count; ++m) {
    const PackedLossRequest& request = requests[m];
    const int64_t* label = labels[m].data_ptr<int64_t>();
    const int64_t n = labels[m].numel();
    int64_t scored = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool valid = label[i] != request.ignore_index;
      // (LMHead::ValidateForward's rule; checked again because -1 marks the ignored rows.)
      TORCH_CHECK(!valid || (label[i] >= 0 && label[i] < vocab_size),
                  "PackedFusedLinearLoss: label ", label[i], " outside [0, ", vocab_size, ")");
      marked_rows[row + i] = valid ? label[i] : -1;
      scored += valid;
    }
    // As FinishFusedLinearLoss: the multiplier in fp32, the divisor valid.sum().float() >= 1.
    const float multiplier =
        static_cast<float>(EffectiveZLossMultiplier(request.z_loss_multiplier));
    const float divisor = request.reduction == LossReduction::kMean
                              ? static_cast<float>(std::max<int64_t>(scored, 1))
                              : 1.0f;
    std::fill(multiplier_rows + row, multiplier_rows + row + n, multiplier);
    std::fill(divisor_rows + row, divisor_rows + row + n, divisor);
    first_rows[m] = row;
    out[m].scored = scored;
    const bool reduced = request.reduction != LossReduction::kNone;
    const bool with_z = request.z_loss_multiplier.has_value();
    any_reduced = any_reduced || reduced;
    any_reduced_z = any_reduced_z || (reduced && with_z);
    any_unreduced_z = any_unreduced_z || (!reduced && with_z);
    row += n;
  }
  first_rows[count] = rows;
  const at::Tensor marked_device = CopyToDevice(marked, device);
  const at::Tensor scales_device = CopyToDevice(scales, device);
  const at::Tensor offsets_device = CopyToDevice(offsets, device);

  // FinishFusedLinearLoss's row terms, for every row at once.
  const at::Tensor valid = marked_device.ge(0);
  const LogitStats stats = ComputeLogitStats(h, weight, bias, marked_device.clamp_min(0),
                                             tile_bytes, /*between_tiles=*/{}, with_argmax);
  const at::Tensor& lse = stats.lse;
  const at::Tensor divisor = scales_device[1];
  const at::Tensor ce_rows = at::where(valid, lse - stats.label_logit, 0.0) / divisor;
  const at::Tensor z_rows = at::where(valid, lse * lse * scales_device[0], 0.0) / divisor;
  const at::Tensor loss_rows = ce_rows + z_rows;
  const at::Tensor z_rows_input_dtype = z_rows.to(h.scalar_type());
  // Per request sums ("mean" and "sum"); the z-loss summed in fp32, then in the input dtype, as
  // torch sums a bf16 tensor.
  const auto sums = [&](const at::Tensor& t) {
    return at::segment_reduce(t, "sum", /*lengths=*/std::nullopt, /*indices=*/std::nullopt,
                              offsets_device, /*axis=*/0, /*unsafe=*/true, /*initial=*/0);
  };
  at::Tensor loss_sums;
  at::Tensor z_sums;
  at::Tensor ce_sums;
  if (any_reduced) loss_sums = sums(loss_rows);
  if (any_reduced_z) {
    z_sums = sums(z_rows_input_dtype.to(at::kFloat)).to(h.scalar_type());
    ce_sums = loss_sums - z_sums;
  }
  at::Tensor ce_rows_z;  // loss - z per row, for unreduced requests with a z-loss
  if (any_unreduced_z) ce_rows_z = loss_rows - z_rows_input_dtype;

  for (int64_t m = 0; m < count; ++m) {
    const PackedLossRequest& request = requests[m];
    const int64_t first = first_rows[m];
    const int64_t n = labels[m].numel();
    const bool with_z = request.z_loss_multiplier.has_value();
    LossTerms& terms = out[m].terms;
    if (request.reduction == LossReduction::kNone) {
      terms.loss = loss_rows.narrow(0, first, n);
      terms.ce_loss = with_z ? ce_rows_z.narrow(0, first, n) : terms.loss;
      if (with_z) terms.z_loss = z_rows_input_dtype.narrow(0, first, n);
    } else {
      terms.loss = loss_sums.select(0, m);
      terms.ce_loss = with_z ? ce_sums.select(0, m) : terms.loss;
      if (with_z) terms.z_loss = z_sums.select(0, m);
    }
    if (request.with_argmax) terms.argmax = stats.argmax.narrow(0, first, n);
  }
  return out;
}

}  // namespace lmhead

#include "core/ops/cpu/logit_stats_cpu.h"

#include <ATen/ATen.h>

namespace lmhead::cpu {

void AccumulateLogitStats(const at::Tensor& logits, int64_t col0, const at::Tensor& safe_labels,
                          at::Tensor& lse, at::Tensor& label_logit, at::Tensor* best_value,
                          at::Tensor* best_index) {
  const int64_t cols = logits.size(1);
  const at::Tensor logits_fp32 = logits.to(at::kFloat);
  lse.copy_(at::logaddexp(lse, at::logsumexp(logits_fp32, {1})));
  const at::Tensor in_tile = safe_labels.ge(col0).logical_and(safe_labels.lt(col0 + cols));
  const at::Tensor column = (safe_labels - col0).clamp(0, cols - 1).unsqueeze(1);
  label_logit.copy_(at::where(in_tile, logits_fp32.gather(1, column).squeeze(1), label_logit));
  if (best_value == nullptr) return;
  // max(dim) returns the first maximum (a NaN if there is one), as argmax does; among equal
  // values the lower id wins, so an earlier tile keeps its best on ties.
  const auto [tile_value, tile_index] = logits_fp32.max(1);
  const at::Tensor id = tile_index + col0;
  const at::Tensor better =
      tile_value.gt(*best_value)
          .logical_or(tile_value.eq(*best_value).logical_and(id.lt(*best_index)))
          .logical_or(tile_value.isnan().logical_and(best_value->isnan().logical_not()));
  best_index->copy_(at::where(better, id, *best_index));
  best_value->copy_(at::where(better, tile_value, *best_value));
}

}  // namespace lmhead::cpu

#include "core/ops/cpu/logit_stats_cpu.h"

#include <ATen/ATen.h>

namespace lmhead::cpu {

void AccumulateLogitStats(const at::Tensor& logits, int64_t col0, const at::Tensor& safe_labels,
                          at::Tensor& lse, at::Tensor& label_logit) {
  const int64_t cols = logits.size(1);
  const at::Tensor logits_fp32 = logits.to(at::kFloat);
  lse.copy_(at::logaddexp(lse, at::logsumexp(logits_fp32, {1})));
  const at::Tensor in_chunk = safe_labels.ge(col0).logical_and(safe_labels.lt(col0 + cols));
  const at::Tensor column = (safe_labels - col0).clamp(0, cols - 1).unsqueeze(1);
  label_logit.copy_(at::where(in_chunk, logits_fp32.gather(1, column).squeeze(1), label_logit));
}

}  // namespace lmhead::cpu

// The epilogue of fused_linear: folds one chunk of logits into per-token running statistics.
// CUDA tensors use the kernel in core/ops/cuda (in --config=cuda builds); other devices use ATen.
#ifndef LMHEAD_CORE_OPS_LOGIT_STATS_H_
#define LMHEAD_CORE_OPS_LOGIT_STATS_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>

namespace lmhead {

// logits: (rows, cols) in the input dtype, vocabulary columns [col0, col0 + cols), unit column
// stride. safe_labels: (rows,) int64 (ignored tokens hold any in-range value). lse and
// label_logit: (rows,) fp32 views updated in place: lse <- logaddexp(lse, logsumexp(row)) in
// fp32, label_logit <- the row's label logit where the label lies in this chunk. May throw
// c10::Error.
// Extra bytes per logit AccumulateLogitStats needs while it runs on `device`: two fp32 copies
// for the ATen path, none for the CUDA kernel.
int64_t LogitStatsWorkingBytes(const c10::Device& device);

void AccumulateLogitStats(const at::Tensor& logits, int64_t col0, const at::Tensor& safe_labels,
                          at::Tensor& lse, at::Tensor& label_logit);

}  // namespace lmhead

#endif  // LMHEAD_CORE_OPS_LOGIT_STATS_H_

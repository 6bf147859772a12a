// The fused_linear epilogue for tensors on any device, through ATen ops (the CPU path).
#ifndef LMHEAD_CORE_OPS_CPU_LOGIT_STATS_CPU_H_
#define LMHEAD_CORE_OPS_CPU_LOGIT_STATS_CPU_H_

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lmhead::cpu {

// The contract of lmhead::AccumulateLogitStats (core/ops/logit_stats.h). Works on an fp32 copy
// of the tile plus one fp32 temporary (8 working bytes per logit). May throw c10::Error.
// best_value and best_index are both given or both null (the running argmax, RunningArgmax).
void AccumulateLogitStats(const at::Tensor& logits, int64_t col0, const at::Tensor& safe_labels,
                          at::Tensor& lse, at::Tensor& label_logit, at::Tensor* best_value,
                          at::Tensor* best_index);

// Working bytes per logit that AccumulateLogitStats needs.
inline constexpr int64_t kLogitStatsWorkingBytes = 8;

}  // namespace lmhead::cpu

#endif  // LMHEAD_CORE_OPS_CPU_LOGIT_STATS_CPU_H_

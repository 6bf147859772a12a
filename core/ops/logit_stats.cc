#include "core/ops/logit_stats.h"

#include "core/ops/cpu/logit_stats_cpu.h"

#ifdef LMHEAD_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "core/ops/cuda/logit_stats_cuda.h"
#endif

namespace lmhead {
namespace {

#ifdef LMHEAD_WITH_CUDA
void AccumulateWithCuda(const at::Tensor& logits, int64_t col0, const at::Tensor& safe_labels,
                        at::Tensor& lse, at::Tensor& label_logit) {
  TORCH_CHECK(logits.stride(1) == 1, "logit chunk must have unit column stride");
  TORCH_CHECK(lse.is_contiguous() && label_logit.is_contiguous() && safe_labels.is_contiguous(),
              "per-token statistics must be contiguous");
  cuda::LogitType type = cuda::LogitType::kFloat32;
  switch (logits.scalar_type()) {
    case at::kFloat: type = cuda::LogitType::kFloat32; break;
    case at::kBFloat16: type = cuda::LogitType::kBFloat16; break;
    case at::kHalf: type = cuda::LogitType::kFloat16; break;
    default: TORCH_CHECK(false, "unsupported logit dtype ", logits.scalar_type());
  }
  C10_CUDA_CHECK(cuda::AccumulateLogitStats(
      logits.data_ptr(), type, logits.size(0), logits.size(1), logits.stride(0), col0,
      safe_labels.data_ptr<int64_t>(), lse.data_ptr<float>(), label_logit.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream(logits.device().index()).stream()));
}
#endif

}  // namespace

int64_t LogitStatsWorkingBytes(const c10::Device& device) {
#ifdef LMHEAD_WITH_CUDA
  if (device.is_cuda()) return 0;
#endif
  return cpu::kLogitStatsWorkingBytes;
}

void AccumulateLogitStats(const at::Tensor& logits, int64_t col0, const at::Tensor& safe_labels,
                          at::Tensor& lse, at::Tensor& label_logit) {
#ifdef LMHEAD_WITH_CUDA
  if (logits.is_cuda()) {
    AccumulateWithCuda(logits, col0, safe_labels, lse, label_logit);
    return;
  }
#endif
  cpu::AccumulateLogitStats(logits, col0, safe_labels, lse, label_logit);
}

}  // namespace lmhead

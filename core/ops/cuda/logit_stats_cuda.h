// The fused_linear epilogue on CUDA: folds one chunk of logits, just written by the GEMM, into
// per-row running softmax statistics. Plain pointers and a stream; no LibTorch.
#ifndef LMHEAD_CORE_OPS_CUDA_LOGIT_STATS_CUDA_H_
#define LMHEAD_CORE_OPS_CUDA_LOGIT_STATS_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lmhead::cuda {

enum class LogitType { kFloat32, kBFloat16, kFloat16 };

// For each of `rows` rows of `logits` (row r starts at logits + r * row_stride elements and
// holds `cols` values: vocabulary columns [col0, col0 + cols)):
//   lse[r] <- log(exp(lse[r]) + sum_j exp(logits[r][j]))      (fp32; start lse at -inf)
//   label_logit[r] <- logits[r][labels[r] - col0]             if labels[r] is in the chunk
// Rows whose label is outside the chunk keep their label_logit. fp32 arithmetic throughout.
// With `best_value` and `best_index` (both or neither), also the running argmax in
// torch.argmax's order (NaN above every number, the lowest column among equals):
//   (best_value[r], best_index[r]) <- the better of itself and the chunk's best (value, col0 + j)
// (start at -inf and INT64_MAX; chunks must come in increasing col0).
// Launches on `stream` and returns the launch's error (cudaSuccess when rows == 0).
cudaError_t AccumulateLogitStats(const void* logits, LogitType type, int64_t rows, int64_t cols,
                                 int64_t row_stride, int64_t col0, const int64_t* labels,
                                 float* lse, float* label_logit, float* best_value,
                                 int64_t* best_index, cudaStream_t stream);

}  // namespace lmhead::cuda

#endif  // LMHEAD_CORE_OPS_CUDA_LOGIT_STATS_CUDA_H_

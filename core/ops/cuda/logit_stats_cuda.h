// The fused_linear epilogue on CUDA: folds one tile of logits, just written by the GEMM, into
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
//   label_logit[r] <- logits[r][labels[r] - col0]             if labels[r] is in the tile
// Rows whose label is outside the tile keep their label_logit. fp32 arithmetic throughout.
// With `best_value` and `best_index` (both or neither), also the running argmax in
// torch.argmax's order (NaN above every number, the lowest column among equals):
//   (best_value[r], best_index[r]) <- the better of itself and the tile's best (value, col0 + j)
// (start at -inf and INT64_MAX; tiles must come in increasing col0).
// Launches on `stream` and returns the launch's error (cudaSuccess when rows == 0).
cudaError_t AccumulateLogitStats(const void* logits, LogitType type, int64_t rows, int64_t cols,
                                 int64_t row_stride, int64_t col0, const int64_t* labels,
                                 float* lse, float* label_logit, float* best_value,
                                 int64_t* best_index, cudaStream_t stream);

// The scoring pass's epilogue (core/fused_scoring.h): for each of `rows` rows of `logits` laid
// out as above, folds the tile into per-row fp32 state relative to a shift c = max[r] (0 while
// max[r] is -inf):
//   max[r]         the largest logit so far (start at -inf)
//   sum[r]         sum_j exp(l_j - c)                      (start at 0)
//   weighted[r]    sum_j exp(l_j - c) (l_j - c)            (start at 0; -inf logits add nothing)
//   label_logit[r] <- logits[r][labels[r] - col0]          if labels[r] is in the tile
// With `above` (and `threshold`): above[r] += the tile's logits strictly larger than the
// label's: its logit in this tile where its column is here, else threshold[r]. With
// `best_value` and `best_index`, the running argmax as AccumulateLogitStats keeps it. NaN logits
// make the row's sums NaN. Launches on `stream` and returns the launch's error.
cudaError_t AccumulateScoringStats(const void* logits, LogitType type, int64_t rows, int64_t cols,
                                   int64_t row_stride, int64_t col0, const int64_t* labels,
                                   const float* threshold, float* max, float* sum, float* weighted,
                                   float* label_logit, int64_t* above, float* best_value,
                                   int64_t* best_index, cudaStream_t stream);

// A running top-k per row across tiles (k from 1 to kMaxTopK): top_values (rows, k) fp32 and
// top_ids (rows, k) int64, each row ordered best first in torch.argmax's order (NaN above every
// number, then the larger value, then the lower id), merged with the tile's logits (vocabulary
// ids col0 + j). An empty slot holds (-inf, INT64_MAX), below every logit; start with all slots
// empty. Launches on `stream` and returns the launch's error.
inline constexpr int kMaxTopK = 64;
cudaError_t AccumulateTopK(const void* logits, LogitType type, int64_t rows, int64_t cols,
                           int64_t row_stride, int64_t col0, int k, float* top_values,
                           int64_t* top_ids, cudaStream_t stream);

}  // namespace lmhead::cuda

#endif  // LMHEAD_CORE_OPS_CUDA_LOGIT_STATS_CUDA_H_

// The fused_linear forward as one GEMM on Hopper: a CUTLASS warp-specialized, persistent TMA +
// wgmma GEMM of h W^T whose epilogue reduces each tile of logits, still in registers, to per-row
// partial softmax (and argmax) state, and a small kernel that merges those partials across the
// vocabulary tiles. No logit reaches global memory. Plain pointers and a stream; no LibTorch.
#ifndef LMHEAD_CORE_OPS_CUDA_FUSED_LOGIT_STATS_CUDA_H_
#define LMHEAD_CORE_OPS_CUDA_FUSED_LOGIT_STATS_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/ops/cuda/logit_stats_cuda.h"

namespace lmhead::cuda {

// Whether FusedLogitStats can run `type` (bf16 or fp16) on a device of compute capability
// major.minor (9.0 only: the kernel is built for sm_90a) with these operands: `dim` a multiple of
// 8, and both pointers and row strides (in elements) 16-byte aligned, as TMA requires.
bool FusedLogitStatsSupported(LogitType type, int major, int minor, int64_t dim, const void* h,
                              int64_t h_row_stride, const void* weight, int64_t weight_row_stride);

// Bytes of scratch that FusedLogitStats needs per row of h (the partial state of every
// vocabulary tile).
int64_t FusedLogitStatsScratchBytesPerRow(int64_t vocab, bool with_argmax,
                                          bool with_scoring = false);

// The scoring terms FusedLogitStats adds when given them (docs/notes/scoring.md), per row r:
//   entropy[r] = -sum_j p[r][j] log p[r][j], p = softmax(logit[r])          (fp32 arithmetic)
//   above[r] = #{j : logit[r][j] > t[r]}: t[r] the label's logit in the tile that holds the
//              label's column, threshold[r] in the others      (only when threshold is not null)
// threshold[r] is meant to be the label's logit computed before the GEMM, rounded as the GEMM
// rounds it. All (rows,) arrays on the device.
struct FusedScoringTerms {
  float* entropy = nullptr;
  const float* threshold = nullptr;
  int64_t* above = nullptr;
};

// For each of `rows` rows of h (rows x dim, row-major with `h_row_stride`) against weight
// (vocab x dim, row-major with `weight_row_stride`), with the logits h W^T rounded to `type` as
// a GEMM into `type` would round them:
//   lse[r] = log(sum_j exp(logit[r][j]))          (fp32 arithmetic)
//   label_logit[r] = logit[r][labels[r]]          (labels in [0, vocab))
//   argmax[r] = torch.argmax(logit[r])            (only when argmax is not null)
// and, with `scoring`, its terms. `scratch` holds rows * FusedLogitStatsScratchBytesPerRow bytes
// (with_scoring as `scoring` is given), 16-byte aligned. `sm_count` is the device's
// multiprocessor count. Launches on `stream`; returns the first launch error, or
// cudaErrorInvalidValue for operands that FusedLogitStatsSupported refuses.
cudaError_t FusedLogitStats(const void* h, int64_t h_row_stride, const void* weight,
                            int64_t weight_row_stride, LogitType type, int64_t rows, int64_t vocab,
                            int64_t dim, const int64_t* labels, float* lse, float* label_logit,
                            int64_t* argmax, void* scratch, int sm_count, cudaStream_t stream,
                            const FusedScoringTerms* scoring = nullptr);

}  // namespace lmhead::cuda

#endif  // LMHEAD_CORE_OPS_CUDA_FUSED_LOGIT_STATS_CUDA_H_

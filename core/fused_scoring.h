// The scoring outputs (core/scoring.h) for `fused_linear`: computed from hidden states over
// vocabulary tiles (or in the fused GEMM's epilogue on Hopper), without ever holding the whole
// logits, in the same pass as the loss's per-token statistics.
#ifndef LMHEAD_CORE_FUSED_SCORING_H_
#define LMHEAD_CORE_FUSED_SCORING_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

#include "core/ops/logit_stats.h"
#include "core/scoring.h"

namespace lmhead {

// Working bytes per logit of ScoreHiddenStates' epilogue, besides the logits themselves: an fp32
// copy and the temporaries of the softmax terms, the rank's comparison and the top-k keys.
inline constexpr int64_t kScoringWorkingBytes = 24;

// What ScoreHiddenStates returns: the loss's statistics (lse and label_logit; argmax with
// `with_argmax` or continuation sums) and the positions' scores.
struct FusedScores {
  LogitStats stats;
  PositionScores scores;
};

// ScoreLogitRows' scores of the logits h W^T (+ b), and the statistics ComputeLogitStats gives
// for the loss, in one pass without the logits: h (N, D) and weight (V, D) of one dtype, bias
// (V,) or undefined, labels (N,) int64 (ignore_index or in [0, V)), `options` as ScoreLogitRows
// takes them (valid, on h's device). The logits are formed in h's dtype one tile at a time
// (ForEachLogitTile, core/ops/logit_stats.h); an epilogue folds each tile into per-token
// state (on CUDA the kernels AccumulateScoringStats and AccumulateTopK, for all but the
// candidates; ATen otherwise): an online log-sum-exp and entropy (running max m, s = sum
// exp(l - m), t = sum exp(l - m) (l - m); -inf logits add nothing), the label's logit, the count
// of logits above it, a top-k merged across tiles (exact, ties to the lower id) and the
// candidates' logits. At most `tile_bytes` of logits and their working copies exist at once,
// besides the per-token state (k + C + a few values per token) and, with label_rank, one token
// slice's gathered weight rows. `between_tiles`, when set, runs before each tile (it may throw
// to abandon the work). Every comparison is made on the tile's logits in h's dtype, and the
// results equal ScoreLogitRows' on these logits to fp32 rounding, but for one thing: the label
// rank counts the logits of other tiles than the label's against the label's logit computed
// before the GEMM (h . W[label] (+ b) in fp32, rounded to h's dtype), which may differ from the
// tile's by rounding. Where the loss takes Hopper's fused GEMM (FusedGemmPreferred) and neither
// top-k nor candidates are asked, the same terms come from that GEMM's epilogue, tile by tile in
// registers, with `tile_bytes` bounding its partials (ComputeLogitStatsFusedGemm with
// FusedGemmScoring; docs/notes/scoring.md). May throw c10::Error.
FusedScores ScoreHiddenStates(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& labels, int64_t ignore_index,
                              const ScoringOptions& options, bool with_argmax, int64_t tile_bytes,
                              const std::function<void()>& between_tiles = {});

}  // namespace lmhead

#endif  // LMHEAD_CORE_FUSED_SCORING_H_

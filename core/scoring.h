// Scoring outputs for evaluation workers (issue 14): what lm-evaluation-harness and in-loop
// evaluators compute from the logits themselves, so that a remote head can return them instead
// of vocabulary-sized rows. Provides the options and outputs (ForwardOptions::scoring,
// LMOutput::scoring), their checks, the reference from logits (ScoreLogits, also the `default`
// implementation's path) and the assembly of the outputs that `fused_linear`'s pass
// (core/fused_scoring.h) shares. Semantics (docs/notes/scoring.md):
//  - log-probabilities are log_softmax of the logits in fp32 (as OLMo-core's cross-entropy reads
//    `logits.float()`); sums are accumulated in fp64 and returned as fp32, as lm-eval sums
//    Python floats;
//  - ranks, argmax and top-k order compare the logits as given (the compute dtype), ties going
//    to the lower token id (torch.argmax's rule; top-k as a stable descending sort);
//  - positions whose label is ignore_index are not scored: their label outputs are 0 and they
//    count in no continuation.
#ifndef LMHEAD_CORE_SCORING_H_
#define LMHEAD_CORE_SCORING_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lmhead {

// The largest top_k a request may ask for.
inline constexpr int64_t kMaxTopK = 64;
// The most candidate ids per position (C): bounds the (B, S', C) input and output, and the
// gathers of fused_linear's pass (C values per token and vocabulary tile).
inline constexpr int64_t kMaxCandidates = 4096;

// Which scoring outputs to compute; none by default. B is the batch, S the sequence length and
// S' the number of positions logits_to_keep keeps.
struct ScoringOptions {
  bool label_logprobs = false;  // needs labels
  bool entropy = false;
  bool label_rank = false;  // needs labels
  int64_t top_k = 0;        // 0: none; else 1 to min(kMaxTopK, vocab_size)
  // Token ids whose log-probabilities to return: int64 in [0, vocab_size), 1 to kMaxCandidates
  // of them per position: (B, S', C), one list per kept position, or (C,) for every position.
  std::optional<at::Tensor> candidate_ids;
  // Continuations (lm-eval's loglikelihood): int64, per position the id (>= 0) of the
  // continuation it belongs to, or -1 where it is summed in none. In ForwardOptions (B, S) like
  // labels, sliced by logits_to_keep as labels are; ScoreLogits takes the kept positions' ids,
  // (B, S'). Kept ids lie in [-1, S'): at most S' continuations per row. Needs labels.
  std::optional<at::Tensor> segment_ids;

  // Whether any output is asked for.
  bool any() const {
    return label_logprobs || entropy || label_rank || top_k > 0 || candidate_ids.has_value() ||
           segment_ids.has_value();
  }
};

// The requested outputs, on the logits' device; B, S' as above, G = 1 + the largest kept
// segment id in the batch (0 when there is none), at most S'.
struct ScoringOutputs {
  std::optional<at::Tensor> label_logprobs;  // (B, S') fp32: log p(label); 0 where ignored
  std::optional<at::Tensor> entropy;         // (B, S') fp32: -sum_v p log p, every position
  // (B, S') int64: 1 + #{v: logit_v > logit_label}; 0 where ignored.
  std::optional<at::Tensor> label_rank;
  std::optional<at::Tensor> top_k_ids;           // (B, S', k) int64, by descending logit, then id
  std::optional<at::Tensor> top_k_logprobs;      // (B, S', k) fp32, their log-probabilities
  std::optional<at::Tensor> candidate_logprobs;  // (B, S', C) fp32
  // Per row and segment, over its scored positions:
  std::optional<at::Tensor> segment_logprob_sums;  // (B, G) fp32: sum of log p(label)
  std::optional<at::Tensor> segment_token_counts;  // (B, G) int64: scored positions
  std::optional<at::Tensor> segment_is_greedy;     // (B, G) bool: every label is the argmax
  std::optional<at::Tensor> segment_entropy_sums;  // (B, G) fp32: summed entropy
};

// The checks of `options` that read no tensor values, for `batch` rows of `kept` kept positions,
// segment_ids' rows `segment_length` long (S for ForwardOptions, S' for ScoreLogits), a vocabulary
// of `vocab_size` and labels given or not. INVALID_ARGUMENT naming the field: "top_k: ..." outside
// [0, min(kMaxTopK, vocab_size)], "candidate_ids: ..." not int64 (C,) or (B, S', C) with C in
// [1, kMaxCandidates], "segment_ids: ..." not int64 (B, segment_length), "scoring: label_logprobs
// needs labels" (and label_rank, segment_ids).
absl::Status ValidateScoringShapes(const ScoringOptions& options, int64_t batch, int64_t kept,
                                   int64_t segment_length, int64_t vocab_size, bool has_labels);

// The checks of the values, after ValidateScoringShapes: candidate_ids in [0, vocab_size) and
// `kept_segments` (the kept positions' segment ids, (B, kept), or undefined) in [-1, kept).
// INVALID_ARGUMENT "candidate_ids: ..." or "segment_ids: ..." naming the bad value. Free for
// tensors on the CPU; a synchronisation with a device that holds one.
absl::Status ValidateScoringValues(const ScoringOptions& options, const at::Tensor& kept_segments,
                                   int64_t kept, int64_t vocab_size);

// The outputs `options` asks for, from `logits` (B, S', V) floating, and `labels` (B, S') integer
// (kept positions; may be absent when nothing asked needs them), on the logits' device; options'
// segment_ids are the kept positions', (B, S'). INVALID_ARGUMENT "logits: ..." or "labels: ..."
// (labels other than ignore_index must lie in [0, V)) for bad arguments, and as
// ValidateScoringShapes and ValidateScoringValues for bad options. Synchronises with the device
// (checks, and G).
absl::StatusOr<ScoringOutputs> ScoreLogits(const at::Tensor& logits,
                                           const std::optional<at::Tensor>& labels,
                                           int64_t ignore_index, const ScoringOptions& options);

// --- For the heads (LMHead::Forward): the per-position reference, and the assembly it shares
// with fused_linear's pass (core/fused_scoring.h). Arguments are valid (the checks above passed)
// and on the compute device; N = B * S' flattened kept positions. Each may throw c10::Error. ---

// Per kept position, what the outputs are assembled from: each tensor defined iff needed.
struct PositionScores {
  at::Tensor label_logprobs;      // (N,) fp32, 0 where not scored; label_logprobs or segments
  at::Tensor entropy;             // (N,) fp32; entropy or segments
  at::Tensor label_rank;          // (N,) int64, 0 where not scored; label_rank
  at::Tensor top_k_ids;           // (N, k) int64; top_k > 0
  at::Tensor top_k_logprobs;      // (N, k) fp32; top_k > 0
  at::Tensor candidate_logprobs;  // (N, C) fp32; candidate_ids
  at::Tensor argmax;              // (N,) int64 (torch.argmax's pick); segments
};

// Bytes ScoreLogitRows counts per logit of a slice for its temporaries (fp32 log-probabilities,
// probabilities and their products, a stable sort's values and ids, comparisons).
inline constexpr int64_t kScoringBytesPerLogit = 32;
// The default bound on those temporaries: 256 MiB.
inline constexpr int64_t kScoringSliceBytes = int64_t{256} << 20;

// From logits (N, V) of any floating dtype and labels (N,) int64 (undefined when nothing asked
// needs them); options' candidate_ids (C,) or (N, C), segment_ids only telling whether
// continuation sums are asked. ScoreLogits' computation, over slices of rows whose temporaries
// (kScoringBytesPerLogit per logit) stay within `slice_bytes` (one row at least): the same
// results whatever the slicing.
PositionScores ScoreLogitRows(const at::Tensor& logits, const at::Tensor& labels,
                              int64_t ignore_index, const ScoringOptions& options,
                              int64_t slice_bytes = kScoringSliceBytes);

// The outputs of `batch` rows of `length` kept positions from their scores and labels (N,) int64
// (undefined without labels): the per-position outputs reshaped, and with options' segment_ids
// ((B, S') kept ids in [-1, groups)) the sums of every row's segments 0 to groups - 1.
ScoringOutputs AssembleScoringOutputs(const PositionScores& scores, int64_t batch, int64_t length,
                                      const at::Tensor& labels, int64_t ignore_index,
                                      const ScoringOptions& options, int64_t groups);

// Keeps the first `groups` segments of outputs assembled for more (contiguous copies).
void KeepSegments(ScoringOutputs& outputs, int64_t groups);

}  // namespace lmhead

#endif  // LMHEAD_CORE_SCORING_H_

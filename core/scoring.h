// Scoring outputs for evaluation workers (issue 14), computed from a request's logits: what
// lm-evaluation-harness and in-loop evaluators compute from the logits themselves, so that a
// remote head can return them instead of vocabulary-sized rows. This is the reference: the
// `default` implementation's path and what the fused paths are tested against. Semantics
// (docs/notes/scoring.md):
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

#include "absl/status/statusor.h"

namespace lmhead {

// The largest top_k a request may ask for.
inline constexpr int64_t kMaxTopK = 64;

// Which scoring outputs to compute; none by default.
struct ScoringOptions {
  bool label_logprobs = false;  // needs labels
  bool entropy = false;
  bool label_rank = false;  // needs labels
  int64_t top_k = 0;        // 0: none; else 1 to min(kMaxTopK, vocab_size)
  // Token ids whose log-probabilities to return: (B, S', C) per position, or (C,) for every
  // position; int64 in [0, vocab_size).
  std::optional<at::Tensor> candidate_ids;
  // Continuations (lm-eval's loglikelihood): (B, S') int64, a segment id >= 0 per kept position,
  // -1 where not scored. Needs labels.
  std::optional<at::Tensor> segment_ids;
};

// The requested outputs; B, S' are the logits' first two sizes, G = 1 + the largest segment id
// (0 when there is none).
struct ScoringOutputs {
  std::optional<at::Tensor> label_logprobs;      // (B, S') fp32: log p(label); 0 where ignored
  std::optional<at::Tensor> entropy;             // (B, S') fp32: -sum_v p log p, every position
  std::optional<at::Tensor> label_rank;          // (B, S') int64: 1 + #{v: logit_v > logit_label}
  std::optional<at::Tensor> top_k_ids;           // (B, S', k) int64, by descending logit
  std::optional<at::Tensor> top_k_logprobs;      // (B, S', k) fp32, their log-probabilities
  std::optional<at::Tensor> candidate_logprobs;  // (B, S', C) fp32
  // Per row and segment, over its scored positions:
  std::optional<at::Tensor> segment_logprob_sums;  // (B, G) fp32: sum of log p(label)
  std::optional<at::Tensor> segment_token_counts;  // (B, G) int64: scored positions
  std::optional<at::Tensor> segment_is_greedy;     // (B, G) bool: every label is the argmax
  std::optional<at::Tensor> segment_entropy_sums;  // (B, G) fp32: summed entropy
};

// The outputs `options` asks for, from `logits` (B, S', V) floating, and `labels` (B, S') int64
// (kept positions; may be absent when nothing asked needs them), on the logits' device.
// INVALID_ARGUMENT naming the argument ("top_k: ...", "candidate_ids: ...", "segment_ids: ...",
// "labels: ...") for a bad option; labels other than ignore_index must lie in [0, V).
absl::StatusOr<ScoringOutputs> ScoreLogits(const at::Tensor& logits,
                                           const std::optional<at::Tensor>& labels,
                                           int64_t ignore_index, const ScoringOptions& options);

}  // namespace lmhead

#endif  // LMHEAD_CORE_SCORING_H_

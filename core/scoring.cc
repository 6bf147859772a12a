#include "core/scoring.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

namespace lmhead {
namespace {

absl::Status Invalid(absl::string_view argument, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(argument, ": ", message));
}

std::string ShapeText(const at::Tensor& tensor) {
  std::string text = "(";
  for (int64_t d = 0; d < tensor.dim(); ++d) {
    absl::StrAppend(&text, d > 0 ? ", " : "", tensor.size(d));
  }
  return text + ")";
}

// "Long (2, 3)", or "an undefined tensor".
std::string TensorText(const at::Tensor& tensor) {
  if (!tensor.defined()) return "an undefined tensor";
  return absl::StrCat(c10::toString(tensor.scalar_type()), " ", ShapeText(tensor));
}

// OK when every value of `values` (integer) lies in [low, high); else names the lowest value
// below or the highest above. Free on the CPU, a synchronisation on a device.
absl::Status CheckRange(const at::Tensor& values, int64_t low, int64_t high,
                        absl::string_view argument, absl::string_view what) {
  if (values.numel() == 0) return absl::OkStatus();
  const int64_t min = values.min().item<int64_t>();
  const int64_t max = values.max().item<int64_t>();
  if (min >= low && max < high) return absl::OkStatus();
  return Invalid(argument, absl::StrCat(what, " must lie in [", low, ", ", high, "), got ",
                                        min < low ? min : max));
}

}  // namespace

absl::Status ValidateScoringShapes(const ScoringOptions& options, int64_t batch, int64_t kept,
                                   int64_t segment_length, int64_t vocab_size, bool has_labels) {
  const int64_t max_top_k = std::min(kMaxTopK, vocab_size);
  if (options.top_k < 0 || options.top_k > max_top_k) {
    return Invalid("top_k",
                   absl::StrCat("expected 0 (none) to ", max_top_k, ", got ", options.top_k));
  }
  if (!has_labels) {
    for (const auto& [asked, name] :
         {std::pair<bool, const char*>{options.label_logprobs, "label_logprobs"},
          {options.label_rank, "label_rank"},
          {options.segment_ids.has_value(), "segment_ids"}}) {
      if (asked) return Invalid("scoring", absl::StrCat(name, " needs labels"));
    }
  }
  if (options.candidate_ids.has_value()) {
    const at::Tensor& given = *options.candidate_ids;
    const bool shape_ok =
        given.defined() &&
        (given.dim() == 1 || (given.dim() == 3 && given.size(0) == batch && given.size(1) == kept));
    const int64_t count = shape_ok ? given.size(-1) : 0;
    if (!shape_ok || given.scalar_type() != at::kLong || count < 1 || count > kMaxCandidates) {
      return Invalid("candidate_ids", absl::StrCat("expected int64 of shape (C,) or (", batch, ", ",
                                                   kept, ", C) with C from 1 to ", kMaxCandidates,
                                                   ", got ", TensorText(given)));
    }
  }
  if (options.segment_ids.has_value()) {
    const at::Tensor& given = *options.segment_ids;
    if (!given.defined() || given.scalar_type() != at::kLong || given.dim() != 2 ||
        given.size(0) != batch || given.size(1) != segment_length) {
      return Invalid("segment_ids", absl::StrCat("expected int64 of shape (", batch, ", ",
                                                 segment_length, "), got ", TensorText(given)));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateScoringValues(const ScoringOptions& options, const at::Tensor& kept_segments,
                                   int64_t kept, int64_t vocab_size) {
  if (options.candidate_ids.has_value()) {
    absl::Status status =
        CheckRange(*options.candidate_ids, 0, vocab_size, "candidate_ids", "token ids");
    if (!status.ok()) return status;
  }
  if (kept_segments.defined()) {
    // -1: in no continuation; at most one continuation per kept position.
    return CheckRange(kept_segments, -1, kept, "segment_ids", "kept positions' ids");
  }
  return absl::OkStatus();
}

absl::StatusOr<ScoringOutputs> ScoreLogits(const at::Tensor& logits,
                                           const std::optional<at::Tensor>& labels,
                                           int64_t ignore_index, const ScoringOptions& options) {
  if (!logits.defined() || logits.dim() != 3 || !at::isFloatingType(logits.scalar_type())) {
    return Invalid("logits", absl::StrCat("expected floating (B, S', V), got ",
                                          logits.defined() ? ShapeText(logits) : "undefined"));
  }
  const int64_t batch = logits.size(0);
  const int64_t length = logits.size(1);
  const int64_t vocab_size = logits.size(2);
  if (labels.has_value() && (!labels->defined() || labels->dim() != 2 || labels->size(0) != batch ||
                             labels->size(1) != length ||
                             !at::isIntegralType(labels->scalar_type(), /*includeBool=*/false))) {
    return Invalid("labels", absl::StrCat("expected integer (B=", batch, ", S'=", length, "), got ",
                                          TensorText(*labels)));
  }
  if (absl::Status status =
          ValidateScoringShapes(options, batch, length, length, vocab_size, labels.has_value());
      !status.ok()) {
    return status;
  }
  at::Tensor ids;  // the labels, (N,) int64 on the logits' device
  if (labels.has_value()) {
    ids = labels->to(logits.device(), at::kLong).reshape({-1});
    absl::Status status =
        CheckRange(ids.masked_select(ids.ne(ignore_index)), 0, vocab_size, "labels", "token ids");
    if (!status.ok()) return status;
  }
  // The options on the logits' device, candidates (C,) or (N, C).
  ScoringOptions rows = options;
  if (rows.candidate_ids.has_value()) {
    at::Tensor& candidates = *rows.candidate_ids;
    candidates = candidates.to(logits.device());
    if (candidates.dim() == 3) {
      candidates = candidates.reshape({batch * length, candidates.size(2)});
    }
  }
  int64_t groups = 0;
  if (rows.segment_ids.has_value()) {
    at::Tensor& segments = *rows.segment_ids;
    segments = segments.to(logits.device());
    if (segments.numel() > 0) groups = std::max<int64_t>(segments.max().item<int64_t>() + 1, 0);
  }
  if (absl::Status status =
          ValidateScoringValues(rows, rows.segment_ids.value_or(at::Tensor()), length, vocab_size);
      !status.ok()) {
    return status;
  }
  return AssembleScoringOutputs(
      ScoreLogitRows(logits.reshape({batch * length, vocab_size}), ids, ignore_index, rows), batch,
      length, ids, ignore_index, rows, groups);
}

namespace {

// ScoreLogitRows on one slice of rows, holding every temporary for all of them.
PositionScores ScoreLogitSlice(const at::Tensor& logits, const at::Tensor& labels,
                               int64_t ignore_index, const ScoringOptions& options) {
  const bool segments = options.segment_ids.has_value();
  at::Tensor valid;  // (N,) bool: scored positions
  at::Tensor safe;   // (N,) the labels, 0 where ignored
  if (labels.defined()) {
    valid = labels.ne(ignore_index);
    safe = labels.masked_fill(~valid, 0);
  }
  PositionScores scores;
  const at::Tensor logprobs = logits.to(at::kFloat).log_softmax(-1);  // (N, V)
  if (options.label_logprobs || segments) {
    scores.label_logprobs =
        logprobs.gather(1, safe.unsqueeze(1)).squeeze(1).masked_fill(~valid, 0.0);
  }
  if (options.entropy || segments) {
    // p log p is 0 where p is 0 (a logit of -inf, or one that underflows); NaN stays NaN.
    const at::Tensor p = logprobs.exp();
    scores.entropy = -at::where(p.eq(0), at::zeros_like(p), p * logprobs).sum(-1);
  }
  if (options.label_rank) {
    const at::Tensor label_logit = logits.gather(1, safe.unsqueeze(1));
    scores.label_rank = (logits > label_logit).sum(-1).add(1).masked_fill(~valid, 0);
  }
  if (options.top_k > 0) {
    // A stable descending sort keeps equal logits in id order.
    const at::Tensor order = std::get<1>(logits.sort(/*stable=*/true, /*dim=*/-1,
                                                     /*descending=*/true));
    scores.top_k_ids = order.narrow(-1, 0, options.top_k).contiguous();
    scores.top_k_logprobs = logprobs.gather(-1, scores.top_k_ids);
  }
  if (options.candidate_ids.has_value()) {
    const at::Tensor& candidates = *options.candidate_ids;
    scores.candidate_logprobs = logprobs.gather(
        1, candidates.dim() == 1 ? candidates.expand({logits.size(0), candidates.size(0)})
                                 : candidates);
  }
  if (segments) scores.argmax = logits.argmax(-1);
  return scores;
}

}  // namespace

PositionScores ScoreLogitRows(const at::Tensor& logits, const at::Tensor& labels,
                              int64_t ignore_index, const ScoringOptions& options,
                              int64_t slice_bytes) {
  const int64_t n = logits.size(0);
  const int64_t per_row = std::max<int64_t>(logits.size(1), 1) * kScoringBytesPerLogit;
  const int64_t rows = std::max<int64_t>(slice_bytes / per_row, 1);
  if (n <= rows) return ScoreLogitSlice(logits, labels, ignore_index, options);
  std::vector<PositionScores> parts;
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t count = std::min(rows, n - start);
    ScoringOptions slice = options;
    if (slice.candidate_ids.has_value() && slice.candidate_ids->dim() == 2) {
      slice.candidate_ids = slice.candidate_ids->narrow(0, start, count);
    }
    parts.push_back(ScoreLogitSlice(logits.narrow(0, start, count),
                                    labels.defined() ? labels.narrow(0, start, count) : labels,
                                    ignore_index, slice));
  }
  const auto join = [&](at::Tensor PositionScores::*field) {
    if (!(parts.front().*field).defined()) return at::Tensor();
    std::vector<at::Tensor> pieces;
    for (const PositionScores& part : parts) pieces.push_back(part.*field);
    return at::cat(pieces);
  };
  PositionScores scores;
  for (at::Tensor PositionScores::*field :
       {&PositionScores::label_logprobs, &PositionScores::entropy, &PositionScores::label_rank,
        &PositionScores::top_k_ids, &PositionScores::top_k_logprobs,
        &PositionScores::candidate_logprobs, &PositionScores::argmax}) {
    scores.*field = join(field);
  }
  return scores;
}

ScoringOutputs AssembleScoringOutputs(const PositionScores& scores, int64_t batch, int64_t length,
                                      const at::Tensor& labels, int64_t ignore_index,
                                      const ScoringOptions& options, int64_t groups) {
  ScoringOutputs out;
  const auto per_position = [&](const at::Tensor& t) {
    std::vector<int64_t> shape = {batch, length};
    if (t.dim() == 2) shape.push_back(t.size(1));
    return t.reshape(shape);
  };
  if (options.label_logprobs) out.label_logprobs = per_position(scores.label_logprobs);
  if (options.entropy) out.entropy = per_position(scores.entropy);
  if (options.label_rank) out.label_rank = per_position(scores.label_rank);
  if (options.top_k > 0) {
    out.top_k_ids = per_position(scores.top_k_ids);
    out.top_k_logprobs = per_position(scores.top_k_logprobs);
  }
  if (options.candidate_ids.has_value()) {
    out.candidate_logprobs = per_position(scores.candidate_logprobs);
  }
  if (!options.segment_ids.has_value()) return out;

  const at::Tensor& segments = *options.segment_ids;  // (B, S')
  const at::Tensor ids = labels.view({batch, length});
  const at::Tensor scored = ids.ne(ignore_index) & segments.ge(0);
  // Row b's segment g is slot b * G + g; positions not scored go to a spare slot at the end.
  const at::Tensor rows = at::arange(batch, segments.options()).unsqueeze(1);
  const at::Tensor slot =
      at::where(scored, rows * groups + segments, at::full_like(segments, batch * groups)).view(-1);
  const auto sum = [&](const at::Tensor& values) {
    return at::zeros({batch * groups + 1}, values.options())
        .index_add_(0, slot, values.reshape(-1))
        .narrow(0, 0, batch * groups)
        .view({batch, groups});
  };
  const at::Tensor misses = scores.argmax.view({batch, length}).ne(ids) & scored;
  out.segment_logprob_sums = sum(scores.label_logprobs.to(at::kDouble)).to(at::kFloat);
  out.segment_token_counts = sum(scored.to(at::kLong));
  out.segment_is_greedy = sum(misses.to(at::kLong)).eq(0);
  out.segment_entropy_sums = sum(scores.entropy.to(at::kDouble)).to(at::kFloat);
  return out;
}

void KeepSegments(ScoringOutputs& outputs, int64_t groups) {
  for (std::optional<at::Tensor>* sums :
       {&outputs.segment_logprob_sums, &outputs.segment_token_counts, &outputs.segment_is_greedy,
        &outputs.segment_entropy_sums}) {
    if (sums->has_value() && (*sums)->size(1) != groups) {
      **sums = (*sums)->narrow(1, 0, groups).contiguous();
    }
  }
}

}  // namespace lmhead

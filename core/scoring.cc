#include "core/scoring.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>

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

// OK when every value of `ids` (integer) lies in [0, vocab_size).
absl::Status CheckIds(const at::Tensor& ids, int64_t vocab_size, absl::string_view argument) {
  if (ids.numel() == 0) return absl::OkStatus();
  const int64_t low = ids.min().item<int64_t>();
  const int64_t high = ids.max().item<int64_t>();
  if (low < 0 || high >= vocab_size) {
    return Invalid(argument, absl::StrCat("token ids must lie in [0, ", vocab_size, "), got ",
                                          low < 0 ? low : high));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ScoringOutputs> ScoreLogits(const at::Tensor& logits,
                                           const std::optional<at::Tensor>& labels,
                                           int64_t ignore_index, const ScoringOptions& options) {
  if (logits.dim() != 3 || !at::isFloatingType(logits.scalar_type())) {
    return Invalid("logits", absl::StrCat("expected floating (B, S', V), got ", ShapeText(logits)));
  }
  const int64_t batch = logits.size(0);
  const int64_t length = logits.size(1);
  const int64_t vocab_size = logits.size(2);
  const bool wants_labels =
      options.label_logprobs || options.label_rank || options.segment_ids.has_value();
  if (wants_labels && !labels.has_value()) {
    return Invalid("labels", "label_logprobs, label_rank and segment_ids need labels");
  }
  at::Tensor ids;    // the labels, int64 on the logits' device
  at::Tensor valid;  // (B, S') bool: scored positions
  if (labels.has_value()) {
    if (labels->dim() != 2 || labels->size(0) != batch || labels->size(1) != length ||
        !at::isIntegralType(labels->scalar_type(), /*includeBool=*/false)) {
      return Invalid("labels", absl::StrCat("expected integer (B=", batch, ", S'=", length,
                                            "), got ", ShapeText(*labels)));
    }
    ids = labels->to(logits.device(), at::kLong);
    valid = ids.ne(ignore_index);
    if (absl::Status ok = CheckIds(ids.masked_select(valid), vocab_size, "labels"); !ok.ok()) {
      return ok;
    }
  }
  if (options.top_k < 0 || options.top_k > std::min(kMaxTopK, vocab_size)) {
    return Invalid("top_k", absl::StrCat("expected 0 (none) to ", std::min(kMaxTopK, vocab_size),
                                         ", got ", options.top_k));
  }
  at::Tensor candidates;
  if (options.candidate_ids.has_value()) {
    const at::Tensor& given = *options.candidate_ids;
    const bool per_position = given.dim() == 3 && given.size(0) == batch && given.size(1) == length;
    if (given.scalar_type() != at::kLong || (given.dim() != 1 && !per_position)) {
      return Invalid("candidate_ids", absl::StrCat("expected int64 (C,) or (B=", batch, ", S'=",
                                                   length, ", C), got ", ShapeText(given)));
    }
    candidates = given.to(logits.device());
    if (absl::Status ok = CheckIds(candidates, vocab_size, "candidate_ids"); !ok.ok()) return ok;
    if (!per_position) candidates = candidates.expand({batch, length, given.size(0)});
  }
  at::Tensor segments;
  if (options.segment_ids.has_value()) {
    const at::Tensor& given = *options.segment_ids;
    if (given.scalar_type() != at::kLong || given.dim() != 2 || given.size(0) != batch ||
        given.size(1) != length) {
      return Invalid("segment_ids", absl::StrCat("expected int64 (B=", batch, ", S'=", length,
                                                 "), got ", ShapeText(given)));
    }
    segments = given.to(logits.device());
    if (segments.numel() > 0 && segments.min().item<int64_t>() < -1) {
      return Invalid("segment_ids",
                     absl::StrCat("expected ids >= 0, or -1 for positions not scored, got ",
                                  segments.min().item<int64_t>()));
    }
  }

  ScoringOutputs out;
  const at::Tensor logprobs = logits.to(at::kFloat).log_softmax(-1);  // (B, S', V)
  at::Tensor label_logprobs;
  if (options.label_logprobs || segments.defined()) {
    label_logprobs = logprobs.gather(-1, ids.masked_fill(~valid, 0).unsqueeze(-1))
                         .squeeze(-1)
                         .masked_fill(~valid, 0.0);
    if (options.label_logprobs) out.label_logprobs = label_logprobs;
  }
  at::Tensor entropy;
  if (options.entropy || segments.defined()) {
    // p log p is 0 where p is 0 (a logit of -inf, or one that underflows).
    const at::Tensor p = logprobs.exp();
    entropy = -at::where(p > 0, p * logprobs, at::zeros_like(p)).sum(-1);
    if (options.entropy) out.entropy = entropy;
  }
  if (options.label_rank) {
    const at::Tensor label_logit = logits.gather(-1, ids.masked_fill(~valid, 0).unsqueeze(-1));
    out.label_rank = (logits > label_logit).sum(-1).add(1).masked_fill(~valid, 0);
  }
  if (options.top_k > 0) {
    // A stable descending sort keeps equal logits in id order.
    const at::Tensor order = std::get<1>(logits.sort(/*stable=*/true, /*dim=*/-1,
                                                     /*descending=*/true));
    out.top_k_ids = order.narrow(-1, 0, options.top_k).contiguous();
    out.top_k_logprobs = logprobs.gather(-1, *out.top_k_ids);
  }
  if (candidates.defined()) out.candidate_logprobs = logprobs.gather(-1, candidates);
  if (segments.defined()) {
    const int64_t groups =
        segments.numel() > 0 ? std::max<int64_t>(segments.max().item<int64_t>() + 1, 0) : 0;
    const at::Tensor scored = valid & segments.ge(0);
    // Row b's segment g is slot b * G + g; positions not scored go to a spare slot at the end.
    const at::Tensor rows = at::arange(batch, segments.options()).unsqueeze(1);
    const at::Tensor slot =
        at::where(scored, rows * groups + segments, at::full_like(segments, batch * groups))
            .view(-1);
    const auto sum = [&](const at::Tensor& values) {
      return at::zeros({batch * groups + 1}, values.options())
          .index_add_(0, slot, values.reshape(-1))
          .narrow(0, 0, batch * groups)
          .view({batch, groups});
    };
    const at::Tensor misses = logits.argmax(-1).ne(ids) & scored;
    out.segment_logprob_sums = sum(label_logprobs.to(at::kDouble)).to(at::kFloat);
    out.segment_token_counts = sum(scored.to(at::kLong));
    out.segment_is_greedy = sum(misses.to(at::kLong)).eq(0);
    out.segment_entropy_sums = sum(entropy.to(at::kDouble)).to(at::kFloat);
  }
  return out;
}

}  // namespace lmhead

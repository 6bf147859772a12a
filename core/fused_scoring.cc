#include "core/fused_scoring.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <utility>

namespace lmhead {
namespace {

// Top-k keys: one int64 per (token, vocabulary id) whose order is the order of the top-k (by
// logit descending, ties by id ascending), so that a top-k of keys is exact and merges across
// tiles. High half: the fp32 logit's bits mapped to an int32 of the same order (-0 as +0, every
// NaN as one NaN above +inf, where torch.sort and torch.argmax rank NaN); low half: 2^32 - 1 - id.
constexpr int64_t kLowHalf = int64_t{1} << 32;
constexpr int64_t kMagnitudeBits = 0x7FFFFFFF;

// The keys of `logits` (rows, cols) fp32, vocabulary columns from col0.
at::Tensor TopKKeys(const at::Tensor& logits, int64_t col0) {
  at::Tensor canonical = logits.masked_fill(logits.eq(0), 0.0);
  canonical.masked_fill_(canonical.isnan(), std::numeric_limits<float>::quiet_NaN());
  at::Tensor bits = canonical.view(at::kInt);
  // Negative floats order in reverse of their bits: flip the magnitude bits.
  bits = at::where(bits.lt(0), bits.bitwise_xor(kMagnitudeBits), bits);
  const at::Tensor ids = at::arange(col0, col0 + logits.size(1), logits.options().dtype(at::kLong));
  return bits.to(at::kLong).mul_(kLowHalf).add_((kLowHalf - 1) - ids);
}

// The vocabulary ids and fp32 logits that keys hold.
std::pair<at::Tensor, at::Tensor> DecodeKeys(const at::Tensor& keys) {
  const at::Tensor high = keys.div(kLowHalf, "floor");
  const at::Tensor ids = (kLowHalf - 1) - (keys - high * kLowHalf);
  const at::Tensor bits = at::where(high.lt(0), high.bitwise_xor(kMagnitudeBits), high);
  return {ids, bits.to(at::kInt).view(at::kFloat)};
}

// The per-token state of the pass: (N, ...) tensors, or views of them for a slice of tokens.
struct TokenState {
  at::Tensor max;          // (rows,) fp32: the largest logit so far (-inf before any)
  at::Tensor sum;          // (rows,) fp32: sum of exp(l - shift), shift = max, or 0 while -inf
  at::Tensor weighted;     // (rows,) fp32: sum of exp(l - shift) * (l - shift)
  at::Tensor label;        // (rows,) int64: the labels, any valid id where ignored
  at::Tensor label_logit;  // (rows,) fp32: the label's logit, once its tile is seen
  at::Tensor threshold;    // label_rank: (rows,) fp32, the label's logit computed before the GEMM
  at::Tensor above;        // label_rank: (rows,) int64, logits above the label's
  at::Tensor keys;         // top-k with ATen: (rows, k) int64, the best keys so far
  at::Tensor top_values;   // top-k by the CUDA kernel: (rows, k) fp32, best first
  at::Tensor top_ids;      // and their ids, (rows, k) int64
  RunningArgmax argmax;    // the argmax where the CUDA kernel finds it (no top-k asked)
  at::Tensor candidates;   // candidates: (C,) or (rows, C) int64 ids
  at::Tensor candidate_logits;  // candidates: (rows, C) fp32
};

// The state of tokens [t0, t0 + rows): views of `all`'s (candidates shared by every token
// stay whole).
TokenState Rows(const TokenState& all, int64_t t0, int64_t rows) {
  const auto slice = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, t0, rows) : t; };
  TokenState state;
  state.max = slice(all.max);
  state.sum = slice(all.sum);
  state.weighted = slice(all.weighted);
  state.label = slice(all.label);
  state.label_logit = slice(all.label_logit);
  state.threshold = slice(all.threshold);
  state.above = slice(all.above);
  state.keys = slice(all.keys);
  state.top_values = slice(all.top_values);
  state.top_ids = slice(all.top_ids);
  state.argmax = RunningArgmax{slice(all.argmax.value), slice(all.argmax.index)};
  state.candidates = all.candidates.defined() && all.candidates.dim() == 2 ? slice(all.candidates)
                                                                           : all.candidates;
  state.candidate_logits = slice(all.candidate_logits);
  return state;
}

// max with -inf (no logit yet, or only -inf logits) as 0: what the sums are relative to.
at::Tensor Shift(const at::Tensor& max) { return max.masked_fill(max.isneginf(), 0.0); }

// The top-k keys and the candidates' logits of one tile into `state`; the keys need `logits` in
// fp32, the candidates take them in any dtype (converted after the gather).
void AccumulateTopKAndCandidates(const at::Tensor& logits, int64_t col0, TokenState& state) {
  const int64_t cols = logits.size(1);
  if (state.keys.defined()) {
    const int64_t k = state.keys.size(1);
    const at::Tensor tile_best = std::get<0>(
        TopKKeys(logits, col0).topk(std::min(k, cols), 1, /*largest=*/true, /*sorted=*/false));
    state.keys.copy_(std::get<0>(
        at::cat({state.keys, tile_best}, 1).topk(k, 1, /*largest=*/true, /*sorted=*/true)));
  }
  if (state.candidates.defined()) {
    const at::Tensor& ids = state.candidates;
    const at::Tensor in_range = ids.ge(col0).logical_and(ids.lt(col0 + cols));
    const at::Tensor columns =
        (ids - col0).clamp(0, cols - 1).expand({logits.size(0), state.candidate_logits.size(1)});
    state.candidate_logits.copy_(
        at::where(in_range, logits.gather(1, columns).to(at::kFloat), state.candidate_logits));
  }
}

// Folds one tile of logits (rows, cols) in the compute dtype, vocabulary columns from col0,
// into `state`: on CUDA the softmax, label, rank and argmax terms in one kernel, else with ATen.
void Accumulate(const at::Tensor& tile, int64_t col0, TokenState& state) {
  const int64_t cols = tile.size(1);
  if (AccumulateScoringStats(tile, col0, state.label, state.threshold, state.max, state.sum,
                             state.weighted, state.label_logit, state.above,
                             state.argmax.value.defined() ? &state.argmax : nullptr)) {
    if (state.top_values.defined()) {
      TORCH_CHECK(AccumulateTopK(tile, col0, state.top_values, state.top_ids),
                  "the top-k kernel did not run where the scoring kernel did");
    }
    // Where the kernels run the top-k is theirs: only the candidates are left, gathered from the
    // tile as it is (no fp32 copy of the whole tile).
    TORCH_CHECK(!state.keys.defined(), "ATen top-k keys where the top-k kernel runs");
    AccumulateTopKAndCandidates(tile, col0, state);
    return;
  }
  const at::Tensor logits = tile.to(at::kFloat);  // the compute dtype's values, exactly

  // Online log-sum-exp and entropy: the state rescaled to the new shift, plus the tile's terms.
  // Nothing is rescaled while the state holds only -inf logits (its sums are 0).
  const at::Tensor new_max = at::maximum(state.max, logits.amax(1));
  const at::Tensor old_shift = Shift(state.max);
  const at::Tensor shift = Shift(new_max);
  const at::Tensor delta = old_shift - shift;
  const at::Tensor scale = delta.exp().masked_fill_(state.max.isneginf(), 0.0);
  state.weighted.copy_((state.weighted + delta * state.sum) * scale);
  state.sum.mul_(scale);
  {
    at::Tensor centred = logits - shift.unsqueeze(1);
    at::Tensor terms = centred.exp();
    state.sum.add_(terms.sum(1));
    centred.masked_fill_(centred.isneginf(), 0.0);  // a -inf logit adds 0, not 0 * -inf
    state.weighted.add_(terms.mul_(centred).sum(1));
  }
  state.max.copy_(new_max);

  // The label's logit where its column is in this tile; logits above it (in the label's tile
  // its own logit from the tile, so its column never counts; elsewhere the one computed before).
  const at::Tensor in_tile = state.label.ge(col0).logical_and(state.label.lt(col0 + cols));
  const at::Tensor picked =
      logits.gather(1, (state.label - col0).clamp(0, cols - 1).unsqueeze(1)).squeeze(1);
  state.label_logit.copy_(at::where(in_tile, picked, state.label_logit));
  if (state.above.defined()) {
    const at::Tensor threshold = at::where(in_tile, picked, state.threshold);
    state.above.add_(logits.gt(threshold.unsqueeze(1)).sum(1));
  }

  AccumulateTopKAndCandidates(logits, col0, state);
}

// The label's logit per token in fp32, computed before the GEMM and rounded once to the compute
// dtype as the GEMM rounds it: what label_rank compares the logits outside the label's tile
// against.
at::Tensor LabelLogitBeforeGemm(const at::Tensor& h, const at::Tensor& weight,
                                const at::Tensor& bias, const at::Tensor& labels) {
  at::Tensor logit = (h.to(at::kFloat) * weight.index_select(0, labels).to(at::kFloat)).sum(1);
  if (bias.defined()) logit.add_(bias.index_select(0, labels).to(at::kFloat));
  return logit.to(h.scalar_type()).to(at::kFloat);
}

// What a pass leaves per token, before the outputs are formed: (N,) lse, label_logit and
// argmax (when asked); entropy's terms or the entropy itself; logits above the label's; the
// top-k (N, k) and candidates' logits (N, C) where asked.
struct PassResult {
  at::Tensor lse;
  at::Tensor label_logit;
  at::Tensor entropy;
  at::Tensor above;
  at::Tensor argmax;
  at::Tensor top_ids;
  at::Tensor top_values;
  at::Tensor candidate_logits;
};

FusedScores Outputs(const PassResult& pass, const at::Tensor& valid, const ScoringOptions& options,
                    bool with_argmax) {
  const bool segments = options.segment_ids.has_value();
  FusedScores out;
  out.stats.lse = pass.lse;
  out.stats.label_logit = pass.label_logit;
  PositionScores& scores = out.scores;
  if (options.label_logprobs || segments) {
    scores.label_logprobs = (pass.label_logit - pass.lse).masked_fill(~valid, 0.0);
  }
  if (options.entropy || segments) scores.entropy = pass.entropy;
  if (options.label_rank) scores.label_rank = (pass.above + 1).masked_fill(~valid, 0);
  if (with_argmax) out.stats.argmax = pass.argmax;
  if (segments) scores.argmax = pass.argmax;
  if (options.top_k > 0) {
    scores.top_k_ids = pass.top_ids.narrow(1, 0, options.top_k).contiguous();
    scores.top_k_logprobs = pass.top_values.narrow(1, 0, options.top_k) - pass.lse.unsqueeze(1);
  }
  if (options.candidate_ids.has_value()) {
    scores.candidate_logprobs = pass.candidate_logits - pass.lse.unsqueeze(1);
  }
  return out;
}

// The scores the fused GEMM's epilogue gives (label log-probabilities, entropy, rank, argmax), in
// its one pass (core/ops/logit_stats.h, FusedGemmScoring).
PassResult ScoreWithFusedGemm(const at::Tensor& h, const at::Tensor& weight,
                              const at::Tensor& safe_labels, const ScoringOptions& options,
                              bool wants_argmax, int64_t tile_bytes,
                              const std::function<void()>& between_tiles) {
  FusedGemmScoring scoring;
  if (options.label_rank) {
    // In slices, so that the fp32 copies of h's rows and their labels' weight rows stay small.
    constexpr int64_t kSliceRows = 4096;
    const int64_t num_tokens = h.size(0);
    scoring.threshold = at::empty({num_tokens}, h.options().dtype(at::kFloat));
    for (int64_t t0 = 0; t0 < num_tokens; t0 += kSliceRows) {
      const int64_t rows = std::min(kSliceRows, num_tokens - t0);
      scoring.threshold.narrow(0, t0, rows)
          .copy_(LabelLogitBeforeGemm(h.narrow(0, t0, rows), weight, at::Tensor(),
                                      safe_labels.narrow(0, t0, rows)));
    }
  }
  const LogitStats stats = ComputeLogitStatsFusedGemm(h, weight, safe_labels, tile_bytes,
                                                      between_tiles, wants_argmax, &scoring);
  PassResult pass;
  pass.lse = stats.lse;
  pass.label_logit = stats.label_logit;
  pass.argmax = stats.argmax;
  pass.entropy = scoring.entropy;
  pass.above = scoring.above;
  return pass;
}

}  // namespace

FusedScores ScoreHiddenStates(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& labels, int64_t ignore_index,
                              const ScoringOptions& options, bool with_argmax, int64_t tile_bytes,
                              const std::function<void()>& between_tiles) {
  const int64_t num_tokens = h.size(0);
  const auto fp32 = h.options().dtype(at::kFloat);
  const auto int64 = h.options().dtype(at::kLong);
  const bool segments = options.segment_ids.has_value();
  // The argmax (for the loss's outputs, or is_greedy) is the top-1, or, where the CUDA kernel
  // folds the tiles and no top-k is asked, the kernel's running argmax.
  const bool wants_argmax = with_argmax || segments;
  const at::Tensor valid = labels.ne(ignore_index);
  const at::Tensor safe_labels = labels.masked_fill(~valid, 0);
  // Where the loss takes the fused GEMM, so do the scores its epilogue gives; the top-k and the
  // candidates need each tile's logits: the tiled pass.
  if (options.top_k == 0 && !options.candidate_ids.has_value() &&
      FusedGemmPreferred(h, weight, bias, tile_bytes, wants_argmax, /*with_scoring=*/true)) {
    return Outputs(ScoreWithFusedGemm(h, weight, safe_labels, options, wants_argmax, tile_bytes,
                                      between_tiles),
                   valid, options, with_argmax);
  }
  const bool running_argmax = wants_argmax && options.top_k == 0 && ScoringKernelApplies(h);
  const int64_t keys_kept =
      std::max<int64_t>(options.top_k, wants_argmax && !running_argmax ? 1 : 0);

  TokenState all;
  all.max = at::full({num_tokens}, -std::numeric_limits<float>::infinity(), fp32);
  all.sum = at::zeros({num_tokens}, fp32);
  all.weighted = at::zeros({num_tokens}, fp32);
  all.label = safe_labels;
  all.label_logit = at::zeros({num_tokens}, fp32);
  if (options.label_rank) {
    all.threshold = at::empty({num_tokens}, fp32);
    all.above = at::zeros({num_tokens}, int64);
  }
  // On CUDA the kernel keeps the top-k as (value, id) pairs; elsewhere ATen keeps int64 keys.
  const bool kernel_top_k = keys_kept > 0 && ScoringKernelApplies(h);
  if (kernel_top_k) {
    all.top_values =
        at::full({num_tokens, keys_kept}, -std::numeric_limits<float>::infinity(), fp32);
    all.top_ids = at::full({num_tokens, keys_kept}, std::numeric_limits<int64_t>::max(), int64);
  } else if (keys_kept > 0) {
    all.keys = at::full({num_tokens, keys_kept}, std::numeric_limits<int64_t>::min(), int64);
  }
  if (running_argmax) {
    all.argmax.value = at::full({num_tokens}, -std::numeric_limits<float>::infinity(), fp32);
    all.argmax.index = at::full({num_tokens}, std::numeric_limits<int64_t>::max(), int64);
  }
  if (options.candidate_ids.has_value()) {
    all.candidates = *options.candidate_ids;
    all.candidate_logits = at::zeros({num_tokens, all.candidates.size(-1)}, fp32);
  }

  // The state of the current token slice: views of the whole pass's.
  TokenState state;
  ForEachLogitTile(
      h, weight, bias, kScoringWorkingBytes, tile_bytes, between_tiles,
      [&](int64_t t0, int64_t rows) {
        state = Rows(all, t0, rows);
        if (state.threshold.defined()) {
          state.threshold.copy_(
              LabelLogitBeforeGemm(h.narrow(0, t0, rows), weight, bias, state.label));
        }
      },
      [&](const at::Tensor& logits, int64_t v0) { Accumulate(logits, v0, state); });

  const at::Tensor log_sum = all.sum.log();
  PassResult pass;
  pass.lse = Shift(all.max) + log_sum;
  pass.label_logit = all.label_logit;
  pass.entropy = log_sum - all.weighted / all.sum;
  pass.above = all.above;
  if (running_argmax) pass.argmax = all.argmax.index;
  if (keys_kept > 0) {
    const auto [ids, values] =
        kernel_top_k ? std::make_pair(all.top_ids, all.top_values) : DecodeKeys(all.keys);
    pass.argmax = ids.select(1, 0).contiguous();
    pass.top_ids = ids;
    pass.top_values = values;
  }
  pass.candidate_logits = all.candidate_logits;
  return Outputs(pass, valid, options, with_argmax);
}

}  // namespace lmhead

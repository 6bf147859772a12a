// ScoreLogits against a float64 reference written as plain loops over the logits, with ties
// (integer-valued logits), -inf logits, ignored labels, bf16 logits and every option's errors
// (the checks LMHead::Forward shares).
#include "core/scoring.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace lmhead {
namespace {

constexpr int64_t kIgnore = -100;

// The float64 reference of one position: its logits (as the head returns them) in double.
struct Position {
  std::vector<double> logits;

  double LogSumExp() const {
    double top = -std::numeric_limits<double>::infinity();
    for (double l : logits) top = std::max(top, l);
    double sum = 0;
    for (double l : logits) sum += std::exp(l - top);
    return top + std::log(sum);
  }
  double LogProb(int64_t id) const { return logits[id] - LogSumExp(); }
  double Entropy() const {
    double entropy = 0;
    for (size_t v = 0; v < logits.size(); ++v) {
      const double p = std::exp(LogProb(v));
      if (p > 0) entropy -= p * LogProb(v);
    }
    return entropy;
  }
  int64_t Rank(int64_t id) const {
    int64_t larger = 0;
    for (double l : logits) larger += l > logits[id];
    return 1 + larger;
  }
  int64_t Argmax() const {
    int64_t best = 0;
    for (size_t v = 1; v < logits.size(); ++v) best = logits[v] > logits[best] ? v : best;
    return best;
  }
  // The ids by descending logit, ties by lower id.
  std::vector<int64_t> Order() const {
    std::vector<int64_t> ids(logits.size());
    for (size_t v = 0; v < ids.size(); ++v) ids[v] = v;
    std::stable_sort(ids.begin(), ids.end(),
                     [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
    return ids;
  }
};

Position At(const at::Tensor& logits, int64_t b, int64_t s) {
  const at::Tensor row = logits[b][s].to(at::kDouble).contiguous();
  return {std::vector<double>(row.data_ptr<double>(), row.data_ptr<double>() + row.numel())};
}

// Logits with many ties and a few -inf: integers in [-3, 3], in `dtype`.
at::Tensor TiedLogits(int64_t batch, int64_t length, int64_t vocab, at::ScalarType dtype) {
  at::manual_seed(7);
  at::Tensor logits = at::randint(-3, 4, {batch, length, vocab}).to(at::kFloat);
  logits[0][1][2] = -std::numeric_limits<float>::infinity();
  return logits.to(dtype);
}

void CheckAgainstReference(at::ScalarType dtype) {
  const int64_t batch = 2, length = 6, vocab = 11;
  const at::Tensor logits = TiedLogits(batch, length, vocab, dtype);
  at::Tensor labels = at::randint(vocab, {batch, length}, at::kLong);
  labels[0][0] = kIgnore;
  labels[1][3] = kIgnore;
  labels[0][1] = 2;  // the -inf logit: log p = -inf, rank vocab - (its ties)
  const at::Tensor segments =
      at::tensor({-1, 0, 0, 1, 1, 1, 0, 0, -1, 2, 2, -1}, at::kLong).view({batch, length});
  const at::Tensor candidates = at::tensor({3, 0, 10}, at::kLong);
  ScoringOptions options;
  options.label_logprobs = true;
  options.entropy = true;
  options.label_rank = true;
  options.top_k = 4;
  options.candidate_ids = candidates;
  options.segment_ids = segments;
  absl::StatusOr<ScoringOutputs> out = ScoreLogits(logits, labels, kIgnore, options);
  ASSERT_TRUE(out.ok()) << out.status();

  const int64_t groups = 3;
  ASSERT_EQ(out->segment_logprob_sums->sizes(), at::IntArrayRef({batch, groups}));
  std::vector<double> sums(batch * groups, 0), entropies(batch * groups, 0);
  std::vector<int64_t> counts(batch * groups, 0);
  std::vector<bool> greedy(batch * groups, true);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < length; ++s) {
      SCOPED_TRACE(testing::Message() << "position " << b << ", " << s);
      const Position position = At(logits, b, s);
      const int64_t label = labels[b][s].item<int64_t>();
      const bool scored = label != kIgnore;
      const double want_logprob = scored ? position.LogProb(label) : 0.0;
      const float got_logprob = (*out->label_logprobs)[b][s].item<float>();
      if (std::isinf(want_logprob)) {
        EXPECT_TRUE(std::isinf(got_logprob) && got_logprob < 0);
      } else {
        EXPECT_NEAR(got_logprob, want_logprob, 1e-5 * (1 + std::abs(want_logprob)));
      }
      EXPECT_NEAR((*out->entropy)[b][s].item<float>(), position.Entropy(), 1e-5);
      EXPECT_EQ((*out->label_rank)[b][s].item<int64_t>(), scored ? position.Rank(label) : 0);
      const std::vector<int64_t> order = position.Order();
      for (int64_t k = 0; k < 4; ++k) {
        EXPECT_EQ((*out->top_k_ids)[b][s][k].item<int64_t>(), order[k]) << "k=" << k;
        EXPECT_NEAR((*out->top_k_logprobs)[b][s][k].item<float>(), position.LogProb(order[k]),
                    1e-5);
      }
      for (int64_t c = 0; c < 3; ++c) {
        const double want = position.LogProb(candidates[c].item<int64_t>());
        const float got = (*out->candidate_logprobs)[b][s][c].item<float>();
        if (std::isinf(want)) {
          EXPECT_TRUE(std::isinf(got));
        } else {
          EXPECT_NEAR(got, want, 1e-5 * (1 + std::abs(want)));
        }
      }
      const int64_t segment = segments[b][s].item<int64_t>();
      if (scored && segment >= 0) {
        sums[b * groups + segment] += want_logprob;
        entropies[b * groups + segment] += position.Entropy();
        ++counts[b * groups + segment];
        greedy[b * groups + segment] = greedy[b * groups + segment] && position.Argmax() == label;
      }
    }
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      SCOPED_TRACE(testing::Message() << "row " << b << ", segment " << g);
      const int64_t i = b * groups + g;
      const float got = (*out->segment_logprob_sums)[b][g].item<float>();
      if (std::isinf(sums[i])) {
        EXPECT_TRUE(std::isinf(got) && got < 0);
      } else {
        EXPECT_NEAR(got, sums[i], 1e-5 * (1 + std::abs(sums[i])));
      }
      EXPECT_EQ((*out->segment_token_counts)[b][g].item<int64_t>(), counts[i]);
      EXPECT_EQ((*out->segment_is_greedy)[b][g].item<bool>(), greedy[i]);
      EXPECT_NEAR((*out->segment_entropy_sums)[b][g].item<float>(), entropies[i], 1e-4);
    }
  }
}

TEST(ScoreLogitsTest, MatchesAFloat64ReferenceInFloat32) { CheckAgainstReference(at::kFloat); }

TEST(ScoreLogitsTest, MatchesAFloat64ReferenceInBFloat16) {
  // Ranks, argmax and top-k compare the bf16 logits themselves (integers: exact in bf16).
  CheckAgainstReference(at::kBFloat16);
}

TEST(ScoreLogitsTest, PerPositionCandidatesAndNothingAsked) {
  const at::Tensor logits = at::randn({2, 3, 5});
  const at::Tensor candidates = at::randint(5, {2, 3, 2}, at::kLong);
  ScoringOptions options;
  options.candidate_ids = candidates;
  absl::StatusOr<ScoringOutputs> out = ScoreLogits(logits, std::nullopt, kIgnore, options);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(
      at::allclose(*out->candidate_logprobs, logits.log_softmax(-1).gather(-1, candidates)));
  EXPECT_FALSE(out->label_logprobs.has_value() || out->entropy.has_value() ||
               out->top_k_ids.has_value() || out->segment_token_counts.has_value());
  // No segment ids at all but -1: no groups.
  options = {};
  options.segment_ids = at::full({2, 3}, -1, at::kLong);
  out = ScoreLogits(logits, at::zeros({2, 3}, at::kLong), kIgnore, options);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->segment_token_counts->sizes(), at::IntArrayRef({2, 0}));
}

TEST(ScoreLogitsTest, BadOptionsNameTheirArgument) {
  const at::Tensor logits = at::randn({2, 3, 5});
  const at::Tensor labels = at::zeros({2, 3}, at::kLong);
  const auto error = [&](const ScoringOptions& options, const std::optional<at::Tensor>& given) {
    absl::StatusOr<ScoringOutputs> out = ScoreLogits(logits, given, kIgnore, options);
    EXPECT_FALSE(out.ok());
    return std::string(out.status().message());
  };
  ScoringOptions options;
  options.label_rank = true;
  EXPECT_EQ(error(options, std::nullopt), "scoring: label_rank needs labels");
  EXPECT_EQ(error(options, at::full({2, 3}, 5, at::kLong)),
            "labels: token ids must lie in [0, 5), got 5");
  EXPECT_EQ(error(options, at::zeros({2, 4}, at::kLong)),
            "labels: expected integer (B=2, S'=3), got Long (2, 4)");
  options = {};
  options.label_logprobs = true;
  EXPECT_EQ(error(options, std::nullopt), "scoring: label_logprobs needs labels");
  options = {};
  options.segment_ids = at::zeros({2, 3}, at::kLong);
  EXPECT_EQ(error(options, std::nullopt), "scoring: segment_ids needs labels");
  options = {};
  options.top_k = 6;
  EXPECT_EQ(error(options, labels), "top_k: expected 0 (none) to 5, got 6");
  options.top_k = -1;
  EXPECT_EQ(error(options, labels), "top_k: expected 0 (none) to 5, got -1");
  options = {};
  options.candidate_ids = at::tensor({0, -1}, at::kLong);
  EXPECT_EQ(error(options, labels), "candidate_ids: token ids must lie in [0, 5), got -1");
  options.candidate_ids = at::zeros({2, 2}, at::kLong);
  EXPECT_EQ(error(options, labels),
            "candidate_ids: expected int64 of shape (C,) or (2, 3, C) with C from 1 to 4096, got "
            "Long (2, 2)");
  options.candidate_ids = at::zeros({kMaxCandidates + 1}, at::kLong);
  EXPECT_EQ(error(options, labels),
            "candidate_ids: expected int64 of shape (C,) or (2, 3, C) with C from 1 to 4096, got "
            "Long (4097)");
  options.candidate_ids = at::zeros({2, 3, 0}, at::kLong);
  EXPECT_EQ(error(options, labels),
            "candidate_ids: expected int64 of shape (C,) or (2, 3, C) with C from 1 to 4096, got "
            "Long (2, 3, 0)");
  options.candidate_ids = at::zeros({3}, at::kInt);
  EXPECT_EQ(error(options, labels),
            "candidate_ids: expected int64 of shape (C,) or (2, 3, C) with C from 1 to 4096, got "
            "Int (3)");
  options = {};
  options.segment_ids = at::full({2, 3}, -2, at::kLong);
  EXPECT_EQ(error(options, labels), "segment_ids: kept positions' ids must lie in [-1, 3), got -2");
  // At most one continuation per position: ids below S'.
  options.segment_ids = at::full({2, 3}, 3, at::kLong);
  EXPECT_EQ(error(options, labels), "segment_ids: kept positions' ids must lie in [-1, 3), got 3");
  options.segment_ids = at::zeros({3}, at::kLong);
  EXPECT_EQ(error(options, labels), "segment_ids: expected int64 of shape (2, 3), got Long (3)");
  EXPECT_EQ(error(ScoringOptions(), at::zeros({2, 3}, at::kLong).to(at::kFloat)),
            "labels: expected integer (B=2, S'=3), got Float (2, 3)");
}

// Scoring over slices of rows (the bound on its temporaries) gives what one slice gives: one row
// per slice, three rows, and all of them, with per-position candidates split with the rows.
TEST(ScoreLogitRowsTest, SlicesGiveWhatOneSliceGives) {
  at::Generator gen = at::detail::createCPUGenerator(11);
  const int64_t n = 7;
  const int64_t vocab = 50;
  const at::Tensor logits = at::randn({n, vocab}, gen).to(at::kBFloat16);
  at::Tensor labels = at::randint(vocab, {n}, gen, at::TensorOptions(at::kLong));
  labels[2] = -100;
  ScoringOptions options;
  options.label_logprobs = true;
  options.entropy = true;
  options.label_rank = true;
  options.top_k = 5;
  options.candidate_ids = at::randint(vocab, {n, 3}, gen, at::TensorOptions(at::kLong));
  options.segment_ids = at::zeros({1, n}, at::kLong);
  const PositionScores whole =
      ScoreLogitRows(logits, labels, -100, options, /*slice_bytes=*/int64_t{1} << 40);
  for (const int64_t rows : {int64_t{1}, int64_t{3}}) {
    const PositionScores sliced =
        ScoreLogitRows(logits, labels, -100, options, rows * vocab * kScoringBytesPerLogit);
    for (at::Tensor PositionScores::*field :
         {&PositionScores::label_logprobs, &PositionScores::entropy, &PositionScores::label_rank,
          &PositionScores::top_k_ids, &PositionScores::top_k_logprobs,
          &PositionScores::candidate_logprobs, &PositionScores::argmax}) {
      ASSERT_TRUE((sliced.*field).defined()) << rows;
      EXPECT_TRUE(at::equal(sliced.*field, whole.*field)) << rows;
    }
  }
}

}  // namespace
}  // namespace lmhead

// ScoreHiddenStates against ScoreLogitRows on the same logits, over tilings from single
// columns to the whole vocabulary. The data are small dyadic numbers, so every logit is exact in
// fp32 and bf16 whatever the GEMM's shape or summation order: ids, ranks and argmax must then be
// equal, values equal to fp32 rounding, and ties (many, and duplicate weight rows) go to the
// lower id across tile boundaries.
#include "core/fused_scoring.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <vector>

namespace lmhead {
namespace {

constexpr int64_t kD = 16;
constexpr int64_t kIgnore = -100;

struct Problem {
  at::Tensor h;       // (N, D)
  at::Tensor weight;  // (V, D)
  at::Tensor bias;    // (V,) or undefined
  at::Tensor labels;  // (N,)
  at::Tensor logits;  // (N, V) in the dtype, h W^T + b

  // Dyadic data: h in {-1, 0, 1}, weights and bias in multiples of 1/8 within [-1, 1], so a logit
  // is a multiple of 1/8 of magnitude at most 17: exact in bf16 (8 significant bits) and fp32.
  // Rows 5, 6 and the last copy row 2 (ties split across tiles); with `infinite_bias`, a few
  // bias entries are -inf (logits of probability 0), one of them a label's.
  Problem(int64_t tokens, int64_t vocab, at::ScalarType dtype, bool with_bias, bool infinite_bias,
          uint64_t seed) {
    at::Generator gen = at::detail::createCPUGenerator(seed);
    const auto f32 = at::TensorOptions(at::kFloat);
    h = at::randint(-1, 2, {tokens, kD}, gen, f32);
    weight = at::randint(-8, 9, {vocab, kD}, gen, f32) / 8;
    for (const int64_t copy : {int64_t{5}, int64_t{6}, vocab - 1}) weight[copy].copy_(weight[2]);
    labels = at::randint(vocab, {tokens}, gen, at::TensorOptions(at::kLong));
    labels[1] = kIgnore;
    labels[3] = 2;
    if (with_bias) {
      bias = at::randint(-8, 9, {vocab}, gen, f32) / 8;
      if (infinite_bias) {
        const float minus_infinity = -std::numeric_limits<float>::infinity();
        for (const int64_t id : {int64_t{0}, int64_t{7}, vocab / 2}) bias[id] = minus_infinity;
        labels[4] = 7;
      }
    }
    h = h.to(dtype);
    weight = weight.to(dtype);
    if (bias.defined()) bias = bias.to(dtype);
    logits = bias.defined() ? at::addmm(bias, h, weight.t()) : at::mm(h, weight.t());
  }
};

// Values equal to fp32 rounding, with infinities equal.
void ExpectClose(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  ASSERT_EQ(got.scalar_type(), want.scalar_type()) << what;
  EXPECT_TRUE(at::allclose(got, want, 1e-5, 1e-5)) << what << "\n" << got << "\nvs\n" << want;
}

void ExpectEqual(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  ASSERT_EQ(got.scalar_type(), want.scalar_type()) << what;
  EXPECT_TRUE(at::equal(got, want)) << what << "\n" << got << "\nvs\n" << want;
}

TEST(ScoreHiddenStatesTest, EqualsScoreLogitRowsOverEveryTiling) {
  int runs = 0;
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (const int64_t vocab : {int64_t{1000}, int64_t{257}}) {
      // 1 byte: one logit a tile; 700: about 25 columns; 8 KiB: 2 x 128 columns; 0: one tile.
      for (const int64_t tile_bytes : {int64_t{1}, int64_t{700}, int64_t{8192}, int64_t{1} << 30}) {
        if (tile_bytes == 1 && vocab > 300) continue;  // (slow, and 257 covers it)
        for (int bias = 0; bias < 3; ++bias) {
          const std::string what =
              std::string(c10::toString(dtype)) + " V=" + std::to_string(vocab) +
              " tile_bytes=" + std::to_string(tile_bytes) + " bias=" + std::to_string(bias);
          SCOPED_TRACE(what);
          const Problem p(/*tokens=*/9, vocab, dtype, bias > 0, bias == 2, /*seed=*/runs);
          const int64_t tokens = p.h.size(0);
          ScoringOptions options;
          options.label_logprobs = true;
          options.entropy = true;
          options.label_rank = true;
          options.top_k = runs % 2 == 0 ? 1 : kMaxTopK;
          // (C,) with one id, or (N, C) per position with ids at both ends and the ties.
          options.candidate_ids =
              runs % 2 == 0
                  ? at::tensor(std::vector<int64_t>{vocab - 1}, at::kLong)
                  : at::cat({at::tensor(std::vector<int64_t>{0, 2, 5, 6, vocab - 1, vocab / 2},
                                        at::kLong)
                                 .expand({tokens, 6}),
                             at::randint(vocab, {tokens, 30}, at::kLong)},
                            1);
          options.segment_ids = at::zeros({1, tokens}, at::kLong);  // asks for the argmax
          const bool with_argmax = bias != 1;
          const PositionScores want = ScoreLogitRows(p.logits, p.labels, kIgnore, options);
          const FusedScores got = ScoreHiddenStates(p.h, p.weight, p.bias, p.labels, kIgnore,
                                                    options, with_argmax, tile_bytes);
          ExpectClose(got.scores.label_logprobs, want.label_logprobs, "label_logprobs");
          ExpectClose(got.scores.entropy, want.entropy, "entropy");
          ExpectEqual(got.scores.label_rank, want.label_rank, "label_rank");
          ExpectEqual(got.scores.top_k_ids, want.top_k_ids, "top_k_ids");
          ExpectClose(got.scores.top_k_logprobs, want.top_k_logprobs, "top_k_logprobs");
          ExpectClose(got.scores.candidate_logprobs, want.candidate_logprobs, "candidate_logprobs");
          ExpectEqual(got.scores.argmax, want.argmax, "argmax");
          // The loss's statistics, as ComputeLogitStats gives them.
          const at::Tensor logits32 = p.logits.to(at::kFloat);
          ExpectClose(got.stats.lse, logits32.logsumexp(1), "lse");
          ExpectEqual(got.stats.label_logit,
                      logits32.gather(1, p.labels.clamp_min(0).unsqueeze(1)).squeeze(1),
                      "label_logit");
          ASSERT_EQ(got.stats.argmax.defined(), with_argmax);
          if (with_argmax) ExpectEqual(got.stats.argmax, p.logits.argmax(1), "stats.argmax");
          ++runs;
        }
      }
    }
  }
  EXPECT_EQ(runs, 42);
}

// Only what is asked for is computed; without anything needing it, no argmax.
TEST(ScoreHiddenStatesTest, ComputesOnlyWhatIsAsked) {
  const Problem p(4, 300, at::kFloat, true, false, 3);
  ScoringOptions options;
  options.entropy = true;
  const FusedScores got =
      ScoreHiddenStates(p.h, p.weight, p.bias, p.labels, kIgnore, options, false, 2048);
  EXPECT_TRUE(got.scores.entropy.defined());
  EXPECT_FALSE(got.scores.label_logprobs.defined() || got.scores.label_rank.defined() ||
               got.scores.top_k_ids.defined() || got.scores.candidate_logprobs.defined() ||
               got.scores.argmax.defined() || got.stats.argmax.defined());
  ExpectClose(got.scores.entropy, ScoreLogitRows(p.logits, p.labels, kIgnore, options).entropy,
              "entropy");
}

// Ordinary (Gaussian) data: the logits of the tiles and of one GEMM round differently, so values
// agree to rounding; in fp32 the order is still the same here.
TEST(ScoreHiddenStatesTest, GaussianDataAgreesToRounding) {
  at::Generator gen = at::detail::createCPUGenerator(11);
  const at::Tensor h = at::randn({20, 64}, gen);
  const at::Tensor weight = at::randn({1000, 64}, gen) / 4;
  const at::Tensor bias = at::randn({1000}, gen);
  const at::Tensor labels = at::randint(1000, {20}, gen, at::TensorOptions(at::kLong));
  ScoringOptions options;
  options.label_logprobs = true;
  options.entropy = true;
  options.label_rank = true;
  options.top_k = 10;
  options.candidate_ids = at::arange(0, 1000, 37, at::kLong);
  const PositionScores want =
      ScoreLogitRows(at::addmm(bias, h, weight.t()), labels, kIgnore, options);
  const FusedScores got = ScoreHiddenStates(h, weight, bias, labels, kIgnore, options, false, 3000);
  EXPECT_TRUE(at::allclose(got.scores.label_logprobs, want.label_logprobs, 1e-5, 1e-4));
  EXPECT_TRUE(at::allclose(got.scores.entropy, want.entropy, 1e-5, 1e-4));
  EXPECT_TRUE(at::allclose(got.scores.top_k_logprobs, want.top_k_logprobs, 1e-5, 1e-4));
  EXPECT_TRUE(at::allclose(got.scores.candidate_logprobs, want.candidate_logprobs, 1e-5, 1e-4));
  EXPECT_TRUE(at::equal(got.scores.top_k_ids, want.top_k_ids));
  EXPECT_TRUE(at::equal(got.scores.label_rank, want.label_rank));
}

}  // namespace
}  // namespace lmhead

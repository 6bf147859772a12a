// LMHead's scoring outputs (ForwardOptions::scoring): Forward with both loss implementations
// against ScoreLogits on float64 logits, ForwardBatch against Forward, the loss unchanged, the
// interrupt check, and every argument error.
//
// Most tests use dyadic parameters and inputs (x in {-1, 0, 1}, weights and bias in multiples of
// 1/8 within [-1, 1], d_model 16): every logit is then a multiple of 1/8 below 18 in magnitude,
// exact in fp32 and bf16 whatever the GEMM's shape, tiling or summation order. So the float64
// logits are the head's logits, ids and ranks must be equal exactly (ties included: the
// vocabulary has many equal logits, and duplicate weight rows), and values equal to fp32
// rounding of the softmax. One test uses Gaussian data to show that rounding alone separates the
// implementations there.
//
// The heads and inputs of the tests on dyadic data live on $LMHEAD_TEST_DEVICE (default "cpu"):
// on the GPU machine `tools/gpu/test.sh unit` runs them on "cuda:0" too, where both
// implementations must give the same exact results.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/lm_head.h"
#include "core/scoring.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

constexpr int64_t kD = 16;
constexpr int64_t kIgnore = -100;

// Where the dyadic heads and inputs live: $LMHEAD_TEST_DEVICE, or the CPU.
std::string TestDevice() {
  const char* device = std::getenv("LMHEAD_TEST_DEVICE");
  return device == nullptr || *device == '\0' ? "cpu" : device;
}

// A head of `config` with dyadic parameters (rows 5, 6 and the last copy row 2; normalized heads
// keep sz = 1/4, whose effective scale sz * sqrt(16) is 1).
std::unique_ptr<LMHead> ExactHead(const LMHeadConfig& config, int64_t vocab, uint64_t seed) {
  absl::StatusOr<std::unique_ptr<LMHead>> head =
      LMHead::Build(config, kD, vocab, TestDevice(), seed);
  EXPECT_TRUE(head.ok()) << head.status();
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const auto f32 = at::TensorOptions(at::kFloat);
  std::map<std::string, at::Tensor> state;
  for (const auto& [name, tensor] : (*head)->NamedParameters()) {
    at::Tensor value = tensor;
    if (name == "w_out.weight") {
      value = at::randint(-8, 9, {vocab, kD}, gen, f32) / 8;
      for (const int64_t copy : {int64_t{5}, int64_t{6}, vocab - 1}) value[copy].copy_(value[2]);
    } else if (name == "w_out.bias") {
      value = at::randint(-8, 9, {vocab}, gen, f32) / 8;
    }
    state[name] = value.to(tensor.device(), tensor.scalar_type());
  }
  EXPECT_TRUE((*head)->LoadStateDict(state).ok());
  return *std::move(head);
}

at::Tensor ExactX(int64_t batch, int64_t length, at::ScalarType dtype, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randint(-1, 2, {batch, length, kD}, gen, at::TensorOptions(at::kFloat))
      .to(c10::Device(TestDevice()), dtype);
}

// The kept positions of a (B, S, ...) tensor, as logits_to_keep keeps them.
at::Tensor Kept(const at::Tensor& t, const std::variant<int64_t, at::Tensor>& keep) {
  if (const auto* positions = std::get_if<at::Tensor>(&keep)) {
    if (t.dim() == 2) return t.gather(1, *positions);
    return t.gather(1, positions->unsqueeze(-1).expand({-1, -1, t.size(2)}));
  }
  const int64_t length = t.size(1);
  return t.slice(1, KeptStart(std::get<int64_t>(keep), length), length);
}

// The head's logits of x in float64, from its parameters (no layer norm).
at::Tensor Float64Logits(const LMHead& head, const at::Tensor& x) {
  at::Tensor weight, bias, sz;
  for (const auto& [name, tensor] : head.NamedParameters()) {
    if (name == "w_out.weight") weight = tensor.cpu().to(at::kDouble);
    if (name == "w_out.bias") bias = tensor.cpu().to(at::kDouble);
    if (name == "sz") sz = tensor.cpu().to(at::kDouble);
  }
  at::Tensor logits = at::matmul(x.cpu().to(at::kDouble), weight.t());
  if (bias.defined()) logits = logits + bias;
  if (sz.defined()) logits = logits * (sz * std::sqrt(double{kD}));
  return logits;
}

// ScoreLogits on the float64 logits of the kept positions, with their labels and segment ids.
ScoringOutputs Reference(const LMHead& head, const at::Tensor& x, const ForwardOptions& options) {
  ScoringOptions kept = options.scoring;
  if (kept.segment_ids.has_value()) {
    kept.segment_ids = Kept(*kept.segment_ids, options.logits_to_keep);
  }
  std::optional<at::Tensor> labels;
  if (options.labels.has_value()) labels = Kept(*options.labels, options.logits_to_keep);
  absl::StatusOr<ScoringOutputs> out = ScoreLogits(
      Kept(Float64Logits(head, x), options.logits_to_keep), labels, options.ignore_index, kept);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *std::move(out) : ScoringOutputs();
}

// Every output present in both or neither, of one shape and dtype; integers and booleans equal,
// floating values within `rtol`/`atol` (infinities equal).
void ExpectSameScoring(const ScoringOutputs& got, const ScoringOutputs& want,
                       const std::string& what, double rtol = 1e-5, double atol = 1e-5) {
  const auto compare = [&](const char* name, const std::optional<at::Tensor>& g,
                           const std::optional<at::Tensor>& w, double scale) {
    ASSERT_EQ(g.has_value(), w.has_value()) << what << ": " << name;
    if (!w.has_value()) return;

    const at::Tensor got_cpu = g->cpu();
    const at::Tensor want_cpu = w->cpu();
    ASSERT_EQ(got_cpu.sizes(), want_cpu.sizes()) << what << ": " << name;
    ASSERT_EQ(got_cpu.scalar_type(), want_cpu.scalar_type()) << what << ": " << name;
    const bool same = at::isFloatingType(want_cpu.scalar_type())
                          ? at::allclose(got_cpu, want_cpu, rtol, atol * scale)
                          : at::equal(got_cpu, want_cpu);
    EXPECT_TRUE(same) << what << ": " << name << "\n" << got_cpu << "\nvs\n" << want_cpu;
  };
  compare("label_logprobs", got.label_logprobs, want.label_logprobs, 1);
  compare("entropy", got.entropy, want.entropy, 1);
  compare("label_rank", got.label_rank, want.label_rank, 1);
  compare("top_k_ids", got.top_k_ids, want.top_k_ids, 1);
  compare("top_k_logprobs", got.top_k_logprobs, want.top_k_logprobs, 1);
  compare("candidate_logprobs", got.candidate_logprobs, want.candidate_logprobs, 1);
  // Sums of up to S' terms.
  compare("segment_logprob_sums", got.segment_logprob_sums, want.segment_logprob_sums, 10);
  compare("segment_token_counts", got.segment_token_counts, want.segment_token_counts, 1);
  compare("segment_is_greedy", got.segment_is_greedy, want.segment_is_greedy, 1);
  compare("segment_entropy_sums", got.segment_entropy_sums, want.segment_entropy_sums, 10);
}

// Every output asked for: k and the candidates' form vary with `variant`: k = 1 (or 0, every
// other time) and C = 1 shared, or k = min(64, V) and C = 40 per kept position (ids at both ends of
// the vocabulary, the tied rows and random ones).
ScoringOptions AllOutputs(int64_t batch, int64_t kept, int64_t vocab, int variant,
                          const at::Tensor& segment_ids) {
  ScoringOptions scoring;
  scoring.label_logprobs = true;
  scoring.entropy = true;
  scoring.label_rank = true;
  scoring.segment_ids = segment_ids;
  if (variant % 2 == 0) {
    scoring.top_k = variant % 4 == 0 ? 1 : 0;  // without top-k, CUDA finds the argmax by kernel
    scoring.candidate_ids = at::tensor(std::vector<int64_t>{vocab - 1}, at::kLong);
  } else {
    scoring.top_k = std::min(kMaxTopK, vocab);
    at::Generator gen = at::detail::createCPUGenerator(variant);
    scoring.candidate_ids =
        at::cat({at::tensor(std::vector<int64_t>{0, 2, 5, 6, vocab - 1}, at::kLong)
                     .expand({batch, kept, 5}),
                 at::randint(vocab, {batch, kept, 35}, gen, at::TensorOptions(at::kLong))},
                2);
  }
  return scoring;
}

struct Implementation {
  LossImplementation name;
  int64_t tile_bytes;
};

// The grid: fp32 and bf16; vocabularies of 1000 and 257 (no multiple of 128); LMHead with a bias
// and NormalizedLMHead; logits_to_keep 0, 4, -2 and a positions tensor; `default` and
// `fused_linear` with one tile, tiles of ~25 columns and of 128-column multiples; ignored
// labels, a label among tied logits, segment ids with gaps and -1.
TEST(LMHeadScoringTest, BothImplementationsMatchScoreLogitsOnFloat64Logits) {
  int checked = 0;
  for (const DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (const int64_t vocab : {int64_t{1000}, int64_t{257}}) {
      for (const LMHeadType type : {LMHeadType::kDefault, LMHeadType::kNormalized}) {
        LMHeadConfig config;
        config.name = type;
        config.dtype = dtype;
        std::unique_ptr<LMHead> head = ExactHead(config, vocab, vocab + checked);
        const at::Tensor x = ExactX(2, 6, ScalarTypeOf(dtype), checked);
        at::Tensor labels = at::randint(vocab, {2, 6}, at::kLong);
        labels[0][0] = kIgnore;
        labels[1][3] = kIgnore;
        labels[0][4] = 2;  // tied with 5, 6 and vocab - 1
        // Row 0: continuations 0 and 2 (1 absent), context at both ends; row 1: 2 and 0.
        const at::Tensor segments =
            at::tensor({-1, 0, 0, 2, 2, -1, 2, -1, 0, 0, 2, 2}, at::kLong).view({2, 6});
        for (const std::variant<int64_t, at::Tensor>& keep :
             std::vector<std::variant<int64_t, at::Tensor>>{
                 int64_t{0}, int64_t{4}, int64_t{-2},
                 at::tensor({5, 0, 3, 1, 1, 4}, at::kLong).view({2, 3})}) {
          const int64_t kept = KeptLength(keep, 6);
          for (const Implementation implementation :
               {Implementation{LossImplementation::kDefault, 0},
                Implementation{LossImplementation::kFusedLinear, 0},
                Implementation{LossImplementation::kFusedLinear, 700},
                Implementation{LossImplementation::kFusedLinear, 8192}}) {
            if (type == LMHeadType::kNormalized &&
                implementation.name != LossImplementation::kDefault) {
              continue;
            }
            const std::string what = absl::StrCat(
                Name(dtype), " V=", vocab, " ", type == LMHeadType::kNormalized ? "normalized" : "",
                " keep=", std::holds_alternative<int64_t>(keep) ? std::get<int64_t>(keep) : -99,
                " ", Name(implementation.name), " tile_bytes=", implementation.tile_bytes);
            ForwardOptions options;
            options.labels = labels;
            options.ignore_index = kIgnore;
            options.logits_to_keep = keep;
            options.loss_implementation = implementation.name;
            options.logit_tile_bytes = implementation.tile_bytes;
            options.return_argmax = checked % 3 == 0;
            if (checked % 2 == 1) options.return_logits = false;  // the default still scores
            options.scoring = AllOutputs(2, kept, vocab, checked, segments);
            absl::StatusOr<LMOutput> out = head->Forward(x, options);
            ASSERT_TRUE(out.ok()) << what << ": " << out.status();
            EXPECT_EQ(out->logits.has_value(),
                      implementation.name == LossImplementation::kDefault &&
                          options.return_logits != false)
                << what;
            ExpectSameScoring(out->scoring, Reference(*head, x, options), what);
            ++checked;
          }
        }
      }
    }
  }
  EXPECT_EQ(checked, 2 * 2 * 4 * 5);
}

// A NaN in the hidden states makes its position's logits NaN: its log-probabilities, entropy and
// the continuation it belongs to are NaN, as log_softmax gives; its rank is 1 and its top-k the
// lowest ids (NaN ranks first, as torch.argmax and torch.sort rank it); the other positions are
// untouched. Both implementations, against ScoreLogits on the float64 logits.
TEST(LMHeadScoringTest, NaNHiddenStatesGiveNaNScores) {
  std::unique_ptr<LMHead> head = ExactHead(LMHeadConfig{}, 300, 14);
  at::Tensor x = ExactX(2, 4, at::kFloat, 15);
  x.select(0, 0).select(0, 1).fill_(std::numeric_limits<float>::quiet_NaN());
  for (const LossImplementation implementation :
       {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
    const std::string what(Name(implementation));
    ForwardOptions options;
    options.labels = at::randint(300, {2, 4}, at::kLong);
    options.loss_implementation = implementation;
    options.logit_tile_bytes = 3000;  // several vocabulary tiles
    options.scoring =
        AllOutputs(2, 4, 300, 3, at::tensor({0, 0, 1, 1, 0, 0, 1, 1}, at::kLong).view({2, 4}));
    absl::StatusOr<LMOutput> out = head->Forward(x, options);
    ASSERT_TRUE(out.ok()) << what << ": " << out.status();
    const ScoringOutputs want = Reference(*head, x, options);
    const ScoringOutputs& got = out->scoring;
    for (const auto& [name, g, w] :
         {std::tuple{"label_logprobs", &got.label_logprobs, &want.label_logprobs},
          std::tuple{"entropy", &got.entropy, &want.entropy},
          std::tuple{"top_k_logprobs", &got.top_k_logprobs, &want.top_k_logprobs},
          std::tuple{"candidate_logprobs", &got.candidate_logprobs, &want.candidate_logprobs},
          std::tuple{"segment_logprob_sums", &got.segment_logprob_sums, &want.segment_logprob_sums},
          std::tuple{"segment_entropy_sums", &got.segment_entropy_sums,
                     &want.segment_entropy_sums}}) {
      ASSERT_TRUE(g->has_value() && w->has_value()) << what << ": " << name;
      EXPECT_TRUE(at::allclose((*g)->cpu(), (*w)->cpu(), 1e-5, 1e-4, /*equal_nan=*/true))
          << what << ": " << name << "\n"
          << **g << "\nvs\n"
          << **w;
    }
    EXPECT_TRUE(std::isnan(got.entropy->cpu()[0][1].item<float>())) << what;
    EXPECT_TRUE(std::isnan(got.segment_logprob_sums->cpu()[0][0].item<float>())) << what;
    for (const auto& [name, g, w] :
         {std::tuple{"label_rank", &got.label_rank, &want.label_rank},
          std::tuple{"top_k_ids", &got.top_k_ids, &want.top_k_ids},
          std::tuple{"segment_token_counts", &got.segment_token_counts, &want.segment_token_counts},
          std::tuple{"segment_is_greedy", &got.segment_is_greedy, &want.segment_is_greedy}}) {
      EXPECT_TRUE(at::equal((*g)->cpu(), (*w)->cpu())) << what << ": " << name << "\n"
                                                       << **g << "\nvs\n"
                                                       << **w;
    }
  }
}

// Entropy, top-k and candidates need no labels (the `default` path: logits only).
TEST(LMHeadScoringTest, ScoresWithoutLabels) {
  for (const LMHeadType type : {LMHeadType::kDefault, LMHeadType::kNormalized}) {
    LMHeadConfig config;
    config.name = type;
    std::unique_ptr<LMHead> head = ExactHead(config, 300, 4);
    const at::Tensor x = ExactX(3, 5, at::kFloat, 5);
    ForwardOptions options;
    options.logits_to_keep = int64_t{-1};
    options.scoring.entropy = true;
    options.scoring.top_k = 7;
    options.scoring.candidate_ids = at::tensor({299, 2, 5}, at::kLong);
    absl::StatusOr<LMOutput> out = head->Forward(x, options);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_TRUE(out->logits.has_value());
    ExpectSameScoring(out->scoring, Reference(*head, x, options), "no labels");
    EXPECT_EQ(out->scoring.top_k_ids->sizes(), (std::vector<int64_t>{3, 4, 7}));
    // Scoring outputs alone: return_logits=False is valid without labels when they are asked.
    options.return_logits = false;
    out = head->Forward(x, options);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_FALSE(out->logits.has_value());
    ExpectSameScoring(out->scoring, Reference(*head, x, options), "no labels, no logits");
  }
}

// G is 1 + the largest kept segment id: ids at dropped positions count for nothing (and need not
// be below S'), and with only -1 kept there is no segment.
TEST(LMHeadScoringTest, SegmentCountFollowsTheKeptPositions) {
  std::unique_ptr<LMHead> head = ExactHead(LMHeadConfig{}, 200, 6);
  const at::Tensor x = ExactX(2, 5, at::kFloat, 7);
  for (const LossImplementation implementation :
       {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
    ForwardOptions options;
    options.labels = at::randint(200, {2, 5}, at::kLong);
    options.loss_implementation = implementation;
    options.logits_to_keep = int64_t{3};
    options.scoring.segment_ids =
        at::tensor({40, 9, 0, 1, -1, 7, 7, -1, -1, 0}, at::kLong).view({2, 5});
    absl::StatusOr<LMOutput> out = head->Forward(x, options);
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->scoring.segment_token_counts->sizes(), (std::vector<int64_t>{2, 2}));
    EXPECT_TRUE(out->scoring.segment_token_counts->is_contiguous());
    ExpectSameScoring(out->scoring, Reference(*head, x, options),
                      std::string(Name(implementation)));
    options.logits_to_keep = at::tensor({4, 4, 2, 3}, at::kLong).view({2, 2});
    out = head->Forward(x, options);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->scoring.segment_logprob_sums->sizes(), (std::vector<int64_t>{2, 0}));
  }
}

// Forwards that keep no position (and an empty sequence) give empty outputs of the right shapes,
// on both implementations and through ForwardBatch.
TEST(LMHeadScoringTest, NoKeptPositions) {
  std::unique_ptr<LMHead> head = ExactHead(LMHeadConfig{}, 100, 8);
  for (const int64_t length : {int64_t{4}, int64_t{0}}) {
    for (const std::variant<int64_t, at::Tensor>& keep :
         std::vector<std::variant<int64_t, at::Tensor>>{int64_t{-9},
                                                        at::zeros({2, 0}, at::kLong)}) {
      for (const LossImplementation implementation :
           {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
        const std::string what = absl::StrCat("S=", length, " ", Name(implementation));
        ForwardItem item;
        item.x = ExactX(2, length, at::kFloat, 9);
        item.options.labels = at::zeros({2, length}, at::kLong);
        item.options.logits_to_keep = keep;
        item.options.loss_implementation = implementation;
        item.options.scoring = AllOutputs(2, 0, 100, 1, at::zeros({2, length}, at::kLong));
        const absl::StatusOr<LMOutput> out = head->Forward(item.x, item.options);
        ASSERT_TRUE(out.ok()) << what << ": " << out.status();
        EXPECT_EQ(out->scoring.label_rank->sizes(), (std::vector<int64_t>{2, 0})) << what;
        EXPECT_EQ(out->scoring.top_k_ids->sizes(), (std::vector<int64_t>{2, 0, 64})) << what;
        EXPECT_EQ(out->scoring.candidate_logprobs->sizes(), (std::vector<int64_t>{2, 0, 40}))
            << what;
        EXPECT_EQ(out->scoring.segment_token_counts->sizes(), (std::vector<int64_t>{2, 0})) << what;
        ExpectSameScoring(out->scoring, Reference(*head, item.x, item.options), what);
        const std::vector<absl::StatusOr<LMOutput>> batch = head->ForwardBatch({item, item});
        ASSERT_TRUE(batch[1].ok()) << what << ": " << batch[1].status();
        ExpectSameScoring(batch[1]->scoring, out->scoring, what);
      }
    }
  }
}

// fused_linear's loss, ce_loss, z_loss and argmax with scoring outputs (one pass for both) equal
// those without (ComputeLogitStats' pass) to fp32 rounding.
TEST(LMHeadScoringTest, FusedLossIsUnchangedByScoring) {
  LMHeadConfig config;
  config.layer_norm = LayerNormConfig{LayerNormType::kRms};
  absl::StatusOr<std::unique_ptr<LMHead>> head = LMHead::Build(config, 64, 1000, "cpu", 3);
  ASSERT_TRUE(head.ok());
  at::Generator gen = at::detail::createCPUGenerator(8);
  const at::Tensor x = at::randn({3, 7, 64}, gen);
  for (const LossReduction reduction : {LossReduction::kNone, LossReduction::kMean}) {
    for (const int64_t tile_bytes : {int64_t{0}, int64_t{5000}}) {
      ForwardOptions options;
      options.labels = at::randint(1000, {3, 7}, gen, at::TensorOptions(at::kLong));
      options.labels->index_put_({1, 2}, kIgnore);
      options.loss_implementation = LossImplementation::kFusedLinear;
      options.loss_reduction = reduction;
      options.z_loss_multiplier = 1e-3;
      options.return_argmax = true;
      options.logit_tile_bytes = tile_bytes;
      absl::StatusOr<LMOutput> without = (*head)->Forward(x, options);
      options.scoring.entropy = true;
      absl::StatusOr<LMOutput> with = (*head)->Forward(x, options);
      ASSERT_TRUE(without.ok() && with.ok());
      EXPECT_TRUE(without->scoring.entropy == std::nullopt);
      EXPECT_TRUE(with->scoring.entropy.has_value());
      EXPECT_TRUE(at::allclose(*with->loss, *without->loss, 1e-6, 1e-6));
      EXPECT_TRUE(at::allclose(*with->ce_loss, *without->ce_loss, 1e-6, 1e-6));
      EXPECT_TRUE(at::allclose(*with->z_loss, *without->z_loss, 1e-6, 1e-7));
      EXPECT_TRUE(at::equal(*with->argmax, *without->argmax));
      EXPECT_EQ(with->num_scored_tokens, 20);
    }
  }
}

// Ordinary (Gaussian) data through a layer norm: fused_linear's tiles and the default path's
// one GEMM round their logits differently. In fp32 that moves values by fp32 rounding; in bf16 a
// logit may round to its bf16 neighbour (2^-8 relative), which moves log-probabilities by up to
// that much and may reorder logits tied within it. So values are compared with those
// tolerances, and ids and ranks up to ties within them, against the default path's own logits.
TEST(LMHeadScoringTest, GaussianDataAgreesToRounding) {
  for (const DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(Name(dtype));
    const bool bf16 = dtype == DType::kBFloat16;
    LMHeadConfig config;
    config.dtype = dtype;
    config.layer_norm = LayerNormConfig{};
    absl::StatusOr<std::unique_ptr<LMHead>> head = LMHead::Build(config, 64, 1000, "cpu", 9);
    ASSERT_TRUE(head.ok());
    at::Generator gen = at::detail::createCPUGenerator(10);
    const at::Tensor x = at::randn({2, 9, 64}, gen).to(ScalarTypeOf(dtype));
    ForwardOptions options;
    options.labels = at::randint(1000, {2, 9}, gen, at::TensorOptions(at::kLong));
    options.labels->index_put_({0, 3}, kIgnore);
    options.scoring = AllOutputs(2, 9, 1000, 1, at::randint(-1, 4, {2, 9}, gen, at::kLong));
    absl::StatusOr<LMOutput> dflt = (*head)->Forward(x, options);
    options.loss_implementation = LossImplementation::kFusedLinear;
    options.logit_tile_bytes = 6000;
    absl::StatusOr<LMOutput> fused = (*head)->Forward(x, options);
    ASSERT_TRUE(dflt.ok() && fused.ok());
    const ScoringOutputs& got = fused->scoring;
    const ScoringOutputs& want = dflt->scoring;

    // The default path is ScoreLogits on its logits (the same computation: exactly).
    absl::StatusOr<ScoringOutputs> direct =
        ScoreLogits(*dflt->logits, options.labels, kIgnore, options.scoring);
    ASSERT_TRUE(direct.ok()) << direct.status();
    ExpectSameScoring(want, *direct, "default vs ScoreLogits", 0, 0);

    const double rtol = bf16 ? 1e-2 : 1e-5;
    const double atol = bf16 ? 4e-2 : 1e-5;
    ScoringOutputs values = got;
    values.label_rank = want.label_rank;
    values.top_k_ids = want.top_k_ids;
    values.segment_is_greedy = want.segment_is_greedy;
    ExpectSameScoring(values, want, "values", rtol, atol);

    // Ids and ranks: the same up to logits tied within `tolerance` of each other.
    const at::Tensor logits = dflt->logits->to(at::kDouble);  // (2, 9, V)
    const auto tolerance = [&](double logit) {
      return bf16 ? std::ldexp(std::abs(logit), -7) + 1e-3 : 1e-5 * (1 + std::abs(logit));
    };
    for (int64_t b = 0; b < 2; ++b) {
      for (int64_t s = 0; s < 9; ++s) {
        const at::Tensor row = logits[b][s];
        for (int64_t j = 0; j < options.scoring.top_k; ++j) {
          const double g = row[(*got.top_k_ids)[b][s][j].item<int64_t>()].item<double>();
          const double w = row[(*want.top_k_ids)[b][s][j].item<int64_t>()].item<double>();
          EXPECT_LE(std::abs(g - w), tolerance(w)) << b << ", " << s << " top " << j;
        }
        const int64_t label = (*options.labels)[b][s].item<int64_t>();
        const int64_t rank = (*got.label_rank)[b][s].item<int64_t>();
        if (label == kIgnore) {
          EXPECT_EQ(rank, 0);
          continue;
        }
        const double logit = row[label].item<double>();
        EXPECT_GE(rank, 1 + row.gt(logit + tolerance(logit)).sum().item<int64_t>()) << b << s;
        EXPECT_LE(rank, 1 + row.gt(logit - tolerance(logit)).sum().item<int64_t>()) << b << s;
      }
    }
    if (!bf16) {
      EXPECT_TRUE(at::equal(*got.top_k_ids, *want.top_k_ids));
      EXPECT_TRUE(at::equal(*got.label_rank, *want.label_rank));
    }
  }
}

// interrupt_check is polled between the scoring pass's tiles as between the loss's.
TEST(LMHeadScoringTest, InterruptCheckStopsBetweenScoringTiles) {
  std::unique_ptr<LMHead> head = ExactHead(LMHeadConfig{}, 300, 2);
  ForwardOptions options;
  options.labels = at::randint(300, {2, 4}, at::kLong);
  options.loss_implementation = LossImplementation::kFusedLinear;
  options.logit_tile_bytes = 2 * 300 * (4 + 24);  // 2 tokens x the vocabulary: 4 tiles
  options.scoring.top_k = 3;
  int checks = 0;
  options.interrupt_check = [&checks]() {
    return ++checks < 3 ? absl::OkStatus() : absl::DeadlineExceededError("deadline passed");
  };
  const at::Tensor x = ExactX(2, 4, at::kFloat, 3);
  EXPECT_EQ(head->Forward(x, options).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(checks, 3);  // before the compute, then before tiles 1 and 2
  options.interrupt_check = [&checks]() { return ++checks, absl::OkStatus(); };
  checks = 0;
  ASSERT_TRUE(head->Forward(x, options).ok());
  EXPECT_EQ(checks, 5);  // before the compute and before each of the 4 tiles
}

// ForwardBatch: every item's scoring outputs are Forward's (default items packed into one GEMM,
// fused_linear items asking for scoring into one scoring pass, with their own k, candidates,
// ignore_index and argmax), beside items that ask for none.
TEST(LMHeadScoringTest, ForwardBatchEqualsForwardPerItem) {
  for (const DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(Name(dtype));
    LMHeadConfig config;
    config.dtype = dtype;
    std::unique_ptr<LMHead> head = ExactHead(config, 257, 12);
    const at::ScalarType scalar_type = ScalarTypeOf(dtype);
    std::vector<ForwardItem> items;
    for (int i = 0; i < 8; ++i) {
      ForwardItem item;
      const int64_t batch = 1 + i % 2;
      const int64_t length = 3 + i % 4;
      item.x = ExactX(batch, length, scalar_type, 20 + i);
      ForwardOptions& o = item.options;
      o.loss_implementation =
          i < 4 ? LossImplementation::kDefault : LossImplementation::kFusedLinear;
      o.logit_tile_bytes = i % 2 == 0 ? 0 : 700;
      o.logits_to_keep = i % 3 == 0 ? std::variant<int64_t, at::Tensor>(int64_t{-1})
                                    : std::variant<int64_t, at::Tensor>(int64_t{0});
      const int64_t kept = KeptLength(o.logits_to_keep, length);
      if (i != 1) {  // item 1: no labels
        o.labels = at::randint(257, {batch, length}, at::kLong);
        o.labels->index_put_({0, 0}, kIgnore);
      }
      if (i == 3 || i == 7) {  // no scoring
      } else if (i == 1) {
        o.scoring.entropy = true;
        o.scoring.top_k = 5;
      } else {
        o.scoring = AllOutputs(batch, kept, 257, i,
                               at::randint(-1, kept, {batch, length}, at::kLong).clamp_max(1));
      }
      items.push_back(std::move(item));
    }
    // Packed fused_linear scoring items that differ in more than their outputs.
    items[5].options.return_argmax = true;
    items[6].options.ignore_index = -7;
    items[6].options.labels->index_put_({0, 0}, -7);
    items[6].options.z_loss_multiplier = 1e-3;
    items[6].options.loss_reduction = LossReduction::kNone;
    const std::vector<absl::StatusOr<LMOutput>> batch = head->ForwardBatch(items);
    ASSERT_EQ(batch.size(), items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      const std::string what = absl::StrCat("item ", i);
      const absl::StatusOr<LMOutput> solo = head->Forward(items[i].x, items[i].options);
      ASSERT_TRUE(solo.ok() && batch[i].ok()) << what << ": " << batch[i].status();
      EXPECT_EQ(batch[i]->scoring.label_logprobs.has_value(), i != 1 && i != 3 && i != 7);
      ExpectSameScoring(batch[i]->scoring, solo->scoring, what);
      EXPECT_EQ(batch[i]->num_scored_tokens, solo->num_scored_tokens) << what;
      if (solo->loss.has_value()) {
        EXPECT_TRUE(at::allclose(*batch[i]->loss, *solo->loss, 1e-5, 1e-6)) << what;
      }
      ASSERT_EQ(batch[i]->argmax.has_value(), solo->argmax.has_value()) << what;
      if (solo->argmax.has_value()) EXPECT_TRUE(at::equal(*batch[i]->argmax, *solo->argmax));
      ASSERT_EQ(batch[i]->z_loss.has_value(), solo->z_loss.has_value()) << what;
      if (solo->z_loss.has_value()) {
        EXPECT_TRUE(at::allclose(*batch[i]->z_loss, *solo->z_loss, 1e-5, 1e-6)) << what;
      }
    }
  }
}

// Every argument error of the scoring options, found by ValidateForward before any compute and
// returned by Forward, named by its field.
TEST(LMHeadScoringTest, ErrorsNameTheField) {
  std::unique_ptr<LMHead> head = ExactHead(LMHeadConfig{}, 37, 1);
  const at::Tensor x = ExactX(2, 3, at::kFloat, 1);
  const at::Tensor labels = at::randint(37, {2, 3}, at::kLong);
  const at::Tensor meta = at::zeros({3}, at::TensorOptions(at::kLong).device(at::kMeta));
  struct Case {
    std::function<void(ForwardOptions&)> set;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {[](ForwardOptions& o) { o.scoring.top_k = -1; }, "top_k: expected 0 (none) to 37, got -1"},
      {[](ForwardOptions& o) { o.scoring.top_k = 38; }, "top_k: expected 0 (none) to 37, got 38"},
      {[](ForwardOptions& o) { o.scoring.label_logprobs = true; },
       "scoring: label_logprobs needs labels"},
      {[](ForwardOptions& o) { o.scoring.label_rank = true; }, "scoring: label_rank needs labels"},
      {[](ForwardOptions& o) {
         o.scoring.segment_ids = at::zeros({2, 3}, at::kLong);
       },
       "scoring: segment_ids needs labels"},
      {[](ForwardOptions& o) { o.scoring.candidate_ids = at::zeros({2}, at::kInt); },
       "candidate_ids: expected int64 of shape (C,) or (2, 3, C) with C from 1 to 4096, got Int "
       "(2)"},
      {[](ForwardOptions& o) {
         o.scoring.candidate_ids = at::zeros({2, 3}, at::kLong);
       },
       "candidate_ids: expected int64 of shape (C,) or (2, 3, C) with C from 1 to 4096, got Long "
       "(2, 3)"},
      // Per position means per kept position: (B, S', C).
      {[](ForwardOptions& o) {
         o.logits_to_keep = int64_t{1};
         o.scoring.candidate_ids = at::zeros({2, 3, 4}, at::kLong);
       },
       "candidate_ids: expected int64 of shape (C,) or (2, 1, C) with C from 1 to 4096, got Long "
       "(2, 3, 4)"},
      {[](ForwardOptions& o) { o.scoring.candidate_ids = at::zeros({0}, at::kLong); },
       "candidate_ids: expected int64 of shape (C,) or (2, 3, C) with C from 1 to 4096, got Long "
       "(0)"},
      {[](ForwardOptions& o) {
         o.scoring.candidate_ids = at::zeros({2, 3, kMaxCandidates + 1}, at::kLong);
       },
       "candidate_ids: expected int64 of shape (C,) or (2, 3, C) with C from 1 to 4096, got Long "
       "(2, 3, 4097)"},
      {[](ForwardOptions& o) {
         o.scoring.candidate_ids = at::tensor({0, 37}, at::kLong);
       },
       "candidate_ids: token ids must lie in [0, 37), got 37"},
      {[](ForwardOptions& o) {
         o.scoring.candidate_ids = at::full({2, 3, 2}, -1, at::kLong);
       },
       "candidate_ids: token ids must lie in [0, 37), got -1"},
      {[&](ForwardOptions& o) { o.scoring.candidate_ids = meta; },
       "candidate_ids: must be on x's device (cpu) or on the CPU, got meta"},
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.scoring.segment_ids = at::zeros({2, 2}, at::kLong);
       },
       "segment_ids: expected int64 of shape (2, 3), got Long (2, 2)"},
      // (B, S) like labels, also when logits_to_keep keeps fewer.
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.logits_to_keep = int64_t{1};
         o.scoring.segment_ids = at::zeros({2, 1}, at::kLong);
       },
       "segment_ids: expected int64 of shape (2, 3), got Long (2, 1)"},
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.scoring.segment_ids = at::zeros({2, 3}, at::kInt);
       },
       "segment_ids: expected int64 of shape (2, 3), got Int (2, 3)"},
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.scoring.segment_ids = at::tensor({0, 0, -2, 0, 1, 1}, at::kLong).view({2, 3});
       },
       "segment_ids: kept positions' ids must lie in [-1, 3), got -2"},
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.scoring.segment_ids = at::tensor({0, 0, 3, 0, 1, 1}, at::kLong).view({2, 3});
       },
       "segment_ids: kept positions' ids must lie in [-1, 3), got 3"},
      // At most one continuation per kept position.
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.logits_to_keep = at::tensor({2, 0}, at::kLong).view({2, 1});
         o.scoring.segment_ids = at::tensor({0, 0, 1, 0, 0, 0}, at::kLong).view({2, 3});
       },
       "segment_ids: kept positions' ids must lie in [-1, 1), got 1"},
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.scoring.segment_ids = at::zeros({2, 3}, meta.options());
       },
       "segment_ids: must be on x's device (cpu) or on the CPU, got meta"},
  };
  for (const Case& c : cases) {
    ForwardOptions options;
    c.set(options);
    EXPECT_EQ(head->ValidateForward(x, options), absl::InvalidArgumentError(c.expected));
    absl::StatusOr<LMOutput> out = head->Forward(x, options);
    EXPECT_EQ(out.status(), absl::InvalidArgumentError(c.expected));
  }
  // Ids at positions logits_to_keep drops are never summed: accepted, as labels there.
  ForwardOptions options;
  options.labels = labels;
  options.logits_to_keep = int64_t{1};
  options.scoring.segment_ids = at::tensor({-7, 99, 0, 5, 5, -1}, at::kLong).view({2, 3});
  EXPECT_TRUE(head->Forward(x, options).ok());
  // NormalizedLMHead has no fused_linear, with scoring outputs or without.
  LMHeadConfig normalized;
  normalized.name = LMHeadType::kNormalized;
  options.loss_implementation = LossImplementation::kFusedLinear;
  EXPECT_EQ(ExactHead(normalized, 37, 1)->Forward(x, options).status().code(),
            absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace lmhead

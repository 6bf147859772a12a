// Unit tests of the heads against fp64 references written here; the parity suite
// (tests/parity) compares with olmo_core itself over a larger grid.
#include "core/lm_head.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kD = 16;
constexpr int64_t kV = 37;  // not a multiple of any tile

std::unique_ptr<LMHead> MakeHead(LMHeadConfig config, uint64_t seed = 1) {
  absl::StatusOr<std::unique_ptr<LMHead>> head = LMHead::Build(config, kD, kV, "cpu", seed);
  EXPECT_TRUE(head.ok()) << head.status();
  return *std::move(head);
}

at::Tensor RandomLabels(int64_t b, int64_t s, int64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randint(kV, {b, s}, gen, at::TensorOptions().dtype(at::kLong));
}

at::Tensor RandomX(int64_t b, int64_t s, int64_t seed, at::ScalarType dtype = at::kFloat) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn({b, s, kD}, gen, at::TensorOptions().dtype(at::kFloat)).to(dtype);
}

// Per-token cross-entropy and lse in fp64 from x, W, b.
std::pair<at::Tensor, at::Tensor> ReferenceCeLse(const at::Tensor& x, const LMHead& head,
                                                 const at::Tensor& labels) {
  const auto& params = head.NamedParameters();
  at::Tensor w, b;
  for (const auto& [name, t] : params) {
    if (name == "w_out.weight") w = t.to(at::kDouble);
    if (name == "w_out.bias") b = t.to(at::kDouble);
  }
  at::Tensor logits = at::matmul(x.to(at::kDouble).reshape({-1, kD}), w.t());
  if (b.defined()) logits = logits + b;
  const at::Tensor lse = at::logsumexp(logits, {1});
  const at::Tensor y = labels.reshape({-1});
  const at::Tensor safe = at::where(y.ge(0), y, at::zeros_like(y));
  const at::Tensor picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1);
  return {lse - picked, lse};
}

double RelError(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kDouble) - want).norm().item<double>() /
         std::max(want.norm().item<double>(), 1e-30);
}

TEST(LMHeadTest, StateDictNamesMatchOlmoCore) {
  LMHeadConfig config;
  config.layer_norm = LayerNormConfig{LayerNormType::kRms};
  auto head = MakeHead(config);
  std::vector<std::string> names;
  for (const auto& [name, t] : head->NamedParameters()) names.push_back(name);
  EXPECT_THAT(names,
              ::testing::ElementsAre("norm.weight", "norm.bias", "w_out.weight", "w_out.bias"));
  EXPECT_EQ(head->NumFlopsPerToken(), 6 * config.NumParams(kD, kV));

  LMHeadConfig normalized;
  normalized.name = LMHeadType::kNormalized;
  auto nhead = MakeHead(normalized);
  names.clear();
  for (const auto& [name, t] : nhead->NamedParameters()) names.push_back(name);
  EXPECT_THAT(names, ::testing::ElementsAre("w_out.weight", "sz"));
  // sz = fl(1/sqrt(D)) after reset.
  EXPECT_FLOAT_EQ(nhead->NamedParameters()[1].second[0].item<float>(),
                  static_cast<float>(1.0 / std::sqrt(16.0)));
}

TEST(LMHeadTest, DefaultInitIsBoundedUniform) {
  auto head = MakeHead(LMHeadConfig{});
  const at::Tensor w = head->NamedParameters()[0].second;
  EXPECT_LE(w.abs().max().item<double>(), 1.0 / std::sqrt(double{kD}));
  EXPECT_GT(w.std().item<double>(), 0.1);  // U(-0.25, 0.25) has std 0.144
  auto same = MakeHead(LMHeadConfig{});
  EXPECT_TRUE(at::equal(w, same->NamedParameters()[0].second));
}

TEST(LMHeadTest, LoadStateDictAcceptsOlmoPrefixedAndHuggingFaceNames) {
  LMHeadConfig config;
  config.layer_norm = LayerNormConfig{LayerNormType::kRms};
  config.layer_norm->bias = false;
  auto head = MakeHead(config);
  const at::Tensor w = at::full({kV, kD}, 0.5);
  const at::Tensor b = at::full({kV}, -1.0);
  const at::Tensor n = at::full({kD}, 2.0);
  ASSERT_TRUE(
      head->LoadStateDict({{"lm_head.weight", w}, {"lm_head.bias", b}, {"model.norm.weight", n}})
          .ok());
  EXPECT_TRUE(at::equal(head->NamedParameters()[0].second, n));
  ASSERT_TRUE(
      head->LoadStateDict(
              {{"lm_head.w_out.weight", w * 2}, {"w_out.bias", b}, {"lm_head.norm.weight", n}})
          .ok());
  EXPECT_TRUE(at::equal(head->NamedParameters()[1].second, w * 2));
}

TEST(LMHeadTest, LoadStateDictNamesTheBadKey) {
  auto head = MakeHead(LMHeadConfig{});
  const at::Tensor w = at::zeros({kV, kD});
  const at::Tensor b = at::zeros({kV});
  struct Case {
    std::map<std::string, at::Tensor> tensors;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {{{"w_out.weight", w}}, "missing key 'w_out.bias'"},
      {{{"w_out.weight", w}, {"w_out.bias", b}, {"norm.weight", b}},
       "unexpected key 'norm.weight'"},
      {{{"w_out.weight", w.t()}, {"w_out.bias", b}}, "key 'w_out.weight': expected shape [37, 16]"},
      {{{"w_out.weight", w}, {"w_out.bias", b.to(at::kBFloat16)}},
       "key 'w_out.bias': expected dtype Float, got BFloat16"},
      {{{"w_out.weight", w}, {"lm_head.weight", w}, {"w_out.bias", b}}, "both give 'w_out.weight'"},
  };
  for (const Case& c : cases) {
    absl::Status status = head->LoadStateDict(c.tensors);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(status.message(), HasSubstr(c.expected));
  }
}

TEST(LMHeadTest, LogitsMatchFp64) {
  auto head = MakeHead(LMHeadConfig{});
  const at::Tensor x = RandomX(2, 5, 3);
  absl::StatusOr<LMOutput> out = head->Forward(x, {});
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_FALSE(out->has_loss());
  ASSERT_TRUE(out->logits.has_value());
  EXPECT_EQ(out->logits->sizes(), (std::vector<int64_t>{2, 5, kV}));
  const auto& p = head->NamedParameters();
  const at::Tensor want =
      at::matmul(x.to(at::kDouble), p[0].second.to(at::kDouble).t()) + p[1].second.to(at::kDouble);
  EXPECT_LT(RelError(*out->logits, want), 1e-6);
}

TEST(LMHeadTest, LossesMatchFp64ForBothImplementations) {
  auto head = MakeHead(LMHeadConfig{});
  const at::Tensor x = RandomX(3, 7, 4);
  at::Tensor labels = RandomLabels(3, 7, 5);
  labels.index_put_({0, 2}, -100);
  labels.index_put_({2}, -100);  // a fully ignored row
  const auto [ce_ref, lse_ref] = ReferenceCeLse(x, *head, labels);
  const at::Tensor valid = labels.reshape({-1}).ne(-100);
  const double n = valid.sum().item<double>();
  const double ce_sum = at::where(valid, ce_ref, at::zeros_like(ce_ref)).sum().item<double>();
  const double z_sum =
      at::where(valid, lse_ref * lse_ref, at::zeros_like(lse_ref)).sum().item<double>();

  for (LossImplementation impl : {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
    for (int64_t tile_bytes : {int64_t{1}, int64_t{128} << 20}) {  // 1 token per tile, or all
      ForwardOptions options;
      options.labels = labels;
      options.loss_implementation = impl;
      options.z_loss_multiplier = 1e-3;
      options.logit_tile_bytes = tile_bytes;
      options.loss_reduction = LossReduction::kSum;
      absl::StatusOr<LMOutput> out = head->Forward(x, options);
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_NEAR(out->ce_loss->item<double>(), ce_sum, 1e-4 * std::abs(ce_sum));
      EXPECT_NEAR(out->z_loss->item<double>(), 1e-3 * z_sum, 1e-4 * z_sum * 1e-3);
      EXPECT_NEAR(out->loss->item<double>(), ce_sum + 1e-3 * z_sum, 1e-4 * std::abs(ce_sum));
      EXPECT_EQ(out->logits.has_value(), impl == LossImplementation::kDefault);

      options.loss_reduction = LossReduction::kMean;
      options.loss_div_factor = 2.0;
      out = head->Forward(x, options);
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_NEAR(out->ce_loss->item<double>(), ce_sum / n / 2, 1e-4);
      EXPECT_NEAR(out->loss->item<double>(), (ce_sum + 1e-3 * z_sum) / n / 2, 1e-4);
    }
  }
}

TEST(LMHeadTest, ReductionNoneShapesAndMasking) {
  auto head = MakeHead(LMHeadConfig{});
  const at::Tensor x = RandomX(2, 4, 6);
  at::Tensor labels = RandomLabels(2, 4, 7);
  labels.index_put_({1, 3}, -100);
  ForwardOptions options;
  options.labels = labels;
  options.loss_reduction = LossReduction::kNone;
  options.z_loss_multiplier = 1e-4;
  absl::StatusOr<LMOutput> dflt = head->Forward(x, options);
  options.loss_implementation = LossImplementation::kFusedLinear;
  absl::StatusOr<LMOutput> fused = head->Forward(x, options);
  ASSERT_TRUE(dflt.ok() && fused.ok());
  EXPECT_EQ(dflt->loss->sizes(), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(fused->loss->sizes(), (std::vector<int64_t>{2, 4}));
  // Default z is unmasked at the ignored position; fused masks it (docs/SPEC.md §9.1, item 3).
  EXPECT_GT(dflt->z_loss->index({1, 3}).item<double>(), 0.0);
  EXPECT_EQ(fused->z_loss->index({1, 3}).item<double>(), 0.0);
  EXPECT_EQ(dflt->ce_loss->index({1, 3}).item<double>(), 0.0);
  EXPECT_TRUE(at::allclose(dflt->ce_loss->index({0}), fused->ce_loss->index({0}), 1e-5, 1e-6));
}

TEST(LMHeadTest, FusedAddsHiddenZLossWithoutMultiplier) {
  auto head = MakeHead(LMHeadConfig{});
  const at::Tensor x = RandomX(2, 3, 8);
  const at::Tensor labels = RandomLabels(2, 3, 9);
  const auto [ce_ref, lse_ref] = ReferenceCeLse(x, *head, labels);
  ForwardOptions options;
  options.labels = labels;
  options.loss_reduction = LossReduction::kSum;
  options.loss_implementation = LossImplementation::kFusedLinear;
  absl::StatusOr<LMOutput> out = head->Forward(x, options);
  ASSERT_TRUE(out.ok());
  EXPECT_FALSE(out->z_loss.has_value());
  const double want = (ce_ref + 1e-4 * lse_ref * lse_ref).sum().item<double>();
  EXPECT_NEAR(out->loss->item<double>(), want, 1e-4);
  EXPECT_EQ(out->ce_loss->item<double>(), out->loss->item<double>());
}

TEST(LMHeadTest, AllIgnoredMeanIsNanForDefaultAndZeroForFused) {
  auto head = MakeHead(LMHeadConfig{});
  const at::Tensor x = RandomX(2, 3, 10);
  ForwardOptions options;
  options.labels = at::full({2, 3}, -100, at::TensorOptions().dtype(at::kLong));
  options.z_loss_multiplier = 1e-4;
  absl::StatusOr<LMOutput> dflt = head->Forward(x, options);
  options.loss_implementation = LossImplementation::kFusedLinear;
  absl::StatusOr<LMOutput> fused = head->Forward(x, options);
  ASSERT_TRUE(dflt.ok() && fused.ok());
  EXPECT_TRUE(std::isnan(dflt->loss->item<double>()));
  EXPECT_TRUE(std::isnan(dflt->z_loss->item<double>()));
  EXPECT_EQ(fused->loss->item<double>(), 0.0);
  EXPECT_EQ(fused->z_loss->item<double>(), 0.0);
}

TEST(LMHeadTest, LogitsToKeepFollowsPythonSlicesAndGathers) {
  auto head = MakeHead(LMHeadConfig{});
  const at::Tensor x = RandomX(2, 5, 11);
  absl::StatusOr<LMOutput> full = head->Forward(x, {});
  ASSERT_TRUE(full.ok());
  const std::vector<std::pair<int64_t, std::pair<int64_t, int64_t>>> cases = {
      {0, {0, 5}}, {2, {3, 5}}, {9, {0, 5}}, {-2, {2, 5}}, {-7, {5, 5}}};
  for (const auto& [k, range] : cases) {
    ForwardOptions options;
    options.logits_to_keep = k;
    absl::StatusOr<LMOutput> out = head->Forward(x, options);
    ASSERT_TRUE(out.ok());
    // Sliced inputs give the GEMM another shape, so equal up to rounding.
    const at::Tensor want = full->logits->slice(1, range.first, range.second);
    EXPECT_EQ(out->logits->sizes(), want.sizes()) << "k=" << k;
    EXPECT_TRUE(at::allclose(*out->logits, want, 1e-5, 1e-6)) << "k=" << k;
  }
  ForwardOptions options;
  const at::Tensor positions = at::tensor({4, 0, 1, 1}, at::kLong).view({2, 2});
  options.logits_to_keep = positions;
  absl::StatusOr<LMOutput> gathered = head->Forward(x, options);
  ASSERT_TRUE(gathered.ok());
  EXPECT_TRUE(at::allclose(gathered->logits->index({0, 0}), full->logits->index({0, 4})));
  EXPECT_TRUE(at::allclose(gathered->logits->index({1, 1}), full->logits->index({1, 1})));
}

TEST(LMHeadTest, ForwardErrorsNameTheArgument) {
  auto head = MakeHead(LMHeadConfig{});
  const at::Tensor x = RandomX(2, 3, 12);
  const at::Tensor labels = RandomLabels(2, 3, 13);
  struct Case {
    std::function<void(ForwardOptions&)> set;
    at::Tensor x;
    absl::StatusCode code;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {[](ForwardOptions& o) { o.return_logits = false; }, x, absl::StatusCode::kInvalidArgument,
       "return_logits: 'return_logits=False' is only valid when 'labels' is provided"},
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.loss_implementation = LossImplementation::kFusedLinear;
         o.return_logits = true;
       },
       x, absl::StatusCode::kInvalidArgument,
       "return_logits: 'return_logits=True' is not compatible 'fused_linear' loss "
       "implementation"},
      {[&](ForwardOptions& o) { o.labels = labels + kV; }, x, absl::StatusCode::kInvalidArgument,
       "labels: values must lie in [0, vocab_size=37)"},
      {[&](ForwardOptions& o) { o.labels = labels.slice(1, 0, 2); }, x,
       absl::StatusCode::kInvalidArgument, "labels: expected int64 of shape (batch=2, seq_len=3)"},
      {[&](ForwardOptions& o) { o.labels = labels.to(at::kInt); }, x,
       absl::StatusCode::kInvalidArgument, "labels: expected int64"},
      {[](ForwardOptions& o) {
         o.logits_to_keep = at::tensor({0, 3}, at::kLong).view({2, 1});
       },
       x, absl::StatusCode::kInvalidArgument,
       "logits_to_keep: positions must lie in [0, seq_len=3)"},
      {[](ForwardOptions& o) {
         o.logits_to_keep = at::tensor({0, 1}, at::kLong).view({1, 2});
       },
       x, absl::StatusCode::kInvalidArgument,
       "logits_to_keep: a positions tensor must be int64 of shape (batch=2, K)"},
      {[](ForwardOptions&) {}, x.to(at::kBFloat16), absl::StatusCode::kInvalidArgument,
       "x: dtype BFloat16 does not match the head's dtype Float"},
      {[](ForwardOptions&) {}, x.slice(2, 0, 8), absl::StatusCode::kInvalidArgument,
       "x: expected shape (batch, seq_len, d_model=16)"},
      {[&](ForwardOptions& o) {
         o.labels = labels.slice(0, 0, 0);
         o.loss_reduction = LossReduction::kNone;
       },
       x.slice(0, 0, 0), absl::StatusCode::kInvalidArgument,
       "loss_reduction: 'none' needs a non-empty batch"},
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.loss_reduction = LossReduction::kNone;  // (2, 3) losses do not broadcast with (5,)
         o.loss_div_factor = at::ones({5});
       },
       x, absl::StatusCode::kInvalidArgument,
       "loss_div_factor: shape [5] does not broadcast against the losses' shape [2, 3]"},
      // Issue 11: these reached LibTorch's "The size of tensor a (2) must match ...".
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.loss_reduction = LossReduction::kNone;
         o.loss_div_factor = at::ones({3, 1});
       },
       x, absl::StatusCode::kInvalidArgument,
       "loss_div_factor: shape [3, 1] does not broadcast against the losses' shape [2, 3]"},
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.loss_reduction = LossReduction::kNone;
         o.loss_div_factor = at::ones({2, 4});
       },
       x, absl::StatusCode::kInvalidArgument,
       "loss_div_factor: shape [2, 4] does not broadcast against the losses' shape [2, 3]"},
      {[&](ForwardOptions& o) {
         o.labels = labels;
         o.loss_div_factor = at::ones({2}, at::kLong);
       },
       x, absl::StatusCode::kInvalidArgument,
       "loss_div_factor: a tensor divisor must be floating point"},
  };
  for (const Case& c : cases) {
    ForwardOptions options;
    c.set(options);
    // Found by the checks, before any compute, and named by the argument.
    EXPECT_THAT(std::string(head->ValidateForward(c.x, options).message()),
                ::testing::StartsWith(c.expected));
    absl::StatusOr<LMOutput> out = head->Forward(c.x, options);
    ASSERT_FALSE(out.ok()) << c.expected;
    EXPECT_EQ(out.status().code(), c.code) << out.status();
    EXPECT_THAT(std::string(out.status().message()), ::testing::StartsWith(c.expected));
  }
  // Out-of-range labels at positions logits_to_keep drops are never scored: accepted.
  ForwardOptions options;
  options.labels = labels.clone();
  options.labels->index_put_({0, 0}, 1000);
  options.logits_to_keep = int64_t{2};
  EXPECT_TRUE(head->Forward(x, options).ok());
}

// LossOutputs describes, from shapes alone, exactly the loss outputs Forward returns.
TEST(LMHeadTest, LossOutputsMatchWhatForwardReturns) {
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    LMHeadConfig config;
    config.dtype = dtype == at::kFloat ? DType::kFloat32 : DType::kBFloat16;
    auto head = MakeHead(config);
    const at::Tensor x = RandomX(2, 3, 21, dtype);
    const at::Tensor labels = RandomLabels(2, 3, 22);
    for (const LossImplementation implementation :
         {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
      for (const LossReduction reduction :
           {LossReduction::kMean, LossReduction::kSum, LossReduction::kNone}) {
        for (const std::optional<double> z :
             {std::optional<double>(), std::optional<double>(1e-3)}) {
          for (int divisor = 0; divisor < 5; ++divisor) {
            ForwardOptions options;
            options.labels = labels;
            options.loss_implementation = implementation;
            options.loss_reduction = reduction;
            options.z_loss_multiplier = z;
            options.logits_to_keep = int64_t{2};
            if (divisor == 1) options.loss_div_factor = 2.0;
            if (divisor == 2) options.loss_div_factor = at::full({}, 2.0, at::kBFloat16);
            if (divisor == 3) options.loss_div_factor = at::full({2, 1}, 2.0, at::kHalf);
            if (divisor == 4) options.loss_div_factor = at::full({3, 1, 1}, 2.0, at::kDouble);
            const std::string what =
                absl::StrCat(c10::toString(dtype), " ", Name(implementation), " ", Name(reduction),
                             " z=", z.has_value(), " divisor=", divisor);
            absl::StatusOr<LossOutputSpec> spec = LossOutputs(head->config(), 2, 2, options);
            ASSERT_TRUE(spec.ok()) << what << ": " << spec.status();
            absl::StatusOr<LMOutput> out = head->Forward(x, options);
            ASSERT_TRUE(out.ok()) << what << ": " << out.status();
            EXPECT_EQ(out->loss->sizes(), at::IntArrayRef(spec->shape)) << what;
            EXPECT_EQ(out->ce_loss->sizes(), at::IntArrayRef(spec->shape)) << what;
            EXPECT_EQ(out->loss->scalar_type(), spec->loss_dtype) << what;
            EXPECT_EQ(out->ce_loss->scalar_type(), spec->ce_loss_dtype) << what;
            ASSERT_EQ(out->z_loss.has_value(), spec->z_loss_dtype.has_value()) << what;
            if (out->z_loss.has_value()) {
              EXPECT_EQ(out->z_loss->sizes(), at::IntArrayRef(spec->shape)) << what;
              EXPECT_EQ(out->z_loss->scalar_type(), *spec->z_loss_dtype) << what;
            }
          }
        }
      }
    }
  }
}

TEST(LMHeadTest, InterruptCheckStopsBetweenLogitTiles) {
  auto head = MakeHead(LMHeadConfig{});
  const at::Tensor x = RandomX(2, 8, 21);
  ForwardOptions options;
  options.labels = RandomLabels(2, 8, 22);
  options.loss_implementation = LossImplementation::kFusedLinear;
  options.logit_tile_bytes = 4 * kV * 12;  // 4 tokens a tile: 4 tiles
  int checks = 0;
  options.interrupt_check = [&checks]() {
    return ++checks < 3 ? absl::OkStatus() : absl::DeadlineExceededError("deadline passed");
  };
  absl::StatusOr<LMOutput> out = head->Forward(x, options);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(checks, 3);  // before the compute, then before tiles 1 and 2

  options.interrupt_check = [&checks]() { return ++checks, absl::OkStatus(); };
  checks = 0;
  out = head->Forward(x, options);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(checks, 5);  // before the compute and before each of the 4 tiles
  options.interrupt_check = []() { return absl::CancelledError("client went away"); };
  options.loss_implementation = LossImplementation::kDefault;
  EXPECT_EQ(head->Forward(x, options).status().code(), absl::StatusCode::kCancelled);
}

// return_argmax: every implementation and path picks what torch.argmax picks on the logits, across
// vocabulary tiles: the first of exactly tied maxima (integer data, so the logits are exact in
// any summation order), and id 0 for an all-NaN row.
TEST(LMHeadTest, ReturnArgmaxIsTorchArgmaxAcrossTiles) {
  LMHeadConfig config;
  config.bias = false;
  std::unique_ptr<LMHead> head = MakeHead(config);
  at::Generator gen = at::detail::createCPUGenerator(5);
  at::Tensor w = at::randint(-2, 3, {kV, kD}, gen, at::TensorOptions(at::kFloat));
  for (const int64_t tied : {4, 20, 33}) w[tied].fill_(3);  // the maximum for positive x
  ASSERT_TRUE(head->LoadStateDict({{"w_out.weight", w}}).ok());
  at::Tensor x = at::randint(1, 4, {2, 5, kD}, gen, at::TensorOptions(at::kFloat));
  x[1][2].fill_(std::numeric_limits<float>::quiet_NaN());
  at::Tensor labels = RandomLabels(2, 5, 3);
  labels[0][1] = -100;

  ForwardOptions logits_only;
  const at::Tensor logits = *head->Forward(x, logits_only)->logits;
  const at::Tensor expected = logits.argmax(-1);
  ASSERT_EQ(expected[0][0].item<int64_t>(), 4);
  ASSERT_EQ(expected[1][2].item<int64_t>(), 0);

  logits_only.return_argmax = true;
  absl::StatusOr<LMOutput> without_labels = head->Forward(x, logits_only);
  ASSERT_TRUE(without_labels.ok()) << without_labels.status();
  EXPECT_TRUE(at::equal(*without_labels->argmax, expected));
  for (LossImplementation impl : {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
    // 0: one tile; 400 bytes: tiles of a few tokens x a few columns, the tie split across them.
    for (const int64_t tile_bytes : {int64_t{0}, int64_t{400}}) {
      SCOPED_TRACE(absl::StrCat(Name(impl), " tile_bytes=", tile_bytes));
      ForwardOptions options;
      options.labels = labels;
      options.loss_implementation = impl;
      options.logit_tile_bytes = tile_bytes;
      options.return_argmax = true;
      options.logits_to_keep = int64_t{-1};
      absl::StatusOr<LMOutput> out = head->Forward(x, options);
      ASSERT_TRUE(out.ok()) << out.status();
      ASSERT_TRUE(out->argmax.has_value());
      EXPECT_EQ(out->argmax->scalar_type(), at::kLong);
      EXPECT_TRUE(at::equal(*out->argmax, expected.slice(1, 1))) << *out->argmax;
    }
  }
  ForwardOptions not_asked;
  not_asked.labels = labels;
  EXPECT_FALSE(head->Forward(x, not_asked)->argmax.has_value());
}

TEST(KeptStartTest, PythonSliceSemanticsForEveryInt64) {
  EXPECT_EQ(KeptStart(0, 5), 0);
  EXPECT_EQ(KeptStart(2, 5), 3);
  EXPECT_EQ(KeptStart(5, 5), 0);
  EXPECT_EQ(KeptStart(9, 5), 0);
  EXPECT_EQ(KeptStart(-2, 5), 2);
  EXPECT_EQ(KeptStart(-5, 5), 5);
  EXPECT_EQ(KeptStart(-7, 5), 5);
  EXPECT_EQ(KeptStart(std::numeric_limits<int64_t>::max(), 5), 0);
  EXPECT_EQ(KeptStart(std::numeric_limits<int64_t>::min(), 5), 5);  // found by the random test
  EXPECT_EQ(KeptStart(-1, 0), 0);
}

TEST(NormalizedLMHeadTest, ScalesByEffectiveSzAndRefusesFused) {
  LMHeadConfig config;
  config.name = LMHeadType::kNormalized;
  auto head = MakeHead(config);
  const at::Tensor x = RandomX(1, 2, 14);
  absl::StatusOr<LMOutput> out = head->Forward(x, {});
  ASSERT_TRUE(out.ok());
  // At init sz * sqrt(D) == 1, so logits are x W^T.
  const at::Tensor w = head->NamedParameters()[0].second;
  EXPECT_TRUE(at::allclose(*out->logits, at::matmul(x, w.t()), 1e-5, 1e-6));

  ForwardOptions options;
  options.labels = RandomLabels(1, 2, 15);
  options.loss_implementation = LossImplementation::kFusedLinear;
  absl::StatusOr<LMOutput> fused = head->Forward(x, options);
  EXPECT_EQ(fused.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(
      std::string(fused.status().message()),
      ::testing::StartsWith("loss_implementation: 'fused_linear' loss implementation is not "
                            "supported by 'NormalizedLMHead'"));
  // Logits-only calls work with fused_linear configured.
  options.labels.reset();
  EXPECT_TRUE(head->Forward(x, options).ok());
}

TEST(NormalizedLMHeadTest, NormalizeMatricesGivesUnitRows) {
  LMHeadConfig config;
  config.name = LMHeadType::kNormalized;
  auto head = MakeHead(config);
  ASSERT_TRUE(head->NormalizeMatrices().ok());
  const at::Tensor norms = head->NamedParameters()[0].second.norm(2, {1});
  EXPECT_TRUE(at::allclose(norms, at::ones_like(norms), 1e-5, 1e-6));
  EXPECT_EQ(MakeHead(LMHeadConfig{})->NormalizeMatrices().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(LMHeadTest, BuildsOnMetaAndRejectsBadArguments) {
  LMHeadConfig config;
  config.layer_norm = LayerNormConfig{};
  absl::StatusOr<std::unique_ptr<LMHead>> meta = LMHead::Build(config, 4096, 100352, "meta");
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_TRUE((*meta)->device().is_meta());
  EXPECT_EQ(LMHead::Build(config, 0, 10).status().code(), absl::StatusCode::kInvalidArgument);
  absl::Status bad_device = LMHead::Build(config, 4, 10, "tpu:7").status();
  EXPECT_EQ(bad_device.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_device.message(), HasSubstr("device"));
}

}  // namespace
}  // namespace lmhead

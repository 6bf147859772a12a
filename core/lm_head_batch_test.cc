// LMHead::ForwardBatch against Forward, item by item, over a grid of heads and forward options;
// and LMOutput::num_scored_tokens against a count made here.
#include <ATen/ATen.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/lm_head.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

constexpr int64_t kD = 16;
constexpr int64_t kV = 37;  // not a multiple of any tile

std::unique_ptr<LMHead> MakeHead(LMHeadConfig config, uint64_t seed = 1) {
  absl::StatusOr<std::unique_ptr<LMHead>> head = LMHead::Build(config, kD, kV, "cpu", seed);
  EXPECT_TRUE(head.ok()) << head.status();
  return *std::move(head);
}

// The heads of the grid: LMHead without and with a norm, with and without bias, and
// NormalizedLMHead, each in `dtype`.
std::vector<std::pair<std::string, LMHeadConfig>> Heads(DType dtype) {
  std::vector<std::pair<std::string, LMHeadConfig>> heads;
  LMHeadConfig plain;
  plain.dtype = dtype;
  heads.emplace_back("bias, no norm", plain);
  LMHeadConfig rms = plain;
  rms.layer_norm = LayerNormConfig{LayerNormType::kRms};
  rms.bias = false;
  heads.emplace_back("rms norm, no bias", rms);
  LMHeadConfig layer_norm = plain;
  layer_norm.layer_norm = LayerNormConfig{};
  heads.emplace_back("layer norm, bias", layer_norm);
  LMHeadConfig normalized;
  normalized.name = LMHeadType::kNormalized;
  normalized.dtype = dtype;
  heads.emplace_back("normalized", normalized);
  return heads;
}

// The kept labels, counted here without the head's helpers.
int64_t ScoredCount(const ForwardOptions& options) {
  if (!options.labels.has_value()) return 0;
  const at::Tensor& labels = *options.labels;
  at::Tensor kept;
  if (const auto* positions = std::get_if<at::Tensor>(&options.logits_to_keep)) {
    kept = labels.gather(1, *positions);
  } else {
    const int64_t length = labels.size(1);
    kept = labels.slice(1, KeptStart(std::get<int64_t>(options.logits_to_keep), length), length);
  }
  return kept.ne(options.ignore_index).sum().item<int64_t>();
}

// Equal values, NaN at the same places counting as equal.
bool BitEqual(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  if (!at::isFloatingType(a.scalar_type())) return at::equal(a, b);
  return at::equal(a.isnan(), b.isnan()) &&
         at::equal(at::where(a.isnan(), 0, a), at::where(b.isnan(), 0, b));
}

// Tolerances by the output's dtype: fp32 outputs of an fp32 head are tight; a bf16 head's fp32
// losses come from bf16 logits that may differ in their last bit; bf16 outputs by a few ulps.
bool Close(const at::Tensor& got, const at::Tensor& want, at::ScalarType head_dtype) {
  if (got.sizes() != want.sizes() || got.scalar_type() != want.scalar_type()) return false;
  double rtol = 1e-5, atol = 1e-6;
  if (got.scalar_type() == at::kBFloat16) {
    rtol = 2e-2, atol = 2e-2;
  } else if (head_dtype == at::kBFloat16) {
    rtol = 1e-2, atol = 1e-3;
  }
  return at::allclose(got.to(at::kDouble), want.to(at::kDouble), rtol, atol, /*equal_nan=*/true);
}

// Whether argmax `got` picks, at every position, a logit within bf16 rounding of the largest:
// `logits` (..., V) and `got` (...).
bool ArgmaxWithinRounding(const at::Tensor& got, const at::Tensor& logits) {
  const at::Tensor values = logits.to(at::kDouble);
  const at::Tensor best = std::get<0>(values.max(-1));
  const at::Tensor picked = values.gather(-1, got.unsqueeze(-1)).squeeze(-1);
  return (best - picked).le(1e-2 * best.abs() + 1e-3).all().item<bool>();
}

// Batch result against Forward's: the same status, or the same outputs (values within the
// tolerance, or bit-identical with `exact`), argmax and num_scored_tokens exactly. A bf16 head's
// logits may round differently in another GEMM shape, so where `logits` (Forward's for the same
// x and logits_to_keep) are given, an argmax may also pick a logit tied with the largest within
// that rounding.
void ExpectSameResult(const absl::StatusOr<LMOutput>& got, const absl::StatusOr<LMOutput>& want,
                      at::ScalarType head_dtype, bool exact, const std::string& what,
                      const std::optional<at::Tensor>& logits = std::nullopt) {
  ASSERT_EQ(got.ok(), want.ok()) << what << ": " << got.status() << " vs " << want.status();
  if (!want.ok()) {
    EXPECT_EQ(got.status(), want.status()) << what;
    return;
  }
  const auto compare = [&](const char* name, const std::optional<at::Tensor>& g,
                           const std::optional<at::Tensor>& w) {
    ASSERT_EQ(g.has_value(), w.has_value()) << what << ": " << name;
    if (!w.has_value()) return;
    if (exact) {
      EXPECT_TRUE(BitEqual(*g, *w)) << what << ": " << name << "\n" << *g << "\nvs\n" << *w;
    } else {
      EXPECT_TRUE(Close(*g, *w, head_dtype)) << what << ": " << name << "\n"
                                             << *g << "\nvs\n"
                                             << *w;
    }
  };
  compare("logits", got->logits, want->logits);
  compare("loss", got->loss, want->loss);
  compare("ce_loss", got->ce_loss, want->ce_loss);
  compare("z_loss", got->z_loss, want->z_loss);
  ASSERT_EQ(got->argmax.has_value(), want->argmax.has_value()) << what;
  if (want->argmax.has_value() && !at::equal(*got->argmax, *want->argmax)) {
    ASSERT_TRUE(logits.has_value()) << what << ": argmax\n"
                                    << *got->argmax << "\nvs\n"
                                    << *want->argmax;
    EXPECT_TRUE(ArgmaxWithinRounding(*got->argmax, *logits)) << what << ": argmax";
    EXPECT_TRUE(ArgmaxWithinRounding(*want->argmax, *logits)) << what << ": argmax";
  }
  EXPECT_EQ(got->num_scored_tokens, want->num_scored_tokens) << what;
}

// Builds one random item from a seeded generator: its shape, labels (or none), ignore_index,
// logits_to_keep, reduction, z-loss, divisor, return_logits and return_argmax, valid for `head`.
class ItemMaker {
 public:
  ItemMaker(const LMHead& head, uint64_t seed)
      : head_(head), random_(seed), generator_(at::detail::createCPUGenerator(seed)) {}

  ForwardItem Make(LossImplementation implementation, LossReduction reduction,
                   std::optional<double> z_loss, int divisor, int keep) {
    ForwardItem item;
    const int64_t batch = Pick(1, 3);
    const int64_t length = Pick(1, 6);
    const at::ScalarType dtype = ScalarTypeOf(head_.config().dtype);
    item.x = at::randn({batch, length, kD}, generator_, at::TensorOptions(at::kFloat)).to(dtype);
    ForwardOptions& o = item.options;
    const bool fused = implementation == LossImplementation::kFusedLinear;
    o.loss_implementation = implementation;
    o.return_argmax = Pick(0, 1) == 1;
    // logits_to_keep: 0, a positive or negative int (sometimes keeping nothing), or positions.
    if (keep == 1) o.logits_to_keep = Pick(1, length + 1);
    if (keep == 2) o.logits_to_keep = -Pick(0, length);
    if (keep == 3) {
      o.logits_to_keep =
          at::randint(length, {batch, Pick(0, 3)}, generator_, at::TensorOptions(at::kLong));
    }
    const int64_t kept = KeptLength(o.logits_to_keep, length);
    // One item in five has no labels (the loss options are then ignored).
    if (Pick(0, 4) == 0) {
      if (Pick(0, 1) == 1) o.return_logits = true;
      return item;
    }
    const std::vector<int64_t> ignore_indices = {-100, -1, 5};
    o.ignore_index = ignore_indices[Pick(0, 2)];
    at::Tensor labels = at::randint(kV, {batch, length}, generator_, at::TensorOptions(at::kLong));
    switch (Pick(0, 2)) {
      case 0:  // none ignored (but a label equal to ignore_index 5 is)
        break;
      case 1:  // some
        labels = at::where(at::rand({batch, length}, generator_).lt(0.3), o.ignore_index, labels);
        break;
      default:  // all
        labels.fill_(o.ignore_index);
    }
    o.labels = labels;
    o.loss_reduction = reduction;
    o.z_loss_multiplier = z_loss;
    if (divisor == 1) o.loss_div_factor = 3.0;
    if (divisor == 2) o.loss_div_factor = at::full({}, 0.5, at::kFloat);
    if (divisor == 3) {
      o.loss_div_factor = reduction == LossReduction::kNone ? at::rand({batch, 1}, generator_) + 0.5
                                                            : at::full({}, 4.0, at::kDouble);
    }
    if (fused) {
      if (Pick(0, 1) == 1) o.return_logits = false;
    } else {
      const int r = Pick(0, 2);
      if (r == 1) o.return_logits = false;
      if (r == 2) o.return_logits = true;
    }
    (void)kept;
    return item;
  }

 private:
  int64_t Pick(int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(random_);
  }

  const LMHead& head_;
  std::mt19937_64 random_;
  at::Generator generator_;
};

// The grid: for every head and dtype, items over both loss implementations, the three
// reductions, z-loss unset/0.0/1e-3, four divisors and four kinds of logits_to_keep (each item
// also drawing its shape, labels, ignore_index, return_logits and return_argmax), all in one
// ForwardBatch, each compared with its own Forward.
TEST(LMHeadBatchTest, EveryItemMatchesItsOwnForward) {
  for (const DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (const auto& [name, config] : Heads(dtype)) {
      SCOPED_TRACE(absl::StrCat(name, " ", Name(dtype)));
      std::unique_ptr<LMHead> head = MakeHead(config);
      ItemMaker maker(*head, 7);
      std::vector<ForwardItem> items;
      std::vector<std::string> what;
      const bool normalized = config.name == LMHeadType::kNormalized;
      for (const LossImplementation implementation :
           {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
        if (normalized && implementation == LossImplementation::kFusedLinear) continue;
        for (const LossReduction reduction :
             {LossReduction::kMean, LossReduction::kSum, LossReduction::kNone}) {
          for (const std::optional<double> z :
               {std::optional<double>(), std::optional<double>(0.0), std::optional<double>(1e-3)}) {
            for (int divisor = 0; divisor < 4; ++divisor) {
              for (int keep = 0; keep < 4; ++keep) {
                items.push_back(maker.Make(implementation, reduction, z, divisor, keep));
                what.push_back(absl::StrCat("item ", items.size() - 1, ": ", Name(implementation),
                                            " ", Name(reduction), " z=", z.value_or(-1),
                                            " divisor=", divisor, " keep=", keep));
              }
            }
          }
        }
      }
      const std::vector<absl::StatusOr<LMOutput>> batch = head->ForwardBatch(items);
      ASSERT_EQ(batch.size(), items.size());
      const at::ScalarType head_dtype = ScalarTypeOf(dtype);
      int scored_items = 0;
      for (size_t i = 0; i < items.size(); ++i) {
        const absl::StatusOr<LMOutput> solo = head->Forward(items[i].x, items[i].options);
        ASSERT_TRUE(solo.ok()) << what[i] << ": " << solo.status();
        std::optional<at::Tensor> logits;
        if (head_dtype == at::kBFloat16) {
          ForwardOptions logits_only;
          logits_only.logits_to_keep = items[i].options.logits_to_keep;
          logits = head->Forward(items[i].x, logits_only)->logits;
        }
        ExpectSameResult(batch[i], solo, head_dtype, /*exact=*/false, what[i], logits);
        EXPECT_EQ(solo->num_scored_tokens, ScoredCount(items[i].options)) << what[i];
        scored_items += solo->num_scored_tokens > 0;
      }
      EXPECT_GT(scored_items, static_cast<int>(items.size()) / 3);  // the grid scores tokens
    }
  }
}

// A lone item takes Forward's path: bit-identical outputs, for every kind of item.
TEST(LMHeadBatchTest, OneItemIsBitIdenticalToForward) {
  for (const DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (const auto& [name, config] : Heads(dtype)) {
      SCOPED_TRACE(absl::StrCat(name, " ", Name(dtype)));
      std::unique_ptr<LMHead> head = MakeHead(config);
      ItemMaker maker(*head, 11);
      for (const LossImplementation implementation :
           {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
        if (config.name == LMHeadType::kNormalized &&
            implementation == LossImplementation::kFusedLinear) {
          continue;
        }
        for (const LossReduction reduction :
             {LossReduction::kMean, LossReduction::kSum, LossReduction::kNone}) {
          for (int keep = 0; keep < 4; ++keep) {
            const ForwardItem item = maker.Make(implementation, reduction, 1e-3, keep % 4, keep);
            const std::vector<absl::StatusOr<LMOutput>> batch = head->ForwardBatch({item});
            ASSERT_EQ(batch.size(), 1u);
            ExpectSameResult(
                batch[0], head->Forward(item.x, item.options), ScalarTypeOf(dtype),
                /*exact=*/true,
                absl::StrCat(Name(implementation), " ", Name(reduction), " keep=", keep));
            // Marked as validated by the caller: the same result, without the checks.
            ForwardItem checked = item;
            checked.validated = true;
            ExpectSameResult(head->ForwardBatch({checked, item})[0], batch[0], ScalarTypeOf(dtype),
                             /*exact=*/false,
                             absl::StrCat("validated ", Name(implementation), " keep=", keep));
          }
        }
      }
    }
  }
}

TEST(LMHeadBatchTest, EmptyBatchGivesNoResults) {
  std::unique_ptr<LMHead> head = MakeHead(LMHeadConfig{});
  EXPECT_TRUE(head->ForwardBatch({}).empty());
}

// Items that keep no position, alone in their group or with others, for every reduction with
// and without z-loss (a packed group whose sums run over no rows): empty or zero outputs of the
// right shapes, as Forward gives.
TEST(LMHeadBatchTest, ItemsWithoutKeptPositions) {
  std::unique_ptr<LMHead> head = MakeHead(LMHeadConfig{});
  at::Generator gen = at::detail::createCPUGenerator(3);
  const at::Tensor x = at::randn({2, 4, kD}, gen);
  const at::Tensor labels = at::randint(kV, {2, 4}, gen, at::TensorOptions(at::kLong));
  for (const LossImplementation implementation :
       {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
    for (const LossReduction reduction :
         {LossReduction::kNone, LossReduction::kSum, LossReduction::kMean}) {
      for (const std::optional<double> z : {std::optional<double>(), std::optional<double>(1e-3)}) {
        const std::string what =
            absl::StrCat(Name(implementation), " ", Name(reduction), " z=", z.value_or(-1));
        std::vector<ForwardItem> items;
        for (const std::variant<int64_t, at::Tensor>& keep :
             std::vector<std::variant<int64_t, at::Tensor>>{
                 int64_t{-4}, at::zeros({2, 0}, at::kLong), int64_t{-9}}) {
          ForwardItem item{x, {}};
          item.options.labels = labels;
          item.options.logits_to_keep = keep;
          item.options.loss_implementation = implementation;
          item.options.loss_reduction = reduction;
          item.options.z_loss_multiplier = z;
          item.options.return_argmax = true;
          items.push_back(item);
        }
        ForwardItem without_labels{x, {}};
        without_labels.options.logits_to_keep = int64_t{-4};
        without_labels.options.return_argmax = true;
        items.push_back(without_labels);
        for (const std::vector<ForwardItem>& batch :
             {items, std::vector<ForwardItem>{items.front()}}) {
          const std::vector<absl::StatusOr<LMOutput>> results = head->ForwardBatch(batch);
          for (size_t i = 0; i < batch.size(); ++i) {
            ASSERT_TRUE(results[i].ok()) << what << ": " << results[i].status();
            EXPECT_EQ(results[i]->argmax->sizes(), (std::vector<int64_t>{2, 0})) << what;
            if (results[i]->loss.has_value() && reduction == LossReduction::kNone) {
              EXPECT_EQ(results[i]->loss->sizes(), (std::vector<int64_t>{2, 0})) << what;
            }
            EXPECT_EQ(results[i]->num_scored_tokens, 0) << what;
            ExpectSameResult(results[i], head->Forward(batch[i].x, batch[i].options), at::kFloat,
                             /*exact=*/false, absl::StrCat(what, " item ", i));
          }
        }
      }
    }
  }
}

// Invalid items and items whose interrupt_check fails get Forward's status; the others are
// computed as if they were alone.
TEST(LMHeadBatchTest, InvalidAndInterruptedItemsDoNotAffectTheOthers) {
  std::unique_ptr<LMHead> head = MakeHead(LMHeadConfig{});
  ItemMaker maker(*head, 5);
  for (const LossImplementation implementation :
       {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
    SCOPED_TRACE(Name(implementation));
    std::vector<ForwardItem> items;
    for (int i = 0; i < 7; ++i) {
      items.push_back(maker.Make(implementation, LossReduction::kMean, 1e-3, 0, i % 4));
      items.back().options.labels =
          at::randint(kV, {items.back().x.size(0), items.back().x.size(1)}, at::kLong);
      items.back().options.return_logits.reset();
    }
    // Out-of-range labels (found by the index check), the wrong d_model (by the structure check),
    // fused_linear with return_logits=True, and an interrupted one.
    items[1].options.labels = *items[1].options.labels + kV;
    items[1].options.logits_to_keep = int64_t{0};
    items[3].x = items[3].x.slice(2, 0, 8);
    items[4].options.loss_implementation = LossImplementation::kFusedLinear;
    items[4].options.return_logits = true;
    int polls = 0;
    items[5].options.interrupt_check = [&polls]() {
      ++polls;
      return absl::CancelledError("client went away");
    };
    const std::vector<absl::StatusOr<LMOutput>> results = head->ForwardBatch(items);
    ASSERT_EQ(results.size(), items.size());
    EXPECT_EQ(polls, 1);
    EXPECT_EQ(results[1].status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(results[1].status().message()),
                ::testing::StartsWith("labels: values must lie in [0, vocab_size=37)"));
    EXPECT_THAT(std::string(results[3].status().message()),
                ::testing::StartsWith("x: expected shape (batch, seq_len, d_model=16)"));
    EXPECT_THAT(std::string(results[4].status().message()),
                ::testing::StartsWith("return_logits: 'return_logits=True' is not compatible"));
    EXPECT_EQ(results[5].status(), absl::CancelledError("client went away"));
    for (size_t i = 0; i < items.size(); ++i) {
      ExpectSameResult(results[i], head->Forward(items[i].x, items[i].options), at::kFloat,
                       /*exact=*/false, absl::StrCat("item ", i));
    }
    EXPECT_EQ(polls, 2);
  }
}

// A packed fused_linear pass takes the items' logit_tile_bytes when they agree (here tiles of a
// few tokens and columns), else the default; the results do not depend on it.
TEST(LMHeadBatchTest, LogitTileBytesAgreedOrMixed) {
  std::unique_ptr<LMHead> head = MakeHead(LMHeadConfig{});
  ItemMaker maker(*head, 9);
  for (const std::vector<int64_t>& tile_bytes :
       {std::vector<int64_t>{400, 400, 400}, std::vector<int64_t>{400, 0, 1 << 20}}) {
    std::vector<ForwardItem> items;
    for (const int64_t bytes : tile_bytes) {
      items.push_back(
          maker.Make(LossImplementation::kFusedLinear, LossReduction::kSum, 1e-3, 0, 0));
      if (!items.back().options.labels.has_value()) {
        items.back().options.labels =
            at::randint(kV, {items.back().x.size(0), items.back().x.size(1)}, at::kLong);
        items.back().options.return_logits.reset();
      }
      items.back().options.logit_tile_bytes = bytes;
    }
    const std::vector<absl::StatusOr<LMOutput>> results = head->ForwardBatch(items);
    for (size_t i = 0; i < items.size(); ++i) {
      ExpectSameResult(results[i], head->Forward(items[i].x, items[i].options), at::kFloat,
                       /*exact=*/false, absl::StrCat("tile_bytes ", tile_bytes[i]));
    }
  }
}

// num_scored_tokens: kept positions whose label is not ignore_index, for both heads and both
// implementations; 0 without labels.
TEST(LMHeadBatchTest, ForwardCountsScoredTokens) {
  for (const auto& [name, config] : Heads(DType::kFloat32)) {
    std::unique_ptr<LMHead> head = MakeHead(config);
    const at::Tensor x = at::randn({2, 5, kD});
    const at::Tensor labels =
        at::tensor({1, 2, -100, 4, 5, -100, -100, 8, 9, -100}, at::kLong).view({2, 5});
    for (const LossImplementation implementation :
         {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
      if (config.name == LMHeadType::kNormalized &&
          implementation == LossImplementation::kFusedLinear) {
        continue;
      }
      ForwardOptions options;
      options.labels = labels;
      options.loss_implementation = implementation;
      EXPECT_EQ(head->Forward(x, options)->num_scored_tokens, 6) << name;
      options.logits_to_keep = int64_t{2};  // {4, 5}, {9, -100}
      EXPECT_EQ(head->Forward(x, options)->num_scored_tokens, 3) << name;
      options.logits_to_keep = at::tensor({2, 2, 0, 4}, at::kLong).view({2, 2});
      EXPECT_EQ(head->Forward(x, options)->num_scored_tokens, 0) << name;
      options.logits_to_keep = at::tensor({0, 3, 2, 3}, at::kLong).view({2, 2});  // {1, 4}, {8, 9}
      EXPECT_EQ(head->Forward(x, options)->num_scored_tokens, 4) << name;
      options.labels = at::where(labels.eq(-100), 4, labels);
      options.ignore_index = 4;
      EXPECT_EQ(head->Forward(x, options)->num_scored_tokens, 3) << name;
    }
    EXPECT_EQ(head->Forward(x, {})->num_scored_tokens, 0) << name;
  }
}

}  // namespace
}  // namespace lmhead

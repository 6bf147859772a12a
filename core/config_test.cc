#include "core/config.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

using ::testing::HasSubstr;

TEST(LMHeadConfigTest, DefaultHeadHasBiasAndCountsIt) {
  LMHeadConfig config;
  EXPECT_TRUE(config.Validate().ok());
  EXPECT_TRUE(config.EffectiveBias());
  EXPECT_EQ(config.NumParams(64, 128), 64 * 128 + 128);
}

TEST(LMHeadConfigTest, TypicalOlmoConfigCountsNormWeightOnly) {
  LMHeadConfig config;
  config.bias = false;
  config.layer_norm = LayerNormConfig{LayerNormType::kRms};
  config.layer_norm->bias = false;
  EXPECT_EQ(config.NumParams(64, 128), 64 + 64 * 128);
}

TEST(LMHeadConfigTest, NormalizedRejectsBiasEvenFalse) {
  LMHeadConfig config;
  config.name = LMHeadType::kNormalized;
  EXPECT_TRUE(config.Validate().ok());
  EXPECT_EQ(config.NumParams(64, 128), 64 * 128 + 128);
  for (bool bias : {true, false}) {
    config.bias = bias;
    absl::Status status = config.Validate();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(status.message(), HasSubstr("invalid options for 'normalized' LMHeadConfig"));
    EXPECT_THAT(status.message(), HasSubstr("'bias'"));
  }
  // The count follows the formula even for a config that cannot be built.
  config.bias = true;
  EXPECT_EQ(config.NumParams(64, 128), 64 * 128 + 2 * 128);
}

TEST(LMHeadConfigTest, NormalizedRejectsLayerNorm) {
  LMHeadConfig config;
  config.name = LMHeadType::kNormalized;
  config.layer_norm = LayerNormConfig{};
  absl::Status status = config.Validate();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("'layer_norm'"));
}

TEST(LayerNormConfigTest, L2NormTakesNoOptions) {
  LayerNormConfig config{LayerNormType::kL2Norm};
  EXPECT_TRUE(config.Validate().ok());
  EXPECT_EQ(config.NumParams(64), 0);
  EXPECT_FALSE(config.EffectiveAffine());
  config.elementwise_affine = true;
  absl::Status status = config.Validate();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("invalid options for 'l2_norm' LayerNormConfig"));
  EXPECT_THAT(status.message(), HasSubstr("'elementwise_affine'"));
  EXPECT_EQ(config.NumParams(64), 64);  // bias defaults to off for l2_norm
  config.bias = true;
  EXPECT_EQ(config.NumParams(64), 128);
}

TEST(LayerNormConfigTest, KernelNormsRefuseWhatTheirKernelsLack) {
  LayerNormConfig fused{LayerNormType::kFusedRms};
  fused.elementwise_affine = false;
  EXPECT_EQ(fused.Validate().code(), absl::StatusCode::kUnimplemented);
  fused.elementwise_affine = true;
  fused.full_precision = false;
  EXPECT_EQ(fused.Validate().code(), absl::StatusCode::kUnimplemented);
  LayerNormConfig cute{LayerNormType::kCuteRms};
  cute.elementwise_affine = false;
  EXPECT_TRUE(cute.Validate().ok());
  cute.full_precision = false;
  EXPECT_EQ(cute.Validate().code(), absl::StatusCode::kUnimplemented);
}

TEST(LayerNormConfigTest, DefaultsMatchOlmoCore) {
  LayerNormConfig config;
  EXPECT_DOUBLE_EQ(config.EffectiveEps(), 1e-5);
  EXPECT_TRUE(config.EffectiveAffine());
  EXPECT_TRUE(config.EffectiveBias());
  EXPECT_TRUE(config.EffectiveFullPrecision());
  EXPECT_EQ(config.EffectiveDType(), DType::kFloat32);
  EXPECT_EQ(config.NumParams(10), 20);
  config.elementwise_affine = false;
  EXPECT_FALSE(config.EffectiveBias());
  EXPECT_EQ(config.NumParams(10), 0);
}

TEST(EnumNamesTest, RoundTripAndUnknownNamesTheField) {
  for (auto type : {LayerNormType::kDefault, LayerNormType::kRms, LayerNormType::kQwenRms,
                    LayerNormType::kCuteRms, LayerNormType::kFusedRms, LayerNormType::kL2Norm}) {
    EXPECT_EQ(*ParseLayerNormType(Name(type)), type);
  }
  EXPECT_EQ(*ParseDType("bfloat16"), DType::kBFloat16);
  EXPECT_EQ(*ParseLossImplementation("fused_linear"), LossImplementation::kFusedLinear);
  absl::StatusOr<LossReduction> bad = ParseLossReduction("average");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("loss_reduction"));
  EXPECT_THAT(bad.status().message(), HasSubstr("mean, sum, none"));
}

// ---- ApplyConfigOverride.

// OLMo's usual head: an rms norm without bias, no w_out bias.
LMHeadConfig OlmoHead() {
  LMHeadConfig config;
  config.bias = false;
  config.layer_norm = LayerNormConfig{LayerNormType::kRms};
  config.layer_norm->bias = false;
  return config;
}

void ExpectSameNorm(const LayerNormConfig& actual, const LayerNormConfig& expected) {
  EXPECT_EQ(actual.name, expected.name);
  EXPECT_EQ(actual.eps, expected.eps);
  EXPECT_EQ(actual.elementwise_affine, expected.elementwise_affine);
  EXPECT_EQ(actual.bias, expected.bias);
  EXPECT_EQ(actual.full_precision, expected.full_precision);
  EXPECT_EQ(actual.dtype, expected.dtype);
}

void ExpectSameConfig(const LMHeadConfig& actual, const LMHeadConfig& expected) {
  EXPECT_EQ(actual.name, expected.name);
  EXPECT_EQ(actual.bias, expected.bias);
  EXPECT_EQ(actual.dtype, expected.dtype);
  EXPECT_EQ(actual.loss_implementation, expected.loss_implementation);
  ASSERT_EQ(actual.layer_norm.has_value(), expected.layer_norm.has_value());
  if (actual.layer_norm) ExpectSameNorm(*actual.layer_norm, *expected.layer_norm);
}

TEST(ApplyConfigOverrideTest, EmptyOverrideGivesBase) {
  LMHeadConfig normalized;
  normalized.name = LMHeadType::kNormalized;
  LMHeadConfig l2;
  l2.layer_norm = LayerNormConfig{LayerNormType::kL2Norm};
  LMHeadConfig half = OlmoHead();
  half.dtype = DType::kBFloat16;
  half.loss_implementation = LossImplementation::kFusedLinear;
  half.layer_norm->eps = 1e-6;
  half.layer_norm->full_precision = false;
  for (const LMHeadConfig& base : {LMHeadConfig(), OlmoHead(), normalized, l2, half}) {
    absl::StatusOr<LMHeadConfig> config = ApplyConfigOverride(base, LMHeadConfigOverride());
    ASSERT_TRUE(config.ok()) << config.status();
    ExpectSameConfig(*config, base);
  }
}

TEST(ApplyConfigOverrideTest, EachWeightFieldThatDiffersIsRefusedByItsPath) {
  struct Case {
    LMHeadConfig base;
    LMHeadConfigOverride override_;
    std::string message;
  };
  LMHeadConfigOverride name;
  name.name = LMHeadType::kNormalized;
  LMHeadConfigOverride bias;
  bias.bias = true;
  LMHeadConfigOverride norm_name;
  norm_name.layer_norm.emplace().name = LayerNormType::kDefault;
  LMHeadConfigOverride eps;
  eps.layer_norm.emplace().eps = 1e-6;
  LMHeadConfigOverride affine;
  affine.layer_norm.emplace().elementwise_affine = false;
  LMHeadConfigOverride norm_bias;
  norm_bias.layer_norm.emplace().bias = true;
  const Case cases[] = {
      {OlmoHead(), name,
       "config.name: the weights have a 'default' head; the request's 'normalized' contradicts "
       "them"},
      {OlmoHead(), bias,
       "config.bias: the weights have no w_out bias; the request's bias=true contradicts them"},
      {OlmoHead(), norm_name,
       "config.layer_norm.name: the weights have a 'rms' layer norm; the request's 'default' "
       "contradicts them"},
      {OlmoHead(), eps,
       "config.layer_norm.eps: the weights have eps=1e-05; the request's eps=1e-06 contradicts "
       "them"},
      {OlmoHead(), affine,
       "config.layer_norm.elementwise_affine: the weights have a norm weight; the request's "
       "elementwise_affine=false contradicts them"},
      {OlmoHead(), norm_bias,
       "config.layer_norm.bias: the weights have no norm bias; the request's bias=true "
       "contradicts them"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<LMHeadConfig> config = ApplyConfigOverride(c.base, c.override_);
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_EQ(config.status().message(), c.message);
  }
}

TEST(ApplyConfigOverrideTest, LayerNormOnAHeadWithoutOneIsRefused) {
  LMHeadConfigOverride empty_norm;
  empty_norm.layer_norm.emplace();
  LMHeadConfigOverride precision;
  precision.layer_norm.emplace().full_precision = true;
  LMHeadConfig normalized;
  normalized.name = LMHeadType::kNormalized;
  for (const LMHeadConfig& base : {LMHeadConfig(), normalized}) {
    for (const LMHeadConfigOverride& override_ : {empty_norm, precision}) {
      absl::StatusOr<LMHeadConfig> config = ApplyConfigOverride(base, override_);
      EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_EQ(config.status().message(),
                "config.layer_norm: the weights have no layer norm; the request's layer_norm "
                "contradicts them");
    }
  }
}

TEST(ApplyConfigOverrideTest, DTypesPrecisionAndLossImplementationChange) {
  LMHeadConfigOverride override_;
  override_.dtype = DType::kBFloat16;
  override_.loss_implementation = LossImplementation::kFusedLinear;
  override_.layer_norm.emplace();
  override_.layer_norm->full_precision = false;
  override_.layer_norm->dtype = DType::kFloat16;
  absl::StatusOr<LMHeadConfig> config = ApplyConfigOverride(OlmoHead(), override_);
  ASSERT_TRUE(config.ok()) << config.status();
  LMHeadConfig expected = OlmoHead();
  expected.dtype = DType::kBFloat16;
  expected.loss_implementation = LossImplementation::kFusedLinear;
  expected.layer_norm->full_precision = false;
  expected.layer_norm->dtype = DType::kFloat16;
  ExpectSameConfig(*config, expected);

  // And back: an override may also set what base has as a default.
  LMHeadConfig half = expected;
  LMHeadConfigOverride back;
  back.dtype = DType::kFloat32;
  back.loss_implementation = LossImplementation::kDefault;
  back.layer_norm.emplace();
  back.layer_norm->full_precision = true;
  back.layer_norm->dtype = DType::kFloat32;
  config = ApplyConfigOverride(half, back);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->dtype, DType::kFloat32);
  EXPECT_EQ(config->loss_implementation, LossImplementation::kDefault);
  EXPECT_EQ(config->layer_norm->full_precision, true);
  EXPECT_EQ(config->layer_norm->dtype, DType::kFloat32);
}

TEST(ApplyConfigOverrideTest, WeightFieldsCompareByTheirEffectiveValuesAndStayAsBaseHasThem) {
  // Unset bias on a default head means a bias; on a normalized head, none.
  LMHeadConfigOverride with_bias;
  with_bias.bias = true;
  absl::StatusOr<LMHeadConfig> config = ApplyConfigOverride(LMHeadConfig(), with_bias);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_FALSE(config->bias.has_value());
  LMHeadConfigOverride without_bias;
  without_bias.bias = false;
  EXPECT_EQ(ApplyConfigOverride(LMHeadConfig(), without_bias).status().message(),
            "config.bias: the weights have a w_out bias; the request's bias=false contradicts "
            "them");
  LMHeadConfig normalized;
  normalized.name = LMHeadType::kNormalized;
  LMHeadConfigOverride same_head = without_bias;
  same_head.name = LMHeadType::kNormalized;
  // NormalizedLMHead refuses even bias=False, so the matching value must not be copied.
  config = ApplyConfigOverride(normalized, same_head);
  ASSERT_TRUE(config.ok()) << config.status();
  ExpectSameConfig(*config, normalized);
  EXPECT_EQ(ApplyConfigOverride(normalized, with_bias).status().code(),
            absl::StatusCode::kInvalidArgument);

  // An unset eps is 1e-5; an unset elementwise_affine/bias is on, except for l2_norm.
  LMHeadConfig rms;
  rms.layer_norm = LayerNormConfig{LayerNormType::kRms};
  LMHeadConfigOverride defaults;
  defaults.layer_norm.emplace();
  defaults.layer_norm->name = LayerNormType::kRms;
  defaults.layer_norm->eps = 1e-5;
  defaults.layer_norm->elementwise_affine = true;
  defaults.layer_norm->bias = true;
  config = ApplyConfigOverride(rms, defaults);
  ASSERT_TRUE(config.ok()) << config.status();
  ExpectSameConfig(*config, rms);
  LMHeadConfig l2;
  l2.layer_norm = LayerNormConfig{LayerNormType::kL2Norm};
  LMHeadConfigOverride l2_defaults;
  l2_defaults.layer_norm.emplace();
  l2_defaults.layer_norm->name = LayerNormType::kL2Norm;
  l2_defaults.layer_norm->eps = 1e-5;
  l2_defaults.layer_norm->elementwise_affine = false;
  l2_defaults.layer_norm->bias = false;
  // L2Norm takes none of these options, so the matching values must not be copied.
  config = ApplyConfigOverride(l2, l2_defaults);
  ASSERT_TRUE(config.ok()) << config.status();
  ExpectSameConfig(*config, l2);
  l2_defaults.layer_norm->elementwise_affine = true;
  EXPECT_EQ(ApplyConfigOverride(l2, l2_defaults).status().message(),
            "config.layer_norm.elementwise_affine: the weights have no norm weight; the "
            "request's elementwise_affine=true contradicts them");

  // A norm without a weight has no bias, whatever its bias field says.
  LMHeadConfig no_affine = rms;
  no_affine.layer_norm->elementwise_affine = false;
  LMHeadConfigOverride norm_bias;
  norm_bias.layer_norm.emplace().bias = true;
  EXPECT_EQ(ApplyConfigOverride(no_affine, norm_bias).status().message(),
            "config.layer_norm.bias: the weights have no norm bias; the request's bias=true "
            "contradicts them");
}

TEST(ApplyConfigOverrideTest, ResultThatCannotBeBuiltIsRefusedWithItsCode) {
  LMHeadConfig fused;
  fused.layer_norm = LayerNormConfig{LayerNormType::kFusedRms};
  LMHeadConfigOverride low_precision;
  low_precision.layer_norm.emplace().full_precision = false;
  absl::StatusOr<LMHeadConfig> config = ApplyConfigOverride(fused, low_precision);
  EXPECT_EQ(config.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(config.status().message(),
            "config: Currently only 'full_precision=True' is supported with 'FusedRMSNorm'");

  LMHeadConfig l2;
  l2.layer_norm = LayerNormConfig{LayerNormType::kL2Norm};
  LMHeadConfigOverride norm_dtype;
  norm_dtype.layer_norm.emplace().dtype = DType::kBFloat16;
  config = ApplyConfigOverride(l2, norm_dtype);
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(config.status().message(),
            "config: invalid options for 'l2_norm' LayerNormConfig, L2Norm got an unexpected "
            "option 'dtype'");
}

}  // namespace
}  // namespace lmhead

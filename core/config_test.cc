#include "core/config.h"

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

}  // namespace
}  // namespace lmhead

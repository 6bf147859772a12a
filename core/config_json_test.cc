#include "core/config_json.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

TEST(LMHeadConfigFromJsonTest, EmptyObjectGivesDefaults) {
  absl::StatusOr<LMHeadConfig> config = LMHeadConfigFromJson("{}");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->name, LMHeadType::kDefault);
  EXPECT_FALSE(config->layer_norm.has_value());
  EXPECT_FALSE(config->bias.has_value());
  EXPECT_EQ(config->dtype, DType::kFloat32);
  EXPECT_EQ(config->loss_implementation, LossImplementation::kDefault);
}

TEST(LMHeadConfigFromJsonTest, ReadsEveryField) {
  absl::StatusOr<LMHeadConfig> config = LMHeadConfigFromJson(R"({
      "name": "default",
      "layer_norm": {"name": "qwen_rms", "eps": 1e-6, "elementwise_affine": true,
                     "bias": false, "full_precision": false, "dtype": "bfloat16"},
      "bias": false, "dtype": "bfloat16", "loss_implementation": "fused_linear"})");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_TRUE(config->layer_norm.has_value());
  const LayerNormConfig& norm = *config->layer_norm;
  EXPECT_EQ(norm.name, LayerNormType::kQwenRms);
  EXPECT_EQ(norm.eps, 1e-6);
  EXPECT_EQ(norm.elementwise_affine, true);
  EXPECT_EQ(norm.bias, false);
  EXPECT_EQ(norm.full_precision, false);
  EXPECT_EQ(norm.dtype, DType::kBFloat16);
  EXPECT_EQ(config->bias, false);
  EXPECT_EQ(config->dtype, DType::kBFloat16);
  EXPECT_EQ(config->loss_implementation, LossImplementation::kFusedLinear);
}

TEST(LMHeadConfigFromJsonTest, NullLeavesFieldsUnset) {
  absl::StatusOr<LMHeadConfig> config = LMHeadConfigFromJson(
      R"({"name": "normalized", "layer_norm": null, "bias": null, "dtype": null,
          "loss_implementation": null})");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->name, LMHeadType::kNormalized);
  EXPECT_FALSE(config->layer_norm.has_value());
  EXPECT_FALSE(config->bias.has_value());
  EXPECT_EQ(config->dtype, DType::kFloat32);

  config = LMHeadConfigFromJson(R"({"layer_norm": {"name": "rms", "eps": null, "bias": null}})");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_TRUE(config->layer_norm.has_value());
  EXPECT_EQ(config->layer_norm->name, LayerNormType::kRms);
  EXPECT_FALSE(config->layer_norm->eps.has_value());
  EXPECT_FALSE(config->layer_norm->bias.has_value());
}

TEST(LMHeadConfigFromJsonTest, LayerNormNameDefaultsToDefault) {
  absl::StatusOr<LMHeadConfig> config = LMHeadConfigFromJson(R"({"layer_norm": {"eps": 1}})");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->layer_norm->name, LayerNormType::kDefault);
  EXPECT_EQ(config->layer_norm->eps, 1.0);  // an integer is a number
}

TEST(LMHeadConfigFromJsonTest, ErrorsNameTheFieldPath) {
  struct Case {
    const char* json;
    const char* message;
  };
  const Case cases[] = {
      {R"({"layer_norm": {"eps": "small"}})", "layer_norm.eps: expected a number"},
      {R"({"layer_norm": {"eps": true}})", "layer_norm.eps: expected a number"},
      {R"({"layer_norm": {"bias": 1}})", "layer_norm.bias: expected a boolean"},
      {R"({"layer_norm": {"elementwise_affine": "yes"}})",
       "layer_norm.elementwise_affine: expected a boolean"},
      {R"({"layer_norm": {"full_precision": 0}})", "layer_norm.full_precision: expected a boolean"},
      {R"({"layer_norm": {"dtype": 16}})", "layer_norm.dtype: expected a string"},
      {R"({"layer_norm": {"dtype": "float64"}})", "layer_norm.dtype: unknown value 'float64'"},
      {R"({"layer_norm": {"name": "batch"}})", "layer_norm.name: unknown value 'batch'"},
      {R"({"layer_norm": {"size": 4}})", "layer_norm.size: unknown field"},
      {R"({"layer_norm": "rms"})", "layer_norm: expected an object"},
      {R"({"layer_norm": []})", "layer_norm: expected an object"},
      {R"({"name": "tied"})", "name: unknown value 'tied'"},
      {R"({"name": 0})", "name: expected a string"},
      {R"({"bias": "false"})", "bias: expected a boolean"},
      {R"({"dtype": "float8_e4m3fn"})", "dtype: unknown value 'float8_e4m3fn'"},
      {R"({"loss_implementation": "fused"})", "loss_implementation: unknown value 'fused'"},
      {R"({"init_device": "cpu"})", "init_device: unknown field"},
      {R"([])", "config: expected a JSON object"},
      {R"("default")", "config: expected a JSON object"},
      {R"({"name": )", "config: malformed JSON"},
      {"", "config: malformed JSON"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<LMHeadConfig> config = LMHeadConfigFromJson(c.json);
    ASSERT_FALSE(config.ok()) << c.json;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << c.json;
    EXPECT_THAT(std::string(config.status().message()), StartsWith(c.message)) << c.json;
  }
}

TEST(LMHeadConfigFromJsonTest, ParsesButDoesNotValidate) {
  // Construction rules belong to LMHeadConfig::Validate.
  absl::StatusOr<LMHeadConfig> config =
      LMHeadConfigFromJson(R"({"name": "normalized", "bias": true})");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->Validate().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LMHeadConfigToJsonTest, WritesEveryFieldInOrder) {
  EXPECT_EQ(LMHeadConfigToJson(LMHeadConfig{}),
            R"({"name":"default","layer_norm":null,"bias":null,"dtype":"float32",)"
            R"("loss_implementation":"default"})");
  LMHeadConfig config;
  config.layer_norm = LayerNormConfig{LayerNormType::kRms};
  config.layer_norm->bias = false;
  config.bias = false;
  EXPECT_THAT(LMHeadConfigToJson(config),
              HasSubstr(R"("layer_norm":{"name":"rms","eps":null,"elementwise_affine":null,)"
                        R"("bias":false,"full_precision":null,"dtype":null},"bias":false)"));
}

TEST(LMHeadConfigToJsonTest, RoundTrips) {
  LMHeadConfig config;
  config.name = LMHeadType::kDefault;
  config.layer_norm = LayerNormConfig{LayerNormType::kFusedRms};
  config.layer_norm->eps = 1.0 / 3.0;
  config.layer_norm->elementwise_affine = true;
  config.layer_norm->full_precision = true;
  config.layer_norm->dtype = DType::kFloat16;
  config.bias = true;
  config.dtype = DType::kBFloat16;
  config.loss_implementation = LossImplementation::kFusedLinear;

  const std::string json = LMHeadConfigToJson(config);
  absl::StatusOr<LMHeadConfig> parsed = LMHeadConfigFromJson(json);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->layer_norm->eps, 1.0 / 3.0);  // doubles survive exactly
  EXPECT_FALSE(parsed->layer_norm->bias.has_value());
  EXPECT_EQ(LMHeadConfigToJson(*parsed), json);
}

}  // namespace
}  // namespace lmhead

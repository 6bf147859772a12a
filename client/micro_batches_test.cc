// MicroBatchCombiner against the shared test vectors (tests/data/micro_batch_vectors.json), which
// the Python client is tested against too, and the scalar encodings it rounds with.
#include "client/micro_batches.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace lmhead {
namespace {

using Json = nlohmann::json;

double Number(const Json& value) {
  if (value.is_string()) {
    const std::string text = value.get<std::string>();
    if (text == "nan") return std::numeric_limits<double>::quiet_NaN();
    if (text == "inf") return std::numeric_limits<double>::infinity();
    if (text == "-inf") return -std::numeric_limits<double>::infinity();
    ADD_FAILURE() << "unknown number '" << text << "'";
  }
  return value.get<double>();
}

v1::DataType DType(const std::string& name) {
  v1::DataType dtype = v1::DATA_TYPE_UNSPECIFIED;
  EXPECT_TRUE(v1::DataType_Parse("DATA_TYPE_" + name, &dtype)) << name;
  return dtype;
}

v1::Tensor ToTensor(const Json& json) {
  const v1::DataType dtype = DType(json["dtype"].get<std::string>());
  v1::Tensor tensor;
  tensor.set_dtype(dtype);
  for (const Json& size : json["shape"]) tensor.add_shape(size.get<int64_t>());
  std::string data;
  for (const Json& value : json["values"]) {
    if (dtype == v1::DATA_TYPE_INT64) {
      const int64_t v = value.get<int64_t>();
      data.append(reinterpret_cast<const char*>(&v), sizeof(v));
    } else {
      data += ScalarTensor(Number(value), dtype).data();
    }
  }
  tensor.set_data(data);
  return tensor;
}

v1::ForwardResponse ToResponse(const Json& json) {
  v1::ForwardResponse response;
  if (json.contains("logits")) *response.mutable_logits() = ToTensor(json["logits"]);
  if (json.contains("argmax")) *response.mutable_argmax() = ToTensor(json["argmax"]);
  if (json.contains("loss")) *response.mutable_loss() = ToTensor(json["loss"]);
  if (json.contains("ce_loss")) *response.mutable_ce_loss() = ToTensor(json["ce_loss"]);
  if (json.contains("z_loss")) *response.mutable_z_loss() = ToTensor(json["z_loss"]);
  response.set_num_scored_tokens(json["num_scored_tokens"].get<int64_t>());
  return response;
}

// Same dtype, shape and bytes, with NaNs of any payload equal (bytes of FP32/BF16/FP16 NaNs may
// differ in their mantissa).
void ExpectSameTensor(bool has_got, const v1::Tensor& got, bool has_want, const v1::Tensor& want,
                      const std::string& what) {
  ASSERT_EQ(has_got, has_want) << what;
  if (!has_want) return;
  EXPECT_EQ(got.dtype(), want.dtype()) << what;
  ASSERT_EQ(std::vector<int64_t>(got.shape().begin(), got.shape().end()),
            std::vector<int64_t>(want.shape().begin(), want.shape().end()))
      << what;
  ASSERT_EQ(got.data().size(), want.data().size()) << what;
  if (got.dtype() == v1::DATA_TYPE_INT64) {
    EXPECT_EQ(got.data(), want.data()) << what;
    return;
  }
  const size_t size = got.dtype() == v1::DATA_TYPE_FP32 ? 4 : 2;
  for (size_t offset = 0; offset < got.data().size(); offset += size) {
    v1::Tensor a = got, b = want;
    a.clear_shape();
    b.clear_shape();
    a.set_data(got.data().substr(offset, size));
    b.set_data(want.data().substr(offset, size));
    const double x = *ScalarValue(a, "got"), y = *ScalarValue(b, "want");
    if (std::isnan(y)) {
      EXPECT_TRUE(std::isnan(x)) << what << " element " << offset / size << ": " << x;
    } else {
      EXPECT_EQ(a.data(), b.data())
          << what << " element " << offset / size << ": " << x << " != " << y;
    }
  }
}

TEST(MicroBatchCombinerTest, SharedVectors) {
  const std::string path =
      std::string(std::getenv("TEST_SRCDIR")) + "/lmhead/tests/data/micro_batch_vectors.json";
  std::ifstream file(path);
  ASSERT_TRUE(file) << path;
  const Json vectors = Json::parse(file);
  ASSERT_GE(vectors["cases"].size(), 20u);
  for (const Json& c : vectors["cases"]) {
    const std::string name = c["name"].get<std::string>();
    CombineOptions options;
    const std::string reduction = c["reduction"].get<std::string>();
    options.reduction = reduction == "none"  ? v1::LOSS_REDUCTION_NONE
                        : reduction == "sum" ? v1::LOSS_REDUCTION_SUM
                                             : v1::LOSS_REDUCTION_MEAN;
    if (!c["loss_div_factor"].is_null()) options.loss_div_factor = Number(c["loss_div_factor"]);
    const v1::LossImplementation implementation = c["implementation"] == "fused_linear"
                                                      ? v1::LOSS_IMPLEMENTATION_FUSED_LINEAR
                                                      : v1::LOSS_IMPLEMENTATION_DEFAULT;
    options.implementation = [implementation]() -> absl::StatusOr<v1::LossImplementation> {
      return implementation;
    };
    MicroBatchCombiner combiner(options);
    for (const Json& part : c["micro_batches"]) {
      ASSERT_TRUE(combiner.Add(ToResponse(part)).ok()) << name;
    }
    absl::StatusOr<v1::ForwardResponse> got = combiner.Finish();
    ASSERT_TRUE(got.ok()) << name << ": " << got.status();
    const v1::ForwardResponse want = ToResponse(c["expected"]);
    EXPECT_EQ(got->num_scored_tokens(), want.num_scored_tokens()) << name;
    ExpectSameTensor(got->has_logits(), got->logits(), want.has_logits(), want.logits(),
                     name + ": logits");
    ExpectSameTensor(got->has_argmax(), got->argmax(), want.has_argmax(), want.argmax(),
                     name + ": argmax");
    ExpectSameTensor(got->has_loss(), got->loss(), want.has_loss(), want.loss(), name + ": loss");
    ExpectSameTensor(got->has_ce_loss(), got->ce_loss(), want.has_ce_loss(), want.ce_loss(),
                     name + ": ce_loss");
    ExpectSameTensor(got->has_z_loss(), got->z_loss(), want.has_z_loss(), want.z_loss(),
                     name + ": z_loss");
  }
}

TEST(MicroBatchCombinerTest, RefusesAnswersInAnotherDtype) {
  MicroBatchCombiner combiner({v1::LOSS_REDUCTION_SUM, std::nullopt, nullptr});
  v1::ForwardResponse a;
  *a.mutable_loss() = ScalarTensor(1.0, v1::DATA_TYPE_FP32);
  v1::ForwardResponse b;
  *b.mutable_loss() = ScalarTensor(1.0, v1::DATA_TYPE_BF16);
  ASSERT_TRUE(combiner.Add(a).ok());
  EXPECT_EQ(combiner.Add(b).code(), absl::StatusCode::kInvalidArgument);
}

// The 16-bit encodings round to nearest even, as LibTorch's casts from float32 do.
TEST(ScalarTensorTest, RoundsToNearestEven) {
  const auto bits = [](double value, v1::DataType dtype) {
    uint16_t out;
    std::memcpy(&out, ScalarTensor(value, dtype).data().data(), 2);
    return out;
  };
  EXPECT_EQ(bits(1.0, v1::DATA_TYPE_BF16), 0x3f80);
  EXPECT_EQ(bits(1.00390625, v1::DATA_TYPE_BF16), 0x3f80);  // halfway: to even
  EXPECT_EQ(bits(1.01171875, v1::DATA_TYPE_BF16), 0x3f82);  // halfway: to even, upwards
  EXPECT_EQ(bits(-2.0, v1::DATA_TYPE_BF16), 0xc000);
  EXPECT_EQ(bits(1.0, v1::DATA_TYPE_FP16), 0x3c00);
  EXPECT_EQ(bits(65504.0, v1::DATA_TYPE_FP16), 0x7bff);
  EXPECT_EQ(bits(65520.0, v1::DATA_TYPE_FP16), 0x7c00);               // rounds to inf
  EXPECT_EQ(bits(1.0 + 1.0 / 2048, v1::DATA_TYPE_FP16), 0x3c00);      // halfway: to even
  EXPECT_EQ(bits(std::ldexp(1.0, -24), v1::DATA_TYPE_FP16), 0x0001);  // smallest subnormal
  EXPECT_EQ(bits(-std::numeric_limits<double>::infinity(), v1::DATA_TYPE_FP16), 0xfc00);
  EXPECT_TRUE(std::isnan(*ScalarValue(ScalarTensor(NAN, v1::DATA_TYPE_FP16), "x")));
  EXPECT_TRUE(std::isnan(*ScalarValue(ScalarTensor(NAN, v1::DATA_TYPE_BF16), "x")));
  for (const double value : {0.1, -3.75, 1e-5, 6e-8, 300.0}) {
    for (const v1::DataType dtype : {v1::DATA_TYPE_FP16, v1::DATA_TYPE_BF16}) {
      // Round trip through the decoding is the identity on representable values.
      const double once = *ScalarValue(ScalarTensor(value, dtype), "x");
      EXPECT_EQ(*ScalarValue(ScalarTensor(once, dtype), "x"), once) << value;
    }
  }
}

}  // namespace
}  // namespace lmhead

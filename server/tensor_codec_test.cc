#include "server/tensor_codec.h"

#include <ATen/ATen.h>

#include <cstring>

#include "gtest/gtest.h"

namespace lmhead {
namespace {

v1::Tensor Wire(v1::DataType dtype, std::vector<int64_t> shape, size_t bytes) {
  v1::Tensor tensor;
  tensor.set_dtype(dtype);
  for (int64_t dim : shape) tensor.add_shape(dim);
  tensor.mutable_data()->resize(bytes);
  return tensor;
}

const TensorRule kHidden{
    "hidden_states", {v1::DATA_TYPE_BF16, v1::DATA_TYPE_FP16, v1::DATA_TYPE_FP32}, 3};

TEST(TensorCodecTest, ValidatesEveryFieldBeforeAllocating) {
  EXPECT_TRUE(ValidateTensor(Wire(v1::DATA_TYPE_FP32, {2, 3, 4}, 96), kHidden).ok());
  const struct {
    v1::Tensor tensor;
    std::string message;
  } cases[] = {
      {Wire(v1::DATA_TYPE_INT32, {2, 3, 4}, 96),
       "hidden_states.dtype: expected BF16 or FP16 or FP32, got INT32"},
      {Wire(static_cast<v1::DataType>(77), {2, 3, 4}, 96), "got unknown value 77"},
      {Wire(v1::DATA_TYPE_FP32, {2, 3}, 24), "hidden_states.shape: expected rank 3, got rank 2"},
      {Wire(v1::DATA_TYPE_FP32, {2, -1, 4}, 0),
       "hidden_states.shape[1]: expected a size >= 0, got -1"},
      {Wire(v1::DATA_TYPE_FP32, {int64_t{1} << 31, int64_t{1} << 31, int64_t{1} << 2}, 0),
       "hidden_states.shape: [2147483648, 2147483648, 4] is too large"},
      {Wire(v1::DATA_TYPE_FP32, {int64_t{1} << 61, 1, 1}, 0), "is too large"},
      // Issue 11: no element, but strides that overflow ("Stride calculation overflowed").
      {Wire(v1::DATA_TYPE_FP32, {0, int64_t{1} << 62, 8}, 0),
       "hidden_states.shape: [0, 4611686018427387904, 8] is too large"},
      {Wire(v1::DATA_TYPE_BF16, {int64_t{1} << 62, 0, 2}, 0), "is too large"},
      {Wire(v1::DATA_TYPE_BF16, {2, 3, 4}, 96),
       "hidden_states.data: expected 48 bytes (24 elements of BF16 for shape [2, 3, 4]), got 96"},
  };
  for (const auto& c : cases) {
    absl::StatusOr<std::vector<int64_t>> shape = ValidateTensor(c.tensor, kHidden);
    EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_NE(shape.status().message().find(c.message), std::string::npos)
        << shape.status().message();
    EXPECT_EQ(DecodeTensor(c.tensor, kHidden).status(), shape.status());
  }
  // The largest empty tensors whose strides still fit decode.
  absl::StatusOr<at::Tensor> empty =
      DecodeTensor(Wire(v1::DATA_TYPE_FP32, {0, int64_t{1} << 57, 8}, 0), kHidden);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->numel(), 0);
  EXPECT_EQ(ValidateTensor(Wire(v1::DATA_TYPE_FP32, std::vector<int64_t>(9, 1), 4),
                           {"x", {v1::DATA_TYPE_FP32}, -1})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TensorCodecTest, RoundTripsEveryDtypeAndEmptyTensors) {
  for (c10::ScalarType type : {at::kFloat, at::kBFloat16, at::kHalf, at::kInt, at::kLong}) {
    const at::Tensor value = at::arange(24, at::TensorOptions().dtype(type)).view({2, 3, 4});
    v1::Tensor wire;
    ASSERT_TRUE(EncodeTensor(value, DataTypeOf(type), &wire).ok());
    EXPECT_EQ(wire.data().size(), 24 * value.element_size());
    absl::StatusOr<at::Tensor> back = DecodeTensor(wire, {"t", {DataTypeOf(type)}, 3});
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_TRUE(at::equal(*back, value));
  }
  const at::Tensor empty = at::empty({0, 5, 4});
  v1::Tensor wire;
  ASSERT_TRUE(EncodeTensor(empty, v1::DATA_TYPE_FP32, &wire).ok());
  absl::StatusOr<at::Tensor> back = DecodeTensor(wire, kHidden);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->sizes(), empty.sizes());
}

TEST(TensorCodecTest, EncodesFloatsInAnotherFloatDtypeButNotAsIntegers) {
  const at::Tensor value = at::tensor({1.5f, -2.25f});
  v1::Tensor wire;
  ASSERT_TRUE(EncodeTensor(value, v1::DATA_TYPE_BF16, &wire).ok());
  EXPECT_EQ(wire.data().size(), 4u);
  EXPECT_EQ(EncodeTensor(value, v1::DATA_TYPE_INT64, &wire).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TensorCodecTest, DecodedTensorsAliasTheMessage) {
  const at::Tensor value = at::arange(8, at::kFloat).view({1, 2, 4});
  v1::Tensor wire;
  ASSERT_TRUE(EncodeTensor(value, v1::DATA_TYPE_FP32, &wire).ok());
  absl::StatusOr<at::Tensor> decoded = DecodeTensor(wire, kHidden);
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(decoded->data_ptr(), static_cast<const void*>(wire.data().data()));
}

}  // namespace
}  // namespace lmhead

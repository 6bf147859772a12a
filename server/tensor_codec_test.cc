#include "server/tensor_codec.h"

#include <ATen/ATen.h>

#include <cstring>
#include <memory>
#include <vector>

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

// A wire tensor whose bytes are in shared memory (Tensor.shared_memory).
v1::Tensor InRegion(v1::DataType dtype, std::vector<int64_t> shape, uint64_t byte_size) {
  v1::Tensor tensor = Wire(dtype, std::move(shape), 0);
  tensor.mutable_shared_memory()->set_region("r");
  tensor.mutable_shared_memory()->set_byte_size(byte_size);
  return tensor;
}

TEST(TensorCodecTest, SharedMemoryByteSizeIsCheckedLikeData) {
  EXPECT_TRUE(ValidateTensor(InRegion(v1::DATA_TYPE_FP32, {2, 3, 4}, 96), kHidden).ok());
  absl::StatusOr<std::vector<int64_t>> shape =
      ValidateTensor(InRegion(v1::DATA_TYPE_FP32, {2, 3, 4}, 95), kHidden);
  EXPECT_EQ(shape.status().message(),
            "hidden_states.shared_memory.byte_size: expected 96 bytes (24 elements of FP32 for "
            "shape [2, 3, 4]), got 95");
  v1::Tensor both = InRegion(v1::DATA_TYPE_FP32, {2, 3, 4}, 96);
  both.set_data(std::string(96, '\0'));
  EXPECT_EQ(ValidateTensor(both, kHidden).status().message(),
            "hidden_states.data: must be empty when hidden_states.shared_memory is set (a tensor's "
            "bytes are in one of them), got 96 bytes");
  // Not in the message: DecodeTensor cannot read it.
  EXPECT_EQ(DecodeTensor(InRegion(v1::DATA_TYPE_FP32, {2, 3, 4}, 96), kHidden).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(TensorCodecTest, ExternalBytesAreAliasedOrCopiedAndKeptAlive) {
  auto memory = std::make_shared<std::vector<float>>(32);
  for (int i = 0; i < 32; ++i) (*memory)[i] = static_cast<float>(i);
  std::weak_ptr<std::vector<float>> alive = memory;
  const v1::Tensor wire = InRegion(v1::DATA_TYPE_FP32, {1, 2, 4}, 32);
  ExternalBytes bytes{memory->data() + 4, c10::Device(c10::kCPU), memory};
  absl::StatusOr<at::Tensor> aliased = DecodeExternalTensor(wire, kHidden, bytes, false);
  absl::StatusOr<at::Tensor> copied = DecodeExternalTensor(wire, kHidden, bytes, true);
  ASSERT_TRUE(aliased.ok() && copied.ok());
  EXPECT_EQ(aliased->data_ptr(), static_cast<void*>(memory->data() + 4));
  EXPECT_NE(copied->data_ptr(), static_cast<void*>(memory->data() + 4));
  EXPECT_TRUE(at::equal(*aliased, at::arange(4, 12, at::kFloat).view({1, 2, 4})));
  (*memory)[4] = -1;  // the owner's change shows in the alias only
  EXPECT_EQ(aliased->flatten()[0].item<float>(), -1);
  EXPECT_EQ(copied->flatten()[0].item<float>(), 4);
  // Unaligned bytes are copied.
  ExternalBytes unaligned{reinterpret_cast<char*>(memory->data()) + 1, c10::Device(c10::kCPU),
                          memory};
  absl::StatusOr<at::Tensor> moved = DecodeExternalTensor(wire, kHidden, unaligned, false);
  ASSERT_TRUE(moved.ok());
  EXPECT_NE(moved->data_ptr(), unaligned.data);
  // The alias keeps the owner alive.
  bytes.owner.reset();
  unaligned.owner.reset();
  memory.reset();
  EXPECT_FALSE(alive.expired());
  aliased = at::Tensor();
  EXPECT_TRUE(alive.expired());
}

TEST(TensorCodecTest, EncodeTensorToWritesTheBytesAndOnlyTheHeader) {
  std::vector<uint16_t> memory(8, 0xFFFF);
  const at::Tensor value = at::tensor({1.5f, -2.25f, 3.0f}).view({1, 3});
  v1::Tensor wire;
  ASSERT_TRUE(EncodeTensorTo(value, v1::DATA_TYPE_BF16,
                             ExternalBytes{memory.data() + 1, c10::Device(c10::kCPU), nullptr}, 6,
                             &wire)
                  .ok());
  EXPECT_EQ(wire.dtype(), v1::DATA_TYPE_BF16);
  EXPECT_EQ(wire.shape_size(), 2);
  EXPECT_TRUE(wire.data().empty());
  EXPECT_EQ(memory[0], 0xFFFF);
  EXPECT_EQ(memory[1], 0x3FC0);  // 1.5 in bf16
  EXPECT_EQ(memory[3], 0x4040);  // 3.0
  EXPECT_EQ(memory[4], 0xFFFF);
  EXPECT_EQ(EncodeTensorTo(value, v1::DATA_TYPE_FP32,
                           ExternalBytes{memory.data(), c10::Device(c10::kCPU), nullptr}, 6, &wire)
                .code(),
            absl::StatusCode::kInternal);
}

TEST(TensorCodecTest, DetachedDataIsCheckedAndGatheredInRanges) {
  // 3 x 1000 x 2048 fp32 (23.4 MiB: several gather ranges), in parts of uneven sizes.
  const at::Tensor value = at::randn({3, 1000, 2048});
  const std::string bytes(static_cast<const char*>(value.data_ptr()), value.nbytes());
  DetachedData data;
  for (size_t start = 0, length = 1; start < bytes.size();
       start += length, length = length * 3 + 1) {
    data.parts.push_back(absl::string_view(bytes).substr(start, length));
    data.size += data.parts.back().size();
  }
  v1::Tensor wire;
  wire.set_dtype(v1::DATA_TYPE_FP32);
  for (const int64_t size : value.sizes()) wire.add_shape(size);
  const TensorRule rule{"hidden_states", {v1::DATA_TYPE_FP32}, 3};
  absl::StatusOr<at::Tensor> decoded = DecodeTensor(wire, rule, &data);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(at::equal(*decoded, value));

  data.size -= 4;  // one element short: the data's length is checked as a message's would be
  data.parts.back().remove_suffix(4);
  EXPECT_EQ(DecodeTensor(wire, rule, &data).status().message(),
            "hidden_states.data: expected 24576000 bytes (6144000 elements of FP32 for shape [3, "
            "1000, 2048]), got 24575996");
}

}  // namespace
}  // namespace lmhead

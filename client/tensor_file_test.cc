#include "client/tensor_file.h"

#include <cstdlib>
#include <cstring>
#include <fstream>

#include "gtest/gtest.h"

namespace lmhead {
namespace {

// A version-1 .npy file for a little-endian array with `descr` and `shape` ("(2, 3)").
std::string Npy(const std::string& descr, const std::string& shape, const std::string& data,
                const std::string& order = "False") {
  std::string header =
      "{'descr': '" + descr + "', 'fortran_order': " + order + ", 'shape': " + shape + ", }";
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header += '\n';
  std::string out = "\x93NUMPY";
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  return out + header + data;
}

TEST(TensorFileTest, ParsesNpy) {
  const float values[6] = {1, 2, 3, 4, 5, 6};
  absl::StatusOr<v1::Tensor> tensor =
      ParseNpy(Npy("<f4", "(2, 3)", std::string(reinterpret_cast<const char*>(values), 24)));
  ASSERT_TRUE(tensor.ok()) << tensor.status();
  EXPECT_EQ(tensor->dtype(), v1::DATA_TYPE_FP32);
  ASSERT_EQ(tensor->shape_size(), 2);
  EXPECT_EQ(tensor->shape(0), 2);
  EXPECT_EQ(tensor->shape(1), 3);
  EXPECT_EQ(tensor->data().size(), 24u);

  absl::StatusOr<v1::Tensor> scalar = ParseNpy(Npy("<i8", "()", std::string(8, '\0')));
  ASSERT_TRUE(scalar.ok()) << scalar.status();
  EXPECT_EQ(scalar->shape_size(), 0);
  absl::StatusOr<v1::Tensor> vector = ParseNpy(Npy("<i4", "(3,)", std::string(12, '\0')));
  ASSERT_TRUE(vector.ok()) << vector.status();
  EXPECT_EQ(vector->shape(0), 3);
}

TEST(TensorFileTest, RejectsNpyItCannotRead) {
  EXPECT_NE(ParseNpy("not numpy").status().message().find("magic"), std::string::npos);
  EXPECT_NE(ParseNpy(Npy("<f8", "(1,)", std::string(8, '\0'))).status().message().find("'<f8'"),
            std::string::npos);
  EXPECT_NE(ParseNpy(Npy("<f4", "(2, 2)", std::string(16, '\0'), "True"))
                .status()
                .message()
                .find("fortran_order"),
            std::string::npos);
  EXPECT_NE(ParseNpy(Npy("<f4", "(2, 2)", std::string(12, '\0')))
                .status()
                .message()
                .find("expected 16 bytes"),
            std::string::npos);
}

TEST(TensorFileTest, SafetensorsRoundTripWithMetadata) {
  v1::Tensor a;
  a.set_dtype(v1::DATA_TYPE_BF16);
  a.add_shape(3);
  a.set_data("abcdef");
  v1::Tensor b;
  b.set_dtype(v1::DATA_TYPE_INT64);
  b.set_data(std::string(8, '\x07'));
  const std::string bytes = *SerializeSafetensorsTensors({{"a", a}, {"b", b}}, {{"k", "v"}});
  absl::StatusOr<std::map<std::string, v1::Tensor>> back = ParseSafetensorsTensors(bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), 2u);
  EXPECT_EQ(back->at("a").SerializeAsString(), a.SerializeAsString());
  EXPECT_EQ(back->at("b").SerializeAsString(), b.SerializeAsString());

  const std::string dir = std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp";
  ASSERT_TRUE(WriteSafetensorsFile(dir + "/t.safetensors", {{"a", a}, {"b", b}}).ok());
  absl::StatusOr<v1::Tensor> named = ReadTensorFile(dir + "/t.safetensors", "b");
  ASSERT_TRUE(named.ok()) << named.status();
  EXPECT_EQ(named->data(), b.data());
  EXPECT_NE(ReadTensorFile(dir + "/t.safetensors").status().message().find("holds 2 tensors"),
            std::string::npos);
  EXPECT_EQ(ReadTensorFile(dir + "/t.safetensors", "c").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(ReadTensorFile(dir + "/t.txt").status().code(), absl::StatusCode::kNotFound);
}

TEST(TensorFileTest, RejectsSafetensorsWithBadOffsets) {
  v1::Tensor a;
  a.set_dtype(v1::DATA_TYPE_FP32);
  a.add_shape(2);
  a.set_data(std::string(8, '\0'));
  std::string bytes = *SerializeSafetensorsTensors({{"a", a}});
  bytes.resize(bytes.size() - 4);  // truncated data
  absl::StatusOr<std::map<std::string, v1::Tensor>> parsed = ParseSafetensorsTensors(bytes);
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(parsed.status().message().find("tensor 'a'"), std::string::npos) << parsed.status();
}

}  // namespace
}  // namespace lmhead

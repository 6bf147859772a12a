#include "client/tensor_file.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/safetensors_format.h"
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

std::string TempDir() { return std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp"; }

// Writes `bytes` to a file `name` in the test's temporary directory; returns its path.
std::string WriteFile(const std::string& name, const std::string& bytes) {
  const std::string path = TempDir() + "/" + name;
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  return path;
}

// `n` bytes that differ from position to position.
std::string Pattern(size_t n) {
  std::string bytes(n, '\0');
  for (size_t i = 0; i < n; ++i) bytes[i] = static_cast<char>(i * 131 + 7);
  return bytes;
}

// What the CLI read before it mapped files: the whole file, then ParseNpy.
absl::StatusOr<v1::Tensor> ReadNpyWhole(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadWholeFile(path);
  if (!bytes.ok()) return bytes.status();
  absl::StatusOr<v1::Tensor> tensor = ParseNpy(*std::move(bytes));
  if (!tensor.ok()) {
    return absl::Status(tensor.status().code(),
                        absl::StrCat(path, ": ", tensor.status().message()));
  }
  return tensor;
}

// The view's dtype, shape and bytes equal `tensor`'s.
void ExpectSame(const TensorView& view, const v1::Tensor& tensor) {
  EXPECT_EQ(view.dtype, tensor.dtype());
  EXPECT_EQ(view.shape, std::vector<int64_t>(tensor.shape().begin(), tensor.shape().end()));
  EXPECT_EQ(view.data, tensor.data());
  EXPECT_NE(view.owner, nullptr);
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

// BOOL outputs (segment_is_greedy) are written as safetensors "BOOL" and read back; .npy '|b1'
// reads as BOOL.
TEST(TensorFileTest, BoolRoundTrips) {
  v1::Tensor greedy;
  greedy.set_dtype(v1::DATA_TYPE_BOOL);
  greedy.add_shape(2);
  greedy.add_shape(3);
  greedy.set_data(std::string("\x01\x00\x01\x01\x00\x00", 6));
  const std::string path = TempDir() + "/bool.safetensors";
  ASSERT_TRUE(WriteSafetensorsFile(path, {{"segment_is_greedy", greedy}}).ok());
  absl::StatusOr<std::string> bytes = ReadWholeFile(path);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<SafetensorsContents> contents = ParseSafetensorsContents(*bytes);
  ASSERT_TRUE(contents.ok()) << contents.status();
  EXPECT_EQ(contents->tensors.at("segment_is_greedy").dtype, "BOOL");
  absl::StatusOr<v1::Tensor> back = ReadTensorFile(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->SerializeAsString(), greedy.SerializeAsString());

  absl::StatusOr<v1::Tensor> npy = ParseNpy(Npy("|b1", "(2, 3)", greedy.data()));
  ASSERT_TRUE(npy.ok()) << npy.status();
  EXPECT_EQ(npy->SerializeAsString(), greedy.SerializeAsString());
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

TEST(TensorFileTest, MapsNpyAsItWasRead) {
  struct Case {
    std::string descr, shape;
    v1::DataType dtype;
    std::vector<int64_t> dims;
    size_t bytes;
  };
  const std::vector<Case> cases = {
      {"<f2", "(2, 3)", v1::DATA_TYPE_FP16, {2, 3}, 12},
      {"<f4", "(2, 3, 4)", v1::DATA_TYPE_FP32, {2, 3, 4}, 96},
      {"<i4", "(5,)", v1::DATA_TYPE_INT32, {5}, 20},
      {"<i8", "(3, 2)", v1::DATA_TYPE_INT64, {3, 2}, 48},
      {"<i8", "()", v1::DATA_TYPE_INT64, {}, 8},
      {"<f4", "(0, 3, 4)", v1::DATA_TYPE_FP32, {0, 3, 4}, 0},
      {"<f2", "(2, 0, 4)", v1::DATA_TYPE_FP16, {2, 0, 4}, 0},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.descr + " " + c.shape);
    const std::string data = Pattern(c.bytes);
    const std::string path = WriteFile("mapped.npy", Npy(c.descr, c.shape, data));
    absl::StatusOr<TensorView> view = MapTensorFile(path);
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ(view->dtype, c.dtype);
    EXPECT_EQ(view->shape, c.dims);
    EXPECT_EQ(view->data, data);
    absl::StatusOr<v1::Tensor> whole = ReadNpyWhole(path);
    ASSERT_TRUE(whole.ok()) << whole.status();
    ExpectSame(*view, *whole);
    absl::StatusOr<v1::Tensor> read = ReadTensorFile(path);
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_EQ(read->SerializeAsString(), whole->SerializeAsString());
  }
  // Format version 2 (a 4-byte header length).
  std::string v2 = Npy("<f4", "(2, 2)", Pattern(16));
  const std::string header = v2.substr(10);
  v2 = std::string("\x93NUMPY\x02\x00", 8) + std::string(1, static_cast<char>(v2[8])) +
       std::string(1, v2[9]) + std::string(2, '\0') + header;
  absl::StatusOr<TensorView> view = MapTensorFile(WriteFile("v2.npy", v2));
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->data, Pattern(16));
}

TEST(TensorFileTest, MapsSafetensorsAsItWasRead) {
  std::map<std::string, v1::Tensor> tensors;
  v1::Tensor& bf16 = tensors["hidden"];
  bf16.set_dtype(v1::DATA_TYPE_BF16);
  for (int64_t dim : {2, 3, 4}) bf16.add_shape(dim);
  bf16.set_data(Pattern(48));
  v1::Tensor& labels = tensors["labels"];
  labels.set_dtype(v1::DATA_TYPE_INT64);
  for (int64_t dim : {2, 3}) labels.add_shape(dim);
  labels.set_data(Pattern(48).substr(5) + "abcde");
  v1::Tensor& empty = tensors["empty"];
  empty.set_dtype(v1::DATA_TYPE_FP16);
  for (int64_t dim : {0, 7}) empty.add_shape(dim);
  const std::string path = TempDir() + "/several.safetensors";
  ASSERT_TRUE(WriteSafetensorsFile(path, tensors).ok());
  for (const auto& [name, tensor] : tensors) {
    SCOPED_TRACE(name);
    absl::StatusOr<TensorView> view = MapTensorFile(path, name);
    ASSERT_TRUE(view.ok()) << view.status();
    ExpectSame(*view, tensor);
    absl::StatusOr<v1::Tensor> read = ReadTensorFile(path, name);
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_EQ(read->SerializeAsString(), tensor.SerializeAsString());
  }
  // bf16 stays bf16, byte for byte.
  const std::string one = TempDir() + "/bf16.safetensors";
  ASSERT_TRUE(WriteSafetensorsFile(one, {{"x", bf16}}).ok());
  absl::StatusOr<TensorView> only = MapTensorFile(one);
  ASSERT_TRUE(only.ok()) << only.status();
  ExpectSame(*only, bf16);

  EXPECT_EQ(MapTensorFile(path).status(), ReadTensorFile(path).status());
  EXPECT_NE(MapTensorFile(path).status().message().find("holds 3 tensors (empty, hidden, labels)"),
            std::string::npos);
  EXPECT_EQ(MapTensorFile(path, "nope").status(),
            absl::NotFoundError(path + ": no tensor named 'nope'"));
}

TEST(TensorFileTest, MappedViewOutlivesTheFileAndItsName) {
  const std::string data = Pattern(64);
  const std::string path = WriteFile("gone.npy", Npy("<f4", "(4, 4)", data));
  absl::StatusOr<TensorView> view = MapTensorFile(path);
  ASSERT_TRUE(view.ok()) << view.status();
  ASSERT_EQ(unlink(path.c_str()), 0);
  TensorView copy = *view;
  view = absl::UnknownError("dropped");
  EXPECT_EQ(copy.data, data);  // the copy's owner keeps the mapping
}

// Truncated and corrupt files: MapTensorFile says what reading the whole file said.
TEST(TensorFileTest, MappedFilesFailAsReadOnes) {
  const std::string full = Npy("<f4", "(2, 2)", Pattern(16));
  struct Case {
    std::string name, bytes, expected;
  };
  const std::vector<Case> npy_cases = {
      {"short_data", full.substr(0, full.size() - 4), "expected 16 bytes of data"},
      {"long_data", full + "x", "expected 16 bytes of data"},
      {"short_header", full.substr(0, 40), "npy: truncated header"},
      {"short_magic", full.substr(0, 8), "no \\x93NUMPY magic"},
      {"empty", "", "no \\x93NUMPY magic"},
      {"overflow", Npy("<f4", "(4294967296, 4294967296, 4294967296)", ""),
       "expected -1 bytes of data"},
      {"negative", Npy("<f4", "(-1, 2)", ""), "cannot read shape"},
      {"bf16_npy", Npy("<V2", "(2,)", Pattern(4)), "use .safetensors for bfloat16"},
      {"fortran", Npy("<f4", "(2, 2)", Pattern(16), "True"), "fortran_order"},
      {"big_endian", Npy(">f4", "(2, 2)", Pattern(16)), "'>f4' is not supported"},
      {"version", std::string("\x93NUMPY\x04\x00\x00\x00", 10), "unsupported format version 4"},
  };
  for (const Case& c : npy_cases) {
    SCOPED_TRACE(c.name);
    const std::string path = WriteFile(c.name + ".npy", c.bytes);
    const absl::Status mapped = MapTensorFile(path).status();
    EXPECT_EQ(mapped.code(), absl::StatusCode::kInvalidArgument) << mapped;
    EXPECT_NE(mapped.message().find(c.expected), std::string::npos) << mapped;
    EXPECT_EQ(mapped, ReadNpyWhole(path).status());
    EXPECT_EQ(mapped, ReadTensorFile(path).status());
  }

  // A .safetensors file of `header` (JSON) and `data`.
  const auto safetensors = [](const std::string& header, const std::string& data) {
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
    return bytes + header + data;
  };
  const std::string good =
      safetensors(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", Pattern(16));
  ASSERT_TRUE(ParseSafetensorsTensors(good).ok());
  const std::string past_end =
      safetensors(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,99]}})", Pattern(16));
  const std::string overflow = safetensors(
      R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}})",
      Pattern(16));
  const std::vector<Case> safetensors_cases = {
      {"truncated", good.substr(0, good.size() - 4),
       "tensor 'a': data_offsets [0, 16) must satisfy"},
      {"past_end", past_end, "begin <= end <= 16 (the byte buffer's size)"},
      {"overflow", overflow, "has too many elements"},
      {"short_length", good.substr(0, 5), "safetensors:"},
      {"short_json", good.substr(0, 20), "safetensors:"},
      {"empty", "", "safetensors:"},
  };
  for (const Case& c : safetensors_cases) {
    SCOPED_TRACE(c.name);
    const std::string path = WriteFile(c.name + ".safetensors", c.bytes);
    const absl::Status mapped = MapTensorFile(path).status();
    EXPECT_EQ(mapped.code(), absl::StatusCode::kInvalidArgument) << mapped;
    EXPECT_NE(mapped.message().find(c.expected), std::string::npos) << mapped;
    EXPECT_EQ(mapped.message().substr(0, path.size() + 2), path + ": ") << mapped;
    EXPECT_EQ(mapped.message().substr(path.size() + 2),
              ParseSafetensorsTensors(c.bytes).status().message());
    EXPECT_EQ(mapped, ReadTensorFile(path).status());
  }
}

TEST(TensorFileTest, MapsOnlyRegularFilesWithAKnownExtension) {
  const absl::Status missing = MapTensorFile(TempDir() + "/missing.npy").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.message().find("cannot open"), std::string::npos) << missing;
  const std::string dir = TempDir() + "/dir.npy";
  mkdir(dir.c_str(), 0755);
  const absl::Status directory = MapTensorFile(dir).status();
  EXPECT_EQ(directory, absl::NotFoundError("'" + dir + "' is not a regular file"));
  EXPECT_EQ(directory, ReadWholeFile(dir).status());
  const std::string text = WriteFile("t.txt", Npy("<f4", "(1,)", Pattern(4)));
  EXPECT_EQ(MapTensorFile(text).status(),
            absl::InvalidArgumentError(text + ": expected a .npy or .safetensors file"));
}

}  // namespace
}  // namespace lmhead

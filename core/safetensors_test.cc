#include "core/safetensors.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;

// Written by the reference implementation (Python package safetensors 0.8.0, torch 2.11):
//
//   import torch, safetensors.torch as st
//   st.save({"a.weight": torch.tensor([[0.5, -1.0, 2.25], [3.0, -0.125, 100.0]]),
//            "b.bias": torch.tensor([1.5, -2.0, 0.0078125], dtype=torch.bfloat16)},
//           metadata={"format": "pt"}).hex()
//
// It has one metadata key and tensors whose name order is also the reference's write order
// (dtype alignment, descending, then name): the reference iterates metadata in hash order and
// we write both in name order, so only such files can match byte for byte.
constexpr char kReferenceFileHex[] =
    "a000000000000000"
    "7b225f5f6d657461646174615f5f223a7b22666f726d6174223a227074227d2c"
    "22612e776569676874223a7b226474797065223a22463332222c227368617065"
    "223a5b322c335d2c22646174615f6f66667365747322"
    "3a5b302c32345d7d2c22622e62696173223a7b226474797065223a2242463136"
    "222c227368617065223a5b335d2c22646174615f6f666673657473223a5b3234"
    "2c33305d7d7d20202020"
    "0000003f000080bf0000104000004040000000be0000c842"
    "c03f00c0003c";

// A file with the given header text and byte buffer.
std::string MakeFile(const std::string& header, const std::string& buffer = "") {
  std::string out;
  const uint64_t size = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((size >> (8 * i)) & 0xFF));
  return out + header + buffer;
}

void ExpectInvalid(const std::string& bytes, const std::string& expected_substring) {
  absl::StatusOr<SafetensorsFile> file = ParseSafetensors(bytes);
  ASSERT_FALSE(file.ok()) << "expected an error containing: " << expected_substring;
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(expected_substring));
}

void ExpectSameTensor(const at::Tensor& actual, const at::Tensor& expected) {
  EXPECT_EQ(actual.scalar_type(), expected.scalar_type());
  EXPECT_EQ(actual.sizes(), expected.sizes());
  EXPECT_TRUE(actual.device().is_cpu());
  EXPECT_TRUE(actual.is_contiguous());
  EXPECT_TRUE(at::equal(actual, expected.cpu())) << actual << "\nvs\n" << expected;
}

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir != nullptr ? dir : "/tmp", "/", name);
}

std::map<std::string, at::Tensor> EveryDtype() {
  const at::Tensor values = at::arange(-6, 6, at::kDouble).reshape({3, 4}) * 0.75;
  std::map<std::string, at::Tensor> tensors;
  tensors["f64"] = values + 1e-9;
  tensors["f32"] = values.to(at::kFloat);
  tensors["f16"] = values.to(at::kHalf);
  tensors["bf16"] = values.to(at::kBFloat16);
  tensors["i64"] = at::tensor({std::numeric_limits<int64_t>::min(), int64_t{-1}, int64_t{0},
                               std::numeric_limits<int64_t>::max()});
  tensors["i32"] = at::arange(-5, 5, at::kInt).reshape({2, 5});
  tensors["i16"] = at::tensor({-32768, 7, 32767}, at::kShort);
  tensors["i8"] = at::tensor({-128, 0, 127}, at::kChar);
  tensors["u8"] = at::tensor({0, 128, 255}, at::kByte);
  tensors["bool"] = at::tensor({1, 0, 0, 1}).to(at::kBool);
  tensors["scalar"] = at::scalar_tensor(3.5, at::kFloat);  // 0-d
  tensors["empty"] = at::empty({0, 4}, at::kBFloat16);
  return tensors;
}

TEST(SafetensorsTest, RoundTripsEveryDtypeAndMetadata) {
  const std::map<std::string, at::Tensor> tensors = EveryDtype();
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"note", "ünïcode \"quoted\"\n"}};
  absl::StatusOr<std::string> bytes = SerializeSafetensors(tensors, metadata);
  ASSERT_TRUE(bytes.ok()) << bytes.status();

  absl::StatusOr<SafetensorsFile> file = ParseSafetensors(*bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata, metadata);
  ASSERT_EQ(file->tensors.size(), tensors.size());
  for (const auto& [name, tensor] : tensors) {
    SCOPED_TRACE(name);
    ASSERT_EQ(file->tensors.count(name), 1);
    ExpectSameTensor(file->tensors.at(name), tensor);
  }
  EXPECT_EQ(file->tensors.at("scalar").dim(), 0);
  EXPECT_THAT(file->tensors.at("empty").sizes().vec(), ElementsAre(0, 4));
}

TEST(SafetensorsTest, SerializedLayoutFollowsTheFormat) {
  absl::StatusOr<std::string> bytes =
      SerializeSafetensors({{"b", at::ones({3}, at::kShort)}, {"a", at::zeros({2}, at::kLong)}});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  uint64_t header_size = 0;
  for (int i = 0; i < 8; ++i) {
    header_size |= uint64_t{static_cast<unsigned char>((*bytes)[i])} << (8 * i);
  }
  EXPECT_EQ(header_size % 8, 0u);
  ASSERT_EQ(bytes->size(), 8 + header_size + 2 * 8 + 3 * 2);
  const std::string header = bytes->substr(8, header_size);
  // Name order, packed, no "__metadata__" when there is none, padded with spaces.
  EXPECT_EQ(header.substr(0, header.find_last_not_of(' ') + 1),
            R"({"a":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},)"
            R"("b":{"dtype":"I16","shape":[3],"data_offsets":[16,22]}})");
}

TEST(SafetensorsTest, ParsesReferenceFileExactly) {
  const std::string bytes = absl::HexStringToBytes(kReferenceFileHex);
  absl::StatusOr<SafetensorsFile> file = ParseSafetensors(bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_THAT(file->metadata, ElementsAre(Pair("format", "pt")));
  ASSERT_EQ(file->tensors.size(), 2u);

  const at::Tensor& weight = file->tensors.at("a.weight");
  ASSERT_EQ(weight.scalar_type(), at::kFloat);
  ASSERT_THAT(weight.sizes().vec(), ElementsAre(2, 3));
  const float* w = weight.data_ptr<float>();
  EXPECT_THAT(std::vector<float>(w, w + 6), ElementsAre(0.5f, -1.0f, 2.25f, 3.0f, -0.125f, 100.0f));

  const at::Tensor& bias = file->tensors.at("b.bias");
  ASSERT_EQ(bias.scalar_type(), at::kBFloat16);
  ASSERT_THAT(bias.sizes().vec(), ElementsAre(3));
  const at::Tensor bias_f32 = bias.to(at::kFloat);
  const float* b = bias_f32.data_ptr<float>();
  EXPECT_THAT(std::vector<float>(b, b + 3), ElementsAre(1.5f, -2.0f, 0.0078125f));
}

TEST(SafetensorsTest, SerializesReferenceFileByteForByte) {
  const std::string expected = absl::HexStringToBytes(kReferenceFileHex);
  const std::map<std::string, at::Tensor> tensors = {
      {"a.weight", at::tensor({0.5f, -1.0f, 2.25f, 3.0f, -0.125f, 100.0f}).reshape({2, 3})},
      {"b.bias", at::tensor({1.5f, -2.0f, 0.0078125f}).to(at::kBFloat16)},
  };
  absl::StatusOr<std::string> bytes = SerializeSafetensors(tensors, {{"format", "pt"}});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(absl::BytesToHexString(*bytes), absl::BytesToHexString(expected));

  // And re-serialising what we parsed reproduces the file.
  absl::StatusOr<SafetensorsFile> file = ParseSafetensors(expected);
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<std::string> again = SerializeSafetensors(file->tensors, file->metadata);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, expected);
}

TEST(SafetensorsTest, SerializesViewsByValue) {
  const at::Tensor base = at::arange(12, at::kFloat).reshape({3, 4});
  const std::map<std::string, at::Tensor> tensors = {
      {"transposed", base.t()},
      {"sliced", base.slice(/*dim=*/1, /*start=*/1, /*end=*/3)},
      {"negated", at::_neg_view(base)},  // contiguous, but its memory holds `base`
  };
  absl::StatusOr<std::string> bytes = SerializeSafetensors(tensors);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<SafetensorsFile> file = ParseSafetensors(*bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  for (const auto& [name, tensor] : tensors) {
    SCOPED_TRACE(name);
    ExpectSameTensor(file->tensors.at(name), tensor.clone());
  }
  EXPECT_EQ(file->tensors.at("negated")[0][1].item<float>(), -1.0f);
}

TEST(SafetensorsTest, RejectsUnsupportedTensorsNamingThem) {
  absl::StatusOr<std::string> bytes =
      SerializeSafetensors({{"ok", at::ones({2})}, {"z", at::ones({2}, at::kComplexFloat)}});
  ASSERT_FALSE(bytes.ok());
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bytes.status().message()), HasSubstr("tensor 'z': dtype ComplexFloat"));

  bytes = SerializeSafetensors({{"undefined", at::Tensor()}});
  ASSERT_FALSE(bytes.ok());
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bytes.status().message()), HasSubstr("tensor 'undefined'"));

  bytes = SerializeSafetensors({{"__metadata__", at::ones({1})}});
  ASSERT_FALSE(bytes.ok());
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument);

  bytes = SerializeSafetensors({{"bad\xff", at::ones({1})}});
  ASSERT_FALSE(bytes.ok());
  EXPECT_THAT(std::string(bytes.status().message()), HasSubstr("UTF-8"));
}

TEST(SafetensorsTest, WritesAndReadsFiles) {
  const std::string path = TempPath("round_trip.safetensors");
  const std::map<std::string, at::Tensor> tensors = EveryDtype();
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"k", "v"}}).ok());
  EXPECT_EQ(std::ifstream(path + ".tmp").good(), false) << "temporary file left behind";

  absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_THAT(file->metadata, ElementsAre(Pair("k", "v")));
  for (const auto& [name, tensor] : tensors) {
    SCOPED_TRACE(name);
    ExpectSameTensor(file->tensors.at(name), tensor);
  }

  // Overwriting replaces the file.
  ASSERT_TRUE(WriteSafetensors(path, {{"only", at::ones({1})}}).ok());
  file = ReadSafetensors(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->tensors.size(), 1u);
  EXPECT_TRUE(file->metadata.empty());
}

TEST(SafetensorsTest, ReadReportsMissingFileAsNotFound) {
  absl::StatusOr<SafetensorsFile> file = ReadSafetensors(TempPath("does_not_exist.safetensors"));
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("does_not_exist.safetensors"));

  file = ReadSafetensors(TempPath(""));  // a directory
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, ReadParsesFileContents) {
  const std::string path = TempPath("truncated.safetensors");
  std::ofstream(path, std::ios::binary) << std::string("\x10\x00\x00", 3);
  absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("truncated"));
}

TEST(SafetensorsTest, AcceptsEmptyFileAndEmptyTensorsAnywhere) {
  absl::StatusOr<SafetensorsFile> file = ParseSafetensors(MakeFile("{}"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE(file->tensors.empty());

  // Empty tensors hold no bytes, so they overlap nothing.
  file = ParseSafetensors(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                   R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                                   std::string(8, '\0')));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->tensors.at("e").numel(), 0);
}

TEST(SafetensorsTest, RejectsTruncatedFile) {
  ExpectInvalid("", "truncated");
  ExpectInvalid(std::string("\x02\x00\x00\x00", 4), "truncated");
}

TEST(SafetensorsTest, RejectsHeaderSizeBeyondFile) {
  std::string bytes = MakeFile(R"({"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})");
  bytes[0] = static_cast<char>(bytes[0] + 1);
  ExpectInvalid(bytes, "header size");
  ExpectInvalid(std::string("\xff\xff\xff\xff\xff\xff\xff\xff{}", 10), "exceeds the limit");
  ExpectInvalid(std::string("\x00\x00\x00\x00\x01\x00\x00\x00{}", 10), "exceeds the limit");
}

TEST(SafetensorsTest, RejectsNonJsonHeader) {
  ExpectInvalid(MakeFile(R"({"a": {"dtype": )"), "header is not valid JSON");
  ExpectInvalid(MakeFile("not json"), "header is not valid JSON");
  ExpectInvalid(MakeFile(""), "header is not valid JSON");
  ExpectInvalid(MakeFile("{\"\xff\":1}"), "header is not valid JSON");  // not UTF-8
  ExpectInvalid(MakeFile("[1, 2]"), "header is a JSON array, expected an object");
}

TEST(SafetensorsTest, RejectsMalformedEntries) {
  ExpectInvalid(MakeFile(R"({"w":[1]})"), "tensor 'w': header entry is array");
  ExpectInvalid(MakeFile(R"({"w":{"shape":[],"data_offsets":[0,4]}})", "abcd"),
                "tensor 'w': missing string field 'dtype'");
  ExpectInvalid(MakeFile(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", "abcd"),
                "tensor 'w': missing array field 'shape'");
  ExpectInvalid(MakeFile(R"({"w":{"dtype":"F32","shape":[]}})", "abcd"),
                "tensor 'w': missing field 'data_offsets'");
  ExpectInvalid(MakeFile(R"({"w":{"dtype":"F32","shape":[],"data_offsets":[0,4.0]}})", "abcd"),
                "tensor 'w': data_offsets [0,4.0] must be two non-negative integers");
}

TEST(SafetensorsTest, RejectsUnknownDtype) {
  ExpectInvalid(MakeFile(R"({"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})",
                         std::string(16, '\0')),
                "tensor 'w': unknown dtype 'F128'");
}

TEST(SafetensorsTest, RejectsNegativeOrNonIntegerDims) {
  ExpectInvalid(MakeFile(R"({"w":{"dtype":"F32","shape":[2,-3],"data_offsets":[0,0]}})"),
                "tensor 'w': shape[1] is -3, expected a non-negative integer");
  ExpectInvalid(MakeFile(R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,0]}})"),
                "tensor 'w': shape[0] is 1.5");
}

TEST(SafetensorsTest, RejectsOverflowingShapes) {
  ExpectInvalid(MakeFile(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],)"
                         R"("data_offsets":[0,0]}})"),
                "tensor 'w': shape [4294967296,4294967296] has too many elements");
  // Empty, but LibTorch's strides for it would overflow.
  ExpectInvalid(MakeFile(R"({"w":{"dtype":"F32","shape":[0,4294967296,4294967296],)"
                         R"("data_offsets":[0,0]}})"),
                "has too many elements");
  ExpectInvalid(MakeFile(R"({"w":{"dtype":"F64","shape":[2305843009213693952],)"
                         R"("data_offsets":[0,0]}})"),
                "has too many bytes");
}

TEST(SafetensorsTest, RejectsShapeOffsetMismatch) {
  absl::StatusOr<SafetensorsFile> file = ParseSafetensors(
      MakeFile(R"({"w_out.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,10]}})",
               std::string(10, '\0')));
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(file.status().message(),
            "safetensors: tensor 'w_out.weight': data_offsets [0, 10) hold 10 bytes, shape [2, 3] "
            "of F32 needs 24");
}

TEST(SafetensorsTest, RejectsOverlappingTensors) {
  ExpectInvalid(MakeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         std::string(12, '\0')),
                "tensor 'b': data_offsets [4, 12) overlap tensor 'a' at [0, 8)");
  // Nested inside a longer range.
  ExpectInvalid(MakeFile(R"({"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},)"
                         R"("b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},)"
                         R"("c":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})",
                         std::string(10, '\0')),
                "overlap tensor 'a'");
  // Identical ranges.
  ExpectInvalid(MakeFile(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},)"
                         R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                         std::string(4, '\0')),
                "overlap");
}

TEST(SafetensorsTest, RejectsOffsetsBeyondBuffer) {
  ExpectInvalid(
      MakeFile(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(7, '\0')),
      "tensor 'w': data_offsets [0, 8) must satisfy begin <= end <= 7");
  ExpectInvalid(
      MakeFile(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[9,9]}})", std::string(8, '\0')),
      "tensor 'w': data_offsets [9, 9)");
  ExpectInvalid(
      MakeFile(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", std::string(8, '\0')),
      "tensor 'w': data_offsets [8, 4) must satisfy begin <= end");
  ExpectInvalid(
      MakeFile(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", std::string(8, '\0')),
      "tensor 'w': data_offsets [-4,0] must be two non-negative integers");
}

TEST(SafetensorsTest, RejectsMetadataThatIsNotStringToString) {
  ExpectInvalid(MakeFile(R"({"__metadata__":{"format":"pt","step":3}})"),
                "'__metadata__' entry 'step' is number, expected a string");
  ExpectInvalid(MakeFile(R"({"__metadata__":["format"]})"),
                "'__metadata__' is array, expected an object of strings");
  ExpectInvalid(MakeFile(R"({"__metadata__":{"nested":{"a":"b"}}})"),
                "'__metadata__' entry 'nested' is object");
}

}  // namespace
}  // namespace lmhead

namespace lmhead {
namespace {

// Random corruptions of a valid file (seeded, bounded): each parse either succeeds with
// tensors whose byte counts match their shapes, or fails with INVALID_ARGUMENT; never crashes.
TEST(SafetensorsTest, RandomCorruptionsNeverCrash) {
  absl::StatusOr<std::string> valid =
      SerializeSafetensors({{"w_out.weight", at::arange(24, at::kFloat).view({4, 6})},
                            {"w_out.bias", at::arange(4, at::kBFloat16)},
                            {"norm.weight", at::ones({6}, at::kHalf)}},
                           {{"format", "pt"}});
  ASSERT_TRUE(valid.ok());
  std::mt19937_64 rng(20261128);
  int parsed = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string bytes = *valid;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % bytes.size();
      switch (rng() % 3) {
        case 0:
          bytes[at] = static_cast<char>(rng());
          break;  // flip a byte
        case 1:
          bytes.resize(at);
          break;  // truncate
        case 2:
          bytes.insert(at, 1, "{}[]\",:0-9e"[rng() % 11]);
          break;  // insert JSON-ish
      }
      if (bytes.empty()) break;
    }
    absl::StatusOr<SafetensorsFile> file = ParseSafetensors(bytes);
    if (file.ok()) {
      ++parsed;
      for (const auto& [name, tensor] : file->tensors) {
        EXPECT_TRUE(tensor.defined()) << name;
        EXPECT_TRUE(tensor.is_contiguous()) << name;
      }
    } else {
      EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    }
  }
  EXPECT_GT(parsed, 0);  // flips inside the data section leave the file valid
}

}  // namespace
}  // namespace lmhead

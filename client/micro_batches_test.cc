// MicroBatchCombiner against the shared test vectors (tests/data/micro_batch_vectors.json), which
// the Python client is tested against too, and the scalar encodings it rounds with.
#include "client/micro_batches.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <utility>
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
    if (dtype == v1::DATA_TYPE_BOOL) {
      data.push_back(value.get<bool>() ? '\1' : '\0');
    } else if (dtype == v1::DATA_TYPE_INT64) {
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
  if (json.contains("scoring")) {
    v1::ScoringOutputs* scoring = response.mutable_scoring();
    for (const auto& [name, tensor] : json["scoring"].items()) {
      const google::protobuf::FieldDescriptor* field =
          v1::ScoringOutputs::descriptor()->FindFieldByName(name);
      EXPECT_NE(field, nullptr) << name;
      if (field == nullptr) continue;
      scoring->GetReflection()->MutableMessage(scoring, field)->CopyFrom(ToTensor(tensor));
    }
  }
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
  if (got.dtype() == v1::DATA_TYPE_INT64 || got.dtype() == v1::DATA_TYPE_BOOL) {
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
  ASSERT_GE(vectors["cases"].size(), 24u);
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
    const google::protobuf::Descriptor* scoring = v1::ScoringOutputs::descriptor();
    for (int f = 0; f < scoring->field_count(); ++f) {
      const google::protobuf::FieldDescriptor* field = scoring->field(f);
      const google::protobuf::Reflection* reflection = v1::ScoringOutputs::GetReflection();
      ExpectSameTensor(
          reflection->HasField(got->scoring(), field),
          static_cast<const v1::Tensor&>(reflection->GetMessage(got->scoring(), field)),
          reflection->HasField(want.scoring(), field),
          static_cast<const v1::Tensor&>(reflection->GetMessage(want.scoring(), field)),
          name + ": scoring." + field->name());
    }
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

// A tensor of `shape` holding `values` as `dtype` (FP32, INT64 or BOOL).
v1::Tensor Make(v1::DataType dtype, std::vector<int64_t> shape, const std::vector<double>& values) {
  v1::Tensor tensor;
  tensor.set_dtype(dtype);
  for (int64_t dim : shape) tensor.add_shape(dim);
  std::string* data = tensor.mutable_data();
  for (double value : values) {
    if (dtype == v1::DATA_TYPE_FP32) {
      const float f = static_cast<float>(value);
      data->append(reinterpret_cast<const char*>(&f), 4);
    } else if (dtype == v1::DATA_TYPE_INT64) {
      const int64_t i = static_cast<int64_t>(value);
      data->append(reinterpret_cast<const char*>(&i), 8);
    } else {
      data->push_back(value != 0 ? '\x01' : '\0');
    }
  }
  return tensor;
}

v1::Tensor Fp32(std::vector<int64_t> shape, const std::vector<double>& values) {
  return Make(v1::DATA_TYPE_FP32, std::move(shape), values);
}
v1::Tensor Int64(std::vector<int64_t> shape, const std::vector<double>& values) {
  return Make(v1::DATA_TYPE_INT64, std::move(shape), values);
}
v1::Tensor Bool(std::vector<int64_t> shape, const std::vector<double>& values) {
  return Make(v1::DATA_TYPE_BOOL, std::move(shape), values);
}

void ExpectTensorEq(const v1::Tensor& got, const v1::Tensor& want, const std::string& what) {
  EXPECT_EQ(got.dtype(), want.dtype()) << what;
  EXPECT_EQ(std::vector<int64_t>(got.shape().begin(), got.shape().end()),
            std::vector<int64_t>(want.shape().begin(), want.shape().end()))
      << what;
  EXPECT_EQ(got.data(), want.data()) << what;
}

// The segment outputs of rows whose calls saw different numbers of segments.
v1::ScoringOutputs Segments(int64_t rows, int64_t groups, const std::vector<double>& sums,
                            const std::vector<double>& counts, const std::vector<double>& greedy,
                            const std::vector<double>& entropy) {
  v1::ScoringOutputs out;
  *out.mutable_segment_logprob_sums() = Fp32({rows, groups}, sums);
  *out.mutable_segment_token_counts() = Int64({rows, groups}, counts);
  *out.mutable_segment_is_greedy() = Bool({rows, groups}, greedy);
  *out.mutable_segment_entropy_sums() = Fp32({rows, groups}, entropy);
  return out;
}

// Per-position outputs are concatenated along the batch, in order, whatever their trailing dims.
TEST(MicroBatchCombinerScoringTest, ConcatenatesPerPositionOutputs) {
  MicroBatchCombiner combiner({v1::LOSS_REDUCTION_NONE, std::nullopt, nullptr});
  v1::ForwardResponse a;
  v1::ScoringOutputs* sa = a.mutable_scoring();
  *sa->mutable_label_logprobs() = Fp32({1, 2}, {-1.5, 0});
  *sa->mutable_entropy() = Fp32({1, 2}, {2, 3});
  *sa->mutable_label_rank() = Int64({1, 2}, {1, 0});
  *sa->mutable_top_k_ids() = Int64({1, 2, 3}, {4, 5, 6, 7, 8, 9});
  *sa->mutable_top_k_logprobs() = Fp32({1, 2, 3}, {-1, -2, -3, -4, -5, -6});
  *sa->mutable_candidate_logprobs() = Fp32({1, 2, 1}, {-0.25, -0.5});
  v1::ForwardResponse b;
  v1::ScoringOutputs* sb = b.mutable_scoring();
  *sb->mutable_label_logprobs() = Fp32({2, 2}, {-2, -3, -4, -5});
  *sb->mutable_entropy() = Fp32({2, 2}, {4, 5, 6, 7});
  *sb->mutable_label_rank() = Int64({2, 2}, {2, 3, 4, 5});
  *sb->mutable_top_k_ids() = Int64({2, 2, 3}, {10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21});
  *sb->mutable_top_k_logprobs() =
      Fp32({2, 2, 3}, {-7, -8, -9, -10, -11, -12, -13, -14, -15, -16, -17, -18});
  *sb->mutable_candidate_logprobs() = Fp32({2, 2, 1}, {-1, -2, -3, -4});
  ASSERT_TRUE(combiner.Add(a).ok());
  ASSERT_TRUE(combiner.Add(b).ok());
  absl::StatusOr<v1::ForwardResponse> got = combiner.Finish();
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got->has_scoring());
  const v1::ScoringOutputs& s = got->scoring();
  ExpectTensorEq(s.label_logprobs(), Fp32({3, 2}, {-1.5, 0, -2, -3, -4, -5}), "label_logprobs");
  ExpectTensorEq(s.entropy(), Fp32({3, 2}, {2, 3, 4, 5, 6, 7}), "entropy");
  ExpectTensorEq(s.label_rank(), Int64({3, 2}, {1, 0, 2, 3, 4, 5}), "label_rank");
  std::vector<double> ids, logprobs;
  for (int i = 4; i <= 21; ++i) ids.push_back(i);
  for (int i = 1; i <= 18; ++i) logprobs.push_back(-i);
  ExpectTensorEq(s.top_k_ids(), Int64({3, 2, 3}, ids), "top_k_ids");
  ExpectTensorEq(s.top_k_logprobs(), Fp32({3, 2, 3}, logprobs), "top_k_logprobs");
  ExpectTensorEq(s.candidate_logprobs(), Fp32({3, 2, 1}, {-0.25, -0.5, -1, -2, -3, -4}),
                 "candidate_logprobs");
  EXPECT_FALSE(s.has_segment_logprob_sums());
}

// One call over the four rows sees G = 3 (row 1's largest segment id is 2). Alone, micro-batch 0
// (rows 0, 1) sees 3, micro-batch 1 (row 2: only context) 0, micro-batch 2 (row 3) 1: their
// (B, G) outputs are widened with what one call gives a segment no scored position has.
TEST(MicroBatchCombinerScoringTest, WidensSegmentOutputsToTheJobsLargestG) {
  const v1::ScoringOutputs whole =
      Segments(4, 3, /*sums=*/{-1, -2, 0, -3, 0, -4, 0, 0, 0, -5, 0, 0},
               /*counts=*/{1, 2, 0, 1, 0, 3, 0, 0, 0, 4, 0, 0},
               /*greedy=*/{1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1},
               /*entropy=*/{0.5, 1, 0, 1.5, 0, 2, 0, 0, 0, 2.5, 0, 0});
  std::vector<v1::ForwardResponse> parts(3);
  *parts[0].mutable_scoring() = Segments(2, 3, {-1, -2, 0, -3, 0, -4}, {1, 2, 0, 1, 0, 3},
                                         {1, 0, 1, 0, 1, 1}, {0.5, 1, 0, 1.5, 0, 2});
  *parts[1].mutable_scoring() = Segments(1, 0, {}, {}, {}, {});
  *parts[2].mutable_scoring() = Segments(1, 1, {-5}, {4}, {0}, {2.5});
  for (const v1::LossReduction reduction : {v1::LOSS_REDUCTION_NONE, v1::LOSS_REDUCTION_SUM}) {
    MicroBatchCombiner combiner({reduction, std::nullopt, nullptr});
    for (const v1::ForwardResponse& part : parts) ASSERT_TRUE(combiner.Add(part).ok());
    absl::StatusOr<v1::ForwardResponse> got = combiner.Finish();
    ASSERT_TRUE(got.ok()) << got.status();
    const v1::ScoringOutputs& s = got->scoring();
    ExpectTensorEq(s.segment_logprob_sums(), whole.segment_logprob_sums(), "sums");
    ExpectTensorEq(s.segment_token_counts(), whole.segment_token_counts(), "counts");
    ExpectTensorEq(s.segment_is_greedy(), whole.segment_is_greedy(), "is_greedy");
    ExpectTensorEq(s.segment_entropy_sums(), whole.segment_entropy_sums(), "entropy sums");
    EXPECT_FALSE(s.has_label_logprobs());
  }
}

// No micro-batch saw a segment (every kept id -1): (B, 0), as one call gives.
TEST(MicroBatchCombinerScoringTest, NoSegmentsAnywhereGivesZeroWidth) {
  MicroBatchCombiner combiner({v1::LOSS_REDUCTION_NONE, std::nullopt, nullptr});
  v1::ForwardResponse part;
  *part.mutable_scoring() = Segments(2, 0, {}, {}, {}, {});
  ASSERT_TRUE(combiner.Add(part).ok());
  *part.mutable_scoring() = Segments(1, 0, {}, {}, {}, {});
  ASSERT_TRUE(combiner.Add(part).ok());
  absl::StatusOr<v1::ForwardResponse> got = combiner.Finish();
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectTensorEq(got->scoring().segment_is_greedy(), Bool({3, 0}, {}), "is_greedy");
  ExpectTensorEq(got->scoring().segment_token_counts(), Int64({3, 0}, {}), "counts");
}

TEST(MicroBatchCombinerScoringTest, NoScoringAskedGivesNone) {
  MicroBatchCombiner combiner({v1::LOSS_REDUCTION_NONE, std::nullopt, nullptr});
  v1::ForwardResponse part;
  *part.mutable_argmax() = Int64({1, 1}, {3});
  ASSERT_TRUE(combiner.Add(part).ok());
  ASSERT_TRUE(combiner.Add(part).ok());
  absl::StatusOr<v1::ForwardResponse> got = combiner.Finish();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->has_scoring());
}

// Answers that cannot be one job's are refused, naming the output, rather than misaligned.
TEST(MicroBatchCombinerScoringTest, RefusesAnswersThatDoNotFit) {
  const auto refused = [](const v1::ForwardResponse& first, const v1::ForwardResponse& second,
                          const std::string& field) {
    MicroBatchCombiner combiner({v1::LOSS_REDUCTION_NONE, std::nullopt, nullptr});
    absl::Status status = combiner.Add(first);
    if (status.ok()) status = combiner.Add(second);
    if (status.ok()) status = combiner.Finish().status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << field << ": " << status;
    EXPECT_NE(status.message().find(field), absl::string_view::npos) << status;
  };
  v1::ForwardResponse entropy;
  *entropy.mutable_scoring()->mutable_entropy() = Fp32({1, 2}, {1, 2});
  v1::ForwardResponse rank;
  *rank.mutable_scoring()->mutable_label_rank() = Int64({1, 2}, {1, 2});
  v1::ForwardResponse none;
  refused(entropy, rank, "scoring.entropy: micro-batch 1 answered without it");
  refused(entropy, none, "scoring: micro-batch 1 answered without scoring outputs");
  refused(none, entropy, "scoring: micro-batch 1 answered with scoring outputs");
  v1::ForwardResponse longer;
  *longer.mutable_scoring()->mutable_entropy() = Fp32({1, 3}, {1, 2, 3});
  refused(entropy, longer, "scoring.entropy: micro-batch 1 answered DATA_TYPE_FP32 [1, 3]");
  v1::ForwardResponse short_data = entropy;
  short_data.mutable_scoring()->mutable_entropy()->mutable_data()->resize(4);
  refused(entropy, short_data, "scoring.entropy: micro-batch 1 answered 4 bytes");
  v1::ForwardResponse segments;
  *segments.mutable_scoring() = Segments(1, 1, {-1}, {1}, {1}, {0.5});
  v1::ForwardResponse wrong_dtype = segments;
  *wrong_dtype.mutable_scoring()->mutable_segment_is_greedy() = Int64({1, 1}, {1});
  refused(segments, wrong_dtype,
          "scoring.segment_is_greedy: micro-batch 1 answered DATA_TYPE_INT64");
  v1::ForwardResponse rank3 = segments;
  *rank3.mutable_scoring()->mutable_segment_token_counts() = Int64({1, 1, 1}, {1});
  refused(segments, rank3, "scoring.segment_token_counts: micro-batch 1");
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

#include "client/micro_batches.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/tensor_view.h"
#include "proto/wire_dtype.h"

namespace lmhead {
namespace {

constexpr const char* kLossFields[3] = {"loss", "ce_loss", "z_loss"};

float HalfToFloat(uint16_t half) {
  const uint32_t sign = (half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1f;
  const uint32_t mantissa = half & 0x3ff;
  if (exponent == 0) {
    const float value = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -value : value;
  }
  uint32_t bits = exponent == 0x1f ? (sign | 0x7f800000u | (mantissa << 13))
                                   : (sign | ((exponent + 112) << 23) | (mantissa << 13));
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// float32 -> IEEE half, round to nearest even (NaN stays NaN, overflow gives inf).
uint16_t FloatToHalf(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  if (std::isnan(value)) return sign | 0x7e00u;
  const float magnitude = std::fabs(value);
  if (magnitude >= 65520.0f) return sign | 0x7c00u;  // rounds to infinity
  if (magnitude < std::ldexp(1.0f, -14)) {
    // Subnormal: multiples of 2^-24, rounded to nearest even by the FPU.
    return sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(magnitude, 24)));
  }
  uint32_t m;
  std::memcpy(&m, &magnitude, 4);
  const uint32_t rounded = m + 0xfffu + ((m >> 13) & 1u);  // nearest even at bit 13
  return sign | static_cast<uint16_t>(((rounded >> 13) - ((127 - 15) << 10)) & 0x7fffu);
}

// float32 -> bfloat16 bits, round to nearest even (NaN stays a quiet NaN).
uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Appends `part`'s rows to `whole` (same dtype and trailing dims).
void AppendRows(const v1::Tensor& part, v1::Tensor* whole) {
  if (whole->shape_size() == 0) {
    *whole = part;
    return;
  }
  whole->set_shape(0, whole->shape(0) + part.shape(0));
  whole->mutable_data()->append(part.data());
}

const v1::Tensor* LossField(const v1::ForwardResponse& response, int i) {
  switch (i) {
    case 0:
      return response.has_loss() ? &response.loss() : nullptr;
    case 1:
      return response.has_ce_loss() ? &response.ce_loss() : nullptr;
    default:
      return response.has_z_loss() ? &response.z_loss() : nullptr;
  }
}

v1::Tensor* MutableLossField(v1::ForwardResponse* response, int i) {
  switch (i) {
    case 0:
      return response->mutable_loss();
    case 1:
      return response->mutable_ce_loss();
    default:
      return response->mutable_z_loss();
  }
}

// A tensor field of v1::ScoringOutputs, read and written by name through protobuf's reflection.
struct ScoringField {
  const char* name;
  // For the (B, G) segment outputs: their dtype, and whether a segment no scored position has
  // reads true (is_greedy, vacuously) rather than 0.
  v1::DataType dtype = v1::DATA_TYPE_UNSPECIFIED;
  bool absent_is_true = false;

  const google::protobuf::FieldDescriptor* descriptor() const {
    return v1::ScoringOutputs::descriptor()->FindFieldByName(name);
  }
  // The field of `outputs`, or null when it is absent.
  const v1::Tensor* Get(const v1::ScoringOutputs& outputs) const {
    const google::protobuf::Reflection* reflection = outputs.GetReflection();
    if (!reflection->HasField(outputs, descriptor())) return nullptr;
    return static_cast<const v1::Tensor*>(&reflection->GetMessage(outputs, descriptor()));
  }
  v1::Tensor* Mutable(v1::ScoringOutputs* outputs) const {
    return static_cast<v1::Tensor*>(
        outputs->GetReflection()->MutableMessage(outputs, descriptor()));
  }
};

// The outputs per kept position, (B, S', ...): concatenated along the batch.
const ScoringField kPositionFields[] = {{"label_logprobs"}, {"entropy"},
                                        {"label_rank"},     {"top_k_ids"},
                                        {"top_k_logprobs"}, {"candidate_logprobs"}};

// The outputs per row and segment, (B, G): G is each call's own, so they are widened to the
// job's largest before they are concatenated.
const ScoringField kSegmentFields[] = {
    {"segment_logprob_sums", v1::DATA_TYPE_FP32},
    {"segment_token_counts", v1::DATA_TYPE_INT64},
    {"segment_is_greedy", v1::DATA_TYPE_BOOL, /*absent_is_true=*/true},
    {"segment_entropy_sums", v1::DATA_TYPE_FP32},
};

constexpr int kNumSegmentFields = sizeof(kSegmentFields) / sizeof(kSegmentFields[0]);

// Checks that `part`, scoring output `name` of micro-batch `index`, has rank >= `min_rank` and
// the bytes its shape and dtype say.
absl::Status CheckScoringPart(const v1::Tensor& part, absl::string_view name, int64_t index,
                              int min_rank) {
  int64_t bytes = ElementSize(part.dtype());
  bool valid = bytes > 0 && part.shape_size() >= min_rank;
  for (int64_t dim : part.shape()) {
    valid = valid && dim >= 0 && !__builtin_mul_overflow(bytes, dim, &bytes);
  }
  if (!valid || static_cast<size_t>(bytes) != part.data().size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("scoring.", name, ": micro-batch ", index, " answered ", part.data().size(),
                     " bytes of dtype ", v1::DataType_Name(part.dtype()), " for shape [",
                     absl::StrJoin(part.shape(), ", "), "]; expected rank ", min_rank, " or more"));
  }
  return absl::OkStatus();
}

}  // namespace

v1::Tensor SliceRows(const v1::Tensor& tensor, int64_t begin, int64_t end) {
  v1::Tensor out;
  CopyRowsTo(ViewOf(tensor), begin, end, &out);
  return out;
}

absl::StatusOr<double> ScalarValue(const v1::Tensor& tensor, absl::string_view field) {
  const std::string& data = tensor.data();
  if (data.size() == static_cast<size_t>(ElementSize(tensor.dtype()))) {
    switch (tensor.dtype()) {
      case v1::DATA_TYPE_FP32: {
        float value;
        std::memcpy(&value, data.data(), 4);
        return value;
      }
      case v1::DATA_TYPE_BF16: {
        uint32_t bits = 0;
        std::memcpy(reinterpret_cast<char*>(&bits) + 2, data.data(), 2);
        float value;
        std::memcpy(&value, &bits, 4);
        return value;
      }
      case v1::DATA_TYPE_FP16: {
        uint16_t half;
        std::memcpy(&half, data.data(), 2);
        return HalfToFloat(half);
      }
      default:
        break;
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": expected a one-element floating-point tensor"));
}

v1::Tensor ScalarTensor(double value, v1::DataType dtype) {
  v1::Tensor tensor;
  tensor.set_dtype(dtype);
  const float f = static_cast<float>(value);
  if (dtype == v1::DATA_TYPE_FP32) {
    tensor.set_data(std::string(reinterpret_cast<const char*>(&f), sizeof(f)));
  } else {
    const uint16_t bits = dtype == v1::DATA_TYPE_BF16 ? FloatToBf16(f) : FloatToHalf(f);
    tensor.set_data(std::string(reinterpret_cast<const char*>(&bits), sizeof(bits)));
  }
  return tensor;
}

MicroBatchCombiner::MicroBatchCombiner(CombineOptions options) : options_(std::move(options)) {}

bool MicroBatchCombiner::scalar_losses() const {
  return options_.reduction != v1::LOSS_REDUCTION_NONE;
}

absl::Status MicroBatchCombiner::Add(const v1::ForwardResponse& response) {
  if (count_ == 0) {
    combined_.set_model(response.model());
    combined_.set_model_version(response.model_version());
  }
  if (response.has_logits()) AppendRows(response.logits(), combined_.mutable_logits());
  if (response.has_argmax()) AppendRows(response.argmax(), combined_.mutable_argmax());
  for (int i = 0; i < 3; ++i) {
    const v1::Tensor* part = LossField(response, i);
    if (part == nullptr) continue;
    if (count_ > 0 && part->dtype() != dtypes_[i]) {
      return absl::InvalidArgumentError(
          absl::StrCat(kLossFields[i], ": micro-batch ", count_, " answered in another dtype"));
    }
    dtypes_[i] = part->dtype();
    if (scalar_losses()) {
      absl::StatusOr<double> value = ScalarValue(*part, kLossFields[i]);
      if (!value.ok()) return value.status();
      sums_[i] += *value;
    } else {
      AppendRows(*part, MutableLossField(&combined_, i));
    }
  }
  combined_.set_num_scored_tokens(combined_.num_scored_tokens() + response.num_scored_tokens());
  combined_.set_num_nonfinite_inputs(combined_.num_nonfinite_inputs() +
                                     response.num_nonfinite_inputs());
  v1::ServerTimings* timings = combined_.mutable_timings();
  timings->set_decode_us(timings->decode_us() + response.timings().decode_us());
  timings->set_compute_us(timings->compute_us() + response.timings().compute_us());
  timings->set_encode_us(timings->encode_us() + response.timings().encode_us());
  timings->set_total_us(timings->total_us() + response.timings().total_us());
  if (absl::Status added = AddScoring(response); !added.ok()) return added;
  ++count_;
  return absl::OkStatus();
}

absl::Status MicroBatchCombiner::AddScoring(const v1::ForwardResponse& response) {
  if (count_ == 0) {
    scoring_ = response.has_scoring();
    segment_parts_.assign(kNumSegmentFields, {});
  }
  if (response.has_scoring() != scoring_) {
    return absl::InvalidArgumentError(absl::StrCat("scoring: micro-batch ", count_, " answered ",
                                                   scoring_ ? "without" : "with",
                                                   " scoring outputs, unlike micro-batch 0"));
  }
  if (!scoring_) return absl::OkStatus();
  const v1::ScoringOutputs& part = response.scoring();
  v1::ScoringOutputs* whole = combined_.mutable_scoring();
  const auto presence_differs = [&](const ScoringField& field, bool had) {
    return absl::InvalidArgumentError(absl::StrCat("scoring.", field.name, ": micro-batch ", count_,
                                                   " answered ", had ? "without" : "with",
                                                   " it, unlike micro-batch 0"));
  };
  for (const ScoringField& field : kPositionFields) {
    const v1::Tensor* given = field.Get(part);
    const bool had = count_ == 0 ? given != nullptr : field.Get(*whole) != nullptr;
    if ((given != nullptr) != had) return presence_differs(field, had);
    if (!had) continue;
    const v1::Tensor& tensor = *given;
    if (absl::Status checked = CheckScoringPart(tensor, field.name, count_, /*min_rank=*/1);
        !checked.ok()) {
      return checked;
    }
    v1::Tensor* rows = field.Mutable(whole);
    if (count_ > 0 &&
        (tensor.dtype() != rows->dtype() || tensor.shape_size() != rows->shape_size() ||
         !std::equal(tensor.shape().begin() + 1, tensor.shape().end(),
                     rows->shape().begin() + 1))) {
      return absl::InvalidArgumentError(
          absl::StrCat("scoring.", field.name, ": micro-batch ", count_, " answered ",
                       v1::DataType_Name(tensor.dtype()), " [", absl::StrJoin(tensor.shape(), ", "),
                       "], unlike the rows before it (", v1::DataType_Name(rows->dtype()), " [",
                       absl::StrJoin(rows->shape(), ", "), "])"));
    }
    AppendRows(tensor, rows);
  }
  for (int i = 0; i < kNumSegmentFields; ++i) {
    const ScoringField& field = kSegmentFields[i];
    const v1::Tensor* given = field.Get(part);
    const bool had = count_ == 0 ? given != nullptr : !segment_parts_[i].empty();
    if ((given != nullptr) != had) return presence_differs(field, had);
    if (!had) continue;
    const v1::Tensor& tensor = *given;
    if (absl::Status checked = CheckScoringPart(tensor, field.name, count_, /*min_rank=*/2);
        !checked.ok()) {
      return checked;
    }
    if (tensor.dtype() != field.dtype || tensor.shape_size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("scoring.", field.name, ": micro-batch ", count_, " answered ",
                       v1::DataType_Name(tensor.dtype()), " [", absl::StrJoin(tensor.shape(), ", "),
                       "]; expected ", v1::DataType_Name(field.dtype), " (rows, segments)"));
    }
    segment_parts_[i].push_back(tensor);
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::ForwardResponse> MicroBatchCombiner::Finish() {
  if (scoring_) {
    for (int i = 0; i < kNumSegmentFields; ++i) {
      const std::vector<v1::Tensor>& parts = segment_parts_[i];
      if (parts.empty()) continue;
      const ScoringField& field = kSegmentFields[i];
      int64_t rows = 0;
      int64_t groups = 0;
      for (const v1::Tensor& part : parts) {
        rows += part.shape(0);
        groups = std::max(groups, part.shape(1));
      }
      const int64_t element = ElementSize(field.dtype);
      // What one call gives a segment that no scored position has: 0, or true (1 byte).
      const std::string absent =
          field.absent_is_true ? std::string(1, '\x01') : std::string(element, '\0');
      v1::Tensor* whole = field.Mutable(combined_.mutable_scoring());
      whole->Clear();
      whole->set_dtype(field.dtype);
      whole->add_shape(rows);
      whole->add_shape(groups);
      std::string* data = whole->mutable_data();
      data->reserve(rows * groups * element);
      for (const v1::Tensor& part : parts) {
        const int64_t width = part.shape(1);
        for (int64_t row = 0; row < part.shape(0); ++row) {
          data->append(part.data(), row * width * element, width * element);
          for (int64_t g = width; g < groups; ++g) data->append(absent);
        }
      }
    }
  }
  if (!scalar_losses()) return combined_;
  const double divisor = options_.loss_div_factor.value_or(1.0);
  for (int i = 0; i < 3; ++i) {
    if (dtypes_[i] == v1::DATA_TYPE_UNSPECIFIED) continue;
    double value = sums_[i];
    if (options_.reduction != v1::LOSS_REDUCTION_SUM) {  // mean
      const int64_t scored = combined_.num_scored_tokens();
      if (scored > 0) {
        value /= static_cast<double>(scored);
      } else {
        absl::StatusOr<v1::LossImplementation> implementation =
            options_.implementation
                ? options_.implementation()
                : absl::StatusOr<v1::LossImplementation>(v1::LOSS_IMPLEMENTATION_DEFAULT);
        if (!implementation.ok()) return implementation.status();
        value = *implementation == v1::LOSS_IMPLEMENTATION_FUSED_LINEAR
                    ? 0.0
                    : std::numeric_limits<double>::quiet_NaN();
      }
    }
    *MutableLossField(&combined_, i) = ScalarTensor(value / divisor, dtypes_[i]);
  }
  return combined_;
}

}  // namespace lmhead

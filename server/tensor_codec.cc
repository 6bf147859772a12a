#include "server/tensor_codec.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lmhead {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the wire format is little-endian; a big-endian host would need byte swaps");

}  // namespace

c10::ScalarType ScalarTypeOf(v1::DataType dtype) {
  switch (dtype) {
    case v1::DATA_TYPE_BF16:
      return c10::ScalarType::BFloat16;
    case v1::DATA_TYPE_FP16:
      return c10::ScalarType::Half;
    case v1::DATA_TYPE_FP32:
      return c10::ScalarType::Float;
    case v1::DATA_TYPE_INT32:
      return c10::ScalarType::Int;
    case v1::DATA_TYPE_INT64:
      return c10::ScalarType::Long;
    default:
      return c10::ScalarType::Undefined;
  }
}

namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

std::string DataTypeName(int dtype) {
  switch (dtype) {
    case v1::DATA_TYPE_BF16:
      return "BF16";
    case v1::DATA_TYPE_FP16:
      return "FP16";
    case v1::DATA_TYPE_FP32:
      return "FP32";
    case v1::DATA_TYPE_INT32:
      return "INT32";
    case v1::DATA_TYPE_INT64:
      return "INT64";
    case v1::DATA_TYPE_UNSPECIFIED:
      return "DATA_TYPE_UNSPECIFIED";
    default:
      return absl::StrCat("unknown value ", dtype);
  }
}

v1::DataType DataTypeOf(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::BFloat16:
      return v1::DATA_TYPE_BF16;
    case c10::ScalarType::Half:
      return v1::DATA_TYPE_FP16;
    case c10::ScalarType::Float:
      return v1::DATA_TYPE_FP32;
    case c10::ScalarType::Int:
      return v1::DATA_TYPE_INT32;
    case c10::ScalarType::Long:
      return v1::DATA_TYPE_INT64;
    default:
      return v1::DATA_TYPE_UNSPECIFIED;
  }
}

absl::StatusOr<std::vector<int64_t>> ValidateTensor(const v1::Tensor& tensor,
                                                    const TensorRule& rule) {
  const int dtype = tensor.dtype();
  const bool accepted =
      std::find(rule.dtypes.begin(), rule.dtypes.end(), dtype) != rule.dtypes.end();
  if (!accepted) {
    std::vector<std::string> names;
    for (v1::DataType d : rule.dtypes) names.push_back(DataTypeName(d));
    return absl::InvalidArgumentError(absl::StrCat(rule.field, ".dtype: expected ",
                                                   absl::StrJoin(names, " or "), ", got ",
                                                   DataTypeName(dtype)));
  }
  const int rank = tensor.shape_size();
  if (rule.rank >= 0 ? rank != rule.rank : rank > kMaxTensorRank) {
    return absl::InvalidArgumentError(
        absl::StrCat(rule.field, ".shape: expected ",
                     rule.rank >= 0 ? absl::StrCat("rank ", rule.rank)
                                    : absl::StrCat("rank at most ", kMaxTensorRank),
                     ", got rank ", rank));
  }
  std::vector<int64_t> shape(tensor.shape().begin(), tensor.shape().end());
  // The product of the sizes with empty dimensions counted as 1 bounds every stride too: a
  // (0, 2^62, 8) tensor has no element, but its strides would overflow.
  int64_t extent = ElementSize(tensor.dtype());
  for (int i = 0; i < rank; ++i) {
    if (shape[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(rule.field, ".shape[", i, "]: expected a size >= 0, got ", shape[i]));
    }
    if (__builtin_mul_overflow(extent, std::max<int64_t>(shape[i], 1), &extent)) {
      return absl::InvalidArgumentError(absl::StrCat(
          rule.field, ".shape: ", ShapeString(shape),
          " is too large: the product of its sizes (empty ones counted as 1) times the element "
          "size overflows int64"));
    }
  }
  int64_t bytes = ElementSize(tensor.dtype());
  for (const int64_t size : shape) bytes *= size;  // cannot overflow: bounded by `extent`
  if (static_cast<int64_t>(tensor.data().size()) != bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        rule.field, ".data: expected ", bytes, " bytes (", bytes / ElementSize(tensor.dtype()),
        " elements of ", DataTypeName(tensor.dtype()), " for shape ", ShapeString(shape), "), got ",
        tensor.data().size()));
  }
  return shape;
}

absl::StatusOr<at::Tensor> DecodeTensor(const v1::Tensor& tensor, const TensorRule& rule) {
  absl::StatusOr<std::vector<int64_t>> shape = ValidateTensor(tensor, rule);
  if (!shape.ok()) return shape.status();
  const auto options = at::TensorOptions().dtype(ScalarTypeOf(tensor.dtype()));
  const std::string& data = tensor.data();
  const auto address = reinterpret_cast<std::uintptr_t>(data.data());
  if (data.empty() || address % ElementSize(tensor.dtype()) != 0) {
    at::Tensor copy = at::empty(*shape, options);
    if (!data.empty()) std::memcpy(copy.data_ptr(), data.data(), data.size());
    return copy;
  }
  // Read-only by contract (see the header); from_blob needs a non-const pointer.
  return at::from_blob(const_cast<char*>(data.data()), *shape, options);
}

absl::Status EncodeTensor(const at::Tensor& value, v1::DataType dtype, v1::Tensor* out) {
  const c10::ScalarType target = ScalarTypeOf(dtype);
  if (target == c10::ScalarType::Undefined ||
      (c10::isIntegralType(target, false) != c10::isIntegralType(value.scalar_type(), false))) {
    return absl::InvalidArgumentError(absl::StrCat("cannot encode a ",
                                                   c10::toString(value.scalar_type()),
                                                   " tensor as ", DataTypeName(dtype)));
  }
  const at::Tensor host = value.to(at::kCPU, target).contiguous();
  out->Clear();
  out->set_dtype(dtype);
  for (int64_t size : host.sizes()) out->add_shape(size);
  out->mutable_data()->assign(static_cast<const char*>(host.data_ptr()), host.nbytes());
  return absl::OkStatus();
}

}  // namespace lmhead

#include "server/tensor_codec.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/blocking_counter.h"

namespace lmhead {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the wire format is little-endian; a big-endian host would need byte swaps");

// The wire dtypes and their LibTorch scalar types, one table read both ways.
struct WireScalarType {
  v1::DataType dtype;
  c10::ScalarType type;
};
constexpr WireScalarType kWireScalarTypes[] = {
    {v1::DATA_TYPE_BF16, c10::ScalarType::BFloat16}, {v1::DATA_TYPE_FP16, c10::ScalarType::Half},
    {v1::DATA_TYPE_FP32, c10::ScalarType::Float},    {v1::DATA_TYPE_INT32, c10::ScalarType::Int},
    {v1::DATA_TYPE_INT64, c10::ScalarType::Long},    {v1::DATA_TYPE_BOOL, c10::ScalarType::Bool},
};

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

c10::ScalarType ScalarTypeOf(v1::DataType dtype) {
  for (const auto& [wire, type] : kWireScalarTypes) {
    if (wire == dtype) return type;
  }
  return c10::ScalarType::Undefined;
}

v1::DataType DataTypeOf(c10::ScalarType type) {
  for (const auto& [wire, scalar_type] : kWireScalarTypes) {
    if (scalar_type == type) return wire;
  }
  return v1::DATA_TYPE_UNSPECIFIED;
}

absl::StatusOr<std::vector<int64_t>> ValidateTensor(const v1::Tensor& tensor,
                                                    const TensorRule& rule,
                                                    const DetachedData* detached) {
  const uint64_t data_size = detached != nullptr ? detached->size : tensor.data().size();
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
  if (tensor.has_shared_memory()) {
    if (data_size != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(rule.field, ".data: must be empty when ", rule.field,
                       ".shared_memory is set (a tensor's bytes are in one of them), got ",
                       data_size, " bytes"));
    }
    if (tensor.shared_memory().byte_size() != static_cast<uint64_t>(bytes)) {
      return absl::InvalidArgumentError(absl::StrCat(
          rule.field, ".shared_memory.byte_size: expected ", bytes, " bytes (",
          bytes / ElementSize(tensor.dtype()), " elements of ", DataTypeName(tensor.dtype()),
          " for shape ", ShapeString(shape), "), got ", tensor.shared_memory().byte_size()));
    }
    return shape;
  }
  if (data_size != static_cast<uint64_t>(bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        rule.field, ".data: expected ", bytes, " bytes (", bytes / ElementSize(tensor.dtype()),
        " elements of ", DataTypeName(tensor.dtype()), " for shape ", ShapeString(shape), "), got ",
        data_size));
  }
  return shape;
}

absl::StatusOr<at::Tensor> DecodeTensor(const v1::Tensor& tensor, const TensorRule& rule,
                                        const DetachedData* detached, bool pinned) {
  absl::StatusOr<std::vector<int64_t>> shape = ValidateTensor(tensor, rule, detached);
  if (!shape.ok()) return shape.status();
  if (tensor.has_shared_memory()) {
    return absl::FailedPreconditionError(
        absl::StrCat(rule.field, ".shared_memory: the bytes are in a region, not in the message"));
  }
  const auto options = at::TensorOptions().dtype(ScalarTypeOf(tensor.dtype()));
  if (detached != nullptr) {
    at::Tensor gathered = at::empty(*shape, options.pinned_memory(pinned));
    // In ranges of at least 4 MiB, up to 8 at once: this thread takes the first, LibTorch's
    // inter-op threads the others. Not at::parallel_for: its OpenMP teams, one per calling gRPC
    // thread, oversubscribe the cores (docs/notes/receive_path.md).
    constexpr uint64_t kGatherGrainBytes = uint64_t{4} << 20;
    const uint64_t size = detached->size;
    const uint64_t ranges = std::clamp<uint64_t>(
        std::min<uint64_t>(size / kGatherGrainBytes, at::get_num_interop_threads()), 1, 8);
    const uint64_t step = (size + ranges - 1) / ranges;
    void* destination = gathered.data_ptr();
    absl::BlockingCounter others(static_cast<int>(ranges - 1));
    for (uint64_t i = 1; i < ranges; ++i) {
      at::launch([&, i] {
        GatherDetachedData(*detached, destination, i * step, (i + 1) * step);
        others.DecrementCount();
      });
    }
    GatherDetachedData(*detached, destination, 0, step);
    others.Wait();
    return gathered;
  }
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

absl::StatusOr<at::Tensor> DecodeExternalTensor(const v1::Tensor& tensor, const TensorRule& rule,
                                                const ExternalBytes& bytes, bool private_copy) {
  absl::StatusOr<std::vector<int64_t>> shape = ValidateTensor(tensor, rule);
  if (!shape.ok()) return shape.status();
  const auto options = at::TensorOptions().dtype(ScalarTypeOf(tensor.dtype()));
  const int64_t nbytes = static_cast<int64_t>(tensor.shared_memory().byte_size());
  const auto address = reinterpret_cast<std::uintptr_t>(bytes.data);
  if (nbytes > 0 && !private_copy && address % ElementSize(tensor.dtype()) == 0) {
    // The deleter holds the owner: the bytes stay valid while any view of them lives.
    return at::from_blob(
        bytes.data, *shape, [owner = bytes.owner](void*) {}, options.device(bytes.device));
  }
  at::Tensor copy = at::empty(*shape, options);
  if (nbytes == 0) return copy;
  if (bytes.device.is_cpu()) {
    std::memcpy(copy.data_ptr(), bytes.data, static_cast<size_t>(nbytes));
  } else {
    at::from_blob(copy.data_ptr(), {nbytes}, at::TensorOptions().dtype(at::kByte))
        .copy_(at::from_blob(bytes.data, {nbytes},
                             at::TensorOptions().dtype(at::kByte).device(bytes.device)));
  }
  return copy;
}

namespace {

// `value` on the host as `dtype`, contiguous; INVALID_ARGUMENT for a dtype it cannot be written
// as.
absl::StatusOr<at::Tensor> HostBytesOf(const at::Tensor& value, v1::DataType dtype) {
  const c10::ScalarType target = ScalarTypeOf(dtype);
  if (target == c10::ScalarType::Undefined ||
      (c10::isIntegralType(target, false) != c10::isIntegralType(value.scalar_type(), false))) {
    return absl::InvalidArgumentError(absl::StrCat("cannot encode a ",
                                                   c10::toString(value.scalar_type()),
                                                   " tensor as ", DataTypeName(dtype)));
  }
  return value.to(at::kCPU, target).contiguous();
}

}  // namespace

absl::Status EncodeTensor(const at::Tensor& value, v1::DataType dtype, v1::Tensor* out) {
  absl::StatusOr<at::Tensor> host = HostBytesOf(value, dtype);
  if (!host.ok()) return host.status();
  out->Clear();
  out->set_dtype(dtype);
  for (int64_t size : host->sizes()) out->add_shape(size);
  out->mutable_data()->assign(static_cast<const char*>(host->data_ptr()), host->nbytes());
  return absl::OkStatus();
}

absl::Status EncodeTensorTo(const at::Tensor& value, v1::DataType dtype, const ExternalBytes& bytes,
                            uint64_t size, v1::Tensor* out) {
  absl::StatusOr<at::Tensor> host = HostBytesOf(value, dtype);
  if (!host.ok()) return host.status();
  if (host->nbytes() != size) {
    return absl::InternalError(absl::StrCat("an output of ", host->nbytes(),
                                            " bytes does not fill its ", size,
                                            " bytes of shared memory"));
  }
  const int64_t nbytes = static_cast<int64_t>(size);
  if (nbytes > 0 && bytes.device.is_cpu()) {
    std::memcpy(bytes.data, host->data_ptr(), size);
  } else if (nbytes > 0) {
    at::from_blob(bytes.data, {nbytes}, at::TensorOptions().dtype(at::kByte).device(bytes.device))
        .copy_(at::from_blob(host->data_ptr(), {nbytes}, at::TensorOptions().dtype(at::kByte)));
  }
  out->Clear();
  out->set_dtype(dtype);
  for (int64_t dim : host->sizes()) out->add_shape(dim);
  return absl::OkStatus();
}

}  // namespace lmhead

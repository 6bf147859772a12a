// Fuzzes the wire tensor codec (server/tensor_codec.h): the input is parsed as an
// lmhead.v1.Tensor and checked against each rule the server applies to a request's tensors
// (copied from server/forward_request.cc). Beyond what the sanitizers catch, it checks the header's
// contracts: a rejected tensor gets INVALID_ARGUMENT naming the field, DecodeTensor accepts
// exactly what ValidateTensor accepts and never throws, the decoded tensor has the validated
// shape, dtype and bytes, and EncodeTensor writes the same wire tensor back. A tensor whose bytes
// are in shared memory has its byte_size checked and is not decoded here.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "proto/lmhead/v1/lmhead.pb.h"
#include "proto/wire_dtype.h"
#include "server/tensor_codec.h"
#include "tests/fuzz/fuzz_check.h"

namespace lmhead {
namespace {

constexpr std::initializer_list<v1::DataType> kFloatTypes = {v1::DATA_TYPE_BF16, v1::DATA_TYPE_FP16,
                                                             v1::DATA_TYPE_FP32};

// server/forward_request.cc's rules.
const TensorRule kRules[] = {
    {"hidden_states", kFloatTypes, 3},
    {"labels", {v1::DATA_TYPE_INT64, v1::DATA_TYPE_INT32}, 2},
    {"options.logits_to_keep_positions", {v1::DATA_TYPE_INT64}, 2},
    {"options.loss_div_factor_tensor", kFloatTypes, -1},
};

void CheckRule(const v1::Tensor& tensor, const TensorRule& rule) {
  const std::string field(rule.field);
  const absl::StatusOr<std::vector<int64_t>> shape = ValidateTensor(tensor, rule);
  absl::StatusOr<at::Tensor> decoded;
  try {
    decoded = DecodeTensor(tensor, rule);
  } catch (const c10::Error& error) {
    LMHEAD_FUZZ_CHECK(false, "%s: DecodeTensor threw (ValidateTensor: %s): %s", field.c_str(),
                      shape.status().ToString().c_str(), error.what_without_backtrace());
  } catch (const std::exception& error) {
    LMHEAD_FUZZ_CHECK(false, "%s: DecodeTensor threw (ValidateTensor: %s): %s", field.c_str(),
                      shape.status().ToString().c_str(), error.what());
  }
  if (!shape.ok()) {
    LMHEAD_FUZZ_CHECK(absl::IsInvalidArgument(shape.status()) &&
                          absl::StartsWith(shape.status().message(), field),
                      "%s: unexpected status %s", field.c_str(), shape.status().ToString().c_str());
    LMHEAD_FUZZ_CHECK(decoded.status() == shape.status(),
                      "%s: DecodeTensor says %s, ValidateTensor %s", field.c_str(),
                      decoded.status().ToString().c_str(), shape.status().ToString().c_str());
    return;
  }

  // Bytes in shared memory: byte_size checked as the data's length is, and nothing to decode here
  // (the server decodes them from their resolved region, DecodeExternalTensor).
  if (tensor.has_shared_memory()) {
    LMHEAD_FUZZ_CHECK(tensor.data().empty(), "%s: accepted data beside shared_memory",
                      field.c_str());
    int64_t bytes = ElementSize(tensor.dtype());
    for (int64_t dim : *shape) bytes *= dim;
    LMHEAD_FUZZ_CHECK(tensor.shared_memory().byte_size() == static_cast<uint64_t>(bytes),
                      "%s: accepted a byte_size of %llu for %lld bytes", field.c_str(),
                      static_cast<unsigned long long>(tensor.shared_memory().byte_size()),
                      static_cast<long long>(bytes));
    LMHEAD_FUZZ_CHECK(absl::IsFailedPrecondition(decoded.status()),
                      "%s: DecodeTensor of a shared-memory tensor says %s", field.c_str(),
                      decoded.status().ToString().c_str());
    return;
  }

  // The validated shape.
  const v1::DataType dtype = tensor.dtype();
  bool accepted = false;
  for (v1::DataType d : rule.dtypes) accepted = accepted || d == dtype;
  LMHEAD_FUZZ_CHECK(accepted, "%s: accepted dtype %d", field.c_str(), static_cast<int>(dtype));
  LMHEAD_FUZZ_CHECK(rule.rank < 0 ? shape->size() <= kMaxTensorRank : shape->size() == rule.rank,
                    "%s: accepted rank %zu", field.c_str(), shape->size());
  int64_t bytes = ElementSize(dtype);
  for (int64_t dim : *shape) {
    LMHEAD_FUZZ_CHECK(dim >= 0 && !__builtin_mul_overflow(bytes, dim, &bytes),
                      "%s: accepted a negative or overflowing dimension", field.c_str());
  }
  LMHEAD_FUZZ_CHECK(static_cast<size_t>(bytes) == tensor.data().size(),
                    "%s: accepted %zu bytes for %lld", field.c_str(), tensor.data().size(),
                    static_cast<long long>(bytes));

  // The decoded tensor: the same shape, dtype and bytes.
  LMHEAD_FUZZ_CHECK(decoded.ok(), "%s: ValidateTensor accepts, DecodeTensor says %s", field.c_str(),
                    decoded.status().ToString().c_str());
  LMHEAD_FUZZ_CHECK(decoded->sizes().vec() == *shape, "%s: decoded shape differs", field.c_str());
  LMHEAD_FUZZ_CHECK(DataTypeOf(decoded->scalar_type()) == dtype, "%s: decoded dtype %s",
                    field.c_str(), c10::toString(decoded->scalar_type()));
  LMHEAD_FUZZ_CHECK(decoded->is_contiguous() && decoded->device().is_cpu(),
                    "%s: decoded tensor is not a contiguous CPU tensor", field.c_str());
  LMHEAD_FUZZ_CHECK(decoded->nbytes() == tensor.data().size(), "%s: decoded %zu bytes",
                    field.c_str(), decoded->nbytes());
  LMHEAD_FUZZ_CHECK(
      tensor.data().empty() ||
          std::memcmp(decoded->const_data_ptr(), tensor.data().data(), tensor.data().size()) == 0,
      "%s: decoded bytes differ", field.c_str());

  // Encoding it again gives the same wire tensor.
  v1::Tensor encoded;
  const absl::Status status = EncodeTensor(*decoded, dtype, &encoded);
  LMHEAD_FUZZ_CHECK(status.ok(), "%s: EncodeTensor: %s", field.c_str(), status.ToString().c_str());
  LMHEAD_FUZZ_CHECK(
      encoded.dtype() == dtype &&
          std::vector<int64_t>(encoded.shape().begin(), encoded.shape().end()) == *shape &&
          encoded.data() == tensor.data(),
      "%s: EncodeTensor wrote a different tensor", field.c_str());
}

}  // namespace
}  // namespace lmhead

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lmhead::v1::Tensor tensor;
  if (!tensor.ParseFromArray(data, static_cast<int>(size))) return 0;
  for (const lmhead::TensorRule& rule : lmhead::kRules) lmhead::CheckRule(tensor, rule);
  return 0;
}

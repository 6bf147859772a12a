#include "client/wire_request.h"

#include <grpcpp/support/slice.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace lmhead {
namespace {

// Protobuf's tag of a length-delimited field (wire type 2).
constexpr uint64_t LengthDelimitedTag(int field) { return (static_cast<uint64_t>(field) << 3) | 2; }

size_t VarintSize(uint64_t value) {
  size_t size = 1;
  for (; value >= 0x80; value >>= 7) ++size;
  return size;
}

void AppendVarint(uint64_t value, std::string* out) {
  for (; value >= 0x80; value >>= 7) out->push_back(static_cast<char>((value & 0x7f) | 0x80));
  out->push_back(static_cast<char>(value));
}

// The destroy function of a slice that points into a view's bytes: drops its reference.
void ReleaseOwner(void* owner) { delete static_cast<std::shared_ptr<const void>*>(owner); }

}  // namespace

grpc::ByteBuffer SerializeForwardRequest(v1::ForwardRequest request,
                                         const TensorView& hidden_states) {
  // Protobuf writes a message's fields in number order, and only `model` (1) comes before
  // hidden_states (2); in the tensor, data (3) is the last field set. So the message is
  // [model][hidden_states: tag, length, dtype and shape, data's tag and length][data][the rest].
  static_assert(v1::ForwardRequest::kModelFieldNumber == 1 &&
                    v1::ForwardRequest::kHiddenStatesFieldNumber == 2 &&
                    v1::Tensor::kDtypeFieldNumber < v1::Tensor::kDataFieldNumber &&
                    v1::Tensor::kShapeFieldNumber < v1::Tensor::kDataFieldNumber,
                "the order SerializeForwardRequest writes fields in");
  const absl::string_view data = hidden_states.data;
  v1::ForwardRequest head;
  head.set_model(request.model());
  request.clear_model();
  request.clear_hidden_states();
  v1::Tensor tensor;  // dtype and shape
  tensor.set_dtype(hidden_states.dtype);
  for (int64_t dim : hidden_states.shape) tensor.add_shape(dim);
  const uint64_t data_tag = LengthDelimitedTag(v1::Tensor::kDataFieldNumber);
  const size_t data_field =
      data.empty() ? 0 : VarintSize(data_tag) + VarintSize(data.size()) + data.size();

  std::string prefix = head.SerializeAsString();
  AppendVarint(LengthDelimitedTag(v1::ForwardRequest::kHiddenStatesFieldNumber), &prefix);
  AppendVarint(tensor.ByteSizeLong() + data_field, &prefix);
  tensor.AppendToString(&prefix);
  if (!data.empty()) {  // proto3 leaves empty bytes out
    AppendVarint(data_tag, &prefix);
    AppendVarint(data.size(), &prefix);
  }
  std::vector<grpc::Slice> slices;
  slices.emplace_back(prefix);
  if (!data.empty() && hidden_states.owner != nullptr) {
    // gRPC never writes into a slice it sends; the cast is its C API's.
    slices.emplace_back(const_cast<char*>(data.data()), data.size(), &ReleaseOwner,
                        new std::shared_ptr<const void>(hidden_states.owner));
  } else if (!data.empty()) {
    slices.emplace_back(data.data(), data.size());  // a copy
  }
  if (const std::string rest = request.SerializeAsString(); !rest.empty()) {
    slices.emplace_back(rest);
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

}  // namespace lmhead

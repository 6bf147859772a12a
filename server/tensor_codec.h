// Wire tensors (lmhead.v1.Tensor) <-> at::Tensor. Every wire field is checked before anything
// is allocated: a known dtype from the accepted set, the rank, dims >= 0, a shape product that
// does not overflow, and a byte length (of `data`, or Tensor.shared_memory's byte_size) equal to
// numel * element size. Messages start with the field's name ("hidden_states.shape[2]: ...") and
// say what was expected. A tensor's bytes in shared memory are read and written through
// ExternalBytes, which the caller resolves (server/forward_request.cc); a `data` field kept in
// the buffers it was received in, through DetachedData (server/received_request.h).
#ifndef LMHEAD_SERVER_TENSOR_CODEC_H_
#define LMHEAD_SERVER_TENSOR_CODEC_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/lmhead/v1/lmhead.pb.h"
#include "proto/wire_dtype.h"
#include "server/received_request.h"

namespace lmhead {

// The largest rank a wire tensor may have.
inline constexpr int kMaxTensorRank = 8;

// What a field must look like.
struct TensorRule {
  absl::string_view field;                     // the field's name in messages
  std::initializer_list<v1::DataType> dtypes;  // accepted element types
  int rank = -1;                               // required rank; -1: any up to kMaxTensorRank
};

// Checks `tensor` against `rule` and returns its shape. Allocates nothing beyond the shape. A
// tensor with `shared_memory` set must have empty `data`, and shared_memory.byte_size is checked
// as the length of `data` is otherwise (its region is not looked at here). `detached`, when not
// null, is the tensor's `data`, kept out of the message.
absl::StatusOr<std::vector<int64_t>> ValidateTensor(const v1::Tensor& tensor,
                                                    const TensorRule& rule,
                                                    const DetachedData* detached = nullptr);

// Validates, then returns a CPU tensor over `tensor.data()` without copying when the bytes are
// aligned for the element type (else a copy). The result aliases the message: it must not
// outlive it and must not be written to. With `detached` (the tensor's `data`, kept out of the
// message), its bytes are gathered into a tensor of its own instead, in pinned host memory when
// `pinned` (a CUDA build). FAILED_PRECONDITION for a tensor whose bytes are in shared memory
// (DecodeExternalTensor reads those). May throw c10::Error (pinned memory unavailable).
absl::StatusOr<at::Tensor> DecodeTensor(const v1::Tensor& tensor, const TensorRule& rule,
                                        const DetachedData* detached = nullptr,
                                        bool pinned = false);

// Where a tensor's bytes are when they are not in its message (a resolved Tensor.shared_memory):
// at `data` on `device` (host memory, or a CUDA device's), valid for as long as `owner` lives.
struct ExternalBytes {
  void* data = nullptr;
  c10::Device device = c10::Device(c10::kCPU);
  std::shared_ptr<const void> owner;
};

// Validates `tensor` (its shared_memory.byte_size bytes are at `bytes`), then returns it: over
// those bytes without copying (a tensor on bytes.device that keeps bytes.owner alive) when they
// are aligned for the element type and `private_copy` is false; else a copy in host memory of
// its own. A tensor whose values are validated afterwards takes a private copy: the bytes are
// another process's, which may change them at any time.
absl::StatusOr<at::Tensor> DecodeExternalTensor(const v1::Tensor& tensor, const TensorRule& rule,
                                                const ExternalBytes& bytes, bool private_copy);

// Writes `value` (any device, layout or dtype) into `out` as `dtype` (a floating dtype or the
// value's own integer dtype). INVALID_ARGUMENT for a dtype it cannot be written as.
absl::Status EncodeTensor(const at::Tensor& value, v1::DataType dtype, v1::Tensor* out);

// Writes `value` as `dtype`, as EncodeTensor would, into the `size` bytes at `bytes` instead of
// `out`'s data: `out` gets dtype and shape only. INTERNAL when the value's bytes are not exactly
// `size` (the caller checked the size against the plan). May throw c10::Error.
absl::Status EncodeTensorTo(const at::Tensor& value, v1::DataType dtype, const ExternalBytes& bytes,
                            uint64_t size, v1::Tensor* out);

// The LibTorch scalar type of a wire dtype; c10::ScalarType::Undefined when it has none.
c10::ScalarType ScalarTypeOf(v1::DataType dtype);

// The wire dtype of a LibTorch scalar type; DATA_TYPE_UNSPECIFIED when it has none.
v1::DataType DataTypeOf(c10::ScalarType type);

}  // namespace lmhead

#endif  // LMHEAD_SERVER_TENSOR_CODEC_H_

// TensorView: a tensor's dtype and shape with a view of its bytes where they already are (a
// memory-mapped file, a v1::Tensor, a caller's buffer), its rows as views, and copying it into wire
// tensors (lmhead.v1.Tensor) with one copy of the bytes. No LibTorch, no gRPC.
#ifndef LMHEAD_CLIENT_TENSOR_VIEW_H_
#define LMHEAD_CLIENT_TENSOR_VIEW_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/strings/string_view.h"
#include "proto/lmhead/v1/lmhead.pb.h"

namespace lmhead {

// A tensor whose elements are not owned by a v1::Tensor. Copyable; copies share `owner`.
struct TensorView {
  v1::DataType dtype = v1::DATA_TYPE_UNSPECIFIED;
  std::vector<int64_t> shape;  // outermost first
  // The elements, row-major, little-endian (numel * element size bytes for views made by
  // MapTensorFile and ViewOf of a valid tensor).
  absl::string_view data;
  // Keeps `data` alive where the view owns it (MapTensorFile: the file's mapping); null: whoever
  // made the view keeps `data` alive for as long as the view is used.
  std::shared_ptr<const void> owner;
};

// A view of `tensor`'s dtype, shape and data (no owner: `tensor` must outlive the view and not
// change while it is used).
TensorView ViewOf(const v1::Tensor& tensor);

// Sets `out` (cleared first) to the whole of `view`: dtype, shape, and the bytes, copied once.
void CopyTensorTo(const TensorView& view, v1::Tensor* out);

// Rows [begin, end) of `view` along dimension 0, 0 <= begin <= end, without a copy: shape
// (end - begin, then `view`'s other dims), data the view of those rows' bytes (bytes past the end
// of `view.data` are left out: the receiver checks the length against the shape), the same
// owner. Rank >= 1 (a rank-0 view is taken as rows of one element).
TensorView Rows(const TensorView& view, int64_t begin, int64_t end);

// Sets `out` to Rows(view, begin, end), the rows' bytes copied once, straight into `out`.
void CopyRowsTo(const TensorView& view, int64_t begin, int64_t end, v1::Tensor* out);

}  // namespace lmhead

#endif  // LMHEAD_CLIENT_TENSOR_VIEW_H_

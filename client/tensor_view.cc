#include "client/tensor_view.h"

#include "proto/wire_dtype.h"

namespace lmhead {
namespace {

// Bytes of one row (along dimension 0) of `view`: element size times the product of the other
// dims; 0 when one of them is 0; -1 when the product overflows (it cannot for a view whose
// bytes exist, unless the view holds no row).
int64_t RowBytes(const TensorView& view) {
  int64_t bytes = ElementSize(view.dtype);
  for (size_t i = 1; i < view.shape.size(); ++i) {
    if (view.shape[i] == 0) return 0;
  }
  for (size_t i = 1; i < view.shape.size(); ++i) {
    if (view.shape[i] < 0 || __builtin_mul_overflow(bytes, view.shape[i], &bytes)) return -1;
  }
  return bytes;
}

}  // namespace

TensorView ViewOf(const v1::Tensor& tensor) {
  TensorView view;
  view.dtype = tensor.dtype();
  view.shape.assign(tensor.shape().begin(), tensor.shape().end());
  view.data = tensor.data();
  return view;
}

void CopyTensorTo(const TensorView& view, v1::Tensor* out) {
  out->Clear();
  out->set_dtype(view.dtype);
  for (int64_t dim : view.shape) out->add_shape(dim);
  out->mutable_data()->assign(view.data.data(), view.data.size());
}

TensorView Rows(const TensorView& view, int64_t begin, int64_t end) {
  TensorView rows;
  rows.dtype = view.dtype;
  rows.shape.push_back(end - begin);
  if (!view.shape.empty()) {
    rows.shape.insert(rows.shape.end(), view.shape.begin() + 1, view.shape.end());
  }
  rows.owner = view.owner;
  const int64_t row_bytes = RowBytes(view);
  if (row_bytes <= 0 || begin >= end) return rows;
  const auto size = static_cast<int64_t>(view.data.size());
  int64_t offset = 0;
  int64_t length = 0;
  if (__builtin_mul_overflow(begin, row_bytes, &offset) || offset >= size) return rows;
  if (__builtin_mul_overflow(end - begin, row_bytes, &length) || length > size - offset) {
    length = size - offset;
  }
  rows.data = view.data.substr(static_cast<size_t>(offset), static_cast<size_t>(length));
  return rows;
}

void CopyRowsTo(const TensorView& view, int64_t begin, int64_t end, v1::Tensor* out) {
  CopyTensorTo(Rows(view, begin, end), out);
}

}  // namespace lmhead

#include "client/tensor_view.h"

#include <string>

#include "gtest/gtest.h"

namespace lmhead {
namespace {

TEST(TensorViewTest, CopiesRowsOnce) {
  const std::string bytes = "abcdefghijklmnopqrstuvwx";  // (3, 2, 2) BF16: 8 bytes a row
  const TensorView view{v1::DATA_TYPE_BF16, {3, 2, 2}, bytes, nullptr};
  v1::Tensor out;
  out.set_data("stale");
  out.add_shape(9);
  CopyRowsTo(view, 1, 3, &out);
  EXPECT_EQ(out.dtype(), v1::DATA_TYPE_BF16);
  ASSERT_EQ(out.shape_size(), 3);
  EXPECT_EQ(out.shape(0), 2);
  EXPECT_EQ(out.shape(1), 2);
  EXPECT_EQ(out.shape(2), 2);
  EXPECT_EQ(out.data(), "ijklmnopqrstuvwx");
  CopyRowsTo(view, 3, 3, &out);
  EXPECT_EQ(out.shape(0), 0);
  EXPECT_EQ(out.data(), "");

  CopyTensorTo(view, &out);
  EXPECT_EQ(out.data(), bytes);
  EXPECT_EQ(out.shape_size(), 3);
  v1::Tensor again;
  CopyTensorTo(ViewOf(out), &again);
  EXPECT_EQ(again.SerializeAsString(), out.SerializeAsString());
}

TEST(TensorViewTest, RowsPastTheDataAreLeftOut) {
  // A view whose bytes are shorter than its shape says: the receiver sees the short data and
  // refuses it, as it would the old SliceRows's substr.
  const std::string bytes(12, 'x');  // 1.5 rows of (2, 2) FP32
  const TensorView view{v1::DATA_TYPE_FP32, {2, 2}, bytes, nullptr};
  v1::Tensor out;
  CopyRowsTo(view, 0, 2, &out);
  EXPECT_EQ(out.data().size(), 12u);
  CopyRowsTo(view, 1, 2, &out);
  EXPECT_EQ(out.data().size(), 4u);
  CopyRowsTo(view, 2, 3, &out);
  EXPECT_EQ(out.data().size(), 0u);
  EXPECT_EQ(out.shape(0), 1);
}

TEST(TensorViewTest, EmptyDimsAndHugeOnesDoNotOverflow) {
  // (2, 2^62, 0) holds no byte: its rows are empty, with no overflow on the way.
  const TensorView empty{v1::DATA_TYPE_INT64, {2, int64_t{1} << 62, 0}, "", nullptr};
  v1::Tensor out;
  CopyRowsTo(empty, 0, 1, &out);
  EXPECT_EQ(out.data(), "");
  ASSERT_EQ(out.shape_size(), 3);
  EXPECT_EQ(out.shape(1), int64_t{1} << 62);
  const TensorView huge{v1::DATA_TYPE_INT64, {0, int64_t{1} << 62, 4}, "", nullptr};
  CopyRowsTo(huge, 0, 0, &out);
  EXPECT_EQ(out.data(), "");
  EXPECT_EQ(out.shape(0), 0);
}

}  // namespace
}  // namespace lmhead

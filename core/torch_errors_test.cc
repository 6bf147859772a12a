#include "core/torch_errors.h"

#include <ATen/ATen.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

TEST(CatchTorchErrorsTest, ShapeErrorBecomesInvalidArgumentWithoutBacktrace) {
  absl::StatusOr<at::Tensor> result = CatchTorchErrors([]() -> absl::StatusOr<at::Tensor> {
    return at::mm(at::ones({2, 3}), at::ones({4, 5}));
  });
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(result.status().message(), ::testing::HasSubstr("cannot be multiplied"));
  EXPECT_THAT(result.status().message(), ::testing::Not(::testing::HasSubstr("Exception raised")));
}

TEST(CatchTorchErrorsTest, ValuePassesThrough) {
  absl::StatusOr<int64_t> result = CatchTorchErrors([]() -> absl::StatusOr<int64_t> {
    return at::ones({3, 4}).numel();
  });
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(*result, 12);
}

TEST(CatchTorchErrorsTest, OtherExceptionsBecomeInternal) {
  absl::Status status =
      CatchTorchErrors([]() -> absl::Status { throw std::runtime_error("boom"); });
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(status.message(), "boom");
}

}  // namespace
}  // namespace lmhead

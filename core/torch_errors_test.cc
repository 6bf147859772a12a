#include "core/torch_errors.h"

#include <ATen/ATen.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

TEST(CatchTorchErrorsTest, LibTorchErrorIsInternalWithItsTextOnlyInThePayload) {
  absl::StatusOr<at::Tensor> result = CatchTorchErrors([]() -> absl::StatusOr<at::Tensor> {
    return at::mm(at::ones({2, 3}), at::ones({4, 5}));
  });
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(result.status().message(), "LibTorch failed");
  const std::string detail = LibraryErrorDetail(result.status());
  EXPECT_THAT(detail, ::testing::HasSubstr("cannot be multiplied"));
  EXPECT_THAT(detail, ::testing::Not(::testing::HasSubstr("Exception raised")));
  EXPECT_THAT(result.status().ToString(), ::testing::HasSubstr("cannot be multiplied"));
}

TEST(CatchTorchErrorsTest, OutOfMemoryIsResourceExhausted) {
  absl::Status status = CatchTorchErrors([]() -> absl::Status {
    throw c10::OutOfMemoryError(c10::SourceLocation{__func__, __FILE__, __LINE__},
                                "CUDA out of memory. Tried to allocate 300.00 GiB");
  });
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(status.message(), "out of device memory");
  EXPECT_THAT(LibraryErrorDetail(status), ::testing::HasSubstr("Tried to allocate"));
}

TEST(CatchTorchErrorsTest, ValuePassesThrough) {
  absl::StatusOr<int64_t> result = CatchTorchErrors([]() -> absl::StatusOr<int64_t> {
    return at::ones({3, 4}).numel();
  });
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(*result, 12);
}

TEST(CatchTorchErrorsTest, AFailedHostAllocationIsResourceExhausted) {
  // 128 TiB: the allocator refuses at once.
  absl::StatusOr<at::Tensor> result = CatchTorchErrors(
      []() -> absl::StatusOr<at::Tensor> { return at::empty({int64_t{1} << 45}); });
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted) << result.status();
  EXPECT_EQ(result.status().message(), "out of host memory");
  EXPECT_THAT(LibraryErrorDetail(result.status()), ::testing::HasSubstr("can't allocate"));
}

TEST(CatchTorchErrorsTest, OtherExceptionsBecomeInternal) {
  absl::Status status =
      CatchTorchErrors([]() -> absl::Status { throw std::runtime_error("boom"); });
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(status.message(), "unexpected exception");
  EXPECT_EQ(LibraryErrorDetail(status), "boom");
}

}  // namespace
}  // namespace lmhead

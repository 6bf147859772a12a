#include "server/concurrency_limiter.h"

#include <utility>

#include "gtest/gtest.h"

namespace lmhead {
namespace {

TEST(ConcurrencyLimiterTest, RefusesBeyondTheLimitAndReleasesOnDestruction) {
  ConcurrencyLimiter limiter(2);
  ConcurrencyLimiter::Slot a = limiter.TryAcquire();
  {
    ConcurrencyLimiter::Slot b = limiter.TryAcquire();
    EXPECT_TRUE(a);
    EXPECT_TRUE(b);
    EXPECT_FALSE(limiter.TryAcquire());
    EXPECT_EQ(limiter.in_use(), 2);
  }
  EXPECT_EQ(limiter.in_use(), 1);
  ConcurrencyLimiter::Slot moved = std::move(a);
  EXPECT_TRUE(moved);
  EXPECT_FALSE(a);  // NOLINT(bugprone-use-after-move): checking the moved-from state
  EXPECT_EQ(limiter.in_use(), 1);
}

TEST(ConcurrencyLimiterTest, ZeroAdmitsNothing) {
  ConcurrencyLimiter limiter(0);
  EXPECT_FALSE(limiter.TryAcquire());
}

}  // namespace
}  // namespace lmhead

#include "server/read_ahead.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace lmhead {
namespace {

using std::chrono::milliseconds;

// Waits (up to 10 s) until `value` reaches `target`, then a little longer, so that a producer
// running further ahead than it should would be seen.
void SettleAt(const std::atomic<int>& value, int target) {
  for (int i = 0; i < 1000 && value < target; ++i) std::this_thread::sleep_for(milliseconds(10));
  std::this_thread::sleep_for(milliseconds(50));
}

TEST(ReadAheadTest, HandsOverEveryItemInOrderThenNothing) {
  int next = 0;
  ReadAhead<int> reader(
      [&]() -> std::optional<int> { return next < 5 ? std::optional(next++) : std::nullopt; },
      [](int) { return false; });
  for (int i = 0; i < 5; ++i) EXPECT_EQ(reader.Next(), i);
  EXPECT_EQ(reader.Next(), std::nullopt);
  EXPECT_EQ(reader.Next(), std::nullopt);
}

TEST(ReadAheadTest, ProducesOneItemAheadAtMost) {
  std::atomic<int> produced{0};
  ReadAhead<int> reader([&]() -> std::optional<int> { return produced++; },
                        [](int) { return false; });
  SettleAt(produced, 1);
  EXPECT_EQ(produced, 1);  // item 0, waiting to be taken
  EXPECT_EQ(reader.Next(), 0);
  SettleAt(produced, 2);
  EXPECT_EQ(produced, 2);                     // item 1 made while the consumer works on item 0
  EXPECT_TRUE(reader.Stop(milliseconds(0)));  // not inside produce: item 1 waits to be taken
}

TEST(ReadAheadTest, StopsAfterTheLastItem) {
  std::atomic<int> calls{0};
  ReadAhead<int> reader([&]() -> std::optional<int> { return calls++; },
                        [](int item) { return item == 2; });  // e.g. a request that failed
  EXPECT_EQ(reader.Next(), 0);
  EXPECT_EQ(reader.Next(), 1);
  EXPECT_EQ(reader.Next(), 2);
  EXPECT_EQ(reader.Next(), std::nullopt);
  EXPECT_EQ(calls, 3);
}

// A consumer that answers item k before its producer can make item k+1 (a client sending each
// message only after the previous answer) must not deadlock: the producer only waits in
// produce, and Stop() reports it so the caller can unblock it.
TEST(ReadAheadTest, StopReportsAProducerBlockedInProduce) {
  std::mutex mutex;
  std::condition_variable released_cv;
  bool released = false;
  std::atomic<int> calls{0};
  {
    ReadAhead<int> reader(
        [&]() -> std::optional<int> {
          if (calls++ == 0) return 0;
          std::unique_lock<std::mutex> lock(mutex);
          released_cv.wait(lock, [&] { return released; });
          return std::nullopt;
        },
        [](int) { return false; });
    EXPECT_EQ(reader.Next(), 0);
    SettleAt(calls, 2);
    EXPECT_FALSE(reader.Stop(milliseconds(20)));  // blocked in the second produce call
    {
      std::lock_guard<std::mutex> lock(mutex);
      released = true;
    }
    released_cv.notify_all();
  }  // joins once produce returned
  EXPECT_EQ(calls, 2);
}

TEST(ReadAheadTest, StopWaitsForAProduceCallThatEndsWithinTheGrace) {
  std::atomic<int> calls{0};
  ReadAhead<int> reader(
      [&]() -> std::optional<int> {
        if (calls++ > 0) std::this_thread::sleep_for(milliseconds(100));
        return 1;
      },
      [](int) { return false; });
  EXPECT_EQ(reader.Next(), 1);
  SettleAt(calls, 2);
  EXPECT_TRUE(reader.Stop(std::chrono::seconds(10)));
  EXPECT_EQ(calls, 2);
}

}  // namespace
}  // namespace lmhead

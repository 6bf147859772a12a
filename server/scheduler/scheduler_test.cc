#include "server/scheduler/scheduler.h"

#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace lmhead {
namespace {

std::shared_ptr<Job> MakeJob(const std::string& key, int64_t tokens,
                             std::shared_ptr<std::atomic<bool>> wanted = nullptr) {
  auto job = std::make_shared<Job>();
  job->batch_key = key;
  job->tokens = tokens;
  job->still_wanted = [wanted]() {
    return wanted == nullptr || wanted->load() ? absl::OkStatus()
                                               : absl::CancelledError("the client cancelled");
  };
  return job;
}

SchedulerLimits Limits(int64_t batch_tokens, int64_t queue_tokens,
                       absl::Duration delay = absl::ZeroDuration()) {
  return SchedulerLimits{batch_tokens, queue_tokens, delay};
}

TEST(SchedulerTest, BatchesJobsOfOneKeyOldestFirstWithinTheTokenBudget) {
  Scheduler scheduler(Limits(10, 100));
  const auto a1 = MakeJob("a", 4);
  const auto b1 = MakeJob("b", 4);
  const auto a2 = MakeJob("a", 4);
  const auto a3 = MakeJob("a", 4);
  for (const auto& job : {a1, b1, a2, a3}) ASSERT_TRUE(scheduler.Submit(job).ok());
  EXPECT_EQ(scheduler.queued_tokens(), 16);

  // The oldest job is a1: its batch takes a2 too; a3 would exceed 10 tokens.
  std::vector<std::shared_ptr<Job>> batch = scheduler.NextBatch();
  ASSERT_EQ(batch.size(), 2u);
  EXPECT_EQ(batch[0], a1);
  EXPECT_EQ(batch[1], a2);
  EXPECT_EQ(a1->batch_size, 2);
  scheduler.BatchDone();
  // Then b1 (older than a3), then a3.
  batch = scheduler.NextBatch();
  ASSERT_EQ(batch.size(), 1u);
  EXPECT_EQ(batch[0], b1);
  scheduler.BatchDone();
  batch = scheduler.NextBatch();
  ASSERT_EQ(batch.size(), 1u);
  EXPECT_EQ(batch[0], a3);
  scheduler.BatchDone();
  EXPECT_EQ(scheduler.queued_tokens(), 0);
  EXPECT_TRUE(scheduler.WaitIdle(absl::Now()));
}

TEST(SchedulerTest, AJobOverTheBatchBudgetRunsAlone) {
  Scheduler scheduler(Limits(10, 1000));
  const auto big = MakeJob("a", 50);
  const auto small = MakeJob("a", 1);
  ASSERT_TRUE(scheduler.Submit(big).ok());
  ASSERT_TRUE(scheduler.Submit(small).ok());
  EXPECT_EQ(scheduler.NextBatch(), std::vector<std::shared_ptr<Job>>{big});
  scheduler.BatchDone();
  EXPECT_EQ(scheduler.NextBatch(), std::vector<std::shared_ptr<Job>>{small});
  scheduler.BatchDone();
}

TEST(SchedulerTest, AFullQueueRefusesNamingTheLimitAndAJobAloneAlwaysFits) {
  Scheduler scheduler(Limits(10, 8));
  ASSERT_TRUE(scheduler.Submit(MakeJob("a", 20)).ok());  // alone: admitted over the limit
  const absl::Status refused = scheduler.Submit(MakeJob("a", 1));
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.message().find("--max_queue_tokens=8"), absl::string_view::npos)
      << refused.message();
  scheduler.NextBatch();
  scheduler.BatchDone();
  EXPECT_TRUE(scheduler.Submit(MakeJob("a", 5)).ok());
  EXPECT_TRUE(scheduler.Submit(MakeJob("a", 3)).ok());
  EXPECT_EQ(scheduler.Submit(MakeJob("a", 1)).code(), absl::StatusCode::kResourceExhausted);
}

TEST(SchedulerTest, WaitForRoomWaitsUntilAnExecutorTakesWork) {
  Scheduler scheduler(Limits(100, 8));
  ASSERT_TRUE(scheduler.Submit(MakeJob("a", 8)).ok());
  std::atomic<bool> admitted{false};
  std::thread waiter([&] {
    EXPECT_TRUE(scheduler.Submit(MakeJob("a", 4), /*wait_for_room=*/true).ok());
    admitted = true;
  });
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_FALSE(admitted.load());
  scheduler.NextBatch();  // takes the 8 tokens
  waiter.join();
  EXPECT_TRUE(admitted.load());
  scheduler.BatchDone();
}

TEST(SchedulerTest, WaitForRoomStopsWhenTheCallerStopsWanting) {
  Scheduler scheduler(Limits(100, 8));
  ASSERT_TRUE(scheduler.Submit(MakeJob("a", 8)).ok());
  auto wanted = std::make_shared<std::atomic<bool>>(true);
  std::thread canceller([wanted] {
    absl::SleepFor(absl::Milliseconds(30));
    *wanted = false;
  });
  EXPECT_EQ(scheduler.Submit(MakeJob("a", 4, wanted), /*wait_for_room=*/true).code(),
            absl::StatusCode::kCancelled);
  canceller.join();
}

TEST(SchedulerTest, JobsNoLongerWantedAreAnsweredWithoutRunning) {
  Scheduler scheduler(Limits(100, 100));
  auto wanted = std::make_shared<std::atomic<bool>>(true);
  const auto dropped = MakeJob("a", 2, wanted);
  const auto kept = MakeJob("a", 2);
  ASSERT_TRUE(scheduler.Submit(dropped).ok());
  ASSERT_TRUE(scheduler.Submit(kept).ok());
  *wanted = false;
  EXPECT_EQ(scheduler.NextBatch(), std::vector<std::shared_ptr<Job>>{kept});
  ASSERT_TRUE(dropped->done.HasBeenNotified());
  EXPECT_EQ(dropped->result.status().code(), absl::StatusCode::kCancelled);
  scheduler.BatchDone();
}

TEST(SchedulerTest, WithdrawRemovesAQueuedJobOnly) {
  Scheduler scheduler(Limits(100, 100));
  const auto first = MakeJob("a", 2);
  const auto second = MakeJob("b", 3);
  ASSERT_TRUE(scheduler.Submit(first).ok());
  ASSERT_TRUE(scheduler.Submit(second).ok());
  EXPECT_TRUE(scheduler.Withdraw(*second));
  EXPECT_FALSE(scheduler.Withdraw(*second));
  EXPECT_EQ(scheduler.queued_tokens(), 2);
  EXPECT_EQ(scheduler.NextBatch(), std::vector<std::shared_ptr<Job>>{first});
  EXPECT_FALSE(scheduler.Withdraw(*first));  // running
  scheduler.BatchDone();
}

TEST(SchedulerTest, AnIdleExecutorWaitsUpToTheQueueDelayForCompany) {
  Scheduler scheduler(Limits(10, 100, absl::Milliseconds(300)));
  const auto first = MakeJob("a", 2);
  const auto second = MakeJob("a", 2);
  ASSERT_TRUE(scheduler.Submit(first).ok());
  std::thread late([&] {
    absl::SleepFor(absl::Milliseconds(50));
    ASSERT_TRUE(scheduler.Submit(second).ok());
  });
  const absl::Time start = absl::Now();
  const std::vector<std::shared_ptr<Job>> batch = scheduler.NextBatch();
  late.join();
  EXPECT_EQ(batch.size(), 2u);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(250));  // the whole delay: 4 < 10 tokens
  scheduler.BatchDone();

  // A batch that fills its budget does not wait.
  ASSERT_TRUE(scheduler.Submit(MakeJob("a", 10)).ok());
  const absl::Time full = absl::Now();
  EXPECT_EQ(scheduler.NextBatch().size(), 1u);
  EXPECT_LT(absl::Now() - full, absl::Milliseconds(250));
  scheduler.BatchDone();
}

TEST(SchedulerTest, CloseRefusesNewWorkAndAbortAnswersTheQueue) {
  Scheduler scheduler(Limits(100, 100));
  const auto queued = MakeJob("a", 2);
  ASSERT_TRUE(scheduler.Submit(queued).ok());
  scheduler.Close();
  EXPECT_EQ(scheduler.Submit(MakeJob("a", 1)).code(), absl::StatusCode::kUnavailable);
  scheduler.AbortQueued(absl::UnavailableError("shutting down"));
  ASSERT_TRUE(queued->done.HasBeenNotified());
  EXPECT_EQ(queued->result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(scheduler.NextBatch().empty());  // closed and empty: executors stop
}

TEST(SchedulerTest, ManyProducersAndTwoExecutorsRunEveryJobOnce) {
  Scheduler scheduler(Limits(16, 1 << 20));
  std::atomic<int> ran{0};
  std::vector<std::thread> executors;
  for (int e = 0; e < 2; ++e) {
    executors.emplace_back([&] {
      while (true) {
        const std::vector<std::shared_ptr<Job>> batch = scheduler.NextBatch();
        if (batch.empty()) return;
        for (const auto& job : batch) {
          ++ran;
          job->result = LMOutput{};
          job->done.Notify();
        }
        scheduler.BatchDone();
      }
    });
  }
  std::vector<std::shared_ptr<Job>> jobs;
  std::vector<std::thread> producers;
  absl::Mutex mu;
  for (int p = 0; p < 4; ++p) {
    producers.emplace_back([&, p] {
      for (int i = 0; i < 250; ++i) {
        auto job = MakeJob(p % 2 == 0 ? "a" : "b", 1 + i % 7);
        ASSERT_TRUE(scheduler.Submit(job).ok());
        absl::MutexLock lock(&mu);
        jobs.push_back(job);
      }
    });
  }
  for (auto& producer : producers) producer.join();
  for (const auto& job : jobs) job->done.WaitForNotification();
  EXPECT_TRUE(scheduler.WaitIdle(absl::Now() + absl::Seconds(10)));
  scheduler.Close();
  for (auto& executor : executors) executor.join();
  EXPECT_EQ(ran.load(), 1000);
}

}  // namespace
}  // namespace lmhead

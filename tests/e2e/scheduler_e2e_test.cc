// The request queue and dynamic batching of the real server over loopback (issue 12): concurrent
// callers with different options each get their solo answer, on one executor and on two; a full
// queue refuses and recovers; deadlines and cancellations in the queue; SIGTERM with a full
// queue; a big stream does not starve small calls.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/lmhead_client.h"
#include "proto/lmhead/v1/lmhead.pb.h"
#include "tests/e2e/e2e_util.h"
#include "tests/e2e/server_process.h"

namespace lmhead {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kDModel = 64;
constexpr int64_t kVocab = 1000;

std::unique_ptr<LMHeadClient> Connect(
    const ServerProcess& server, int max_attempts = 1,
    std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
  ClientOptions options;
  options.max_attempts = max_attempts;
  options.timeout = timeout;
  return LMHeadClient::Connect(server.address(), options);
}

// A random request over the demo head: shapes, dtypes and every per-request option.
v1::ForwardRequest RandomRequest(std::mt19937_64& rng) {
  const auto pick = [&rng](int n) { return static_cast<int>(rng() % n); };
  // One in eight has no tokens (B = 0 or S = 0); one in six has a NaN or an infinity.
  const int empty = pick(16);
  const int64_t batch = empty == 0 ? 0 : 1 + pick(3);
  const int64_t length = empty == 1 ? 0 : 1 + pick(40);
  at::Generator generator = at::detail::createCPUGenerator(rng());
  const at::ScalarType dtype = std::vector{at::kFloat, at::kBFloat16, at::kHalf}[pick(3)];
  at::Tensor x = at::randn({batch, length, kDModel}, generator).to(dtype);
  if (x.numel() > 0 && pick(6) == 0) {
    x.view(-1)[pick(static_cast<int>(x.numel()))] = pick(2) == 0
                                                        ? std::numeric_limits<float>::quiet_NaN()
                                                        : std::numeric_limits<float>::infinity();
  }
  ForwardArgs args;
  args.loss_implementation =
      pick(2) == 0 ? v1::LOSS_IMPLEMENTATION_DEFAULT : v1::LOSS_IMPLEMENTATION_FUSED_LINEAR;
  args.return_argmax = pick(2) == 0;
  const bool labelled =
      args.loss_implementation == v1::LOSS_IMPLEMENTATION_FUSED_LINEAR || pick(4) != 0;
  if (labelled) {
    const int64_t ignore = pick(2) == 0 ? -100 : -1;
    at::Tensor labels = at::randint(kVocab, {batch, length}, generator, at::kLong);
    labels.masked_fill_(at::rand({batch, length}, generator) < 0.2, ignore);
    args.labels = ToWire(labels);
    if (ignore != -100) args.ignore_index = ignore;
    // ("none" needs B > 0: the loss is reshaped to (B, -1), as upstream.)
    args.loss_reduction = std::vector{v1::LOSS_REDUCTION_MEAN, v1::LOSS_REDUCTION_SUM,
                                      v1::LOSS_REDUCTION_NONE}[pick(batch == 0 ? 2 : 3)];
    if (pick(2) == 0) args.z_loss_multiplier = pick(2) == 0 ? 1e-4 : 0.0;
    if (pick(3) == 0) args.loss_div_factor = 0.5 + pick(4);
    if (args.loss_implementation == v1::LOSS_IMPLEMENTATION_FUSED_LINEAR) {
      args.return_logits = false;
    } else if (pick(2) == 0) {
      args.return_logits = false;
    }
  }
  switch (length == 0 || batch == 0 ? 0 : pick(3)) {
    case 0:
      break;
    case 1:
      args.logits_to_keep = static_cast<int64_t>(1 + pick(static_cast<int>(length)));
      break;
    default:
      args.logits_to_keep = ToWire(at::randint(length, {batch, 1 + pick(4)}, generator, at::kLong));
  }
  return MakeForwardRequest(ToWire(x), args);
}

// Two answers to one request, up to float rounding of the dtype answered in.
void ExpectSameAnswer(const v1::ForwardResponse& solo, const v1::ForwardResponse& batched,
                      const std::string& what) {
  EXPECT_EQ(solo.num_scored_tokens(), batched.num_scored_tokens()) << what;
  EXPECT_EQ(solo.num_nonfinite_inputs(), batched.num_nonfinite_inputs()) << what;
  for (const auto& [name, field] :
       std::vector<std::pair<std::string, const v1::Tensor& (v1::ForwardResponse::*)() const>>{
           {"logits", &v1::ForwardResponse::logits},
           {"loss", &v1::ForwardResponse::loss},
           {"ce_loss", &v1::ForwardResponse::ce_loss},
           {"z_loss", &v1::ForwardResponse::z_loss},
           {"argmax", &v1::ForwardResponse::argmax}}) {
    const v1::Tensor& a = (solo.*field)();
    const v1::Tensor& b = (batched.*field)();
    ASSERT_EQ(a.dtype(), b.dtype()) << what << " " << name;
    ASSERT_EQ(std::vector<int64_t>(a.shape().begin(), a.shape().end()),
              std::vector<int64_t>(b.shape().begin(), b.shape().end()))
        << what << " " << name;
    if (a.data().empty()) continue;
    const at::Tensor ta = FromWire(a);
    const at::Tensor tb = FromWire(b);
    if (name == "argmax") {
      EXPECT_TRUE(at::equal(ta, tb)) << what << " " << name;
    } else {
      const double tolerance = ta.scalar_type() == at::kFloat ? 1e-4 : 2e-2;
      EXPECT_TRUE(at::allclose(ta.to(at::kDouble), tb.to(at::kDouble), tolerance, tolerance,
                               /*equal_nan=*/true))
          << what << " " << name << "\nsolo " << ta << "\nbatched " << tb;
    }
  }
}

class ConcurrentCallsTest : public ::testing::TestWithParam<const char*> {};

// 96 random requests (some without tokens, some with a NaN or an infinity), first one at a time
// (each alone), then all at once from 16 threads over 4 channels with a 20 ms batching delay: the
// same answers and non-finite counts, and many of them computed in batches.
TEST_P(ConcurrentCallsTest, EachCallerGetsItsSoloAnswer) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({absl::StrCat("--device=", GetParam()), "--max_queue_delay_us=20000",
                            "--max_batch_tokens=256"});
  ASSERT_TRUE(server.ok()) << server.status();
  std::mt19937_64 rng(42);
  std::vector<v1::ForwardRequest> requests;
  for (int i = 0; i < 96; ++i) requests.push_back(RandomRequest(rng));

  auto client = Connect(**server);
  std::vector<v1::ForwardResponse> solo;
  for (const v1::ForwardRequest& request : requests) {
    absl::StatusOr<v1::ForwardResponse> response = client->Forward(request);
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->timings().batch_size(), 1);
    solo.push_back(*response);
  }

  std::vector<std::unique_ptr<LMHeadClient>> clients;
  for (int c = 0; c < 4; ++c) clients.push_back(Connect(**server));
  std::vector<absl::StatusOr<v1::ForwardResponse>> batched(requests.size(),
                                                           absl::UnknownError("not sent"));
  std::atomic<size_t> next{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = next++; i < requests.size(); i = next++) {
        batched[i] = clients[t % clients.size()]->Forward(requests[i]);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  int packed = 0;
  int empty = 0;      // calls without tokens, packed with others like any call
  int nonfinite = 0;  // calls with a NaN or an infinity, which must not reach the others
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(batched[i].ok()) << i << ": " << batched[i].status();
    packed += batched[i]->timings().batch_size() > 1 ? 1 : 0;
    const auto& shape = requests[i].hidden_states().shape();
    empty += std::find(shape.begin(), shape.end(), 0) != shape.end() ? 1 : 0;
    nonfinite += solo[i].num_nonfinite_inputs() > 0 ? 1 : 0;
    ExpectSameAnswer(solo[i], *batched[i], absl::StrCat("request ", i));
  }
  EXPECT_GT(packed, 24) << "few calls were batched";
  EXPECT_GE(empty, 3);
  EXPECT_GE(nonfinite, 3);
  EXPECT_EQ((*server)->Stop(), 0);
}

INSTANTIATE_TEST_SUITE_P(Devices, ConcurrentCallsTest, ::testing::Values("cpu", "cpu,cpu"),
                         [](const auto& info) {
                           return std::string(info.index == 0 ? "OneExecutor" : "TwoExecutors");
                         });

// A server whose single executor can be kept busy for seconds by one heavy call.
constexpr int64_t kHeavyD = 256;
constexpr int64_t kHeavyVocab = 65536;

absl::StatusOr<std::unique_ptr<ServerProcess>> HeavyServer(std::vector<std::string> flags) {
  flags.push_back(absl::StrCat("--demo_d_model=", kHeavyD));
  flags.push_back(absl::StrCat("--demo_vocab_size=", kHeavyVocab));
  return ServerProcess::Start(flags);
}

// `tokens` tokens of fused_linear with labels, losses only.
v1::ForwardRequest HeavyRequest(int64_t tokens, uint64_t seed = 1) {
  at::Generator generator = at::detail::createCPUGenerator(seed);
  ForwardArgs args;
  args.labels = ToWire(at::randint(kHeavyVocab, {1, tokens}, generator, at::kLong));
  args.loss_implementation = v1::LOSS_IMPLEMENTATION_FUSED_LINEAR;
  args.loss_reduction = v1::LOSS_REDUCTION_SUM;
  args.return_logits = false;
  return MakeForwardRequest(ToWire(at::randn({1, tokens, kHeavyD}, generator)), args);
}

// A call that keeps the executor busy, on a thread of its own.
class BusyExecutor {
 public:
  explicit BusyExecutor(const ServerProcess& server, int64_t tokens = 4096)
      : thread_([this, &server, tokens] {
          result_ = Connect(server)->Forward(HeavyRequest(tokens));
          done_ = true;
        }) {
    // Room for the call to arrive and start.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  ~BusyExecutor() {
    if (thread_.joinable()) thread_.join();
  }
  bool done() const { return done_; }
  const absl::StatusOr<v1::ForwardResponse>& Wait() {
    if (thread_.joinable()) thread_.join();
    return result_;
  }

 private:
  std::atomic<bool> done_{false};
  absl::StatusOr<v1::ForwardResponse> result_ = absl::UnknownError("not done");
  std::thread thread_;
};

// `n` calls of 8 tokens, each from a thread of its own (seeds first_seed, first_seed + 1, ...).
class Callers {
 public:
  Callers(const ServerProcess& server, int n, int max_attempts = 1, uint64_t first_seed = 0)
      : results_(n, absl::UnknownError("not sent")) {
    for (int i = 0; i < n; ++i) {
      threads_.emplace_back([this, &server, max_attempts, first_seed, i] {
        results_[i] = Connect(server, max_attempts)->Forward(HeavyRequest(8, first_seed + i));
      });
    }
  }
  ~Callers() { Join(); }
  // Waits for every call; their answers in order.
  const std::vector<absl::StatusOr<v1::ForwardResponse>>& Join() {
    for (auto& thread : threads_) {
      if (thread.joinable()) thread.join();
    }
    return results_;
  }

 private:
  std::vector<absl::StatusOr<v1::ForwardResponse>> results_;
  std::vector<std::thread> threads_;
};

TEST(QueueTest, AFullQueueRefusesNamingTheLimitThenRecovers) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      HeavyServer({"--max_queue_tokens=64", "--max_batch_tokens=64"});
  ASSERT_TRUE(server.ok()) << server.status();
  BusyExecutor busy(**server);
  // Eight calls of 8 tokens fill the queue behind the busy executor (retrying the refusals a
  // probe below may cause while it waits in the queue).
  Callers callers(**server, 8, /*max_attempts=*/5, /*first_seed=*/10);
  // A probe with a short deadline: refused once the eight are queued, else it waits and times
  // out (and is withdrawn from the queue), and is tried again.
  absl::StatusOr<v1::ForwardResponse> refused = absl::UnknownError("not tried");
  for (int attempt = 0; attempt < 50 && !busy.done(); ++attempt) {
    refused = Connect(**server, 1, std::chrono::milliseconds(200))->Forward(HeavyRequest(8, 99));
    if (!absl::IsDeadlineExceeded(refused.status())) break;
  }
  ASSERT_FALSE(busy.done()) << "the heavy call was too quick for this test";
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "--max_queue_tokens=64"))
      << refused.status();
  EXPECT_FALSE(busy.done());
  const std::vector<absl::StatusOr<v1::ForwardResponse>>& queued = callers.Join();
  // Once the queue has drained the same call passes.
  const absl::StatusOr<v1::ForwardResponse> later = Connect(**server)->Forward(HeavyRequest(8, 99));
  EXPECT_TRUE(later.ok()) << later.status();
  for (const auto& response : queued) EXPECT_TRUE(response.ok()) << response.status();
  // Those queued together ran in one batch.
  int largest_batch = 0;
  for (const auto& response : queued) {
    if (response.ok()) largest_batch = std::max(largest_batch, response->timings().batch_size());
  }
  EXPECT_GE(largest_batch, 2);
  EXPECT_GT(queued[0]->timings().queue_us(), 100000);
  EXPECT_TRUE(busy.Wait().ok()) << busy.Wait().status();
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST(QueueTest, DeadlinesAndCancellationsInTheQueueAreAnsweredWithoutCompute) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = HeavyServer({});
  ASSERT_TRUE(server.ok()) << server.status();
  BusyExecutor busy(**server);
  const Clock::time_point start = Clock::now();
  const absl::StatusOr<v1::ForwardResponse> late =
      Connect(**server, 1, std::chrono::milliseconds(300))->Forward(HeavyRequest(8));
  EXPECT_EQ(late.status().code(), absl::StatusCode::kDeadlineExceeded) << late.status();
  EXPECT_LT(Clock::now() - start, std::chrono::milliseconds(1500));

  // A stream cancelled while its micro-batch waits.
  StreamCancellation cancellation;
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    cancellation.Cancel();
  });
  bool sent = false;
  const absl::Status cancelled = Connect(**server)->ForwardStream(
      [&](v1::ForwardRequest* next) {
        if (sent) return false;
        sent = true;
        *next = HeavyRequest(8);
        return true;
      },
      [](int64_t, const v1::ForwardResponse&) { return true; }, &cancellation);
  canceller.join();
  EXPECT_EQ(cancelled.code(), absl::StatusCode::kCancelled) << cancelled;
  EXPECT_FALSE(busy.done()) << "the heavy call was too quick for this test";
  EXPECT_TRUE(busy.Wait().ok());
  // Neither was computed: the only batch besides the heavy call is the check below.
  const absl::StatusOr<v1::ForwardResponse> after = Connect(**server)->Forward(HeavyRequest(8));
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ((*server)->Stop(), 0);
  const std::string log = (*server)->Log();
  EXPECT_TRUE(absl::StrContains(log, "failed: DEADLINE_EXCEEDED")) << log;
  EXPECT_TRUE(absl::StrContains(log, "failed: CANCELLED")) << log;
}

TEST(QueueTest, SigtermLetsQueuedWorkFinishWithinTheGracePeriod) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      HeavyServer({"--shutdown_grace_seconds=60"});
  ASSERT_TRUE(server.ok()) << server.status();
  BusyExecutor busy(**server);
  Callers callers(**server, 4);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ASSERT_FALSE(busy.done());
  EXPECT_EQ((*server)->Stop(), 0);
  const std::vector<absl::StatusOr<v1::ForwardResponse>>& queued = callers.Join();
  for (const auto& response : queued) EXPECT_TRUE(response.ok()) << response.status();
  EXPECT_TRUE(busy.Wait().ok()) << busy.Wait().status();
}

TEST(QueueTest, SigtermPastTheGracePeriodAnswersQueuedWorkUnavailable) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      HeavyServer({"--shutdown_grace_seconds=0.2"});
  ASSERT_TRUE(server.ok()) << server.status();
  BusyExecutor busy(**server);
  Callers callers(**server, 4);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ASSERT_FALSE(busy.done());
  const int exit_code = (*server)->Stop();
  const std::vector<absl::StatusOr<v1::ForwardResponse>>& queued = callers.Join();
  for (const auto& response : queued) {
    EXPECT_EQ(response.status().code(), absl::StatusCode::kUnavailable) << response.status();
    EXPECT_TRUE(absl::StrContains(response.status().message(), "shutting down"))
        << response.status();
  }
  busy.Wait();  // cancelled or finished: either way answered
  EXPECT_EQ(exit_code, 0);
}

// Small calls made while a big stream runs wait for at most about one of its micro-batches: the
// stream's micro-batches queue like any other call.
TEST(QueueTest, ABigStreamDoesNotStarveSmallCalls) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = HeavyServer({"--max_batch_tokens=512"});
  ASSERT_TRUE(server.ok()) << server.status();
  const v1::ForwardRequest micro_batch = HeavyRequest(512);
  std::atomic<bool> streaming{true};
  int64_t slowest_micro_batch_us = 0;
  std::thread stream([&] {
    int sent = 0;
    const absl::Status status = Connect(**server)->ForwardStream(
        [&](v1::ForwardRequest* next) {
          if (sent == 24) return false;
          ++sent;
          *next = micro_batch;
          return true;
        },
        [&](int64_t, const v1::ForwardResponse& response) {
          slowest_micro_batch_us =
              std::max(slowest_micro_batch_us, response.timings().compute_us());
          return true;
        });
    EXPECT_TRUE(status.ok()) << status;
    streaming = false;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto client = Connect(**server);
  // Small calls, one after another, for as long as the stream runs: only those answered while it
  // still ran count.
  std::vector<int64_t> latencies_us;
  while (streaming) {
    const Clock::time_point start = Clock::now();
    const absl::StatusOr<v1::ForwardResponse> response = client->Forward(HeavyRequest(4));
    ASSERT_TRUE(response.ok()) << response.status();
    if (!streaming) break;
    latencies_us.push_back(
        std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count());
  }
  stream.join();
  ASSERT_GE(latencies_us.size(), 5u) << "the small calls waited for the whole stream";
  std::sort(latencies_us.begin(), latencies_us.end());
  // Each waits for the micro-batch running and the one queued ahead of it, at most.
  EXPECT_LT(latencies_us.back(), 3 * slowest_micro_batch_us + 200000)
      << "slowest micro-batch " << slowest_micro_batch_us << " us";
  EXPECT_EQ((*server)->Stop(), 0);
}

}  // namespace
}  // namespace lmhead

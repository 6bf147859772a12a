// Streams whose connection fails at first: gRPC 1.51 fails a call at once while its channel's
// last connection attempt has failed and connects again only about 1 s later, and it can report
// a connect() still under way as failed (docs/API.md "Retries"). A proxy in front of the real
// server cuts the first connections it accepts, before a byte: a streamed job waits for the
// connection that follows and gives what a direct job gives, with one stream or several, even
// without retries; a server that cannot be reached fails the job with UNAVAILABLE in bounded
// time, deadline or not.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/lmhead_client.h"
#include "gtest/gtest.h"
#include "tests/e2e/server_process.h"

namespace lmhead {
namespace {

// A socket bound to a free port of 127.0.0.1 (listening when `listen_too`); -1 on failure.
int BoundSocket(bool listen_too, int* port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&address), length) != 0 ||
      (listen_too && listen(fd, 64) != 0) ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  *port = ntohs(address.sin_port);
  return fd;
}

// A TCP proxy on 127.0.0.1 to the server at `target` ("127.0.0.1:PORT") that resets the first
// `cut` connections it accepts, before a byte, and relays the others both ways. Thread-safe.
class CuttingProxy {
 public:
  CuttingProxy(const std::string& target, int cut) : cut_(cut) {
    EXPECT_TRUE(absl::SimpleAtoi(target.substr(target.rfind(':') + 1), &target_port_)) << target;
    listener_ = BoundSocket(/*listen_too=*/true, &port_);
    EXPECT_GE(listener_, 0) << std::strerror(errno);
    acceptor_ = std::thread([this]() { Accept(); });
  }
  ~CuttingProxy() {
    shutdown(listener_, SHUT_RDWR);  // accept() returns
    acceptor_.join();
    close(listener_);
    absl::MutexLock lock(&mu_);
    for (const int fd : fds_) shutdown(fd, SHUT_RDWR);  // the relays' reads return
    for (std::thread& relay : relays_) relay.join();
    for (const int fd : fds_) close(fd);
  }

  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  int accepted() {
    absl::MutexLock lock(&mu_);
    return accepted_;
  }

 private:
  void Accept() {
    for (;;) {
      const int client = accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
      if (client < 0) return;
      absl::MutexLock lock(&mu_);
      if (++accepted_ <= cut_) {
        const linger reset{1, 0};  // close with RST
        setsockopt(client, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
        close(client);
        continue;
      }
      sockaddr_in address{};
      address.sin_family = AF_INET;
      address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      address.sin_port = htons(target_port_);
      const int server = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (server < 0 ||
          connect(server, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
        ADD_FAILURE() << "proxy: cannot connect to the server: " << std::strerror(errno);
        if (server >= 0) close(server);
        close(client);
        continue;
      }
      fds_.push_back(client);
      fds_.push_back(server);
      relays_.emplace_back(Pump, client, server);
      relays_.emplace_back(Pump, server, client);
    }
  }

  // Copies `from` to `to` until `from` ends, then ends `to`'s writing side.
  static void Pump(int from, int to) {
    char buffer[1 << 16];
    for (ssize_t n; (n = read(from, buffer, sizeof(buffer))) > 0;) {
      for (ssize_t done = 0, wrote; done < n; done += wrote) {
        wrote = send(to, buffer + done, n - done, MSG_NOSIGNAL);
        if (wrote <= 0) return;
      }
    }
    shutdown(to, SHUT_WR);
  }

  const int cut_;
  int target_port_ = 0;
  int port_ = 0;
  int listener_ = -1;
  std::thread acceptor_;
  absl::Mutex mu_;
  int accepted_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<int> fds_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> relays_ ABSL_GUARDED_BY(mu_);
};

constexpr int kRows = 8, kSeqLen = 4, kDModel = 64, kVocab = 1000;

v1::Tensor Hidden() {
  v1::Tensor hidden;
  hidden.set_dtype(v1::DATA_TYPE_FP32);
  for (const int dim : {kRows, kSeqLen, kDModel}) hidden.add_shape(dim);
  std::string* data = hidden.mutable_data();
  for (int i = 0; i < kRows * kSeqLen * kDModel; ++i) {
    const float value = static_cast<float>((i * 7919) % 23) / 11.0f - 1.0f;
    data->append(reinterpret_cast<const char*>(&value), 4);
  }
  return hidden;
}

ForwardArgs Args() {
  ForwardArgs args;
  v1::Tensor labels;
  labels.set_dtype(v1::DATA_TYPE_INT64);
  labels.add_shape(kRows);
  labels.add_shape(kSeqLen);
  for (int i = 0; i < kRows * kSeqLen; ++i) {
    const int64_t id = (i * 37) % kVocab;
    labels.mutable_data()->append(reinterpret_cast<const char*>(&id), 8);
  }
  args.labels = labels;
  args.loss_reduction = v1::LOSS_REDUCTION_SUM;
  return args;
}

constexpr int64_t kRowBytes = kSeqLen * kDModel * 4;  // one row per micro-batch

// What the job gives, without its timings.
std::string Outcome(const v1::ForwardResponse& response) {
  v1::ForwardResponse copy = response;
  copy.clear_timings();
  return copy.SerializeAsString();
}

TEST(ConnectionTest, StreamsWaitForAConnectionThatFailsAtFirst) {
  // One micro-batch per forward, so that the streams' answers do not depend on their timing.
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--max_batch_tokens=1"});
  ASSERT_TRUE(server.ok()) << server.status();
  ClientOptions options;
  options.timeout = std::chrono::seconds(60);
  absl::StatusOr<v1::ForwardResponse> direct =
      LMHeadClient::Connect((*server)->address(), options)
          ->ForwardMicroBatched(Hidden(), Args(), kRowBytes);
  ASSERT_TRUE(direct.ok()) << direct.status();
  const v1::ForwardRequest request = MakeForwardRequest(Hidden(), Args());
  absl::StatusOr<v1::ForwardResponse> one =
      LMHeadClient::Connect((*server)->address(), options)->Forward(request);
  ASSERT_TRUE(one.ok()) << one.status();

  for (const int streams : {1, 4}) {
    SCOPED_TRACE(absl::StrCat(streams, " streams"));
    // Every stream's connection fails twice: gRPC's first attempt and the one about 1 s later.
    CuttingProxy proxy((*server)->address(), /*cut=*/2 * streams);
    const absl::Time start = absl::Now();
    absl::StatusOr<v1::ForwardResponse> job =
        LMHeadClient::Connect(proxy.address(), options)
            ->ForwardMicroBatched(Hidden(), Args(), kRowBytes, /*progress=*/{}, streams);
    EXPECT_TRUE(job.ok()) << job.status();
    if (job.ok()) {
      EXPECT_EQ(Outcome(*job), Outcome(*direct));
    }
    EXPECT_GT(proxy.accepted(), 2 * streams);
    EXPECT_LT(absl::Now() - start, kConnectionWait);
  }

  // Not a retry: the same with max_attempts 1, through ForwardStream.
  CuttingProxy proxy((*server)->address(), /*cut=*/2);
  options.max_attempts = 1;
  std::unique_ptr<LMHeadClient> client = LMHeadClient::Connect(proxy.address(), options);
  int sent = 0;
  std::vector<v1::ForwardResponse> answers;
  const absl::Status status = client->ForwardStream(
      [&](v1::ForwardRequest* next) {
        if (sent++ == 2) return false;
        *next = request;
        return true;
      },
      [&](int64_t, const v1::ForwardResponse& response) {
        answers.push_back(response);
        return true;
      });
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_EQ(answers.size(), status.ok() ? 2u : 0u);
  for (const v1::ForwardResponse& answer : answers) EXPECT_EQ(Outcome(answer), Outcome(*one));
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST(ConnectionTest, AServerThatCannotBeReachedFailsTheJobInBoundedTime) {
  // Nothing listens on a bound port (connections refused); a proxy resets every connection.
  int closed_port = 0;
  const int bound = BoundSocket(/*listen_too=*/false, &closed_port);
  ASSERT_GE(bound, 0) << std::strerror(errno);
  CuttingProxy cutting("127.0.0.1:1", /*cut=*/INT_MAX);  // relays nothing

  for (const std::string& address : {absl::StrCat("127.0.0.1:", closed_port), cutting.address()}) {
    for (const std::chrono::milliseconds timeout :
         {std::chrono::milliseconds(0), std::chrono::milliseconds(2000)}) {
      SCOPED_TRACE(absl::StrCat(address, ", timeout ", timeout.count(), " ms"));
      ClientOptions options;
      options.timeout = timeout;
      const absl::Time start = absl::Now();
      absl::StatusOr<v1::ForwardResponse> job =
          LMHeadClient::Connect(address, options)
              ->ForwardMicroBatched(Hidden(), Args(), kRowBytes, /*progress=*/{}, /*streams=*/4);
      const absl::Duration took = absl::Now() - start;
      ASSERT_FALSE(job.ok());
      if (timeout.count() == 0) {
        // The wait for a connection, then the retries' backoff (at most 1.5 s in all).
        EXPECT_EQ(job.status().code(), absl::StatusCode::kUnavailable) << job.status();
        EXPECT_NE(job.status().message().find("failed to connect to all addresses"),
                  std::string::npos)
            << job.status();
        EXPECT_GE(took, kConnectionWait - absl::Milliseconds(100));
        EXPECT_LT(took, kConnectionWait + absl::Seconds(3));
      } else {
        EXPECT_TRUE(job.status().code() == absl::StatusCode::kUnavailable ||
                    job.status().code() == absl::StatusCode::kDeadlineExceeded)
            << job.status();
        EXPECT_LT(took, absl::Seconds(4));
      }
    }
  }
  close(bound);
}

}  // namespace
}  // namespace lmhead

// The real server on a GPU, run out of device memory (issue 11, "Soak and faults"): a request
// whose logits cannot fit on the device gets RESOURCE_EXHAUSTED, and the requests after it
// succeed with the right values.
//
// Starts $LMHEAD_SERVER (the lmhead_server binary) on $LMHEAD_TEST_DEVICE (default cuda:0) with
// the demo head at d_model=64, vocab_size=256000. The request that runs out: 300,000 tokens,
// `default` implementation, labels, return_logits=false, reduction sum: the fp32 logits alone
// would take 307 GB (the hidden states are 77 MB, under the request limit). Afterwards small
// requests of both implementations must equal the same head computed here on the CPU, and a
// request of 8192 tokens (8.4 GB of logits) must fit again. Run on the GPU machine by
// `tools/gpu/test.sh oom`; skipped when LMHEAD_SERVER is unset.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "client/lmhead_client.h"
#include "core/config.h"
#include "core/lm_head.h"
#include "proto/lmhead/v1/lmhead.pb.h"

namespace lmhead {
namespace {

constexpr int64_t kDModel = 64;
constexpr int64_t kVocab = 256000;
constexpr int64_t kOutOfMemoryTokens = 300000;  // 300000 x 256000 fp32 logits: 307 GB
constexpr int64_t kMediumTokens = 8192;         // 8.4 GB of logits: must fit after the failure

std::string ReadFile(const std::string& path) {
  std::ifstream file(path);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

// lmhead_server on port 0 in a child process; SIGTERM (then SIGKILL) when destroyed.
class Server {
 public:
  static absl::StatusOr<std::unique_ptr<Server>> Start(const std::string& binary,
                                                       const std::vector<std::string>& flags) {
    auto server = std::unique_ptr<Server>(new Server());
    const std::string stem = absl::StrCat("/tmp/lmhead_oom_test_", getpid());
    const std::string port_file = stem + ".port";
    server->log_path_ = stem + ".log";
    std::remove(port_file.c_str());
    std::vector<std::string> args = {binary, "--host=127.0.0.1", "--port=0",
                                     "--port_file=" + port_file};
    args.insert(args.end(), flags.begin(), flags.end());
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    server->pid_ = fork();
    if (server->pid_ < 0) return absl::InternalError("fork failed");
    if (server->pid_ == 0) {
      const int log = open(server->log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(log, STDOUT_FILENO);
      dup2(log, STDERR_FILENO);
      execv(argv[0], argv.data());
      _exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(3);
    while (std::chrono::steady_clock::now() < deadline) {
      int port = 0;
      if (absl::SimpleAtoi(ReadFile(port_file), &port) && port > 0) {
        server->address_ = absl::StrCat("127.0.0.1:", port);
        return server;
      }
      int status = 0;
      if (waitpid(server->pid_, &status, WNOHANG) == server->pid_) {
        server->pid_ = -1;
        return absl::InternalError(
            absl::StrCat("the server exited (status ", status, "):\n", server->Log()));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return absl::DeadlineExceededError(absl::StrCat("no port after 3 minutes:\n", server->Log()));
  }

  ~Server() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    for (int i = 0; i < 100; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }

  const std::string& address() const { return address_; }
  bool running() const { return pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }
  std::string Log() const { return ReadFile(log_path_); }

 private:
  Server() = default;
  pid_t pid_ = -1;
  std::string address_;
  std::string log_path_;
};

v1::Tensor ToWire(const at::Tensor& value) {
  const at::Tensor host = value.contiguous();
  v1::Tensor out;
  out.set_dtype(host.scalar_type() == at::kLong ? v1::DATA_TYPE_INT64 : v1::DATA_TYPE_FP32);
  for (int64_t size : host.sizes()) out.add_shape(size);
  out.set_data(std::string(static_cast<const char*>(host.data_ptr()), host.nbytes()));
  return out;
}

at::Tensor FromWire(const v1::Tensor& tensor) {  // FP32 outputs
  std::vector<int64_t> shape(tensor.shape().begin(), tensor.shape().end());
  at::Tensor out = at::empty(shape, at::kFloat);
  EXPECT_EQ(tensor.dtype(), v1::DATA_TYPE_FP32);
  EXPECT_EQ(static_cast<size_t>(out.nbytes()), tensor.data().size());
  std::memcpy(out.data_ptr(), tensor.data().data(),
              std::min<size_t>(out.nbytes(), tensor.data().size()));
  return out;
}

// The server's demo head (server/model_registry.cc Model::Demo), built here on the CPU.
std::unique_ptr<LMHead> DemoHead() {
  LMHeadConfig config;
  config.layer_norm = LayerNormConfig{LayerNormType::kRms};
  config.layer_norm->bias = false;
  config.bias = false;
  return *LMHead::Build(config, kDModel, kVocab, "cpu", /*seed=*/0);
}

struct Inputs {
  at::Tensor hidden;  // (batch, seq, d_model) fp32
  at::Tensor labels;  // (batch, seq) int64, some ignored
};

Inputs MakeInputs(int64_t batch, int64_t seq, uint64_t seed) {
  at::Generator generator = at::detail::createCPUGenerator(seed);
  Inputs in;
  in.hidden = at::randn({batch, seq, kDModel}, generator, at::kFloat);
  in.labels = at::randint(0, kVocab, {batch, seq}, generator, at::kLong);
  in.labels.index_put_({0, 0}, -100);  // one ignored label
  return in;
}

ForwardArgs Args(const Inputs& in, const std::string& implementation, bool logits,
                 v1::LossReduction reduction) {
  ForwardArgs args;
  args.labels = ToWire(in.labels);
  args.loss_reduction = reduction;
  args.z_loss_multiplier = 1e-3;
  args.return_logits = logits;
  args.loss_implementation = implementation == "default" ? v1::LOSS_IMPLEMENTATION_DEFAULT
                                                         : v1::LOSS_IMPLEMENTATION_FUSED_LINEAR;
  return args;
}

// Each output the server returned against the CPU head's, as
// tests/gpu/test_gpu_server_matches_cpu.py compares the CPU and GPU servers (rtol 1e-4, atol 1e-5).
void ExpectMatchesCpu(const v1::ForwardResponse& response, const LMOutput& want,
                      const std::string& what) {
  struct Field {
    const char* name;
    bool present;
    const v1::Tensor& got;
    const std::optional<at::Tensor>& expected;
  };
  const Field fields[] = {
      {"logits", response.has_logits(), response.logits(), want.logits},
      {"loss", response.has_loss(), response.loss(), want.loss},
      {"ce_loss", response.has_ce_loss(), response.ce_loss(), want.ce_loss},
      {"z_loss", response.has_z_loss(), response.z_loss(), want.z_loss},
  };
  for (const Field& field : fields) {
    ASSERT_EQ(field.present, field.expected.has_value()) << what << ": " << field.name;
    if (!field.present) continue;
    const at::Tensor g = FromWire(field.got);
    const at::Tensor e = field.expected->to(at::kFloat);
    ASSERT_EQ(g.sizes(), e.sizes()) << what << ": " << field.name;
    const double diff = g.numel() == 0 ? 0.0 : (g - e).abs().max().item<double>();
    EXPECT_TRUE(at::allclose(g, e, 1e-4, 1e-5))
        << what << ": " << field.name << " differs from the CPU head by up to " << diff;
    std::cout << "  " << what << ": " << field.name << " " << e.sizes()
              << " max |gpu - cpu| = " << diff << "\n";
  }
}

TEST(GpuServerOomTest, OutOfMemoryIsResourceExhaustedAndTheNextRequestsSucceed) {
  const char* binary = std::getenv("LMHEAD_SERVER");
  if (binary == nullptr) GTEST_SKIP() << "LMHEAD_SERVER (the lmhead_server binary) is not set";
  const char* device_env = std::getenv("LMHEAD_TEST_DEVICE");
  const std::string device = device_env != nullptr ? device_env : "cuda:0";

  absl::StatusOr<std::unique_ptr<Server>> server =
      Server::Start(binary, {"--device=" + device, absl::StrCat("--demo_d_model=", kDModel),
                             absl::StrCat("--demo_vocab_size=", kVocab)});
  ASSERT_TRUE(server.ok()) << server.status();
  ClientOptions options;
  options.timeout = std::chrono::minutes(2);
  std::unique_ptr<LMHeadClient> client = LMHeadClient::Connect((*server)->address(), options);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(3);
  while (true) {
    absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> health = client->Health();
    if (health.ok() && *health == grpc::health::v1::HealthCheckResponse::SERVING) break;
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "not serving:\n" << (*server)->Log();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }

  std::unique_ptr<LMHead> cpu_head = DemoHead();
  const auto cpu_forward = [&](const Inputs& in, bool logits, LossReduction reduction) {
    ForwardOptions o;
    o.labels = in.labels;
    o.loss_reduction = reduction;
    o.z_loss_multiplier = 1e-3;
    o.return_logits = logits;
    absl::StatusOr<LMOutput> out = cpu_head->Forward(in.hidden, o);
    EXPECT_TRUE(out.ok()) << out.status();
    return *out;
  };
  const Inputs small = MakeInputs(2, 7, 1);
  const LMOutput small_sum = cpu_forward(small, false, LossReduction::kSum);
  const LMOutput small_none = cpu_forward(small, true, LossReduction::kNone);

  absl::StatusOr<v1::ForwardResponse> before =
      client->Forward(ToWire(small.hidden), Args(small, "default", false, v1::LOSS_REDUCTION_SUM));
  ASSERT_TRUE(before.ok()) << before.status();
  ExpectMatchesCpu(*before, small_sum, "before, default, sum");

  const Inputs big = MakeInputs(1, kOutOfMemoryTokens, 2);
  for (int round = 1; round <= 2; ++round) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<v1::ForwardResponse> oom =
        client->Forward(ToWire(big.hidden), Args(big, "default", false, v1::LOSS_REDUCTION_SUM));
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ASSERT_FALSE(oom.ok()) << "a request for " << kOutOfMemoryTokens << " x " << kVocab
                           << " fp32 logits succeeded";
    EXPECT_EQ(oom.status().code(), absl::StatusCode::kResourceExhausted) << oom.status();
    std::cout << "round " << round << ": " << kOutOfMemoryTokens << " tokens x V=" << kVocab
              << " (default, sum, return_logits=false) -> "
              << absl::StatusCodeToString(oom.status().code()) << " in " << seconds << " s: \""
              << oom.status().message() << "\"\n";
    ASSERT_TRUE((*server)->running()) << (*server)->Log();

    absl::StatusOr<v1::ForwardResponse> after = client->Forward(
        ToWire(small.hidden), Args(small, "default", false, v1::LOSS_REDUCTION_SUM));
    ASSERT_TRUE(after.ok()) << after.status();
    ExpectMatchesCpu(*after, small_sum, "after, default, sum");
    std::cout << "  after, default, sum: the loss is "
              << (after->loss().data() == before->loss().data() ? "bit for bit" : "NOT bit for bit")
              << " the loss before the failure\n";

    absl::StatusOr<v1::ForwardResponse> logits = client->Forward(
        ToWire(small.hidden), Args(small, "default", true, v1::LOSS_REDUCTION_NONE));
    ASSERT_TRUE(logits.ok()) << logits.status();
    ExpectMatchesCpu(*logits, small_none, "after, default, none, logits");

    absl::StatusOr<v1::ForwardResponse> fused = client->Forward(
        ToWire(small.hidden), Args(small, "fused_linear", false, v1::LOSS_REDUCTION_SUM));
    ASSERT_TRUE(fused.ok()) << fused.status();
    ExpectMatchesCpu(*fused, small_sum, "after, fused_linear, sum");
  }

  // The memory the failed request could not get is usable again: 8.4 GB of logits.
  const Inputs medium = MakeInputs(1, kMediumTokens, 3);
  absl::StatusOr<v1::ForwardResponse> medium_default = client->Forward(
      ToWire(medium.hidden), Args(medium, "default", false, v1::LOSS_REDUCTION_SUM));
  ASSERT_TRUE(medium_default.ok()) << medium_default.status();
  absl::StatusOr<v1::ForwardResponse> medium_fused = client->Forward(
      ToWire(medium.hidden), Args(medium, "fused_linear", false, v1::LOSS_REDUCTION_SUM));
  ASSERT_TRUE(medium_fused.ok()) << medium_fused.status();
  const at::Tensor d = FromWire(medium_default->loss()), f = FromWire(medium_fused->loss());
  EXPECT_TRUE(at::allclose(d, f, 1e-4, 1e-5)) << d << " vs " << f;
  std::cout << "after: " << kMediumTokens << " tokens, default and fused_linear: loss "
            << d.item<float>() << " and " << f.item<float>() << "\n";

  absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> health = client->Health();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, grpc::health::v1::HealthCheckResponse::SERVING);
  if (HasFailure()) std::cout << "server log:\n" << (*server)->Log() << "\n";
}

}  // namespace
}  // namespace lmhead

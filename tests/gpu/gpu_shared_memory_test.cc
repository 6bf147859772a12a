// CUDA shared memory through the real server (issue 13, item 4): this process allocates device
// memory, registers it over a SharedMemory session by its CUDA IPC handle (register_cuda), and
// sends forwards whose hidden states and labels are in it and whose logits are written into it.
// The results must equal, bit for bit, the same call with its bytes inline, on a GPU executor and
// on a CPU one (which copies the hidden states to the host); bad registrations get their exact
// codes; the region is gone once the session ends, and the server keeps serving. POSIX regions
// registered with a GPU server are page-locked (--pin_shared_memory) and must give the same.
//
// Starts $LMHEAD_SERVER (the lmhead_server binary, built with CUDA) with --allow_shared_memory.
// Run on the GPU machine by `tools/gpu/test.sh shm`; skipped when LMHEAD_SERVER is unset.
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <grpcpp/create_channel.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "proto/lmhead/v1/lmhead.grpc.pb.h"

namespace lmhead {
namespace {

constexpr int64_t kDModel = 64;
constexpr int64_t kVocab = 1000;
constexpr int64_t kBatch = 2;
constexpr int64_t kLength = 8;
constexpr size_t kBufferBytes = size_t{4} << 20;
constexpr uint64_t kLabelsOffset = 1 << 20;
constexpr uint64_t kLogitsOffset = 2 << 20;

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
    static int counter = 0;
    auto server = std::unique_ptr<Server>(new Server());
    const std::string stem = absl::StrCat("/tmp/lmhead_shm_test_", getpid(), "_", counter++);
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

v1::Tensor Tensor(v1::DataType dtype, std::vector<int64_t> shape, std::string data) {
  v1::Tensor tensor;
  tensor.set_dtype(dtype);
  for (const int64_t dim : shape) tensor.add_shape(dim);
  tensor.set_data(std::move(data));
  return tensor;
}

// `actual` and `expected`, FP32 tensors of the same shape, within a few fp32 roundings.
void ExpectSameFloats(const v1::Tensor& actual, const v1::Tensor& expected) {
  ASSERT_EQ(actual.dtype(), v1::DATA_TYPE_FP32);
  ASSERT_EQ(actual.data().size(), expected.data().size());
  for (size_t i = 0; i < actual.data().size() / sizeof(float); ++i) {
    float a = 0, e = 0;
    std::memcpy(&a, actual.data().data() + i * sizeof(float), sizeof(float));
    std::memcpy(&e, expected.data().data() + i * sizeof(float), sizeof(float));
    EXPECT_NEAR(a, e, 1e-5f * std::max(1.0f, std::abs(e))) << "element " << i;
  }
}

v1::SharedMemoryRef Ref(const std::string& region, uint64_t offset, uint64_t byte_size) {
  v1::SharedMemoryRef ref;
  ref.set_region(region);
  ref.set_offset(offset);
  ref.set_byte_size(byte_size);
  return ref;
}

// The inline request: seeded fp32 hidden states and int64 labels (one ignored).
v1::ForwardRequest InlineRequest() {
  std::mt19937 engine(7);
  std::normal_distribution<float> normal;
  std::vector<float> x(kBatch * kLength * kDModel);
  for (float& value : x) value = normal(engine);
  std::vector<int64_t> labels(kBatch * kLength);
  for (int64_t& label : labels) label = static_cast<int64_t>(engine() % kVocab);
  labels[0] = -100;
  v1::ForwardRequest request;
  *request.mutable_hidden_states() =
      Tensor(v1::DATA_TYPE_FP32, {kBatch, kLength, kDModel},
             std::string(reinterpret_cast<const char*>(x.data()), x.size() * 4));
  *request.mutable_labels() =
      Tensor(v1::DATA_TYPE_INT64, {kBatch, kLength},
             std::string(reinterpret_cast<const char*>(labels.data()), labels.size() * 8));
  request.mutable_options()->set_z_loss_multiplier(1e-3);
  return request;
}

class Session {
 public:
  explicit Session(v1::LMHeadService::Stub* stub) {
    context_.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(5));
    stream_ = stub->SharedMemory(&context_);
  }
  ~Session() {
    if (!finished_) {
      context_.TryCancel();
      stream_->Finish();
    }
  }
  v1::SharedMemoryResponse RegisterCuda(const std::string& handle, int device, uint64_t size) {
    v1::SharedMemoryRequest request;
    v1::RegisterCudaSharedMemory* cuda = request.mutable_register_cuda();
    cuda->set_raw_handle(handle);
    cuda->set_device_id(device);
    cuda->set_byte_size(size);
    v1::SharedMemoryResponse response;
    EXPECT_TRUE(stream_->Write(request));
    EXPECT_TRUE(stream_->Read(&response));
    return response;
  }
  v1::SharedMemoryResponse RegisterSystem(const std::string& key, uint64_t size) {
    v1::SharedMemoryRequest request;
    v1::RegisterSystemSharedMemory* system = request.mutable_register_system();
    system->set_key(key);
    system->set_byte_size(size);
    v1::SharedMemoryResponse response;
    EXPECT_TRUE(stream_->Write(request));
    EXPECT_TRUE(stream_->Read(&response));
    return response;
  }
  grpc::Status Close() {
    finished_ = true;
    stream_->WritesDone();
    return stream_->Finish();
  }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::SharedMemoryRequest, v1::SharedMemoryResponse>>
      stream_;
  bool finished_ = false;
};

grpc::Status Forward(v1::LMHeadService::Stub* stub, const v1::ForwardRequest& request,
                     v1::ForwardResponse* response) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(2));
  return stub->Forward(&context, request, response);
}

class GpuSharedMemoryTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuSharedMemoryTest, CudaRegionsGiveWhatInlineBytesGive) {
  const char* binary = std::getenv("LMHEAD_SERVER");
  if (binary == nullptr) GTEST_SKIP() << "LMHEAD_SERVER is not set";
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) GTEST_SKIP() << "no GPU";
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(
      binary, {"--allow_shared_memory", "--max_batch_tokens=1", "--device=" + GetParam()});
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateChannel((*server)->address(), grpc::InsecureChannelCredentials());
  auto stub = v1::LMHeadService::NewStub(channel);

  const v1::ForwardRequest inline_request = InlineRequest();
  v1::ForwardResponse expected;
  grpc::Status status = Forward(stub.get(), inline_request, &expected);
  ASSERT_TRUE(status.ok()) << status.error_message();

  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  void* buffer = nullptr;
  ASSERT_EQ(cudaMalloc(&buffer, kBufferBytes), cudaSuccess);
  ASSERT_EQ(cudaMemset(buffer, 0, kBufferBytes), cudaSuccess);
  char* bytes = static_cast<char*>(buffer);
  const std::string& x = inline_request.hidden_states().data();
  const std::string& labels = inline_request.labels().data();
  ASSERT_EQ(cudaMemcpy(bytes, x.data(), x.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(bytes + kLabelsOffset, labels.data(), labels.size(), cudaMemcpyHostToDevice),
            cudaSuccess);
  cudaIpcMemHandle_t handle;
  ASSERT_EQ(cudaIpcGetMemHandle(&handle, buffer), cudaSuccess);
  const std::string raw(reinterpret_cast<const char*>(&handle), sizeof(handle));

  {
    Session session(stub.get());
    // Bad registrations first: each refused alone.
    v1::SharedMemoryResponse answer = session.RegisterCuda(raw, 0, kBufferBytes * 64);
    EXPECT_EQ(answer.code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
    EXPECT_EQ(answer.message().rfind("register_cuda.byte_size: the allocation holds", 0), 0u)
        << answer.message();
    answer = session.RegisterCuda(raw.substr(0, 10), 0, 16);
    EXPECT_EQ(answer.code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
    EXPECT_EQ(answer.message().rfind("register_cuda.raw_handle: expected the 64 bytes", 0), 0u)
        << answer.message();
    answer = session.RegisterCuda(raw, 99, 16);
    EXPECT_EQ(answer.code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
    EXPECT_EQ(answer.message().rfind("register_cuda.device_id: ", 0), 0u) << answer.message();
    answer = session.RegisterCuda(std::string(64, '\x5a'), 0, 16);
    EXPECT_EQ(answer.code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
    EXPECT_EQ(answer.message().rfind("register_cuda.raw_handle: ", 0), 0u) << answer.message();

    answer = session.RegisterCuda(raw, 0, kBufferBytes);
    ASSERT_EQ(answer.code(), 0) << answer.message();
    const std::string region = answer.region();

    v1::ForwardRequest request = inline_request;
    v1::Tensor* hidden = request.mutable_hidden_states();
    *hidden->mutable_shared_memory() = Ref(region, 0, x.size());
    hidden->clear_data();
    v1::Tensor* wire_labels = request.mutable_labels();
    *wire_labels->mutable_shared_memory() = Ref(region, kLabelsOffset, labels.size());
    wire_labels->clear_data();
    const std::string& want_logits = expected.logits().data();
    *request.mutable_outputs()->mutable_logits() = Ref(region, kLogitsOffset, want_logits.size());
    v1::ForwardResponse response;
    status = Forward(stub.get(), request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    // The losses are sums over the tokens: on a CPU executor their rounding depends on where the
    // hidden states lie in memory (a vectorised reduction's split), so they agree to fp32
    // rounding there (bit for bit on a GPU, the logits everywhere).
    ExpectSameFloats(response.loss(), expected.loss());
    ExpectSameFloats(response.z_loss(), expected.z_loss());
    EXPECT_EQ(response.num_scored_tokens(), expected.num_scored_tokens());
    EXPECT_TRUE(response.logits().data().empty());
    EXPECT_EQ(response.logits().shared_memory().offset(), kLogitsOffset);
    std::string logits(want_logits.size(), '\0');
    ASSERT_EQ(
        cudaMemcpy(logits.data(), bytes + kLogitsOffset, logits.size(), cudaMemcpyDeviceToHost),
        cudaSuccess);
    EXPECT_TRUE(logits == want_logits) << "logits written to the CUDA region differ";

    // Past the end of the region.
    *request.mutable_outputs()->mutable_logits() =
        Ref(region, kBufferBytes - 4, want_logits.size());
    status = Forward(stub.get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_TRUE(session.Close().ok());

    // Gone with its session.
    request.clear_outputs();
    status = Forward(stub.get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << status.error_message();
  }
  status = Forward(stub.get(), inline_request, &expected);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE((*server)->running()) << (*server)->Log();
  EXPECT_EQ(cudaFree(buffer), cudaSuccess);
}

// A POSIX region on a GPU server is page-locked at registration (--pin_shared_memory, on by
// default) and read by DMA: the results equal the inline call's, with pinning on and off, and the
// server's log warns of no region it could not pin.
TEST_P(GpuSharedMemoryTest, PinnedSystemRegionsGiveWhatInlineBytesGive) {
  const char* binary = std::getenv("LMHEAD_SERVER");
  if (binary == nullptr) GTEST_SKIP() << "LMHEAD_SERVER is not set";
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) GTEST_SKIP() << "no GPU";
  for (const bool pin : {true, false}) {
    SCOPED_TRACE(pin ? "pinned" : "not pinned");
    absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(
        binary, {"--allow_shared_memory", "--max_batch_tokens=1", "--device=" + GetParam(),
                 absl::StrCat("--pin_shared_memory=", pin ? "true" : "false")});
    ASSERT_TRUE(server.ok()) << server.status();
    auto channel = grpc::CreateChannel((*server)->address(), grpc::InsecureChannelCredentials());
    auto stub = v1::LMHeadService::NewStub(channel);
    const v1::ForwardRequest inline_request = InlineRequest();
    v1::ForwardResponse expected;
    grpc::Status status = Forward(stub.get(), inline_request, &expected);
    ASSERT_TRUE(status.ok()) << status.error_message();

    const std::string key = absl::StrCat("/lmhead-gpu-test-", getpid(), pin ? "-pinned" : "");
    const int fd = shm_open(key.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    ASSERT_GE(fd, 0) << key;
    ASSERT_EQ(ftruncate(fd, kBufferBytes), 0);
    void* mapping = mmap(nullptr, kBufferBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    ASSERT_NE(mapping, MAP_FAILED);
    char* bytes = static_cast<char*>(mapping);
    const std::string& x = inline_request.hidden_states().data();
    const std::string& labels = inline_request.labels().data();
    std::memcpy(bytes, x.data(), x.size());
    std::memcpy(bytes + kLabelsOffset, labels.data(), labels.size());
    {
      Session session(stub.get());
      const v1::SharedMemoryResponse answer = session.RegisterSystem(key, kBufferBytes);
      shm_unlink(key.c_str());
      ASSERT_EQ(answer.code(), 0) << answer.message();
      v1::ForwardRequest request = inline_request;
      v1::Tensor* hidden = request.mutable_hidden_states();
      *hidden->mutable_shared_memory() = Ref(answer.region(), 0, x.size());
      hidden->clear_data();
      v1::Tensor* wire_labels = request.mutable_labels();
      *wire_labels->mutable_shared_memory() = Ref(answer.region(), kLabelsOffset, labels.size());
      wire_labels->clear_data();
      const std::string& want_logits = expected.logits().data();
      *request.mutable_outputs()->mutable_logits() =
          Ref(answer.region(), kLogitsOffset, want_logits.size());
      for (int repeat = 0; repeat < 3; ++repeat) {
        v1::ForwardResponse response;
        status = Forward(stub.get(), request, &response);
        ASSERT_TRUE(status.ok()) << status.error_message();
        ExpectSameFloats(response.loss(), expected.loss());
        ExpectSameFloats(response.z_loss(), expected.z_loss());
        EXPECT_EQ(response.num_scored_tokens(), expected.num_scored_tokens());
        EXPECT_TRUE(std::memcmp(bytes + kLogitsOffset, want_logits.data(), want_logits.size()) == 0)
            << "logits written to the POSIX region differ";
      }
      EXPECT_TRUE(session.Close().ok());
    }
    munmap(mapping, kBufferBytes);
    EXPECT_TRUE((*server)->running()) << (*server)->Log();
    EXPECT_EQ((*server)->Log().find("could not be pinned"), std::string::npos) << (*server)->Log();
  }
}

INSTANTIATE_TEST_SUITE_P(Executors, GpuSharedMemoryTest, ::testing::Values("cuda:0", "cpu"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param == "cpu" ? std::string("cpu") : std::string("cuda0");
                         });

}  // namespace
}  // namespace lmhead

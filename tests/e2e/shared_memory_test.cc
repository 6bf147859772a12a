// End-to-end tests of same-host shared memory (docs/API.md "Shared memory"): the real server on
// port 0, POSIX shared-memory objects of the test's own, and the generated stub for the
// SharedMemory session and for forwards (on the session's channel: a region is found only on the
// connection whose session registered it). Results through regions must equal, bit for bit, the
// same call with its bytes inline; every bad request gets its exact code and a message naming the
// field, and the server keeps serving.
#include <fcntl.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/lmhead/v1/lmhead.grpc.pb.h"
#include "tests/e2e/server_process.h"

namespace lmhead {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr int64_t kDModel = 64;
constexpr int64_t kVocab = 1000;
constexpr char kOff[] = "shared memory is off on this server (--allow_shared_memory)";

// ---- Shared memory and wire helpers.

// A POSIX shared-memory object of the test's, mapped here, unlinked when destroyed.
class ShmObject {
 public:
  explicit ShmObject(size_t size) : size_(size) {
    static std::atomic<int> counter{0};
    key_ = absl::StrCat("/lmhead_e2e_", getpid(), "_", counter++);
    fd_ = shm_open(key_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd_, 0) << key_;
    EXPECT_EQ(ftruncate(fd_, static_cast<off_t>(size)), 0);
    bytes_ = static_cast<char*>(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0));
    EXPECT_NE(bytes_, MAP_FAILED);
  }
  ~ShmObject() {
    munmap(bytes_, size_);
    close(fd_);
    shm_unlink(key_.c_str());
  }
  const std::string& key() const { return key_; }
  uint64_t size() const { return size_; }
  char* bytes() { return bytes_; }
  void Write(uint64_t offset, const std::string& data) {
    std::memcpy(bytes_ + offset, data.data(), data.size());
  }
  std::string Read(uint64_t offset, uint64_t size) const {
    return std::string(bytes_ + offset, size);
  }
  void Truncate(off_t size) { ASSERT_EQ(ftruncate(fd_, size), 0); }

 private:
  std::string key_;
  size_t size_;
  int fd_ = -1;
  char* bytes_ = nullptr;
};

v1::Tensor Tensor(v1::DataType dtype, std::vector<int64_t> shape, std::string data) {
  v1::Tensor tensor;
  tensor.set_dtype(dtype);
  for (const int64_t dim : shape) tensor.add_shape(dim);
  tensor.set_data(std::move(data));
  return tensor;
}

// Seeded hidden states as fp32 or bf16 (the upper half of each fp32) bytes.
std::string HiddenBytes(int64_t count, bool bf16, uint32_t seed = 1) {
  std::mt19937 engine(seed);
  std::normal_distribution<float> normal;
  std::string out;
  for (int64_t i = 0; i < count; ++i) {
    const float value = normal(engine);
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    if (bf16) {
      const uint16_t half = static_cast<uint16_t>(bits >> 16);
      out.append(reinterpret_cast<const char*>(&half), 2);
    } else {
      out.append(reinterpret_cast<const char*>(&bits), 4);
    }
  }
  return out;
}

// Seeded labels in [0, kVocab) as int64 or int32 bytes; the first is ignored (-100).
std::string LabelBytes(int64_t count, bool int32, uint32_t seed = 2) {
  std::mt19937 engine(seed);
  std::string out;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t label = i == 0 ? -100 : static_cast<int64_t>(engine() % kVocab);
    if (int32) {
      const int32_t narrow = static_cast<int32_t>(label);
      out.append(reinterpret_cast<const char*>(&narrow), 4);
    } else {
      out.append(reinterpret_cast<const char*>(&label), 8);
    }
  }
  return out;
}

// Moves `tensor`'s data into `object` at `offset` and points the tensor there.
void ToRegion(v1::Tensor* tensor, ShmObject& object, const std::string& region, uint64_t offset) {
  object.Write(offset, tensor->data());
  v1::SharedMemoryRef* ref = tensor->mutable_shared_memory();
  ref->set_region(region);
  ref->set_offset(offset);
  ref->set_byte_size(tensor->data().size());
  tensor->clear_data();
}

v1::SharedMemoryRef Ref(const std::string& region, uint64_t offset, uint64_t byte_size) {
  v1::SharedMemoryRef ref;
  ref.set_region(region);
  ref.set_offset(offset);
  ref.set_byte_size(byte_size);
  return ref;
}

// ---- Clients.

// A channel with a connection of its own (gRPC otherwise shares one among channels with equal
// arguments): what another client process would have.
struct Client {
  explicit Client(const ServerProcess& server) {
    grpc::ChannelArguments arguments;
    arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    channel =
        grpc::CreateCustomChannel(server.address(), grpc::InsecureChannelCredentials(), arguments);
    stub = v1::LMHeadService::NewStub(channel);
  }

  grpc::Status Forward(const v1::ForwardRequest& request, v1::ForwardResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return stub->Forward(&context, request, response);
  }

  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::LMHeadService::Stub> stub;
};

// A SharedMemory session on a client's channel.
class Session {
 public:
  explicit Session(Client& client, std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
    context_.set_deadline(std::chrono::system_clock::now() + timeout);
    stream_ = client.stub->SharedMemory(&context_);
  }
  ~Session() {
    if (!finished_) Cancel();
  }

  v1::SharedMemoryResponse Send(const v1::SharedMemoryRequest& request) {
    v1::SharedMemoryResponse response;
    EXPECT_TRUE(stream_->Write(request));
    EXPECT_TRUE(stream_->Read(&response));
    return response;
  }
  v1::SharedMemoryResponse Register(const std::string& key, uint64_t offset, uint64_t byte_size) {
    v1::SharedMemoryRequest request;
    v1::RegisterSystemSharedMemory* system = request.mutable_register_system();
    system->set_key(key);
    system->set_offset(offset);
    system->set_byte_size(byte_size);
    return Send(request);
  }
  // Registers all of `object`; its region id.
  std::string RegisterAll(const ShmObject& object) {
    const v1::SharedMemoryResponse response = Register(object.key(), 0, object.size());
    EXPECT_EQ(response.code(), 0) << response.message();
    EXPECT_EQ(response.region().size(), 32u);
    return response.region();
  }
  v1::SharedMemoryResponse Unregister(const std::string& id) {
    v1::SharedMemoryRequest request;
    request.set_unregister(id);
    return Send(request);
  }
  // Half-closes and waits for the server to end the call.
  grpc::Status Close() {
    finished_ = true;
    stream_->WritesDone();
    return stream_->Finish();
  }
  grpc::Status Cancel() {
    finished_ = true;
    context_.TryCancel();
    return stream_->Finish();
  }
  // The status of a call that has ended on its own (its deadline).
  grpc::Status Finish() {
    finished_ = true;
    return stream_->Finish();
  }
  // The status of a session the server refused at once.
  grpc::Status Refusal() {
    v1::SharedMemoryResponse response;
    EXPECT_FALSE(stream_->Read(&response));
    finished_ = true;
    return stream_->Finish();
  }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::SharedMemoryRequest, v1::SharedMemoryResponse>>
      stream_;
  bool finished_ = false;
};

// A small inline forward with labels: the server still answers correctly.
void ExpectStillServing(const ServerProcess& server) {
  Client client(server);
  v1::ForwardRequest request;
  *request.mutable_hidden_states() =
      Tensor(v1::DATA_TYPE_FP32, {1, 3, kDModel}, HiddenBytes(3 * kDModel, false));
  *request.mutable_labels() = Tensor(v1::DATA_TYPE_INT64, {1, 3}, LabelBytes(3, false));
  v1::ForwardResponse response;
  const grpc::Status status = client.Forward(request, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.loss().data().size(), 4u);
}

// Polls `check` until it holds (up to 10 s): the server ends a cancelled session on its own time.
bool Eventually(const std::function<bool()>& check) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    if (check()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return check();
}

// A forward whose hidden states are the region's first `bytes` bytes, as fp32 (1, n, 64).
v1::ForwardRequest HiddenInRegion(const std::string& region, uint64_t offset = 0,
                                  int64_t length = 2) {
  v1::ForwardRequest request;
  v1::Tensor* x = request.mutable_hidden_states();
  x->set_dtype(v1::DATA_TYPE_FP32);
  for (const int64_t dim : {int64_t{1}, length, kDModel}) x->add_shape(dim);
  *x->mutable_shared_memory() = Ref(region, offset, length * kDModel * 4);
  return request;
}

class SharedMemoryTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(
        {"--allow_shared_memory", "--max_shared_memory_regions=4", "--max_batch_tokens=1"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(server_->Stop(), 0) << server_->Log();
    delete server_;
  }
  void TearDown() override { ExpectStillServing(*server_); }

  static ServerProcess* server_;
};

ServerProcess* SharedMemoryTest::server_ = nullptr;

TEST(SharedMemoryOffTest, OffByDefaultForTheSessionAndForRequests) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start({});
  ASSERT_TRUE(server.ok()) << server.status();
  Client client(**server);
  const grpc::Status refused = Session(client).Refusal();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(refused.error_message(), kOff);

  v1::ForwardResponse response;
  grpc::Status status = client.Forward(HiddenInRegion(std::string(32, 'a')), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(status.error_message(), absl::StrCat("hidden_states.shared_memory: ", kOff));

  v1::ForwardRequest outputs_only;
  *outputs_only.mutable_hidden_states() =
      Tensor(v1::DATA_TYPE_FP32, {1, 2, kDModel}, HiddenBytes(2 * kDModel, false));
  *outputs_only.mutable_outputs()->mutable_logits() = Ref("x", 0, 8000);
  status = client.Forward(outputs_only, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(status.error_message(), absl::StrCat("outputs.logits: ", kOff));
  ExpectStillServing(**server);
  EXPECT_EQ((*server)->Stop(), 0);
}

// One call both ways: inline, and with its inputs in a region and `outputs` written to it.
struct Case {
  std::string name;
  bool bf16 = false;
  bool int32_labels = false;
  uint64_t x_offset = 0;  // unaligned offsets make the server copy
  std::vector<std::string> outputs = {"logits", "loss"};
  bool positions_and_divisor = false;  // logits_to_keep positions and a divisor tensor, in regions
};

TEST_F(SharedMemoryTest, ResultsEqualTheSameBytesSentInline) {
  constexpr int64_t kBatch = 2;
  constexpr int64_t kLength = 5;
  const std::vector<Case> cases = {
      {"fp32, int64 labels"},
      {"bf16, int32 labels", true, true},
      {"fp32 at an odd offset", false, false, 3},
      {"bf16 at an odd offset, every loss and argmax out",
       true,
       false,
       1,
       {"loss", "ce_loss", "z_loss", "argmax", "logits"}},
      {"positions and divisor in regions", false, true, 0, {"ce_loss", "z_loss", "argmax"}, true},
  };
  ShmObject object(1 << 20);
  Client client(*server_);
  Session session(client);
  const std::string region = session.RegisterAll(object);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::ForwardRequest inline_request;
    *inline_request.mutable_hidden_states() =
        Tensor(c.bf16 ? v1::DATA_TYPE_BF16 : v1::DATA_TYPE_FP32, {kBatch, kLength, kDModel},
               HiddenBytes(kBatch * kLength * kDModel, c.bf16));
    *inline_request.mutable_labels() =
        Tensor(c.int32_labels ? v1::DATA_TYPE_INT32 : v1::DATA_TYPE_INT64, {kBatch, kLength},
               LabelBytes(kBatch * kLength, c.int32_labels));
    v1::ForwardOptions* options = inline_request.mutable_options();
    options->set_z_loss_multiplier(1e-3);
    if (std::find(c.outputs.begin(), c.outputs.end(), "argmax") != c.outputs.end()) {
      options->set_return_argmax(true);
    }
    if (c.positions_and_divisor) {
      const int64_t positions[] = {4, 0, 2, 1, 1, 3};
      *options->mutable_logits_to_keep_positions() =
          Tensor(v1::DATA_TYPE_INT64, {kBatch, 3},
                 std::string(reinterpret_cast<const char*>(positions), sizeof(positions)));
      const float divisor = 3.0f;
      *options->mutable_loss_div_factor_tensor() =
          Tensor(v1::DATA_TYPE_FP32, {}, std::string(reinterpret_cast<const char*>(&divisor), 4));
      options->set_loss_reduction(v1::LOSS_REDUCTION_SUM);
    }
    v1::ForwardResponse expected;
    grpc::Status status = client.Forward(inline_request, &expected);
    ASSERT_TRUE(status.ok()) << status.error_message();

    // The same request through the region: inputs from 0 on, outputs from 256 KiB on.
    std::memset(object.bytes(), 0, object.size());
    v1::ForwardRequest request = inline_request;
    ToRegion(request.mutable_hidden_states(), object, region, c.x_offset);
    ToRegion(request.mutable_labels(), object, region, 64 << 10);
    if (c.positions_and_divisor) {
      ToRegion(request.mutable_options()->mutable_logits_to_keep_positions(), object, region,
               (64 << 10) + 1024);
      ToRegion(request.mutable_options()->mutable_loss_div_factor_tensor(), object, region,
               (64 << 10) + 2048);
    }
    const auto expected_tensor = [&](const std::string& name) -> const v1::Tensor& {
      if (name == "logits") return expected.logits();
      if (name == "loss") return expected.loss();
      if (name == "ce_loss") return expected.ce_loss();
      if (name == "z_loss") return expected.z_loss();
      return expected.argmax();
    };
    uint64_t offset = 256 << 10;
    std::map<std::string, uint64_t> offsets;
    for (const std::string& name : c.outputs) {
      const uint64_t bytes = expected_tensor(name).data().size();
      ASSERT_GT(bytes, 0u) << name;
      const v1::SharedMemoryRef ref = Ref(region, offset, bytes);
      v1::OutputRegions* outputs = request.mutable_outputs();
      if (name == "logits") *outputs->mutable_logits() = ref;
      if (name == "loss") *outputs->mutable_loss() = ref;
      if (name == "ce_loss") *outputs->mutable_ce_loss() = ref;
      if (name == "z_loss") *outputs->mutable_z_loss() = ref;
      if (name == "argmax") *outputs->mutable_argmax() = ref;
      offsets[name] = offset;
      offset += bytes + 8;
    }
    v1::ForwardResponse response;
    status = client.Forward(request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.num_scored_tokens(), expected.num_scored_tokens());
    for (const std::string name : {"logits", "loss", "ce_loss", "z_loss", "argmax"}) {
      SCOPED_TRACE(name);
      const v1::Tensor& want = expected_tensor(name);
      const v1::Tensor& got = name == "logits"    ? response.logits()
                              : name == "loss"    ? response.loss()
                              : name == "ce_loss" ? response.ce_loss()
                              : name == "z_loss"  ? response.z_loss()
                                                  : response.argmax();
      EXPECT_EQ(got.dtype(), want.dtype());
      EXPECT_EQ(got.shape_size(), want.shape_size());
      for (int i = 0; i < std::min(got.shape_size(), want.shape_size()); ++i) {
        EXPECT_EQ(got.shape(i), want.shape(i));
      }
      const auto out = offsets.find(name);
      if (out == offsets.end()) {
        EXPECT_FALSE(got.has_shared_memory());
        EXPECT_EQ(got.data(), want.data());  // bit for bit
        continue;
      }
      EXPECT_TRUE(got.data().empty());
      EXPECT_EQ(got.shared_memory().region(), region);
      EXPECT_EQ(got.shared_memory().offset(), out->second);
      EXPECT_EQ(got.shared_memory().byte_size(), want.data().size());
      EXPECT_EQ(object.Read(out->second, want.data().size()), want.data());  // bit for bit
    }
  }
  EXPECT_TRUE(session.Close().ok());
}

TEST_F(SharedMemoryTest, StreamMicroBatchesReadAndWriteRegionsToo) {
  ShmObject object(1 << 20);
  Client client(*server_);
  Session session(client);
  const std::string region = session.RegisterAll(object);
  grpc::ClientContext context;
  auto stream = client.stub->ForwardStream(&context);
  std::vector<v1::ForwardRequest> inline_requests;
  for (int i = 0; i < 2; ++i) {
    v1::ForwardRequest request;
    *request.mutable_hidden_states() =
        Tensor(v1::DATA_TYPE_FP32, {1, 4, kDModel}, HiddenBytes(4 * kDModel, false, 10 + i));
    inline_requests.push_back(request);
    const uint64_t base = static_cast<uint64_t>(i) << 18;
    ToRegion(request.mutable_hidden_states(), object, region, base);
    *request.mutable_outputs()->mutable_logits() = Ref(region, base + 4096, 4 * kVocab * 4);
    ASSERT_TRUE(stream->Write(request));
  }
  stream->WritesDone();
  for (int i = 0; i < 2; ++i) {
    v1::ForwardResponse response;
    ASSERT_TRUE(stream->Read(&response));
    EXPECT_EQ(response.logits().shared_memory().offset(), (static_cast<uint64_t>(i) << 18) + 4096);
    v1::ForwardResponse expected;
    ASSERT_TRUE(client.Forward(inline_requests[i], &expected).ok());
    EXPECT_EQ(object.Read((static_cast<uint64_t>(i) << 18) + 4096, 4 * kVocab * 4),
              expected.logits().data());
  }
  const grpc::Status status = stream->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(SharedMemoryTest, BadReferencesAndRegistrationsGetExactCodesAndMessages) {
  ShmObject object(4096);
  Client client(*server_);
  Session session(client);
  const std::string region = session.RegisterAll(object);
  const std::string quoted = absl::StrCat("'", region, "'");
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();

  struct Bad {
    std::string name;
    std::function<void(v1::ForwardRequest&)> edit;
    grpc::StatusCode code;
    std::string message;  // the start of the expected message
  };
  const std::vector<Bad> bad_requests = {
      {"offset past the end",
       [&](v1::ForwardRequest& r) {
         r.mutable_hidden_states()->mutable_shared_memory()->set_offset(4097);
       },
       grpc::StatusCode::INVALID_ARGUMENT,
       absl::StrCat("hidden_states.shared_memory.offset: 4097 is past the end of region ", quoted,
                    " (4096 bytes)")},
      {"offset + byte_size past the end",
       [&](v1::ForwardRequest& r) {
         r.mutable_hidden_states()->mutable_shared_memory()->set_offset(4096 - 511);
       },
       grpc::StatusCode::INVALID_ARGUMENT,
       absl::StrCat("hidden_states.shared_memory.byte_size: offset 3585 + byte_size 512 is past "
                    "the end of region ",
                    quoted, " (4096 bytes)")},
      {"offset + byte_size overflowing uint64",
       [&](v1::ForwardRequest& r) {
         r.mutable_hidden_states()->mutable_shared_memory()->set_offset(kMax - 100);
       },
       grpc::StatusCode::INVALID_ARGUMENT,
       absl::StrCat("hidden_states.shared_memory.offset: 18446744073709551515 is past the end of "
                    "region ",
                    quoted)},
      {"byte_size not numel x element size",
       [&](v1::ForwardRequest& r) {
         r.mutable_hidden_states()->mutable_shared_memory()->set_byte_size(511);
       },
       grpc::StatusCode::INVALID_ARGUMENT,
       "hidden_states.shared_memory.byte_size: expected 512 bytes (128 elements of FP32 for shape "
       "[1, 2, 64]), got 511"},
      {"byte_size of 2^64 - 1",
       [&](v1::ForwardRequest& r) {
         r.mutable_hidden_states()->mutable_shared_memory()->set_byte_size(kMax);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "hidden_states.shared_memory.byte_size: expected 512"},
      {"data and shared_memory both set",
       [&](v1::ForwardRequest& r) { r.mutable_hidden_states()->set_data(std::string(512, '\0')); },
       grpc::StatusCode::INVALID_ARGUMENT,
       "hidden_states.data: must be empty when hidden_states.shared_memory is set"},
      {"labels byte_size",
       [&](v1::ForwardRequest& r) {
         v1::Tensor* labels = r.mutable_labels();
         labels->set_dtype(v1::DATA_TYPE_INT64);
         labels->add_shape(1);
         labels->add_shape(2);
         *labels->mutable_shared_memory() = Ref(region, 1024, 8);
       },
       grpc::StatusCode::INVALID_ARGUMENT,
       "labels.shared_memory.byte_size: expected 16 bytes (2 elements of INT64 for shape [1, 2]), "
       "got 8"},
      {"labels offset past the end",
       [&](v1::ForwardRequest& r) {
         v1::Tensor* labels = r.mutable_labels();
         labels->set_dtype(v1::DATA_TYPE_INT32);
         labels->add_shape(1);
         labels->add_shape(2);
         *labels->mutable_shared_memory() = Ref(region, 4090, 8);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "labels.shared_memory.byte_size: offset 4090 + "},
      {"an unknown region",
       [&](v1::ForwardRequest& r) {
         r.mutable_hidden_states()->mutable_shared_memory()->set_region(std::string(32, '0'));
       },
       grpc::StatusCode::NOT_FOUND,
       absl::StrCat("hidden_states.shared_memory.region: no region '", std::string(32, '0'),
                    "' (unregistered, or its session ended)")},
      {"an output of the wrong size",
       [&](v1::ForwardRequest& r) { *r.mutable_outputs()->mutable_logits() = Ref(region, 0, 4); },
       grpc::StatusCode::INVALID_ARGUMENT,
       "outputs.logits.byte_size: expected 8000 bytes (logits [1, 2, 1000] of FP32), got 4"},
      {"an output the call does not produce (z_loss without a multiplier)",
       [&](v1::ForwardRequest& r) { *r.mutable_outputs()->mutable_z_loss() = Ref(region, 0, 4); },
       grpc::StatusCode::INVALID_ARGUMENT, "outputs.z_loss: this call returns no z_loss"},
      {"an output the call does not produce (loss without labels)",
       [&](v1::ForwardRequest& r) { *r.mutable_outputs()->mutable_loss() = Ref(region, 0, 4); },
       grpc::StatusCode::INVALID_ARGUMENT, "outputs.loss: this call returns no loss"},
      {"logits with return_logits false",
       [&](v1::ForwardRequest& r) {
         *r.mutable_labels() = Tensor(v1::DATA_TYPE_INT64, {1, 2}, LabelBytes(2, false));
         r.mutable_options()->set_return_logits(false);
         *r.mutable_outputs()->mutable_logits() = Ref(region, 0, 8000);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "outputs.logits: this call returns no logits"},
      {"an output past the end of its region",
       [&](v1::ForwardRequest& r) {
         *r.mutable_outputs()->mutable_logits() = Ref(region, 0, 8000);
       },
       grpc::StatusCode::INVALID_ARGUMENT,
       absl::StrCat("outputs.logits.byte_size: offset 0 + byte_size 8000 is past the end of "
                    "region ",
                    quoted)},
      {"an output in an unknown region",
       [&](v1::ForwardRequest& r) {
         *r.mutable_outputs()->mutable_argmax() = Ref("nope", 0, 16);
         r.mutable_options()->set_return_argmax(true);
       },
       grpc::StatusCode::NOT_FOUND, "outputs.argmax.region: no region 'nope'"},
      {"positions in a region, out of range (copied, then validated)",
       [&](v1::ForwardRequest& r) {
         const int64_t positions[] = {0, 99};
         std::memcpy(object.bytes() + 2048, positions, sizeof(positions));
         v1::Tensor* p = r.mutable_options()->mutable_logits_to_keep_positions();
         p->set_dtype(v1::DATA_TYPE_INT64);
         p->add_shape(1);
         p->add_shape(2);
         *p->mutable_shared_memory() = Ref(region, 2048, 16);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "options.logits_to_keep_positions: "},
      {"labels in a region, out of range (copied, then validated)",
       [&](v1::ForwardRequest& r) {
         const int64_t labels[] = {1, kVocab};
         std::memcpy(object.bytes() + 3072, labels, sizeof(labels));
         v1::Tensor* l = r.mutable_labels();
         l->set_dtype(v1::DATA_TYPE_INT64);
         l->add_shape(1);
         l->add_shape(2);
         *l->mutable_shared_memory() = Ref(region, 3072, 16);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "labels: "},
  };
  for (const Bad& bad : bad_requests) {
    SCOPED_TRACE(bad.name);
    v1::ForwardRequest request = HiddenInRegion(region);
    bad.edit(request);
    v1::ForwardResponse response;
    const grpc::Status status = client.Forward(request, &response);
    EXPECT_EQ(status.error_code(), bad.code) << status.error_message();
    EXPECT_THAT(status.error_message(), StartsWith(bad.message));
  }

  // Registrations: each refused alone, the session goes on.
  const ShmObject small(4096);
  const struct {
    std::string key;
    uint64_t offset;
    uint64_t size;
    grpc::StatusCode code;
    std::string message;
  } bad_registrations[] = {
      {small.key(), 0, 8192, grpc::StatusCode::INVALID_ARGUMENT,
       absl::StrCat("register_system.byte_size: object '", small.key(),
                    "' holds 4096 bytes, fewer than offset 0 + byte_size 8192")},
      {small.key(), 4000, 100, grpc::StatusCode::INVALID_ARGUMENT,
       "register_system.byte_size: object"},
      {small.key(), kMax, 2, grpc::StatusCode::INVALID_ARGUMENT,
       "register_system.byte_size: offset 18446744073709551615 + byte_size 2 is past the largest "
       "object size"},
      {small.key(), 0, 0, grpc::StatusCode::INVALID_ARGUMENT,
       "register_system.byte_size: must be positive"},
      {"lmhead_no_slash", 0, 1, grpc::StatusCode::INVALID_ARGUMENT,
       "register_system.key: expected a shm_open name \"/name\", got 'lmhead_no_slash'"},
      {"/dir/name", 0, 1, grpc::StatusCode::INVALID_ARGUMENT, "register_system.key: expected"},
      {"", 0, 1, grpc::StatusCode::INVALID_ARGUMENT, "register_system.key: expected"},
      {"/..", 0, 1, grpc::StatusCode::INVALID_ARGUMENT, "register_system.key: expected"},
      {"/" + std::string(300, 'k'), 0, 1, grpc::StatusCode::INVALID_ARGUMENT,
       "register_system.key: a key is at most 255 bytes, got 301"},
      {"/PostgreSQL.1234", 0, 1, grpc::StatusCode::PERMISSION_DENIED,
       "register_system.key: this server registers only objects whose key starts with '/lmhead' "
       "(--shared_memory_key_prefix)"},
      {"/lmhead_e2e_no_such_object", 0, 1, grpc::StatusCode::NOT_FOUND,
       "register_system.key: no shared memory object '/lmhead_e2e_no_such_object'"},
  };
  for (const auto& bad : bad_registrations) {
    SCOPED_TRACE(bad.key);
    const v1::SharedMemoryResponse response = session.Register(bad.key, bad.offset, bad.size);
    EXPECT_EQ(response.code(), static_cast<int>(bad.code)) << response.message();
    EXPECT_THAT(response.message(), StartsWith(bad.message));
    EXPECT_TRUE(response.region().empty());
  }
  v1::SharedMemoryRequest empty;
  v1::SharedMemoryResponse response = session.Send(empty);
  EXPECT_EQ(response.code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_THAT(response.message(), StartsWith("action: expected one of register_system"));
  v1::SharedMemoryRequest cuda;
  cuda.mutable_register_cuda()->set_raw_handle(std::string(64, '\0'));
  cuda.mutable_register_cuda()->set_byte_size(1);
  response = session.Send(cuda);
  EXPECT_EQ(response.code(), static_cast<int>(grpc::StatusCode::UNIMPLEMENTED));
  EXPECT_EQ(response.message(), "register_cuda: CUDA shared memory needs a server built with CUDA");
  response = session.Unregister("not-mine");
  EXPECT_EQ(response.code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  EXPECT_EQ(response.message(), "unregister: no region 'not-mine' in this session");

  // The session and its region still work.
  EXPECT_EQ(session.Register(small.key(), 0, 4096).code(), 0);
  v1::ForwardResponse ok;
  const grpc::Status status = client.Forward(HiddenInRegion(region), &ok);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(ok.logits().data().size(), 2u * kVocab * 4);
  EXPECT_TRUE(session.Close().ok());
}

TEST_F(SharedMemoryTest, AnotherClientsRegionIsNotFoundAndItsKeyIsRefused) {
  ShmObject object(4096);
  Client a(*server_);
  Client b(*server_);  // another connection: another client
  Session session_a(a);
  const std::string region = session_a.RegisterAll(object);
  v1::ForwardResponse response;
  ASSERT_TRUE(a.Forward(HiddenInRegion(region), &response).ok());

  // B is told exactly what it would be told for an id that exists nowhere.
  const grpc::Status theirs = b.Forward(HiddenInRegion(region), &response);
  const std::string unknown_id(32, 'f');
  const grpc::Status unknown = b.Forward(HiddenInRegion(unknown_id), &response);
  EXPECT_EQ(theirs.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(unknown.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(absl::StrReplaceAll(theirs.error_message(), {{region, "ID"}}),
            absl::StrReplaceAll(unknown.error_message(), {{unknown_id, "ID"}}));
  // B cannot unregister it either, and cannot register A's object while A's session lives.
  Session session_b(b);
  v1::SharedMemoryResponse answer = session_b.Unregister(region);
  EXPECT_EQ(answer.code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  answer = session_b.Register(object.key(), 0, 4096);
  EXPECT_EQ(answer.code(), static_cast<int>(grpc::StatusCode::PERMISSION_DENIED));
  EXPECT_EQ(answer.message(), "register_system.key: the object is registered by another client");
  ASSERT_TRUE(a.Forward(HiddenInRegion(region), &response).ok());  // A's region is untouched

  // Once A's session has ended, the key is B's to take.
  EXPECT_TRUE(session_a.Close().ok());
  answer = session_b.Register(object.key(), 0, 4096);
  EXPECT_EQ(answer.code(), 0) << answer.message();
  EXPECT_TRUE(b.Forward(HiddenInRegion(answer.region()), &response).ok());
  EXPECT_TRUE(session_b.Close().ok());
}

TEST_F(SharedMemoryTest, RegionsAreUnregisteredWhenTheSessionEnds) {
  ShmObject object(4096);
  Client client(*server_);
  v1::ForwardResponse response;
  const auto found = [&](const std::string& region) {
    const grpc::Status status = client.Forward(HiddenInRegion(region), &response);
    EXPECT_TRUE(status.ok() || status.error_code() == grpc::StatusCode::NOT_FOUND)
        << status.error_message();
    return status.ok();
  };

  // Half-close: the call ends once the server has unregistered.
  {
    Session session(client);
    const std::string region = session.RegisterAll(object);
    EXPECT_TRUE(found(region));
    EXPECT_TRUE(session.Close().ok());
    EXPECT_FALSE(found(region));
  }
  // Cancellation.
  {
    Session session(client);
    const std::string region = session.RegisterAll(object);
    EXPECT_TRUE(found(region));
    EXPECT_EQ(session.Cancel().error_code(), grpc::StatusCode::CANCELLED);
    EXPECT_TRUE(Eventually([&] { return !found(region); }));
  }
  // The session's deadline.
  {
    Session session(client, std::chrono::milliseconds(1500));
    const std::string region = session.RegisterAll(object);
    EXPECT_TRUE(found(region));
    EXPECT_TRUE(Eventually([&] { return !found(region); }));
    EXPECT_EQ(session.Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  // An explicit unregister.
  {
    Session session(client);
    const std::string region = session.RegisterAll(object);
    EXPECT_TRUE(found(region));
    const v1::SharedMemoryResponse answer = session.Unregister(region);
    EXPECT_EQ(answer.code(), 0) << answer.message();
    EXPECT_EQ(answer.region(), region);
    EXPECT_FALSE(found(region));
    EXPECT_EQ(session.Unregister(region).code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
    EXPECT_TRUE(session.Close().ok());
  }
}

TEST_F(SharedMemoryTest, RequestsRacingTheUnregisterSucceedOrFailCleanly) {
  ShmObject object(1 << 17);
  Client client(*server_);
  for (int round = 0; round < 3; ++round) {
    Session session(client);
    const std::string region = session.RegisterAll(object);
    std::atomic<bool> stop{false};
    std::atomic<int> ok{0};
    std::atomic<int> not_found{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t) {
      threads.emplace_back([&] {
        while (!stop) {
          v1::ForwardRequest request = HiddenInRegion(region, 0, 16);
          *request.mutable_outputs()->mutable_logits() = Ref(region, 8192, 16 * kVocab * 4);
          v1::ForwardResponse response;
          const grpc::Status status = client.Forward(request, &response);
          if (status.ok()) {
            ++ok;
          } else {
            EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << status.error_message();
            ++not_found;
          }
        }
      });
    }
    EXPECT_TRUE(Eventually([&] { return ok > 0; }));
    if (round == 2) {
      EXPECT_EQ(session.Cancel().error_code(), grpc::StatusCode::CANCELLED);
    } else {
      EXPECT_EQ(session.Unregister(region).code(), 0);
    }
    EXPECT_TRUE(Eventually([&] { return not_found > 0; }));
    stop = true;
    for (std::thread& thread : threads) thread.join();
  }
}

// The client may rewrite its region while the server reads it. Labels and positions are copied
// out before they are validated, so a value changed after the check never reaches the core: each
// call either passes with valid values or is refused, and the server survives.
TEST_F(SharedMemoryTest, IndexValuesChangedDuringCallsNeverReachTheCoreUnchecked) {
  constexpr int64_t kLength = 64;
  ShmObject object(1 << 16);
  Client client(*server_);
  Session session(client);
  const std::string region = session.RegisterAll(object);
  object.Write(0, HiddenBytes(kLength * kDModel, false));
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    auto* labels = reinterpret_cast<volatile int64_t*>(object.bytes() + 32768);
    auto* positions = reinterpret_cast<volatile int64_t*>(object.bytes() + 40960);
    // Whole arrays flip between valid and far out of range (a torn mix in between).
    for (int64_t i = 0; !stop; ++i) {
      for (int64_t j = 0; j < kLength; ++j) {
        labels[j] = i % 2 == 0 ? j : int64_t{1} << 40;
        positions[j] = i % 2 == 0 ? j : -(int64_t{1} << 40);
      }
    }
  });
  int ok = 0;
  int refused = 0;
  for (int call = 0; call < 200; ++call) {
    v1::ForwardRequest request = HiddenInRegion(region, 0, kLength);
    v1::Tensor* labels = request.mutable_labels();
    labels->set_dtype(v1::DATA_TYPE_INT64);
    labels->add_shape(1);
    labels->add_shape(kLength);
    *labels->mutable_shared_memory() = Ref(region, 32768, kLength * 8);
    if (call % 2 == 1) {
      v1::Tensor* positions = request.mutable_options()->mutable_logits_to_keep_positions();
      positions->set_dtype(v1::DATA_TYPE_INT64);
      positions->add_shape(1);
      positions->add_shape(kLength);
      *positions->mutable_shared_memory() = Ref(region, 40960, kLength * 8);
    }
    v1::ForwardResponse response;
    const grpc::Status status = client.Forward(request, &response);
    if (status.ok()) {
      ++ok;
      EXPECT_EQ(response.loss().data().size(), 4u);
    } else {
      ++refused;
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    }
  }
  stop = true;
  writer.join();
  EXPECT_EQ(ok + refused, 200);
  std::cout << ok << " calls passed, " << refused << " were refused\n";
  EXPECT_TRUE(session.Close().ok());
}

TEST_F(SharedMemoryTest, ASessionHoldsAtMostMaxSharedMemoryRegions) {
  ShmObject object(4096);
  Client client(*server_);
  Session session(client);
  std::vector<std::string> regions;
  for (int i = 0; i < 4; ++i) {
    const v1::SharedMemoryResponse answer = session.Register(object.key(), i * 16, 16);
    ASSERT_EQ(answer.code(), 0) << answer.message();
    regions.push_back(answer.region());
  }
  v1::SharedMemoryResponse answer = session.Register(object.key(), 64, 16);
  EXPECT_EQ(answer.code(), static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  EXPECT_EQ(answer.message(),
            "register_system.key: this session holds 4 regions, the most a session may "
            "(--max_shared_memory_regions); unregister one first");
  // Another session has its own allowance (the key is this session's, so another object).
  ShmObject other(4096);
  Session second(client);
  EXPECT_EQ(second.Register(other.key(), 0, 16).code(), 0);
  EXPECT_EQ(session.Unregister(regions[0]).code(), 0);
  EXPECT_EQ(session.Register(object.key(), 64, 16).code(), 0);
  EXPECT_TRUE(second.Close().ok());
  EXPECT_TRUE(session.Close().ok());
}

// Issue 13: a client that shrinks its object under the server must not crash it (SIGBUS).
TEST_F(SharedMemoryTest, AnObjectShrunkWhileRegisteredFailsItsCallsNotTheServer) {
  ShmObject object(1 << 16);
  Client client(*server_);
  Session session(client);
  const std::string region = session.RegisterAll(object);
  object.Write(0, HiddenBytes(16 * kDModel, false));
  object.Truncate(0);
  v1::ForwardResponse response;
  grpc::Status status = client.Forward(HiddenInRegion(region, 0, 16), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_THAT(status.error_message(),
              StartsWith("hidden_states.shared_memory: the shared memory object of region"));
  status = client.Forward(HiddenInRegion(region, 0, 16), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("unregister it and register the object again"));
  EXPECT_EQ(session.Unregister(region).code(), 0);
  EXPECT_TRUE(session.Close().ok());
}

TEST(SharedMemoryLimitsTest, SessionsBeyondTheLimitAndTheResponseLimit) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(
      {"--allow_shared_memory", "--max_shared_memory_sessions=2", "--max_response_bytes=100000"});
  ASSERT_TRUE(server.ok()) << server.status();
  ShmObject one(1 << 20);
  ShmObject two(4096);
  Client client(**server);

  // Logits of 2 x 100 x 1000 fp32 (800 kB) are over --max_response_bytes inline, not in a region.
  {
    Session session(client);
    const std::string region = session.RegisterAll(one);
    v1::ForwardRequest request;
    *request.mutable_hidden_states() =
        Tensor(v1::DATA_TYPE_FP32, {2, 100, kDModel}, HiddenBytes(200 * kDModel, false));
    v1::ForwardResponse response;
    grpc::Status status = client.Forward(request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(status.error_message(), HasSubstr("(logits 800000)"));
    *request.mutable_outputs()->mutable_logits() = Ref(region, 0, 800000);
    status = client.Forward(request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.logits().shared_memory().byte_size(), 800000u);
    EXPECT_TRUE(session.Close().ok());
  }

  auto first = std::make_unique<Session>(client);
  Session second(client);
  first->RegisterAll(one);  // both sessions are open on the server
  second.RegisterAll(two);
  const grpc::Status refused = Session(client).Refusal();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(refused.error_message(),
            "too many shared memory sessions: 2 (--max_shared_memory_sessions); retry later");
  EXPECT_TRUE(first->Close().ok());
  first.reset();
  Session third(client);
  EXPECT_EQ(third.Register(one.key(), 0, 4096).code(), 0);
  EXPECT_TRUE(third.Close().ok());
  ExpectStillServing(**server);
  // A session still open does not hold up shutdown: SIGTERM ends it (and its regions), and the
  // server exits 0.
  const auto stopping = std::chrono::steady_clock::now();
  EXPECT_EQ((*server)->Stop(), 0);
  EXPECT_LT(std::chrono::steady_clock::now() - stopping, std::chrono::seconds(20));
  EXPECT_FALSE(second.Close().ok());
}

// The first IPv4 address of this host that is not loopback; empty when there is none.
std::string NonLoopbackAddress() {
  ifaddrs* addresses = nullptr;
  if (getifaddrs(&addresses) != 0) return "";
  std::string found;
  for (ifaddrs* a = addresses; a != nullptr && found.empty(); a = a->ifa_next) {
    if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET) continue;
    const uint32_t ip = ntohl(reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr.s_addr);
    if ((ip >> 24) == 127) continue;
    found = absl::StrCat(ip >> 24, ".", (ip >> 16) & 255, ".", (ip >> 8) & 255, ".", ip & 255);
  }
  freeifaddrs(addresses);
  return found;
}

TEST(SharedMemoryPeerTest, SessionsOnlyFromThisHostsLoopback) {
  const std::string address = NonLoopbackAddress();
  if (address.empty()) GTEST_SKIP() << "no IPv4 address besides loopback";
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--allow_shared_memory", "--host=0.0.0.0", "--allow_insecure"});
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string port = (*server)->address().substr((*server)->address().rfind(':') + 1);
  grpc::ChannelArguments arguments;
  arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  auto channel = grpc::CreateCustomChannel(absl::StrCat(address, ":", port),
                                           grpc::InsecureChannelCredentials(), arguments);
  auto stub = v1::LMHeadService::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub->SharedMemory(&context);
  v1::SharedMemoryResponse response;
  EXPECT_FALSE(stream->Read(&response));
  const grpc::Status status = stream->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  EXPECT_THAT(status.error_message(),
              StartsWith("shared memory is only for clients on the server's host"));
  // From loopback it is fine.
  Client local(**server);
  ShmObject object(4096);
  Session session(local);
  session.RegisterAll(object);
  EXPECT_TRUE(session.Close().ok());
  EXPECT_EQ((*server)->Stop(), 0);
}

}  // namespace
}  // namespace lmhead

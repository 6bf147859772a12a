// Issue 11's failures, each with its exact inputs, against the real server over loopback: a
// response over protobuf's limit, messages that must be ours, caller strings echoed without
// bounds, a second listening socket, and flags that must be refused at start.
#include <dirent.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/lmhead_client.h"
#include "client/tensor_file.h"
#include "core/config_json.h"
#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"
#include "tests/e2e/server_process.h"

namespace lmhead {
namespace {

std::unique_ptr<LMHeadClient> Connect(const ServerProcess& server) {
  ClientOptions options;
  options.timeout = std::chrono::seconds(120);
  return LMHeadClient::Connect(server.address(), options);
}

// The bytes of every tensor in `response`: what --max_response_bytes counts.
int64_t TensorBytes(const v1::ForwardResponse& response) {
  return response.logits().data().size() + response.loss().data().size() +
         response.ce_loss().data().size() + response.z_loss().data().size() +
         response.argmax().data().size();
}

// Issue 11's head: fp32 w_out (8188, 4), no norm, no bias, written to TEST_TMPDIR.
std::string WriteIssueHead() {
  LMHeadConfig config;
  config.bias = false;
  std::unique_ptr<LMHead> head = *LMHead::Build(config, 4, 8188, "cpu", /*seed=*/3);
  std::map<std::string, v1::Tensor> tensors;
  for (const auto& [name, tensor] : head->NamedParameters()) tensors[name] = ToWire(tensor);
  const std::string path = absl::StrCat(std::getenv("TEST_TMPDIR"), "/issue11.safetensors");
  EXPECT_TRUE(WriteSafetensorsFile(path, tensors).ok());
  std::ofstream(absl::StrCat(std::getenv("TEST_TMPDIR"), "/issue11.json"))
      << LMHeadConfigToJson(config);
  return path;
}

// The request of issue 11: hidden states (1, 65536, 4) fp32, int64 labels, reduction none,
// return_argmax. Its logits alone are exactly the default --max_response_bytes.
v1::ForwardRequest IssueRequest() {
  at::Generator generator = at::detail::createCPUGenerator(11);
  ForwardArgs args;
  args.model = "issue11";
  args.labels = ToWire(at::randint(8188, {1, 65536}, generator, at::TensorOptions(at::kLong)));
  args.loss_reduction = v1::LOSS_REDUCTION_NONE;
  args.return_argmax = true;
  return MakeForwardRequest(ToWire(at::randn({1, 65536, 4}, generator)), args);
}

TEST(ResponseSizeTest, IssueRequestIsRefusedBeforeAnyComputeAndTheServerKeepsServing) {
  const std::string path = WriteIssueHead();
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--model=issue11=" + path});
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = Connect(**server);
  const v1::ForwardRequest request = IssueRequest();
  ASSERT_EQ(int64_t{65536} * 8188 * 4, 2146435072);  // the default --max_response_bytes

  absl::StatusOr<v1::ForwardResponse> unary = client->Forward(request);
  EXPECT_EQ(unary.status().code(), absl::StatusCode::kResourceExhausted) << unary.status();
  EXPECT_TRUE(absl::StartsWith(
      unary.status().message(),
      "hidden_states.shape: the response would carry 2147483648 bytes of tensors (logits "
      "2146435072, argmax 524288, loss 262144, ce_loss 262144), over the limit of 2146435072 "
      "bytes (--max_response_bytes)"))
      << unary.status();

  int sent = 0;
  absl::Status stream = client->ForwardStream(
      [&](v1::ForwardRequest* next) {
        if (sent++ == 1) return false;
        *next = request;
        return true;
      },
      [](int64_t, const v1::ForwardResponse&) { return true; });
  EXPECT_EQ(stream.code(), absl::StatusCode::kResourceExhausted) << stream;

  // Still serving, and the logits (2 GiB) were never computed.
  ForwardArgs small_args;
  small_args.model = "issue11";
  small_args.labels = ToWire(at::randint(8188, {1, 3}, at::TensorOptions(at::kLong)));
  const v1::ForwardRequest small = MakeForwardRequest(ToWire(at::randn({1, 3, 4})), small_args);
  absl::StatusOr<v1::ForwardResponse> after = client->Forward(small);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->logits().shape(2), 8188);
  EXPECT_LT((*server)->PeakRssBytes(), int64_t{1} << 30);
  EXPECT_EQ((*server)->Log().find("exceeded maximum protobuf size"), std::string::npos);
  client.reset();
  EXPECT_EQ((*server)->Stop(), 0);
}

// One request shape for the boundary test, with what makes its response.
struct Variant {
  std::string name;
  std::function<void(ForwardArgs&)> set;
};

TEST(ResponseSizeTest, TheLimitCountsEveryOutputExactlyOneByteEitherSide) {
  const at::Tensor x = at::randn({2, 3, 64}, at::detail::createCPUGenerator(5));
  const at::Tensor labels =
      at::randint(1000, {2, 3}, at::detail::createCPUGenerator(6), at::TensorOptions(at::kLong));
  const std::vector<Variant> variants = {
      {"logits fp32", [](ForwardArgs&) {}},
      {"logits bf16 and argmax",
       [](ForwardArgs& a) {
         a.logits_dtype = v1::DATA_TYPE_BF16;
         a.return_argmax = true;
       }},
      {"none losses with z-loss and argmax, no logits",
       [&](ForwardArgs& a) {
         a.labels = ToWire(labels);
         a.loss_reduction = v1::LOSS_REDUCTION_NONE;
         a.z_loss_multiplier = 1e-4;
         a.return_logits = false;
         a.return_argmax = true;
       }},
      {"fused_linear sum in bf16 (z_loss in bf16)",
       [&](ForwardArgs& a) {
         a.labels = ToWire(labels);
         a.loss_reduction = v1::LOSS_REDUCTION_SUM;
         a.z_loss_multiplier = 1e-4;
         a.loss_implementation = v1::LOSS_IMPLEMENTATION_FUSED_LINEAR;
         a.compute_dtype = v1::DATA_TYPE_BF16;
       }},
      {"none losses broadcast by a (3, 1, 1) divisor, and logits",
       [&](ForwardArgs& a) {
         a.labels = ToWire(labels);
         a.loss_reduction = v1::LOSS_REDUCTION_NONE;
         a.loss_div_factor = ToWire(at::full({3, 1, 1}, 2.0, at::kHalf));
       }},
  };
  std::vector<int64_t> bytes;
  {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start({});
    ASSERT_TRUE(server.ok()) << server.status();
    auto client = Connect(**server);
    for (const Variant& variant : variants) {
      ForwardArgs args;
      variant.set(args);
      absl::StatusOr<v1::ForwardResponse> response = client->Forward(ToWire(x), args);
      ASSERT_TRUE(response.ok()) << variant.name << ": " << response.status();
      bytes.push_back(TensorBytes(*response));
    }
    EXPECT_EQ(bytes[0], 2 * 3 * 1000 * 4);
    EXPECT_EQ(bytes[3], 4 + 4 + 2);
    EXPECT_EQ(bytes[4], 2 * 3 * 1000 * 4 + 2 * 3 * 2 * 3 * 4);
    EXPECT_EQ((*server)->Stop(), 0);
  }
  for (size_t i = 0; i < variants.size(); ++i) {
    SCOPED_TRACE(variants[i].name);
    for (const int64_t limit : {bytes[i], bytes[i] - 1}) {
      absl::StatusOr<std::unique_ptr<ServerProcess>> server =
          ServerProcess::Start({absl::StrCat("--max_response_bytes=", limit)});
      ASSERT_TRUE(server.ok()) << server.status();
      ForwardArgs args;
      variants[i].set(args);
      absl::StatusOr<v1::ForwardResponse> response = Connect(**server)->Forward(ToWire(x), args);
      if (limit == bytes[i]) {
        EXPECT_TRUE(response.ok()) << response.status();
      } else {
        EXPECT_EQ(response.status().code(), absl::StatusCode::kResourceExhausted);
        EXPECT_TRUE(absl::StrContains(response.status().message(),
                                      absl::StrCat("would carry ", bytes[i], " bytes")))
            << response.status();
      }
      EXPECT_EQ((*server)->Stop(), 0);
    }
  }
}

// A request that is not valid protobuf, sent as raw bytes.
grpc::Status SendRawBytes(const ServerProcess& server, const std::string& method,
                          const std::string& bytes) {
  grpc::GenericStub stub(grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::Slice slice(bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::CompletionQueue queue;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> call =
      stub.PrepareUnaryCall(&context, method, request, &queue);
  call->StartCall();
  grpc::ByteBuffer response;
  grpc::Status status;
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  EXPECT_TRUE(queue.Next(&tag, &ok));
  queue.Shutdown();
  while (queue.Next(&tag, &ok)) {
  }
  return status;
}

TEST(MessagesTest, ARequestThatIsNotProtobufIsInvalidArgumentNotInternal) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start({});
  ASSERT_TRUE(server.ok()) << server.status();
  // A bad wire type; a field whose length runs past the end; a string that is not UTF-8.
  const std::string garbage[] = {std::string("\xff\xff\xff\xff\x0f", 5),
                                 std::string("\x12\x64\x08\x03", 4),
                                 std::string("\x0a\x02\xc3\x28", 4)};
  for (const std::string& bytes : garbage) {
    for (const auto& [method, type] :
         {std::pair{"/lmhead.v1.LMHeadService/Forward", "lmhead.v1.ForwardRequest"},
          std::pair{"/lmhead.v1.LMHeadService/GetModel", "lmhead.v1.GetModelRequest"}}) {
      const grpc::Status status = SendRawBytes(**server, method, bytes);
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << method;
      EXPECT_EQ(status.error_message(),
                absl::StrCat("request: not a valid ", type,
                             " message (the protobuf wire format could not be parsed)"));
    }
  }
  EXPECT_TRUE(Connect(**server)->ListModels().ok());
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST(CallerStringsTest, NamesAreBoundedAndEscapedAndPathsAndModelsStayPrivate) {
  const std::string path = WriteIssueHead();
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--model=issue11=" + path, "--model=other=" + path});
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = Connect(**server);

  // ModelInfo.source is the file's name, not where it lives on the host.
  absl::StatusOr<v1::ListModelsResponse> models = client->ListModels();
  ASSERT_TRUE(models.ok()) << models.status();
  for (const v1::ModelInfo& model : models->models()) {
    EXPECT_EQ(model.source(), "issue11.safetensors");
  }

  // A 64 KiB name: NOT_FOUND (it used to overflow gRPC's metadata limit), listing no model.
  for (const std::string& name : {std::string(64 << 10, 'n'), std::string(4 << 20, 'n')}) {
    v1::ForwardRequest request = IssueRequest();
    request.set_model(name);
    const size_t log_before = (*server)->Log().size();
    absl::StatusOr<v1::ForwardResponse> response = client->Forward(request);
    EXPECT_EQ(response.status().code(), absl::StatusCode::kNotFound) << response.status();
    EXPECT_LT(response.status().message().size(), 200u);
    EXPECT_EQ(response.status().message().find("issue11"), std::string::npos);
    EXPECT_EQ(response.status().message().find("other"), std::string::npos);
    absl::StatusOr<v1::ModelInfo> info = client->GetModel(name);
    EXPECT_EQ(info.status().code(), absl::StatusCode::kNotFound);
    // A 4 MiB name used to write 8 MiB of log per call.
    EXPECT_LT((*server)->Log().size() - log_before, 2048u);
  }

  // A newline in a name cannot forge a log line.
  v1::ForwardRequest request = IssueRequest();
  request.set_model("x\n2026-11-30T00:00:00.000Z error [1] request_id=forged message");
  EXPECT_EQ(client->Forward(request).status().code(), absl::StatusCode::kNotFound);
  client->GetModel("y\r\nforged");
  for (const absl::string_view line : absl::StrSplit((*server)->Log(), '\n', absl::SkipEmpty())) {
    EXPECT_TRUE(std::regex_search(std::string(line),
                                  std::regex(R"(^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \w+ )")))
        << line;
    EXPECT_FALSE(absl::StartsWith(line, "2026-11-30T00:00:00.000Z")) << line;
  }
  client.reset();
  EXPECT_EQ((*server)->Stop(), 0);

  // --expose_model_paths opts into the full path.
  server = ServerProcess::Start({"--model=issue11=" + path, "--expose_model_paths"});
  ASSERT_TRUE(server.ok()) << server.status();
  absl::StatusOr<v1::ModelInfo> info = Connect(**server)->GetModel("issue11");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->source(), path);
  EXPECT_EQ((*server)->Stop(), 0);
}

// The inodes of the sockets `pid` has open.
std::set<std::string> SocketInodes(pid_t pid) {
  std::set<std::string> inodes;
  const std::string dir = absl::StrCat("/proc/", pid, "/fd");
  DIR* fds = opendir(dir.c_str());
  if (fds == nullptr) return inodes;
  while (dirent* entry = readdir(fds)) {
    char target[256] = {0};
    const std::string link = absl::StrCat(dir, "/", entry->d_name);
    if (readlink(link.c_str(), target, sizeof(target) - 1) > 0 &&
        absl::StartsWith(target, "socket:[")) {
      std::string inode(target + 8);
      inode.pop_back();
      inodes.insert(inode);
    }
  }
  closedir(fds);
  return inodes;
}

TEST(ListeningTest, PortZeroListensOnOneSocketTheReportedOne) {
  for (const std::string host : {"0.0.0.0", "127.0.0.1", "localhost"}) {
    SCOPED_TRACE(host);
    absl::StatusOr<std::unique_ptr<ServerProcess>> server =
        ServerProcess::Start({"--host=" + host, "--allow_insecure"});
    ASSERT_TRUE(server.ok()) << server.status();
    const std::set<std::string> inodes = SocketInodes((*server)->pid());
    std::vector<int> listening_ports;
    for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
      std::ifstream file(table);
      std::string line;
      std::getline(file, line);  // header
      while (std::getline(file, line)) {
        const std::vector<std::string> fields = absl::StrSplit(line, ' ', absl::SkipWhitespace());
        // sl local_address rem_address st ... inode (field 9)
        if (fields.size() < 10 || fields[3] != "0A" || inodes.count(fields[9]) == 0) continue;
        const std::string port_hex = fields[1].substr(fields[1].find(':') + 1);
        listening_ports.push_back(std::stoi(port_hex, nullptr, 16));
      }
    }
    const std::string address = (*server)->address();
    const int reported = std::stoi(address.substr(address.rfind(':') + 1));
    EXPECT_EQ(listening_ports, std::vector<int>{reported});
    EXPECT_EQ((*server)->Stop(), 0);
  }
}

TEST(FlagsTest, EmptyAndOutOfRangeValuesAreRefusedAtStartNamingTheFlag) {
  const std::pair<std::vector<std::string>, std::string> cases[] = {
      {{"--model="}, "--model: given an empty value"},
      {{"--model", ""}, "--model: given an empty value"},
      {{"--model=demo"}, "--model: expected NAME=PATH.safetensors"},
      {{"--model=a b=x.safetensors"}, "--model: a model name is 1 to 128 characters"},
      {{"--host="}, "--host: given an empty value"},
      {{"--host=0.0.0.0"}, "--host: 0.0.0.0 is not a loopback address"},
      {{"--host=::"}, "--host: :: is not a loopback address"},
      {{"--device=gpu"}, "--device: expected a comma-separated list of cpu, cuda"},
      {{"--device=cpu,"}, "--device: expected a comma-separated list of cpu, cuda"},
      {{"--log_level="}, "--log_level: given an empty value"},
      {{"--max_response_bytes=4294967296"}, "--max_response_bytes: expected 1 to 2146435072"},
      {{"--max_response_bytes=0"}, "--max_response_bytes: expected 1 to 2146435072"},
      {{"--max_message_bytes=2147483648"}, "--max_message_bytes: expected 1 to 2147483647"},
      {{"--max_queue_tokens=0"}, "--max_queue_tokens: must be at least 1"},
      {{"--max_batch_tokens=0"}, "--max_batch_tokens: must be at least 1"},
      {{"--max_queue_delay_us=-1"}, "--max_queue_delay_us: expected 0 to 10000000"},
      {{"--max_open_streams=0"}, "--max_open_streams: must be at least 1"},
      {{"--shutdown_grace_seconds=-1"}, "--shutdown_grace_seconds: must be a finite number"},
      {{"--demo_vocab_size=0"}, "--demo_vocab_size: must be positive"},
      {{"--allow_shared_memory", "false"}, "unexpected argument 'false': the server takes flags"},
  };
  for (const auto& [flags, message] : cases) {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(flags);
    ASSERT_FALSE(server.ok()) << flags[0];
    EXPECT_TRUE(absl::StrContains(server.status().message(), message))
        << flags[0] << ": " << server.status();
  }
}

// Holds one of the server's stream slots: a stream whose one micro-batch is answered, then kept
// open until released (at the latest when destroyed).
class SlotHolder {
 public:
  SlotHolder(std::unique_ptr<LMHeadClient> client, v1::ForwardRequest request)
      : client_(std::move(client)), request_(std::move(request)), thread_([this] { Hold(); }) {}
  ~SlotHolder() {
    release_ = true;
    Join();
  }

  // True once the micro-batch was answered, within a minute.
  bool WaitHolding() {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!holding_ && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (!holding_) release_ = true;
    return holding_;
  }
  // Releases the slot once `log()` holds `needle` (or after 10 s), from a thread of its own.
  void ReleaseWhenLogged(std::function<std::string()> log, std::string needle) {
    releaser_ = std::thread([this, log = std::move(log), needle = std::move(needle)] {
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (!absl::StrContains(log(), needle) && std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      release_ = true;
    });
  }
  // Waits for the release and the stream's end.
  void Join() {
    if (releaser_.joinable()) releaser_.join();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Hold() {
    bool sent = false;
    const absl::Status status = client_->ForwardStream(
        [&](v1::ForwardRequest* next) {
          if (sent) {
            while (!release_) std::this_thread::sleep_for(std::chrono::milliseconds(5));
            return false;
          }
          sent = true;
          *next = request_;
          return true;
        },
        [&](int64_t, const v1::ForwardResponse&) {
          holding_ = true;
          return true;
        });
    EXPECT_TRUE(status.ok()) << status;
  }

  std::unique_ptr<LMHeadClient> client_;
  const v1::ForwardRequest request_;
  std::atomic<bool> holding_{false}, release_{false};
  std::thread thread_;
  std::thread releaser_;
};

// Clients retry a refusal that passes (all stream slots busy; a stream is retried by the client,
// unary calls by gRPC's retry policy), and not one that the server says would come again (a
// limit): the trailer grpc-retry-pushback-ms = -1.
TEST(RetryTest, BusyIsRetriedUntilItPassesButALimitIsNot) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(
      {"--max_open_streams=1", "--max_response_bytes=100000", "--max_config_variants=0"});
  ASSERT_TRUE(server.ok()) << server.status();
  const auto connect = [&](int max_attempts, const std::string& request_id,
                           std::chrono::seconds timeout = std::chrono::seconds(60)) {
    ClientOptions options;
    options.timeout = timeout;
    options.max_attempts = max_attempts;
    options.request_id = request_id;
    return LMHeadClient::Connect((*server)->address(), options);
  };
  const at::Tensor x = at::randn({1, 2, 64});
  ForwardArgs args;
  args.labels = ToWire(at::randint(1000, {1, 2}, at::TensorOptions(at::kLong)));
  const v1::ForwardRequest small = MakeForwardRequest(ToWire(x), args);

  // A stream holds the only slot until released.
  SlotHolder holder(connect(1, "holder"), small);
  if (!holder.WaitHolding()) FAIL() << "the holding stream got no answer\n" << (*server)->Log();

  // A second stream, without retries: refused at once. `next` is called once per micro-batch
  // whatever the attempts.
  int nexts = 0, answers = 0;
  const auto micro_batches = [&](LMHeadClient& client, int count) {
    int sent = 0;
    return client.ForwardStream(
        [&](v1::ForwardRequest* next) {
          ++nexts;
          if (sent == count) return false;
          ++sent;
          *next = small;
          return true;
        },
        [&](int64_t, const v1::ForwardResponse&) {
          ++answers;
          return true;
        });
  };
  EXPECT_EQ(micro_batches(*connect(1, "once"), 1).code(), absl::StatusCode::kResourceExhausted);
  // With retries: the slot frees once the first attempt was refused, and a later attempt gets
  // it (the attempts' random backoffs make waiting a fixed time flaky).
  holder.ReleaseWhenLogged([&] { return (*server)->Log(); },
                           "request_id=retried ForwardStream failed: RESOURCE_EXHAUSTED");
  nexts = answers = 0;
  const absl::Status retried = micro_batches(*connect(5, "retried", std::chrono::seconds(15)), 3);
  EXPECT_TRUE(retried.ok()) << retried;
  EXPECT_EQ(nexts, 4);
  EXPECT_EQ(answers, 3);
  holder.Join();
  const std::string log = (*server)->Log();
  const auto count = [&](const std::string& needle) {
    size_t n = 0;
    for (size_t at = log.find(needle); at != std::string::npos; at = log.find(needle, at + 1)) {
      ++n;
    }
    return n;
  };
  EXPECT_GE(count("request_id=retried ForwardStream failed: RESOURCE_EXHAUSTED"), 1u) << log;
  EXPECT_EQ(count("request_id=retried ForwardStream 3 micro-batches ok"), 1u) << log;

  // A response over the limit, and a config variant the server keeps no room for: one attempt
  // each, though the client would make five.
  absl::StatusOr<v1::ForwardResponse> too_large =
      connect(5, "too-large")->Forward(ToWire(at::randn({2, 100, 64})), ForwardArgs());
  EXPECT_EQ(too_large.status().code(), absl::StatusCode::kResourceExhausted);
  ForwardArgs bf16 = args;
  bf16.compute_dtype = v1::DATA_TYPE_BF16;
  absl::StatusOr<v1::ForwardResponse> variant = connect(5, "variant")->Forward(ToWire(x), bf16);
  EXPECT_EQ(variant.status().code(), absl::StatusCode::kResourceExhausted);
  const std::string after = (*server)->Log();
  for (const std::string id : {"too-large", "variant"}) {
    size_t n = 0;
    const std::string needle = "request_id=" + id + " Forward";
    for (size_t at = after.find(needle); at != std::string::npos; at = after.find(needle, at + 1)) {
      ++n;
    }
    EXPECT_EQ(n, 1u) << id << "\n" << after;
  }
  EXPECT_EQ((*server)->Stop(), 0);
}

// Issue 13: ForwardMicroBatched of a memory-mapped file sends each micro-batch's rows of hidden
// states from the mapping, not copied; a stream refused before its first answer is tried again,
// resending those micro-batches, and the job's answer is the one a free server gives, and the one
// the copying path (v1::Tensor) gives, byte for byte.
TEST(RetryTest, AMicroBatchedJobFromAMappedFileIsRetriedWithTheSameBytes) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--max_open_streams=1", "--max_batch_tokens=1"});
  ASSERT_TRUE(server.ok()) << server.status();
  const auto connect = [&](int max_attempts, const std::string& request_id) {
    ClientOptions options;
    options.timeout = std::chrono::seconds(60);
    options.max_attempts = max_attempts;
    options.request_id = request_id;
    return LMHeadClient::Connect((*server)->address(), options);
  };
  at::Generator generator = at::detail::createCPUGenerator(13);
  const v1::Tensor hidden = ToWire(at::randn({6, 3, 64}, generator).to(at::kBFloat16));
  const std::string path = absl::StrCat(std::getenv("TEST_TMPDIR"), "/mapped.safetensors");
  ASSERT_TRUE(WriteSafetensorsFile(path, {{"hidden", hidden}}).ok());
  absl::StatusOr<TensorView> mapped = MapTensorFile(path);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  ASSERT_NE(mapped->owner, nullptr);
  ForwardArgs args;
  args.labels = ToWire(at::randint(1000, {6, 3}, generator, at::TensorOptions(at::kLong)));
  args.loss_reduction = v1::LOSS_REDUCTION_NONE;
  args.return_argmax = true;
  const int64_t two_rows = 2 * 3 * 64 * 2;  // 3 micro-batches
  const auto expect_same = [](const v1::ForwardResponse& got, const v1::ForwardResponse& want) {
    EXPECT_EQ(got.num_scored_tokens(), want.num_scored_tokens());
    for (const auto& [name, a, b] : {std::tuple{"logits", &got.logits(), &want.logits()},
                                     std::tuple{"loss", &got.loss(), &want.loss()},
                                     std::tuple{"ce_loss", &got.ce_loss(), &want.ce_loss()},
                                     std::tuple{"argmax", &got.argmax(), &want.argmax()}}) {
      EXPECT_EQ(a->SerializeAsString(), b->SerializeAsString()) << name;
    }
  };
  absl::StatusOr<v1::ForwardResponse> expected =
      connect(1, "free")->ForwardMicroBatched(*mapped, std::nullopt, args, two_rows);
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_EQ(expected->logits().dtype(), v1::DATA_TYPE_FP32);
  absl::StatusOr<v1::ForwardResponse> copied =
      connect(1, "copied")->ForwardMicroBatched(hidden, args, two_rows);
  ASSERT_TRUE(copied.ok()) << copied.status();
  expect_same(*copied, *expected);

  // A stream holds the only slot until the mapped job's first attempt has been refused.
  SlotHolder holder(connect(1, "holder"),
                    MakeForwardRequest(ToWire(at::randn({1, 2, 64})), ForwardArgs()));
  const bool holding = holder.WaitHolding();
  holder.ReleaseWhenLogged([&] { return (*server)->Log(); },
                           "request_id=mapped ForwardStream failed: RESOURCE_EXHAUSTED");
  absl::StatusOr<v1::ForwardResponse> retried =
      connect(5, "mapped")->ForwardMicroBatched(*mapped, std::nullopt, args, two_rows);
  holder.Join();
  ASSERT_TRUE(holding) << (*server)->Log();
  ASSERT_TRUE(retried.ok()) << retried.status();
  expect_same(*retried, *expected);
  const std::string log = (*server)->Log();
  EXPECT_TRUE(absl::StrContains(log, "request_id=mapped ForwardStream failed: RESOURCE_EXHAUSTED"))
      << log;
  EXPECT_TRUE(absl::StrContains(log, "request_id=mapped ForwardStream 3 micro-batches ok")) << log;
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST(RetryTest, ServiceConfigIsGrpcsRetryPolicy) {
  EXPECT_EQ(RetryServiceConfig(1), "");
  EXPECT_EQ(RetryServiceConfig(3),
            R"({"methodConfig": [{"name": [{"service": "lmhead.v1.LMHeadService"}], )"
            R"("retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "5s", )"
            R"("backoffMultiplier": 2, "retryableStatusCodes": ["RESOURCE_EXHAUSTED", )"
            R"("UNAVAILABLE"]}}, {"name": [{"service": "lmhead.v1.LMHeadService", )"
            R"("method": "ForwardStream"}]}]})");
}

}  // namespace
}  // namespace lmhead

namespace lmhead {
namespace {

// --auth_token_file: every LMHeadService call needs one of the tokens (UNAUTHENTICATED, the same
// answer for a missing and a wrong token, nothing about the tokens), the health service does
// not; a server with tokens may listen beyond loopback without --allow_insecure.
TEST(AuthTest, CallsNeedATokenAndHealthDoesNot) {
  const std::string path = absl::StrCat(std::getenv("TEST_TMPDIR"), "/tokens");
  std::ofstream(path) << "old-token-0123456789abcdef\n\ncurrent-token-0123456789abcdef\n";
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--auth_token_file=" + path, "--host=0.0.0.0"});
  ASSERT_TRUE(server.ok()) << server.status();
  const auto connect = [&](const std::string& token) {
    ClientOptions options;
    options.timeout = std::chrono::seconds(30);
    options.max_attempts = 1;
    options.auth_token = token;
    return LMHeadClient::Connect((*server)->address(), options);
  };
  const at::Tensor x = at::randn({1, 3, 64});
  ForwardArgs args;
  args.return_logits = false;
  args.loss_reduction = v1::LOSS_REDUCTION_NONE;  // per token: streamed equals one call, bitwise
  args.labels = ToWire(at::randint(1000, {1, 3}, at::kLong));
  for (const std::string& token : {std::string(), std::string("wrong-token-0123456789abcdef"),
                                   std::string("current-token-0123456789abcde")}) {
    SCOPED_TRACE(token);
    auto client = connect(token);
    const absl::Status listed = client->ListModels().status();
    EXPECT_EQ(listed.code(), absl::StatusCode::kUnauthenticated) << listed;
    EXPECT_FALSE(absl::StrContains(listed.message(), "token-0123")) << listed;
    EXPECT_EQ(client->GetModel("demo").status().code(), absl::StatusCode::kUnauthenticated);
    EXPECT_EQ(client->Forward(ToWire(x), args).status().code(), absl::StatusCode::kUnauthenticated);
    const absl::StatusOr<v1::ForwardResponse> streamed =
        client->ForwardMicroBatched(ToWire(x), args, /*max_micro_batch_bytes=*/256);
    EXPECT_EQ(streamed.status().code(), absl::StatusCode::kUnauthenticated) << streamed.status();
    // Probes carry no token.
    const auto health = client->Health("");
    ASSERT_TRUE(health.ok()) << health.status();
    EXPECT_EQ(*health, grpc::health::v1::HealthCheckResponse::SERVING);
  }
  for (const char* token : {"old-token-0123456789abcdef", "current-token-0123456789abcdef"}) {
    auto client = connect(token);
    EXPECT_TRUE(client->ListModels().ok());
    const absl::StatusOr<v1::ForwardResponse> one = client->Forward(ToWire(x), args);
    ASSERT_TRUE(one.ok()) << one.status();
    const absl::StatusOr<v1::ForwardResponse> streamed =
        client->ForwardMicroBatched(ToWire(x), args, /*max_micro_batch_bytes=*/256);
    ASSERT_TRUE(streamed.ok()) << streamed.status();
    EXPECT_EQ(streamed->loss().data(), one->loss().data());
  }
  EXPECT_EQ((*server)->Stop(), 0);
  EXPECT_TRUE(absl::StrContains((*server)->Log(), "failed: UNAUTHENTICATED"));
  EXPECT_FALSE(absl::StrContains((*server)->Log(), "token-0123"));
}

TEST(AuthTest, BadTokenFilesStopTheServerNamingTheFlag) {
  const std::string path = absl::StrCat(std::getenv("TEST_TMPDIR"), "/short-tokens");
  std::ofstream(path) << "short\n";
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--auth_token_file=" + path});
  ASSERT_FALSE(server.ok());
  EXPECT_TRUE(
      absl::StrContains(server.status().message(), "--auth_token_file: line 1 is not a token"))
      << server.status();
  EXPECT_FALSE(absl::StrContains(server.status().message(), "short\n"));
  // A flag error like the others (exit status 2, before the server starts).
  EXPECT_TRUE(absl::StrContains(server.status().message(), "exited with status 512"))
      << server.status();
  EXPECT_FALSE(absl::StrContains(server.status().message(), "cannot start")) << server.status();
}

}  // namespace
}  // namespace lmhead

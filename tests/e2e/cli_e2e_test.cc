// End-to-end tests of the `lmhead` command-line client against the real server.
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/tensor_file.h"
#include "gtest/gtest.h"
#include "tests/e2e/server_process.h"

namespace lmhead {
namespace {

struct Result {
  int exit_code = -1;
  std::string out;  // stdout and stderr
};

// Runs the lmhead binary from this test's runfiles with `args`.
Result RunCli(const std::string& args) {
  const std::string binary = absl::StrCat(std::getenv("TEST_SRCDIR"), "/",
                                          std::getenv("TEST_WORKSPACE"), "/client/lmhead");
  Result result;
  FILE* pipe = popen(absl::StrCat(binary, " ", args, " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof(buffer), pipe)) result.out.append(buffer, n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

// A version-1 .npy file of little-endian `descr` values with `shape` ("(2, 3, 64)").
void WriteNpy(const std::string& path, const std::string& descr, const std::string& shape,
              const std::string& data) {
  std::string header =
      absl::StrCat("{'descr': '", descr, "', 'fortran_order': False, 'shape': ", shape, ", }");
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header += '\n';
  std::ofstream file(path, std::ios::binary);
  file << "\x93NUMPY" << '\x01' << '\x00' << static_cast<char>(header.size() & 0xff)
       << static_cast<char>(header.size() >> 8) << header << data;
}

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start({});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(server_->Stop(), 0);
    delete server_;
  }
  static std::string Address() { return "--address " + server_->address(); }
  static ServerProcess* server_;
};

ServerProcess* CliTest::server_ = nullptr;

TEST_F(CliTest, HealthAndModels) {
  Result health = RunCli("health " + Address());
  EXPECT_EQ(health.exit_code, 0) << health.out;
  EXPECT_EQ(health.out, "SERVING\n");
  Result models = RunCli("models " + Address());
  EXPECT_EQ(models.exit_code, 0) << models.out;
  EXPECT_NE(models.out.find("demo             64       1000        FP32   64064"),
            std::string::npos)
      << models.out;
  Result json = RunCli("models --json " + Address());
  EXPECT_EQ(json.exit_code, 0) << json.out;
  EXPECT_NE(json.out.find("\"default_model\": \"demo\""), std::string::npos) << json.out;
}

TEST_F(CliTest, ForwardReadsNpyAndWritesSafetensors) {
  const std::string dir = std::getenv("TEST_TMPDIR");
  std::string hidden(2 * 3 * 64 * 4, '\0');
  for (size_t i = 0; i < hidden.size() / 4; ++i) {
    const float value = static_cast<float>(i % 17) / 8.0f - 1.0f;
    std::memcpy(&hidden[i * 4], &value, 4);
  }
  WriteNpy(dir + "/hidden.npy", "<f4", "(2, 3, 64)", hidden);
  std::string labels(2 * 3 * 8, '\0');
  const int64_t ids[6] = {1, 2, -100, 999, 0, 5};
  std::memcpy(labels.data(), ids, sizeof(ids));
  WriteNpy(dir + "/labels.npy", "<i8", "(2, 3)", labels);

  for (const std::string chunking :
       {"", " --chunk_mib 0.0008", " --chunk_mib 0.0008 --parallel_streams 2"}) {
    SCOPED_TRACE(chunking);
    const std::string output = dir + "/out.safetensors";
    Result run = RunCli(absl::StrCat("forward ", Address(), " --hidden ", dir,
                                     "/hidden.npy --labels ", dir, "/labels.npy --output ", output,
                                     " --z_loss_multiplier 1e-4 --logits_dtype bf16", chunking));
    ASSERT_EQ(run.exit_code, 0) << run.out;
    EXPECT_NE(run.out.find("5 scored tokens"), std::string::npos) << run.out;
    if (!chunking.empty()) {
      EXPECT_NE(run.out.find("2/2 micro-batches"), std::string::npos) << run.out;
    }
    std::ifstream file(output, std::ios::binary);
    std::stringstream bytes;
    bytes << file.rdbuf();
    absl::StatusOr<std::map<std::string, v1::Tensor>> tensors =
        ParseSafetensorsTensors(bytes.str());
    ASSERT_TRUE(tensors.ok()) << tensors.status();
    ASSERT_EQ(tensors->count("logits"), 1u);
    EXPECT_EQ(tensors->at("logits").dtype(), v1::DATA_TYPE_BF16);
    EXPECT_EQ(tensors->at("logits").data().size(), 2u * 3 * 1000 * 2);
    for (const char* name : {"loss", "ce_loss", "z_loss"}) {
      ASSERT_EQ(tensors->count(name), 1u) << name;
      EXPECT_EQ(tensors->at(name).shape_size(), 0) << name;
    }
  }
}

TEST_F(CliTest, ErrorsAndHelp) {
  for (const std::string command : {"health", "models", "forward"}) {
    Result help = RunCli(command + " --help");
    EXPECT_EQ(help.exit_code, 0) << help.out;
    EXPECT_NE(help.out.find("usage: lmhead " + command), std::string::npos) << help.out;
    EXPECT_NE(help.out.find("--address HOST:PORT"), std::string::npos) << help.out;
  }
  EXPECT_NE(RunCli("forward --help").out.find("--logits_to_keep K"), std::string::npos);
  Result top = RunCli("--help");
  EXPECT_EQ(top.exit_code, 0);
  // Each command's line is a whole sentence.
  EXPECT_NE(top.out.find("forward  Runs LMHead.forward on the server, from .npy/.safetensors "
                         "inputs to a .safetensors file.\n"),
            std::string::npos)
      << top.out;

  Result unknown_flag = RunCli("health --adress x");
  EXPECT_EQ(unknown_flag.exit_code, 2) << unknown_flag.out;
  EXPECT_NE(unknown_flag.out.find("unknown flag --adress"), std::string::npos);
  EXPECT_EQ(RunCli("frobnicate").exit_code, 2);
  EXPECT_EQ(RunCli("models").exit_code, 2);  // --address is required
  Result streams_without_chunks = RunCli(
      "forward --address x --hidden h.npy --output o.safetensors --chunk_mib 0 "
      "--parallel_streams 2");
  EXPECT_EQ(streams_without_chunks.exit_code, 2) << streams_without_chunks.out;
  EXPECT_NE(streams_without_chunks.out.find("--parallel_streams: needs --chunk_mib > 0"),
            std::string::npos)
      << streams_without_chunks.out;

  const std::string dir = std::getenv("TEST_TMPDIR");
  WriteNpy(dir + "/h.npy", "<f4", "(1, 1, 64)", std::string(256, '\0'));
  Result bad_model = RunCli(absl::StrCat("forward ", Address(), " --hidden ", dir,
                                         "/h.npy --output ", dir, "/o.safetensors --model nope"));
  EXPECT_EQ(bad_model.exit_code, 1);
  EXPECT_NE(bad_model.out.find("error: NOT_FOUND: model: no model named 'nope'"), std::string::npos)
      << bad_model.out;
  Result missing = RunCli(absl::StrCat("forward ", Address(), " --hidden ", dir,
                                       "/missing.npy --output ", dir, "/o.safetensors"));
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_NE(missing.out.find("cannot open"), std::string::npos) << missing.out;
  Result no_streams =
      RunCli(absl::StrCat("forward ", Address(), " --hidden ", dir, "/h.npy --output ", dir,
                          "/o.safetensors --parallel_streams 0"));
  EXPECT_EQ(no_streams.exit_code, 2) << no_streams.out;
  EXPECT_NE(no_streams.out.find("--parallel_streams"), std::string::npos) << no_streams.out;
  Result down = RunCli("health --address 127.0.0.1:1 --timeout 2");
  EXPECT_EQ(down.exit_code, 1);
  EXPECT_NE(down.out.find("UNAVAILABLE"), std::string::npos) << down.out;
}

// The value of the one-element FP32 tensor `name` in a .safetensors file the CLI wrote.
float ScalarFromOutput(const std::string& path, const std::string& name) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream bytes;
  bytes << file.rdbuf();
  absl::StatusOr<std::map<std::string, v1::Tensor>> tensors = ParseSafetensorsTensors(bytes.str());
  EXPECT_TRUE(tensors.ok()) << tensors.status();
  if (!tensors.ok() || tensors->count(name) == 0) {
    ADD_FAILURE() << name << " missing in " << path;
    return 0;
  }
  const v1::Tensor& tensor = tensors->at(name);
  EXPECT_EQ(tensor.dtype(), v1::DATA_TYPE_FP32) << name;
  float value = 0;
  if (tensor.data().size() == 4) std::memcpy(&value, tensor.data().data(), 4);
  return value;
}

// Issue 11: the CLI combined streamed micro-batches differently from one request. Hidden
// states (2, 5, 16) fp32; the CLI streams when they exceed --chunk_mib.
TEST(CliMicroBatchTest, StreamedJobsGiveWhatOneRequestGives) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--demo_d_model=16", "--demo_vocab_size=50"});
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string dir = std::getenv("TEST_TMPDIR");
  std::string hidden(2 * 5 * 16 * 4, '\0');
  for (size_t i = 0; i < hidden.size() / 4; ++i) {
    const float value = static_cast<float>(i % 13) / 4.0f - 1.5f;
    std::memcpy(&hidden[i * 4], &value, 4);
  }
  WriteNpy(dir + "/h16.npy", "<f4", "(2, 5, 16)", hidden);
  std::string ignored(2 * 5 * 8, '\0'), scored(2 * 5 * 8, '\0');
  for (int i = 0; i < 10; ++i) {
    const int64_t none = -100, id = (7 * i) % 50;
    std::memcpy(&ignored[i * 8], &none, 8);
    std::memcpy(&scored[i * 8], &id, 8);
  }
  WriteNpy(dir + "/ignored.npy", "<i8", "(2, 5)", ignored);
  WriteNpy(dir + "/scored.npy", "<i8", "(2, 5)", scored);
  const auto run = [&](const std::string& args, const std::string& chunking) {
    const std::string output = dir + "/combined.safetensors";
    Result result =
        RunCli(absl::StrCat("forward --address ", (*server)->address(), " --hidden ", dir,
                            "/h16.npy --output ", output, " ", args, " ", chunking));
    EXPECT_EQ(result.exit_code, 0) << result.out;
    return std::pair{ScalarFromOutput(output, "loss"), ScalarFromOutput(output, "ce_loss")};
  };
  // fused_linear, every label ignored, mean: 0.0, as one request and upstream's fused path.
  const std::string all_ignored =
      absl::StrCat("--labels ", dir, "/ignored.npy --loss_implementation fused_linear");
  for (const std::string chunking : {"--chunk_mib 0", "--chunk_mib 0.0001"}) {
    const auto [loss, ce_loss] = run(all_ignored, chunking);
    EXPECT_EQ(loss, 0.0f) << chunking;
    EXPECT_EQ(ce_loss, 0.0f) << chunking;
  }
  // sum over scored tokens divided by 0: +inf, as one request and torch.
  const std::string divided_by_zero =
      absl::StrCat("--labels ", dir, "/scored.npy --loss_reduction sum --loss_div_factor 0");
  for (const std::string chunking : {"--chunk_mib 0", "--chunk_mib 0.0005"}) {
    const auto [loss, ce_loss] = run(divided_by_zero, chunking);
    EXPECT_TRUE(std::isinf(loss) && loss > 0) << chunking << ": " << loss;
    EXPECT_TRUE(std::isinf(ce_loss) && ce_loss > 0) << chunking << ": " << ce_loss;
  }
  // A finite job: the streamed mean equals one request's up to summation order.
  const std::string finite = absl::StrCat("--labels ", dir, "/scored.npy --z_loss_multiplier 1e-3");
  const auto [one_loss, one_ce] = run(finite, "--chunk_mib 0");
  const auto [streamed_loss, streamed_ce] = run(finite, "--chunk_mib 0.0001");
  EXPECT_NEAR(streamed_loss, one_loss, 1e-5 * std::fabs(one_loss));
  EXPECT_NEAR(streamed_ce, one_ce, 1e-5 * std::fabs(one_ce));
  EXPECT_EQ((*server)->Stop(), 0);
}

// The file the CLI wrote at `path`, whole.
std::string ReadOutput(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream bytes;
  bytes << file.rdbuf();
  return bytes.str();
}

// Issue 13: the CLI maps its input files and copies each micro-batch's rows once, into its
// request, in the file's dtype. bf16 hidden states from a .safetensors file holding two tensors,
// .npy labels, 5 micro-batches: over 1, 2 and 3 streams the output files are the same bytes (a
// server that computes each micro-batch alone), and they agree with one request. The server
// takes requests of at most 6000 bytes: the bf16 job (4608 bytes of hidden states) fits in one,
// as fp32 (9216) would not, so bf16 stays bf16 on the wire.
TEST(CliMappedInputTest, Bf16MicroBatchesOverParallelStreamsAreOneStreams) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--max_batch_tokens=1", "--max_message_bytes=6000"});
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string dir = std::getenv("TEST_TMPDIR");
  v1::Tensor hidden;
  hidden.set_dtype(v1::DATA_TYPE_BF16);
  for (int64_t dim : {9, 4, 64}) hidden.add_shape(dim);
  std::string* data = hidden.mutable_data();
  for (int i = 0; i < 9 * 4 * 64; ++i) {
    const float value = static_cast<float>((i * 37) % 29) / 8.0f - 1.75f;
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    const uint16_t bf16 = static_cast<uint16_t>(bits >> 16);  // exact: few mantissa bits
    data->append(reinterpret_cast<const char*>(&bf16), 2);
  }
  v1::Tensor other;
  other.set_dtype(v1::DATA_TYPE_FP32);
  other.add_shape(3);
  other.set_data(std::string(12, '\x01'));
  ASSERT_TRUE(
      WriteSafetensorsFile(dir + "/bf16.safetensors", {{"hidden", hidden}, {"other", other}}).ok());
  std::string labels(9 * 4 * 8, '\0');
  for (int i = 0; i < 36; ++i) {
    const int64_t id = i % 7 == 3 ? -100 : (i * 53) % 1000;
    std::memcpy(&labels[i * 8], &id, 8);
  }
  WriteNpy(dir + "/labels36.npy", "<i8", "(9, 4)", labels);

  for (const std::string reduction : {"none", "mean"}) {
    SCOPED_TRACE(reduction);
    const auto run = [&](const std::string& chunking) {
      const std::string output = dir + "/mapped.safetensors";
      Result result = RunCli(absl::StrCat(
          "forward --address ", (*server)->address(), " --hidden ", dir,
          "/bf16.safetensors --hidden_name hidden --labels ", dir, "/labels36.npy --output ",
          output, " --loss_reduction ", reduction,
          " --z_loss_multiplier 1e-3 --return_argmax true --logits_dtype fp32 ", chunking));
      EXPECT_EQ(result.exit_code, 0) << chunking << ": " << result.out;
      if (absl::StrContains(chunking, "0.001")) {
        EXPECT_NE(result.out.find("5/5 micro-batches"), std::string::npos) << result.out;
      }
      return ReadOutput(output);
    };
    const std::string one_stream = run("--chunk_mib 0.001");
    for (const std::string streams : {"2", "3"}) {
      EXPECT_EQ(run("--chunk_mib 0.001 --parallel_streams " + streams), one_stream) << streams;
    }
    const std::string one_request = run("--chunk_mib 0");
    absl::StatusOr<std::map<std::string, v1::Tensor>> streamed =
        ParseSafetensorsTensors(one_stream);
    absl::StatusOr<std::map<std::string, v1::Tensor>> whole = ParseSafetensorsTensors(one_request);
    ASSERT_TRUE(streamed.ok()) << streamed.status();
    ASSERT_TRUE(whole.ok()) << whole.status();
    ASSERT_EQ(streamed->size(), 5u);
    for (const auto& [name, tensor] : *whole) {
      SCOPED_TRACE(name);
      ASSERT_EQ(streamed->count(name), 1u);
      const v1::Tensor& got = streamed->at(name);
      EXPECT_EQ(got.dtype(), tensor.dtype());
      EXPECT_EQ(got.shape().size(), tensor.shape().size());
      ASSERT_EQ(got.data().size(), tensor.data().size());
      if (name == "argmax") {
        EXPECT_EQ(got.data(), tensor.data());
        continue;
      }
      for (size_t i = 0; i < tensor.data().size() / 4; ++i) {
        float a, b;
        std::memcpy(&a, got.data().data() + 4 * i, 4);
        std::memcpy(&b, tensor.data().data() + 4 * i, 4);
        ASSERT_NEAR(a, b, 1e-5f * (1 + std::fabs(b))) << i;
      }
    }
  }
  // The same job as fp32 does not fit the server's limit in one request.
  std::string fp32(9 * 4 * 64 * 4, '\0');
  WriteNpy(dir + "/fp32.npy", "<f4", "(9, 4, 64)", fp32);
  Result too_big =
      RunCli(absl::StrCat("forward --address ", (*server)->address(), " --hidden ", dir,
                          "/fp32.npy --output ", dir, "/too_big.safetensors --chunk_mib 0"));
  EXPECT_EQ(too_big.exit_code, 1) << too_big.out;
  EXPECT_NE(too_big.out.find("RESOURCE_EXHAUSTED"), std::string::npos) << too_big.out;
  EXPECT_EQ((*server)->Stop(), 0);
}

}  // namespace
}  // namespace lmhead

// End-to-end tests of the `lmhead` command-line client against the real server.
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
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

  for (const std::string micro_batching :
       {"", " --micro_batch_mib 0.0008", " --micro_batch_mib 0.0008 --parallel_streams 2"}) {
    SCOPED_TRACE(micro_batching);
    const std::string output = dir + "/out.safetensors";
    Result run =
        RunCli(absl::StrCat("forward ", Address(), " --hidden ", dir, "/hidden.npy --labels ", dir,
                            "/labels.npy --output ", output,
                            " --z_loss_multiplier 1e-4 --logits_dtype bf16", micro_batching));
    ASSERT_EQ(run.exit_code, 0) << run.out;
    EXPECT_NE(run.out.find("5 scored tokens"), std::string::npos) << run.out;
    if (!micro_batching.empty()) {
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

// --chunk_mib, --micro_batch_mib's old name, works for one more release: the same job, with a
// one-line deprecation message; both names with different values are a usage error.
TEST_F(CliTest, TheOldChunkMibFlagStillWorks) {
  const std::string dir = std::getenv("TEST_TMPDIR");
  WriteNpy(dir + "/old_flag.npy", "<f4", "(2, 3, 64)", std::string(2 * 3 * 64 * 4, '\0'));
  const std::string forward = absl::StrCat("forward ", Address(), " --hidden ", dir,
                                           "/old_flag.npy --output ", dir, "/old_flag.safetensors");
  const std::string deprecated =
      "lmhead forward: --chunk_mib is deprecated, use --micro_batch_mib (the old name goes in "
      "the next release)\n";
  for (const std::string flags :
       {" --chunk_mib 0.0008", " --chunk_mib=0.0008 --micro_batch_mib 0.0008"}) {
    Result old = RunCli(forward + flags);
    EXPECT_EQ(old.exit_code, 0) << flags << ": " << old.out;
    EXPECT_NE(old.out.find("2/2 micro-batches"), std::string::npos) << flags << ": " << old.out;
    EXPECT_NE(old.out.find(deprecated), std::string::npos) << flags << ": " << old.out;
  }
  Result now = RunCli(forward + " --micro_batch_mib 0.0008");
  EXPECT_EQ(now.exit_code, 0) << now.out;
  EXPECT_EQ(now.out.find("deprecated"), std::string::npos) << now.out;

  Result both = RunCli(forward + " --micro_batch_mib 0.0008 --chunk_mib 1");
  EXPECT_EQ(both.exit_code, 2) << both.out;
  EXPECT_NE(both.out.find("lmhead forward: --chunk_mib 1 and --micro_batch_mib 0.0008 disagree; "
                          "give --micro_batch_mib alone\n"),
            std::string::npos)
      << both.out;

  const std::string help = RunCli("forward --help").out;
  EXPECT_NE(help.find("--micro_batch_mib MIB"), std::string::npos) << help;
  EXPECT_NE(help.find("--chunk_mib MIB                deprecated: use --micro_batch_mib\n"),
            std::string::npos)
      << help;
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
  Result streams_without_micro_batches = RunCli(
      "forward --address x --hidden h.npy --output o.safetensors --micro_batch_mib 0 "
      "--parallel_streams 2");
  EXPECT_EQ(streams_without_micro_batches.exit_code, 2) << streams_without_micro_batches.out;
  EXPECT_NE(
      streams_without_micro_batches.out.find("--parallel_streams: needs --micro_batch_mib > 0"),
      std::string::npos)
      << streams_without_micro_batches.out;

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
  EXPECT_NE(missing.out.find("--hidden: cannot open"), std::string::npos) << missing.out;
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
// states (2, 5, 16) fp32; the CLI streams when they exceed --micro_batch_mib.
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
  const auto run = [&](const std::string& args, const std::string& micro_batching) {
    const std::string output = dir + "/combined.safetensors";
    Result result =
        RunCli(absl::StrCat("forward --address ", (*server)->address(), " --hidden ", dir,
                            "/h16.npy --output ", output, " ", args, " ", micro_batching));
    EXPECT_EQ(result.exit_code, 0) << result.out;
    return std::pair{ScalarFromOutput(output, "loss"), ScalarFromOutput(output, "ce_loss")};
  };
  // fused_linear, every label ignored, mean: 0.0, as one request and upstream's fused path.
  const std::string all_ignored =
      absl::StrCat("--labels ", dir, "/ignored.npy --loss_implementation fused_linear");
  for (const std::string micro_batching : {"--micro_batch_mib 0", "--micro_batch_mib 0.0001"}) {
    const auto [loss, ce_loss] = run(all_ignored, micro_batching);
    EXPECT_EQ(loss, 0.0f) << micro_batching;
    EXPECT_EQ(ce_loss, 0.0f) << micro_batching;
  }
  // sum over scored tokens divided by 0: +inf, as one request and torch.
  const std::string divided_by_zero =
      absl::StrCat("--labels ", dir, "/scored.npy --loss_reduction sum --loss_div_factor 0");
  for (const std::string micro_batching : {"--micro_batch_mib 0", "--micro_batch_mib 0.0005"}) {
    const auto [loss, ce_loss] = run(divided_by_zero, micro_batching);
    EXPECT_TRUE(std::isinf(loss) && loss > 0) << micro_batching << ": " << loss;
    EXPECT_TRUE(std::isinf(ce_loss) && ce_loss > 0) << micro_batching << ": " << ce_loss;
  }
  // A finite job: the streamed mean equals one request's up to summation order.
  const std::string finite = absl::StrCat("--labels ", dir, "/scored.npy --z_loss_multiplier 1e-3");
  const auto [one_loss, one_ce] = run(finite, "--micro_batch_mib 0");
  const auto [streamed_loss, streamed_ce] = run(finite, "--micro_batch_mib 0.0001");
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
    const auto run = [&](const std::string& micro_batching) {
      const std::string output = dir + "/mapped.safetensors";
      Result result = RunCli(absl::StrCat(
          "forward --address ", (*server)->address(), " --hidden ", dir,
          "/bf16.safetensors --hidden_name hidden --labels ", dir, "/labels36.npy --output ",
          output, " --loss_reduction ", reduction,
          " --z_loss_multiplier 1e-3 --return_argmax true --logits_dtype fp32 ", micro_batching));
      EXPECT_EQ(result.exit_code, 0) << micro_batching << ": " << result.out;
      if (absl::StrContains(micro_batching, "0.001")) {
        EXPECT_NE(result.out.find("5/5 micro-batches"), std::string::npos) << result.out;
      }
      return ReadOutput(output);
    };
    const std::string one_stream = run("--micro_batch_mib 0.001");
    for (const std::string streams : {"2", "3"}) {
      EXPECT_EQ(run("--micro_batch_mib 0.001 --parallel_streams " + streams), one_stream)
          << streams;
    }
    const std::string one_request = run("--micro_batch_mib 0");
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
                          "/fp32.npy --output ", dir, "/too_big.safetensors --micro_batch_mib 0"));
  EXPECT_EQ(too_big.exit_code, 1) << too_big.out;
  EXPECT_NE(too_big.out.find("RESOURCE_EXHAUSTED"), std::string::npos) << too_big.out;
  EXPECT_EQ((*server)->Stop(), 0);
}

// --- Issue 14: the scoring outputs, written by the CLI. ---

// The tensors of a .safetensors file the CLI wrote.
std::map<std::string, v1::Tensor> ReadOutputs(const std::string& path) {
  absl::StatusOr<std::map<std::string, v1::Tensor>> tensors =
      ParseSafetensorsTensors(ReadOutput(path));
  EXPECT_TRUE(tensors.ok()) << path << ": " << tensors.status();
  return tensors.ok() ? *std::move(tensors) : std::map<std::string, v1::Tensor>{};
}

// `tensor`'s elements as doubles (FP32, INT64 or BOOL).
std::vector<double> Values(const v1::Tensor& tensor) {
  std::vector<double> out;
  const std::string& data = tensor.data();
  if (tensor.dtype() == v1::DATA_TYPE_FP32) {
    for (size_t i = 0; i + 4 <= data.size(); i += 4) {
      float value;
      std::memcpy(&value, data.data() + i, 4);
      out.push_back(value);
    }
  } else if (tensor.dtype() == v1::DATA_TYPE_INT64) {
    for (size_t i = 0; i + 8 <= data.size(); i += 8) {
      int64_t value;
      std::memcpy(&value, data.data() + i, 8);
      out.push_back(static_cast<double>(value));
    }
  } else if (tensor.dtype() == v1::DATA_TYPE_BOOL) {
    for (char byte : data) out.push_back(byte);
  } else {
    ADD_FAILURE() << "unexpected dtype " << tensor.dtype();
  }
  return out;
}

std::vector<int64_t> Shape(const v1::Tensor& tensor) {
  return std::vector<int64_t>(tensor.shape().begin(), tensor.shape().end());
}

// An expected output: dtype, shape and values.
struct Expected {
  v1::DataType dtype;
  std::vector<int64_t> shape;
  std::vector<double> values;
};

// `got` equals `want`: the same dtype and shape, integers and booleans exactly, floats within
// `tolerance` * (1 + |want|).
void ExpectOutput(const std::map<std::string, v1::Tensor>& outputs, const std::string& name,
                  const Expected& want, double tolerance) {
  SCOPED_TRACE(name);
  ASSERT_EQ(outputs.count(name), 1u);
  const v1::Tensor& got = outputs.at(name);
  EXPECT_EQ(got.dtype(), want.dtype);
  ASSERT_EQ(Shape(got), want.shape);
  const std::vector<double> values = Values(got);
  ASSERT_EQ(values.size(), want.values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    if (want.dtype == v1::DATA_TYPE_FP32) {
      ASSERT_NEAR(values[i], want.values[i], tolerance * (1 + std::fabs(want.values[i])))
          << "element " << i;
    } else {
      ASSERT_EQ(values[i], want.values[i]) << "element " << i;
    }
  }
}

// The scoring outputs computed here, in double, from logits (B, S', V) in FP32 and the kept
// positions' labels and segment ids (B, S'); ties to the lower id.
std::map<std::string, Expected> ScoringReference(const v1::Tensor& logits,
                                                 const std::vector<int64_t>& labels,
                                                 const std::vector<int64_t>& segments, int top_k,
                                                 const std::vector<int64_t>& candidates,
                                                 int64_t candidates_per_position) {
  const int64_t batch = logits.shape(0), kept = logits.shape(1), vocab = logits.shape(2);
  const std::vector<double> all = Values(logits);
  const int64_t groups =
      1 + std::max<int64_t>(*std::max_element(segments.begin(), segments.end()), -1);
  const int64_t c = candidates_per_position;
  std::map<std::string, Expected> out = {
      {"label_logprobs", {v1::DATA_TYPE_FP32, {batch, kept}, {}}},
      {"entropy", {v1::DATA_TYPE_FP32, {batch, kept}, {}}},
      {"label_rank", {v1::DATA_TYPE_INT64, {batch, kept}, {}}},
      {"top_k_ids", {v1::DATA_TYPE_INT64, {batch, kept, top_k}, {}}},
      {"top_k_logprobs", {v1::DATA_TYPE_FP32, {batch, kept, top_k}, {}}},
      {"candidate_logprobs", {v1::DATA_TYPE_FP32, {batch, kept, c}, {}}},
      {"segment_logprob_sums", {v1::DATA_TYPE_FP32, {batch, groups}, {}}},
      {"segment_token_counts", {v1::DATA_TYPE_INT64, {batch, groups}, {}}},
      {"segment_is_greedy", {v1::DATA_TYPE_BOOL, {batch, groups}, {}}},
      {"segment_entropy_sums", {v1::DATA_TYPE_FP32, {batch, groups}, {}}},
  };
  out["segment_logprob_sums"].values.assign(batch * groups, 0);
  out["segment_token_counts"].values.assign(batch * groups, 0);
  out["segment_is_greedy"].values.assign(batch * groups, 1);
  out["segment_entropy_sums"].values.assign(batch * groups, 0);
  for (int64_t n = 0; n < batch * kept; ++n) {
    const double* row = all.data() + n * vocab;
    const double max = *std::max_element(row, row + vocab);
    double sum = 0;
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(row[v] - max);
    const double lse = max + std::log(sum);
    double entropy = 0;
    for (int64_t v = 0; v < vocab; ++v) entropy -= std::exp(row[v] - lse) * (row[v] - lse);
    std::vector<int64_t> order(vocab);
    for (int64_t v = 0; v < vocab; ++v) order[v] = v;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return row[a] > row[b]; });
    const int64_t label = labels[n];
    const bool scored = label != -100;
    int64_t rank = 0;
    if (scored) {
      rank = 1;
      for (int64_t v = 0; v < vocab; ++v) rank += row[v] > row[label];
    }
    out["label_logprobs"].values.push_back(scored ? row[label] - lse : 0);
    out["entropy"].values.push_back(entropy);
    out["label_rank"].values.push_back(rank);
    for (int k = 0; k < top_k; ++k) {
      out["top_k_ids"].values.push_back(order[k]);
      out["top_k_logprobs"].values.push_back(row[order[k]] - lse);
    }
    for (int64_t j = 0; j < c; ++j) {
      const int64_t id =
          candidates.size() == static_cast<size_t>(c) ? candidates[j] : candidates[n * c + j];
      out["candidate_logprobs"].values.push_back(row[id] - lse);
    }
    if (scored && segments[n] >= 0) {
      const int64_t at = n / kept * groups + segments[n];
      out["segment_logprob_sums"].values[at] += row[label] - lse;
      out["segment_token_counts"].values[at] += 1;
      if (order[0] != label) out["segment_is_greedy"].values[at] = 0;
      out["segment_entropy_sums"].values[at] += entropy;
    }
  }
  return out;
}

// A demo head with d_model 16 and 50 tokens; hidden states (4, 6, 16) in FP32 with two positions
// all zero (every logit 0: ties everywhere), labels with ignored positions, continuations of
// which row 1 skips id 1, row 2 has none and row 3 one.
class CliScoringTest : public ::testing::Test {
 protected:
  static constexpr int64_t kBatch = 4, kSeqLen = 6, kDModel = 16, kVocab = 50;

  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server =
        ServerProcess::Start({"--demo_d_model=16", "--demo_vocab_size=50"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    const std::string dir = std::getenv("TEST_TMPDIR");
    std::string hidden(kBatch * kSeqLen * kDModel * 4, '\0');
    for (int64_t i = 0; i < kBatch * kSeqLen * kDModel; ++i) {
      const int64_t position = i / kDModel;
      if (position == 1 * kSeqLen + 2 || position == 2 * kSeqLen + 3) continue;  // zeros
      const float value = static_cast<float>((i * 7) % 23) / 8.0f - 1.375f;
      std::memcpy(&hidden[i * 4], &value, 4);
    }
    WriteNpy(dir + "/score_hidden.npy", "<f4", "(4, 6, 16)", hidden);
    labels_.resize(kBatch * kSeqLen);
    for (int64_t i = 0; i < kBatch * kSeqLen; ++i) labels_[i] = i % 5 == 4 ? -100 : (i * 13) % 50;
    labels_[1 * kSeqLen + 2] = 5;         // a tie it does not win: not greedy, rank 1
    labels_[2 * kSeqLen + 3] = 0;         // a tie it wins (the lowest id)
    segments_ = {-1, 0,  0,  1,  1,  1,   //
                 -1, -1, 0,  0,  2,  2,   // id 1 absent: count 0, greedy
                 -1, -1, -1, -1, -1, -1,  // none
                 0,  0,  0,  0,  0,  0};
    WriteNpy(dir + "/score_labels.npy", "<i8", "(4, 6)", Bytes(labels_));
    // Segment ids in a .safetensors file beside another tensor: read by name.
    ASSERT_TRUE(WriteSafetensorsFile(dir + "/score_segments.safetensors",
                                     {{"segment_ids", Int64Tensor({kBatch, kSeqLen}, segments_)},
                                      {"other", Int64Tensor({1}, {0})}})
                    .ok());
    WriteNpy(dir + "/score_candidates.npy", "<i8", "(3,)", Bytes(kCandidates));
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(server_->Stop(), 0);
    delete server_;
  }

  static std::string Bytes(const std::vector<int64_t>& values) {
    return std::string(reinterpret_cast<const char*>(values.data()), values.size() * 8);
  }
  static v1::Tensor Int64Tensor(const std::vector<int64_t>& shape,
                                const std::vector<int64_t>& values) {
    v1::Tensor tensor;
    tensor.set_dtype(v1::DATA_TYPE_INT64);
    for (int64_t dim : shape) tensor.add_shape(dim);
    tensor.set_data(Bytes(values));
    return tensor;
  }
  // The positions `logits_to_keep` keeps of a row (Python slice semantics).
  static std::vector<int64_t> Kept(int64_t logits_to_keep) {
    const int64_t begin = logits_to_keep > 0 ? kSeqLen - logits_to_keep : -logits_to_keep;
    std::vector<int64_t> kept;
    for (int64_t s = begin; s < kSeqLen; ++s) kept.push_back(s);
    return kept;
  }
  // `values` (B, S) at the kept positions, (B, S').
  static std::vector<int64_t> AtKept(const std::vector<int64_t>& values, int64_t logits_to_keep) {
    std::vector<int64_t> out;
    for (int64_t b = 0; b < kBatch; ++b) {
      for (int64_t s : Kept(logits_to_keep)) out.push_back(values[b * kSeqLen + s]);
    }
    return out;
  }
  // Runs forward on the test's inputs with `flags`; the outputs it wrote.
  static std::map<std::string, v1::Tensor> Forward(const std::string& flags,
                                                   std::string* printed = nullptr) {
    const std::string dir = std::getenv("TEST_TMPDIR");
    const std::string output = dir + "/scored.safetensors";
    std::remove(output.c_str());
    Result run = RunCli(absl::StrCat("forward --address ", server_->address(), " --hidden ", dir,
                                     "/score_hidden.npy --labels ", dir,
                                     "/score_labels.npy --output ", output, " ", flags));
    EXPECT_EQ(run.exit_code, 0) << flags << ": " << run.out;
    if (printed != nullptr) *printed = run.out;
    return ReadOutputs(output);
  }

  static inline const std::vector<int64_t> kCandidates = {0, 7, 49};
  static inline std::vector<int64_t> labels_, segments_;
  static inline ServerProcess* server_ = nullptr;
};

// Every scoring output, asked together, equals what this test computes in double from the
// logits the same server returns (default implementation), for both implementations, both forms
// of candidate ids and logits_to_keep 0, -1 (drop the first) and 3 (the last three).
TEST_F(CliScoringTest, EveryOutputEqualsTheReferenceFromLogits) {
  const std::string dir = std::getenv("TEST_TMPDIR");
  for (const int64_t keep : {0, -1, 3}) {
    const std::map<std::string, v1::Tensor> reference_run = Forward(
        absl::StrCat("--loss_implementation default --return_logits true --logits_to_keep ", keep));
    ASSERT_EQ(reference_run.count("logits"), 1u);
    const v1::Tensor& logits = reference_run.at("logits");
    const int64_t kept = static_cast<int64_t>(Kept(keep).size());
    ASSERT_EQ(Shape(logits), (std::vector<int64_t>{kBatch, kept, kVocab}));
    EXPECT_EQ(reference_run.count("label_logprobs"), 0u);  // none unless asked
    // Per-position candidates (B, S', 2), from a .safetensors file.
    std::vector<int64_t> per_position;
    for (int64_t i = 0; i < kBatch * kept * 2; ++i) per_position.push_back((i * 17 + 3) % kVocab);
    ASSERT_TRUE(WriteSafetensorsFile(dir + "/score_candidates.safetensors",
                                     {{"ids", Int64Tensor({kBatch, kept, 2}, per_position)}})
                    .ok());
    for (const bool shared_candidates : {true, false}) {
      const std::map<std::string, Expected> want = ScoringReference(
          logits, AtKept(labels_, keep), AtKept(segments_, keep), /*top_k=*/5,
          shared_candidates ? kCandidates : per_position, shared_candidates ? 3 : 2);
      for (const std::string implementation : {"default", "fused_linear"}) {
        SCOPED_TRACE(absl::StrCat("logits_to_keep ", keep, ", ", implementation,
                                  shared_candidates ? ", (C,) candidates" : ", (B, S', C)"));
        const std::string candidates =
            shared_candidates
                ? absl::StrCat("--candidate_ids ", dir, "/score_candidates.npy")
                : absl::StrCat("--candidate_ids ", dir,
                               "/score_candidates.safetensors --candidate_ids_name ids");
        const std::map<std::string, v1::Tensor> got = Forward(absl::StrCat(
            "--loss_implementation ", implementation, " --logits_to_keep ", keep,
            " --label_logprobs --entropy --label_rank --top_k 5 ", candidates, " --segment_ids ",
            dir, "/score_segments.safetensors --segment_ids_name segment_ids"));
        for (const auto& [name, expected] : want) ExpectOutput(got, name, expected, 2e-5);
      }
    }
  }
}

// A streamed job (one row per micro-batch, over 2 streams) writes what one request writes: the
// per-position outputs concatenated, the segment outputs of rows that saw 2, 3, 0 and 1
// continuations widened to the job's 3, and (B, S', C) candidates split with the rows.
TEST_F(CliScoringTest, StreamedJobWritesWhatOneRequestWrites) {
  const std::string dir = std::getenv("TEST_TMPDIR");
  std::vector<int64_t> per_position;
  for (int64_t i = 0; i < kBatch * kSeqLen * 4; ++i) per_position.push_back((i * 29 + 1) % kVocab);
  ASSERT_TRUE(WriteSafetensorsFile(dir + "/score_candidates_all.safetensors",
                                   {{"ids", Int64Tensor({kBatch, kSeqLen, 4}, per_position)}})
                  .ok());
  for (const std::string implementation : {"default", "fused_linear"}) {
    SCOPED_TRACE(implementation);
    const std::string flags =
        absl::StrCat("--loss_implementation ", implementation,
                     " --loss_reduction none --label_logprobs --entropy --label_rank --top_k 4 "
                     "--candidate_ids ",
                     dir, "/score_candidates_all.safetensors --segment_ids ", dir,
                     "/score_segments.safetensors --segment_ids_name segment_ids");
    const std::map<std::string, v1::Tensor> one = Forward(flags + " --micro_batch_mib 0");
    std::string printed;
    const std::map<std::string, v1::Tensor> streamed =
        Forward(flags + " --micro_batch_mib 0.0004 --parallel_streams 2", &printed);
    EXPECT_NE(printed.find("4/4 micro-batches"), std::string::npos) << printed;
    ASSERT_EQ(one.size(), streamed.size());
    ASSERT_EQ(one.count("segment_is_greedy"), 1u);
    EXPECT_EQ(Shape(one.at("segment_is_greedy")), (std::vector<int64_t>{kBatch, 3}));
    for (const auto& [name, tensor] : one) {
      ExpectOutput(streamed, name, {tensor.dtype(), Shape(tensor), Values(tensor)}, 1e-5);
    }
  }
}

TEST_F(CliScoringTest, UsageAndServerErrors) {
  const std::string dir = std::getenv("TEST_TMPDIR");
  const std::string base = absl::StrCat("forward --address ", server_->address(), " --hidden ", dir,
                                        "/score_hidden.npy --output ", dir, "/o.safetensors");
  const std::string labels = absl::StrCat(" --labels ", dir, "/score_labels.npy");
  const std::string segments = absl::StrCat(" --segment_ids ", dir,
                                            "/score_segments.safetensors --segment_ids_name "
                                            "segment_ids");
  const std::vector<std::pair<std::string, std::string>> usage = {
      {" --label_logprobs", "lmhead forward: --label_logprobs: needs --labels"},
      {" --label_rank --entropy", "lmhead forward: --label_rank: needs --labels"},
      {segments, "lmhead forward: --segment_ids: needs --labels"},
      {labels + " --top_k 65", "lmhead forward: --top_k: expected an integer from 0 to 64"},
      {" --top_k -1", "--top_k: expected an integer from 0 to 64"},
      {" --top_k many", "--top_k: expected an integer from 0 to 64"},
      {" --candidate_ids_name ids", "--candidate_ids_name: needs --candidate_ids"},
      {labels + " --segment_ids_name segment_ids", "--segment_ids_name: needs --segment_ids"},
      {" --entropy=maybe", "--entropy: a switch"},
  };
  for (const auto& [flags, message] : usage) {
    Result run = RunCli(base + flags);
    EXPECT_EQ(run.exit_code, 2) << flags << ": " << run.out;
    EXPECT_NE(run.out.find(message), std::string::npos) << flags << ": " << run.out;
  }
  EXPECT_EQ(RunCli(base + " --entropy=false").exit_code, 0);

  // What only the server (or the file) can tell: exit 1 with the status.
  WriteNpy(dir + "/bad_candidates.npy", "<i8", "(1,)", Bytes({kVocab}));
  ASSERT_TRUE(WriteSafetensorsFile(dir + "/short_segments.safetensors",
                                   {{"s", Int64Tensor({2, kSeqLen}, std::vector<int64_t>(12, 0))}})
                  .ok());
  const std::vector<std::pair<std::string, std::string>> refused = {
      {" --top_k 64", "INVALID_ARGUMENT: options.scoring.top_k"},
      {absl::StrCat(" --candidate_ids ", dir, "/bad_candidates.npy"),
       "INVALID_ARGUMENT: options.scoring.candidate_ids"},
      {absl::StrCat(labels, " --segment_ids ", dir, "/short_segments.safetensors"),
       "INVALID_ARGUMENT: options.scoring.segment_ids"},
      // Row 1 has continuation 2, and two kept positions leave room for ids 0 and 1 only.
      {labels + segments + " --logits_to_keep 2",
       "INVALID_ARGUMENT: options.scoring.segment_ids: kept positions' ids must lie in [-1, 2), "
       "got 2"},
      // Streamed, the client splits the ids with the rows, so it needs the job's batch.
      {absl::StrCat(labels, " --micro_batch_mib 0.0004 --segment_ids ", dir,
                    "/short_segments.safetensors"),
       "INVALID_ARGUMENT: segment_ids: expected (batch, seq_len) like labels, split with the "
       "batch (4 rows); got shape [2, 6]"},
      {absl::StrCat(" --candidate_ids ", dir, "/missing.npy"), "--candidate_ids: cannot open"},
  };
  for (const auto& [flags, message] : refused) {
    Result run = RunCli(base + flags);
    EXPECT_EQ(run.exit_code, 1) << flags << ": " << run.out;
    EXPECT_NE(run.out.find(message), std::string::npos) << flags << ": " << run.out;
  }
}

}  // namespace
}  // namespace lmhead

namespace lmhead {
namespace {

// The CLI's token: --auth_token_file's first line, else $LMHEAD_AUTH_TOKEN.
TEST(CliAuthTest, TokenFromAFileOrTheEnvironment) {
  const std::string dir = std::getenv("TEST_TMPDIR");
  std::ofstream(dir + "/server-tokens") << "cli-token-0123456789abcdef\n";
  std::ofstream(dir + "/client-token") << "\ncli-token-0123456789abcdef\n";
  std::ofstream(dir + "/empty-token") << "\n";
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--auth_token_file=" + dir + "/server-tokens"});
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string models = "models --address " + (*server)->address();
  Result refused = RunCli(models);
  EXPECT_EQ(refused.exit_code, 1) << refused.out;
  EXPECT_NE(refused.out.find("UNAUTHENTICATED"), std::string::npos) << refused.out;
  Result from_file = RunCli(absl::StrCat(models, " --auth_token_file ", dir, "/client-token"));
  EXPECT_EQ(from_file.exit_code, 0) << from_file.out;
  EXPECT_NE(from_file.out.find("demo"), std::string::npos) << from_file.out;
  Result empty = RunCli(absl::StrCat(models, " --auth_token_file ", dir, "/empty-token"));
  EXPECT_EQ(empty.exit_code, 2) << empty.out;
  EXPECT_NE(empty.out.find("--auth_token_file: the file has no token"), std::string::npos)
      << empty.out;
  ASSERT_EQ(setenv("LMHEAD_AUTH_TOKEN", "cli-token-0123456789abcdef", 1), 0);
  Result from_environment = RunCli(models);
  ASSERT_EQ(unsetenv("LMHEAD_AUTH_TOKEN"), 0);
  EXPECT_EQ(from_environment.exit_code, 0) << from_environment.out;
  // Health needs no token.
  EXPECT_EQ(RunCli("health --address " + (*server)->address()).exit_code, 0);
  EXPECT_EQ((*server)->Stop(), 0);
}

// --- Issue 15, item 8: replicas. ---

// Micro-batches `server` has answered, and those of its streams that ended: its log (at
// --log_level=debug) has a line per micro-batch answered and one per stream that ended.
std::pair<int, int> MicroBatchesInLog(const ServerProcess& server) {
  static const std::regex kAnswered(R"( micro-batch \d+ total_us=)");
  static const std::regex kEnded(R"( ForwardStream (\d+) micro-batch)");
  std::istringstream log(server.Log());
  std::pair<int, int> counts{0, 0};
  std::smatch match;
  for (std::string line; std::getline(log, line);) {
    if (std::regex_search(line, kAnswered)) ++counts.first;
    if (std::regex_search(line, match, kEnded)) counts.second += std::stoi(match[1]);
  }
  return counts;
}

// The same outputs, within `tolerance` relative to max(1, |value|).
void ExpectSameOutputs(const std::map<std::string, v1::Tensor>& got,
                       const std::map<std::string, v1::Tensor>& want, double tolerance) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, tensor] : want) {
    ASSERT_EQ(got.count(name), 1u) << name;
    EXPECT_EQ(got.at(name).shape().size(), tensor.shape().size()) << name;
    const std::vector<double> a = Values(got.at(name)), b = Values(tensor);
    ASSERT_EQ(a.size(), b.size()) << name;
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_NEAR(a[i], b[i], tolerance * std::max(1.0, std::abs(b[i]))) << name << "[" << i << "]";
    }
  }
}

// Three replicas of the same demo head given to the CLI as one --address list: when the replica
// answering one of a streamed job's streams is killed (SIGKILL) mid-stream, the stream goes on on
// another replica from its first unanswered micro-batch, and the job writes what one server
// alone writes. Then, with that replica gone, one-request jobs through the list all succeed.
TEST(CliReplicasTest, JobSurvivesAReplicaKilledMidStream) {
  const std::string dir = std::getenv("TEST_TMPDIR");
  // Each micro-batch waits up to 20 ms for company in its server's queue: the streams last.
  std::vector<std::unique_ptr<ServerProcess>> servers;
  std::vector<std::string> addresses;
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server =
        ServerProcess::Start({"--log_level=debug", "--max_queue_delay_us=20000"});
    ASSERT_TRUE(server.ok()) << server.status();
    addresses.push_back((*server)->address());
    servers.push_back(*std::move(server));
  }
  constexpr int kRows = 48, kSeqLen = 4, kDModel = 64;
  std::string hidden(kRows * kSeqLen * kDModel * 4, '\0');
  for (size_t i = 0; i < hidden.size() / 4; ++i) {
    const float value = static_cast<float>((i * 7919) % 23) / 11.0f - 1.0f;
    std::memcpy(&hidden[i * 4], &value, 4);
  }
  WriteNpy(dir + "/replica_hidden.npy", "<f4", "(48, 4, 64)", hidden);
  std::string labels(kRows * kSeqLen * 8, '\0');
  for (int i = 0; i < kRows * kSeqLen; ++i) {
    const int64_t id = (i * 37) % 1000;
    std::memcpy(&labels[i * 8], &id, 8);
  }
  WriteNpy(dir + "/replica_labels.npy", "<i8", "(48, 4)", labels);
  // One row (1 KiB) per micro-batch, 16 per stream.
  const std::string job = absl::StrCat(" --hidden ", dir, "/replica_hidden.npy --labels ", dir,
                                       "/replica_labels.npy --return_logits true --timeout 120");
  const std::string streamed = job + " --micro_batch_mib 0.001 --parallel_streams 3";

  Result alone = RunCli(absl::StrCat("forward --address ", addresses[0], streamed, " --output ",
                                     dir, "/replica_alone.safetensors"));
  ASSERT_EQ(alone.exit_code, 0) << alone.out;
  const std::map<std::string, v1::Tensor> want = ReadOutputs(dir + "/replica_alone.safetensors");
  std::vector<std::pair<int, int>> before;  // (answered, ended) before the job
  for (const auto& server : servers) before.push_back(MicroBatchesInLog(*server));

  const std::string list = absl::StrJoin(addresses, ",");
  Result replicated;
  std::thread job_thread([&]() {
    replicated = RunCli(absl::StrCat("forward --address ", list, streamed, " --output ", dir,
                                     "/replica_streamed.safetensors"));
  });
  // The first replica seen two answers into the job is killed.
  int victim = -1;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (victim < 0 && absl::Now() < deadline) {
    for (int s = 0; s < 3 && victim < 0; ++s) {
      if (MicroBatchesInLog(*servers[s]).first - before[s].first >= 2) victim = s;
    }
    absl::SleepFor(absl::Milliseconds(2));
  }
  if (victim >= 0) kill(servers[victim]->pid(), SIGKILL);
  job_thread.join();
  ASSERT_GE(victim, 0) << "no replica answered the job";
  ASSERT_EQ(replicated.exit_code, 0) << replicated.out;
  EXPECT_NE(replicated.out.find("48/48 micro-batches"), std::string::npos) << replicated.out;
  ExpectSameOutputs(ReadOutputs(dir + "/replica_streamed.safetensors"), want, 1e-5);
  // The victim answered micro-batches of a stream it never ended (it was cut), and every
  // micro-batch of the job was answered by someone.
  EXPECT_EQ(servers[victim]->Stop(), 128 + SIGKILL);
  const auto [answered_by_victim, ended_by_victim] = MicroBatchesInLog(*servers[victim]);
  EXPECT_GT(answered_by_victim - before[victim].first, ended_by_victim - before[victim].second)
      << servers[victim]->Log();
  int answered = 0;
  for (int s = 0; s < 3; ++s) answered += MicroBatchesInLog(*servers[s]).first - before[s].first;
  EXPECT_GE(answered, kRows);

  // One request per job, three addresses of which one is gone: every job is answered.
  for (int i = 0; i < 6; ++i) {
    SCOPED_TRACE(i);
    Result one =
        RunCli(absl::StrCat("forward --address ", list, job, " --micro_batch_mib 0 --output ", dir,
                            "/replica_one.safetensors"));
    ASSERT_EQ(one.exit_code, 0) << one.out;
    ExpectSameOutputs(ReadOutputs(dir + "/replica_one.safetensors"), want, 1e-5);
  }
  for (int s = 0; s < 3; ++s) {
    if (s != victim) {
      EXPECT_EQ(servers[s]->Stop(), 0) << servers[s]->Log();
    }
  }
}

TEST(CliReplicasTest, AddressListsAreChecked) {
  Result names = RunCli("models --address localhost:1,localhost:2");
  EXPECT_EQ(names.exit_code, 2) << names.out;
  EXPECT_NE(names.out.find("--address: 'localhost:1' in a list of several addresses must be "
                           "IP:PORT"),
            std::string::npos)
      << names.out;
  Result mixed = RunCli("health --address 127.0.0.1:1,[::1]:2");
  EXPECT_EQ(mixed.exit_code, 2) << mixed.out;
  EXPECT_NE(mixed.out.find("mixes IPv4 and IPv6"), std::string::npos) << mixed.out;
}

}  // namespace
}  // namespace lmhead

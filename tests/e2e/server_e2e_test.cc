// End-to-end tests: the real lmhead_server binary on port 0, the C++ client over loopback.
// Results are compared with the same head built in-process by the core.
#include <grpcpp/create_channel.h>
#include <signal.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/lmhead_client.h"
#include "client/tensor_file.h"
#include "core/config_json.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/e2e/e2e_util.h"
#include "tests/e2e/server_process.h"

namespace lmhead {
namespace {

using ::grpc::health::v1::HealthCheckResponse;

constexpr int64_t kDModel = 64;
constexpr int64_t kVocab = 1000;

// Sets fused_chunk_bytes, logit_tile_bytes' deprecated name (kept for one release), for the
// tests that it still works.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
void SetDeprecatedTileBytes(ForwardArgs* args, int64_t bytes) { args->fused_chunk_bytes = bytes; }
void SetDeprecatedTileBytes(v1::ForwardOptions* options, int64_t bytes) {
  options->set_fused_chunk_bytes(bytes);
}
#pragma GCC diagnostic pop

std::unique_ptr<LMHeadClient> Connect(const ServerProcess& server, ClientOptions options = {}) {
  if (options.timeout.count() == 0) options.timeout = std::chrono::seconds(60);
  return LMHeadClient::Connect(server.address(), options);
}

// Seeded inputs for the demo head.
struct Inputs {
  at::Tensor x;       // (B, S, D) fp32
  at::Tensor labels;  // (B, S) int64, one ignored
};

Inputs MakeInputs(int64_t batch, int64_t length, uint64_t seed = 1, int64_t d_model = kDModel,
                  int64_t vocab = kVocab) {
  at::Generator generator = at::detail::createCPUGenerator(seed);
  Inputs inputs;
  inputs.x = at::randn({batch, length, d_model}, generator);
  inputs.labels = at::randint(vocab, {batch, length}, generator, at::TensorOptions(at::kLong));
  if (batch > 0 && length > 0) inputs.labels.index_put_({0, 0}, -100);
  return inputs;
}

void ExpectClose(const v1::Tensor& wire, const at::Tensor& expected, const std::string& what,
                 double rtol = 1e-5, double atol = 1e-6) {
  ASSERT_EQ(wire.dtype(), DataTypeOf(expected.scalar_type())) << what;
  const at::Tensor got = FromWire(wire);
  ASSERT_EQ(got.sizes(), expected.sizes()) << what;
  EXPECT_TRUE(at::allclose(got.to(at::kDouble), expected.to(at::kDouble), rtol, atol,
                           /*equal_nan=*/true))
      << what << ": max difference "
      << (got.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>();
}

class ServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start({});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    reference_ = DemoReference().release();
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(server_->Stop(), 0) << server_->Log();
    delete server_;
    delete reference_;
  }

  // Asserts that a good request still works (after a bad one).
  void ExpectStillServing() {
    const Inputs inputs = MakeInputs(1, 3);
    ForwardArgs args;
    args.labels = ToWire(inputs.labels);
    absl::StatusOr<v1::ForwardResponse> response =
        Connect(*server_)->Forward(ToWire(inputs.x), args);
    EXPECT_TRUE(response.ok()) << response.status();
  }

  static ServerProcess* server_;
  static LMHead* reference_;
};

ServerProcess* ServerTest::server_ = nullptr;
LMHead* ServerTest::reference_ = nullptr;

TEST_F(ServerTest, HealthServesTheServerAndTheService) {
  auto client = Connect(*server_);
  for (const std::string service : {"", "lmhead.v1.LMHeadService"}) {
    absl::StatusOr<HealthCheckResponse::ServingStatus> status = client->Health(service);
    ASSERT_TRUE(status.ok()) << status.status();
    EXPECT_EQ(*status, HealthCheckResponse::SERVING) << "service '" << service << "'";
  }
  EXPECT_EQ(client->Health("no.such.Service").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ServerTest, ReflectionListsTheServiceAndDescribesIt) {
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext context;
  auto stream = stub->ServerReflectionInfo(&context);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_list_services("");
  ASSERT_TRUE(stream->Write(request));
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  std::vector<std::string> services;
  for (const auto& service : response.list_services_response().service()) {
    services.push_back(service.name());
  }
  EXPECT_NE(std::find(services.begin(), services.end(), "lmhead.v1.LMHeadService"), services.end());
  EXPECT_NE(std::find(services.begin(), services.end(), "grpc.health.v1.Health"), services.end());
  request.set_file_containing_symbol("lmhead.v1.LMHeadService");
  ASSERT_TRUE(stream->Write(request));
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_GT(response.file_descriptor_response().file_descriptor_proto_size(), 0);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ServerTest, ListModelsAndGetModelDescribeTheDemoHead) {
  auto client = Connect(*server_);
  absl::StatusOr<v1::ListModelsResponse> models = client->ListModels();
  ASSERT_TRUE(models.ok()) << models.status();
  ASSERT_EQ(models->models_size(), 1);
  EXPECT_EQ(models->default_model(), "demo");
  const v1::ModelInfo& info = models->models(0);
  EXPECT_EQ(info.name(), "demo");
  EXPECT_EQ(info.version(), "demo-seed0");
  EXPECT_EQ(info.d_model(), kDModel);
  EXPECT_EQ(info.vocab_size(), kVocab);
  EXPECT_EQ(info.dtype(), v1::DATA_TYPE_FP32);
  EXPECT_EQ(info.num_params(), kDModel + kDModel * kVocab);
  EXPECT_EQ(info.device(), "cpu");
  EXPECT_EQ(info.config().layer_norm().name(), v1::LAYER_NORM_TYPE_RMS);
  EXPECT_FALSE(info.config().bias());

  absl::StatusOr<v1::ModelInfo> by_name = client->GetModel("demo");
  ASSERT_TRUE(by_name.ok()) << by_name.status();
  EXPECT_EQ(by_name->SerializeAsString(), info.SerializeAsString());
  absl::StatusOr<v1::ModelInfo> by_default = client->GetModel("");
  ASSERT_TRUE(by_default.ok());
  EXPECT_EQ(by_default->name(), "demo");
  absl::StatusOr<v1::ModelInfo> unknown = client->GetModel("nope");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  // GetModel's field is `name`.
  EXPECT_EQ(unknown.status().message(),
            "name: no model named 'nope' (ListModels lists this server's models)");
}

// One forward scenario: the wire arguments and the same call on the core.
struct Scenario {
  std::string name;
  std::function<void(const Inputs&, ForwardArgs*, ForwardOptions*)> set;
};

std::vector<Scenario> Scenarios() {
  return {
      {"logits only", [](const Inputs&, ForwardArgs*, ForwardOptions* o) { o->labels.reset(); }},
      {"mean", [](const Inputs&, ForwardArgs*, ForwardOptions*) {}},
      {"sum with z-loss",
       [](const Inputs&, ForwardArgs* a, ForwardOptions* o) {
         a->loss_reduction = v1::LOSS_REDUCTION_SUM;
         o->loss_reduction = LossReduction::kSum;
         a->z_loss_multiplier = o->z_loss_multiplier = 1e-3;
       }},
      {"none with ignore_index 7",
       [](const Inputs& in, ForwardArgs* a, ForwardOptions* o) {
         a->loss_reduction = v1::LOSS_REDUCTION_NONE;
         o->loss_reduction = LossReduction::kNone;
         a->ignore_index = o->ignore_index = 7;
         at::Tensor labels = in.labels.clone();
         labels.index_put_({0, 0}, 7);
         a->labels = ToWire(labels);
         o->labels = labels;
       }},
      {"loss_div_factor value",
       [](const Inputs&, ForwardArgs* a, ForwardOptions* o) {
         a->loss_div_factor = 4.0;
         o->loss_div_factor = 4.0;
       }},
      {"loss_div_factor tensor",
       [](const Inputs&, ForwardArgs* a, ForwardOptions* o) {
         const at::Tensor factor = at::full({}, 3.0);
         a->loss_div_factor = ToWire(factor);
         o->loss_div_factor = factor;
       }},
      {"return_logits false",
       [](const Inputs&, ForwardArgs* a, ForwardOptions* o) {
         a->return_logits = o->return_logits = false;
       }},
      {"logits_to_keep 2",
       [](const Inputs&, ForwardArgs* a, ForwardOptions* o) {
         a->logits_to_keep = int64_t{2};
         o->logits_to_keep = int64_t{2};
       }},
      {"logits_to_keep -1",
       [](const Inputs&, ForwardArgs* a, ForwardOptions* o) {
         a->logits_to_keep = int64_t{-1};
         o->logits_to_keep = int64_t{-1};
       }},
      {"logits_to_keep positions",
       [](const Inputs& in, ForwardArgs* a, ForwardOptions* o) {
         const at::Tensor positions = at::tensor({0, 3, 4, 1}, at::kLong)
                                          .view({1, 4})
                                          .expand({in.x.size(0), 4})
                                          .contiguous();
         a->logits_to_keep = ToWire(positions);
         o->logits_to_keep = positions;
       }},
      {"fused_linear with z-loss",
       [](const Inputs&, ForwardArgs* a, ForwardOptions* o) {
         a->loss_implementation = v1::LOSS_IMPLEMENTATION_FUSED_LINEAR;
         o->loss_implementation = LossImplementation::kFusedLinear;
         a->z_loss_multiplier = o->z_loss_multiplier = 1e-4;
         a->logit_tile_bytes = o->logit_tile_bytes = 4096;
       }},
      {"fused_linear, the tile by its deprecated name (options.fused_chunk_bytes)",
       [](const Inputs&, ForwardArgs* a, ForwardOptions* o) {
         a->loss_implementation = v1::LOSS_IMPLEMENTATION_FUSED_LINEAR;
         o->loss_implementation = LossImplementation::kFusedLinear;
         SetDeprecatedTileBytes(a, 4096);
         o->logit_tile_bytes = 4096;
       }},
      {"int32 labels", [](const Inputs& in, ForwardArgs* a,
                          ForwardOptions*) { a->labels = ToWire(in.labels.to(at::kInt)); }},
      {"argmax, default", [](const Inputs&, ForwardArgs* a,
                             ForwardOptions* o) { a->return_argmax = o->return_argmax = true; }},
      {"argmax, fused_linear, last 3",
       [](const Inputs&, ForwardArgs* a, ForwardOptions* o) {
         a->return_argmax = o->return_argmax = true;
         a->loss_implementation = v1::LOSS_IMPLEMENTATION_FUSED_LINEAR;
         o->loss_implementation = LossImplementation::kFusedLinear;
         a->logits_to_keep = int64_t{3};
         o->logits_to_keep = int64_t{3};
       }},
      {"argmax without labels",
       [](const Inputs&, ForwardArgs* a, ForwardOptions* o) {
         a->return_argmax = o->return_argmax = true;
         o->labels.reset();
       }},
  };
}

TEST_F(ServerTest, ForwardMatchesTheCoreForEveryOption) {
  auto client = Connect(*server_);
  const Inputs inputs = MakeInputs(2, 5);
  for (const Scenario& scenario : Scenarios()) {
    SCOPED_TRACE(scenario.name);
    ForwardArgs args;
    args.labels = ToWire(inputs.labels);
    ForwardOptions options;
    options.labels = inputs.labels;
    scenario.set(inputs, &args, &options);
    if (!options.labels.has_value()) args.labels.reset();
    absl::StatusOr<v1::ForwardResponse> response = client->Forward(ToWire(inputs.x), args);
    ASSERT_TRUE(response.ok()) << response.status();
    absl::StatusOr<LMOutput> expected = reference_->Forward(inputs.x, options);
    ASSERT_TRUE(expected.ok()) << expected.status();
    EXPECT_EQ(response->model(), "demo");
    EXPECT_EQ(response->model_version(), "demo-seed0");
    EXPECT_EQ(response->has_logits(), expected->logits.has_value());
    if (expected->logits) ExpectClose(response->logits(), *expected->logits, "logits");
    EXPECT_EQ(response->has_loss(), expected->loss.has_value());
    if (expected->loss) ExpectClose(response->loss(), *expected->loss, "loss");
    if (expected->ce_loss) ExpectClose(response->ce_loss(), *expected->ce_loss, "ce_loss");
    EXPECT_EQ(response->has_z_loss(), expected->z_loss.has_value());
    if (expected->z_loss) ExpectClose(response->z_loss(), *expected->z_loss, "z_loss");
    EXPECT_EQ(response->has_argmax(), expected->argmax.has_value());
    if (expected->argmax) {
      EXPECT_TRUE(at::equal(FromWire(response->argmax()), *expected->argmax)) << "argmax";
    }
    EXPECT_GT(response->timings().total_us(), 0);
    EXPECT_EQ(response->num_nonfinite_inputs(), 0);
  }
}

TEST_F(ServerTest, NumScoredTokensCountsKeptNonIgnoredLabels) {
  const Inputs inputs = MakeInputs(2, 5);  // labels[0][0] is ignored
  ForwardArgs args;
  args.labels = ToWire(inputs.labels);
  absl::StatusOr<v1::ForwardResponse> all = Connect(*server_)->Forward(ToWire(inputs.x), args);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->num_scored_tokens(), 9);
  args.logits_to_keep = int64_t{2};  // positions 3 and 4 only
  absl::StatusOr<v1::ForwardResponse> last = Connect(*server_)->Forward(ToWire(inputs.x), args);
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->num_scored_tokens(), 4);
}

TEST_F(ServerTest, ComputeAndLogitsDtypeOverrides) {
  const Inputs inputs = MakeInputs(2, 4);
  ForwardArgs args;
  args.labels = ToWire(inputs.labels);
  args.compute_dtype = v1::DATA_TYPE_BF16;
  absl::StatusOr<v1::ForwardResponse> bf16 = Connect(*server_)->Forward(ToWire(inputs.x), args);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ(bf16->logits().dtype(), v1::DATA_TYPE_BF16);
  ForwardOptions options;
  options.labels = inputs.labels;
  const LMOutput fp32 = *reference_->Forward(inputs.x, options);
  ExpectClose(bf16->loss(), *fp32.loss, "bf16 loss vs fp32", 2e-2, 2e-2);

  args.compute_dtype = v1::DATA_TYPE_UNSPECIFIED;
  args.logits_dtype = v1::DATA_TYPE_FP16;
  absl::StatusOr<v1::ForwardResponse> fp16 = Connect(*server_)->Forward(ToWire(inputs.x), args);
  ASSERT_TRUE(fp16.ok()) << fp16.status();
  ExpectClose(fp16->logits(), fp32.logits->to(at::kHalf), "fp16 logits");

  // bf16 hidden states are cast to the model's fp32.
  args.logits_dtype = v1::DATA_TYPE_UNSPECIFIED;
  absl::StatusOr<v1::ForwardResponse> cast =
      Connect(*server_)->Forward(ToWire(inputs.x.to(at::kBFloat16)), args);
  ASSERT_TRUE(cast.ok()) << cast.status();
  EXPECT_EQ(cast->logits().dtype(), v1::DATA_TYPE_FP32);
}

TEST_F(ServerTest, NonFiniteInputsPropagateAndAreCounted) {
  Inputs inputs = MakeInputs(1, 4);
  inputs.x.index_put_({0, 1, 3}, std::numeric_limits<float>::quiet_NaN());
  inputs.x.index_put_({0, 2, 0}, std::numeric_limits<float>::infinity());
  ForwardArgs args;
  args.labels = ToWire(inputs.labels);
  absl::StatusOr<v1::ForwardResponse> response = Connect(*server_)->Forward(ToWire(inputs.x), args);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->num_nonfinite_inputs(), 2);
  EXPECT_TRUE(std::isnan(FromWire(response->loss()).item<float>()));
}

TEST_F(ServerTest, ForwardStreamAnswersEachMicroBatchInOrder) {
  auto client = Connect(*server_);
  const std::vector<int64_t> batches = {1, 3, 2, 5};
  std::vector<Inputs> inputs;
  for (size_t i = 0; i < batches.size(); ++i) inputs.push_back(MakeInputs(batches[i], 4, 10 + i));
  size_t sent = 0;
  std::vector<int64_t> answered;
  absl::Status status = client->ForwardStream(
      [&](v1::ForwardRequest* request) {
        if (sent == inputs.size()) return false;
        ForwardArgs args;
        args.labels = ToWire(inputs[sent].labels);
        args.loss_reduction = v1::LOSS_REDUCTION_NONE;
        *request = MakeForwardRequest(ToWire(inputs[sent].x), args);
        ++sent;
        return true;
      },
      [&](int64_t index, const v1::ForwardResponse& response) {
        answered.push_back(response.logits().shape(0));
        ForwardOptions options;
        options.labels = inputs[index].labels;
        options.loss_reduction = LossReduction::kNone;
        const LMOutput expected = *reference_->Forward(inputs[index].x, options);
        ExpectClose(response.loss(), *expected.loss, absl::StrCat("micro-batch ", index));
        return true;
      });
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(answered, batches);
}

// Streams three micro-batches to `address`, sending each only after the previous answer, with
// and without a bad third micro-batch, and checks the answers and the final status.
void ExpectLockStepStreamServed(const std::string& address, const LMHead& reference) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = v1::LMHeadService::NewStub(channel);
  for (const bool end_with_bad_labels : {false, true}) {
    SCOPED_TRACE(end_with_bad_labels ? "the third micro-batch is bad" : "all good");
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto stream = stub->ForwardStream(&context);
    for (int i = 0; i < 3; ++i) {
      Inputs inputs = MakeInputs(2, 5, 40 + i);
      if (end_with_bad_labels && i == 2) inputs.labels.index_put_({1, 1}, kVocab);
      ForwardArgs args;
      args.labels = ToWire(inputs.labels);
      args.loss_reduction = v1::LOSS_REDUCTION_NONE;
      ASSERT_TRUE(stream->Write(MakeForwardRequest(ToWire(inputs.x), args)));
      v1::ForwardResponse response;
      if (end_with_bad_labels && i == 2) {
        EXPECT_FALSE(stream->Read(&response));
        break;
      }
      ASSERT_TRUE(stream->Read(&response)) << "micro-batch " << i;
      ForwardOptions options;
      options.labels = inputs.labels;
      options.loss_reduction = LossReduction::kNone;
      ExpectClose(response.loss(), *reference.Forward(inputs.x, options)->loss,
                  absl::StrCat("micro-batch ", i));
    }
    stream->WritesDone();
    const grpc::Status status = stream->Finish();
    if (end_with_bad_labels) {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
      EXPECT_TRUE(absl::StartsWith(status.error_message(), "labels: ")) << status.error_message();
      EXPECT_TRUE(absl::EndsWith(status.error_message(), "(micro-batch 2)"))
          << status.error_message();
    } else {
      EXPECT_TRUE(status.ok()) << status.error_message();
    }
  }
}

// The server reads the next micro-batch while computing the current one; a client that sends
// each message only after the previous answer must still be served, and still get the error
// that ends its stream. Also with reading ahead switched off.
TEST_F(ServerTest, ForwardStreamServesAClientThatWaitsForEachAnswer) {
  ExpectLockStepStreamServed(server_->address(), *reference_);
  absl::StatusOr<std::unique_ptr<ServerProcess>> one_at_a_time =
      ServerProcess::Start({"--stream_read_ahead=false"});
  ASSERT_TRUE(one_at_a_time.ok()) << one_at_a_time.status();
  {
    SCOPED_TRACE("--stream_read_ahead=false");
    ExpectLockStepStreamServed((*one_at_a_time)->address(), *reference_);
  }
  EXPECT_EQ((*one_at_a_time)->Stop(), 0) << (*one_at_a_time)->Log();
  ExpectStillServing();
}

TEST_F(ServerTest, ForwardMicroBatchedCombinesLikeOneForward) {
  auto client = Connect(*server_);
  const Inputs inputs = MakeInputs(7, 6);
  const int64_t row_bytes = 6 * kDModel * 4;
  for (v1::LossReduction reduction :
       {v1::LOSS_REDUCTION_MEAN, v1::LOSS_REDUCTION_SUM, v1::LOSS_REDUCTION_NONE}) {
    for (v1::LossImplementation implementation :
         {v1::LOSS_IMPLEMENTATION_DEFAULT, v1::LOSS_IMPLEMENTATION_FUSED_LINEAR}) {
      SCOPED_TRACE(absl::StrCat(v1::LossReduction_Name(reduction), " ",
                                v1::LossImplementation_Name(implementation)));
      ForwardArgs args;
      args.labels = ToWire(inputs.labels);
      args.loss_reduction = reduction;
      args.loss_implementation = implementation;
      args.z_loss_multiplier = 1e-3;
      args.loss_div_factor = 2.0;
      absl::StatusOr<v1::ForwardResponse> whole = client->Forward(ToWire(inputs.x), args);
      ASSERT_TRUE(whole.ok()) << whole.status();
      std::vector<int64_t> progress;
      absl::StatusOr<v1::ForwardResponse> micro_batched = client->ForwardMicroBatched(
          ToWire(inputs.x), args, 2 * row_bytes,
          [&](int64_t done, int64_t total) { progress.push_back(done * 100 + total); });
      ASSERT_TRUE(micro_batched.ok()) << micro_batched.status();
      EXPECT_EQ(progress, (std::vector<int64_t>{104, 204, 304, 404}));
      EXPECT_EQ(micro_batched->num_scored_tokens(), whole->num_scored_tokens());
      EXPECT_EQ(micro_batched->has_logits(), whole->has_logits());
      if (whole->has_logits())
        ExpectClose(micro_batched->logits(), FromWire(whole->logits()), "logits");
      for (const auto& [name, got, want] :
           {std::tuple{"loss", &micro_batched->loss(), &whole->loss()},
            std::tuple{"ce_loss", &micro_batched->ce_loss(), &whole->ce_loss()},
            std::tuple{"z_loss", &micro_batched->z_loss(), &whole->z_loss()}}) {
        ExpectClose(*got, FromWire(*want).to(ScalarTypeOf(got->dtype())), name, 1e-4, 1e-5);
      }
    }
  }
}

// parallel_streams spreads a micro_batched job's micro-batches over several streams and
// connections: on a server that computes each micro-batch alone, exactly one stream's answer, for
// every reduction, with positions and a per-row divisor; progress counts every micro-batch; a
// refused micro-batch, first or last, fails the job with its status.
TEST_F(ServerTest, ForwardMicroBatchedOverParallelStreamsIsOneStream) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> unpacked =
      ServerProcess::Start({"--max_batch_tokens=1"});
  ASSERT_TRUE(unpacked.ok()) << unpacked.status();
  auto client = Connect(**unpacked);
  const Inputs inputs = MakeInputs(9, 5, 4);
  const int64_t row_bytes = 5 * kDModel * 4;
  at::Generator generator = at::detail::createCPUGenerator(5);
  for (v1::LossReduction reduction :
       {v1::LOSS_REDUCTION_MEAN, v1::LOSS_REDUCTION_SUM, v1::LOSS_REDUCTION_NONE}) {
    SCOPED_TRACE(v1::LossReduction_Name(reduction));
    ForwardArgs args;
    args.labels = ToWire(inputs.labels);
    args.loss_reduction = reduction;
    args.z_loss_multiplier = 1e-3;
    args.return_argmax = true;
    args.logits_to_keep = ToWire(at::randint(5, {9, 2}, generator, at::kLong));
    if (reduction == v1::LOSS_REDUCTION_NONE) {
      args.loss_div_factor = ToWire(at::rand({9, 1}, generator) + 0.5);
    } else {
      args.loss_div_factor = 3.0;
    }
    absl::StatusOr<v1::ForwardResponse> one =
        client->ForwardMicroBatched(ToWire(inputs.x), args, 2 * row_bytes);
    ASSERT_TRUE(one.ok()) << one.status();
    for (int streams : {2, 3, 5, 12}) {
      std::vector<int64_t> progress;
      absl::StatusOr<v1::ForwardResponse> spread = client->ForwardMicroBatched(
          ToWire(inputs.x), args, 2 * row_bytes,
          [&](int64_t done, int64_t total) { progress.push_back(done * 100 + total); }, streams);
      ASSERT_TRUE(spread.ok()) << streams << ": " << spread.status();
      EXPECT_EQ(progress, (std::vector<int64_t>{105, 205, 305, 405, 505})) << streams;
      EXPECT_EQ(spread->num_scored_tokens(), one->num_scored_tokens()) << streams;
      for (const auto& [name, got, want] :
           {std::tuple{"logits", &spread->logits(), &one->logits()},
            std::tuple{"loss", &spread->loss(), &one->loss()},
            std::tuple{"ce_loss", &spread->ce_loss(), &one->ce_loss()},
            std::tuple{"z_loss", &spread->z_loss(), &one->z_loss()},
            std::tuple{"argmax", &spread->argmax(), &one->argmax()}}) {
        EXPECT_EQ(got->SerializeAsString(), want->SerializeAsString()) << streams << " " << name;
      }
    }
  }
  for (const int64_t bad_row : {int64_t{0}, int64_t{8}}) {
    ForwardArgs args;
    at::Tensor labels = inputs.labels.clone();
    labels.index_put_({bad_row, 1}, kVocab + 3);
    args.labels = ToWire(labels);
    absl::StatusOr<v1::ForwardResponse> failed =
        client->ForwardMicroBatched(ToWire(inputs.x), args, row_bytes, {}, 4);
    ASSERT_FALSE(failed.ok());
    EXPECT_EQ(failed.status().code(), absl::StatusCode::kInvalidArgument) << failed.status();
    EXPECT_TRUE(absl::StrContains(failed.status().message(), "labels")) << failed.status();
  }
  // Two refused micro-batches in different streams: always the earlier one, numbered in the
  // job as one stream numbers it.
  {
    ForwardArgs args;
    at::Tensor labels = inputs.labels.clone();
    labels.index_put_({2, 1}, -5);
    labels.index_put_({7, 1}, kVocab);
    args.labels = ToWire(labels);
    const absl::Status one =
        client->ForwardMicroBatched(ToWire(inputs.x), args, row_bytes).status();
    ASSERT_FALSE(one.ok());
    EXPECT_TRUE(absl::EndsWith(one.message(), "(micro-batch 2)")) << one;
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(client->ForwardMicroBatched(ToWire(inputs.x), args, row_bytes, {}, 4).status(),
                one);
    }
  }
  EXPECT_EQ(client->ForwardMicroBatched(ToWire(inputs.x), {}, row_bytes, {}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*unpacked)->Stop(), 0) << (*unpacked)->Log();
}

// Each bad request: the exact status code and a message naming the field.
struct BadCase {
  std::string name;
  std::function<void(v1::ForwardRequest*)> mutate;
  absl::StatusCode code;
  std::string message;  // a substring of the expected message
};

TEST_F(ServerTest, BadInputMatrixGetsExactCodesAndTheServerKeepsServing) {
  const Inputs inputs = MakeInputs(2, 3);
  ForwardArgs good_args;
  good_args.labels = ToWire(inputs.labels);
  const v1::ForwardRequest good = MakeForwardRequest(ToWire(inputs.x), good_args);
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  const std::vector<BadCase> cases = {
      {"wrong dtype",
       [](v1::ForwardRequest* r) {
         r->mutable_hidden_states()->set_dtype(v1::DATA_TYPE_INT64);
         r->mutable_hidden_states()->mutable_data()->resize(2 * 3 * 64 * 8);
       },
       kInvalid, "hidden_states.dtype: expected BF16 or FP16 or FP32, got INT64"},
      {"unset dtype",
       [](v1::ForwardRequest* r) {
         r->mutable_hidden_states()->set_dtype(v1::DATA_TYPE_UNSPECIFIED);
       },
       kInvalid, "hidden_states.dtype: expected BF16 or FP16 or FP32, got DATA_TYPE_UNSPECIFIED"},
      {"unknown dtype value",
       [](v1::ForwardRequest* r) {
         r->mutable_hidden_states()->set_dtype(static_cast<v1::DataType>(99));
       },
       kInvalid, "hidden_states.dtype: expected BF16 or FP16 or FP32, got unknown value 99"},
      {"byte length not matching shape",
       [](v1::ForwardRequest* r) { r->mutable_hidden_states()->mutable_data()->resize(100); },
       kInvalid,
       "hidden_states.data: expected 1536 bytes (384 elements of FP32 for shape [2, 3, 64]), got "
       "100"},
      {"negative dim", [](v1::ForwardRequest* r) { r->mutable_hidden_states()->set_shape(1, -3); },
       kInvalid, "hidden_states.shape[1]: expected a size >= 0, got -3"},
      {"overflowing dims",
       [](v1::ForwardRequest* r) {
         r->mutable_hidden_states()->set_shape(0, int64_t{1} << 40);
         r->mutable_hidden_states()->set_shape(1, int64_t{1} << 40);
       },
       kInvalid, "hidden_states.shape: [1099511627776, 1099511627776, 64] is too large"},
      {"byte size overflowing",
       [](v1::ForwardRequest* r) {
         r->mutable_hidden_states()->set_shape(0, int64_t{1} << 56);
         r->mutable_hidden_states()->set_shape(1, 1);
         r->mutable_hidden_states()->set_shape(2, 64);
       },
       kInvalid, "hidden_states.shape: [72057594037927936, 1, 64] is too large"},
      // Issue 11: no element, but strides that overflow (LibTorch's "Stride calculation
      // overflowed" reached the caller).
      {"empty but too large",
       [](v1::ForwardRequest* r) {
         r->mutable_hidden_states()->set_shape(0, 0);
         r->mutable_hidden_states()->set_shape(1, int64_t{1} << 62);
         r->mutable_hidden_states()->set_shape(2, 8);
         r->mutable_hidden_states()->clear_data();
         r->clear_labels();
       },
       kInvalid, "hidden_states.shape: [0, 4611686018427387904, 8] is too large"},
      {"empty, addressable alone, but not its logits",
       [](v1::ForwardRequest* r) {
         r->mutable_hidden_states()->set_shape(0, 0);
         r->mutable_hidden_states()->set_shape(1, int64_t{1} << 52);
         r->mutable_hidden_states()->clear_data();
         r->clear_labels();
       },
       kInvalid, "hidden_states.shape: (batch=0, seq_len=4503599627370496) is too large"},
      // Issue 11: these reached LibTorch's "The size of tensor a (2) must match ..." at compute.
      {"divisor (3, 1) against (2, 3) losses",
       [](v1::ForwardRequest* r) {
         r->mutable_options()->set_loss_reduction(v1::LOSS_REDUCTION_NONE);
         *r->mutable_options()->mutable_loss_div_factor_tensor() = ToWire(at::ones({3, 1}));
       },
       kInvalid,
       "options.loss_div_factor_tensor: shape [3, 1] does not broadcast against the losses' "
       "shape [2, 3]"},
      {"divisor (2, 4) against (2, 3) losses",
       [](v1::ForwardRequest* r) {
         r->mutable_options()->set_loss_reduction(v1::LOSS_REDUCTION_NONE);
         *r->mutable_options()->mutable_loss_div_factor_tensor() = ToWire(at::ones({2, 4}));
       },
       kInvalid,
       "options.loss_div_factor_tensor: shape [2, 4] does not broadcast against the losses' "
       "shape [2, 3]"},
      {"divisor bytes not matching its shape",
       [](v1::ForwardRequest* r) {
         *r->mutable_options()->mutable_loss_div_factor_tensor() = ToWire(at::ones({2, 3}));
         r->mutable_options()->mutable_loss_div_factor_tensor()->mutable_data()->resize(4);
       },
       kInvalid, "options.loss_div_factor_tensor.data: expected 24 bytes"},
      {"integer divisor",
       [](v1::ForwardRequest* r) {
         *r->mutable_options()->mutable_loss_div_factor_tensor() = ToWire(at::ones({2}, at::kLong));
       },
       kInvalid, "options.loss_div_factor_tensor.dtype: expected BF16 or FP16 or FP32, got INT64"},
      {"positions of the wrong dtype",
       [](v1::ForwardRequest* r) {
         *r->mutable_options()->mutable_logits_to_keep_positions() =
             ToWire(at::zeros({2, 1}, at::kInt));
       },
       kInvalid, "options.logits_to_keep_positions.dtype: expected INT64, got INT32"},
      {"fused_linear with return_logits",
       [](v1::ForwardRequest* r) {
         r->mutable_config()->set_loss_implementation(v1::LOSS_IMPLEMENTATION_FUSED_LINEAR);
         r->mutable_options()->set_return_logits(true);
       },
       kInvalid,
       "options.return_logits: 'return_logits=True' is not compatible 'fused_linear' loss "
       "implementation"},
      {"a 64 KiB model name",
       [](v1::ForwardRequest* r) { r->set_model(std::string(64 << 10, 'm')); },
       absl::StatusCode::kNotFound, "model: no model named 'mmmm"},
      {"a model name with a newline",
       [](v1::ForwardRequest* r) { r->set_model("demo\n2026-11-30T00:00:00.000Z error forged"); },
       absl::StatusCode::kNotFound, "model: no model named 'demo\\n2026"},
      {"wrong rank",
       [](v1::ForwardRequest* r) {
         r->mutable_hidden_states()->clear_shape();
         r->mutable_hidden_states()->add_shape(6);
         r->mutable_hidden_states()->add_shape(64);
       },
       kInvalid, "hidden_states.shape: expected rank 3, got rank 2"},
      {"hidden size mismatch",
       [](v1::ForwardRequest* r) {
         r->mutable_hidden_states()->set_shape(2, 32);
         r->mutable_hidden_states()->set_shape(1, 6);
       },
       kInvalid,
       "hidden_states.shape: expected (batch, seq_len, d_model=64) for model 'demo', got "
       "d_model=32"},
      {"labels shape mismatch",
       [](v1::ForwardRequest* r) {
         r->mutable_labels()->set_shape(1, 2);
         r->mutable_labels()->mutable_data()->resize(2 * 2 * 8);
       },
       kInvalid, "labels.shape: expected (batch=2, seq_len=3) like hidden_states, got (2, 2)"},
      {"labels dtype",
       [](v1::ForwardRequest* r) {
         r->mutable_labels()->set_dtype(v1::DATA_TYPE_FP32);
         r->mutable_labels()->mutable_data()->resize(2 * 3 * 4);
       },
       kInvalid, "labels.dtype: expected INT64 or INT32, got FP32"},
      {"labels out of range",
       [](v1::ForwardRequest* r) {
         int64_t big = 5000;
         r->mutable_labels()->mutable_data()->replace(8, 8, reinterpret_cast<const char*>(&big), 8);
       },
       kInvalid,
       "labels: values must lie in [0, vocab_size=1000) or equal ignore_index=-100, got values in"},
      {"negative label",
       [](v1::ForwardRequest* r) {
         int64_t negative = -5;
         r->mutable_labels()->mutable_data()->replace(8, 8,
                                                      reinterpret_cast<const char*>(&negative), 8);
       },
       kInvalid, "labels: values must lie in [0, vocab_size=1000) or equal ignore_index=-100"},
      {"positions out of range",
       [](v1::ForwardRequest* r) {
         *r->mutable_options()->mutable_logits_to_keep_positions() =
             ToWire(at::tensor({0, 3, 1, 2}, at::kLong).view({2, 2}));
       },
       kInvalid,
       "options.logits_to_keep_positions: positions must lie in [0, seq_len=3), got values in "
       "[0, 3]"},
      {"positions wrong batch",
       [](v1::ForwardRequest* r) {
         *r->mutable_options()->mutable_logits_to_keep_positions() =
             ToWire(at::tensor({0, 1}, at::kLong).view({1, 2}));
       },
       kInvalid, "options.logits_to_keep_positions.shape: expected (batch=2, K), got (1, 2)"},
      {"unknown model", [](v1::ForwardRequest* r) { r->set_model("gpt-17"); },
       absl::StatusCode::kNotFound,
       "model: no model named 'gpt-17' (ListModels lists this server's models)"},
      {"conflicting head type",
       [](v1::ForwardRequest* r) { r->mutable_config()->set_name(v1::HEAD_TYPE_NORMALIZED); },
       kInvalid,
       "config.name: model 'demo' has a 'default' head; the request's 'normalized' contradicts its "
       "weights"},
      {"conflicting layer norm",
       [](v1::ForwardRequest* r) {
         r->mutable_config()->mutable_layer_norm()->set_name(v1::LAYER_NORM_TYPE_DEFAULT);
       },
       kInvalid, "config.layer_norm.name: model 'demo' has a 'rms' layer norm"},
      {"conflicting bias", [](v1::ForwardRequest* r) { r->mutable_config()->set_bias(true); },
       kInvalid, "config.bias: model 'demo' has no w_out bias"},
      {"conflicting eps",
       [](v1::ForwardRequest* r) { r->mutable_config()->mutable_layer_norm()->set_eps(1e-6); },
       kInvalid, "config.layer_norm.eps: model 'demo' has eps=1e-05"},
      {"unknown loss reduction",
       [](v1::ForwardRequest* r) {
         r->mutable_options()->set_loss_reduction(static_cast<v1::LossReduction>(42));
       },
       kInvalid, "options.loss_reduction: unknown LossReduction value 42"},
      {"unknown loss implementation",
       [](v1::ForwardRequest* r) {
         r->mutable_config()->set_loss_implementation(static_cast<v1::LossImplementation>(7));
       },
       kInvalid, "config.loss_implementation: unknown LossImplementation value 7"},
      {"unknown head type",
       [](v1::ForwardRequest* r) { r->mutable_config()->set_name(static_cast<v1::HeadType>(9)); },
       kInvalid, "config.name: unknown HeadType value 9"},
      {"integer compute dtype",
       [](v1::ForwardRequest* r) { r->mutable_config()->set_dtype(v1::DATA_TYPE_INT32); }, kInvalid,
       "config.dtype: expected BF16, FP16 or FP32 (or unset), got INT32"},
      {"negative logit tile",
       [](v1::ForwardRequest* r) { r->mutable_options()->set_logit_tile_bytes(-1); }, kInvalid,
       "options.logit_tile_bytes: expected a positive byte count (or 0 for the default), got -1"},
      // fused_chunk_bytes, logit_tile_bytes' deprecated name, is checked as it was; both names
      // with different values are refused.
      {"negative fused_chunk_bytes (deprecated name)",
       [](v1::ForwardRequest* r) { SetDeprecatedTileBytes(r->mutable_options(), -1); }, kInvalid,
       "options.fused_chunk_bytes: expected a positive byte count (or 0 for the default), got -1"},
      {"logit tile and its deprecated name disagree",
       [](v1::ForwardRequest* r) {
         r->mutable_options()->set_logit_tile_bytes(4096);
         SetDeprecatedTileBytes(r->mutable_options(), 8192);
       },
       kInvalid,
       "options.logit_tile_bytes: 4096 disagrees with options.fused_chunk_bytes, its deprecated "
       "name, 8192; send logit_tile_bytes alone"},
      {"return_logits false without labels",
       [](v1::ForwardRequest* r) {
         r->clear_labels();
         r->mutable_options()->set_return_logits(false);
       },
       kInvalid,
       "options.return_logits: 'return_logits=False' is only valid when 'labels' is provided"},
      {"missing hidden states", [](v1::ForwardRequest* r) { r->clear_hidden_states(); }, kInvalid,
       "hidden_states.dtype: expected BF16 or FP16 or FP32, got DATA_TYPE_UNSPECIFIED"},
  };
  auto client = Connect(*server_);
  for (const BadCase& bad : cases) {
    SCOPED_TRACE(bad.name);
    v1::ForwardRequest request = good;
    bad.mutate(&request);
    absl::StatusOr<v1::ForwardResponse> response = client->Forward(request);
    EXPECT_EQ(response.status().code(), bad.code) << response.status();
    // Every message starts with the request's field path, and is ours, short and one line.
    const std::string message(response.status().message());
    EXPECT_TRUE(absl::StartsWith(message, bad.message))
        << "message: " << message << "\nexpected to start with: " << bad.message;
    EXPECT_TRUE(std::regex_search(message, std::regex(R"(^[a-z_]+(\.[a-z_]+|\[[0-9]+\])*: )")))
        << message;
    EXPECT_LT(message.size(), 400u) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    ExpectStillServing();
  }
  // The same errors through a stream name the micro-batch.
  v1::ForwardRequest bad = good;
  bad.set_model("gpt-17");
  int sent = 0;
  absl::Status status = client->ForwardStream(
      [&](v1::ForwardRequest* request) {
        if (sent == 3) return false;
        *request = sent++ == 1 ? bad : good;
        return true;
      },
      [](int64_t, const v1::ForwardResponse&) { return true; });
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StartsWith(status.message(), "model: no model named 'gpt-17'")) << status;
  EXPECT_TRUE(absl::EndsWith(status.message(), "(micro-batch 1)")) << status;
  ExpectStillServing();
}

TEST_F(ServerTest, DeadlineExceeded) {
  const Inputs inputs = MakeInputs(64, 512);  // about 8 MiB in, 131 MiB of logits out
  ClientOptions options;
  options.timeout = std::chrono::milliseconds(1);
  absl::StatusOr<v1::ForwardResponse> response =
      Connect(*server_, options)->Forward(ToWire(inputs.x), ForwardArgs());
  EXPECT_EQ(response.status().code(), absl::StatusCode::kDeadlineExceeded) << response.status();
  ExpectStillServing();
}

TEST_F(ServerTest, CancelledStreamStopsAndTheServerKeepsServing) {
  ClientOptions client_options;
  client_options.request_id = "cancelled-stream";
  auto client = Connect(*server_, client_options);
  const Inputs inputs = MakeInputs(2, 3);
  ForwardArgs args;
  args.labels = ToWire(inputs.labels);
  const v1::ForwardRequest request = MakeForwardRequest(ToWire(inputs.x), args);
  int64_t answered = 0;
  absl::Status status = client->ForwardStream(
      [&](v1::ForwardRequest* next) {
        *next = request;  // an endless job
        return true;
      },
      [&](int64_t index, const v1::ForwardResponse&) {
        answered = index + 1;
        return index < 4;  // cancel after the fifth answer
      });
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
  EXPECT_EQ(answered, 5);
  // The server stopped the endless job (it logs the stream's end when its handler returns).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  std::string line;
  while (line.empty() && std::chrono::steady_clock::now() < deadline) {
    for (absl::string_view l : absl::StrSplit(server_->Log(), '\n')) {
      if (absl::StrContains(l, "request_id=cancelled-stream ForwardStream")) line = std::string(l);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_NE(line.find("failed: CANCELLED"), std::string::npos) << server_->Log();
  ExpectStillServing();
}

TEST_F(ServerTest, RequestIdFromTheClientIsLogged) {
  ClientOptions options;
  options.request_id = "e2e-request-id-42";
  ASSERT_TRUE(Connect(*server_, options)->ListModels().ok());
  EXPECT_NE(server_->Log().find("request_id=e2e-request-id-42 ListModels ok"), std::string::npos)
      << server_->Log();
}

// A server with tight limits.
TEST(LimitsTest, OversizedMessageOpenStreamsResponseSizeAndVariants) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--max_message_bytes=1048576", "--max_open_streams=1",
                            "--max_response_bytes=100000", "--max_config_variants=0"});
  ASSERT_TRUE(server.ok()) << server.status();
  ClientOptions no_retry;
  no_retry.max_attempts = 1;  // the refusals themselves (RetryTest retries them)
  auto client = Connect(**server, no_retry);

  // Oversized message: 2 MiB of hidden states against a 1 MiB limit.
  const Inputs big = MakeInputs(8, 1024);
  ForwardArgs args;
  args.labels = ToWire(big.labels);
  args.return_logits = false;
  absl::StatusOr<v1::ForwardResponse> response = client->Forward(ToWire(big.x), args);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kResourceExhausted) << response.status();

  // Logits over the response limit: 2 x 100 x 1000 fp32 = 800 kB > 100 kB.
  const Inputs medium = MakeInputs(2, 100);
  response = client->Forward(ToWire(medium.x), ForwardArgs());
  EXPECT_EQ(response.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StartsWith(
      response.status().message(),
      "hidden_states.shape: the response would carry 800000 bytes of tensors (logits 800000), "
      "over the limit of 100000 bytes (--max_response_bytes)"))
      << response.status();
  args = ForwardArgs();
  args.labels = ToWire(medium.labels);
  args.return_logits = false;  // losses only: fine
  response = client->Forward(ToWire(medium.x), args);
  EXPECT_TRUE(response.ok()) << response.status();

  // A dtype override needs a converted copy, and this server keeps none.
  args.compute_dtype = v1::DATA_TYPE_BF16;
  response = client->Forward(ToWire(medium.x), args);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(response.status().message().find("--max_config_variants=0"), std::string::npos)
      << response.status();
  args.compute_dtype = v1::DATA_TYPE_FP32;  // the model's own dtype: no copy needed
  EXPECT_TRUE(client->Forward(ToWire(medium.x), args).ok());

  // Too many open streams: a stream holds the only slot; unary calls still pass.
  const Inputs small = MakeInputs(1, 2);
  ForwardArgs small_args;
  small_args.labels = ToWire(small.labels);
  const v1::ForwardRequest small_request = MakeForwardRequest(ToWire(small.x), small_args);
  absl::Status during;
  std::atomic<bool> checked{false};
  int sent = 0;
  absl::Status stream = client->ForwardStream(
      [&](v1::ForwardRequest* next) {
        if (sent == 2) return false;
        // The stream stays open (holding its slot) until the unary call has been tried.
        while (sent == 1 && !checked) std::this_thread::sleep_for(std::chrono::milliseconds(2));
        ++sent;
        *next = small_request;
        return true;
      },
      [&](int64_t index, const v1::ForwardResponse&) {
        if (index == 0) {
          EXPECT_TRUE(client->Forward(small_request).ok());
          bool second_sent = false;
          during = client->ForwardStream(
              [&](v1::ForwardRequest* second) {
                if (second_sent) return false;
                second_sent = true;
                *second = small_request;
                return true;
              },
              [](int64_t, const v1::ForwardResponse&) { return true; });
          checked = true;
        }
        return true;
      });
  EXPECT_TRUE(stream.ok()) << stream;
  EXPECT_EQ(during.code(), absl::StatusCode::kResourceExhausted) << during;
  EXPECT_NE(during.message().find("too many open streams: 1 (--max_open_streams)"),
            std::string::npos)
      << during;
  client.reset();
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST(ModelFileTest, ServesASafetensorsCheckpointWithItsConfigBeside) {
  // A default head with a default layer norm and a bias, bf16, loaded from a file.
  LMHeadConfig config;
  config.layer_norm = LayerNormConfig{LayerNormType::kDefault};
  config.dtype = DType::kBFloat16;
  std::unique_ptr<LMHead> head = *LMHead::Build(config, 16, 50, "cpu", /*seed=*/7);
  std::map<std::string, v1::Tensor> tensors;
  for (const auto& [name, tensor] : head->NamedParameters()) tensors[name] = ToWire(tensor);
  const std::string dir = std::getenv("TEST_TMPDIR");
  const std::string path = dir + "/tiny.safetensors";
  ASSERT_TRUE(WriteSafetensorsFile(path, tensors).ok());
  std::ofstream(dir + "/tiny.json") << LMHeadConfigToJson(config);

  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--model=tiny=" + path, "--model", "same=" + path});
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = Connect(**server);
  absl::StatusOr<v1::ModelInfo> info = client->GetModel("tiny");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->d_model(), 16);
  EXPECT_EQ(info->vocab_size(), 50);
  EXPECT_EQ(info->dtype(), v1::DATA_TYPE_BF16);
  EXPECT_EQ(info->num_params(), config.NumParams(16, 50));
  EXPECT_EQ(info->source(), "tiny.safetensors");  // the host's path stays private
  EXPECT_EQ(info->version().rfind("fnv1a64:", 0), 0u);
  absl::StatusOr<v1::ListModelsResponse> models = client->ListModels();
  ASSERT_TRUE(models.ok()) << models.status();
  ASSERT_EQ(models->models_size(), 2);  // --model repeats; sorted by name
  EXPECT_EQ(models->models(0).name(), "same");
  EXPECT_EQ(models->models(1).name(), "tiny");
  EXPECT_EQ(models->default_model(), "tiny");  // the first given
  EXPECT_EQ(models->models(0).version(), info->version());

  const Inputs inputs = MakeInputs(3, 4, 5, 16, 50);
  ForwardArgs args;
  args.labels = ToWire(inputs.labels);
  args.z_loss_multiplier = 1e-4;
  absl::StatusOr<v1::ForwardResponse> response =
      client->Forward(ToWire(inputs.x.to(at::kBFloat16)), args);
  ASSERT_TRUE(response.ok()) << response.status();
  ForwardOptions options;
  options.labels = inputs.labels;
  options.z_loss_multiplier = 1e-4;
  const LMOutput expected = *head->Forward(inputs.x.to(at::kBFloat16), options);
  ExpectClose(response->logits(), *expected.logits, "logits", 1e-2, 1e-2);
  ExpectClose(response->loss(), *expected.loss, "loss", 1e-5, 1e-5);

  // A request may not drop the checkpoint's layer norm bias or change its type.
  v1::ForwardRequest request = MakeForwardRequest(ToWire(inputs.x.to(at::kBFloat16)), args);
  request.mutable_config()->mutable_layer_norm()->set_bias(false);
  EXPECT_EQ(client->Forward(request).status().code(), absl::StatusCode::kInvalidArgument);
  // fp32 compute from the bf16 checkpoint (a converted copy).
  args.compute_dtype = v1::DATA_TYPE_FP32;
  response = client->Forward(ToWire(inputs.x), args);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->logits().dtype(), v1::DATA_TYPE_FP32);
  client.reset();
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST(StartupTest, AModelWithoutAConfigFailsNamingBothPlaces) {
  const std::string dir = std::getenv("TEST_TMPDIR");
  std::map<std::string, v1::Tensor> tensors = {{"w_out.weight", ToWire(at::zeros({4, 2}))}};
  ASSERT_TRUE(WriteSafetensorsFile(dir + "/noconfig.safetensors", tensors).ok());
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--model=x=" + dir + "/noconfig.safetensors"});
  ASSERT_FALSE(server.ok());
  EXPECT_NE(server.status().message().find("noconfig.json' or pass --head_config"),
            std::string::npos)
      << server.status();
}

TEST(HealthTest, NotServingWhileLoadingThenServing) {
  // A 512 MiB checkpoint (vocab 131072 x d_model 1024, fp32) takes a while to load.
  const std::string dir = std::getenv("TEST_TMPDIR");
  {
    std::map<std::string, v1::Tensor> tensors = {
        {"w_out.weight", ToWire(at::full({131072, 1024}, 0.5))}};
    ASSERT_TRUE(WriteSafetensorsFile(dir + "/large.safetensors", tensors).ok());
  }
  std::ofstream(dir + "/large.json") << R"({"name": "default", "bias": false})";
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::StartListening({"--model=large=" + dir + "/large.safetensors"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = Connect(**server);
  std::vector<HealthCheckResponse::ServingStatus> seen;
  int refused = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline &&
         (seen.empty() || seen.back() != HealthCheckResponse::SERVING)) {
    absl::StatusOr<HealthCheckResponse::ServingStatus> status = client->Health();
    ASSERT_TRUE(status.ok()) << status.status();
    if (seen.empty() || seen.back() != *status) seen.push_back(*status);
    if (*status == HealthCheckResponse::NOT_SERVING) {
      // Calls made while loading are refused, not queued (the last may race the end of loading).
      const absl::StatusCode code = client->ListModels().status().code();
      EXPECT_TRUE(code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kOk);
      refused += code == absl::StatusCode::kUnavailable;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(seen, (std::vector<HealthCheckResponse::ServingStatus>{HealthCheckResponse::NOT_SERVING,
                                                                   HealthCheckResponse::SERVING}));
  absl::StatusOr<v1::ModelInfo> info = client->GetModel("large");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->vocab_size(), 131072);
  client.reset();
  EXPECT_EQ((*server)->Stop(), 0);
  std::remove((dir + "/large.safetensors").c_str());
}

TEST(ShutdownTest, SigtermDrainsAnInFlightStreamAndExitsZero) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--shutdown_grace_seconds=10"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = Connect(**server);
  // A health watcher (what load balancers use) sees the drain begin.
  auto health = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel((*server)->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext watch_context;
  grpc::health::v1::HealthCheckRequest watch_request;
  auto watch = health->Watch(&watch_context, watch_request);
  std::vector<HealthCheckResponse::ServingStatus> watched;
  grpc::health::v1::HealthCheckResponse update;
  ASSERT_TRUE(watch->Read(&update));
  watched.push_back(update.status());
  std::thread watcher([&]() {
    while (watch->Read(&update)) watched.push_back(update.status());
  });

  const Inputs inputs = MakeInputs(2, 3);
  ForwardArgs args;
  args.labels = ToWire(inputs.labels);
  const v1::ForwardRequest request = MakeForwardRequest(ToWire(inputs.x), args);
  std::atomic<bool> signalled{false};
  absl::Status refused;  // a new call made while draining
  int sent = 0;
  int answered = 0;
  absl::Status status = client->ForwardStream(
      [&](v1::ForwardRequest* next) {
        if (sent == 6) return false;
        if (sent == 3) {
          while (!signalled) std::this_thread::sleep_for(std::chrono::milliseconds(5));
          std::this_thread::sleep_for(std::chrono::milliseconds(200));  // draining by now
          refused = client->Forward(request).status();
        }
        *next = request;
        ++sent;
        return true;
      },
      [&](int64_t index, const v1::ForwardResponse&) {
        ++answered;
        if (index == 0) {
          kill((*server)->pid(), SIGTERM);
          signalled = true;
        }
        return true;
      });
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_EQ(answered, 6);
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable) << refused;
  EXPECT_EQ(refused.message(), "the server is shutting down");
  EXPECT_EQ((*server)->Stop(), 0);
  watcher.join();
  ASSERT_GE(watched.size(), 2u);
  EXPECT_EQ(watched[0], HealthCheckResponse::SERVING);
  EXPECT_EQ(watched[1], HealthCheckResponse::NOT_SERVING);
  const std::string log = (*server)->Log();
  EXPECT_NE(log.find("received SIGTERM"), std::string::npos) << log;
  EXPECT_NE(log.find("ForwardStream 6 micro-batches ok"), std::string::npos) << log;
  EXPECT_NE(log.find("shut down"), std::string::npos) << log;
}

TEST(LoggingTest, JsonLogLinesAreObjectsWithARequestId) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--log_format=json"});
  ASSERT_TRUE(server.ok()) << server.status();
  ClientOptions options;
  options.request_id = "json-rid";
  ASSERT_TRUE(Connect(**server, options)->GetModel("demo").ok());
  EXPECT_EQ((*server)->Stop(), 0);
  int lines = 0;
  bool saw_request = false;
  for (absl::string_view line : absl::StrSplit((*server)->Log(), '\n', absl::SkipEmpty())) {
    const nlohmann::json object = nlohmann::json::parse(line, nullptr, false);
    ASSERT_TRUE(object.is_object()) << line;
    EXPECT_TRUE(object.contains("request_id")) << line;
    EXPECT_TRUE(object.contains("time") && object.contains("level") && object.contains("message"));
    saw_request = saw_request || object["request_id"] == "json-rid";
    ++lines;
  }
  EXPECT_GE(lines, 4);
  EXPECT_TRUE(saw_request);
}

}  // namespace
}  // namespace lmhead

// A streamed job whose input exceeds 2 GiB (beyond protobuf's and gRPC's message limits) flows
// through ForwardStream with bounded server memory. A tiny head (d_model 8, vocab 16) keeps it
// quick: the cost is moving the bytes.
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "client/lmhead_client.h"
#include "gtest/gtest.h"
#include "tests/e2e/server_process.h"

namespace lmhead {
namespace {

TEST(BigStreamTest, MoreThanTwoGibibytesWithBoundedServerMemory) {
  constexpr int64_t kDModel = 8;
  constexpr int64_t kVocab = 16;
  constexpr int64_t kBatch = 16;
  // Micro-batches of 60 MiB: 16 x 98304 x 8 fp32 hidden states (48 MiB) and int64 labels
  // (12 MiB); 36 of them make 2.11 GiB.
  constexpr int64_t kSeq = 98304;
  constexpr int kMicroBatches = 36;
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(
      {absl::StrCat("--demo_d_model=", kDModel), absl::StrCat("--demo_vocab_size=", kVocab)});
  ASSERT_TRUE(server.ok()) << server.status();
  ClientOptions options;
  options.timeout = std::chrono::minutes(5);
  auto client = LMHeadClient::Connect((*server)->address(), options);

  // One micro-batch, reused: deterministic values, every 8th label ignored.
  v1::ForwardRequest request;
  v1::Tensor* hidden = request.mutable_hidden_states();
  hidden->set_dtype(v1::DATA_TYPE_FP32);
  for (int64_t dim : {kBatch, kSeq, kDModel}) hidden->add_shape(dim);
  std::vector<float> values(kBatch * kSeq * kDModel);
  for (size_t i = 0; i < values.size(); ++i)
    values[i] = static_cast<float>((i * 7919) % 1000) / 500.0f - 1.0f;
  hidden->set_data(std::string(reinterpret_cast<const char*>(values.data()), values.size() * 4));
  v1::Tensor* labels = request.mutable_labels();
  labels->set_dtype(v1::DATA_TYPE_INT64);
  labels->add_shape(kBatch);
  labels->add_shape(kSeq);
  std::vector<int64_t> ids(kBatch * kSeq);
  for (size_t i = 0; i < ids.size(); ++i)
    ids[i] = i % 8 == 0 ? -100 : static_cast<int64_t>(i % kVocab);
  labels->set_data(std::string(reinterpret_cast<const char*>(ids.data()), ids.size() * 8));
  request.mutable_options()->set_return_logits(false);
  request.mutable_options()->set_loss_reduction(v1::LOSS_REDUCTION_SUM);

  int sent = 0;
  int64_t bytes_sent = 0;
  int64_t scored = 0;
  std::vector<float> losses;
  int64_t steady_peak = 0;  // after a few micro-batches
  const auto start = std::chrono::steady_clock::now();
  absl::Status status = client->ForwardStream(
      [&](v1::ForwardRequest* next) {
        if (sent == kMicroBatches) return false;
        *next = request;
        bytes_sent += next->hidden_states().data().size() + next->labels().data().size();
        ++sent;
        return true;
      },
      [&](int64_t index, const v1::ForwardResponse& response) {
        EXPECT_FALSE(response.has_logits());
        float loss = 0;
        std::memcpy(&loss, response.loss().data().data(), 4);
        losses.push_back(loss);
        scored += response.num_scored_tokens();
        if (index == 3) steady_peak = (*server)->PeakRssBytes();
        return true;
      });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(status.ok()) << status;
  ASSERT_EQ(losses.size(), static_cast<size_t>(kMicroBatches));
  for (float loss : losses) EXPECT_EQ(loss, losses[0]);  // same micro-batch, same answer
  EXPECT_GT(bytes_sent, int64_t{2} << 30);
  EXPECT_EQ(scored, kMicroBatches * kBatch * kSeq * 7 / 8);
  const int64_t peak = (*server)->PeakRssBytes();
  EXPECT_GT(steady_peak, 0);
  // Bounded: the server never held more than a few micro-batches' worth (each one costs its
  // message, the decoded tensors, the logits and their log-softmax), far below the job.
  EXPECT_LT(peak, int64_t{1} << 30) << "server peak RSS " << peak << " bytes";
  EXPECT_LT(peak, bytes_sent / 2);
  std::cout << "streamed " << bytes_sent / double(1 << 30) << " GiB in " << seconds
            << " s; server peak RSS " << peak / double(1 << 20) << " MiB (after 4 micro-batches "
            << steady_peak / double(1 << 20) << " MiB)\n";
  EXPECT_EQ((*server)->Stop(), 0);
}

// The default --max_message_bytes takes a 256 MiB request: bf16 hidden states (2^27 values) and
// their labels, d_model 64, in one Forward.
TEST(BigStreamTest, DefaultMessageLimitFitsA256MiBRequest) {
  constexpr int64_t kDModel = 64;
  constexpr int64_t kTokens = (int64_t{256} << 20) / (2 * kDModel) - 4096;  // room for labels
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--demo_vocab_size=16"});
  ASSERT_TRUE(server.ok()) << server.status();
  ClientOptions options;
  options.timeout = std::chrono::minutes(2);
  auto client = LMHeadClient::Connect((*server)->address(), options);
  v1::ForwardRequest request;
  v1::Tensor* hidden = request.mutable_hidden_states();
  hidden->set_dtype(v1::DATA_TYPE_BF16);
  for (int64_t dim : {int64_t{1}, kTokens, kDModel}) hidden->add_shape(dim);
  hidden->mutable_data()->assign(kTokens * kDModel * 2, '\x3f');  // bf16 0x3f3f = 0.746
  v1::Tensor* labels = request.mutable_labels();
  labels->set_dtype(v1::DATA_TYPE_INT64);
  labels->add_shape(1);
  labels->add_shape(kTokens);
  labels->mutable_data()->assign(kTokens * 8, '\0');  // class 0
  request.mutable_options()->set_return_logits(false);
  request.mutable_config()->set_loss_implementation(v1::LOSS_IMPLEMENTATION_FUSED_LINEAR);
  EXPECT_GT(request.ByteSizeLong(), size_t{255} << 20);
  absl::StatusOr<v1::ForwardResponse> response = client->Forward(request);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->num_scored_tokens(), kTokens);
  client.reset();
  EXPECT_EQ((*server)->Stop(), 0);
}

}  // namespace
}  // namespace lmhead

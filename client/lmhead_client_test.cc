// LMHeadClient's requests, without a server: what MakeForwardRequest puts in ForwardOptions, and
// the arguments ForwardMicroBatched refuses before it connects. The calls themselves are tested
// against the real server in tests/e2e.
#include "client/lmhead_client.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace lmhead {
namespace {

v1::Tensor Int64(std::vector<int64_t> shape, const std::vector<int64_t>& values) {
  v1::Tensor tensor;
  tensor.set_dtype(v1::DATA_TYPE_INT64);
  for (int64_t dim : shape) tensor.add_shape(dim);
  tensor.set_data(std::string(reinterpret_cast<const char*>(values.data()), values.size() * 8));
  return tensor;
}

v1::Tensor Hidden(int64_t batch, int64_t seq_len, int64_t d_model) {
  v1::Tensor tensor;
  tensor.set_dtype(v1::DATA_TYPE_FP32);
  for (int64_t dim : {batch, seq_len, d_model}) tensor.add_shape(dim);
  tensor.set_data(std::string(batch * seq_len * d_model * 4, '\0'));
  return tensor;
}

TEST(MakeForwardRequestTest, AsksForNoScoringByDefault) {
  const v1::ForwardRequest request = MakeForwardRequest(Hidden(1, 2, 4), ForwardArgs());
  EXPECT_FALSE(request.options().has_scoring());
}

TEST(MakeForwardRequestTest, FillsScoringOptions) {
  ForwardArgs args;
  args.labels = Int64({1, 2}, {3, 4});
  args.scoring.label_logprobs = true;
  args.scoring.entropy = true;
  args.scoring.label_rank = true;
  args.scoring.top_k = 5;
  args.scoring.candidate_ids = Int64({2}, {7, 9});
  args.scoring.segment_ids = Int64({1, 2}, {-1, 0});
  const v1::ForwardRequest request = MakeForwardRequest(Hidden(1, 2, 4), args);
  ASSERT_TRUE(request.options().has_scoring());
  const v1::ScoringOptions& scoring = request.options().scoring();
  EXPECT_TRUE(scoring.label_logprobs());
  EXPECT_TRUE(scoring.entropy());
  EXPECT_TRUE(scoring.label_rank());
  EXPECT_EQ(scoring.top_k(), 5);
  EXPECT_EQ(scoring.candidate_ids().SerializeAsString(),
            args.scoring.candidate_ids->SerializeAsString());
  EXPECT_EQ(scoring.segment_ids().SerializeAsString(),
            args.scoring.segment_ids->SerializeAsString());

  // Each option alone asks for scoring.
  for (int i = 0; i < 6; ++i) {
    ForwardArgs one;
    one.scoring.label_logprobs = i == 0;
    one.scoring.entropy = i == 1;
    one.scoring.label_rank = i == 2;
    if (i == 3) one.scoring.top_k = 1;
    if (i == 4) one.scoring.candidate_ids = Int64({1}, {0});
    if (i == 5) one.scoring.segment_ids = Int64({1, 2}, {0, 0});
    EXPECT_TRUE(MakeForwardRequest(Hidden(1, 2, 4), one).options().has_scoring()) << i;
  }
}

// ForwardMicroBatched of 3 rows of hidden states with `args` is INVALID_ARGUMENT containing
// `message`, before anything is sent (the address is never dialled).
void ExpectRefusedBeforeSending(const ForwardArgs& args, const std::string& message) {
  ClientOptions options;
  options.timeout = std::chrono::seconds(5);
  auto client = LMHeadClient::Connect("127.0.0.1:1", options);
  absl::StatusOr<v1::ForwardResponse> response =
      client->ForwardMicroBatched(Hidden(3, 2, 4), args, /*max_micro_batch_bytes=*/32);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kInvalidArgument) << response.status();
  EXPECT_NE(response.status().message().find(message), absl::string_view::npos)
      << response.status();
}

// Ids split with the batch must have the job's rows; refused before anything is sent (the
// address is never dialled).
TEST(ForwardMicroBatchedTest, RefusesScoringIdsThatCannotBeSplitWithTheBatch) {
  ForwardArgs args;
  args.labels = Int64({3, 2}, {1, 2, 3, 4, 5, 6});
  args.scoring.segment_ids = Int64({2, 2}, {0, 0, 0, 0});
  ExpectRefusedBeforeSending(
      args,
      "segment_ids: expected (batch, seq_len) like labels, split with the batch (3 rows); "
      "got shape [2, 2]");
  args.scoring.segment_ids = Int64({6}, {0, 0, 0, 0, 0, 0});
  ExpectRefusedBeforeSending(args, "segment_ids: expected (batch, seq_len)");
  args.scoring.segment_ids.reset();
  args.scoring.candidate_ids = Int64({1, 2, 1}, {0, 1});
  ExpectRefusedBeforeSending(
      args,
      "candidate_ids: expected (C,) or (batch, kept positions, C), split with the batch "
      "(3 rows); got shape [1, 2, 1]");
  args.scoring.candidate_ids = Int64({3, 2}, {0, 1, 2, 3, 4, 5});
  ExpectRefusedBeforeSending(args, "candidate_ids: expected (C,) or (batch, kept positions, C)");
}

// Labels and positions split with the batch must have the job's rows too: a streamed job would
// otherwise drop extra rows silently (one request is refused by the server).
TEST(ForwardMicroBatchedTest, RefusesLabelsAndPositionsWithOtherRowsThanTheJob) {
  ForwardArgs args;
  args.labels = Int64({4, 2}, {1, 2, 3, 4, 5, 6, 7, 8});
  ExpectRefusedBeforeSending(
      args,
      "labels: expected (batch, seq_len) like hidden_states, split with the batch (3 rows); "
      "got shape [4, 2]");
  args.labels = Int64({3, 2}, {1, 2, 3, 4, 5, 6});
  args.logits_to_keep = Int64({2, 1}, {0, 1});
  ExpectRefusedBeforeSending(
      args,
      "logits_to_keep: expected (batch, K) positions, split with the batch (3 rows); got "
      "shape [2, 1]");
}

// ForwardChunked, ForwardMicroBatched's old name (deprecated for one release), is the same call.
TEST(ForwardMicroBatchedTest, TheDeprecatedNameStillWorks) {
  auto client = LMHeadClient::Connect("127.0.0.1:1");
  ForwardArgs args;
  args.labels = Int64({4, 2}, {1, 2, 3, 4, 5, 6, 7, 8});
  const v1::Tensor hidden = Hidden(3, 2, 4);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  const absl::Status of_tensor = client->ForwardChunked(hidden, args, 32).status();
  const absl::Status of_views =
      client->ForwardChunked(ViewOf(hidden), std::nullopt, args, 32).status();
#pragma GCC diagnostic pop
  const absl::Status expected = client->ForwardMicroBatched(hidden, args, 32).status();
  EXPECT_EQ(expected.code(), absl::StatusCode::kInvalidArgument) << expected;
  EXPECT_EQ(of_tensor, expected);
  EXPECT_EQ(of_views, expected);
}

// Several addresses make one ipv4:/ipv6: target balanced round-robin; one host:port is left as
// it is (gRPC's default pick_first); names in a list are refused, naming the option.
TEST(ChannelTargetTest, ListsBecomeOneRoundRobinTarget) {
  const auto target = [](absl::string_view address) {
    absl::StatusOr<ChannelTarget> parsed = ChannelTargetOf(address);
    EXPECT_TRUE(parsed.ok()) << address << ": " << parsed.status();
    return parsed.ok() ? std::make_pair(parsed->target, parsed->replicas)
                       : std::make_pair(std::string(), false);
  };
  EXPECT_EQ(target("127.0.0.1:50051"), std::make_pair(std::string("127.0.0.1:50051"), false));
  EXPECT_EQ(target("localhost:50051"), std::make_pair(std::string("localhost:50051"), false));
  EXPECT_EQ(target("127.0.0.1:1, 10.0.0.2:2"),
            std::make_pair(std::string("ipv4:127.0.0.1:1,10.0.0.2:2"), true));
  EXPECT_EQ(target("[::1]:1,[fe80::2]:2"),
            std::make_pair(std::string("ipv6:[::1]:1,[fe80::2]:2"), true));
  EXPECT_EQ(target("dns:///lmhead-headless.ns.svc.cluster.local:50051"),
            std::make_pair(std::string("dns:///lmhead-headless.ns.svc.cluster.local:50051"), true));
  EXPECT_EQ(target("unix:/tmp/lmhead.sock"),
            std::make_pair(std::string("unix:/tmp/lmhead.sock"), false));
  for (const auto& [address, message] : std::vector<std::pair<std::string, std::string>>{
           {"localhost:1,localhost:2", "address: 'localhost:1' in a list of several addresses"},
           {"127.0.0.1:1,127.0.0.1", "address: '127.0.0.1' in a list"},
           {"127.0.0.1:1,127.0.0.1:0", "address: '127.0.0.1:0' in a list"},
           {"127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"},
           {"127.0.0.1:1,", "address: expected HOST:PORT"}}) {
    absl::StatusOr<ChannelTarget> parsed = ChannelTargetOf(address);
    ASSERT_FALSE(parsed.ok()) << address;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(parsed.status().message().find(message), absl::string_view::npos) << parsed.status();
  }
}

TEST(ChannelTargetTest, RoundRobinJoinsTheRetryPolicy) {
  EXPECT_EQ(RetryServiceConfig(1, /*round_robin=*/true),
            R"({"loadBalancingConfig": [{"round_robin": {}}]})");
  const std::string both = RetryServiceConfig(3, /*round_robin=*/true);
  EXPECT_EQ(both.rfind(R"({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": )", 0), 0)
      << both;
  EXPECT_EQ(both.substr(both.find(R"("methodConfig")")),
            RetryServiceConfig(3).substr(1));  // the same retry policy
}

}  // namespace
}  // namespace lmhead

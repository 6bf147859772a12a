#include "server/options.h"

#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

TEST(ValidateOptionsTest, DefaultsAreValid) { EXPECT_TRUE(ValidateOptions(Options()).ok()); }

TEST(ValidateOptionsTest, LoopbackHostsNeedNoFlagAndOthersNeedAllowInsecure) {
  Options options;
  for (const char* host : {"127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]"}) {
    options.host = host;
    EXPECT_TRUE(ValidateOptions(options).ok()) << host;
  }
  options.allow_insecure = true;
  for (const char* host : {"0.0.0.0", "[::]", "10.1.2.3"}) {
    options.host = host;
    EXPECT_TRUE(ValidateOptions(options).ok()) << host;
  }
}

TEST(ValidateOptionsTest, LimitsAtTheirBoundsAreValid) {
  Options options;
  options.port = 65535;
  options.max_message_bytes = 2147483647;
  options.max_response_bytes = kMaxResponseBytesLimit;
  options.max_batch_tokens = 1;
  options.max_queue_tokens = 1;
  options.max_queue_delay_us = 10'000'000;
  options.max_open_streams = 1;
  options.max_config_variants = 0;
  options.allow_shared_memory = true;
  options.max_shared_memory_regions = 4096;
  options.max_shared_memory_sessions = 1;
  options.shutdown_grace_seconds = 0;
  options.malloc_trim_seconds = 0;
  options.device = "cuda:12";
  EXPECT_TRUE(ValidateOptions(options).ok()) << ValidateOptions(options);
  options.device = "cuda:0,cuda:1,cpu,cpu,cuda";
  options.models = {{"olmo-2.7B_v1", "/weights/head.safetensors"}};
  EXPECT_TRUE(ValidateOptions(options).ok()) << ValidateOptions(options);
  options.max_response_bytes = 1;
  options.max_message_bytes = 1;
  EXPECT_TRUE(ValidateOptions(options).ok());
}

// A valid --admin_token_file.
std::string AdminTokens() {
  const std::string path = ::testing::TempDir() + "admin-tokens";
  std::ofstream(path) << "admin-token-0123456789\n";
  return path;
}

TEST(ValidateOptionsTest, AdminTokensMustDifferFromCallersTokens) {
  const std::string users = ::testing::TempDir() + "users";
  const std::string admins = ::testing::TempDir() + "admins";
  std::ofstream(users) << "user-token-0123456789\n";
  std::ofstream(admins) << "admin-token-0123456789\n";
  Options options;
  options.auth_token_file = users;
  options.admin_token_file = admins;
  options.model_repository = ::testing::TempDir();
  EXPECT_TRUE(ValidateOptions(options).ok()) << ValidateOptions(options);
  std::ofstream(admins) << "admin-token-0123456789\nuser-token-0123456789\n";
  const absl::Status status = ValidateOptions(options);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), ::testing::StartsWith("--admin_token_file: "));
  EXPECT_EQ(status.message().find("0123456789"), absl::string_view::npos);
}

TEST(ValidateOptionsTest, EveryBadValueNamesItsFlag) {
  struct Case {
    std::function<void(Options&)> set;
    std::string prefix;
  };
  const std::vector<Case> cases = {
      {[](Options& o) { o.host = ""; }, "--host: "},
      {[](Options& o) { o.host = "0.0.0.0"; }, "--host: 0.0.0.0 is not a loopback address"},
      {[](Options& o) { o.host = "10.1.2.3"; }, "--host: 10.1.2.3 is not a loopback address"},
      {[](Options& o) { o.host = "[::]"; }, "--host: [::] is not a loopback address"},
      {[](Options& o) { o.port = -1; }, "--port: "},
      {[](Options& o) { o.port = 65536; }, "--port: "},
      {[](Options& o) {
         o.models = {{"", "a.safetensors"}};
       },
       "--model: "},
      {[](Options& o) {
         o.models = {{"a", ""}};
       },
       "--model: "},
      {[](Options& o) {
         o.models = {{"a\nb", "a.safetensors"}};
       },
       "--model: "},
      {[](Options& o) {
         o.models = {{std::string(129, 'a'), "a.safetensors"}};
       },
       "--model: "},
      {[](Options& o) {
         o.models = {{"a", "x.safetensors"}, {"a", "y.safetensors"}};
       },
       "--model: "},
      {[](Options& o) { o.device = ""; }, "--device: "},
      {[](Options& o) { o.device = "cuda:"; }, "--device: "},
      {[](Options& o) { o.device = "cuda:x"; }, "--device: "},
      {[](Options& o) { o.device = "gpu"; }, "--device: "},
      {[](Options& o) { o.demo_d_model = 0; }, "--demo_d_model: "},
      {[](Options& o) { o.demo_vocab_size = -5; }, "--demo_vocab_size: "},
      {[](Options& o) { o.demo_dtype = "bf16"; }, "--demo_dtype: "},
      {[](Options& o) { o.max_message_bytes = 0; }, "--max_message_bytes: "},
      {[](Options& o) { o.max_message_bytes = int64_t{1} << 31; }, "--max_message_bytes: "},
      {[](Options& o) { o.max_response_bytes = 0; }, "--max_response_bytes: "},
      // Issue 11: the server used to start with this and abort on the first large response.
      {[](Options& o) { o.max_response_bytes = 4294967296; }, "--max_response_bytes: "},
      {[](Options& o) { o.max_response_bytes = kMaxResponseBytesLimit + 1; },
       "--max_response_bytes: "},
      {[](Options& o) { o.device = "cuda:0,"; }, "--device: "},
      {[](Options& o) { o.device = "cuda:0,,cuda:1"; }, "--device: "},
      {[](Options& o) { o.device = "cuda:0;cuda:1"; }, "--device: "},
      {[](Options& o) { o.max_batch_tokens = 0; }, "--max_batch_tokens: "},
      {[](Options& o) { o.max_queue_tokens = 0; }, "--max_queue_tokens: "},
      {[](Options& o) { o.max_queue_delay_us = -1; }, "--max_queue_delay_us: "},
      {[](Options& o) { o.max_queue_delay_us = 10'000'001; }, "--max_queue_delay_us: "},
      {[](Options& o) { o.max_open_streams = 0; }, "--max_open_streams: "},
      {[](Options& o) { o.grpc_completion_queues = -1; }, "--grpc_completion_queues: "},
      {[](Options& o) { o.grpc_max_pollers = 0; }, "--grpc_max_pollers: "},
      {[](Options& o) { o.http2_max_frame_bytes = 16383; }, "--http2_max_frame_bytes: "},
      {[](Options& o) { o.http2_max_frame_bytes = 16777216; }, "--http2_max_frame_bytes: "},
      {[](Options& o) { o.http2_stream_window_bytes = 65534; }, "--http2_stream_window_bytes: "},
      {[](Options& o) { o.http2_write_buffer_bytes = -2; }, "--http2_write_buffer_bytes: "},
      {[](Options& o) { o.shared_memory_key_prefix = "lmhead"; }, "--shared_memory_key_prefix: "},
      {[](Options& o) { o.shared_memory_key_prefix = "/a/b"; }, "--shared_memory_key_prefix: "},
      {[](Options& o) { o.max_config_variants = -1; }, "--max_config_variants: "},
      {[](Options& o) { o.max_shared_memory_regions = 0; }, "--max_shared_memory_regions: "},
      {[](Options& o) { o.max_shared_memory_regions = 4097; }, "--max_shared_memory_regions: "},
      {[](Options& o) { o.max_shared_memory_sessions = 0; }, "--max_shared_memory_sessions: "},
      {[](Options& o) { o.max_shared_memory_sessions = 1025; }, "--max_shared_memory_sessions: "},
      {[](Options& o) { o.shutdown_grace_seconds = -1; }, "--shutdown_grace_seconds: "},
      {[](Options& o) { o.shutdown_grace_seconds = std::nan(""); }, "--shutdown_grace_seconds: "},
      {[](Options& o) { o.admin_token_file = "/nonexistent/admin"; }, "--admin_token_file: "},
      {[](Options& o) { o.model_repository = "/tmp"; }, "--model_repository: "},
      {[](Options& o) {
         o.model_repository = "/nonexistent/models";
         o.admin_token_file = AdminTokens();
       },
       "--model_repository: "},
      {[](Options& o) {
         o.model_repository = "/dev/null";
         o.admin_token_file = AdminTokens();
       },
       "--model_repository: "},
      {[](Options& o) { o.max_connection_age_seconds = -1; }, "--max_connection_age_seconds: "},
      {[](Options& o) { o.max_connection_age_seconds = 604801; }, "--max_connection_age_seconds: "},
      {[](Options& o) { o.malloc_trim_seconds = -1; }, "--malloc_trim_seconds: "},
      {[](Options& o) { o.malloc_trim_seconds = std::numeric_limits<double>::infinity(); },
       "--malloc_trim_seconds: "},
  };
  for (const Case& c : cases) {
    Options options;
    c.set(options);
    const absl::Status status = ValidateOptions(options);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.prefix;
    EXPECT_THAT(std::string(status.message()), ::testing::StartsWith(c.prefix)) << status;
  }
}

}  // namespace
}  // namespace lmhead

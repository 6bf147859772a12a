// lmhead_load: a closed-loop load generator for a running lmhead_server, in the manner of
// Triton's perf_analyzer: --clients concurrent callers over --channels gRPC channels, each
// sending Forward calls of --tokens tokens back to back for --seconds (after --warmup_seconds).
// Prints tokens/s, latency percentiles, refusals and the server's batch sizes (issue 12's
// serving benchmark; docs/BENCHMARKS.md "Serving"). Needs no LibTorch: the hidden states are
// random bf16/fp32 bytes made here. Exit status 1 when a call failed with an error other than a
// refusal (RESOURCE_EXHAUSTED, UNAVAILABLE), or when none was answered.
//
//   lmhead_load --address 127.0.0.1:50051 --clients 64 --tokens 256 --d_model 4096
//       --vocab_size 128256 --seconds 20
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "bench/results_table.h"
#include "client/lmhead_client.h"

ABSL_FLAG(std::string, address, "127.0.0.1:50051", "The server, host:port.");
ABSL_FLAG(int, clients, 64, "Concurrent callers, each with one call in flight at a time.");
ABSL_FLAG(int, channels, 8, "gRPC channels the callers are spread over, a connection each.");
ABSL_FLAG(int64_t, tokens, 256, "Tokens per call: hidden states (1, tokens, d_model).");
ABSL_FLAG(int64_t, d_model, 4096, "Hidden size of the served model.");
ABSL_FLAG(int64_t, vocab_size, 128256, "Vocabulary size of the served model (labels' range).");
ABSL_FLAG(std::string, dtype, "bf16", "Hidden states on the wire: bf16 or fp32.");
ABSL_FLAG(std::string, loss_implementation, "fused_linear", "default or fused_linear.");
ABSL_FLAG(double, seconds, 20, "Measured time.");
ABSL_FLAG(double, warmup_seconds, 3, "Load before the measurement starts (not counted).");
ABSL_FLAG(int, max_attempts, 1,
          "Attempts per call (1: a refusal counts as one; 2-5: gRPC's retry policy).");
ABSL_FLAG(std::string, label, "", "A name for this run, printed with its result line.");
ABSL_FLAG(double, kernel_tokens_per_s, 0,
          "The kernel-only rate of the same shape (gpu_lm_head_bench --serving), to print this "
          "run's share of; 0: none.");

namespace lmhead {
namespace {

using Clock = std::chrono::steady_clock;

// The bytes of (1, tokens, d_model) normal values in `dtype`.
std::string RandomHiddenStates(int64_t tokens, int64_t d_model, bool bf16, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  const int64_t count = tokens * d_model;
  std::string bytes(count * (bf16 ? 2 : 4), '\0');
  for (int64_t i = 0; i < count; ++i) {
    const float value = normal(rng);
    if (bf16) {
      uint32_t bits = 0;
      std::memcpy(&bits, &value, 4);
      const uint16_t high = static_cast<uint16_t>(bits >> 16);  // truncation: any bf16 will do
      std::memcpy(&bytes[i * 2], &high, 2);
    } else {
      std::memcpy(&bytes[i * 4], &value, 4);
    }
  }
  return bytes;
}

v1::ForwardRequest MakeRequest(uint64_t seed) {
  const int64_t tokens = absl::GetFlag(FLAGS_tokens);
  const int64_t d_model = absl::GetFlag(FLAGS_d_model);
  const bool bf16 = absl::GetFlag(FLAGS_dtype) == "bf16";
  v1::Tensor x;
  x.set_dtype(bf16 ? v1::DATA_TYPE_BF16 : v1::DATA_TYPE_FP32);
  for (int64_t size : {int64_t{1}, tokens, d_model}) x.add_shape(size);
  x.set_data(RandomHiddenStates(tokens, d_model, bf16, seed));
  v1::Tensor labels;
  labels.set_dtype(v1::DATA_TYPE_INT64);
  labels.add_shape(1);
  labels.add_shape(tokens);
  std::mt19937_64 rng(seed + 1);
  std::string label_bytes(tokens * 8, '\0');
  for (int64_t i = 0; i < tokens; ++i) {
    const int64_t label = static_cast<int64_t>(rng() % absl::GetFlag(FLAGS_vocab_size));
    std::memcpy(&label_bytes[i * 8], &label, 8);
  }
  labels.set_data(std::move(label_bytes));
  ForwardArgs args;
  args.labels = std::move(labels);
  args.loss_reduction = v1::LOSS_REDUCTION_SUM;
  args.return_logits = false;
  args.loss_implementation = absl::GetFlag(FLAGS_loss_implementation) == "default"
                                 ? v1::LOSS_IMPLEMENTATION_DEFAULT
                                 : v1::LOSS_IMPLEMENTATION_FUSED_LINEAR;
  return MakeForwardRequest(x, args);
}

struct Totals {
  std::vector<double> latencies_ms;
  int64_t calls = 0;
  int64_t refusals = 0;  // RESOURCE_EXHAUSTED or UNAVAILABLE
  int64_t errors = 0;
  int64_t batch_size_sum = 0;
  int64_t queue_us_sum = 0;
  int64_t compute_us_sum = 0;
  int64_t server_us_sum = 0;  // ServerTimings.total_us: arrival to answer, in the server
  std::string first_error;
};

double Percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t index =
      std::min(values.size() - 1, static_cast<size_t>(std::ceil(q * values.size())) - 1);
  return values[index];
}

int Run() {
  const int clients = absl::GetFlag(FLAGS_clients);
  const int channels = std::max(1, absl::GetFlag(FLAGS_channels));
  ClientOptions options;
  options.max_attempts = absl::GetFlag(FLAGS_max_attempts);
  options.timeout = std::chrono::seconds(60);
  options.own_connection = true;  // --channels connections, not one shared by all
  std::vector<std::unique_ptr<LMHeadClient>> stubs;
  for (int c = 0; c < channels; ++c) {
    stubs.push_back(LMHeadClient::Connect(absl::GetFlag(FLAGS_address), options));
  }
  // A few distinct requests, shared by the callers (made once: the generator must not be the
  // bottleneck).
  std::vector<v1::ForwardRequest> requests;
  for (int r = 0; r < 8; ++r) requests.push_back(MakeRequest(1000 + r));

  const auto warmup = std::chrono::duration<double>(absl::GetFlag(FLAGS_warmup_seconds));
  const auto measured = std::chrono::duration<double>(absl::GetFlag(FLAGS_seconds));
  const Clock::time_point start = Clock::now();
  const Clock::time_point measure_from =
      start + std::chrono::duration_cast<Clock::duration>(warmup);
  const Clock::time_point measure_until =
      measure_from + std::chrono::duration_cast<Clock::duration>(measured);
  absl::Mutex mu;
  Totals totals;
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back([&, i] {
      Totals mine;
      LMHeadClient& stub = *stubs[i % channels];
      for (int64_t n = 0;; ++n) {
        const Clock::time_point sent = Clock::now();
        if (sent >= measure_until) break;
        absl::StatusOr<v1::ForwardResponse> response =
            stub.Forward(requests[(i + n) % requests.size()]);
        const Clock::time_point answered = Clock::now();
        if (sent < measure_from || answered > measure_until) continue;  // outside the window
        ++mine.calls;
        if (response.ok()) {
          // Latencies of answered calls only: a refusal comes back at once.
          mine.latencies_ms.push_back(
              std::chrono::duration<double, std::milli>(answered - sent).count());
          mine.batch_size_sum += response->timings().batch_size();
          mine.queue_us_sum += response->timings().queue_us();
          mine.compute_us_sum += response->timings().compute_us();
          mine.server_us_sum += response->timings().total_us();
        } else if (absl::IsResourceExhausted(response.status()) ||
                   absl::IsUnavailable(response.status())) {
          ++mine.refusals;
        } else {
          ++mine.errors;
          if (mine.first_error.empty()) mine.first_error = response.status().ToString();
        }
      }
      absl::MutexLock lock(&mu);
      totals.calls += mine.calls;
      totals.refusals += mine.refusals;
      totals.errors += mine.errors;
      totals.batch_size_sum += mine.batch_size_sum;
      totals.queue_us_sum += mine.queue_us_sum;
      totals.compute_us_sum += mine.compute_us_sum;
      totals.server_us_sum += mine.server_us_sum;
      totals.latencies_ms.insert(totals.latencies_ms.end(), mine.latencies_ms.begin(),
                                 mine.latencies_ms.end());
      if (totals.first_error.empty()) totals.first_error = mine.first_error;
    });
  }
  for (auto& thread : threads) thread.join();

  const int64_t ok = totals.calls - totals.refusals - totals.errors;
  const double seconds = measured.count();
  const double tokens_per_s = ok * absl::GetFlag(FLAGS_tokens) / seconds;
  const double p50 = Percentile(totals.latencies_ms, 0.50);
  const double p99 = Percentile(totals.latencies_ms, 0.99);
  std::printf(
      "load %s: clients=%d channels=%d tokens=%lld dtype=%s %s: %lld ok calls in %.0f s, %.0f "
      "tokens/s, latency p50 %.2f ms p99 %.2f ms (p99/p50 %.2f), refusals %lld, errors %lld, "
      "mean batch_size %.1f, mean queue %.1f ms, mean batch compute %.2f ms, mean in the server "
      "%.2f ms\n",
      absl::GetFlag(FLAGS_label).c_str(), clients, channels,
      static_cast<long long>(absl::GetFlag(FLAGS_tokens)), absl::GetFlag(FLAGS_dtype).c_str(),
      absl::GetFlag(FLAGS_loss_implementation).c_str(), static_cast<long long>(ok), seconds,
      tokens_per_s, p50, p99, p50 > 0 ? p99 / p50 : 0.0, static_cast<long long>(totals.refusals),
      static_cast<long long>(totals.errors),
      ok > 0 ? static_cast<double>(totals.batch_size_sum) / ok : 0.0,
      ok > 0 ? totals.queue_us_sum / 1000.0 / ok : 0.0,
      ok > 0 ? totals.compute_us_sum / 1000.0 / ok : 0.0,
      ok > 0 ? totals.server_us_sum / 1000.0 / ok : 0.0);
  if (!totals.first_error.empty()) std::printf("first error: %s\n", totals.first_error.c_str());
  if (ok == 0) std::printf("no call was answered: is a server at --address?\n");
  const double kernel = absl::GetFlag(FLAGS_kernel_tokens_per_s);
  if (kernel > 0) {
    std::printf("load %s: %.1f%% of kernel-only (%.0f tokens/s)\n",
                absl::GetFlag(FLAGS_label).c_str(), 100 * tokens_per_s / kernel, kernel);
  }
  AppendResult("serving",
               {absl::GetFlag(FLAGS_d_model), absl::GetFlag(FLAGS_vocab_size),
                absl::GetFlag(FLAGS_tokens), absl::GetFlag(FLAGS_dtype),
                absl::StrFormat("C++ load, %d callers: %s", clients, absl::GetFlag(FLAGS_label)),
                p50, kernel > 0 ? "kernel-only" : "", kernel > 0 ? tokens_per_s / kernel : NAN, NAN,
                tokens_per_s, p99});
  return totals.errors == 0 && ok > 0 ? 0 : 1;
}

}  // namespace
}  // namespace lmhead

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Closed-loop load on a running lmhead_server: --clients callers over --channels channels, "
      "Forward calls of --tokens tokens for --seconds; prints tokens/s, p50/p99 latency, "
      "refusals and the server's batch sizes.");
  absl::FlagsUsageConfig usage;  // --help lists this file's flags
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "load_generator");
  };
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  return lmhead::Run();
}

// lmhead_server: serves OLMo-core LM heads over gRPC (lmhead.v1). Flags -> Options -> Server;
// SIGTERM or SIGINT drains and exits 0. `lmhead_server --help` lists every flag.
#include <malloc.h>
#include <pthread.h>
#include <signal.h>

#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/logging.h"
#include "server/options.h"
#include "server/server.h"

ABSL_FLAG(std::string, host, "0.0.0.0", "Address to listen on.");
ABSL_FLAG(int, port, 50051, "TCP port; 0 picks a free one (logged, and written to --port_file).");
ABSL_FLAG(std::string, port_file, "",
          "Write the bound port to this file once serving (for scripts and tests).");
ABSL_FLAG(std::vector<std::string>, model, {},
          "NAME=PATH.safetensors; repeatable (or comma-separated). The head config is read "
          "from PATH with .safetensors replaced by .json, else from --head_config. The first "
          "model is the default. None: the embedded demo head 'demo'.");
ABSL_FLAG(std::string, head_config, "",
          "LMHeadConfig JSON for models without a .json beside their weights, e.g. "
          "'{\"name\":\"default\",\"layer_norm\":{\"name\":\"rms\"},\"bias\":false}'.");
ABSL_FLAG(std::string, device, "cpu", "cpu or cuda:N (CUDA needs a --config=cuda build).");
ABSL_FLAG(int64_t, demo_d_model, 64, "Hidden size of the demo head.");
ABSL_FLAG(int64_t, demo_vocab_size, 1000, "Vocabulary size of the demo head.");
ABSL_FLAG(uint64_t, demo_seed, 0, "Initialisation seed of the demo head.");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{288} << 20,
          "Largest request message, bytes (default 288 MiB: 256 MiB of hidden states with "
          "their labels fit).");
ABSL_FLAG(int64_t, max_response_bytes, (int64_t{2} << 30) - (int64_t{1} << 20),
          "Largest response, bytes; requests whose logits exceed it are rejected up front.");
ABSL_FLAG(int, max_concurrent_requests, 4,
          "Forward/ForwardStream calls running at once; more get RESOURCE_EXHAUSTED.");
ABSL_FLAG(bool, stream_read_ahead, true,
          "ForwardStream reads, decodes and uploads the next micro-batch while the current one "
          "computes (two held at most); false: one at a time.");
ABSL_FLAG(int, max_config_variants, 4,
          "Converted weight copies a model keeps for per-request dtype overrides; 0: none.");
ABSL_FLAG(double, shutdown_grace_seconds, 30,
          "On SIGTERM/SIGINT, how long in-flight calls may finish before being cancelled.");
ABSL_FLAG(std::string, log_format, "text", "text or json (one JSON object per line).");
ABSL_FLAG(std::string, log_level, "info", "trace, debug, info, warn, error, critical or off.");

namespace {

// absl keeps only the last value of a repeated flag; --model accumulates, so its occurrences
// are collected from argv before absl parses (which then sees them too, harmlessly).
std::vector<std::string> CollectModelFlags(int argc, char** argv) {
  std::vector<std::string> values;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--") break;
    std::string value;
    if (absl::StartsWith(arg, "--model=")) {
      value = arg.substr(8);
    } else if ((arg == "--model") && i + 1 < argc) {
      value = argv[++i];
    } else {
      continue;
    }
    for (absl::string_view part : absl::StrSplit(value, ',', absl::SkipEmpty())) {
      values.emplace_back(part);
    }
  }
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  // SIGTERM and SIGINT are taken by one thread with sigwait; blocked before any other thread
  // exists so that every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  // Blocks of 1 MiB and more (tensors, message buffers) are mmapped and handed back to the
  // kernel when freed. Without a fixed threshold glibc raises it as large blocks are freed
  // and serves them from arenas instead, where they fragment: the server's footprint would
  // creep up over a long stream rather than follow the current micro-batch.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);

  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::EndsWith(file, "server/main.cc");
  };
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "Serves OLMo-core LM heads over gRPC (lmhead.v1.LMHeadService, grpc.health.v1, "
      "reflection).\nUsage: lmhead_server [--port=50051] [--model=NAME=PATH.safetensors]...");
  const std::vector<std::string> model_flags = CollectModelFlags(argc, argv);
  absl::ParseCommandLine(argc, argv);

  lmhead::Options options;
  options.host = absl::GetFlag(FLAGS_host);
  options.port = absl::GetFlag(FLAGS_port);
  options.port_file = absl::GetFlag(FLAGS_port_file);
  for (const std::string& spec : model_flags) {
    const std::vector<std::string> parts = absl::StrSplit(spec, absl::MaxSplits('=', 1));
    if (parts.size() != 2 || parts[0].empty() || parts[1].empty()) {
      std::cerr << "--model '" << spec << "': expected NAME=PATH.safetensors\n";
      return 2;
    }
    options.models.push_back({parts[0], parts[1]});
  }
  options.head_config_json = absl::GetFlag(FLAGS_head_config);
  options.device = absl::GetFlag(FLAGS_device);
  options.demo_d_model = absl::GetFlag(FLAGS_demo_d_model);
  options.demo_vocab_size = absl::GetFlag(FLAGS_demo_vocab_size);
  options.demo_seed = absl::GetFlag(FLAGS_demo_seed);
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.max_response_bytes = absl::GetFlag(FLAGS_max_response_bytes);
  options.max_concurrent_requests = absl::GetFlag(FLAGS_max_concurrent_requests);
  options.max_config_variants = absl::GetFlag(FLAGS_max_config_variants);
  options.stream_read_ahead = absl::GetFlag(FLAGS_stream_read_ahead);
  options.shutdown_grace_seconds = absl::GetFlag(FLAGS_shutdown_grace_seconds);
  options.log_level = absl::GetFlag(FLAGS_log_level);
  const std::string log_format = absl::GetFlag(FLAGS_log_format);
  if (log_format != "text" && log_format != "json") {
    std::cerr << "--log_format: expected text or json, got '" << log_format << "'\n";
    return 2;
  }
  options.log_format = log_format == "json" ? lmhead::LogFormat::kJson : lmhead::LogFormat::kText;
  if (absl::Status status = lmhead::InitLogging(options.log_format, options.log_level);
      !status.ok()) {
    std::cerr << "--" << status.message() << "\n";
    return 2;
  }

  absl::StatusOr<std::unique_ptr<lmhead::Server>> server = lmhead::Server::Start(options);
  if (!server.ok()) {
    lmhead::LogError(lmhead::kNoRequest,
                     absl::StrCat("cannot start: ", server.status().ToString()));
    return 1;
  }
  std::thread signal_waiter([&signals, &server]() {
    int signal = 0;
    sigwait(&signals, &signal);
    lmhead::LogInfo(lmhead::kNoRequest,
                    absl::StrCat("received ", signal == SIGTERM ? "SIGTERM" : "SIGINT"));
    (*server)->Shutdown();
  });
  (*server)->Wait();
  signal_waiter.join();
  return 0;
}

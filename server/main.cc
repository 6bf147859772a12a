// lmhead_server: serves OLMo-core LM heads over gRPC (lmhead.v1). Flags -> Options -> Server;
// SIGTERM or SIGINT drains and exits 0. `lmhead_server --help` lists every flag.
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/logging.h"
#include "server/options.h"
#include "server/server.h"

namespace {
// The defaults of every flag come from Options (server/options.h), where they are documented.
const lmhead::Options kDefaults;
}  // namespace

ABSL_FLAG(std::string, host, kDefaults.host,
          "Address to listen on (one socket); one that is not loopback needs TLS, "
          "--auth_token_file or --allow_insecure.");
ABSL_FLAG(bool, allow_insecure, kDefaults.allow_insecure,
          "Allow a --host that is not loopback without TLS or --auth_token_file: anyone who "
          "reaches the port can use the server.");
ABSL_FLAG(std::string, tls_cert, kDefaults.tls_cert,
          "TLS: the server's certificate chain (PEM); with --tls_key the port speaks only TLS.");
ABSL_FLAG(std::string, tls_key, kDefaults.tls_key, "TLS: the private key of --tls_cert (PEM).");
ABSL_FLAG(std::string, tls_client_ca, kDefaults.tls_client_ca,
          "Mutual TLS: the CAs (PEM bundle) whose client certificates are accepted; clients "
          "without one are refused.");
ABSL_FLAG(int, health_port, kDefaults.health_port,
          "A plaintext port serving only grpc.health.v1, for probes that cannot speak TLS (0: a "
          "free port, logged); -1: none.");
ABSL_FLAG(int, metrics_port, kDefaults.metrics_port,
          "Prometheus metrics at http://HOST:PORT/metrics (plain HTTP, no tokens; 0: a free "
          "port, logged); -1: none.");
ABSL_FLAG(int, tls_reload_seconds, kDefaults.tls_reload_seconds,
          "How often the TLS files are re-read (renewed certificates apply without a restart), "
          "1 to 86400.");
ABSL_FLAG(std::string, auth_token_file, kDefaults.auth_token_file,
          "Bearer tokens, one per line (16 to 4096 printable ASCII characters without spaces): "
          "every LMHeadService call must carry 'authorization: Bearer TOKEN' with one of them "
          "(the health service is not checked; reflection is then off).");
ABSL_FLAG(std::string, admin_token_file, kDefaults.admin_token_file,
          "File of administrator tokens, one per line, none of them in --auth_token_file: "
          "ModelAdminService's calls (LoadModel, UnloadModel) need 'authorization: Bearer "
          "TOKEN' with one of them. Default: model administration off.");
ABSL_FLAG(std::string, model_repository, kDefaults.model_repository,
          "Directory that LoadModel reads weights from (paths relative to it, none leading "
          "out). Default: LoadModel refused.");
ABSL_FLAG(int, port, kDefaults.port,
          "TCP port; 0 picks a free one (logged, and written to --port_file).");
ABSL_FLAG(std::string, port_file, kDefaults.port_file,
          "Write the bound port to this file once serving (for scripts and tests).");
ABSL_FLAG(std::vector<std::string>, model, {},
          "NAME=PATH.safetensors; repeatable (or comma-separated). NAME is 1-128 characters of "
          "[A-Za-z0-9._-]. The head config is read from PATH with .safetensors replaced by "
          ".json, else from --head_config. The first model is the default. None: the embedded "
          "demo head 'demo'.");
ABSL_FLAG(std::string, head_config, kDefaults.head_config_json,
          "LMHeadConfig JSON for models without a .json beside their weights, e.g. "
          "'{\"name\":\"default\",\"layer_norm\":{\"name\":\"rms\"},\"bias\":false}'.");
ABSL_FLAG(std::string, device, kDefaults.device,
          "Where compute runs, one executor each: a comma-separated list of cpu, cuda (every "
          "visible GPU) and cuda:N, e.g. cuda:0,cuda:1; an entry may repeat (CUDA needs a "
          "--config=cuda build).");
ABSL_FLAG(bool, expose_model_paths, kDefaults.expose_model_paths,
          "ListModels/GetModel show each weights file's full path; default: its file name only.");
ABSL_FLAG(int64_t, demo_d_model, kDefaults.demo_d_model, "Hidden size of the demo head.");
ABSL_FLAG(int64_t, demo_vocab_size, kDefaults.demo_vocab_size, "Vocabulary size of the demo head.");
ABSL_FLAG(uint64_t, demo_seed, kDefaults.demo_seed, "Initialisation seed of the demo head.");
ABSL_FLAG(std::string, demo_dtype, kDefaults.demo_dtype,
          "Parameter dtype of the demo head: float32, bfloat16 or float16.");
ABSL_FLAG(int64_t, max_message_bytes, kDefaults.max_message_bytes,
          "Largest request message, bytes, 1 to 2^31-1 (default 288 MiB: 256 MiB of hidden "
          "states with their labels fit).");
ABSL_FLAG(int64_t, max_response_bytes, kDefaults.max_response_bytes,
          "Largest response, counted as the bytes of all its tensors (logits, losses, argmax), "
          "1 to 2 GiB - 1 MiB (the default); larger requests are refused before any compute.");
ABSL_FLAG(int64_t, max_batch_tokens, kDefaults.max_batch_tokens,
          "Dynamic batching: calls for one model are packed into forwards of up to this many "
          "tokens (B*S summed); a larger call runs alone; 1 turns packing off.");
ABSL_FLAG(int64_t, max_queue_delay_us, kDefaults.max_queue_delay_us,
          "How long an idle executor waits for more calls to fill a batch, microseconds.");
ABSL_FLAG(int64_t, max_queue_tokens, kDefaults.max_queue_tokens,
          "Tokens that may wait in the queue; beyond it calls get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int, max_open_streams, kDefaults.max_open_streams,
          "ForwardStream calls open at once; more get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int, grpc_completion_queues, kDefaults.grpc_completion_queues,
          "gRPC completion queues; 0: one per CPU core, at most 16.");
ABSL_FLAG(int, grpc_max_pollers, kDefaults.grpc_max_pollers,
          "Most gRPC threads waiting for calls per completion queue (more threads end when idle).");
ABSL_FLAG(int, http2_max_frame_bytes, kDefaults.http2_max_frame_bytes,
          "Largest HTTP/2 frame the server accepts, 16384 to 16777215 bytes; 0: gRPC's 16 KiB.");
ABSL_FLAG(int, http2_stream_window_bytes, kDefaults.http2_stream_window_bytes,
          "HTTP/2 flow-control window offered per stream before BDP probing adapts it, 65535 to "
          "2^31 - 1 bytes; 0: gRPC's 64 KiB.");
ABSL_FLAG(bool, http2_bdp_probe, kDefaults.http2_bdp_probe,
          "Adapt HTTP/2 windows to the connection's bandwidth-delay product (gRPC's BDP probe).");
ABSL_FLAG(int, http2_write_buffer_bytes, kDefaults.http2_write_buffer_bytes,
          "Bytes gRPC may buffer for writing per connection, 0 to 2^31 - 1; -1: gRPC's own.");
ABSL_FLAG(bool, stream_read_ahead, kDefaults.stream_read_ahead,
          "ForwardStream reads, decodes and uploads the next micro-batch while the current one "
          "computes (two held at most); false: one at a time.");
ABSL_FLAG(bool, allow_shared_memory, kDefaults.allow_shared_memory,
          "Same-host shared memory for tensors: the SharedMemory RPC (local clients only) and "
          "requests that reference its regions; off: FAILED_PRECONDITION.");
ABSL_FLAG(int, max_shared_memory_regions, kDefaults.max_shared_memory_regions,
          "Regions one SharedMemory session may hold at once, 1 to 4096.");
ABSL_FLAG(int, max_shared_memory_sessions, kDefaults.max_shared_memory_sessions,
          "SharedMemory sessions open at once (each holds a server thread), 1 to 1024; more get "
          "RESOURCE_EXHAUSTED.");
ABSL_FLAG(std::string, shared_memory_key_prefix, kDefaults.shared_memory_key_prefix,
          "Shared-memory objects a client may register: only keys starting with this (\"\": any "
          "the server may open).");
ABSL_FLAG(bool, pin_shared_memory, kDefaults.pin_shared_memory,
          "On CUDA, page-lock shared-memory regions at registration so the GPU reads them by DMA "
          "(no staging copy); their pages stay in RAM while registered.");
ABSL_FLAG(int, max_config_variants, kDefaults.max_config_variants,
          "Converted weight copies a model keeps for per-request dtype overrides; 0: none.");
ABSL_FLAG(double, shutdown_grace_seconds, kDefaults.shutdown_grace_seconds,
          "On SIGTERM/SIGINT, how long in-flight calls may finish before being cancelled.");
ABSL_FLAG(int, max_connection_age_seconds, kDefaults.max_connection_age_seconds,
          "Ask each client connection to close after this many seconds (calls on it finish; the "
          "client reconnects and resolves the name again, finding new replicas); 0: never.");
ABSL_FLAG(double, malloc_trim_seconds, kDefaults.malloc_trim_seconds,
          "How often the pages of freed memory are handed back to the kernel (malloc_trim), "
          "seconds; 0: never.");
ABSL_FLAG(bool, malloc_huge_pages, true,
          "Back malloc's large blocks with transparent huge pages (glibc.malloc.hugetlb=1; the "
          "server restarts itself once with it set in GLIBC_TUNABLES, unless that names it "
          "already): a fresh 64 MiB message costs 32 page faults instead of 16384.");
ABSL_FLAG(std::string, log_format, "text", "text or json (one JSON object per line).");
ABSL_FLAG(std::string, log_level, kDefaults.log_level,
          "trace, debug, info, warn, error, critical or off.");

namespace {

// The value of every occurrence of --NAME in argv (as --NAME=VALUE or --NAME VALUE), in order.
// absl keeps only the last value of a repeated flag, and cannot tell an explicitly empty value
// from an unset one; these are read here, before absl parses argv (which then sees them too).
std::vector<std::string> FlagValues(int argc, char** argv, absl::string_view name) {
  const std::string bare = absl::StrCat("--", name);
  const std::string with_value = absl::StrCat(bare, "=");
  std::vector<std::string> values;
  for (int i = 1; i < argc; ++i) {
    const absl::string_view arg = argv[i];
    if (arg == "--") break;
    if (absl::StartsWith(arg, with_value)) {
      values.emplace_back(arg.substr(with_value.size()));
    } else if (arg == bare && i + 1 < argc) {
      values.emplace_back(argv[++i]);
    }
  }
  return values;
}

// Flags whose value, when given, must not be empty (an empty --model would otherwise silently
// serve the demo head).
constexpr absl::string_view kNonEmptyFlags[] = {
    "model",           "host",       "port_file",  "head_config",     "device",
    "log_level",       "log_format", "demo_dtype", "auth_token_file", "admin_token_file",
    "model_repository"};

// Runs this binary again, with the same arguments, with glibc's malloc told to back its blocks
// with transparent huge pages (docs/notes/huge_pages.md), unless GLIBC_TUNABLES already names
// glibc.malloc.hugetlb (the operator's choice, or this restart). Returns only if it cannot.
void RestartWithHugePages(char** argv) {
  const char* given = std::getenv("GLIBC_TUNABLES");
  std::string tunables = given == nullptr ? "" : given;
  if (absl::StrContains(tunables, "glibc.malloc.hugetlb")) return;
  absl::StrAppend(&tunables, tunables.empty() ? "" : ":", "glibc.malloc.hugetlb=1");
  if (setenv("GLIBC_TUNABLES", tunables.c_str(), 1) != 0) return;
  execv("/proc/self/exe", argv);
  // Not restarted (no /proc): go on as we are, without the variable.
  if (given == nullptr) {
    unsetenv("GLIBC_TUNABLES");
  } else {
    setenv("GLIBC_TUNABLES", given, 1);
  }
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
  // One malloc arena for every thread (docs/SOAK.md): with glibc's default of one per thread,
  // up to 8 per core, each of gRPC's many handler threads grows an arena of its own to the peak
  // of the calls it served, and the server's footprint keeps rising for many minutes.
  mallopt(M_ARENA_MAX, 1);

  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::EndsWith(file, "server/main.cc");
  };
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "Serves OLMo-core LM heads over gRPC (lmhead.v1.LMHeadService, grpc.health.v1, and "
      "reflection unless --auth_token_file is given).\nUsage: lmhead_server [--port=50051] "
      "[--model=NAME=PATH.safetensors]...");
  for (const absl::string_view flag : kNonEmptyFlags) {
    for (const std::string& value : FlagValues(argc, argv, flag)) {
      if (absl::StripAsciiWhitespace(value).empty()) {
        std::cerr << "--" << flag << ": given an empty value\n";
        return 2;
      }
    }
  }
  std::vector<std::string> model_flags;
  for (const std::string& value : FlagValues(argc, argv, "model")) {
    for (absl::string_view part : absl::StrSplit(value, ',')) model_flags.emplace_back(part);
  }
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) {
    // abseil reads "--flag false" as --flag and a stray "false": a boolean flag takes its value
    // after '=' only, and the server takes no arguments but flags.
    std::cerr << "unexpected argument '" << positional[1]
              << "': the server takes flags only, and a boolean flag its value after '=' "
                 "(--allow_shared_memory=false, not --allow_shared_memory false)\n";
    return 2;
  }

  // Before any thread exists (the restart keeps the blocked signals).
  if (absl::GetFlag(FLAGS_malloc_huge_pages)) RestartWithHugePages(argv);

  lmhead::Options options;
  options.host = absl::GetFlag(FLAGS_host);
  options.allow_insecure = absl::GetFlag(FLAGS_allow_insecure);
  options.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  options.tls_reload_seconds = absl::GetFlag(FLAGS_tls_reload_seconds);
  options.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  options.health_port = absl::GetFlag(FLAGS_health_port);
  options.auth_token_file = absl::GetFlag(FLAGS_auth_token_file);
  options.admin_token_file = absl::GetFlag(FLAGS_admin_token_file);
  options.model_repository = absl::GetFlag(FLAGS_model_repository);
  options.port = absl::GetFlag(FLAGS_port);
  options.port_file = absl::GetFlag(FLAGS_port_file);
  for (const std::string& spec : model_flags) {
    const std::vector<std::string> parts = absl::StrSplit(spec, absl::MaxSplits('=', 1));
    if (parts.size() != 2 || parts[0].empty() || parts[1].empty()) {
      std::cerr << "--model: expected NAME=PATH.safetensors, got '" << absl::CHexEscape(spec)
                << "'\n";
      return 2;
    }
    options.models.push_back({parts[0], parts[1]});
  }
  options.head_config_json = absl::GetFlag(FLAGS_head_config);
  options.device = absl::GetFlag(FLAGS_device);
  options.expose_model_paths = absl::GetFlag(FLAGS_expose_model_paths);
  options.demo_d_model = absl::GetFlag(FLAGS_demo_d_model);
  options.demo_vocab_size = absl::GetFlag(FLAGS_demo_vocab_size);
  options.demo_seed = absl::GetFlag(FLAGS_demo_seed);
  options.demo_dtype = absl::GetFlag(FLAGS_demo_dtype);
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.max_response_bytes = absl::GetFlag(FLAGS_max_response_bytes);
  options.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  options.max_queue_delay_us = absl::GetFlag(FLAGS_max_queue_delay_us);
  options.max_queue_tokens = absl::GetFlag(FLAGS_max_queue_tokens);
  options.max_open_streams = absl::GetFlag(FLAGS_max_open_streams);
  options.grpc_completion_queues = absl::GetFlag(FLAGS_grpc_completion_queues);
  options.grpc_max_pollers = absl::GetFlag(FLAGS_grpc_max_pollers);
  options.http2_max_frame_bytes = absl::GetFlag(FLAGS_http2_max_frame_bytes);
  options.http2_stream_window_bytes = absl::GetFlag(FLAGS_http2_stream_window_bytes);
  options.http2_bdp_probe = absl::GetFlag(FLAGS_http2_bdp_probe);
  options.http2_write_buffer_bytes = absl::GetFlag(FLAGS_http2_write_buffer_bytes);
  options.max_config_variants = absl::GetFlag(FLAGS_max_config_variants);
  options.allow_shared_memory = absl::GetFlag(FLAGS_allow_shared_memory);
  options.max_shared_memory_regions = absl::GetFlag(FLAGS_max_shared_memory_regions);
  options.max_shared_memory_sessions = absl::GetFlag(FLAGS_max_shared_memory_sessions);
  options.shared_memory_key_prefix = absl::GetFlag(FLAGS_shared_memory_key_prefix);
  options.pin_shared_memory = absl::GetFlag(FLAGS_pin_shared_memory);
  options.stream_read_ahead = absl::GetFlag(FLAGS_stream_read_ahead);
  options.shutdown_grace_seconds = absl::GetFlag(FLAGS_shutdown_grace_seconds);
  options.max_connection_age_seconds = absl::GetFlag(FLAGS_max_connection_age_seconds);
  options.malloc_trim_seconds = absl::GetFlag(FLAGS_malloc_trim_seconds);
  options.log_level = absl::GetFlag(FLAGS_log_level);
  const std::string log_format = absl::GetFlag(FLAGS_log_format);
  if (log_format != "text" && log_format != "json") {
    std::cerr << "--log_format: expected text or json, got '" << log_format << "'\n";
    return 2;
  }
  options.log_format = log_format == "json" ? lmhead::LogFormat::kJson : lmhead::LogFormat::kText;
  if (absl::Status status = lmhead::ValidateOptions(options); !status.ok()) {
    std::cerr << status.message() << "\n";
    return 2;
  }
  if (absl::Status status = lmhead::InitLogging(options.log_format, options.log_level);
      !status.ok()) {
    std::cerr << "--" << status.message() << "\n";
    return 2;
  }

  if (const char* tunables = std::getenv("GLIBC_TUNABLES");
      tunables != nullptr && absl::StrContains(tunables, "glibc.malloc.hugetlb")) {
    std::ifstream mode_file("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string mode;
    std::getline(mode_file, mode);
    lmhead::LogInfo(lmhead::kNoRequest, absl::StrCat("malloc: GLIBC_TUNABLES=", tunables,
                                                     "; the kernel's transparent huge pages: ",
                                                     mode.empty() ? "unknown" : mode));
  }
  absl::StatusOr<std::unique_ptr<lmhead::Server>> server = lmhead::Server::Start(options);
  if (!server.ok()) {
    lmhead::LogError(lmhead::kNoRequest,
                     absl::StrCat("cannot start: ", server.status().ToString()));
    return 1;
  }
  // Freed memory stays resident where it lies between blocks in use (one arena, above): a burst
  // of calls can leave the footprint a few MiB higher for good (docs/SOAK.md). Handing those
  // pages back now and then keeps it at what is in use.
  absl::Notification stopping;
  std::thread trimmer;
  if (options.malloc_trim_seconds > 0) {
    trimmer = std::thread([&stopping, seconds = options.malloc_trim_seconds]() {
      while (!stopping.WaitForNotificationWithTimeout(absl::Seconds(seconds))) malloc_trim(0);
    });
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
  stopping.Notify();
  if (trimmer.joinable()) trimmer.join();
  return 0;
}

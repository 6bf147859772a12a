#include "server/options.h"

#include <climits>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "core/config.h"
#include "server/auth.h"

namespace lmhead {
namespace {

absl::Status Invalid(absl::string_view flag, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", message));
}

}  // namespace

bool IsLoopbackHost(absl::string_view host) {
  return absl::StartsWith(host, "127.") || host == "localhost" || host == "::1" || host == "[::1]";
}

std::string HostPort(const std::string& host, int port) {
  const bool bare_ipv6 = absl::StrContains(host, ':') && !absl::StartsWith(host, "[");
  return bare_ipv6 ? absl::StrCat("[", host, "]:", port) : absl::StrCat(host, ":", port);
}

namespace {

bool IsDeviceName(absl::string_view device) {
  if (device == "cpu" || device == "cuda") return true;
  if (!absl::ConsumePrefix(&device, "cuda:") || device.empty() || device.size() > 3) return false;
  for (const char c : device) {
    if (!absl::ascii_isdigit(c)) return false;
  }
  return true;
}

}  // namespace

bool IsModelName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxModelNameBytes) return false;
  for (const char c : name) {
    if (!absl::ascii_isalnum(c) && c != '.' && c != '_' && c != '-') return false;
  }
  return true;
}

absl::Status ValidateOptions(const Options& options) {
  if (options.host.empty()) return Invalid("host", "must not be empty (e.g. 127.0.0.1)");
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    return Invalid(options.tls_cert.empty() ? "tls_cert" : "tls_key",
                   "--tls_cert and --tls_key go together (the certificate chain and its key)");
  }
  if (!options.tls_client_ca.empty() && options.tls_cert.empty()) {
    return Invalid("tls_client_ca", "needs --tls_cert and --tls_key (mutual TLS is TLS)");
  }
  const std::pair<const char*, std::string> tls_files[] = {
      {"tls_cert", options.tls_cert},
      {"tls_key", options.tls_key},
      {"tls_client_ca", options.tls_client_ca}};
  for (const auto& [flag, path] : tls_files) {
    if (path.empty()) continue;
    std::ifstream file(path);
    std::stringstream text;
    text << file.rdbuf();
    if (!file || !absl::StrContains(text.str(), "-----BEGIN ")) {
      return Invalid(flag, absl::StrCat("cannot read a PEM file at ", path));
    }
  }
  if (options.health_port < -1 || options.health_port > 65535) {
    return Invalid("health_port", absl::StrCat("expected -1 (none), 0 (any free port) to 65535, "
                                               "got ",
                                               options.health_port));
  }
  if (!options.auth_token_file.empty()) {
    // Read here too, so that a bad file is a flag error like the others (exit status 2).
    if (absl::Status read = BearerTokens::Read(options.auth_token_file).status(); !read.ok()) {
      return read;
    }
  }
  if (!options.admin_token_file.empty()) {
    absl::StatusOr<std::unique_ptr<const BearerTokens>> admin =
        BearerTokens::Read(options.admin_token_file, "admin_token_file");
    if (!admin.ok()) return admin.status();
    if (!options.auth_token_file.empty() &&
        (*admin)->SharesATokenWith(**BearerTokens::Read(options.auth_token_file))) {
      return Invalid("admin_token_file",
                     "a token in it is also in --auth_token_file: every caller holding it could "
                     "load and unload models; give administrators tokens of their own");
    }
  }
  if (!options.model_repository.empty() && options.admin_token_file.empty()) {
    return Invalid("model_repository",
                   "only LoadModel reads it, and LoadModel needs --admin_token_file (model "
                   "administration is off without it)");
  }
  if (!options.model_repository.empty() &&
      !std::filesystem::is_directory(options.model_repository)) {
    return Invalid("model_repository", absl::StrCat("no directory at ", options.model_repository));
  }
  if (options.metrics_port < -1 || options.metrics_port > 65535) {
    return Invalid("metrics_port", absl::StrCat("expected -1 (none), 0 (any free port) to 65535, "
                                                "got ",
                                                options.metrics_port));
  }
  if (options.tls_reload_seconds < 1 || options.tls_reload_seconds > 86400) {
    return Invalid("tls_reload_seconds",
                   absl::StrCat("expected 1 to 86400, got ", options.tls_reload_seconds));
  }
  if (!IsLoopbackHost(options.host) && options.tls_cert.empty() &&
      options.auth_token_file.empty() && !options.allow_insecure) {
    return Invalid("host",
                   absl::StrCat(options.host,
                                " is not a loopback address, and neither TLS (--tls_cert) nor "
                                "--auth_token_file is given: anyone who reaches the port could use "
                                "the server's devices and read its outputs. Listen on 127.0.0.1, "
                                "add TLS or tokens, or pass --allow_insecure to serve without "
                                "them behind a network policy"));
  }
  if (options.port < 0 || options.port > 65535) {
    return Invalid("port", absl::StrCat("expected 0 (any free port) to 65535, got ", options.port));
  }
  std::set<std::string> names;
  for (const ModelSpec& model : options.models) {
    if (!IsModelName(model.name)) {
      return Invalid("model", absl::StrCat("a model name is 1 to ", kMaxModelNameBytes,
                                           " characters of [A-Za-z0-9._-]"));
    }
    if (model.path.empty()) {
      return Invalid("model", absl::StrCat("model '", model.name, "' has an empty path"));
    }
    if (!names.insert(model.name).second) {
      return Invalid("model", absl::StrCat("model '", model.name, "' is given twice"));
    }
  }
  for (absl::string_view device : absl::StrSplit(options.device, ',')) {
    if (!IsDeviceName(device)) {
      return Invalid("device",
                     "expected a comma-separated list of cpu, cuda (every GPU) and cuda:N, e.g. "
                     "cuda:0,cuda:1");
    }
  }
  if (options.demo_d_model <= 0) {
    return Invalid("demo_d_model", absl::StrCat("must be positive, got ", options.demo_d_model));
  }
  if (options.demo_vocab_size <= 0) {
    return Invalid("demo_vocab_size",
                   absl::StrCat("must be positive, got ", options.demo_vocab_size));
  }
  if (!ParseDType(options.demo_dtype).ok()) {
    return Invalid("demo_dtype", "expected float32, bfloat16 or float16");
  }
  if (options.max_message_bytes < 1 || options.max_message_bytes > INT_MAX) {
    return Invalid("max_message_bytes",
                   absl::StrCat("expected 1 to ", INT_MAX, " (gRPC's limit), got ",
                                options.max_message_bytes));
  }
  if (options.max_response_bytes < 1 || options.max_response_bytes > kMaxResponseBytesLimit) {
    return Invalid("max_response_bytes",
                   absl::StrCat("expected 1 to ", kMaxResponseBytesLimit,
                                " (protobuf's 2 GiB message limit less 1 MiB for framing), got ",
                                options.max_response_bytes));
  }
  if (options.max_batch_tokens < 1) {
    return Invalid("max_batch_tokens",
                   absl::StrCat("must be at least 1, got ", options.max_batch_tokens));
  }
  if (options.max_queue_delay_us < 0 || options.max_queue_delay_us > 10'000'000) {
    return Invalid("max_queue_delay_us",
                   absl::StrCat("expected 0 to 10000000 (10 s), got ", options.max_queue_delay_us));
  }
  if (options.max_queue_tokens < 1) {
    return Invalid("max_queue_tokens",
                   absl::StrCat("must be at least 1, got ", options.max_queue_tokens));
  }
  if (options.grpc_completion_queues < 0 || options.grpc_completion_queues > 256) {
    return Invalid("grpc_completion_queues", absl::StrCat("expected 0 (one per core) to 256, got ",
                                                          options.grpc_completion_queues));
  }
  if (options.grpc_max_pollers < 1 || options.grpc_max_pollers > 1024) {
    return Invalid("grpc_max_pollers",
                   absl::StrCat("expected 1 to 1024, got ", options.grpc_max_pollers));
  }
  if (options.http2_max_frame_bytes != 0 &&
      (options.http2_max_frame_bytes < 16384 || options.http2_max_frame_bytes > 16777215)) {
    return Invalid("http2_max_frame_bytes",
                   absl::StrCat("expected 0 (gRPC's 16 KiB) or 16384 to 16777215, got ",
                                options.http2_max_frame_bytes));
  }
  if (options.http2_stream_window_bytes != 0 && options.http2_stream_window_bytes < 65535) {
    return Invalid("http2_stream_window_bytes",
                   absl::StrCat("expected 0 (gRPC's 64 KiB) or 65535 to 2147483647, got ",
                                options.http2_stream_window_bytes));
  }
  if (options.http2_write_buffer_bytes < -1) {
    return Invalid("http2_write_buffer_bytes",
                   absl::StrCat("expected -1 (gRPC's own) or 0 to 2147483647, got ",
                                options.http2_write_buffer_bytes));
  }
  if (options.max_open_streams < 1) {
    return Invalid("max_open_streams",
                   absl::StrCat("must be at least 1, got ", options.max_open_streams));
  }
  if (options.max_shared_memory_regions < 1 || options.max_shared_memory_regions > 4096) {
    return Invalid("max_shared_memory_regions",
                   absl::StrCat("expected 1 to 4096, got ", options.max_shared_memory_regions));
  }
  if (options.max_shared_memory_sessions < 1 || options.max_shared_memory_sessions > 1024) {
    return Invalid("max_shared_memory_sessions",
                   absl::StrCat("expected 1 to 1024, got ", options.max_shared_memory_sessions));
  }
  if (!options.shared_memory_key_prefix.empty() &&
      (options.shared_memory_key_prefix.front() != '/' ||
       options.shared_memory_key_prefix.find('/', 1) != std::string::npos)) {
    return Invalid("shared_memory_key_prefix",
                   absl::StrCat("expected \"\" or \"/\" and a name without '/', got '",
                                options.shared_memory_key_prefix, "'"));
  }
  if (options.max_config_variants < 0) {
    return Invalid("max_config_variants", absl::StrCat("must be 0 (no overrides) or more, got ",
                                                       options.max_config_variants));
  }
  if (options.max_connection_age_seconds < 0 || options.max_connection_age_seconds > 604800) {
    return Invalid("max_connection_age_seconds",
                   absl::StrCat("expected 0 (never) to 604800 (a week), got ",
                                options.max_connection_age_seconds));
  }
  if (!std::isfinite(options.shutdown_grace_seconds) || options.shutdown_grace_seconds < 0) {
    return Invalid("shutdown_grace_seconds", absl::StrCat("must be a finite number >= 0, got ",
                                                          options.shutdown_grace_seconds));
  }
  if (!std::isfinite(options.malloc_trim_seconds) || options.malloc_trim_seconds < 0) {
    return Invalid("malloc_trim_seconds",
                   absl::StrCat("must be a finite number >= 0, got ", options.malloc_trim_seconds));
  }
  return absl::OkStatus();
}

}  // namespace lmhead

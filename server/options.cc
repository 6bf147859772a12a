#include "server/options.h"

#include <climits>
#include <cmath>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace lmhead {
namespace {

absl::Status Invalid(absl::string_view flag, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", message));
}

bool IsDeviceSpec(absl::string_view device) {
  if (device == "cpu" || device == "cuda") return true;
  if (!absl::ConsumePrefix(&device, "cuda:") || device.empty() || device.size() > 3) return false;
  for (const char c : device) {
    if (!absl::ascii_isdigit(c)) return false;
  }
  return true;
}

bool IsModelName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxModelNameBytes) return false;
  for (const char c : name) {
    if (!absl::ascii_isalnum(c) && c != '.' && c != '_' && c != '-') return false;
  }
  return true;
}

}  // namespace

absl::Status ValidateOptions(const Options& options) {
  if (options.host.empty()) return Invalid("host", "must not be empty (e.g. 127.0.0.1)");
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
  if (!IsDeviceSpec(options.device)) {
    return Invalid("device", "expected cpu, cuda or cuda:N");
  }
  if (options.demo_d_model <= 0) {
    return Invalid("demo_d_model", absl::StrCat("must be positive, got ", options.demo_d_model));
  }
  if (options.demo_vocab_size <= 0) {
    return Invalid("demo_vocab_size",
                   absl::StrCat("must be positive, got ", options.demo_vocab_size));
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
  if (options.max_concurrent_requests < 1) {
    return Invalid("max_concurrent_requests",
                   absl::StrCat("must be at least 1, got ", options.max_concurrent_requests));
  }
  if (options.max_config_variants < 0) {
    return Invalid("max_config_variants", absl::StrCat("must be 0 (no overrides) or more, got ",
                                                       options.max_config_variants));
  }
  if (!std::isfinite(options.shutdown_grace_seconds) || options.shutdown_grace_seconds < 0) {
    return Invalid("shutdown_grace_seconds", absl::StrCat("must be a finite number >= 0, got ",
                                                          options.shutdown_grace_seconds));
  }
  return absl::OkStatus();
}

}  // namespace lmhead

// Server logging on spdlog: every line carries a request id ("-" for lines that belong to no
// request), as plain text or as one JSON object per line. Thread-safe once initialised.
#ifndef LMHEAD_SERVER_LOGGING_H_
#define LMHEAD_SERVER_LOGGING_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "server/options.h"

namespace lmhead {

// Sends log lines to stderr in `format` at `level` and above (spdlog level names).
// INVALID_ARGUMENT for an unknown level name. Call once, before logging.
absl::Status InitLogging(LogFormat format, absl::string_view level);

// Text:  2026-11-27T23:59:01.123 info [tid] request_id=7f3a... message
// JSON:  {"time":"...","level":"info","thread":123,"request_id":"7f3a...","message":"..."}
void LogInfo(absl::string_view request_id, absl::string_view message);
void LogWarning(absl::string_view request_id, absl::string_view message);
void LogError(absl::string_view request_id, absl::string_view message);
void LogDebug(absl::string_view request_id, absl::string_view message);

// The request id for log lines outside any request.
inline constexpr absl::string_view kNoRequest = "-";

// A fresh random request id (16 hex digits), for calls without an `x-request-id` header.
std::string NewRequestId();

}  // namespace lmhead

#endif  // LMHEAD_SERVER_LOGGING_H_

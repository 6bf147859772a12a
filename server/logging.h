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
// Control characters are escaped in both forms (a message cannot forge a line), and a message is
// cut after kMaxLogMessageBytes.
void LogInfo(absl::string_view request_id, absl::string_view message);
void LogWarning(absl::string_view request_id, absl::string_view message);
void LogError(absl::string_view request_id, absl::string_view message);
void LogDebug(absl::string_view request_id, absl::string_view message);

inline constexpr size_t kMaxLogMessageBytes = 16 << 10;

// A string a caller sent (a model name, an id), quoted for an error message or a log line:
// 'text' with quotes, backslashes, control and non-ASCII bytes C-escaped, and cut to its first
// `max_bytes` bytes with the full length noted ('abc'... (70000 bytes)).
std::string CallerText(absl::string_view text, size_t max_bytes = 64);

// The request id for log lines outside any request.
inline constexpr absl::string_view kNoRequest = "-";

// A fresh random request id (16 hex digits), for calls without an `x-request-id` header.
std::string NewRequestId();

}  // namespace lmhead

#endif  // LMHEAD_SERVER_LOGGING_H_

#include "server/logging.h"

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <random>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lmhead {
namespace {

std::atomic<LogFormat> g_format{LogFormat::kText};

// JSON string contents for `text` (quotes, backslashes and control characters escaped).
std::string JsonEscape(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += absl::StrFormat("\\u%04x", static_cast<unsigned char>(c));
        } else {
          out += c;
        }
    }
  }
  return out;
}

// Text-log form of `text`: control characters C-escaped, everything else as it is.
std::string EscapeControl(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f) {
      out += absl::CHexEscape(absl::string_view(&c, 1));
    } else {
      out += c;
    }
  }
  return out;
}

void Log(spdlog::level::level_enum level, absl::string_view request_id, absl::string_view message) {
  if (!spdlog::should_log(level)) return;
  std::string cut;
  if (message.size() > kMaxLogMessageBytes) {
    cut = absl::StrCat(message.substr(0, kMaxLogMessageBytes), "... (", message.size(), " bytes)");
    message = cut;
  }
  std::string line;
  if (g_format.load() == LogFormat::kJson) {
    line = absl::StrCat("\"request_id\":\"", JsonEscape(request_id), "\",\"message\":\"",
                        JsonEscape(message), "\"");
  } else {
    line = absl::StrCat("request_id=", EscapeControl(request_id), " ", EscapeControl(message));
  }
  spdlog::log(level, "{}", line);
}

}  // namespace

absl::Status InitLogging(LogFormat format, absl::string_view level) {
  const spdlog::level::level_enum parsed = spdlog::level::from_str(std::string(level));
  if (parsed == spdlog::level::off && level != "off") {
    return absl::InvalidArgumentError(absl::StrCat(
        "log_level: expected trace, debug, info, warn, error, critical or off, got '", level, "'"));
  }
  auto logger = spdlog::stderr_logger_mt("lmhead");
  spdlog::set_default_logger(logger);
  spdlog::set_level(parsed);
  spdlog::flush_on(spdlog::level::trace);  // tests and log shippers read lines as they come
  g_format = format;
  if (format == LogFormat::kJson) {
    spdlog::set_pattern(R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","thread":%t,%v})",
                        spdlog::pattern_time_type::utc);
  } else {
    spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%eZ %l [%t] %v", spdlog::pattern_time_type::utc);
  }
  return absl::OkStatus();
}

void LogInfo(absl::string_view request_id, absl::string_view message) {
  Log(spdlog::level::info, request_id, message);
}
void LogWarning(absl::string_view request_id, absl::string_view message) {
  Log(spdlog::level::warn, request_id, message);
}
void LogError(absl::string_view request_id, absl::string_view message) {
  Log(spdlog::level::err, request_id, message);
}
void LogDebug(absl::string_view request_id, absl::string_view message) {
  Log(spdlog::level::debug, request_id, message);
}

std::string CallerText(absl::string_view text, size_t max_bytes) {
  std::string quoted =
      absl::StrCat("'", absl::CHexEscape(text.substr(0, std::min(text.size(), max_bytes))), "'");
  if (text.size() > max_bytes) absl::StrAppend(&quoted, "... (", text.size(), " bytes)");
  return quoted;
}

std::string NewRequestId() {
  thread_local std::mt19937_64 engine{std::random_device{}()};
  return absl::StrFormat("%016x", engine());
}

}  // namespace lmhead

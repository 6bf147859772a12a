#include "bench/results_table.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

namespace lmhead {
namespace {

// The columns, in order; bench/results_table.py's COLUMNS is the same list.
constexpr char kHeader[] =
    "card,commit,date,d_model,vocab_size,tokens,dtype,implementation,time_ms,baseline,ratio,"
    "peak_extra_mb,tokens_per_s,p99_ms\n";

std::string Env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : "unknown";
}

// A text field, quoted when it holds a comma or a quote (RFC 4180).
std::string Text(const std::string& value) {
  if (value.find_first_of(",\"\n") == std::string::npos) return value;
  std::string quoted = "\"";
  for (char c : value) {
    if (c == '"') quoted += '"';
    quoted += c;
  }
  return quoted + "\"";
}

std::string Number(double value, const char* format) {
  if (std::isnan(value)) return "";
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), format, value);
  return buffer;
}

std::string Count(int64_t value) { return value > 0 ? std::to_string(value) : ""; }

// One name per dtype in every table, as the CLI spells them (bench/results_table.py's _DTYPES).
std::string DType(const std::string& name) {
  if (name == "bfloat16") return "bf16";
  if (name == "float16") return "fp16";
  if (name == "float32") return "fp32";
  return name;
}

}  // namespace

bool AppendResult(const std::string& table, const ResultRow& row) {
  const char* dir = std::getenv("LMHEAD_RESULTS");
  if (dir == nullptr || *dir == '\0') return true;
  const std::string path = std::string(dir) + "/" + table + ".csv";
  std::FILE* file = std::fopen(path.c_str(), "a");
  if (file == nullptr) {
    std::fprintf(stderr, "results: cannot open %s: %s\n", path.c_str(), std::strerror(errno));
    return false;
  }
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  std::string line;
  if (std::ftell(file) == 0) line = kHeader;
  line += Text(Env("LMHEAD_CARD")) + "," + Text(Env("LMHEAD_COMMIT")) + "," + date + "," +
          Count(row.d_model) + "," + Count(row.vocab_size) + "," + Count(row.tokens) + "," +
          Text(DType(row.dtype)) + "," + Text(row.implementation) + "," +
          Number(row.time_ms, "%.3f") + "," + Text(row.baseline) + "," + Number(row.ratio, "%.4f") +
          "," + Number(row.peak_extra_mb, "%.0f") + "," + Number(row.tokens_per_s, "%.0f") + "," +
          Number(row.p99_ms, "%.3f") + "\n";
  const bool written = std::fputs(line.c_str(), file) >= 0;
  if (std::fclose(file) != 0 || !written) {
    std::fprintf(stderr, "results: cannot write %s\n", path.c_str());
    return false;
  }
  return true;
}

}  // namespace lmhead

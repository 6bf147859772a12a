#include "server/auth.h"

#include <algorithm>
#include <fstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace lmhead {
namespace {

constexpr size_t kMinTokenBytes = 16;
constexpr size_t kMaxTokenBytes = 4096;

absl::Status BadFile(absl::string_view flag, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", why));
}

// Equal contents, compared without an early exit (length differences leak only the length).
bool EqualInConstantTime(absl::string_view a, absl::string_view b) {
  unsigned char differ = a.size() == b.size() ? 0 : 1;
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) differ |= static_cast<unsigned char>(a[i] ^ b[i]);
  return differ == 0;
}

}  // namespace

absl::StatusOr<std::unique_ptr<const BearerTokens>> BearerTokens::Read(const std::string& path,
                                                                       absl::string_view flag) {
  std::ifstream file(path);
  if (!file) return BadFile(flag, absl::StrCat("cannot read ", path));
  std::vector<std::string> tokens;
  std::string line;
  for (int number = 1; std::getline(file, line); ++number) {
    const absl::string_view token = absl::StripAsciiWhitespace(line);
    if (token.empty()) continue;
    const bool printable = std::all_of(token.begin(), token.end(), [](char c) {
      return absl::ascii_isgraph(static_cast<unsigned char>(c));
    });
    if (!printable || token.size() < kMinTokenBytes || token.size() > kMaxTokenBytes) {
      return BadFile(flag,
                     absl::StrCat("line ", number, " is not a token (", kMinTokenBytes, " to ",
                                  kMaxTokenBytes, " printable ASCII characters without spaces)"));
    }
    tokens.emplace_back(token);
  }
  if (file.bad()) return BadFile(flag, absl::StrCat("cannot read ", path));
  if (tokens.empty()) return BadFile(flag, "the file has no token");
  return std::make_unique<const BearerTokens>(std::move(tokens));
}

bool BearerTokens::Accepts(absl::string_view authorization) const {
  constexpr absl::string_view kScheme = "Bearer ";  // any case, as HTTP schemes are
  if (!absl::StartsWithIgnoreCase(authorization, kScheme)) return false;
  const absl::string_view given = authorization.substr(kScheme.size());
  bool accepted = false;
  for (const std::string& token : tokens_) accepted |= EqualInConstantTime(given, token);
  return accepted;
}

bool BearerTokens::SharesATokenWith(const BearerTokens& other) const {
  for (const std::string& token : tokens_) {
    if (other.Accepts(absl::StrCat("Bearer ", token))) return true;
  }
  return false;
}

}  // namespace lmhead

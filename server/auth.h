// Bearer-token authentication of the service's calls (--auth_token_file): a call must carry
// `authorization: Bearer TOKEN` with one of the file's tokens. The health service is not
// checked (probes carry no token); see docs/API.md "Authentication".
#ifndef LMHEAD_SERVER_AUTH_H_
#define LMHEAD_SERVER_AUTH_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lmhead {

// The tokens a server accepts. Immutable; thread-safe.
class BearerTokens {
 public:
  // Reads `path`: one token per line; surrounding whitespace and empty lines are ignored, and
  // a token is 16 to 4096 printable ASCII characters without spaces. INVALID_ARGUMENT naming
  // `flag` (--auth_token_file or --admin_token_file) and the line, never the token, for an
  // unreadable file, a bad line or a file without tokens.
  static absl::StatusOr<std::unique_ptr<const BearerTokens>> Read(
      const std::string& path, absl::string_view flag = "auth_token_file");

  explicit BearerTokens(std::vector<std::string> tokens) : tokens_(std::move(tokens)) {}

  // Whether `authorization` (the header's value) is "Bearer " (the scheme in any case) and one
  // of the tokens. Compares
  // every token in full, in time that depends only on the lengths: nothing about the tokens
  // leaks through how long a refusal takes.
  bool Accepts(absl::string_view authorization) const;

  // Whether any token is also one of `other`'s.
  bool SharesATokenWith(const BearerTokens& other) const;

 private:
  std::vector<std::string> tokens_;
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_AUTH_H_

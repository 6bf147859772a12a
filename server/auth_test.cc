#include "server/auth.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>

namespace lmhead {
namespace {

std::string WriteFile(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + name;
  std::ofstream(path) << text;
  return path;
}

TEST(BearerTokensTest, AcceptsExactlyTheFilesTokens) {
  const std::string path =
      WriteFile("tokens", "\n  first-token-0123456789  \n\nsecond.token_ABCDEFGHIJ\n");
  absl::StatusOr<std::unique_ptr<const BearerTokens>> tokens = BearerTokens::Read(path);
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_TRUE((*tokens)->Accepts("Bearer first-token-0123456789"));
  EXPECT_TRUE((*tokens)->Accepts("Bearer second.token_ABCDEFGHIJ"));
  EXPECT_TRUE((*tokens)->Accepts("bearer second.token_ABCDEFGHIJ"));
  EXPECT_TRUE((*tokens)->Accepts("BEARER first-token-0123456789"));
  for (const char* refused :
       {"", "Bearer ", "first-token-0123456789", "Bearer first-token-012345678",
        "Bearer first-token-01234567890", "Bearer\tfirst-token", "Bearer  first-token-0123456789",
        "Basic first-token-0123456789", "BearerX first-token-0123456789",
        "Bearer first-token-0123456789 second.token_ABCDEFGHIJ"}) {
    EXPECT_FALSE((*tokens)->Accepts(refused)) << refused;
  }
}

TEST(BearerTokensTest, BadFilesAreRefusedWithoutShowingTheirContents) {
  EXPECT_EQ(BearerTokens::Read(::testing::TempDir() + "missing").status().message(),
            "--auth_token_file: cannot read " + ::testing::TempDir() + "missing");
  EXPECT_EQ(BearerTokens::Read(WriteFile("empty", "\n  \n")).status().message(),
            "--auth_token_file: the file has no token");
  for (const char* line : {"short-secret", "has a space in the middle here", "tab\there-0123456789",
                           "non-ascii-\xc3\xa9-0123456789"}) {
    const absl::Status status =
        BearerTokens::Read(WriteFile("bad", std::string("good-token-0123456789\n") + line + "\n"))
            .status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(status.message(),
              "--auth_token_file: line 2 is not a token (16 to 4096 printable ASCII characters "
              "without spaces)")
        << line;
  }
}

TEST(BearerTokensTest, NamesTheFlagItReadsAndFindsSharedTokens) {
  EXPECT_EQ(BearerTokens::Read(WriteFile("none", ""), "admin_token_file").status().message(),
            "--admin_token_file: the file has no token");
  const auto users = BearerTokens::Read(WriteFile("users", "user-token-0123456789\n"));
  const auto admins =
      BearerTokens::Read(WriteFile("admins", "admin-token-0123456789\n"), "admin_token_file");
  const auto both = BearerTokens::Read(
      WriteFile("both", "admin-token-0123456789\nuser-token-0123456789\n"), "admin_token_file");
  ASSERT_TRUE(users.ok() && admins.ok() && both.ok());
  EXPECT_FALSE((*admins)->SharesATokenWith(**users));
  EXPECT_TRUE((*both)->SharesATokenWith(**users));
  EXPECT_TRUE((*users)->SharesATokenWith(**both));
}

}  // namespace
}  // namespace lmhead

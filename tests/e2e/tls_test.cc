// TLS and mutual TLS end to end (docs/API.md "TLS"): the real server with --tls_cert/--tls_key
// (and --tls_client_ca), clients with and without the right roots and certificates, and a
// certificate replaced on disk while the server runs. Certificates come from the openssl
// command, made fresh for each run (EC P-256, valid one day).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/lmhead_client.h"
#include "tests/e2e/server_process.h"

namespace lmhead {
namespace {

std::string Dir() { return std::getenv("TEST_TMPDIR"); }

std::string Read(const std::string& path) {
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

// Runs a shell command; true if it exits 0.
bool Shell(const std::string& command) {
  return std::system(absl::StrCat(command, " >/dev/null 2>&1").c_str()) == 0;
}

// A CA `name`/ca.pem (and its key), and a certificate `name`/`leaf`.pem with its key `leaf`.key,
// for 127.0.0.1 and localhost, signed by that CA.
void MakeCertificates(const std::string& name, const std::string& leaf) {
  const std::string dir = absl::StrCat(Dir(), "/", name);
  const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  ASSERT_TRUE(Shell(absl::StrCat("mkdir -p ", dir)));
  if (!std::ifstream(dir + "/ca.pem")) {
    ASSERT_TRUE(Shell(absl::StrCat("openssl req -x509 ", key, " -keyout ", dir, "/ca.key -out ",
                                   dir, "/ca.pem -days 1 -subj /CN=", name, "-ca")));
  }
  std::ofstream(dir + "/ext") << "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
  ASSERT_TRUE(Shell(absl::StrCat("openssl req ", key, " -keyout ", dir, "/", leaf, ".key -out ",
                                 dir, "/", leaf, ".csr -subj /CN=", leaf)));
  ASSERT_TRUE(Shell(absl::StrCat("openssl x509 -req -in ", dir, "/", leaf, ".csr -CA ", dir,
                                 "/ca.pem -CAkey ", dir, "/ca.key -CAcreateserial -out ", dir, "/",
                                 leaf, ".pem -days 1 -extfile ", dir, "/ext")));
}

std::unique_ptr<LMHeadClient> Connect(const ServerProcess& server, const std::string& roots,
                                      const std::string& name = "", bool tls = true) {
  ClientOptions options;
  options.timeout = std::chrono::seconds(10);
  options.max_attempts = 1;
  options.own_connection = true;
  options.tls = tls;
  if (!roots.empty()) options.tls_root_certs = Read(roots);
  if (!name.empty()) {
    options.tls_cert_chain = Read(absl::StrCat(Dir(), "/", name, ".pem"));
    options.tls_private_key = Read(absl::StrCat(Dir(), "/", name, ".key"));
  }
  return LMHeadClient::Connect(server.address(), options);
}

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!Shell("openssl version")) GTEST_SKIP() << "no openssl command";
    MakeCertificates("one", "server");
    MakeCertificates("one", "client");
  }
  const std::string one_ca_ = Dir() + "/one/ca.pem";
};

TEST_F(TlsTest, OnlyClientsThatTrustTheServersCaGetIn) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(
      {"--tls_cert=" + Dir() + "/one/server.pem", "--tls_key=" + Dir() + "/one/server.key",
       "--host=0.0.0.0"});  // TLS alone allows a non-loopback address
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_TRUE(Connect(**server, one_ca_)->ListModels().ok());
  const absl::StatusOr<v1::ForwardResponse> forward =
      Connect(**server, one_ca_)->Forward(v1::ForwardRequest());
  EXPECT_EQ(forward.status().code(), absl::StatusCode::kInvalidArgument) << forward.status();
  // Plaintext, and TLS with gRPC's default roots: no connection.
  EXPECT_EQ(Connect(**server, "", "", /*tls=*/false)->ListModels().status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(Connect(**server, "")->ListModels().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST_F(TlsTest, MutualTlsNeedsAClientCertificateFromTheClientCa) {
  MakeCertificates("other", "client");
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(
      {"--tls_cert=" + Dir() + "/one/server.pem", "--tls_key=" + Dir() + "/one/server.key",
       "--tls_client_ca=" + one_ca_});
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_TRUE(Connect(**server, one_ca_, "one/client")->ListModels().ok());
  EXPECT_EQ(Connect(**server, one_ca_)->ListModels().status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(Connect(**server, one_ca_, "other/client")->ListModels().status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST_F(TlsTest, ACertificateReplacedOnDiskIsServedWithoutARestart) {
  const std::string cert = Dir() + "/served.pem";
  const std::string key = Dir() + "/served.key";
  ASSERT_TRUE(Shell(absl::StrCat("cp ", Dir(), "/one/server.pem ", cert, " && cp ", Dir(),
                                 "/one/server.key ", key)));
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--tls_cert=" + cert, "--tls_key=" + key, "--tls_reload_seconds=1"});
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_TRUE(Connect(**server, one_ca_)->ListModels().ok());
  MakeCertificates("two", "server");
  ASSERT_TRUE(Shell(absl::StrCat("cp ", Dir(), "/two/server.key ", key, " && cp ", Dir(),
                                 "/two/server.pem ", cert)));
  // New connections get the new certificate within a few reload periods.
  bool renewed = false;
  for (int attempt = 0; attempt < 50 && !renewed; ++attempt) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    renewed = Connect(**server, Dir() + "/two/ca.pem")->ListModels().ok();
  }
  EXPECT_TRUE(renewed);
  EXPECT_EQ(Connect(**server, one_ca_)->ListModels().status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ((*server)->Stop(), 0);
}

// The CLI: --tls_roots, --tls_cert and --tls_key, or the LMHEAD_TLS_* variables.
TEST_F(TlsTest, TheCliTakesFilesFromFlagsOrTheEnvironment) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(
      {"--tls_cert=" + Dir() + "/one/server.pem", "--tls_key=" + Dir() + "/one/server.key",
       "--tls_client_ca=" + one_ca_});
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string cli = absl::StrCat(std::getenv("TEST_SRCDIR"), "/",
                                       std::getenv("TEST_WORKSPACE"), "/client/lmhead");
  const std::string models =
      absl::StrCat(cli, " models --max_attempts 1 --address ", (*server)->address());
  const std::string files = absl::StrCat(" --tls_roots ", one_ca_, " --tls_cert ", Dir(),
                                         "/one/client.pem --tls_key ", Dir(), "/one/client.key");
  EXPECT_TRUE(Shell(models + files));
  EXPECT_FALSE(Shell(models));
  EXPECT_FALSE(Shell(models + " --tls --tls_roots " + one_ca_));  // no client certificate
  EXPECT_TRUE(
      Shell(absl::StrCat("LMHEAD_TLS_ROOTS=", one_ca_, " LMHEAD_TLS_CERT=", Dir(),
                         "/one/client.pem LMHEAD_TLS_KEY=", Dir(), "/one/client.key ", models)));
  EXPECT_EQ((*server)->Stop(), 0);
}

TEST_F(TlsTest, BadTlsFlagsStopTheServerNamingTheFlag) {
  const std::pair<std::vector<std::string>, std::string> cases[] = {
      {{"--tls_cert=" + Dir() + "/one/server.pem"}, "--tls_key: --tls_cert and --tls_key go"},
      {{"--tls_client_ca=" + one_ca_}, "--tls_client_ca: needs --tls_cert and --tls_key"},
      {{"--tls_cert=" + Dir() + "/missing.pem", "--tls_key=" + Dir() + "/one/server.key"},
       "--tls_cert: cannot read a PEM file at "},
      {{"--tls_cert=" + Dir() + "/one/server.pem", "--tls_key=" + Dir() + "/one/server.key",
        "--tls_reload_seconds=0"},
       "--tls_reload_seconds: expected 1 to 86400, got 0"},
  };
  for (const auto& [flags, message] : cases) {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(flags);
    ASSERT_FALSE(server.ok()) << message;
    EXPECT_TRUE(absl::StrContains(server.status().message(), message)) << server.status();
  }
}

}  // namespace
}  // namespace lmhead

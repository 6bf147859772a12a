#include "tests/e2e/server_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace lmhead {
namespace {

std::string TempDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir != nullptr ? dir : "/tmp";
}

// The lmhead_server binary in this test's runfiles.
std::string ServerBinary() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  return absl::StrCat(srcdir != nullptr ? srcdir : ".", "/",
                      workspace != nullptr ? workspace : "lmhead", "/server/lmhead_server");
}

std::string ReadFile(const std::string& path) {
  std::ifstream file(path);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(
    const std::vector<std::string>& flags) {
  return Launch(flags, /*wait_for_serving=*/true);
}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::StartListening(
    const std::vector<std::string>& flags) {
  return Launch(flags, /*wait_for_serving=*/false);
}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Launch(
    const std::vector<std::string>& flags, bool wait_for_serving) {
  static std::atomic<int> counter{0};
  const int id = counter++;
  auto server = std::unique_ptr<ServerProcess>(new ServerProcess());
  const std::string port_file = absl::StrCat(TempDir(), "/server_", getpid(), "_", id, ".port");
  server->log_path_ = absl::StrCat(TempDir(), "/server_", getpid(), "_", id, ".log");
  std::remove(port_file.c_str());

  std::vector<std::string> args = {ServerBinary(), "--port=0", "--host=127.0.0.1",
                                   "--port_file=" + port_file};
  args.insert(args.end(), flags.begin(), flags.end());
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);

  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    const int log = open(server->log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(log, STDOUT_FILENO);
    dup2(log, STDERR_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  server->pid_ = pid;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      server->pid_ = -1;
      return absl::InternalError(absl::StrCat("lmhead_server exited with status ", status,
                                              " before serving:\n", server->Log()));
    }
    int port = 0;
    if (wait_for_serving) {
      std::ifstream file(port_file);
      if (file >> port && port > 0) {
        server->port_ = port;
        return server;
      }
    } else {
      // "listening on 127.0.0.1:PORT" is logged before the models load.
      const std::string log = server->Log();
      const std::string kListening = "listening on 127.0.0.1:";
      const size_t at = log.find(kListening);
      const size_t end = at == std::string::npos ? at : log.find(' ', at + kListening.size());
      if (end != std::string::npos &&
          absl::SimpleAtoi(log.substr(at + kListening.size(), end - at - kListening.size()),
                           &port)) {
        server->port_ = port;
        return server;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("lmhead_server did not serve within 60 s:\n", server->Log()));
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

std::string ServerProcess::address() const { return absl::StrCat("127.0.0.1:", port_); }

int ServerProcess::Stop() {
  if (pid_ <= 0) return -1;
  kill(pid_, SIGTERM);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + WTERMSIG(status);
}

int64_t ServerProcess::PeakRssBytes() const {
  std::ifstream file(absl::StrCat("/proc/", pid_, "/status"));
  std::string line;
  while (std::getline(file, line)) {
    if (line.rfind("VmHWM:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      int64_t kib = 0;
      if (fields >> kib) return kib * 1024;
    }
  }
  return -1;
}

std::string ServerProcess::Log() const { return ReadFile(log_path_); }

}  // namespace lmhead

// ServerProcess: runs the real lmhead_server binary (a Bazel data dependency) on port 0 for an
// end-to-end test, waits until it serves, and stops it with SIGTERM. Its log goes to a file in
// TEST_TMPDIR. Not thread-safe; one per server.
#ifndef LMHEAD_TESTS_E2E_SERVER_PROCESS_H_
#define LMHEAD_TESTS_E2E_SERVER_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lmhead {

class ServerProcess {
 public:
  // Starts lmhead_server with --port=0, --port_file and `flags`; waits up to 60 s for the port
  // file. The error carries the server's log when it exits or times out first.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(
      const std::vector<std::string>& flags);
  // Starts it the same way but returns as soon as it listens (before its models are loaded).
  static absl::StatusOr<std::unique_ptr<ServerProcess>> StartListening(
      const std::vector<std::string>& flags);
  ~ServerProcess();  // SIGKILL if still running

  std::string address() const;  // "127.0.0.1:PORT"
  pid_t pid() const { return pid_; }

  // Sends SIGTERM and waits for the exit; returns the exit status (or 128 + signal).
  int Stop();

  // The process's peak resident memory (VmHWM), bytes; -1 if unreadable.
  int64_t PeakRssBytes() const;

  // Everything the server has logged so far.
  std::string Log() const;

 private:
  ServerProcess() = default;
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Launch(
      const std::vector<std::string>& flags, bool wait_for_serving);
  pid_t pid_ = -1;
  int port_ = 0;
  std::string log_path_;
};

}  // namespace lmhead

#endif  // LMHEAD_TESTS_E2E_SERVER_PROCESS_H_

#include "core/torch_errors.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace lmhead {
namespace {

// LibTorch messages carry a C++ stack trace after the first lines; keep what a user can read.
std::string Summary(const char* what) {
  std::string message(what);
  const size_t cut = message.find("\nException raised from");
  if (cut != std::string::npos) message.resize(cut);
  while (!message.empty() && message.back() == '\n') message.pop_back();
  return message;
}

}  // namespace

absl::Status StatusFromTorchError(const c10::Error& error) {
  const std::string message = Summary(error.what_without_backtrace());
  if (dynamic_cast<const c10::OutOfMemoryError*>(&error) != nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("out of device memory: ", message));
  }
  if (dynamic_cast<const c10::NotImplementedError*>(&error) != nullptr) {
    return absl::UnimplementedError(message);
  }
  return absl::InvalidArgumentError(message);
}

absl::Status StatusFromException(const std::exception& error) {
  return absl::InternalError(Summary(error.what()));
}

}  // namespace lmhead

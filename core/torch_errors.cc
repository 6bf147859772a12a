#include "core/torch_errors.h"

#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace lmhead {
namespace {

// LibTorch messages carry a C++ stack trace after the first lines; keep what a person can read.
std::string Summary(const char* what) {
  std::string message(what);
  const size_t cut = message.find("\nException raised from");
  if (cut != std::string::npos) message.resize(cut);
  while (!message.empty() && message.back() == '\n') message.pop_back();
  return message;
}

absl::Status WithDetail(absl::Status status, const char* what) {
  status.SetPayload(kLibraryErrorPayload, absl::Cord(Summary(what)));
  return status;
}

}  // namespace

absl::Status StatusFromTorchError(const c10::Error& error) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&error) != nullptr) {
    return WithDetail(absl::ResourceExhaustedError("out of device memory"),
                      error.what_without_backtrace());
  }
  // LibTorch's CPU allocator reports a failed allocation as a plain c10::Error.
  if (absl::StrContains(error.what_without_backtrace(), "DefaultCPUAllocator: can't allocate")) {
    return WithDetail(absl::ResourceExhaustedError("out of host memory"),
                      error.what_without_backtrace());
  }
  return WithDetail(absl::InternalError("LibTorch failed"), error.what_without_backtrace());
}

absl::Status StatusFromException(const std::exception& error) {
  return WithDetail(absl::InternalError("unexpected exception"), error.what());
}

std::string LibraryErrorDetail(const absl::Status& status) {
  const auto detail = status.GetPayload(kLibraryErrorPayload);  // absl::optional<absl::Cord>
  return detail.has_value() ? std::string(*detail) : std::string();
}

}  // namespace lmhead

// The one place in core where LibTorch exceptions become absl::Status (style rule 5).
#ifndef LMHEAD_CORE_TORCH_ERRORS_H_
#define LMHEAD_CORE_TORCH_ERRORS_H_

#include <c10/util/Exception.h>

#include <exception>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lmhead {

// Every argument is checked before LibTorch runs, so an exception from it is never the caller's
// fault: c10::OutOfMemoryError -> RESOURCE_EXHAUSTED ("out of device memory"), a failed host
// allocation -> RESOURCE_EXHAUSTED ("out of host memory"), anything else -> INTERNAL. The message
// is ours and short; LibTorch's own text (without its stack trace) goes in the payload
// kLibraryErrorPayload, for logs only: absl::Status::ToString shows it, and the server never sends
// it to a caller (docs/API.md "Validation and status codes").
absl::Status StatusFromTorchError(const c10::Error& error);
absl::Status StatusFromException(const std::exception& error);

// The payload type URL under which the library's own message is kept.
inline constexpr absl::string_view kLibraryErrorPayload = "type.lmhead/library_error";

// That message, or "" when `status` carries none.
std::string LibraryErrorDetail(const absl::Status& status);

// Thrown by core code to abandon a computation with a given status (an interrupted forward).
class StatusError : public std::exception {
 public:
  explicit StatusError(absl::Status status) : status_(std::move(status)) {}
  const char* what() const noexcept override { return "lmhead::StatusError"; }
  const absl::Status& status() const { return status_; }

 private:
  absl::Status status_;
};

// Runs `fn` (returning T, Status or StatusOr<T>) and converts whatever LibTorch throws, and
// StatusError into its status.
template <typename Fn>
auto CatchTorchErrors(Fn&& fn) -> decltype(fn()) {
  try {
    return std::forward<Fn>(fn)();
  } catch (const StatusError& error) {
    return error.status();
  } catch (const c10::Error& error) {
    return StatusFromTorchError(error);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of host memory");
  } catch (const std::exception& error) {
    return StatusFromException(error);
  }
}

}  // namespace lmhead

#endif  // LMHEAD_CORE_TORCH_ERRORS_H_

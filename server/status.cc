#include "server/status.h"

#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/string_view.h"

namespace lmhead {
namespace {

constexpr absl::string_view kNotRetryablePayload = "type.lmhead/not_retryable";

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl::StatusCode and grpc::StatusCode both follow google.rpc.Code.
  static_assert(static_cast<int>(absl::StatusCode::kResourceExhausted) ==
                static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  static_assert(static_cast<int>(absl::StatusCode::kUnauthenticated) ==
                static_cast<int>(grpc::StatusCode::UNAUTHENTICATED));
  const int code = static_cast<int>(status.code());
  if (code < 0 || code > static_cast<int>(grpc::StatusCode::UNAUTHENTICATED)) {
    return grpc::Status(grpc::StatusCode::UNKNOWN, std::string(status.message()));
  }
  return grpc::Status(static_cast<grpc::StatusCode>(code), std::string(status.message()));
}

absl::Status NotRetryable(absl::Status status) {
  status.SetPayload(kNotRetryablePayload, absl::Cord("1"));
  return status;
}

void AddRetryAdvice(const absl::Status& status, grpc::ServerContext* context) {
  if (status.GetPayload(kNotRetryablePayload).has_value()) {
    context->AddTrailingMetadata("grpc-retry-pushback-ms", "-1");
  }
}

}  // namespace lmhead

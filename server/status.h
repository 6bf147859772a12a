// The one place where absl::Status becomes grpc::Status (style rule 5).
#ifndef LMHEAD_SERVER_STATUS_H_
#define LMHEAD_SERVER_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace lmhead {

// Same code (the two enums share their numbering), same message.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace lmhead

#endif  // LMHEAD_SERVER_STATUS_H_

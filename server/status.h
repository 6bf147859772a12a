// The one place where absl::Status becomes grpc::Status (style rule 5).
#ifndef LMHEAD_SERVER_STATUS_H_
#define LMHEAD_SERVER_STATUS_H_

#include <grpcpp/server_context.h>
#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace lmhead {

// Same code (the two enums share their numbering), same message.
grpc::Status ToGrpcStatus(const absl::Status& status);

// `status` marked as one that the same request would get again: a limit of this server, not a
// passing load. Clients' retry policies then do not retry it (AddRetryAdvice).
absl::Status NotRetryable(absl::Status status);

// For a refusal marked NotRetryable, tells gRPC clients not to retry the call: the trailer
// grpc-retry-pushback-ms = -1 of gRPC's retry design (A6), which their retry policy honours.
void AddRetryAdvice(const absl::Status& status, grpc::ServerContext* context);

}  // namespace lmhead

#endif  // LMHEAD_SERVER_STATUS_H_

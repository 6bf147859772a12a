// A ForwardRequest as gRPC received it, parsed without copying its hidden states: every field
// but hidden_states.data is parsed into the message, and the data's bytes stay in the received
// buffer's slices (reference-counted, not copied) until the frontend gathers them into memory of
// its choice, pinned host memory on a CUDA server. Protobuf's own parse would copy them into a
// std::string first: 64 MiB per 8,192 tokens at d_model 4096 (docs/notes/receive_path.md).
//
// The result is the message protobuf's parse would give: same fields, same unknown fields, the
// last hidden_states.data when there are several, and the same messages refused. A message whose
// wire form the scan does not follow (groups, malformed lengths) is parsed by protobuf whole,
// with its data in the message.
#ifndef LMHEAD_SERVER_RECEIVED_REQUEST_H_
#define LMHEAD_SERVER_RECEIVED_REQUEST_H_

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "proto/lmhead/v1/lmhead.pb.h"

namespace lmhead {

// A tensor's `data` kept out of its message: the concatenation of `parts`, `size` bytes in all.
// Views into buffers that its owner keeps alive.
struct DetachedData {
  std::vector<absl::string_view> parts;
  uint64_t size = 0;
};

// Copies bytes [begin, end) of `data` to the same offsets of `destination`, which holds
// data.size bytes; by default all of them. Calls for disjoint ranges may run concurrently.
void GatherDetachedData(const DetachedData& data, void* destination, uint64_t begin = 0,
                        uint64_t end = UINT64_MAX);

// Parses the serialized ForwardRequest made of `pieces` (in order) into `message`, leaving
// hidden_states.data empty and its bytes in `*hidden_states_data` (views into `pieces`) when the
// wire form is one the scan follows; otherwise parses it with protobuf, data included, and leaves
// `*hidden_states_data` empty. INVALID_ARGUMENT, naming the message type, when protobuf would
// refuse the bytes.
absl::Status ParseForwardRequest(absl::Span<const absl::string_view> pieces,
                                 v1::ForwardRequest* message, DetachedData* hidden_states_data);

// The request type of the server's Forward and ForwardStream handlers (see the file comment).
// Not thread-safe; the message and the detached bytes live as long as the object.
class ReceivedForwardRequest {
 public:
  // Parses `buffer`, keeping references to its slices. INVALID_ARGUMENT as ParseForwardRequest.
  absl::Status Parse(const grpc::ByteBuffer& buffer);

  // The request; its hidden_states.data is empty when hidden_states_data() is not null.
  const v1::ForwardRequest& message() const { return message_; }
  // hidden_states.data when it was kept out of the message; null when it is in message().
  const DetachedData* hidden_states_data() const {
    return hidden_states_data_.size > 0 ? &hidden_states_data_ : nullptr;
  }
  // Whether the last Parse failed (a stream's Read then returns false, as at its end).
  bool parse_failed() const { return parse_failed_; }

 private:
  v1::ForwardRequest message_;
  std::vector<grpc::Slice> slices_;
  DetachedData hidden_states_data_;
  bool parse_failed_ = false;
};

}  // namespace lmhead

namespace grpc {

// How gRPC reads a ReceivedForwardRequest off the wire; servers only read it.
template <>
class SerializationTraits<lmhead::ReceivedForwardRequest, void> {
 public:
  static Status Deserialize(ByteBuffer* buffer, lmhead::ReceivedForwardRequest* request);
};

}  // namespace grpc

#endif  // LMHEAD_SERVER_RECEIVED_REQUEST_H_

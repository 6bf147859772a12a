// Included by the generated lmhead.grpc.pb.h (bazel/proto.bzl passes it to grpc_cpp_plugin as
// an additional header), so that every handler and stub of lmhead.v1.LMHeadService sees it.
//
// gRPC answers a request that is not valid protobuf with INTERNAL and an empty message, as if
// the server had failed. These SerializationTraits specialisations answer INVALID_ARGUMENT
// naming the request's message type instead ("request: not a valid lmhead.v1.ForwardRequest
// message ..."); anything else (responses a client reads) keeps gRPC's status. Serialising is
// gRPC's own.
//
// Generated unary handlers and stubs deserialise through their base type, MessageLite; stream
// readers and writers through the message type itself: both are specialised. The MessageLite
// specialisation holds in the translation units that include this header (ours); it tells
// request types apart by their dynamic type name.
#ifndef LMHEAD_PROTO_STRICT_PARSING_H_
#define LMHEAD_PROTO_STRICT_PARSING_H_

#include <grpcpp/impl/codegen/proto_buffer_reader.h>
#include <grpcpp/impl/codegen/proto_buffer_writer.h>
#include <grpcpp/impl/codegen/proto_utils.h>

#include <string>

#include "proto/lmhead/v1/lmhead.pb.h"

namespace lmhead::internal {

// Set on the thread whose deserialisation of a request failed. A stream's Read then just returns
// false, as at the end of the stream; the reader takes this to tell the two apart.
inline bool& RequestParseFailed() {
  thread_local bool failed = false;
  return failed;
}

// grpc::SerializationTraits whose parse failures of an lmhead.v1 request are the caller's.
template <class T>
class StrictTraits {
 public:
  static grpc::Status Serialize(const grpc::protobuf::MessageLite& message,
                                grpc::ByteBuffer* buffer, bool* own_buffer) {
    return grpc::GenericSerialize<grpc::ProtoBufferWriter, T>(message, buffer, own_buffer);
  }
  static grpc::Status Deserialize(grpc::ByteBuffer* buffer, grpc::protobuf::MessageLite* message) {
    const grpc::Status status =
        grpc::GenericDeserialize<grpc::ProtoBufferReader, T>(buffer, message);
    const std::string type = message->GetTypeName();
    if (status.ok() || (type != v1::ForwardRequest::default_instance().GetTypeName() &&
                        type != v1::SharedMemoryRequest::default_instance().GetTypeName() &&
                        type != v1::GetModelRequest::default_instance().GetTypeName() &&
                        type != v1::ListModelsRequest::default_instance().GetTypeName())) {
      return status;
    }
    RequestParseFailed() = true;
    return grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        "request: not a valid " + type + " message (the protobuf wire format could not be parsed)");
  }
};

}  // namespace lmhead::internal

namespace grpc {

template <>
class SerializationTraits<protobuf::MessageLite>
    : public lmhead::internal::StrictTraits<protobuf::MessageLite> {};
template <>
class SerializationTraits<lmhead::v1::ForwardRequest>
    : public lmhead::internal::StrictTraits<lmhead::v1::ForwardRequest> {};
template <>
class SerializationTraits<lmhead::v1::SharedMemoryRequest>
    : public lmhead::internal::StrictTraits<lmhead::v1::SharedMemoryRequest> {};

}  // namespace grpc

namespace lmhead {

// True, once, when the last request this thread tried to read was not valid protobuf.
inline bool TakeRequestParseFailure() {
  const bool failed = internal::RequestParseFailed();
  internal::RequestParseFailed() = false;
  return failed;
}

}  // namespace lmhead

#endif  // LMHEAD_PROTO_STRICT_PARSING_H_

// Serialising a ForwardRequest for gRPC without copying its hidden states: a grpc::ByteBuffer
// whose slice of the hidden states' bytes points where they already are (a memory-mapped file)
// and keeps them alive. The bytes are exactly protobuf's serialisation of the same message. No
// LibTorch.
#ifndef LMHEAD_CLIENT_WIRE_REQUEST_H_
#define LMHEAD_CLIENT_WIRE_REQUEST_H_

#include <grpcpp/support/byte_buffer.h>

#include "client/tensor_view.h"
#include "proto/lmhead/v1/lmhead.pb.h"

namespace lmhead {

// `request` with `hidden_states` as its hidden states (whatever request.hidden_states held is
// replaced), serialised: the bytes request.SerializeAsString() gives once hidden_states is set to
// the view's dtype, shape and data. When the view has an owner its bytes are not copied: the
// buffer's slice of them points into them and holds a reference to the owner until gRPC and every
// copy of the buffer are done with it. Without an owner they are copied once, into the buffer.
grpc::ByteBuffer SerializeForwardRequest(v1::ForwardRequest request,
                                         const TensorView& hidden_states);

}  // namespace lmhead

#endif  // LMHEAD_CLIENT_WIRE_REQUEST_H_

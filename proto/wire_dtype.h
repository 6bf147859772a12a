// Facts about lmhead.v1.DataType shared by the server and the clients (no LibTorch).
#ifndef LMHEAD_PROTO_WIRE_DTYPE_H_
#define LMHEAD_PROTO_WIRE_DTYPE_H_

#include <cstdint>

#include "proto/lmhead/v1/lmhead.pb.h"

namespace lmhead {

// Bytes per element; 0 for DATA_TYPE_UNSPECIFIED and unknown values.
inline int64_t ElementSize(v1::DataType dtype) {
  switch (dtype) {
    case v1::DATA_TYPE_BF16:
    case v1::DATA_TYPE_FP16:
      return 2;
    case v1::DATA_TYPE_FP32:
    case v1::DATA_TYPE_INT32:
      return 4;
    case v1::DATA_TYPE_INT64:
      return 8;
    case v1::DATA_TYPE_BOOL:
      return 1;
    default:
      return 0;
  }
}

}  // namespace lmhead

#endif  // LMHEAD_PROTO_WIRE_DTYPE_H_

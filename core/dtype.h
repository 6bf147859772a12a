// The LibTorch scalar type of each lmhead::DType (core <-> c10::ScalarType; the server's wire
// dtypes have theirs in server/tensor_codec.h).
#ifndef LMHEAD_CORE_DTYPE_H_
#define LMHEAD_CORE_DTYPE_H_

#include <c10/core/ScalarType.h>

#include "core/config.h"

namespace lmhead {

// The scalar type of `dtype`.
inline c10::ScalarType ScalarTypeOf(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return c10::ScalarType::Float;
    case DType::kBFloat16:
      return c10::ScalarType::BFloat16;
    case DType::kFloat16:
      return c10::ScalarType::Half;
  }
  return c10::ScalarType::Float;
}

}  // namespace lmhead

#endif  // LMHEAD_CORE_DTYPE_H_

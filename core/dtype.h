// Conversions between lmhead::DType and LibTorch's scalar types.
#ifndef LMHEAD_CORE_DTYPE_H_
#define LMHEAD_CORE_DTYPE_H_

#include <c10/core/ScalarType.h>

#include "core/config.h"

namespace lmhead {

inline c10::ScalarType ToScalarType(DType dtype) {
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

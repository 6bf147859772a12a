// Facts about lmhead.v1.DataType shared by the server and the clients (no LibTorch): one table of
// each wire dtype's name and element size.
#ifndef LMHEAD_PROTO_WIRE_DTYPE_H_
#define LMHEAD_PROTO_WIRE_DTYPE_H_

#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "proto/lmhead/v1/lmhead.pb.h"

namespace lmhead {

struct WireDTypeInfo {
  v1::DataType dtype;
  absl::string_view name;  // as messages spell it: the enum value's name without DATA_TYPE_
  int64_t element_size;    // bytes
};

inline constexpr WireDTypeInfo kWireDTypes[] = {
    {v1::DATA_TYPE_BF16, "BF16", 2},   {v1::DATA_TYPE_FP16, "FP16", 2},
    {v1::DATA_TYPE_FP32, "FP32", 4},   {v1::DATA_TYPE_INT32, "INT32", 4},
    {v1::DATA_TYPE_INT64, "INT64", 8}, {v1::DATA_TYPE_BOOL, "BOOL", 1},
};

// The table's entry for `dtype`; nullptr for DATA_TYPE_UNSPECIFIED and unknown values.
inline const WireDTypeInfo* FindWireDType(int dtype) {
  for (const WireDTypeInfo& info : kWireDTypes) {
    if (info.dtype == dtype) return &info;
  }
  return nullptr;
}

// Bytes per element; 0 for DATA_TYPE_UNSPECIFIED and unknown values.
inline int64_t ElementSize(v1::DataType dtype) {
  const WireDTypeInfo* info = FindWireDType(dtype);
  return info == nullptr ? 0 : info->element_size;
}

// "BF16", "FP16", "FP32", "INT32", "INT64", "BOOL", "DATA_TYPE_UNSPECIFIED", or
// "unknown value N".
inline std::string DataTypeName(int dtype) {
  if (const WireDTypeInfo* info = FindWireDType(dtype)) return std::string(info->name);
  if (dtype == v1::DATA_TYPE_UNSPECIFIED) return "DATA_TYPE_UNSPECIFIED";
  return absl::StrCat("unknown value ", dtype);
}

}  // namespace lmhead

#endif  // LMHEAD_PROTO_WIRE_DTYPE_H_

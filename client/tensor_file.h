// Reading and writing wire tensors (lmhead.v1.Tensor) as files, without LibTorch:
//   .npy          NumPy's format (versions 1-3; little-endian <f2, <f4, <i4, <i8; C order)
//   .safetensors  huggingface/safetensors (F16, BF16, F32, I32, I64)
// Errors name the file (and tensor) and what was expected.
#ifndef LMHEAD_CLIENT_TENSOR_FILE_H_
#define LMHEAD_CLIENT_TENSOR_FILE_H_

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/lmhead/v1/lmhead.pb.h"

namespace lmhead {

// Parses a whole .npy file's bytes; they become the tensor's data (moved, not copied).
absl::StatusOr<v1::Tensor> ParseNpy(std::string bytes);

// Parses a whole .safetensors file's bytes (validated by core/safetensors_format.h); every
// tensor, by name. INVALID_ARGUMENT for dtypes the wire lacks (F64, I16, I8, U8, BOOL).
absl::StatusOr<std::map<std::string, v1::Tensor>> ParseSafetensorsTensors(absl::string_view bytes);

// Serialises tensors (in name order) with optional string metadata. INVALID_ARGUMENT for data
// that does not match a tensor's shape and dtype.
absl::StatusOr<std::string> SerializeSafetensorsTensors(
    const std::map<std::string, v1::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata = {});

// Reads one tensor: a .npy file's array, or from a .safetensors file the tensor called `name`
// (empty `name`: the file's only tensor). INVALID_ARGUMENT for other extensions.
absl::StatusOr<v1::Tensor> ReadTensorFile(const std::string& path, absl::string_view name = "");

// Writes a .safetensors file (through a temporary file renamed into place).
absl::Status WriteSafetensorsFile(const std::string& path,
                                  const std::map<std::string, v1::Tensor>& tensors,
                                  const std::map<std::string, std::string>& metadata = {});

}  // namespace lmhead

#endif  // LMHEAD_CLIENT_TENSOR_FILE_H_

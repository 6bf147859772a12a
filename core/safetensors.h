// Reading and writing safetensors files (the format of huggingface/safetensors): an 8-byte
// little-endian header length N, N bytes of JSON {"name": {"dtype", "shape", "data_offsets"},
// "__metadata__": {string: string}}, then the tensors' raw little-endian row-major bytes.
// Our own small implementation over the documented format; every field is validated before
// anything is allocated, and errors name the tensor and what was expected.
#ifndef LMHEAD_CORE_SAFETENSORS_H_
#define LMHEAD_CORE_SAFETENSORS_H_

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lmhead {

struct SafetensorsFile {
  std::map<std::string, at::Tensor> tensors;  // CPU tensors owning their memory
  std::map<std::string, std::string> metadata;
};

// Parses a whole file's bytes. Supported dtypes: F64, F32, F16, BF16, I64, I32, I16, I8, U8,
// BOOL. INVALID_ARGUMENT (naming the tensor) for a malformed header, an unknown dtype, offsets
// out of range or overlapping, or a byte count that does not match the shape.
absl::StatusOr<SafetensorsFile> ParseSafetensors(absl::string_view bytes);

// Reads and parses `path`; NOT_FOUND if it cannot be opened.
absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);

// Serialises tensors (any device; copied to the CPU, made contiguous) in name order.
absl::StatusOr<std::string> SerializeSafetensors(
    const std::map<std::string, at::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata = {});

// Serialises and writes to `path` (through a temporary file renamed into place).
absl::Status WriteSafetensors(const std::string& path,
                              const std::map<std::string, at::Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace lmhead

#endif  // LMHEAD_CORE_SAFETENSORS_H_

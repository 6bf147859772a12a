// The safetensors container format (huggingface/safetensors), without any tensor library: an
// 8-byte little-endian header length N, N bytes of JSON {"name": {"dtype", "shape",
// "data_offsets"}, "__metadata__": {string: string}}, then the tensors' raw little-endian
// row-major bytes. Shared by the core (LibTorch tensors, core/safetensors.h) and the clients
// (wire tensors, client/tensor_file.h), so both validate files the same way.
#ifndef LMHEAD_CORE_SAFETENSORS_FORMAT_H_
#define LMHEAD_CORE_SAFETENSORS_FORMAT_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lmhead {

// One tensor of a file: its dtype name ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8",
// "U8", "BOOL"), shape, and bytes (numel * SafetensorsElementSize(dtype) of them).
struct SafetensorsEntry {
  std::string dtype;
  std::vector<int64_t> shape;
  absl::string_view data;  // a view: into the parsed bytes, or into the caller's tensor
};

struct SafetensorsContents {
  std::map<std::string, SafetensorsEntry> tensors;
  std::map<std::string, std::string> metadata;
};

// Bytes per element of a dtype name; 0 for names the format does not define.
int64_t SafetensorsElementSize(absl::string_view dtype);

// "F64, F32, ..." for messages.
std::string SafetensorsDtypeNames();

// Parses and validates a whole file's bytes before anything is allocated: the header size,
// the JSON, each entry's dtype, shape (overflow-checked) and data_offsets (in range, matching
// the shape, not overlapping another tensor), and the metadata (strings only). The entries'
// data views point into `bytes`, which must outlive the result. INVALID_ARGUMENT naming the
// tensor and what was expected.
absl::StatusOr<SafetensorsContents> ParseSafetensorsContents(absl::string_view bytes);

// Serialises tensors in name order, with the header laid out as the reference implementation
// writes it (so its files and ours can match byte for byte) and padded to 8 bytes.
// INVALID_ARGUMENT for an unknown dtype, data whose size does not match the shape, the name
// "__metadata__", or names and metadata that are not valid UTF-8.
absl::StatusOr<std::string> SerializeSafetensorsContents(const SafetensorsContents& contents);

// Writes `bytes` to `path` through a temporary file that is synced and renamed into place.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view bytes);

// The whole file; NOT_FOUND if it cannot be opened or is not a regular file.
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

}  // namespace lmhead

#endif  // LMHEAD_CORE_SAFETENSORS_FORMAT_H_

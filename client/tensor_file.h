// Reading and writing wire tensors (lmhead.v1.Tensor) as files, without LibTorch:
//   .npy          NumPy's format (versions 1-3; little-endian <f2, <f4, <i4, <i8, and |b1;
//                 C order)
//   .safetensors  huggingface/safetensors (F16, BF16, F32, I32, I64, BOOL)
// BOOL (1 byte, 0 or 1) is an output dtype (ScoringOutputs.segment_is_greedy): read back, and
// written, as the others.
// Errors name the file (and tensor) and what was expected. MapTensorFile reads a tensor in place,
// from a read-only memory mapping of its file; ReadTensorFile copies it into a v1::Tensor.
#ifndef LMHEAD_CLIENT_TENSOR_FILE_H_
#define LMHEAD_CLIENT_TENSOR_FILE_H_

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/tensor_view.h"
#include "proto/lmhead/v1/lmhead.pb.h"

namespace lmhead {

// Parses a whole .npy file's bytes; they become the tensor's data (moved, not copied).
absl::StatusOr<v1::Tensor> ParseNpy(std::string bytes);

// Parses a whole .safetensors file's bytes (validated by core/safetensors_format.h); every
// tensor, by name. INVALID_ARGUMENT for dtypes the wire lacks (F64, I16, I8, U8).
absl::StatusOr<std::map<std::string, v1::Tensor>> ParseSafetensorsTensors(absl::string_view bytes);

// Serialises tensors (in name order) with optional string metadata. INVALID_ARGUMENT for data
// that does not match a tensor's shape and dtype.
absl::StatusOr<std::string> SerializeSafetensorsTensors(
    const std::map<std::string, v1::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata = {});

// One tensor of a file, read in place: a .npy file's array, or from a .safetensors file the
// tensor called `name` (empty `name`: the file's only tensor). The file is mapped read-only
// (mmap PROT_READ, MAP_PRIVATE; a file system that cannot map it, or an empty file, is read into
// memory instead) and its header parsed and checked in place as ParseNpy and
// ParseSafetensorsTensors check it (dtype, shape, byte length against the file's size); the
// view's data points into the mapping, which the view's `owner` keeps alive, and its pages are
// read from the file when first touched. NOT_FOUND when the file cannot be opened or is not a
// regular file; INVALID_ARGUMENT for other extensions. The file must not shrink while a view of
// it is in use (touching a page past its new end is SIGBUS, as with any mapped file).
absl::StatusOr<TensorView> MapTensorFile(const std::string& path, absl::string_view name = "");

// MapTensorFile's tensor copied into a v1::Tensor (one copy of its bytes); the same errors.
absl::StatusOr<v1::Tensor> ReadTensorFile(const std::string& path, absl::string_view name = "");

// Writes a .safetensors file (through a temporary file renamed into place).
absl::Status WriteSafetensorsFile(const std::string& path,
                                  const std::map<std::string, v1::Tensor>& tensors,
                                  const std::map<std::string, std::string>& metadata = {});

}  // namespace lmhead

#endif  // LMHEAD_CLIENT_TENSOR_FILE_H_

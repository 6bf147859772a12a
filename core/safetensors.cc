#include "core/safetensors.h"

#include <ATen/ATen.h>

#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "absl/base/config.h"
#include "absl/strings/str_cat.h"
#include "core/safetensors_format.h"
#include "core/torch_errors.h"

// Tensor bytes are copied with memcpy: the file is little-endian, so the host must be too.
#ifndef ABSL_IS_LITTLE_ENDIAN
#error "safetensors.cc assumes a little-endian host"
#endif

namespace lmhead {
namespace {

struct DtypeName {
  absl::string_view name;
  at::ScalarType type;
};

constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};

std::optional<at::ScalarType> ScalarTypeOf(absl::string_view name) {
  for (const DtypeName& d : kDtypes) {
    if (d.name == name) return d.type;
  }
  return std::nullopt;
}

std::optional<absl::string_view> NameOf(at::ScalarType type) {
  for (const DtypeName& d : kDtypes) {
    if (d.type == type) return d.name;
  }
  return std::nullopt;
}

template <typename... Args>
absl::Status TensorError(absl::string_view name, const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors: tensor '", name, "': ", args...));
}

// Copies the validated entries into CPU tensors that own their memory.
absl::StatusOr<SafetensorsFile> ToTensors(absl::string_view bytes) {
  absl::StatusOr<SafetensorsContents> contents = ParseSafetensorsContents(bytes);
  if (!contents.ok()) return contents.status();
  return CatchTorchErrors([&]() -> absl::StatusOr<SafetensorsFile> {
    SafetensorsFile file;
    file.metadata = std::move(contents->metadata);
    for (const auto& [name, entry] : contents->tensors) {
      at::Tensor tensor =
          at::empty(entry.shape, at::TensorOptions().dtype(*ScalarTypeOf(entry.dtype)));
      if (!entry.data.empty()) std::memcpy(tensor.data_ptr(), entry.data.data(), entry.data.size());
      file.tensors.emplace(name, std::move(tensor));
    }
    return file;
  });
}

}  // namespace

absl::StatusOr<SafetensorsFile> ParseSafetensors(absl::string_view bytes) {
  return ToTensors(bytes);
}

absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadWholeFile(path);
  if (!bytes.ok()) {
    return absl::Status(bytes.status().code(),
                        absl::StrCat("safetensors: ", bytes.status().message()));
  }
  return ToTensors(*bytes);
}

absl::StatusOr<std::string> SerializeSafetensors(
    const std::map<std::string, at::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata) {
  return CatchTorchErrors([&]() -> absl::StatusOr<std::string> {
    SafetensorsContents contents;
    contents.metadata = metadata;
    std::vector<at::Tensor> keep_alive;  // the CPU copies the entries' data views point into
    keep_alive.reserve(tensors.size());
    for (const auto& [name, tensor] : tensors) {
      if (!tensor.defined()) return TensorError(name, "tensor is undefined");
      if (tensor.layout() != at::kStrided) {
        return TensorError(name, "layout ", c10::toString(tensor.layout()),
                           " is not supported, expected a dense tensor");
      }
      const std::optional<absl::string_view> dtype = NameOf(tensor.scalar_type());
      if (!dtype.has_value()) {
        return TensorError(name, "dtype ", c10::toString(tensor.scalar_type()),
                           " is not supported (supported: ", SafetensorsDtypeNames(), ")");
      }
      // resolve_neg(): a negated view is contiguous but its memory holds the un-negated values.
      at::Tensor cpu = tensor.to(at::kCPU).resolve_conj().resolve_neg().contiguous();
      const size_t size = static_cast<size_t>(cpu.numel()) * cpu.element_size();
      contents.tensors[name] = {
          std::string(*dtype), cpu.sizes().vec(),
          absl::string_view(static_cast<const char*>(cpu.const_data_ptr()), size)};
      keep_alive.push_back(std::move(cpu));
    }
    return SerializeSafetensorsContents(contents);
  });
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::map<std::string, at::Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  absl::StatusOr<std::string> bytes = SerializeSafetensors(tensors, metadata);
  if (!bytes.ok()) return bytes.status();
  absl::Status written = WriteFileAtomically(path, *bytes);
  if (!written.ok()) {
    return absl::Status(written.code(), absl::StrCat("safetensors: ", written.message()));
  }
  return absl::OkStatus();
}

}  // namespace lmhead

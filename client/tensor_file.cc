#include "client/tensor_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/safetensors_format.h"
#include "proto/wire_dtype.h"

namespace lmhead {
namespace {

// numel * element size of `shape`, or -1 when a dim is negative or the product overflows.
int64_t ByteSize(const std::vector<int64_t>& shape, v1::DataType dtype) {
  int64_t bytes = ElementSize(dtype);
  for (int64_t dim : shape) {
    if (dim < 0 || __builtin_mul_overflow(bytes, dim, &bytes)) return -1;
  }
  return bytes;
}

// The safetensors dtype names the wire has.
const std::map<std::string, v1::DataType>& WireDTypes() {
  static const auto* types = new std::map<std::string, v1::DataType>{
      {"BF16", v1::DATA_TYPE_BF16}, {"F16", v1::DATA_TYPE_FP16},  {"F32", v1::DATA_TYPE_FP32},
      {"I32", v1::DATA_TYPE_INT32}, {"I64", v1::DATA_TYPE_INT64}, {"BOOL", v1::DATA_TYPE_BOOL}};
  return *types;
}

std::string SafetensorsName(v1::DataType dtype) {
  for (const auto& [name, type] : WireDTypes()) {
    if (type == dtype) return name;
  }
  return "";
}

std::string NpyHeaderValue(absl::string_view header, absl::string_view key) {
  const size_t at = header.find(absl::StrCat("'", key, "'"));
  if (at == absl::string_view::npos) return "";
  size_t start = header.find(':', at);
  if (start == absl::string_view::npos) return "";
  ++start;
  while (start < header.size() && header[start] == ' ') ++start;
  size_t end = start;
  if (start < header.size() && header[start] == '(') {
    end = header.find(')', start);
    if (end == absl::string_view::npos) return "";
    ++end;
  } else {
    end = header.find_first_of(",}", start);
    if (end == absl::string_view::npos) end = header.size();
  }
  return std::string(absl::StripAsciiWhitespace(header.substr(start, end - start)));
}

// A whole .npy file's array, read in place: the view's data points into `bytes`.
absl::StatusOr<TensorView> ViewNpy(absl::string_view bytes) {
  if (bytes.size() < 10 || bytes.substr(0, 6) != "\x93NUMPY") {
    return absl::InvalidArgumentError("npy: not a .npy file (no \\x93NUMPY magic)");
  }
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_length = 0;
  size_t header_start = 0;
  if (major == 1) {
    header_length = static_cast<unsigned char>(bytes[8]) |
                    (static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) return absl::InvalidArgumentError("npy: truncated header");
    header_length = 0;
    for (int i = 11; i >= 8; --i) {
      header_length = (header_length << 8) | static_cast<unsigned char>(bytes[i]);
    }
    header_start = 12;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("npy: unsupported format version ", major));
  }
  if (header_start + header_length > bytes.size()) {
    return absl::InvalidArgumentError("npy: truncated header");
  }
  const absl::string_view header = bytes.substr(header_start, header_length);
  const std::string descr = NpyHeaderValue(header, "descr");
  static const auto* kTypes =
      new std::map<std::string, v1::DataType>{{"'<f2'", v1::DATA_TYPE_FP16},
                                              {"'<f4'", v1::DATA_TYPE_FP32},
                                              {"'<i4'", v1::DATA_TYPE_INT32},
                                              {"'<i8'", v1::DATA_TYPE_INT64},
                                              {"'|b1'", v1::DATA_TYPE_BOOL}};
  auto type = kTypes->find(descr);
  if (type == kTypes->end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("npy: dtype ", descr,
                     " is not supported; expected '<f2', '<f4', '<i4', '<i8' or '|b1' (use "
                     ".safetensors for bfloat16)"));
  }
  if (NpyHeaderValue(header, "fortran_order") != "False") {
    return absl::InvalidArgumentError(
        "npy: fortran_order arrays are not supported; save in C order");
  }
  const std::string shape_text = NpyHeaderValue(header, "shape");
  if (shape_text.size() < 2 || shape_text.front() != '(' || shape_text.back() != ')') {
    return absl::InvalidArgumentError(absl::StrCat("npy: cannot read shape ", shape_text));
  }
  std::vector<int64_t> shape;
  for (absl::string_view part :
       absl::StrSplit(absl::string_view(shape_text).substr(1, shape_text.size() - 2), ',',
                      absl::SkipWhitespace())) {
    int64_t dim = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &dim) || dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat("npy: cannot read shape ", shape_text));
    }
    shape.push_back(dim);
  }
  const int64_t expected = ByteSize(shape, type->second);
  const size_t data_size = bytes.size() - header_start - header_length;
  if (expected < 0 || static_cast<int64_t>(data_size) != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        "npy: expected ", expected, " bytes of data for shape ", shape_text, ", got ", data_size));
  }
  TensorView view;
  view.dtype = type->second;
  view.shape = std::move(shape);
  view.data = bytes.substr(header_start + header_length);
  return view;
}

// Every tensor of a whole .safetensors file, read in place: the views' data point into `bytes`.
absl::StatusOr<std::map<std::string, TensorView>> ViewSafetensors(absl::string_view bytes) {
  absl::StatusOr<SafetensorsContents> contents = ParseSafetensorsContents(bytes);
  if (!contents.ok()) return contents.status();
  std::map<std::string, TensorView> views;
  for (auto& [name, entry] : contents->tensors) {
    auto type = WireDTypes().find(entry.dtype);
    if (type == WireDTypes().end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("safetensors: tensor '", name, "': dtype ", entry.dtype,
                       " is not supported; expected BF16, F16, F32, I32, I64 or BOOL"));
    }
    TensorView& view = views[name];
    view.dtype = type->second;
    view.shape = std::move(entry.shape);
    view.data = entry.data;
  }
  return views;
}

// A whole regular file's bytes: a read-only memory mapping of it, or, where the file system
// cannot map it, a copy read into memory. Immutable.
class FileBytes {
 public:
  // NOT_FOUND when `path` cannot be opened or is not a regular file (as ReadWholeFile says).
  static absl::StatusOr<std::shared_ptr<const FileBytes>> Open(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      return absl::NotFoundError(absl::StrCat("cannot open '", path, "': ", std::strerror(errno)));
    }
    struct stat info;
    if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
      close(fd);
      return absl::NotFoundError(absl::StrCat("'", path, "' is not a regular file"));
    }
    const auto size = static_cast<size_t>(info.st_size);
    void* address = size > 0 ? mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    close(fd);                    // a mapping stays valid without it
    if (address == MAP_FAILED) {  // empty (or unmappable): read it, as before mappings
      absl::StatusOr<std::string> read = ReadWholeFile(path);
      if (!read.ok()) return read.status();
      return std::shared_ptr<const FileBytes>(new FileBytes(*std::move(read)));
    }
    // Micro-batches are read front to back: read ahead further than for random access.
    madvise(address, size, MADV_SEQUENTIAL);
    return std::shared_ptr<const FileBytes>(new FileBytes(address, size));
  }

  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;
  ~FileBytes() {
    if (address_ != nullptr) munmap(address_, size_);
  }

  absl::string_view bytes() const {
    return address_ != nullptr ? absl::string_view(static_cast<const char*>(address_), size_)
                               : absl::string_view(read_);
  }

 private:
  FileBytes(void* address, size_t size) : address_(address), size_(size) {}
  explicit FileBytes(std::string read) : read_(std::move(read)) {}

  void* const address_ = nullptr;  // the mapping, or null
  const size_t size_ = 0;
  const std::string read_;  // the bytes read, when not mapped
};

// The tensor called `name` of a .safetensors file's `views` (empty `name`: the only one).
absl::StatusOr<TensorView> SelectTensor(const std::string& path,
                                        std::map<std::string, TensorView> views,
                                        absl::string_view name) {
  if (name.empty()) {
    if (views.size() != 1) {
      std::vector<std::string> names;
      for (const auto& [n, t] : views) names.push_back(n);
      return absl::InvalidArgumentError(absl::StrCat(path, ": holds ", views.size(), " tensors (",
                                                     absl::StrJoin(names, ", "),
                                                     "); name the one to use"));
    }
    return std::move(views.begin()->second);
  }
  auto it = views.find(std::string(name));
  if (it == views.end()) {
    return absl::NotFoundError(absl::StrCat(path, ": no tensor named '", name, "'"));
  }
  return std::move(it->second);
}

}  // namespace

absl::StatusOr<v1::Tensor> ParseNpy(std::string bytes) {
  absl::StatusOr<TensorView> view = ViewNpy(bytes);
  if (!view.ok()) return view.status();
  v1::Tensor tensor;
  tensor.set_dtype(view->dtype);
  for (int64_t dim : view->shape) tensor.add_shape(dim);
  // The file's bytes become the tensor's: the header is cut off in place, no second copy.
  bytes.erase(0, bytes.size() - view->data.size());
  tensor.set_data(std::move(bytes));
  return tensor;
}

absl::StatusOr<std::map<std::string, v1::Tensor>> ParseSafetensorsTensors(absl::string_view bytes) {
  absl::StatusOr<std::map<std::string, TensorView>> views = ViewSafetensors(bytes);
  if (!views.ok()) return views.status();
  std::map<std::string, v1::Tensor> tensors;
  for (const auto& [name, view] : *views) CopyTensorTo(view, &tensors[name]);
  return tensors;
}

absl::StatusOr<std::string> SerializeSafetensorsTensors(
    const std::map<std::string, v1::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata) {
  SafetensorsContents contents;
  contents.metadata = metadata;
  for (const auto& [name, tensor] : tensors) {
    contents.tensors[name] = {SafetensorsName(tensor.dtype()),
                              std::vector<int64_t>(tensor.shape().begin(), tensor.shape().end()),
                              absl::string_view(tensor.data())};
  }
  return SerializeSafetensorsContents(contents);
}

absl::StatusOr<TensorView> MapTensorFile(const std::string& path, absl::string_view name) {
  absl::StatusOr<std::shared_ptr<const FileBytes>> file = FileBytes::Open(path);
  if (!file.ok()) return file.status();
  const absl::string_view bytes = (*file)->bytes();
  const auto in_file = [&](const absl::Status& status) {
    return absl::Status(status.code(), absl::StrCat(path, ": ", status.message()));
  };
  absl::StatusOr<TensorView> view;
  if (absl::EndsWith(path, ".npy")) {
    view = ViewNpy(bytes);
    if (!view.ok()) return in_file(view.status());
  } else if (absl::EndsWith(path, ".safetensors")) {
    absl::StatusOr<std::map<std::string, TensorView>> views = ViewSafetensors(bytes);
    if (!views.ok()) return in_file(views.status());
    view = SelectTensor(path, *std::move(views), name);
    if (!view.ok()) return view.status();
  } else {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a .npy or .safetensors file"));
  }
  view->owner = *std::move(file);
  return view;
}

absl::StatusOr<v1::Tensor> ReadTensorFile(const std::string& path, absl::string_view name) {
  absl::StatusOr<TensorView> view = MapTensorFile(path, name);
  if (!view.ok()) return view.status();
  v1::Tensor tensor;
  CopyTensorTo(*view, &tensor);
  return tensor;
}

absl::Status WriteSafetensorsFile(const std::string& path,
                                  const std::map<std::string, v1::Tensor>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  absl::StatusOr<std::string> bytes = SerializeSafetensorsTensors(tensors, metadata);
  if (!bytes.ok()) return bytes.status();
  return WriteFileAtomically(path, *bytes);
}

}  // namespace lmhead

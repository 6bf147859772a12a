#include "core/safetensors_format.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lmhead {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

constexpr absl::string_view kMetadataKey = "__metadata__";
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;  // 100 MiB
constexpr size_t kLengthPrefixBytes = 8;

struct DtypeInfo {
  absl::string_view name;
  uint64_t element_size;
};

constexpr DtypeInfo kDtypes[] = {
    {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
    {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1},
};

const DtypeInfo* FindDtype(absl::string_view name) {
  for (const DtypeInfo& info : kDtypes) {
    if (info.name == name) return &info;
  }
  return nullptr;
}

template <typename... Args>
absl::Status TensorError(absl::string_view name, const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors: tensor '", name, "': ", args...));
}

template <typename... Args>
absl::Status FileError(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors: ", args...));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// True for well-formed UTF-8 (no overlong forms, surrogates or code points above U+10FFFF),
// the same rule nlohmann::json enforces when it dumps strings.
bool IsValidUtf8(absl::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto byte = [&](size_t k) { return static_cast<unsigned char>(text[k]); };
    const unsigned char lead = byte(i);
    if (lead < 0x80) {
      ++i;
      continue;
    }
    size_t length;
    unsigned char low = 0x80, high = 0xBF;  // allowed range of the first continuation byte
    if (lead >= 0xC2 && lead <= 0xDF) {
      length = 2;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      length = 3;
      if (lead == 0xE0) low = 0xA0;   // overlong
      if (lead == 0xED) high = 0x9F;  // surrogates
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      length = 4;
      if (lead == 0xF0) low = 0x90;   // overlong
      if (lead == 0xF4) high = 0x8F;  // above U+10FFFF
    } else {
      return false;
    }
    if (text.size() - i < length) return false;
    if (byte(i + 1) < low || byte(i + 1) > high) return false;
    for (size_t k = 2; k < length; ++k) {
      if (byte(i + k) < 0x80 || byte(i + k) > 0xBF) return false;
    }
    i += length;
  }
  return true;
}

// A JSON number that is a non-negative integer, as uint64_t; nullopt for anything else.
std::optional<uint64_t> NonNegativeInteger(const Json& value) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer() && value.get<int64_t>() >= 0) {
    return static_cast<uint64_t>(value.get<int64_t>());
  }
  return std::nullopt;
}

// A SAX handler that builds nothing and keeps the parser's error message; run only after
// Json::parse has failed, to say why.
class JsonErrorRecorder {
 public:
  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(Json::number_integer_t) { return true; }
  bool number_unsigned(Json::number_unsigned_t) { return true; }
  bool number_float(Json::number_float_t, const Json::string_t&) { return true; }
  bool string(Json::string_t&) { return true; }
  bool binary(Json::binary_t&) { return true; }
  bool start_object(size_t) { return true; }
  bool key(Json::string_t&) { return true; }
  bool end_object() { return true; }
  bool start_array(size_t) { return true; }
  bool end_array() { return true; }
  bool parse_error(size_t, const std::string&, const Json::exception& error) {
    message_ = error.what();
    return false;
  }

  const std::string& message() const { return message_; }

 private:
  std::string message_ = "unknown error";
};

// One tensor's header entry, validated against the buffer.
struct TensorSpec {
  std::string name;
  const DtypeInfo* dtype;
  std::vector<int64_t> shape;
  uint64_t begin;  // offsets into the byte buffer after the header
  uint64_t end;
};

absl::StatusOr<TensorSpec> ParseTensorEntry(const std::string& name, const Json& entry,
                                            uint64_t buffer_bytes) {
  if (!entry.is_object()) {
    return TensorError(name, "header entry is ", entry.type_name(), ", expected an object");
  }
  TensorSpec spec;
  spec.name = name;

  const auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) {
    return TensorError(name, "missing string field 'dtype'");
  }
  const std::string& dtype_name = dtype_it->get_ref<const std::string&>();
  spec.dtype = FindDtype(dtype_name);
  if (spec.dtype == nullptr) {
    return TensorError(name, "unknown dtype '", dtype_name,
                       "' (supported: ", SafetensorsDtypeNames(), ")");
  }

  const auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) {
    return TensorError(name, "missing array field 'shape'");
  }
  // numel bounds the byte count; the product of max(dim, 1) bounds the strides LibTorch
  // computes, so an empty tensor with huge dimensions cannot overflow them either.
  uint64_t numel = 1;
  uint64_t stride_bound = 1;
  constexpr uint64_t kMaxInt64 = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  for (size_t d = 0; d < shape_it->size(); ++d) {
    const std::optional<uint64_t> dim = NonNegativeInteger((*shape_it)[d]);
    if (!dim.has_value()) {
      return TensorError(name, "shape[", d, "] is ", (*shape_it)[d].dump(),
                         ", expected a non-negative integer");
    }
    const uint64_t factor = std::max<uint64_t>(*dim, 1);
    if (*dim > kMaxInt64 || stride_bound > kMaxInt64 / factor) {
      return TensorError(name, "shape ", shape_it->dump(), " has too many elements");
    }
    stride_bound *= factor;
    numel *= *dim;
    spec.shape.push_back(static_cast<int64_t>(*dim));
  }
  if (numel > kMaxInt64 / spec.dtype->element_size) {
    return TensorError(name, "shape ", ShapeString(spec.shape), " of ", spec.dtype->name,
                       " has too many bytes");
  }
  const uint64_t needed_bytes = numel * spec.dtype->element_size;

  const auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
    return TensorError(name, "missing field 'data_offsets', expected [begin, end]");
  }
  const std::optional<uint64_t> begin = NonNegativeInteger((*offsets_it)[0]);
  const std::optional<uint64_t> end = NonNegativeInteger((*offsets_it)[1]);
  if (!begin.has_value() || !end.has_value()) {
    return TensorError(name, "data_offsets ", offsets_it->dump(),
                       " must be two non-negative integers");
  }
  if (*begin > *end || *end > buffer_bytes) {
    return TensorError(name, "data_offsets [", *begin, ", ", *end,
                       ") must satisfy begin <= end <= ", buffer_bytes,
                       " (the byte buffer's size)");
  }
  if (*end - *begin != needed_bytes) {
    return TensorError(name, "data_offsets [", *begin, ", ", *end, ") hold ", *end - *begin,
                       " bytes, shape ", ShapeString(spec.shape), " of ", spec.dtype->name,
                       " needs ", needed_bytes);
  }
  spec.begin = *begin;
  spec.end = *end;
  return spec;
}

// Rejects tensors whose byte ranges share a byte (empty ranges share none).
absl::Status CheckNoOverlaps(std::vector<const TensorSpec*> specs) {
  specs.erase(std::remove_if(specs.begin(), specs.end(),
                             [](const TensorSpec* spec) { return spec->begin == spec->end; }),
              specs.end());
  std::sort(specs.begin(), specs.end(), [](const TensorSpec* a, const TensorSpec* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  const TensorSpec* furthest = nullptr;  // the range reaching furthest so far
  for (const TensorSpec* spec : specs) {
    if (furthest != nullptr && furthest->end > spec->begin) {
      return TensorError(spec->name, "data_offsets [", spec->begin, ", ", spec->end,
                         ") overlap tensor '", furthest->name, "' at [", furthest->begin, ", ",
                         furthest->end, ")");
    }
    if (furthest == nullptr || spec->end > furthest->end) furthest = spec;
  }
  return absl::OkStatus();
}

// Closes a FILE* on scope exit.
struct FileCloser {
  void operator()(std::FILE* file) const { std::fclose(file); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

}  // namespace

int64_t SafetensorsElementSize(absl::string_view dtype) {
  const DtypeInfo* info = FindDtype(dtype);
  return info == nullptr ? 0 : static_cast<int64_t>(info->element_size);
}

std::string SafetensorsDtypeNames() {
  std::vector<absl::string_view> names;
  for (const DtypeInfo& info : kDtypes) names.push_back(info.name);
  return absl::StrJoin(names, ", ");
}

absl::StatusOr<SafetensorsContents> ParseSafetensorsContents(absl::string_view bytes) {
  if (bytes.size() < kLengthPrefixBytes) {
    return FileError("file is truncated: ", bytes.size(),
                     " bytes, expected at least 8 for the header size");
  }
  uint64_t header_bytes = 0;
  for (size_t i = 0; i < kLengthPrefixBytes; ++i) {
    header_bytes |= uint64_t{static_cast<unsigned char>(bytes[i])} << (8 * i);
  }
  const uint64_t available = bytes.size() - kLengthPrefixBytes;
  if (header_bytes > kMaxHeaderBytes) {
    return FileError("header size ", header_bytes, " exceeds the limit of ", kMaxHeaderBytes,
                     " bytes");
  }
  if (header_bytes > available) {
    return FileError("header size ", header_bytes, " exceeds the ", available,
                     " bytes after the size field (file truncated?)");
  }
  const absl::string_view header_text = bytes.substr(kLengthPrefixBytes, header_bytes);
  const absl::string_view buffer = bytes.substr(kLengthPrefixBytes + header_bytes);

  const Json header = Json::parse(header_text.begin(), header_text.end(), /*cb=*/nullptr,
                                  /*allow_exceptions=*/false);
  if (header.is_discarded()) {
    JsonErrorRecorder recorder;
    Json::sax_parse(header_text.begin(), header_text.end(), &recorder);
    return FileError("header is not valid JSON: ", recorder.message());
  }
  if (!header.is_object()) {
    return FileError("header is a JSON ", header.type_name(), ", expected an object");
  }

  SafetensorsContents contents;
  std::vector<TensorSpec> specs;
  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object()) {
        return FileError("'__metadata__' is ", entry.type_name(),
                         ", expected an object of strings");
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          return FileError("'__metadata__' entry '", key, "' is ", value.type_name(),
                           ", expected a string");
        }
        contents.metadata.emplace(key, value.get<std::string>());
      }
      continue;
    }
    absl::StatusOr<TensorSpec> spec = ParseTensorEntry(name, entry, buffer.size());
    if (!spec.ok()) return spec.status();
    specs.push_back(*std::move(spec));
  }
  std::vector<const TensorSpec*> spec_pointers;
  for (const TensorSpec& spec : specs) spec_pointers.push_back(&spec);
  if (absl::Status status = CheckNoOverlaps(std::move(spec_pointers)); !status.ok()) {
    return status;
  }
  for (TensorSpec& spec : specs) {
    contents.tensors[spec.name] = {std::string(spec.dtype->name), std::move(spec.shape),
                                   buffer.substr(spec.begin, spec.end - spec.begin)};
  }
  return contents;
}

absl::StatusOr<std::string> SerializeSafetensorsContents(const SafetensorsContents& contents) {
  // Header: "__metadata__" first, then the tensors in name order, each with its fields in the
  // reference implementation's order, so that its files and ours match byte for byte.
  OrderedJson header = OrderedJson::object();
  if (!contents.metadata.empty()) {
    OrderedJson& meta = header[std::string(kMetadataKey)];
    meta = OrderedJson::object();
    for (const auto& [key, value] : contents.metadata) {
      if (!IsValidUtf8(key) || !IsValidUtf8(value)) {
        return FileError("metadata entry '", key, "' is not valid UTF-8");
      }
      meta[key] = value;
    }
  }
  uint64_t offset = 0;
  for (const auto& [name, entry] : contents.tensors) {
    if (name == kMetadataKey) return TensorError(name, "the name is reserved for metadata");
    if (!IsValidUtf8(name)) return FileError("a tensor name is not valid UTF-8");
    const DtypeInfo* dtype = FindDtype(entry.dtype);
    if (dtype == nullptr) {
      return TensorError(name, "dtype '", entry.dtype,
                         "' is not supported (supported: ", SafetensorsDtypeNames(), ")");
    }
    uint64_t numel = 1;
    for (int64_t dim : entry.shape) {
      if (dim < 0 || __builtin_mul_overflow(numel, static_cast<uint64_t>(dim), &numel)) {
        return TensorError(name, "shape ", ShapeString(entry.shape), " is not valid");
      }
    }
    if (entry.data.size() != numel * dtype->element_size) {
      return TensorError(name, entry.data.size(), " bytes do not match shape ",
                         ShapeString(entry.shape), " of ", dtype->name);
    }
    OrderedJson& json = header[name];
    json = OrderedJson::object();
    json["dtype"] = std::string(dtype->name);
    json["shape"] = entry.shape;
    json["data_offsets"] = OrderedJson::array({offset, offset + entry.data.size()});
    offset += entry.data.size();
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  std::string out;
  out.reserve(kLengthPrefixBytes + header_text.size() + offset);
  const uint64_t header_bytes = header_text.size();
  for (size_t i = 0; i < kLengthPrefixBytes; ++i) {
    out.push_back(static_cast<char>((header_bytes >> (8 * i)) & 0xFF));
  }
  out.append(header_text);
  for (const auto& [name, entry] : contents.tensors)
    out.append(entry.data.data(), entry.data.size());
  return out;
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  FilePtr file(std::fopen(path.c_str(), "rb"));
  if (file == nullptr) {
    return absl::NotFoundError(absl::StrCat("cannot open '", path, "': ", std::strerror(errno)));
  }
  struct stat info;
  if (fstat(fileno(file.get()), &info) != 0 || !S_ISREG(info.st_mode)) {
    return absl::NotFoundError(absl::StrCat("'", path, "' is not a regular file"));
  }
  std::string bytes;
  bytes.reserve(static_cast<size_t>(info.st_size));
  char chunk[1 << 16];
  size_t read;
  while ((read = std::fread(chunk, 1, sizeof(chunk), file.get())) > 0) bytes.append(chunk, read);
  if (std::ferror(file.get())) {
    return absl::DataLossError(absl::StrCat("error reading '", path, "': ", std::strerror(errno)));
  }
  return bytes;
}

absl::Status WriteFileAtomically(const std::string& path, absl::string_view bytes) {
  const std::string temp_path = path + ".tmp";
  const auto fail = [&](absl::string_view what, int error_number) {
    std::remove(temp_path.c_str());
    return absl::ErrnoToStatus(error_number, absl::StrCat("cannot ", what, " '", temp_path, "'"));
  };
  {
    FilePtr file(std::fopen(temp_path.c_str(), "wb"));
    if (file == nullptr) return fail("create", errno);
    if (std::fwrite(bytes.data(), 1, bytes.size(), file.get()) != bytes.size() ||
        std::fflush(file.get()) != 0 || fsync(fileno(file.get())) != 0) {
      const int error_number = errno;
      file.reset();
      return fail("write", error_number);
    }
    if (std::fclose(file.release()) != 0) return fail("close", errno);
  }
  if (std::rename(temp_path.c_str(), path.c_str()) != 0) {
    const int error_number = errno;
    std::remove(temp_path.c_str());
    return absl::ErrnoToStatus(error_number,
                               absl::StrCat("cannot rename '", temp_path, "' to '", path, "'"));
  }
  return absl::OkStatus();
}

}  // namespace lmhead

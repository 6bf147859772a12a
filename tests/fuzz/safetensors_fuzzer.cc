// Fuzzes the safetensors readers with arbitrary file bytes: the container parser
// (core/safetensors_format.h), the core's reader into LibTorch tensors (core/safetensors.h) and
// the clients' reader into wire tensors (client/tensor_file.h). Beyond what the sanitizers catch,
// it checks that the three agree (what one accepts the others accept, with the same shapes,
// dtypes and bytes, or the client refuses a dtype the wire lacks), that errors are
// INVALID_ARGUMENT, that accepted tensors lie inside the file without sharing bytes, and that an
// accepted file serialises (through both writers, byte for byte alike) to a file that parses back
// to the same contents.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/tensor_file.h"
#include "core/safetensors.h"
#include "core/safetensors_format.h"
#include "proto/lmhead/v1/lmhead.pb.h"
#include "tests/fuzz/fuzz_check.h"

namespace lmhead {
namespace {

// numel * element size, or -1 for an unknown dtype or an overflow.
int64_t SafetensorsByteSize(const std::vector<int64_t>& shape, const std::string& dtype) {
  int64_t bytes = SafetensorsElementSize(dtype);
  if (bytes == 0) return -1;
  for (int64_t dim : shape) {
    if (dim < 0 || __builtin_mul_overflow(bytes, dim, &bytes)) return -1;
  }
  return bytes;
}

// Whether two parses hold the same tensors (dtype, shape, bytes) and metadata.
bool SameContents(const SafetensorsContents& a, const SafetensorsContents& b) {
  if (a.metadata != b.metadata || a.tensors.size() != b.tensors.size()) return false;
  for (const auto& [name, entry] : a.tensors) {
    auto other = b.tensors.find(name);
    if (other == b.tensors.end() || other->second.dtype != entry.dtype ||
        other->second.shape != entry.shape || other->second.data != entry.data) {
      return false;
    }
  }
  return true;
}

// Each tensor's data lies inside the file, after the header, and no two share a byte.
void CheckLayout(absl::string_view bytes, const SafetensorsContents& contents) {
  std::vector<std::pair<const char*, const char*>> ranges;
  for (const auto& [name, entry] : contents.tensors) {
    LMHEAD_FUZZ_CHECK(
        static_cast<int64_t>(entry.data.size()) == SafetensorsByteSize(entry.shape, entry.dtype),
        "tensor '%s': %zu bytes do not match its shape", name.c_str(), entry.data.size());
    if (entry.data.empty()) continue;
    LMHEAD_FUZZ_CHECK(entry.data.data() >= bytes.data() + 8 &&
                          entry.data.data() + entry.data.size() <= bytes.data() + bytes.size(),
                      "tensor '%s' lies outside the file's data", name.c_str());
    ranges.emplace_back(entry.data.data(), entry.data.data() + entry.data.size());
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    LMHEAD_FUZZ_CHECK(ranges[i - 1].second <= ranges[i].first, "two tensors share bytes");
  }
}

void CheckCoreReader(absl::string_view bytes, const absl::StatusOr<SafetensorsContents>& contents) {
  absl::StatusOr<SafetensorsFile> file;
  try {
    file = ParseSafetensors(bytes);
  } catch (const std::exception& error) {
    LMHEAD_FUZZ_CHECK(false, "ParseSafetensors threw: %s", error.what());
  }
  if (!contents.ok()) {
    LMHEAD_FUZZ_CHECK(file.status() == contents.status(),
                      "ParseSafetensors says %s, ParseSafetensorsContents %s",
                      file.status().ToString().c_str(), contents.status().ToString().c_str());
    return;
  }
  LMHEAD_FUZZ_CHECK(file.ok(), "ParseSafetensorsContents accepts, ParseSafetensors says %s",
                    file.status().ToString().c_str());
  LMHEAD_FUZZ_CHECK(
      file->metadata == contents->metadata && file->tensors.size() == contents->tensors.size(),
      "the readers disagree on names or metadata");
  for (const auto& [name, entry] : contents->tensors) {
    const at::Tensor& tensor = file->tensors.at(name);
    LMHEAD_FUZZ_CHECK(
        tensor.sizes().vec() == entry.shape && tensor.is_contiguous() &&
            static_cast<int64_t>(tensor.element_size()) == SafetensorsElementSize(entry.dtype) &&
            tensor.nbytes() == entry.data.size() &&
            (entry.data.empty() ||
             std::memcmp(tensor.const_data_ptr(), entry.data.data(), entry.data.size()) == 0),
        "tensor '%s' differs between the readers", name.c_str());
  }

  // Writing the tensors again: both writers give the same bytes, which parse back alike.
  const absl::StatusOr<std::string> written = SerializeSafetensors(file->tensors, file->metadata);
  LMHEAD_FUZZ_CHECK(written.ok(), "SerializeSafetensors: %s", written.status().ToString().c_str());
  const absl::StatusOr<std::string> written_contents = SerializeSafetensorsContents(*contents);
  LMHEAD_FUZZ_CHECK(written_contents.ok(), "SerializeSafetensorsContents: %s",
                    written_contents.status().ToString().c_str());
  LMHEAD_FUZZ_CHECK(*written == *written_contents, "the two writers differ");
  const absl::StatusOr<SafetensorsContents> again = ParseSafetensorsContents(*written);
  LMHEAD_FUZZ_CHECK(again.ok(), "a written file does not parse: %s",
                    again.status().ToString().c_str());
  LMHEAD_FUZZ_CHECK(SameContents(*contents, *again), "a written file parses differently");
}

void CheckClientReader(absl::string_view bytes,
                       const absl::StatusOr<SafetensorsContents>& contents) {
  const absl::StatusOr<std::map<std::string, v1::Tensor>> tensors = ParseSafetensorsTensors(bytes);
  if (!contents.ok()) {
    LMHEAD_FUZZ_CHECK(tensors.status() == contents.status(),
                      "ParseSafetensorsTensors says %s, ParseSafetensorsContents %s",
                      tensors.status().ToString().c_str(), contents.status().ToString().c_str());
    return;
  }
  if (!tensors.ok()) {
    // Only for a dtype the wire lacks.
    LMHEAD_FUZZ_CHECK(absl::IsInvalidArgument(tensors.status()), "unexpected status %s",
                      tensors.status().ToString().c_str());
    bool wire_lacks_one = false;
    for (const auto& [name, entry] : contents->tensors) {
      wire_lacks_one = wire_lacks_one || entry.dtype == "F64" || entry.dtype == "I16" ||
                       entry.dtype == "I8" || entry.dtype == "U8" || entry.dtype == "BOOL";
    }
    LMHEAD_FUZZ_CHECK(wire_lacks_one, "ParseSafetensorsTensors refuses a valid file: %s",
                      tensors.status().ToString().c_str());
    return;
  }
  LMHEAD_FUZZ_CHECK(tensors->size() == contents->tensors.size(), "the readers disagree on names");
  for (const auto& [name, entry] : contents->tensors) {
    const v1::Tensor& tensor = tensors->at(name);
    LMHEAD_FUZZ_CHECK(
        std::vector<int64_t>(tensor.shape().begin(), tensor.shape().end()) == entry.shape &&
            tensor.data() == entry.data,
        "tensor '%s' differs between the readers", name.c_str());
  }
  const absl::StatusOr<std::string> written =
      SerializeSafetensorsTensors(*tensors, contents->metadata);
  LMHEAD_FUZZ_CHECK(written.ok(), "SerializeSafetensorsTensors: %s",
                    written.status().ToString().c_str());
  const absl::StatusOr<SafetensorsContents> again = ParseSafetensorsContents(*written);
  LMHEAD_FUZZ_CHECK(again.ok() && SameContents(*contents, *again),
                    "a file the client wrote parses differently");
}

}  // namespace
}  // namespace lmhead

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  const absl::StatusOr<lmhead::SafetensorsContents> contents =
      lmhead::ParseSafetensorsContents(bytes);
  LMHEAD_FUZZ_CHECK(contents.ok() || absl::IsInvalidArgument(contents.status()),
                    "unexpected status %s", contents.status().ToString().c_str());
  if (contents.ok()) lmhead::CheckLayout(bytes, *contents);
  lmhead::CheckCoreReader(bytes, contents);
  lmhead::CheckClientReader(bytes, contents);
  return 0;
}

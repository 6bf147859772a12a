// Fuzzes the CLI's .npy reader (client/tensor_file.h ParseNpy) with arbitrary file bytes. Beyond
// what the sanitizers catch, it checks that errors are INVALID_ARGUMENT and that an accepted
// array has a wire dtype, non-negative dimensions and exactly numel * element size bytes of data:
// the file's last bytes.
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "client/tensor_file.h"
#include "proto/lmhead/v1/lmhead.pb.h"
#include "proto/wire_dtype.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  const absl::StatusOr<lmhead::v1::Tensor> tensor = lmhead::ParseNpy(bytes);
  if (!tensor.ok()) {
    LMHEAD_FUZZ_CHECK(absl::IsInvalidArgument(tensor.status()), "unexpected status %s",
                      tensor.status().ToString().c_str());
    return 0;
  }
  int64_t expected = lmhead::ElementSize(tensor->dtype());
  LMHEAD_FUZZ_CHECK(expected > 0, "accepted dtype %d", static_cast<int>(tensor->dtype()));
  for (int64_t dim : tensor->shape()) {
    LMHEAD_FUZZ_CHECK(dim >= 0 && !__builtin_mul_overflow(expected, dim, &expected),
                      "accepted a negative or overflowing dimension");
  }
  const std::string& array = tensor->data();
  LMHEAD_FUZZ_CHECK(static_cast<int64_t>(array.size()) == expected &&
                        array.size() <= bytes.size() &&
                        bytes.compare(bytes.size() - array.size(), array.size(), array) == 0,
                    "accepted %zu bytes of data for %lld expected", array.size(),
                    static_cast<long long>(expected));
  return 0;
}

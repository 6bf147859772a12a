// Fuzzes the config JSON parser (core/config_json.h) with arbitrary bytes. Beyond what the
// sanitizers catch, it checks the header's contracts: a rejected text gets INVALID_ARGUMENT, and
// an accepted config written back to JSON reads back to the same config.
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/config.h"
#include "core/config_json.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

// Field by field, so that values JSON cannot tell apart (an infinite eps written as null) differ.
bool SameNorm(const lmhead::LayerNormConfig& a, const lmhead::LayerNormConfig& b) {
  return a.name == b.name && a.eps == b.eps && a.elementwise_affine == b.elementwise_affine &&
         a.bias == b.bias && a.full_precision == b.full_precision && a.dtype == b.dtype;
}

bool SameConfig(const lmhead::LMHeadConfig& a, const lmhead::LMHeadConfig& b) {
  return a.name == b.name && a.layer_norm.has_value() == b.layer_norm.has_value() &&
         (!a.layer_norm.has_value() || SameNorm(*a.layer_norm, *b.layer_norm)) &&
         a.bias == b.bias && a.dtype == b.dtype && a.loss_implementation == b.loss_implementation;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  const absl::StatusOr<lmhead::LMHeadConfig> config = lmhead::LMHeadConfigFromJson(text);
  if (!config.ok()) {
    LMHEAD_FUZZ_CHECK(absl::IsInvalidArgument(config.status()), "unexpected status: %s",
                      config.status().ToString().c_str());
    return 0;
  }
  // Any outcome is fine; it must only not crash.
  (void)config->Validate();

  const std::string json = lmhead::LMHeadConfigToJson(*config);
  const absl::StatusOr<lmhead::LMHeadConfig> again = lmhead::LMHeadConfigFromJson(json);
  LMHEAD_FUZZ_CHECK(again.ok(), "%s does not read back: %s", json.c_str(),
                    again.status().ToString().c_str());
  LMHEAD_FUZZ_CHECK(SameConfig(*config, *again), "%s reads back as %s", json.c_str(),
                    lmhead::LMHeadConfigToJson(*again).c_str());
  return 0;
}

// LMHeadConfig <-> JSON, in the shape of OLMo-core's config dataclasses (docs/SPEC.md §1, §5):
//
//   {"name": "default" | "normalized",
//    "layer_norm": null | {"name": "default" | "rms" | "qwen_rms" | "cute_rms" | "fused_rms" |
//                                   "l2_norm",
//                          "eps": number, "elementwise_affine": bool, "bias": bool,
//                          "full_precision": bool, "dtype": "float32" | "bfloat16" | "float16"},
//    "bias": null | bool,
//    "dtype": "float32" | "bfloat16" | "float16",
//    "loss_implementation": "default" | "fused_linear"}
//
// A missing field takes its default and null leaves it unset (for fields that cannot be unset,
// null means the default). Only syntax and types are checked here; LMHeadConfig::Validate holds
// the construction rules.
#ifndef LMHEAD_CORE_CONFIG_JSON_H_
#define LMHEAD_CORE_CONFIG_JSON_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/config.h"

namespace lmhead {

// Parses a JSON object. INVALID_ARGUMENT for malformed JSON, an unknown field, a value of the
// wrong type or an unknown enum name; the message starts with the field's path
// ("layer_norm.eps: expected a number").
absl::StatusOr<LMHeadConfig> LMHeadConfigFromJson(absl::string_view text);

// Writes every field (unset optionals as null) in the order above; LMHeadConfigFromJson reads it
// back to an equal config.
std::string LMHeadConfigToJson(const LMHeadConfig& config);

}  // namespace lmhead

#endif  // LMHEAD_CORE_CONFIG_JSON_H_

// LMHeadConfig and LayerNormConfig: OLMo-core's head configuration (docs/SPEC.md §1, §5), its
// validation, parameter counts, the names of its enums, and the rule for a request's overrides
// of a loaded head's config (ApplyConfigOverride). Free of LibTorch, so the server and
// clients can use it without compiling tensor headers.
#ifndef LMHEAD_CORE_CONFIG_H_
#define LMHEAD_CORE_CONFIG_H_

#include <cstdint>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lmhead {

// olmo_core.nn.layer_norm.LayerNormType. cute_rms and fused_rms are kernels upstream; here they
// compute the rms math with the same construction rules.
enum class LayerNormType { kDefault, kRms, kQwenRms, kCuteRms, kFusedRms, kL2Norm };

// olmo_core.nn.lm_head.LMHeadType.
enum class LMHeadType { kDefault, kNormalized };

// olmo_core.nn.lm_head.LMLossImplementation.
enum class LossImplementation { kDefault, kFusedLinear };

// Parameter dtypes a head can be built with (olmo_core DType, without the fp8 types).
enum class DType { kFloat32, kBFloat16, kFloat16 };

// The `loss_reduction` forward argument.
enum class LossReduction { kMean, kSum, kNone };

// Names as OLMo-core spells them ("rms", "fused_linear", "bfloat16", "mean", ...).
absl::string_view Name(LayerNormType type);
absl::string_view Name(LMHeadType type);
absl::string_view Name(LossImplementation impl);
absl::string_view Name(DType dtype);
absl::string_view Name(LossReduction reduction);

// Parsers for those names. `field` names the setting in the error message.
absl::StatusOr<LayerNormType> ParseLayerNormType(absl::string_view name,
                                                 absl::string_view field = "layer_norm.name");
absl::StatusOr<LMHeadType> ParseLMHeadType(absl::string_view name,
                                           absl::string_view field = "name");
absl::StatusOr<LossImplementation> ParseLossImplementation(
    absl::string_view name, absl::string_view field = "loss_implementation");
absl::StatusOr<DType> ParseDType(absl::string_view name, absl::string_view field = "dtype");
absl::StatusOr<LossReduction> ParseLossReduction(absl::string_view name,
                                                 absl::string_view field = "loss_reduction");

// olmo_core LayerNormConfig. Unset optionals mean "the class default" (eps 1e-5, affine, bias and
// full precision on, fp32 parameters); l2_norm takes none of them.
struct LayerNormConfig {
  LayerNormType name = LayerNormType::kDefault;
  std::optional<double> eps;
  std::optional<bool> elementwise_affine;
  std::optional<bool> bias;
  std::optional<bool> full_precision;
  std::optional<DType> dtype;

  // The construction errors OLMo-core raises for this config (docs/SPEC.md §5): INVALID_ARGUMENT
  // for options the class does not take, UNIMPLEMENTED for combinations the kernels refuse.
  absl::Status Validate() const;

  // The values the built norm uses, with class defaults filled in.
  double EffectiveEps() const { return eps.value_or(1e-5); }
  bool EffectiveAffine() const;
  bool EffectiveBias() const;  // true only when the norm has a bias parameter
  bool EffectiveFullPrecision() const { return full_precision.value_or(true); }
  DType EffectiveDType() const { return dtype.value_or(DType::kFloat32); }

  // LayerNormConfig.num_params(size), the formula as upstream writes it.
  int64_t NumParams(int64_t size) const;
};

// olmo_core LMHeadConfig.
struct LMHeadConfig {
  LMHeadType name = LMHeadType::kDefault;
  std::optional<LayerNormConfig> layer_norm;
  std::optional<bool> bias;  // unset: true for kDefault; must stay unset for kNormalized
  DType dtype = DType::kFloat32;
  LossImplementation loss_implementation = LossImplementation::kDefault;

  // The construction errors of LMHeadConfig.build (docs/SPEC.md §1, §4), layer norm included.
  absl::Status Validate() const;

  // Whether the built head has a w_out bias.
  bool EffectiveBias() const { return bias.value_or(name == LMHeadType::kDefault); }

  // LMHeadConfig.num_params(d_model, vocab_size), also for combinations that fail to build.
  int64_t NumParams(int64_t d_model, int64_t vocab_size) const;
};

// What a request asks to change in a loaded head's LayerNormConfig: unset fields keep the
// head's values.
struct LayerNormConfigOverride {
  std::optional<LayerNormType> name;
  std::optional<double> eps;
  std::optional<bool> elementwise_affine;
  std::optional<bool> bias;
  std::optional<bool> full_precision;
  std::optional<DType> dtype;
};

// What a request asks to change in a loaded head's LMHeadConfig: unset fields keep the head's
// values. A set `layer_norm`, even with no field set, says the head has a layer norm.
struct LMHeadConfigOverride {
  std::optional<LMHeadType> name;
  std::optional<LayerNormConfigOverride> layer_norm;
  std::optional<bool> bias;
  std::optional<DType> dtype;
  std::optional<LossImplementation> loss_implementation;
};

// `base` (a loaded head's config) with `override_` applied: the rule for per-request configs.
// Fields that define the weights -- the head's name, its w_out bias, the layer norm's presence
// and its name, eps, elementwise_affine and bias -- must equal base's effective values (unset
// fields of base compared by their defaults) and are kept as base has them; otherwise
// INVALID_ARGUMENT `config.<field>: the weights have <what base has>; the request's <value>
// contradicts them` (the server names the model in place of "the weights"). The dtypes, the
// layer norm's full_precision and the loss implementation may change. The result passes
// LMHeadConfig::Validate; otherwise its error, code kept (INVALID_ARGUMENT or UNIMPLEMENTED),
// with `config: ` prefixed.
absl::StatusOr<LMHeadConfig> ApplyConfigOverride(const LMHeadConfig& base,
                                                 const LMHeadConfigOverride& override_);

}  // namespace lmhead

#endif  // LMHEAD_CORE_CONFIG_H_

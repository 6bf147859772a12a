#include "core/config.h"

#include <array>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lmhead {
namespace {

template <typename Enum, size_t N>
using NameTable = std::array<std::pair<Enum, absl::string_view>, N>;

constexpr NameTable<LayerNormType, 6> kLayerNormTypes = {{
    {LayerNormType::kDefault, "default"},
    {LayerNormType::kRms, "rms"},
    {LayerNormType::kQwenRms, "qwen_rms"},
    {LayerNormType::kCuteRms, "cute_rms"},
    {LayerNormType::kFusedRms, "fused_rms"},
    {LayerNormType::kL2Norm, "l2_norm"},
}};
constexpr NameTable<LMHeadType, 2> kHeadTypes = {{
    {LMHeadType::kDefault, "default"},
    {LMHeadType::kNormalized, "normalized"},
}};
constexpr NameTable<LossImplementation, 2> kLossImplementations = {{
    {LossImplementation::kDefault, "default"},
    {LossImplementation::kFusedLinear, "fused_linear"},
}};
constexpr NameTable<DType, 3> kDTypes = {{
    {DType::kFloat32, "float32"},
    {DType::kBFloat16, "bfloat16"},
    {DType::kFloat16, "float16"},
}};
constexpr NameTable<LossReduction, 3> kReductions = {{
    {LossReduction::kMean, "mean"},
    {LossReduction::kSum, "sum"},
    {LossReduction::kNone, "none"},
}};

template <typename Enum, size_t N>
absl::string_view Lookup(const NameTable<Enum, N>& table, Enum value) {
  for (const auto& [e, name] : table) {
    if (e == value) return name;
  }
  return "unknown";
}

template <typename Enum, size_t N>
absl::StatusOr<Enum> Parse(const NameTable<Enum, N>& table, absl::string_view name,
                           absl::string_view field) {
  std::vector<absl::string_view> names;
  for (const auto& [e, n] : table) {
    if (n == name) return e;
    names.push_back(n);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      field, ": unknown value '", name, "', expected one of: ", absl::StrJoin(names, ", ")));
}

absl::string_view ClassName(LayerNormType type) {
  switch (type) {
    case LayerNormType::kDefault:
      return "LayerNorm";
    case LayerNormType::kRms:
      return "RMSNorm";
    case LayerNormType::kQwenRms:
      return "QwenRMSNorm";
    case LayerNormType::kCuteRms:
      return "CuTeRMSNorm";
    case LayerNormType::kFusedRms:
      return "FusedRMSNorm";
    case LayerNormType::kL2Norm:
      return "L2Norm";
  }
  return "LayerNorm";
}

}  // namespace

absl::string_view Name(LayerNormType type) { return Lookup(kLayerNormTypes, type); }
absl::string_view Name(LMHeadType type) { return Lookup(kHeadTypes, type); }
absl::string_view Name(LossImplementation impl) { return Lookup(kLossImplementations, impl); }
absl::string_view Name(DType dtype) { return Lookup(kDTypes, dtype); }
absl::string_view Name(LossReduction reduction) { return Lookup(kReductions, reduction); }

absl::StatusOr<LayerNormType> ParseLayerNormType(absl::string_view name, absl::string_view field) {
  return Parse(kLayerNormTypes, name, field);
}
absl::StatusOr<LMHeadType> ParseLMHeadType(absl::string_view name, absl::string_view field) {
  return Parse(kHeadTypes, name, field);
}
absl::StatusOr<LossImplementation> ParseLossImplementation(absl::string_view name,
                                                           absl::string_view field) {
  return Parse(kLossImplementations, name, field);
}
absl::StatusOr<DType> ParseDType(absl::string_view name, absl::string_view field) {
  return Parse(kDTypes, name, field);
}
absl::StatusOr<LossReduction> ParseLossReduction(absl::string_view name, absl::string_view field) {
  return Parse(kReductions, name, field);
}

bool LayerNormConfig::EffectiveAffine() const {
  return elementwise_affine.value_or(name != LayerNormType::kL2Norm);
}

bool LayerNormConfig::EffectiveBias() const {
  return EffectiveAffine() && bias.value_or(name != LayerNormType::kL2Norm);
}

absl::Status LayerNormConfig::Validate() const {
  const std::string prefix =
      absl::StrCat("invalid options for '", Name(name), "' LayerNormConfig, ");
  if (name == LayerNormType::kL2Norm) {
    // L2Norm takes only `size`: upstream's TypeError names the first field that is set.
    const std::pair<bool, absl::string_view> fields[] = {
        {eps.has_value(), "eps"},     {elementwise_affine.has_value(), "elementwise_affine"},
        {bias.has_value(), "bias"},   {full_precision.has_value(), "full_precision"},
        {dtype.has_value(), "dtype"},
    };
    for (const auto& [set, field] : fields) {
      if (set) {
        return absl::InvalidArgumentError(
            absl::StrCat(prefix, "L2Norm got an unexpected option '", field, "'"));
      }
    }
  }
  if (name == LayerNormType::kFusedRms && !EffectiveAffine()) {
    return absl::UnimplementedError(absl::StrCat(
        "Currently only 'elementwise_affine=True' is supported with '", ClassName(name), "'"));
  }
  if ((name == LayerNormType::kFusedRms || name == LayerNormType::kCuteRms) &&
      !EffectiveFullPrecision()) {
    return absl::UnimplementedError(absl::StrCat(
        "Currently only 'full_precision=True' is supported with '", ClassName(name), "'"));
  }
  return absl::OkStatus();
}

int64_t LayerNormConfig::NumParams(int64_t size) const {
  const bool affine = elementwise_affine.value_or(name != LayerNormType::kL2Norm);
  const bool with_bias = bias.value_or(name != LayerNormType::kL2Norm);
  int64_t params = 0;
  if (affine) {
    params += size;
    if (with_bias) params += size;
  }
  return params;
}

absl::Status LMHeadConfig::Validate() const {
  if (name == LMHeadType::kNormalized) {
    // NormalizedLMHead takes neither a layer norm nor a bias, not even bias=False.
    const std::string prefix = "invalid options for 'normalized' LMHeadConfig, ";
    if (layer_norm.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "NormalizedLMHead got an unexpected option 'layer_norm'"));
    }
    if (bias.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "NormalizedLMHead got an unexpected option 'bias'"));
    }
    return absl::OkStatus();
  }
  if (layer_norm.has_value()) return layer_norm->Validate();
  return absl::OkStatus();
}

int64_t LMHeadConfig::NumParams(int64_t d_model, int64_t vocab_size) const {
  int64_t params = 0;
  if (layer_norm.has_value()) params += layer_norm->NumParams(d_model);
  params += d_model * vocab_size;
  if (bias.value_or(name != LMHeadType::kNormalized)) params += vocab_size;
  if (name == LMHeadType::kNormalized) params += vocab_size;  // the scale `sz`
  return params;
}

absl::StatusOr<LMHeadConfig> ApplyConfigOverride(const LMHeadConfig& base,
                                                 const LMHeadConfigOverride& override_) {
  const auto contradicts = [](absl::string_view field, absl::string_view weights_have,
                              absl::string_view request_has) {
    return absl::InvalidArgumentError(absl::StrCat("config.", field, ": the weights have ",
                                                   weights_have, "; the request's ", request_has,
                                                   " contradicts them"));
  };
  const auto boolean = [](bool value) { return value ? "true" : "false"; };
  if (override_.name && *override_.name != base.name) {
    return contradicts("name", absl::StrCat("a '", Name(base.name), "' head"),
                       absl::StrCat("'", Name(*override_.name), "'"));
  }
  if (override_.bias && *override_.bias != base.EffectiveBias()) {
    return contradicts("bias", base.EffectiveBias() ? "a w_out bias" : "no w_out bias",
                       absl::StrCat("bias=", boolean(*override_.bias)));
  }
  LMHeadConfig config = base;
  if (override_.layer_norm.has_value()) {
    const LayerNormConfigOverride& norm = *override_.layer_norm;
    if (!base.layer_norm.has_value()) {
      return contradicts("layer_norm", "no layer norm", "layer_norm");
    }
    const LayerNormConfig& base_norm = *base.layer_norm;
    if (norm.name && *norm.name != base_norm.name) {
      return contradicts("layer_norm.name",
                         absl::StrCat("a '", Name(base_norm.name), "' layer norm"),
                         absl::StrCat("'", Name(*norm.name), "'"));
    }
    if (norm.eps && *norm.eps != base_norm.EffectiveEps()) {
      return contradicts("layer_norm.eps", absl::StrCat("eps=", base_norm.EffectiveEps()),
                         absl::StrCat("eps=", *norm.eps));
    }
    if (norm.elementwise_affine && *norm.elementwise_affine != base_norm.EffectiveAffine()) {
      return contradicts("layer_norm.elementwise_affine",
                         base_norm.EffectiveAffine() ? "a norm weight" : "no norm weight",
                         absl::StrCat("elementwise_affine=", boolean(*norm.elementwise_affine)));
    }
    if (norm.bias && *norm.bias != base_norm.EffectiveBias()) {
      return contradicts("layer_norm.bias",
                         base_norm.EffectiveBias() ? "a norm bias" : "no norm bias",
                         absl::StrCat("bias=", boolean(*norm.bias)));
    }
    if (norm.full_precision) config.layer_norm->full_precision = *norm.full_precision;
    if (norm.dtype) config.layer_norm->dtype = *norm.dtype;
  }
  if (override_.dtype) config.dtype = *override_.dtype;
  if (override_.loss_implementation) config.loss_implementation = *override_.loss_implementation;
  if (absl::Status status = config.Validate(); !status.ok()) {
    return absl::Status(status.code(), absl::StrCat("config: ", status.message()));
  }
  return config;
}

}  // namespace lmhead

#include "core/config_json.h"

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace lmhead {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

absl::Status FieldError(absl::string_view path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

// Rejects any key of `object` outside `known`.
template <size_t N>
absl::Status CheckKnownFields(const Json& object, const absl::string_view (&known)[N],
                              absl::string_view prefix) {
  for (const auto& item : object.items()) {
    bool found = false;
    for (absl::string_view name : known) found = found || item.key() == name;
    if (!found) return FieldError(absl::StrCat(prefix, item.key()), "unknown field");
  }
  return absl::OkStatus();
}

// The value of `key`, or nullptr when it is missing or null.
const Json* Find(const Json& object, const char* key) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<std::optional<bool>> ReadBool(const Json& object, const char* key,
                                             absl::string_view path) {
  const Json* value = Find(object, key);
  if (value == nullptr) return std::optional<bool>();
  if (!value->is_boolean()) return FieldError(path, "expected a boolean");
  return std::optional<bool>(value->get<bool>());
}

absl::StatusOr<std::optional<double>> ReadNumber(const Json& object, const char* key,
                                                 absl::string_view path) {
  const Json* value = Find(object, key);
  if (value == nullptr) return std::optional<double>();
  if (!value->is_number()) return FieldError(path, "expected a number");
  return std::optional<double>(value->get<double>());
}

// Reads an enum field spelled as a string with `parse` (one of the parsers of core/config.h).
template <typename Enum, typename Parser>
absl::StatusOr<std::optional<Enum>> ReadEnum(const Json& object, const char* key,
                                             absl::string_view path, Parser parse) {
  const Json* value = Find(object, key);
  if (value == nullptr) return std::optional<Enum>();
  if (!value->is_string()) return FieldError(path, "expected a string");
  absl::StatusOr<Enum> parsed = parse(value->get_ref<const std::string&>(), path);
  if (!parsed.ok()) return parsed.status();
  return std::optional<Enum>(*parsed);
}

absl::StatusOr<LayerNormConfig> LayerNormFromJson(const Json& object) {
  static constexpr absl::string_view kFields[] = {
      "name", "eps", "elementwise_affine", "bias", "full_precision", "dtype"};
  if (!object.is_object()) return FieldError("layer_norm", "expected an object or null");
  if (absl::Status s = CheckKnownFields(object, kFields, "layer_norm."); !s.ok()) return s;

  LayerNormConfig config;
  auto name = ReadEnum<LayerNormType>(object, "name", "layer_norm.name", ParseLayerNormType);
  if (!name.ok()) return name.status();
  config.name = name->value_or(LayerNormType::kDefault);

  auto eps = ReadNumber(object, "eps", "layer_norm.eps");
  if (!eps.ok()) return eps.status();
  config.eps = *eps;

  const std::pair<const char*, std::optional<bool>*> flags[] = {
      {"elementwise_affine", &config.elementwise_affine},
      {"bias", &config.bias},
      {"full_precision", &config.full_precision},
  };
  for (const auto& [key, field] : flags) {
    auto value = ReadBool(object, key, absl::StrCat("layer_norm.", key));
    if (!value.ok()) return value.status();
    *field = *value;
  }

  auto dtype = ReadEnum<DType>(object, "dtype", "layer_norm.dtype", ParseDType);
  if (!dtype.ok()) return dtype.status();
  config.dtype = *dtype;
  return config;
}

OrderedJson OptionalToJson(const std::optional<bool>& value) {
  return value.has_value() ? OrderedJson(*value) : OrderedJson(nullptr);
}

}  // namespace

absl::StatusOr<LMHeadConfig> LMHeadConfigFromJson(absl::string_view text) {
  Json object = Json::parse(text.begin(), text.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (object.is_discarded()) return absl::InvalidArgumentError("config: malformed JSON");
  if (!object.is_object()) return absl::InvalidArgumentError("config: expected a JSON object");
  static constexpr absl::string_view kFields[] = {"name", "layer_norm", "bias", "dtype",
                                                  "loss_implementation"};
  if (absl::Status s = CheckKnownFields(object, kFields, ""); !s.ok()) return s;

  LMHeadConfig config;
  auto name = ReadEnum<LMHeadType>(object, "name", "name", ParseLMHeadType);
  if (!name.ok()) return name.status();
  config.name = name->value_or(LMHeadType::kDefault);

  if (const Json* layer_norm = Find(object, "layer_norm"); layer_norm != nullptr) {
    absl::StatusOr<LayerNormConfig> norm = LayerNormFromJson(*layer_norm);
    if (!norm.ok()) return norm.status();
    config.layer_norm = *std::move(norm);
  }

  auto bias = ReadBool(object, "bias", "bias");
  if (!bias.ok()) return bias.status();
  config.bias = *bias;

  auto dtype = ReadEnum<DType>(object, "dtype", "dtype", ParseDType);
  if (!dtype.ok()) return dtype.status();
  config.dtype = dtype->value_or(DType::kFloat32);

  auto impl = ReadEnum<LossImplementation>(object, "loss_implementation", "loss_implementation",
                                           ParseLossImplementation);
  if (!impl.ok()) return impl.status();
  config.loss_implementation = impl->value_or(LossImplementation::kDefault);
  return config;
}

std::string LMHeadConfigToJson(const LMHeadConfig& config) {
  OrderedJson out;
  out["name"] = std::string(Name(config.name));
  if (config.layer_norm.has_value()) {
    const LayerNormConfig& norm = *config.layer_norm;
    OrderedJson layer_norm;
    layer_norm["name"] = std::string(Name(norm.name));
    layer_norm["eps"] = norm.eps.has_value() ? OrderedJson(*norm.eps) : OrderedJson(nullptr);
    layer_norm["elementwise_affine"] = OptionalToJson(norm.elementwise_affine);
    layer_norm["bias"] = OptionalToJson(norm.bias);
    layer_norm["full_precision"] = OptionalToJson(norm.full_precision);
    layer_norm["dtype"] =
        norm.dtype.has_value() ? OrderedJson(std::string(Name(*norm.dtype))) : OrderedJson(nullptr);
    out["layer_norm"] = std::move(layer_norm);
  } else {
    out["layer_norm"] = nullptr;
  }
  out["bias"] = OptionalToJson(config.bias);
  out["dtype"] = std::string(Name(config.dtype));
  out["loss_implementation"] = std::string(Name(config.loss_implementation));
  return out.dump();
}

}  // namespace lmhead

#include "server/forward_request.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/config.h"
#include "core/dtype.h"
#include "proto/wire_dtype.h"
#include "server/logging.h"
#include "server/status.h"
#include "server/tensor_codec.h"

namespace lmhead {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", message));
}

// ---- Enums: one table per enum, core <-> wire, read both ways.

template <typename Core, typename Wire>
struct EnumPair {
  Core core;
  Wire wire;
};

constexpr EnumPair<DType, v1::DataType> kDTypes[] = {
    {DType::kBFloat16, v1::DATA_TYPE_BF16},
    {DType::kFloat16, v1::DATA_TYPE_FP16},
    {DType::kFloat32, v1::DATA_TYPE_FP32},
};
constexpr EnumPair<LayerNormType, v1::LayerNormType> kLayerNormTypes[] = {
    {LayerNormType::kDefault, v1::LAYER_NORM_TYPE_DEFAULT},
    {LayerNormType::kRms, v1::LAYER_NORM_TYPE_RMS},
    {LayerNormType::kQwenRms, v1::LAYER_NORM_TYPE_QWEN_RMS},
    {LayerNormType::kCuteRms, v1::LAYER_NORM_TYPE_CUTE_RMS},
    {LayerNormType::kFusedRms, v1::LAYER_NORM_TYPE_FUSED_RMS},
    {LayerNormType::kL2Norm, v1::LAYER_NORM_TYPE_L2_NORM},
};
constexpr EnumPair<LMHeadType, v1::HeadType> kHeadTypes[] = {
    {LMHeadType::kDefault, v1::HEAD_TYPE_DEFAULT},
    {LMHeadType::kNormalized, v1::HEAD_TYPE_NORMALIZED},
};
constexpr EnumPair<LossImplementation, v1::LossImplementation> kLossImplementations[] = {
    {LossImplementation::kDefault, v1::LOSS_IMPLEMENTATION_DEFAULT},
    {LossImplementation::kFusedLinear, v1::LOSS_IMPLEMENTATION_FUSED_LINEAR},
};
constexpr EnumPair<LossReduction, v1::LossReduction> kLossReductions[] = {
    {LossReduction::kMean, v1::LOSS_REDUCTION_MEAN},
    {LossReduction::kSum, v1::LOSS_REDUCTION_SUM},
    {LossReduction::kNone, v1::LOSS_REDUCTION_NONE},
};

// The wire value of `value` in `table`.
template <typename Core, typename Wire, size_t N>
Wire ToWire(const EnumPair<Core, Wire> (&table)[N], Core value) {
  for (const auto& [core, wire] : table) {
    if (core == value) return wire;
  }
  return Wire{};  // every core value is in its table
}

// The core value of wire `value` in `table`: nullopt when unset (0); INVALID_ARGUMENT naming
// `field` ("unknown <enum_name> value N") when `table` does not have it.
template <typename Core, typename Wire, size_t N>
absl::StatusOr<std::optional<Core>> FromWire(const EnumPair<Core, Wire> (&table)[N], int value,
                                             absl::string_view field, absl::string_view enum_name) {
  if (value == 0) return std::optional<Core>();
  for (const auto& [core, wire] : table) {
    if (wire == value) return std::optional<Core>(core);
  }
  return Invalid(field, absl::StrCat("unknown ", enum_name, " value ", value));
}

// A parameter dtype: floating types only, the message says which.
absl::StatusOr<std::optional<DType>> ParamDTypeFromWire(int value, absl::string_view field) {
  absl::StatusOr<std::optional<DType>> dtype = FromWire(kDTypes, value, field, "DataType");
  if (dtype.ok()) return dtype;
  return Invalid(field,
                 absl::StrCat("expected BF16, FP16 or FP32 (or unset), got ", DataTypeName(value)));
}

// Unset is "mean", as upstream's default.
absl::StatusOr<LossReduction> LossReductionFromWire(int value, absl::string_view field) {
  absl::StatusOr<std::optional<LossReduction>> reduction =
      FromWire(kLossReductions, value, field, "LossReduction");
  if (!reduction.ok()) return reduction.status();
  return reduction->value_or(LossReduction::kMean);
}

// ---- Core -> wire.

v1::HeadConfig ToWire(const LMHeadConfig& config) {
  v1::HeadConfig out;
  out.set_name(ToWire(kHeadTypes, config.name));
  if (config.layer_norm.has_value()) {
    const LayerNormConfig& norm = *config.layer_norm;
    v1::LayerNormConfig* wire = out.mutable_layer_norm();
    wire->set_name(ToWire(kLayerNormTypes, norm.name));
    if (norm.eps) wire->set_eps(*norm.eps);
    if (norm.elementwise_affine) wire->set_elementwise_affine(*norm.elementwise_affine);
    if (norm.bias) wire->set_bias(*norm.bias);
    if (norm.full_precision) wire->set_full_precision(*norm.full_precision);
    if (norm.dtype) wire->set_dtype(ToWire(kDTypes, *norm.dtype));
  }
  if (config.bias) out.set_bias(*config.bias);
  out.set_dtype(ToWire(kDTypes, config.dtype));
  out.set_loss_implementation(ToWire(kLossImplementations, config.loss_implementation));
  return out;
}

}  // namespace

v1::ModelInfo ModelInfoToWire(const Model& model, bool expose_path) {
  const LMHead& head = model.head();
  v1::ModelInfo info;
  info.set_name(model.name());
  info.set_version(model.version());
  info.set_d_model(head.d_model());
  info.set_vocab_size(head.vocab_size());
  *info.mutable_config() = ToWire(head.config());
  info.set_dtype(ToWire(kDTypes, head.config().dtype));
  info.set_num_params(head.config().NumParams(head.d_model(), head.vocab_size()));
  info.set_device(head.device().str());
  for (const std::string& device : model.devices()) info.add_devices(device);
  // The host's paths are the operator's business: callers see the file's name unless
  // --expose_model_paths.
  const std::string& source = model.source();
  const size_t slash = source.find_last_of('/');
  info.set_source(expose_path || slash == std::string::npos ? source : source.substr(slash + 1));
  return info;
}

namespace {

// ---- Requests.

// The request's config overrides, decoded: unknown enum values are errors naming the field.
absl::StatusOr<LMHeadConfigOverride> OverrideFromWire(const v1::HeadConfig& wire) {
  LMHeadConfigOverride override_;
  absl::StatusOr<std::optional<LMHeadType>> name =
      FromWire(kHeadTypes, wire.name(), "config.name", "HeadType");
  if (!name.ok()) return name.status();
  override_.name = *name;
  if (wire.has_bias()) override_.bias = wire.bias();
  if (wire.has_layer_norm()) {
    const v1::LayerNormConfig& norm = wire.layer_norm();
    LayerNormConfigOverride& norm_override = override_.layer_norm.emplace();
    absl::StatusOr<std::optional<LayerNormType>> type =
        FromWire(kLayerNormTypes, norm.name(), "config.layer_norm.name", "LayerNormType");
    if (!type.ok()) return type.status();
    norm_override.name = *type;
    if (norm.has_eps()) norm_override.eps = norm.eps();
    if (norm.has_elementwise_affine()) norm_override.elementwise_affine = norm.elementwise_affine();
    if (norm.has_bias()) norm_override.bias = norm.bias();
    if (norm.has_full_precision()) norm_override.full_precision = norm.full_precision();
    absl::StatusOr<std::optional<DType>> dtype =
        ParamDTypeFromWire(norm.dtype(), "config.layer_norm.dtype");
    if (!dtype.ok()) return dtype.status();
    norm_override.dtype = *dtype;
  }
  absl::StatusOr<std::optional<DType>> dtype = ParamDTypeFromWire(wire.dtype(), "config.dtype");
  if (!dtype.ok()) return dtype.status();
  override_.dtype = *dtype;
  absl::StatusOr<std::optional<LossImplementation>> implementation =
      FromWire(kLossImplementations, wire.loss_implementation(), "config.loss_implementation",
               "LossImplementation");
  if (!implementation.ok()) return implementation.status();
  override_.loss_implementation = *implementation;
  return override_;
}

// The model's configuration with the request's overrides applied, by core's rule
// (ApplyConfigOverride). Its "the weights have X; the request's Y contradicts them" becomes
// "model '<name>' has X; the request's Y contradicts its weights".
absl::StatusOr<LMHeadConfig> EffectiveConfig(const Model& model, const v1::HeadConfig& wire) {
  absl::StatusOr<LMHeadConfigOverride> override_ = OverrideFromWire(wire);
  if (!override_.ok()) return override_.status();
  absl::StatusOr<LMHeadConfig> config = ApplyConfigOverride(model.head().config(), *override_);
  if (config.ok()) return config;
  constexpr absl::string_view kWeightsHave = ": the weights have ";
  constexpr absl::string_view kContradicts = " contradicts them";
  absl::string_view message = config.status().message();
  const size_t have = message.find(kWeightsHave);
  if (have == absl::string_view::npos || !absl::EndsWith(message, kContradicts)) return config;
  message.remove_suffix(kContradicts.size());
  return absl::Status(
      config.status().code(),
      absl::StrCat(message.substr(0, have), ": model '", model.name(), "' has ",
                   message.substr(have + kWeightsHave.size()), " contradicts its weights"));
}

constexpr std::initializer_list<v1::DataType> kFloatTypes = {v1::DATA_TYPE_BF16, v1::DATA_TYPE_FP16,
                                                             v1::DATA_TYPE_FP32};

const TensorRule kHiddenRule{"hidden_states", kFloatTypes, 3};
const TensorRule kLabelsRule{"labels", {v1::DATA_TYPE_INT64, v1::DATA_TYPE_INT32}, 2};
const TensorRule kPositionsRule{"options.logits_to_keep_positions", {v1::DATA_TYPE_INT64}, 2};
const TensorRule kDivFactorRule{"options.loss_div_factor_tensor", kFloatTypes, -1};
const TensorRule kCandidatesRule{
    "options.scoring.candidate_ids", {v1::DATA_TYPE_INT64, v1::DATA_TYPE_INT32}, -1};
const TensorRule kSegmentsRule{
    "options.scoring.segment_ids", {v1::DATA_TYPE_INT64, v1::DATA_TYPE_INT32}, 2};

}  // namespace

absl::Status WithWireFields(const absl::Status& status, const v1::ForwardRequest& request) {
  const v1::ForwardOptions& wire = request.options();
  const std::pair<absl::string_view, std::string> names[] = {
      {"x", "hidden_states"},
      {"labels", "labels"},
      {"logits_to_keep", wire.logits_to_keep_case() == v1::ForwardOptions::kLogitsToKeepPositions
                             ? "options.logits_to_keep_positions"
                             : "options.logits_to_keep_count"},
      {"loss_div_factor", wire.loss_div_factor_case() == v1::ForwardOptions::kLossDivFactorTensor
                              ? "options.loss_div_factor_tensor"
                              : "options.loss_div_factor_value"},
      {"loss_reduction", "options.loss_reduction"},
      {"return_logits", "options.return_logits"},
      {"ignore_index", "options.ignore_index"},
      {"z_loss_multiplier", "options.z_loss_multiplier"},
      {"logit_tile_bytes", "options.logit_tile_bytes"},
      {"loss_implementation", "config.loss_implementation"},
      {"top_k", "options.scoring.top_k"},
      {"candidate_ids", "options.scoring.candidate_ids"},
      {"segment_ids", "options.scoring.segment_ids"},
      {"scoring", "options.scoring"},
  };
  const absl::string_view message = status.message();
  for (const auto& [argument, field] : names) {
    if (absl::StartsWith(message, absl::StrCat(argument, ": "))) {
      absl::Status renamed(status.code(), absl::StrCat(field, message.substr(argument.size())));
      status.ForEachPayload([&renamed](absl::string_view url, const absl::Cord& payload) {
        renamed.SetPayload(url, payload);
      });
      return renamed;
    }
  }
  return status;
}

namespace {

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// The region that ForwardRequest.outputs names for output `name`; null when unset.
const v1::SharedMemoryRef* OutputRef(const v1::OutputRegions& outputs, absl::string_view name) {
  if (name == "logits") return outputs.has_logits() ? &outputs.logits() : nullptr;
  if (name == "loss") return outputs.has_loss() ? &outputs.loss() : nullptr;
  if (name == "ce_loss") return outputs.has_ce_loss() ? &outputs.ce_loss() : nullptr;
  if (name == "z_loss") return outputs.has_z_loss() ? &outputs.z_loss() : nullptr;
  if (name == "argmax") return outputs.has_argmax() ? &outputs.argmax() : nullptr;
  return nullptr;
}

constexpr absl::string_view kOutputNames[] = {"logits", "loss", "ce_loss", "z_loss", "argmax"};

// Why a call does not produce an output that ForwardRequest.outputs names.
absl::string_view NotProducedBecause(absl::string_view name) {
  if (name == "logits") {
    return "options.return_logits is false or the loss implementation is fused_linear";
  }
  if (name == "argmax") return "options.return_argmax is not set";
  if (name == "z_loss") return "it has no labels or no options.z_loss_multiplier";
  return "it has no labels";
}

// Checks the outputs that `outputs` sends to shared memory (each produced by this call, its
// byte_size that output's size exactly), then RESOURCE_EXHAUSTED unless every other tensor the
// response to `plan` would carry (logits, argmax, loss, ce_loss, z_loss), counted in bytes, fits
// `limit`. Records the outputs sent to regions in plan.shared_outputs, not yet resolved.
absl::StatusOr<ForwardPlan> CheckResponseSize(ForwardPlan plan,
                                              const std::optional<LossOutputSpec>& losses,
                                              int64_t vocab_size, int64_t limit,
                                              const v1::OutputRegions& outputs) {
  struct Part {
    std::string name;
    int64_t bytes;
    std::string described;  // shape and dtype, "[2, 5, 1000] of FP32"
  };
  std::vector<Part> parts;
  bool overflow = false;
  const auto add = [&](absl::string_view name, const std::vector<int64_t>& sizes,
                       v1::DataType dtype) {
    int64_t bytes = ElementSize(dtype);
    for (const int64_t size : sizes) overflow |= __builtin_mul_overflow(bytes, size, &bytes);
    parts.push_back(
        {std::string(name), bytes, absl::StrCat(ShapeText(sizes), " of ", DataTypeName(dtype))});
  };
  // Without labels the logits come back unless a call asking for scoring outputs declines them.
  const bool returns_logits =
      plan.options.return_logits != false &&
      (!losses.has_value() || plan.config.loss_implementation == LossImplementation::kDefault);
  if (returns_logits) add("logits", {plan.batch, plan.kept, vocab_size}, plan.logits_dtype);
  if (plan.options.return_argmax) add("argmax", {plan.batch, plan.kept}, v1::DATA_TYPE_INT64);
  // Scoring outputs (never in shared memory): the continuations' at their most, one per kept
  // position.
  const ScoringOptions& scoring = plan.options.scoring;
  const std::vector<int64_t> per_position = {plan.batch, plan.kept};
  if (scoring.label_logprobs) add("scoring.label_logprobs", per_position, v1::DATA_TYPE_FP32);
  if (scoring.entropy) add("scoring.entropy", per_position, v1::DATA_TYPE_FP32);
  if (scoring.label_rank) add("scoring.label_rank", per_position, v1::DATA_TYPE_INT64);
  if (scoring.top_k > 0) {
    add("scoring.top_k_ids", {plan.batch, plan.kept, scoring.top_k}, v1::DATA_TYPE_INT64);
    add("scoring.top_k_logprobs", {plan.batch, plan.kept, scoring.top_k}, v1::DATA_TYPE_FP32);
  }
  if (scoring.candidate_ids.has_value()) {
    add("scoring.candidate_logprobs", {plan.batch, plan.kept, scoring.candidate_ids->size(-1)},
        v1::DATA_TYPE_FP32);
  }
  if (scoring.segment_ids.has_value()) {
    add("scoring.segment_logprob_sums", per_position, v1::DATA_TYPE_FP32);
    add("scoring.segment_token_counts", per_position, v1::DATA_TYPE_INT64);
    add("scoring.segment_is_greedy", per_position, v1::DATA_TYPE_BOOL);
    add("scoring.segment_entropy_sums", per_position, v1::DATA_TYPE_FP32);
  }
  if (losses.has_value()) {
    add("loss", losses->shape, DataTypeOf(losses->loss_dtype));
    add("ce_loss", losses->shape, DataTypeOf(losses->ce_loss_dtype));
    if (losses->z_loss_dtype) add("z_loss", losses->shape, DataTypeOf(*losses->z_loss_dtype));
  }
  for (const absl::string_view name : kOutputNames) {
    const v1::SharedMemoryRef* ref = OutputRef(outputs, name);
    if (ref == nullptr) continue;
    const std::string field = absl::StrCat("outputs.", name);
    const auto part =
        std::find_if(parts.begin(), parts.end(), [&](const Part& p) { return p.name == name; });
    if (part == parts.end()) {
      return Invalid(field,
                     absl::StrCat("this call returns no ", name, ": ", NotProducedBecause(name)));
    }
    if (overflow || ref->byte_size() != static_cast<uint64_t>(part->bytes)) {
      return Invalid(absl::StrCat(field, ".byte_size"),
                     absl::StrCat("expected ", part->bytes, " bytes (", name, " ", part->described,
                                  "), got ", ref->byte_size()));
    }
    plan.shared_outputs[std::string(name)] =
        RegionSlice{field, nullptr, ref->region(), ref->offset(), ref->byte_size()};
  }
  int64_t total = 0;
  std::vector<std::string> described;
  for (const Part& part : parts) {
    if (plan.shared_outputs.count(part.name) > 0) continue;  // written to shared memory
    overflow |= __builtin_add_overflow(total, part.bytes, &total);
    described.push_back(absl::StrCat(part.name, " ", part.bytes));
  }
  if (!overflow && total <= limit) return plan;
  // The same request would be refused again: clients are told not to retry it.
  return NotRetryable(absl::ResourceExhaustedError(
      absl::StrCat("hidden_states.shape: the response would carry ",
                   overflow ? "more than 2^63" : absl::StrCat(total), " bytes of tensors (",
                   absl::StrJoin(described, ", "), "), over the limit of ", limit,
                   " bytes (--max_response_bytes); send fewer positions per call (ForwardStream "
                   "micro-batches, options.logits_to_keep), or set options.return_logits=false")));
}

// The request's tensors that may be in shared memory and that DecodeInputs decodes, as (field,
// tensor).
std::vector<std::pair<absl::string_view, const v1::Tensor*>> TensorFields(
    const v1::ForwardRequest& request) {
  std::vector<std::pair<absl::string_view, const v1::Tensor*>> fields = {
      {"hidden_states", &request.hidden_states()}};
  if (request.has_labels()) fields.emplace_back("labels", &request.labels());
  const v1::ForwardOptions& wire = request.options();
  if (wire.logits_to_keep_case() == v1::ForwardOptions::kLogitsToKeepPositions) {
    fields.emplace_back("options.logits_to_keep_positions", &wire.logits_to_keep_positions());
  }
  if (wire.loss_div_factor_case() == v1::ForwardOptions::kLossDivFactorTensor) {
    fields.emplace_back("options.loss_div_factor_tensor", &wire.loss_div_factor_tensor());
  }
  if (wire.scoring().has_candidate_ids()) {
    fields.emplace_back("options.scoring.candidate_ids", &wire.scoring().candidate_ids());
  }
  if (wire.scoring().has_segment_ids()) {
    fields.emplace_back("options.scoring.segment_ids", &wire.scoring().segment_ids());
  }
  return fields;
}

// FAILED_PRECONDITION naming the first field that references shared memory when it is off.
absl::Status CheckSharedMemoryAllowed(const v1::ForwardRequest& request,
                                      const SharedMemoryAccess& access) {
  if (access.regions != nullptr) return absl::OkStatus();
  std::string field;
  for (const auto& [name, tensor] : TensorFields(request)) {
    if (tensor->has_shared_memory()) {
      field = absl::StrCat(name, ".shared_memory");
      break;
    }
  }
  for (const absl::string_view name : kOutputNames) {
    if (field.empty() && OutputRef(request.outputs(), name) != nullptr) {
      field = absl::StrCat("outputs.", name);
    }
  }
  if (field.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat(field, ": shared memory is off on this server (--allow_shared_memory)"));
}

// Finds `slice`'s region for the request's connection and checks that its bytes lie inside it.
absl::Status Resolve(const SharedMemoryAccess& access, RegionSlice& slice) {
  absl::StatusOr<std::shared_ptr<const Region>> region =
      access.regions->Find(slice.id, access.peer);
  if (!region.ok()) {
    return absl::Status(region.status().code(),
                        absl::StrCat(slice.field, ".region: ", region.status().message()));
  }
  const uint64_t size = (*region)->size();
  if (slice.offset > size) {
    return Invalid(absl::StrCat(slice.field, ".offset"),
                   absl::StrCat(slice.offset, " is past the end of region ", CallerText(slice.id),
                                " (", size, " bytes)"));
  }
  if (!RangeInside(slice.offset, slice.byte_size, size)) {
    return Invalid(
        absl::StrCat(slice.field, ".byte_size"),
        absl::StrCat("offset ", slice.offset, " + byte_size ", slice.byte_size,
                     " is past the end of region ", CallerText(slice.id), " (", size, " bytes)"));
  }
  slice.region = *std::move(region);
  return absl::OkStatus();
}

// Resolves every region `request` names (its used tensors' and its outputs') into `plan`.
absl::Status ResolveRegions(const v1::ForwardRequest& request, const SharedMemoryAccess& access,
                            ForwardPlan& plan) {
  for (const auto& [name, tensor] : TensorFields(request)) {
    if (!tensor->has_shared_memory()) continue;
    const v1::SharedMemoryRef& ref = tensor->shared_memory();
    RegionSlice slice{absl::StrCat(name, ".shared_memory"), nullptr, ref.region(), ref.offset(),
                      ref.byte_size()};
    if (absl::Status found = Resolve(access, slice); !found.ok()) return found;
    plan.shared_inputs[std::string(name)] = std::move(slice);
  }
  for (auto& [name, slice] : plan.shared_outputs) {
    if (absl::Status found = Resolve(access, slice); !found.ok()) return found;
  }
  return absl::OkStatus();
}

// options.logit_tile_bytes, or options.fused_chunk_bytes, its deprecated name (read for one
// release; the first use in a process logs a warning); both set to different values is an
// error naming both. nullopt when neither is set.
absl::StatusOr<std::optional<int64_t>> LogitTileBytesFromWire(const v1::ForwardOptions& wire) {
  std::optional<int64_t> bytes;
  absl::string_view field = "options.logit_tile_bytes";
  if (wire.has_logit_tile_bytes()) bytes = wire.logit_tile_bytes();
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  if (wire.has_fused_chunk_bytes()) {
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true)) {
      LogWarning(kNoRequest,
                 "a client sent options.fused_chunk_bytes, deprecated: it is read for one more "
                 "release; send options.logit_tile_bytes (logged once per process)");
    }
    if (bytes.has_value() && *bytes != wire.fused_chunk_bytes()) {
      return Invalid("options.logit_tile_bytes",
                     absl::StrCat(*bytes,
                                  " disagrees with options.fused_chunk_bytes, its "
                                  "deprecated name, ",
                                  wire.fused_chunk_bytes(), "; send logit_tile_bytes alone"));
    }
    if (!bytes.has_value()) field = "options.fused_chunk_bytes";
    bytes = wire.fused_chunk_bytes();
  }
#pragma GCC diagnostic pop
  if (bytes.has_value() && *bytes < 0) {
    return Invalid(
        field, absl::StrCat("expected a positive byte count (or 0 for the default), got ", *bytes));
  }
  return bytes;
}

}  // namespace

absl::StatusOr<ForwardPlan> PlanForward(const ModelRegistry& registry, const Options& limits,
                                        const v1::ForwardRequest& request,
                                        const SharedMemoryAccess& shared_memory,
                                        const DetachedData* hidden_states_data) {
  if (absl::Status allowed = CheckSharedMemoryAllowed(request, shared_memory); !allowed.ok()) {
    return allowed;
  }
  ForwardPlan plan;
  plan.hidden_states_data = hidden_states_data;
  absl::StatusOr<std::shared_ptr<const Model>> model = registry.Find(request.model());
  if (!model.ok()) return model.status();
  plan.model = *std::move(model);
  const LMHead& base = plan.model->head();
  absl::StatusOr<LMHeadConfig> config = EffectiveConfig(*plan.model, request.config());
  if (!config.ok()) return config.status();
  plan.config = *std::move(config);

  // Scalar options.
  const v1::ForwardOptions& wire = request.options();
  ForwardOptions& options = plan.options;
  if (wire.has_ignore_index()) options.ignore_index = wire.ignore_index();
  absl::StatusOr<LossReduction> reduction =
      LossReductionFromWire(wire.loss_reduction(), "options.loss_reduction");
  if (!reduction.ok()) return reduction.status();
  options.loss_reduction = *reduction;
  if (wire.has_z_loss_multiplier()) options.z_loss_multiplier = wire.z_loss_multiplier();
  if (wire.has_return_logits()) options.return_logits = wire.return_logits();
  absl::StatusOr<std::optional<int64_t>> tile_bytes = LogitTileBytesFromWire(wire);
  if (!tile_bytes.ok()) return tile_bytes.status();
  if (tile_bytes->has_value()) options.logit_tile_bytes = **tile_bytes;
  options.return_argmax = wire.return_argmax();
  options.scoring.label_logprobs = wire.scoring().label_logprobs();
  options.scoring.entropy = wire.scoring().entropy();
  options.scoring.label_rank = wire.scoring().label_rank();
  options.scoring.top_k = wire.scoring().top_k();
  options.loss_implementation = plan.config.loss_implementation;
  if (wire.logits_to_keep_case() == v1::ForwardOptions::kLogitsToKeepCount) {
    options.logits_to_keep = wire.logits_to_keep_count();
  }
  if (wire.loss_div_factor_case() == v1::ForwardOptions::kLossDivFactorValue) {
    options.loss_div_factor = wire.loss_div_factor_value();
  }
  plan.logits_dtype = ToWire(kDTypes, plan.config.dtype);
  if (wire.logits_dtype() != v1::DATA_TYPE_UNSPECIFIED) {
    absl::StatusOr<std::optional<DType>> dtype =
        ParamDTypeFromWire(wire.logits_dtype(), "options.logits_dtype");
    if (!dtype.ok()) return dtype.status();
    plan.logits_dtype = ToWire(kDTypes, **dtype);
  }

  // Tensor shapes.
  absl::StatusOr<std::vector<int64_t>> x_shape =
      ValidateTensor(request.hidden_states(), kHiddenRule, hidden_states_data);
  if (!x_shape.ok()) return x_shape.status();
  plan.batch = (*x_shape)[0];
  plan.length = (*x_shape)[1];
  if ((*x_shape)[2] != base.d_model()) {
    return Invalid(
        "hidden_states.shape",
        absl::StrCat("expected (batch, seq_len, d_model=", base.d_model(), ") for model '",
                     plan.model->name(), "', got d_model=", (*x_shape)[2]));
  }
  if (request.has_labels()) {
    absl::StatusOr<std::vector<int64_t>> shape = ValidateTensor(request.labels(), kLabelsRule);
    if (!shape.ok()) return shape.status();
    if ((*shape)[0] != plan.batch || (*shape)[1] != plan.length) {
      return Invalid("labels.shape", absl::StrCat("expected (batch=", plan.batch, ", seq_len=",
                                                  plan.length, ") like hidden_states, got (",
                                                  (*shape)[0], ", ", (*shape)[1], ")"));
    }
  }
  plan.kept = plan.length;
  if (wire.logits_to_keep_case() == v1::ForwardOptions::kLogitsToKeepPositions) {
    absl::StatusOr<std::vector<int64_t>> shape =
        ValidateTensor(wire.logits_to_keep_positions(), kPositionsRule);
    if (!shape.ok()) return shape.status();
    if ((*shape)[0] != plan.batch) {
      return Invalid("options.logits_to_keep_positions.shape",
                     absl::StrCat("expected (batch=", plan.batch, ", K), got (", (*shape)[0], ", ",
                                  (*shape)[1], ")"));
    }
    plan.kept = (*shape)[1];
  } else if (wire.logits_to_keep_case() == v1::ForwardOptions::kLogitsToKeepCount) {
    plan.kept = plan.length - KeptStart(wire.logits_to_keep_count(), plan.length);
  }
  // Scoring's index tensors: their shapes here (as meta tensors, so that the core's checks of
  // the options read them and the response's size counts them); their values come with
  // DecodeInputs.
  const auto shape_only = [](const std::vector<int64_t>& shape) {
    return at::empty(shape, at::TensorOptions().dtype(at::kLong).device(at::kMeta));
  };
  if (wire.scoring().has_candidate_ids()) {
    absl::StatusOr<std::vector<int64_t>> shape =
        ValidateTensor(wire.scoring().candidate_ids(), kCandidatesRule);
    if (!shape.ok()) return shape.status();
    const bool shared = shape->size() == 1;
    if (!shared && !(shape->size() == 3 && (*shape)[0] == plan.batch && (*shape)[1] == plan.kept)) {
      return Invalid("options.scoring.candidate_ids.shape",
                     absl::StrCat("expected (C,) for every kept position or (batch=", plan.batch,
                                  ", kept=", plan.kept, ", C), got ", ShapeText(*shape)));
    }
    const int64_t count = shape->back();
    if (count < 1 || count > kMaxCandidates) {
      return Invalid(
          "options.scoring.candidate_ids.shape",
          absl::StrCat("expected 1 to ", kMaxCandidates, " ids per position, got ", count));
    }
    options.scoring.candidate_ids = shape_only(*shape);
  }
  if (wire.scoring().has_segment_ids()) {
    absl::StatusOr<std::vector<int64_t>> shape =
        ValidateTensor(wire.scoring().segment_ids(), kSegmentsRule);
    if (!shape.ok()) return shape.status();
    if ((*shape)[0] != plan.batch || (*shape)[1] != plan.length) {
      return Invalid("options.scoring.segment_ids.shape",
                     absl::StrCat("expected (batch=", plan.batch, ", seq_len=", plan.length,
                                  ") like hidden_states, got ", ShapeText(*shape)));
    }
    options.scoring.segment_ids = shape_only(*shape);
  }
  // Every tensor of the forward, empty dimensions counted as 1, must be addressable: the
  // largest are the logits (batch, kept, vocab_size) and the hidden states.
  int64_t extent = 8;
  for (const int64_t size :
       {plan.batch, plan.length, std::max(base.vocab_size(), base.d_model())}) {
    if (__builtin_mul_overflow(extent, std::max<int64_t>(size, 1), &extent)) {
      return Invalid("hidden_states.shape",
                     absl::StrCat("(batch=", plan.batch, ", seq_len=", plan.length,
                                  ") is too large for vocab_size ", base.vocab_size(),
                                  ": the logits could not be indexed"));
    }
  }
  std::optional<LossOutputSpec> losses;
  if (request.has_labels()) {
    if (wire.loss_div_factor_case() == v1::ForwardOptions::kLossDivFactorTensor) {
      absl::StatusOr<std::vector<int64_t>> shape =
          ValidateTensor(wire.loss_div_factor_tensor(), kDivFactorRule);
      if (!shape.ok()) return shape.status();
      // Only its shape and dtype are read here; the values come with DecodeInputs.
      options.loss_div_factor =
          at::empty(*shape, at::TensorOptions()
                                .dtype(ScalarTypeOf(wire.loss_div_factor_tensor().dtype()))
                                .device(at::kMeta));
    }
    absl::StatusOr<LossOutputSpec> spec =
        LossOutputs(plan.config, plan.batch, plan.kept, plan.options);
    if (!spec.ok()) return WithWireFields(spec.status(), request);
    losses = *std::move(spec);
    if (std::holds_alternative<at::Tensor>(options.loss_div_factor)) {
      options.loss_div_factor = std::monostate();
    }
  }
  absl::StatusOr<ForwardPlan> checked = CheckResponseSize(
      std::move(plan), losses, base.vocab_size(), limits.max_response_bytes, request.outputs());
  if (!checked.ok()) return checked;
  if (shared_memory.regions != nullptr) {
    if (absl::Status resolved = ResolveRegions(request, shared_memory, *checked); !resolved.ok()) {
      return resolved;
    }
  }
  return checked;
}

namespace {

// Each scoring output: its name, the core's tensor and the response's field.
struct ScoringFieldOf {
  absl::string_view name;
  std::optional<at::Tensor> ScoringOutputs::*core;
  v1::Tensor* (v1::ScoringOutputs::*wire)();
};
constexpr ScoringFieldOf kScoringFields[] = {
    {"label_logprobs", &ScoringOutputs::label_logprobs,
     &v1::ScoringOutputs::mutable_label_logprobs},
    {"entropy", &ScoringOutputs::entropy, &v1::ScoringOutputs::mutable_entropy},
    {"label_rank", &ScoringOutputs::label_rank, &v1::ScoringOutputs::mutable_label_rank},
    {"top_k_ids", &ScoringOutputs::top_k_ids, &v1::ScoringOutputs::mutable_top_k_ids},
    {"top_k_logprobs", &ScoringOutputs::top_k_logprobs,
     &v1::ScoringOutputs::mutable_top_k_logprobs},
    {"candidate_logprobs", &ScoringOutputs::candidate_logprobs,
     &v1::ScoringOutputs::mutable_candidate_logprobs},
    {"segment_logprob_sums", &ScoringOutputs::segment_logprob_sums,
     &v1::ScoringOutputs::mutable_segment_logprob_sums},
    {"segment_token_counts", &ScoringOutputs::segment_token_counts,
     &v1::ScoringOutputs::mutable_segment_token_counts},
    {"segment_is_greedy", &ScoringOutputs::segment_is_greedy,
     &v1::ScoringOutputs::mutable_segment_is_greedy},
    {"segment_entropy_sums", &ScoringOutputs::segment_entropy_sums,
     &v1::ScoringOutputs::mutable_segment_entropy_sums},
};

// Where a resolved slice's bytes are, keeping its region mapped while they are used.
ExternalBytes BytesOf(const RegionSlice& slice) {
  const Region& region = *slice.region;
  return ExternalBytes{static_cast<char*>(region.data()) + slice.offset,
                       region.kind() == Region::Kind::kCuda
                           ? c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(region.device()))
                           : c10::Device(c10::kCPU),
                       slice.region};
}

// `tensor` decoded from the request or from its region. `private_copy`: a region's bytes are
// copied into host memory of the server's own (see DecodeInputs).
absl::StatusOr<at::Tensor> DecodeField(const v1::Tensor& tensor, const TensorRule& rule,
                                       const ForwardPlan& plan, bool private_copy) {
  const auto slice = plan.shared_inputs.find(std::string(rule.field));
  if (slice == plan.shared_inputs.end()) return DecodeTensor(tensor, rule);
  return DecodeExternalTensor(tensor, rule, BytesOf(slice->second), private_copy);
}

}  // namespace

absl::StatusOr<at::Tensor> DecodeInputs(const v1::ForwardRequest& request, ForwardPlan* plan,
                                        bool pinned) {
  // Hidden states may be read where they are: any value is valid. The index tensors and the
  // divisor are validated by their values (ValidateForward, after this): those are copied out of
  // shared memory first, so that the client cannot change them between the check and the use.
  absl::StatusOr<at::Tensor> x =
      plan->hidden_states_data != nullptr
          ? DecodeTensor(request.hidden_states(), kHiddenRule, plan->hidden_states_data, pinned)
          : DecodeField(request.hidden_states(), kHiddenRule, *plan, /*private_copy=*/false);
  if (!x.ok()) return x.status();
  ForwardOptions& options = plan->options;
  if (request.has_labels()) {
    absl::StatusOr<at::Tensor> labels =
        DecodeField(request.labels(), kLabelsRule, *plan, /*private_copy=*/true);
    if (!labels.ok()) return labels.status();
    options.labels = labels->to(at::kLong);
  }
  const v1::ForwardOptions& wire = request.options();
  if (wire.logits_to_keep_case() == v1::ForwardOptions::kLogitsToKeepPositions) {
    absl::StatusOr<at::Tensor> positions =
        DecodeField(wire.logits_to_keep_positions(), kPositionsRule, *plan, /*private_copy=*/true);
    if (!positions.ok()) return positions.status();
    options.logits_to_keep = *positions;
  }
  if (wire.loss_div_factor_case() == v1::ForwardOptions::kLossDivFactorTensor) {
    absl::StatusOr<at::Tensor> factor =
        DecodeField(wire.loss_div_factor_tensor(), kDivFactorRule, *plan, /*private_copy=*/true);
    if (!factor.ok()) return factor.status();
    options.loss_div_factor = *factor;
  }
  if (wire.scoring().has_candidate_ids()) {
    absl::StatusOr<at::Tensor> ids =
        DecodeField(wire.scoring().candidate_ids(), kCandidatesRule, *plan, /*private_copy=*/true);
    if (!ids.ok()) return ids.status();
    options.scoring.candidate_ids = ids->to(at::kLong);
  }
  if (wire.scoring().has_segment_ids()) {
    absl::StatusOr<at::Tensor> ids =
        DecodeField(wire.scoring().segment_ids(), kSegmentsRule, *plan, /*private_copy=*/true);
    if (!ids.ok()) return ids.status();
    options.scoring.segment_ids = ids->to(at::kLong);
  }
  return x;
}

absl::Status EncodeOutputs(const LMOutput& output, const ForwardPlan& plan,
                           v1::ForwardResponse* response) {
  using Field = v1::Tensor* (v1::ForwardResponse::*)();
  const std::tuple<absl::string_view, const std::optional<at::Tensor>*, Field> outputs[] = {
      {"logits", &output.logits, &v1::ForwardResponse::mutable_logits},
      {"loss", &output.loss, &v1::ForwardResponse::mutable_loss},
      {"ce_loss", &output.ce_loss, &v1::ForwardResponse::mutable_ce_loss},
      {"z_loss", &output.z_loss, &v1::ForwardResponse::mutable_z_loss},
      {"argmax", &output.argmax, &v1::ForwardResponse::mutable_argmax},
  };
  for (const auto& [name, value, field] : outputs) {
    if (!value->has_value()) continue;
    v1::Tensor* wire = (response->*field)();
    // Logits in the requested dtype; the others in their own.
    const v1::DataType dtype =
        name == "logits" ? plan.logits_dtype : DataTypeOf((*value)->scalar_type());
    const auto slice = plan.shared_outputs.find(std::string(name));
    if (slice == plan.shared_outputs.end()) {
      if (absl::Status status = EncodeTensor(**value, dtype, wire); !status.ok()) return status;
      continue;
    }
    const RegionSlice& to = slice->second;
    if (absl::Status status = EncodeTensorTo(**value, dtype, BytesOf(to), to.byte_size, wire);
        !status.ok()) {
      return status;
    }
    v1::SharedMemoryRef* ref = wire->mutable_shared_memory();
    ref->set_region(to.id);
    ref->set_offset(to.offset);
    ref->set_byte_size(to.byte_size);
  }
  // Scoring outputs, always in the response.
  for (const ScoringFieldOf& field : kScoringFields) {
    const std::optional<at::Tensor>& value = output.scoring.*field.core;
    if (!value.has_value()) continue;
    v1::Tensor* wire = (response->mutable_scoring()->*field.wire)();
    if (absl::Status status = EncodeTensor(*value, DataTypeOf(value->scalar_type()), wire);
        !status.ok()) {
      return status;
    }
  }
  // A region whose object shrank while this call used it lost what was read or written there.
  for (const auto* slices : {&plan.shared_inputs, &plan.shared_outputs}) {
    for (const auto& [name, slice] : *slices) {
      if (!slice.region->shrunk()) continue;
      return absl::FailedPreconditionError(
          absl::StrCat(slice.field, ": the shared memory object of region ", CallerText(slice.id),
                       " shrank below the region while this call used it; its results are lost"));
    }
  }
  response->set_num_scored_tokens(output.num_scored_tokens);
  response->set_model(plan.model->name());
  response->set_model_version(plan.model->version());
  return absl::OkStatus();
}

std::vector<std::pair<absl::string_view, std::optional<at::Tensor>*>> ScoringTensors(
    ScoringOutputs& outputs) {
  std::vector<std::pair<absl::string_view, std::optional<at::Tensor>*>> tensors;
  for (const ScoringFieldOf& field : kScoringFields) {
    tensors.emplace_back(field.name, &(outputs.*field.core));
  }
  return tensors;
}

}  // namespace lmhead

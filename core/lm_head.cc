#include "core/lm_head.h"

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/device_copy.h"
#include "core/dtype.h"
#include "core/fused_scoring.h"
#include "core/layer_norm.h"
#include "core/losses.h"
#include "core/ops/logit_stats.h"
#include "core/torch_errors.h"

namespace lmhead {
namespace {

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string ScalarTypeName(c10::ScalarType type) { return std::string(c10::toString(type)); }

// Hugging Face spellings of our parameter names.
const std::map<std::string, std::string>& HuggingFaceNames() {
  static const auto* names = new std::map<std::string, std::string>{
      {"lm_head.weight", "w_out.weight"},
      {"lm_head.bias", "w_out.bias"},
      {"model.norm.weight", "norm.weight"},
      {"model.norm.bias", "norm.bias"},
  };
  return *names;
}

// h[:, -k:, :] with Python slice semantics, or a per-row gather along dim 1 (docs/SPEC.md §2.1
// step 3).
at::Tensor SelectPositions(const at::Tensor& t, const std::variant<int64_t, at::Tensor>& keep) {
  if (const auto* k = std::get_if<int64_t>(&keep)) {
    if (*k == 0) return t;
    const int64_t length = t.size(1);
    return t.slice(1, KeptStart(*k, length), length);
  }
  const at::Tensor& positions = std::get<at::Tensor>(keep);
  if (t.dim() == 3) {
    return t.gather(1, positions.unsqueeze(-1).expand({-1, -1, t.size(-1)}));
  }
  return t.gather(1, positions);
}

// _finalize_loss without tensor or context parallelism (docs/SPEC.md §2.5).
at::Tensor FinalizeLoss(const at::Tensor& loss, int64_t batch, LossReduction reduction,
                        const std::variant<std::monostate, double, at::Tensor>& div_factor) {
  at::Tensor out = reduction == LossReduction::kNone ? loss.view({batch, -1}) : loss;
  if (const auto* d = std::get_if<double>(&div_factor)) return out / *d;
  if (const auto* d = std::get_if<at::Tensor>(&div_factor)) return out / *d;
  return out;
}

// LMOutputWithLoss: logits unless return_logits=False, and the finalised losses.
LMOutput MakeOutput(std::optional<at::Tensor> logits, const LossTerms& terms, int64_t batch,
                    const ForwardOptions& options) {
  const auto finalize = [&](const at::Tensor& t) {
    return FinalizeLoss(t, batch, options.loss_reduction, options.loss_div_factor);
  };
  LMOutput out;
  if (options.return_logits != false) out.logits = std::move(logits);
  out.loss = finalize(terms.loss);
  out.ce_loss = finalize(terms.ce_loss);
  if (terms.z_loss.has_value()) out.z_loss = finalize(*terms.z_loss);
  return out;
}

// The labels of the kept positions, flattened: (B * S',).
at::Tensor KeptLabels(const ForwardOptions& options) {
  return SelectPositions(*options.labels, options.logits_to_keep).contiguous().view(-1);
}

// options.scoring over the kept positions of `batch` rows of `kept`, as core/scoring.h's
// per-position functions take it: candidate_ids (C,) or (B * S', C), segment_ids kept (B, S').
ScoringOptions KeptScoring(const ForwardOptions& options, int64_t batch, int64_t kept) {
  ScoringOptions scoring = options.scoring;
  if (scoring.candidate_ids.has_value() && scoring.candidate_ids->dim() == 3) {
    scoring.candidate_ids =
        scoring.candidate_ids->reshape({batch * kept, scoring.candidate_ids->size(2)});
  }
  if (scoring.segment_ids.has_value()) {
    scoring.segment_ids = SelectPositions(*scoring.segment_ids, options.logits_to_keep);
  }
  return scoring;
}

// The default implementation's tail, shared by Forward and ForwardBatch: logits (B, S', V) of
// one request, then its argmax, loss terms, scoring outputs (segment sums S' wide) and outputs.
LMOutput DefaultOutput(const at::Tensor& logits, const ForwardOptions& options) {
  const int64_t batch = logits.size(0);
  const int64_t kept = logits.size(1);
  const at::Tensor flat = logits.view({-1, logits.size(-1)});
  at::Tensor labels;
  if (options.labels.has_value()) labels = KeptLabels(options);
  std::optional<at::Tensor> argmax;
  if (options.return_argmax) argmax = logits.argmax(-1);
  ScoringOutputs scoring;
  if (options.scoring.any()) {
    const ScoringOptions kept_scoring = KeptScoring(options, batch, kept);
    scoring = AssembleScoringOutputs(
        ScoreLogitRows(flat, labels, options.ignore_index, kept_scoring), batch, kept, labels,
        options.ignore_index, kept_scoring, /*groups=*/kept);
  }
  LMOutput out;
  if (!options.labels.has_value()) {
    if (options.return_logits != false) out.logits = logits;
  } else {
    const LossTerms terms = DefaultLoss(flat, labels, options.ignore_index, options.loss_reduction,
                                        options.z_loss_multiplier);
    out = MakeOutput(logits, terms, batch, options);
  }
  out.argmax = std::move(argmax);
  out.scoring = std::move(scoring);
  return out;
}

// fused_linear's tail, shared by Forward and ForwardBatch: the loss terms of one request's
// batch x kept positions, then its outputs.
LMOutput FusedOutput(const LossTerms& terms, int64_t batch, int64_t kept,
                     const ForwardOptions& options) {
  LMOutput out = MakeOutput(std::nullopt, terms, batch, options);
  if (options.return_argmax) out.argmax = terms.argmax->view({batch, kept});
  return out;
}

int64_t LogitTileBytes(int64_t requested, const c10::Device& device) {
  return requested > 0 ? requested : DefaultLogitTileBytes(device);
}

// The number of scored positions when both index tensors are on the host (free), else unset.
std::optional<int64_t> HostScoredCount(const ForwardOptions& options) {
  if (!options.labels.has_value()) return 0;
  const auto* positions = std::get_if<at::Tensor>(&options.logits_to_keep);
  if (!options.labels->is_cpu() || (positions != nullptr && !positions->is_cpu())) {
    return std::nullopt;
  }
  return SelectPositions(*options.labels, options.logits_to_keep)
      .ne(options.ignore_index)
      .sum()
      .item<int64_t>();
}

// The same queued on the device of `options`' index tensors (both on one device): () int64.
at::Tensor QueueScoredCount(const ForwardOptions& options) {
  return SelectPositions(*options.labels, options.logits_to_keep).ne(options.ignore_index).sum();
}

// The number of continuations G: 1 + the largest kept segment id, 0 for none.
at::Tensor SegmentCount(const ForwardOptions& options) {
  const at::Tensor kept = SelectPositions(*options.scoring.segment_ids, options.logits_to_keep);
  if (kept.numel() == 0) return at::zeros({}, kept.options());
  return kept.max().add(1).clamp_min(0);
}

// G when segment_ids (and a positions tensor) are on the host (free; 0 without segment_ids),
// else unset.
std::optional<int64_t> HostSegmentCount(const ForwardOptions& options) {
  if (!options.scoring.segment_ids.has_value()) return 0;
  const auto* positions = std::get_if<at::Tensor>(&options.logits_to_keep);
  if (!options.scoring.segment_ids->is_cpu() || (positions != nullptr && !positions->is_cpu())) {
    return std::nullopt;
  }
  return SegmentCount(options).item<int64_t>();
}

// `options` with its index tensors on `device` (CopyToDevice: no synchronisation).
ForwardOptions IndexTensorsOn(const ForwardOptions& options, const c10::Device& device) {
  ForwardOptions moved = options;
  for (std::optional<at::Tensor>* index :
       {&moved.labels, &moved.scoring.candidate_ids, &moved.scoring.segment_ids}) {
    if (index->has_value()) *index = CopyToDevice(**index, device);
  }
  if (auto* kept = std::get_if<at::Tensor>(&moved.logits_to_keep)) {
    *kept = CopyToDevice(*kept, device);
  }
  return moved;
}

// Whether any of `options`' index tensors is off the CPU.
bool IndexTensorsOnDevice(const ForwardOptions& options) {
  const auto* positions = std::get_if<at::Tensor>(&options.logits_to_keep);
  if (positions != nullptr && !positions->is_cpu()) return true;
  for (const std::optional<at::Tensor>* index :
       {&options.labels, &options.scoring.candidate_ids, &options.scoring.segment_ids}) {
    if (index->has_value() && !(*index)->is_cpu()) return true;
  }
  return false;
}

absl::Status InvalidArgument(absl::string_view field, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", message));
}

}  // namespace

int64_t KeptStart(int64_t logits_to_keep, int64_t seq_len) {
  const int64_t k = logits_to_keep;
  if (k == 0) return 0;
  if (k > 0) return k >= seq_len ? 0 : seq_len - k;
  // Compared before negating: -k overflows for INT64_MIN.
  return k <= -seq_len ? seq_len : -k;
}

int64_t KeptLength(const std::variant<int64_t, at::Tensor>& logits_to_keep, int64_t seq_len) {
  if (const auto* positions = std::get_if<at::Tensor>(&logits_to_keep)) {
    return positions->dim() == 2 ? positions->size(1) : 0;
  }
  return seq_len - KeptStart(std::get<int64_t>(logits_to_keep), seq_len);
}

absl::StatusOr<LossOutputSpec> LossOutputs(const LMHeadConfig& config, int64_t batch, int64_t kept,
                                           const ForwardOptions& options) {
  LossOutputSpec spec;
  if (options.loss_reduction == LossReduction::kNone) spec.shape = {batch, kept};
  if (options.z_loss_multiplier.has_value()) {
    spec.z_loss_dtype = options.loss_implementation.value_or(config.loss_implementation) ==
                                LossImplementation::kFusedLinear
                            ? ScalarTypeOf(config.dtype)
                            : at::kFloat;
  }
  const auto* divisor = std::get_if<at::Tensor>(&options.loss_div_factor);
  if (divisor == nullptr) return spec;
  if (!divisor->defined() || !at::isFloatingType(divisor->scalar_type())) {
    return InvalidArgument("loss_div_factor", "a tensor divisor must be floating point");
  }
  // Broadcasting as LibTorch does: trailing dimensions aligned, each equal or 1.
  const std::vector<int64_t> losses = spec.shape;
  const at::IntArrayRef d = divisor->sizes();
  std::vector<int64_t> shape(std::max<size_t>(losses.size(), d.size()));
  for (size_t i = 0; i < shape.size(); ++i) {
    const int64_t a = i < losses.size() ? losses[losses.size() - 1 - i] : 1;
    const int64_t b = i < d.size() ? d[d.size() - 1 - i] : 1;
    if (a != b && a != 1 && b != 1) {
      return InvalidArgument(
          "loss_div_factor",
          absl::StrCat("shape ", ShapeString(d), " does not broadcast against the losses' shape ",
                       ShapeString(losses)));
    }
    shape[shape.size() - 1 - i] = a == 1 ? b : a;
  }
  spec.shape = std::move(shape);
  // Type promotion as the division does it (a 0-dim divisor counts less than a dimensioned loss).
  const auto promoted = [&](c10::ScalarType dtype) {
    return at::result_type(at::empty(losses, at::TensorOptions().dtype(dtype).device(at::kMeta)),
                           at::empty(d, divisor->options().device(at::kMeta)));
  };
  spec.loss_dtype = promoted(spec.loss_dtype);
  spec.ce_loss_dtype = promoted(spec.ce_loss_dtype);
  if (spec.z_loss_dtype.has_value()) spec.z_loss_dtype = promoted(*spec.z_loss_dtype);
  return spec;
}

LMHead::LMHead(const LMHeadConfig& config, int64_t d_model, int64_t vocab_size)
    : config_(config), d_model_(d_model), vocab_size_(vocab_size) {}

LMHead::~LMHead() = default;

c10::Device LMHead::device() const { return weight_.device(); }

absl::StatusOr<std::unique_ptr<LMHead>> LMHead::Build(const LMHeadConfig& config, int64_t d_model,
                                                      int64_t vocab_size, const std::string& device,
                                                      uint64_t seed) {
  if (absl::Status status = config.Validate(); !status.ok()) return status;
  if (d_model <= 0)
    return InvalidArgument("d_model", absl::StrCat("must be positive, got ", d_model));
  if (vocab_size <= 0) {
    return InvalidArgument("vocab_size", absl::StrCat("must be positive, got ", vocab_size));
  }
  absl::StatusOr<c10::Device> parsed =
      CatchTorchErrors([&]() -> absl::StatusOr<c10::Device> { return c10::Device(device); });
  if (!parsed.ok()) {
    return InvalidArgument("device", absl::StrCat("expected cpu, cuda or cuda:N, got '", device,
                                                  "' (", LibraryErrorDetail(parsed.status()), ")"));
  }

  std::unique_ptr<LMHead> head;
  if (config.name == LMHeadType::kNormalized) {
    head.reset(new NormalizedLMHead(config, d_model, vocab_size));
  } else {
    head.reset(new LMHead(config, d_model, vocab_size));
  }
  if (absl::Status status = head->CreateParameters(*parsed); !status.ok()) return status;
  if (absl::Status status = head->ResetParameters(seed); !status.ok()) return status;
  return head;
}

absl::Status LMHead::CreateParameters(const c10::Device& device) {
  if (config_.layer_norm.has_value()) {
    absl::StatusOr<std::unique_ptr<LayerNorm>> norm =
        LayerNorm::Build(*config_.layer_norm, d_model_, device);
    if (!norm.ok()) return norm.status();
    norm_ = *std::move(norm);
    if (norm_->weight().defined()) parameters_.emplace_back("norm.weight", norm_->weight());
    if (norm_->bias().defined()) parameters_.emplace_back("norm.bias", norm_->bias());
  }
  return CatchTorchErrors([&]() -> absl::Status {
    const auto options = at::TensorOptions().dtype(ScalarTypeOf(config_.dtype)).device(device);
    weight_ = at::empty({vocab_size_, d_model_}, options);
    parameters_.emplace_back("w_out.weight", weight_);
    if (config_.EffectiveBias()) {
      bias_ = at::empty({vocab_size_}, options);
      parameters_.emplace_back("w_out.bias", bias_);
    }
    return absl::OkStatus();
  });
}

absl::Status LMHead::ResetParameters(uint64_t seed) {
  return CatchTorchErrors([&]() -> absl::Status {
    if (norm_ != nullptr) norm_->ResetParameters();
    if (weight_.is_meta()) return absl::OkStatus();
    // nn.Linear's default: kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(D), 1/sqrt(D)) for the
    // weight, and the bias uses the same bound. Drawn on the CPU so every device gets the same
    // values for one seed.
    at::Generator generator = at::detail::createCPUGenerator(seed);
    const double bound = 1.0 / std::sqrt(static_cast<double>(d_model_));
    const auto cpu_fp32 = at::TensorOptions().dtype(at::kFloat);
    weight_.copy_(at::empty(weight_.sizes(), cpu_fp32).uniform_(-bound, bound, generator));
    if (bias_.defined()) {
      bias_.copy_(at::empty(bias_.sizes(), cpu_fp32).uniform_(-bound, bound, generator));
    }
    return absl::OkStatus();
  });
}

absl::Status LMHead::NormalizeMatrices() {
  return absl::FailedPreconditionError(
      "normalize_matrices exists only on the normalized head (name='normalized')");
}

int64_t LMHead::NumFlopsPerToken() const {
  int64_t params = 0;
  for (const auto& [name, tensor] : parameters_) params += tensor.numel();
  return 6 * params;
}

absl::Status LMHead::LoadStateDict(const std::map<std::string, at::Tensor>& tensors) {
  // Resolve every given name to one of ours before touching any parameter.
  std::map<std::string, std::pair<std::string, at::Tensor>> resolved;  // ours -> (given, tensor)
  std::set<std::string> ours;
  for (const auto& [name, tensor] : parameters_) ours.insert(name);
  for (const auto& [given, tensor] : tensors) {
    std::string name = given;
    if (auto hf = HuggingFaceNames().find(given); hf != HuggingFaceNames().end()) {
      name = hf->second;
    } else if (absl::string_view(given).substr(0, 8) == "lm_head.") {
      name = given.substr(8);
    }
    if (ours.count(name) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected key '", given, "': this head has ", absl::StrJoin(ours, ", ")));
    }
    auto [it, inserted] = resolved.emplace(name, std::make_pair(given, tensor));
    if (!inserted) {
      return absl::InvalidArgumentError(
          absl::StrCat("keys '", it->second.first, "' and '", given, "' both give '", name, "'"));
    }
  }
  for (const auto& [name, param] : parameters_) {
    auto it = resolved.find(name);
    if (it == resolved.end()) {
      return absl::InvalidArgumentError(absl::StrCat("missing key '", name, "'"));
    }
    const auto& [given, tensor] = it->second;
    if (!tensor.defined() || tensor.sizes() != param.sizes()) {
      return absl::InvalidArgumentError(
          absl::StrCat("key '", given, "': expected shape ", ShapeString(param.sizes()), ", got ",
                       tensor.defined() ? ShapeString(tensor.sizes()) : "an undefined tensor"));
    }
    if (tensor.scalar_type() != param.scalar_type()) {
      return absl::InvalidArgumentError(absl::StrCat("key '", given, "': expected dtype ",
                                                     ScalarTypeName(param.scalar_type()), ", got ",
                                                     ScalarTypeName(tensor.scalar_type())));
    }
  }
  return CatchTorchErrors([&]() -> absl::Status {
    for (auto& [name, param] : parameters_) {
      if (!param.is_meta()) param.copy_(resolved.at(name).second);
    }
    return absl::OkStatus();
  });
}

absl::Status LMHead::ValidateStructure(const at::Tensor& x, const ForwardOptions& options) const {
  // Every input is checked before any compute (docs/SPEC.md §4 and §9.2 say where this is
  // stricter than upstream).
  if (!x.defined() || x.dim() != 3 || x.size(2) != d_model_) {
    return InvalidArgument(
        "x", absl::StrCat("expected shape (batch, seq_len, d_model=", d_model_, "), got ",
                          x.defined() ? ShapeString(x.sizes()) : "an undefined tensor"));
  }
  if (x.scalar_type() != weight_.scalar_type()) {
    return InvalidArgument("x", absl::StrCat("dtype ", ScalarTypeName(x.scalar_type()),
                                             " does not match the head's dtype ",
                                             ScalarTypeName(weight_.scalar_type())));
  }
  if (x.device() != weight_.device()) {
    return InvalidArgument(
        "x", absl::StrCat("is on ", x.device().str(), ", the head on ", weight_.device().str()));
  }
  const int64_t batch = x.size(0);
  const int64_t length = x.size(1);
  if (const auto* positions = std::get_if<at::Tensor>(&options.logits_to_keep)) {
    if (!positions->defined() || positions->dim() != 2 || positions->size(0) != batch ||
        positions->scalar_type() != at::kLong) {
      return InvalidArgument(
          "logits_to_keep",
          absl::StrCat("a positions tensor must be int64 of shape (batch=", batch, ", K), got ",
                       positions->defined() ? absl::StrCat(ScalarTypeName(positions->scalar_type()),
                                                           " ", ShapeString(positions->sizes()))
                                            : "an undefined tensor"));
    }
    if (positions->device() != x.device() && !positions->is_cpu()) {
      return InvalidArgument("logits_to_keep",
                             absl::StrCat("must be on x's device (", x.device().str(),
                                          ") or on the CPU, got ", positions->device().str()));
    }
  }
  const LossImplementation implementation =
      options.loss_implementation.value_or(config_.loss_implementation);
  if (!options.labels.has_value()) {
    // Upstream's rule; the scoring outputs (an extension) are a reason to ask for no logits.
    if (options.return_logits == false && !options.scoring.any()) {
      return InvalidArgument("return_logits",
                             "'return_logits=False' is only valid when 'labels' is provided (or "
                             "a scoring output is asked for)");
    }
  } else {
    const at::Tensor& labels = *options.labels;
    if (!labels.defined() || labels.scalar_type() != at::kLong || labels.dim() != 2 ||
        labels.size(0) != batch || labels.size(1) != length) {
      return InvalidArgument(
          "labels",
          absl::StrCat("expected int64 of shape (batch=", batch, ", seq_len=", length, "), got ",
                       labels.defined() ? absl::StrCat(ScalarTypeName(labels.scalar_type()), " ",
                                                       ShapeString(labels.sizes()))
                                        : "an undefined tensor"));
    }
    if (labels.device() != x.device() && !labels.is_cpu()) {
      return InvalidArgument("labels",
                             absl::StrCat("must be on x's device (", x.device().str(),
                                          ") or on the CPU, got ", labels.device().str()));
    }
    if (config_.name == LMHeadType::kNormalized && implementation != LossImplementation::kDefault) {
      return absl::UnimplementedError(absl::StrCat("loss_implementation: '", Name(implementation),
                                                   "' loss implementation is not supported by "
                                                   "'NormalizedLMHead'"));
    }
    if (implementation == LossImplementation::kFusedLinear && options.return_logits == true) {
      return InvalidArgument(
          "return_logits",
          "'return_logits=True' is not compatible 'fused_linear' loss implementation");
    }
    if (options.loss_reduction == LossReduction::kNone && batch == 0) {
      return InvalidArgument("loss_reduction",
                             "'none' needs a non-empty batch (the loss is reshaped to (B, -1))");
    }
    if (options.logit_tile_bytes < 0) {
      return InvalidArgument("logit_tile_bytes", "must be positive, or 0 for the default");
    }
    if (const auto* divisor = std::get_if<at::Tensor>(&options.loss_div_factor)) {
      if (divisor->defined() && divisor->device() != x.device() &&
          !(divisor->is_cpu() && divisor->dim() == 0)) {
        return InvalidArgument(
            "loss_div_factor",
            absl::StrCat("must be on x's device (", x.device().str(),
                         ") or a 0-dim CPU tensor, got ", divisor->device().str()));
      }
    }
    absl::StatusOr<LossOutputSpec> losses =
        LossOutputs(config_, batch, KeptLength(options.logits_to_keep, length), options);
    if (!losses.ok()) return losses.status();
  }
  const ScoringOptions& scoring = options.scoring;
  if (absl::Status status =
          ValidateScoringShapes(scoring, batch, KeptLength(options.logits_to_keep, length), length,
                                vocab_size_, options.labels.has_value());
      !status.ok()) {
    return status;
  }
  for (const auto& [index, field] : {std::pair<const std::optional<at::Tensor>*, const char*>{
                                         &scoring.candidate_ids, "candidate_ids"},
                                     {&scoring.segment_ids, "segment_ids"}}) {
    if (index->has_value() && (*index)->device() != x.device() && !(*index)->is_cpu()) {
      return InvalidArgument(
          field, absl::StrCat("must be on x's device (", x.device().str(), ") or on the CPU, got ",
                              (*index)->device().str()));
    }
  }
  return absl::OkStatus();
}

absl::Status LMHead::ValidateIndexRanges(const at::Tensor& x, const ForwardOptions& options) const {
  const int64_t length = x.size(1);
  if (const auto* positions = std::get_if<at::Tensor>(&options.logits_to_keep)) {
    absl::Status in_range = CatchTorchErrors([&]() -> absl::Status {
      // The range is computed only for the message.
      if (!positions->lt(0).logical_or(positions->ge(length)).any().item<bool>()) {
        return absl::OkStatus();
      }
      return InvalidArgument("logits_to_keep",
                             absl::StrCat("positions must lie in [0, seq_len=", length,
                                          "), got values in [", positions->min().item<int64_t>(),
                                          ", ", positions->max().item<int64_t>(), "]"));
    });
    if (!in_range.ok()) return in_range;
  }
  // The kept positions of a (B, S) index tensor (only they are scored, so only their values
  // must be valid).
  const auto kept_of = [&options](const at::Tensor& t) {
    std::variant<int64_t, at::Tensor> keep = options.logits_to_keep;
    if (auto* positions = std::get_if<at::Tensor>(&keep)) *positions = positions->to(t.device());
    return SelectPositions(t, keep);
  };
  if (options.labels.has_value()) {
    absl::Status in_range = CatchTorchErrors([&]() -> absl::Status {
      const at::Tensor kept = kept_of(*options.labels);
      const at::Tensor bad =
          kept.ne(options.ignore_index).logical_and(kept.lt(0).logical_or(kept.ge(vocab_size_)));
      // Free on the CPU, one device sync elsewhere.
      if (!bad.any().item<bool>()) return absl::OkStatus();
      const at::Tensor scored = kept.masked_select(kept.ne(options.ignore_index));
      return InvalidArgument(
          "labels",
          absl::StrCat("values must lie in [0, vocab_size=", vocab_size_,
                       ") or equal ignore_index=", options.ignore_index, ", got values in [",
                       scored.min().item<int64_t>(), ", ", scored.max().item<int64_t>(), "]"));
    });
    if (!in_range.ok()) return in_range;
  }
  const ScoringOptions& scoring = options.scoring;
  if (!scoring.candidate_ids.has_value() && !scoring.segment_ids.has_value()) {
    return absl::OkStatus();
  }
  return CatchTorchErrors([&]() -> absl::Status {
    return ValidateScoringValues(
        scoring, scoring.segment_ids.has_value() ? kept_of(*scoring.segment_ids) : at::Tensor(),
        KeptLength(options.logits_to_keep, length), vocab_size_);
  });
}

absl::Status LMHead::ValidateForward(const at::Tensor& x, const ForwardOptions& options) const {
  if (absl::Status status = ValidateStructure(x, options); !status.ok()) return status;
  return ValidateIndexRanges(x, options);
}

namespace {

// A packed item's count of scored positions and G (its continuations): taken on the host where
// its index tensors are there (free), else queued on the device and read once the whole group
// is queued, so that no item waits for the device before the others are queued.
struct ItemCounts {
  std::optional<int64_t> host_scored;
  at::Tensor device_scored;  // () int64, when not counted on the host
  std::optional<int64_t> host_groups;
  at::Tensor device_groups;  // () int64, when not counted on the host

  // `given`: the item's options as it came; `on_device`: with its index tensors on x's device.
  static ItemCounts Take(const ForwardOptions& given, const ForwardOptions& on_device) {
    ItemCounts counts{HostScoredCount(given), {}, HostSegmentCount(given), {}};
    if (!counts.host_scored.has_value()) counts.device_scored = QueueScoredCount(on_device);
    if (!counts.host_groups.has_value()) counts.device_groups = SegmentCount(on_device);
    return counts;
  }
  // Sets the counts taken on the host.
  void SetHostCounts(LMOutput& out) const {
    if (host_scored.has_value()) out.num_scored_tokens = *host_scored;
    if (host_groups.has_value()) KeepSegments(out.scoring, *host_groups);
  }
  // Reads the counts queued on the device into `output`; a failure becomes its status.
  void ReadDeviceCounts(absl::StatusOr<LMOutput>& output) const {
    if (!output.ok()) return;
    absl::Status read = CatchTorchErrors([&]() -> absl::Status {
      if (device_scored.defined()) output->num_scored_tokens = device_scored.item<int64_t>();
      if (device_groups.defined()) KeepSegments(output->scoring, device_groups.item<int64_t>());
      return absl::OkStatus();
    });
    if (!read.ok()) output = std::move(read);
  }
};

// An index range check queued on the device: the number of bad entries, of scored positions
// and of continuations, copied to pinned host memory behind the check's kernels, and the event
// after that copy.
struct QueuedIndexCheck {
  at::Tensor counts;  // (3,) int64, pinned host memory: bad entries, scored positions, G
  c10::Event copied;
};

// Queues the count of out-of-range positions (in [0, seq_len)), kept labels (in [0, vocab_size)
// or ignore_index), candidate ids (in [0, vocab_size)) and kept segment ids (in [-1, kept)) of
// `options`' device tensors, then makes them harmless to compute with: positions, candidates and
// segment ids clamped, bad labels replaced by ignore_index; the count of scored positions (0
// without labels); and G (0 without segment ids). Needs seq_len > 0.
QueuedIndexCheck QueueIndexCheck(int64_t seq_len, int64_t vocab_size, ForwardOptions& options) {
  at::Tensor bad_count;
  const auto count = [&bad_count](const at::Tensor& bad) {
    const at::Tensor n = bad.sum();
    bad_count = bad_count.defined() ? bad_count + n : n;
  };
  if (auto* positions = std::get_if<at::Tensor>(&options.logits_to_keep)) {
    count(positions->lt(0).logical_or(positions->ge(seq_len)));
    *positions = positions->clamp(0, seq_len - 1);
  }
  if (options.labels.has_value()) {
    at::Tensor& labels = *options.labels;
    const auto bad_label = [&](const at::Tensor& t) {
      return t.ne(options.ignore_index).logical_and(t.lt(0).logical_or(t.ge(vocab_size)));
    };
    count(bad_label(SelectPositions(labels, options.logits_to_keep)));
    labels = at::where(bad_label(labels), options.ignore_index, labels);
  }
  if (options.scoring.candidate_ids.has_value()) {
    at::Tensor& candidates = *options.scoring.candidate_ids;
    count(candidates.lt(0).logical_or(candidates.ge(vocab_size)));
    candidates = candidates.clamp(0, vocab_size - 1);
  }
  if (options.scoring.segment_ids.has_value()) {
    at::Tensor& segments = *options.scoring.segment_ids;
    const int64_t kept = KeptLength(options.logits_to_keep, seq_len);
    const at::Tensor kept_segments = SelectPositions(segments, options.logits_to_keep);
    count(kept_segments.lt(-1).logical_or(kept_segments.ge(kept)));
    segments = segments.clamp(-1, kept - 1);
  }
  const at::Tensor scored =
      options.labels.has_value() ? QueueScoredCount(options) : at::zeros_like(bad_count);
  const at::Tensor groups =
      options.scoring.segment_ids.has_value() ? SegmentCount(options) : at::zeros_like(bad_count);
  const at::Tensor counts = at::stack({bad_count, scored, groups});
  const c10::Device device = counts.device();
  QueuedIndexCheck check{at::empty({3}, counts.options().device(at::kCPU).pinned_memory(true)),
                         c10::Event(device.type())};
  check.counts.copy_(counts, /*non_blocking=*/true);
  check.copied.record(c10::impl::VirtualGuardImpl(device.type()).getStream(device));
  return check;
}

}  // namespace

absl::StatusOr<LMOutput> LMHead::Forward(const at::Tensor& x, const ForwardOptions& options) const {
  if (absl::Status status = ValidateStructure(x, options); !status.ok()) return status;
  const bool queue_index_check = x.size(1) > 0 && IndexTensorsOnDevice(options);
  if (!queue_index_check) {
    if (absl::Status status = ValidateIndexRanges(x, options); !status.ok()) return status;
  }
  if (options.interrupt_check) {
    if (absl::Status status = options.interrupt_check(); !status.ok()) return status;
  }
  return ForwardValidated(x, options, queue_index_check);
}

absl::StatusOr<LMOutput> LMHead::ForwardValidated(const at::Tensor& x,
                                                  const ForwardOptions& options,
                                                  bool queue_index_check) const {
  return CatchTorchErrors([&]() -> absl::StatusOr<LMOutput> {
    c10::InferenceMode inference;
    const std::optional<int64_t> host_scored = HostScoredCount(options);
    const std::optional<int64_t> host_groups = HostSegmentCount(options);
    // Index tensors join x on its device without a synchronisation.
    ForwardOptions on_x_device = IndexTensorsOn(options, x.device());
    if (!queue_index_check) {
      at::Tensor scored;
      at::Tensor groups;
      if (!host_scored.has_value()) scored = QueueScoredCount(on_x_device);
      if (!host_groups.has_value()) groups = SegmentCount(on_x_device);
      LMOutput output = ComputeForwardOrThrow(x, on_x_device);
      output.num_scored_tokens = host_scored.has_value() ? *host_scored : scored.item<int64_t>();
      KeepSegments(output.scoring, host_groups.has_value() ? *host_groups : groups.item<int64_t>());
      return output;
    }
    const QueuedIndexCheck check = QueueIndexCheck(x.size(1), vocab_size_, on_x_device);
    LMOutput output = ComputeForwardOrThrow(x, on_x_device);
    check.copied.synchronize();  // waits for the check, queued ahead of the forward
    const int64_t* counts = check.counts.data_ptr<int64_t>();
    if (counts[0] == 0) {
      output.num_scored_tokens = host_scored.value_or(counts[1]);
      KeepSegments(output.scoring, host_groups.value_or(counts[2]));
      return output;
    }
    absl::Status status = ValidateIndexRanges(x, options);  // the message; synchronises
    if (status.ok()) status = absl::InternalError("index check: counted bad entries, found none");
    return status;
  });
}

bool LMHead::UsesFusedLinear(const ForwardOptions& options) const {
  return options.labels.has_value() &&
         options.loss_implementation.value_or(config_.loss_implementation) ==
             LossImplementation::kFusedLinear;
}

at::Tensor LMHead::Logits(const at::Tensor& h) const {
  return at::linear(h, weight_, bias_.defined() ? std::optional<at::Tensor>(bias_) : std::nullopt);
}

LMOutput LMHead::ComputeForwardOrThrow(const at::Tensor& x, const ForwardOptions& options) const {
  const at::Tensor h =
      SelectPositions(norm_ != nullptr ? norm_->Forward(x) : x, options.logits_to_keep);
  if (!UsesFusedLinear(options)) return DefaultOutput(Logits(h), options);
  const auto between_tiles = [&options]() {
    if (!options.interrupt_check) return;
    if (absl::Status status = options.interrupt_check(); !status.ok()) throw StatusError(status);
  };
  const at::Tensor rows = h.contiguous().view({-1, d_model_});
  const at::Tensor labels = KeptLabels(options);
  const int64_t tile_bytes = LogitTileBytes(options.logit_tile_bytes, x.device());
  if (!options.scoring.any()) {
    const LossTerms terms = FusedLinearLoss(rows, weight_, bias_, labels, options.ignore_index,
                                            options.loss_reduction, options.z_loss_multiplier,
                                            tile_bytes, between_tiles, options.return_argmax);
    return FusedOutput(terms, h.size(0), h.size(1), options);
  }
  // One pass for the loss's statistics and the scoring outputs (docs/notes/scoring.md).
  const ScoringOptions scoring = KeptScoring(options, h.size(0), h.size(1));
  const FusedScores fused =
      ScoreHiddenStates(rows, weight_, bias_, labels, options.ignore_index, scoring,
                        options.return_argmax, tile_bytes, between_tiles);
  const LossTerms terms =
      FinishFusedLinearLoss(fused.stats, labels, options.ignore_index, options.loss_reduction,
                            options.z_loss_multiplier, h.scalar_type(), options.return_argmax);
  LMOutput out = FusedOutput(terms, h.size(0), h.size(1), options);
  out.scoring = AssembleScoringOutputs(fused.scores, h.size(0), h.size(1), labels,
                                       options.ignore_index, scoring, /*groups=*/h.size(1));
  return out;
}

std::vector<absl::StatusOr<LMOutput>> LMHead::ForwardBatch(
    const std::vector<ForwardItem>& items) const {
  std::vector<absl::StatusOr<LMOutput>> results(
      items.size(), absl::InternalError("ForwardBatch: item not computed"));
  // The valid items by path: fused_linear without and with scoring outputs (one pass each), and
  // the logits path.
  std::vector<size_t> fused_linear;
  std::vector<size_t> logits;
  std::vector<size_t> scoring;
  for (size_t i = 0; i < items.size(); ++i) {
    const ForwardItem& item = items[i];
    absl::Status status = item.validated ? absl::OkStatus() : ValidateForward(item.x, item.options);
    if (status.ok() && item.options.interrupt_check) status = item.options.interrupt_check();
    if (!status.ok()) {
      results[i] = std::move(status);
      continue;
    }
    if (!UsesFusedLinear(item.options)) {
      logits.push_back(i);
    } else {
      (item.options.scoring.any() ? scoring : fused_linear).push_back(i);
    }
  }
  if (scoring.size() == 1) {
    const ForwardItem& item = items[scoring.front()];
    results[scoring.front()] = ForwardValidated(item.x, item.options, /*queue_index_check=*/false);
  } else if (scoring.size() > 1) {
    ForwardPackedScoring(items, scoring, results);
  }
  for (const bool fused : {true, false}) {
    const std::vector<size_t>& group = fused ? fused_linear : logits;
    if (group.size() == 1) {
      const ForwardItem& item = items[group.front()];
      results[group.front()] = ForwardValidated(item.x, item.options, /*queue_index_check=*/false);
    } else if (group.size() > 1) {
      ForwardPacked(items, group, fused, results);
    }
  }
  return results;
}

void LMHead::ForwardPackedScoring(const std::vector<ForwardItem>& items,
                                  const std::vector<size_t>& group,
                                  std::vector<absl::StatusOr<LMOutput>>& results) const {
  c10::InferenceMode inference;
  // One valid item of the group, its index tensors on x's device.
  struct Member {
    size_t index;
    ForwardOptions options;
    ScoringOptions scoring;  // over its kept positions (KeptScoring)
    at::Tensor labels;       // its kept labels (B * S',) int64
    int64_t batch = 0;
    int64_t kept = 0;
    int64_t row = 0;  // first row in the packed tokens
    ItemCounts counts;
  };
  std::vector<Member> members;
  std::vector<at::Tensor> kept_x;
  int64_t rows = 0;
  for (const size_t i : group) {
    const ForwardItem& item = items[i];
    absl::Status prepared = CatchTorchErrors([&]() -> absl::Status {
      Member member{i, IndexTensorsOn(item.options, item.x.device())};
      member.counts = ItemCounts::Take(item.options, member.options);
      const at::Tensor x = SelectPositions(item.x, member.options.logits_to_keep);
      member.batch = x.size(0);
      member.kept = x.size(1);
      member.row = rows;
      member.labels = KeptLabels(member.options);
      member.scoring = KeptScoring(member.options, member.batch, member.kept);
      kept_x.push_back(x.reshape({-1, d_model_}));
      rows += member.batch * member.kept;
      members.push_back(std::move(member));
      return absl::OkStatus();
    });
    if (!prepared.ok()) {
      results[i] = std::move(prepared);
      kept_x.resize(members.size());
    }
  }
  if (members.empty()) return;

  // One scoring pass over every kept token of the group, asking what any member asks: the
  // largest k, every member's candidates padded to the largest C (id 0), and the labels with
  // each member's ignored positions marked -1 (never a valid id), the pass's ignore_index.
  FusedScores fused;
  absl::Status computed = CatchTorchErrors([&]() -> absl::Status {
    at::Tensor h = at::cat(kept_x);
    if (norm_ != nullptr) h = norm_->Forward(h);
    ScoringOptions all;
    int64_t candidates = 0;
    bool with_argmax = false;
    bool same_tile_bytes = true;
    std::vector<at::Tensor> labels;
    for (const Member& member : members) {
      const ScoringOptions& own = member.scoring;
      all.label_logprobs = all.label_logprobs || own.label_logprobs;
      all.entropy = all.entropy || own.entropy;
      all.label_rank = all.label_rank || own.label_rank;
      all.top_k = std::max(all.top_k, own.top_k);
      if (own.segment_ids.has_value()) all.segment_ids = own.segment_ids;  // only its presence
      if (own.candidate_ids.has_value()) {
        candidates = std::max(candidates, own.candidate_ids->size(-1));
      }
      with_argmax = with_argmax || member.options.return_argmax;
      same_tile_bytes = same_tile_bytes &&
                        member.options.logit_tile_bytes == members.front().options.logit_tile_bytes;
      labels.push_back(
          member.labels.masked_fill(member.labels.eq(member.options.ignore_index), -1));
    }
    if (candidates > 0) {
      std::vector<at::Tensor> per_row;
      for (const Member& member : members) {
        const int64_t n = member.batch * member.kept;
        at::Tensor ids = at::zeros({n, candidates}, h.options().dtype(at::kLong));
        if (member.scoring.candidate_ids.has_value()) {
          const at::Tensor& own = *member.scoring.candidate_ids;
          ids.narrow(1, 0, own.size(-1)).copy_(own.dim() == 1 ? own.expand({n, own.size(0)}) : own);
        }
        per_row.push_back(ids);
      }
      all.candidate_ids = at::cat(per_row);
    }
    const int64_t tile_bytes =
        LogitTileBytes(same_tile_bytes ? members.front().options.logit_tile_bytes : 0, h.device());
    fused = ScoreHiddenStates(h.contiguous(), weight_, bias_, at::cat(labels), /*ignore_index=*/-1,
                              all, with_argmax, tile_bytes);
    return absl::OkStatus();
  });

  // Each member finalised on its own rows, as ComputeForwardOrThrow finalises one forward.
  for (const Member& member : members) {
    const int64_t n = member.batch * member.kept;
    results[member.index] = CatchTorchErrors([&]() -> absl::StatusOr<LMOutput> {
      if (!computed.ok()) return computed;
      const auto rows_of = [&](const at::Tensor& t) {
        return t.defined() ? t.narrow(0, member.row, n) : t;
      };
      LogitStats stats{rows_of(fused.stats.lse), rows_of(fused.stats.label_logit),
                       rows_of(fused.stats.argmax)};
      const ForwardOptions& options = member.options;
      const LossTerms terms = FinishFusedLinearLoss(
          stats, member.labels, options.ignore_index, options.loss_reduction,
          options.z_loss_multiplier, weight_.scalar_type(), options.return_argmax);
      LMOutput out = FusedOutput(terms, member.batch, member.kept, options);
      PositionScores scores;
      const PositionScores& packed = fused.scores;
      scores.label_logprobs = rows_of(packed.label_logprobs);
      scores.entropy = rows_of(packed.entropy);
      scores.label_rank = rows_of(packed.label_rank);
      scores.argmax = rows_of(packed.argmax);
      if (member.scoring.top_k > 0) {
        scores.top_k_ids = rows_of(packed.top_k_ids).narrow(1, 0, member.scoring.top_k);
        scores.top_k_logprobs = rows_of(packed.top_k_logprobs).narrow(1, 0, member.scoring.top_k);
      }
      if (member.scoring.candidate_ids.has_value()) {
        scores.candidate_logprobs =
            rows_of(packed.candidate_logprobs).narrow(1, 0, member.scoring.candidate_ids->size(-1));
      }
      out.scoring = AssembleScoringOutputs(scores, member.batch, member.kept, member.labels,
                                           options.ignore_index, member.scoring,
                                           /*groups=*/member.kept);
      member.counts.SetHostCounts(out);
      return out;
    });
  }
  // Counts on the device are read once the whole group is queued.
  for (const Member& member : members) member.counts.ReadDeviceCounts(results[member.index]);
}

void LMHead::ForwardPacked(const std::vector<ForwardItem>& items, const std::vector<size_t>& group,
                           bool fused_linear,
                           std::vector<absl::StatusOr<LMOutput>>& results) const {
  c10::InferenceMode inference;
  // One valid item of the group.
  struct Member {
    size_t index;            // into items
    ForwardOptions options;  // positions on x's device; labels too on the logits path
    int64_t batch = 0;
    int64_t kept = 0;  // S'
    int64_t row = 0;   // first row in the packed tokens
    // fused_linear: the kept labels (B * S',) int64 on the host.
    at::Tensor host_labels;
    // Logits path: the counts (the fused_linear path counts its labels on the host).
    ItemCounts counts;
  };
  std::vector<Member> members;
  std::vector<at::Tensor> kept_x;  // (B * S', D) each
  int64_t rows = 0;
  for (const size_t i : group) {
    const ForwardItem& item = items[i];
    absl::Status prepared = CatchTorchErrors([&]() -> absl::Status {
      Member member{i, item.options};
      if (fused_linear) {
        // The group's labels reach the device in one copy (PackedFusedLinearLoss), from here.
        ForwardOptions on_host = item.options;
        on_host.labels = on_host.labels->cpu();
        if (auto* positions = std::get_if<at::Tensor>(&on_host.logits_to_keep)) {
          *positions = positions->cpu();
        }
        member.host_labels = KeptLabels(on_host);
        if (auto* positions = std::get_if<at::Tensor>(&member.options.logits_to_keep)) {
          *positions = CopyToDevice(*positions, item.x.device());
        }
      } else {
        member.options = IndexTensorsOn(item.options, item.x.device());
        member.counts = ItemCounts::Take(item.options, member.options);
      }
      const at::Tensor x = SelectPositions(item.x, member.options.logits_to_keep);
      member.batch = x.size(0);
      member.kept = x.size(1);
      member.row = rows;
      kept_x.push_back(x.reshape({-1, d_model_}));
      rows += member.batch * member.kept;
      members.push_back(std::move(member));
      return absl::OkStatus();
    });
    if (!prepared.ok()) {
      results[i] = std::move(prepared);
      kept_x.resize(members.size());  // a partly prepared item leaves nothing behind
    }
  }
  if (members.empty()) return;

  // The packed compute: one GEMM (or one pass of statistics, and the loss terms of every item)
  // for every kept token of the group. The norm acts per token, so it runs once on the packed
  // rows.
  at::Tensor packed_logits;
  std::vector<PackedLoss> losses;
  absl::Status computed = CatchTorchErrors([&]() -> absl::Status {
    at::Tensor h = at::cat(kept_x);
    if (norm_ != nullptr) h = norm_->Forward(h);
    if (!fused_linear) {
      packed_logits = Logits(h);
      return absl::OkStatus();
    }
    bool with_argmax = false;
    bool same_tile_bytes = true;
    std::vector<PackedLossRequest> requests;
    for (const Member& member : members) {
      const ForwardOptions& options = member.options;
      with_argmax = with_argmax || options.return_argmax;
      same_tile_bytes =
          same_tile_bytes && options.logit_tile_bytes == members.front().options.logit_tile_bytes;
      requests.push_back({member.host_labels, options.ignore_index, options.loss_reduction,
                          options.z_loss_multiplier, options.return_argmax});
    }
    const int64_t tile_bytes =
        LogitTileBytes(same_tile_bytes ? members.front().options.logit_tile_bytes : 0, h.device());
    losses = PackedFusedLinearLoss(h, weight_, bias_, requests, tile_bytes, with_argmax);
    return absl::OkStatus();
  });

  // Each item finalised on its own rows (views, no kernels, unless a loss_div_factor is set).
  for (size_t m = 0; m < members.size(); ++m) {
    const Member& member = members[m];
    const int64_t n = member.batch * member.kept;
    results[member.index] = CatchTorchErrors([&]() -> absl::StatusOr<LMOutput> {
      if (!computed.ok()) return computed;
      if (fused_linear) {
        LMOutput out = FusedOutput(losses[m].terms, member.batch, member.kept, member.options);
        out.num_scored_tokens = losses[m].scored;
        return out;
      }
      LMOutput out = DefaultOutput(
          packed_logits.narrow(0, member.row, n).view({member.batch, member.kept, vocab_size_}),
          member.options);
      member.counts.SetHostCounts(out);
      return out;
    });
  }
  // Counts on the device are read once the whole group is queued.
  for (const Member& member : members) member.counts.ReadDeviceCounts(results[member.index]);
}

absl::Status NormalizedLMHead::CreateParameters(const c10::Device& device) {
  absl::Status status = LMHead::CreateParameters(device);
  if (!status.ok()) return status;
  return CatchTorchErrors([&]() -> absl::Status {
    sz_ = at::empty({vocab_size_}, weight_.options());
    parameters_.emplace_back("sz", sz_);
    return absl::OkStatus();
  });
}

absl::Status NormalizedLMHead::ResetParameters(uint64_t seed) {
  absl::Status status = LMHead::ResetParameters(seed);
  if (!status.ok() || sz_.is_meta()) return status;
  return CatchTorchErrors([&]() -> absl::Status {
    // sz <- 1, then sz <- sz * (1/sqrt(D)) in place, as upstream.
    sz_.fill_(1.0);
    sz_.mul_(1.0 / std::sqrt(static_cast<double>(d_model_)));
    return absl::OkStatus();
  });
}

absl::Status NormalizedLMHead::NormalizeMatrices() {
  return CatchTorchErrors([&]() -> absl::Status {
    // l2_normalize over each vocab row: the norm in fp32, cast back, divide in W's dtype.
    weight_.copy_(
        weight_ /
        at::linalg_vector_norm(weight_, 2, {-1}, /*keepdim=*/true, at::kFloat).type_as(weight_));
    return absl::OkStatus();
  });
}

at::Tensor NormalizedLMHead::Logits(const at::Tensor& h) const {
  // sz * (sz_init_value / sz_init_scaling), the factor computed in double as upstream.
  const double factor = 1.0 / (1.0 / std::sqrt(static_cast<double>(d_model_)));
  const at::Tensor scale = sz_ * factor;
  return scale * at::linear(h, weight_);
}

}  // namespace lmhead

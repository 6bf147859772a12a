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
#include "core/layer_norm.h"
#include "core/losses.h"
#include "core/torch_errors.h"

namespace lmhead {
namespace {

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string DTypeString(c10::ScalarType type) { return std::string(c10::toString(type)); }

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

// h[:, -k:, :] with Python slice semantics, or a per-row gather along dim 1 (spec §2.1 step 3).
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

// _finalize_loss without tensor or context parallelism (spec §2.5).
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
                            ? ToScalarType(config.dtype)
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
    const auto options = at::TensorOptions().dtype(ToScalarType(config_.dtype)).device(device);
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
                                                     DTypeString(param.scalar_type()), ", got ",
                                                     DTypeString(tensor.scalar_type())));
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
  // Every input is checked before any compute (docs/SEMANTICS.md lists where this is stricter
  // than upstream).
  if (!x.defined() || x.dim() != 3 || x.size(2) != d_model_) {
    return InvalidArgument(
        "x", absl::StrCat("expected shape (batch, seq_len, d_model=", d_model_, "), got ",
                          x.defined() ? ShapeString(x.sizes()) : "an undefined tensor"));
  }
  if (x.scalar_type() != weight_.scalar_type()) {
    return InvalidArgument(
        "x", absl::StrCat("dtype ", DTypeString(x.scalar_type()),
                          " does not match the head's dtype ", DTypeString(weight_.scalar_type())));
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
                       positions->defined() ? absl::StrCat(DTypeString(positions->scalar_type()),
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
    if (options.return_logits == false) {
      return InvalidArgument("return_logits",
                             "'return_logits=False' is only valid when 'labels' is provided");
    }
  } else {
    const at::Tensor& labels = *options.labels;
    if (!labels.defined() || labels.scalar_type() != at::kLong || labels.dim() != 2 ||
        labels.size(0) != batch || labels.size(1) != length) {
      return InvalidArgument(
          "labels",
          absl::StrCat("expected int64 of shape (batch=", batch, ", seq_len=", length, "), got ",
                       labels.defined() ? absl::StrCat(DTypeString(labels.scalar_type()), " ",
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
    if (options.fused_chunk_bytes < 0) {
      return InvalidArgument("fused_chunk_bytes", "must be positive, or 0 for the default");
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
  if (options.labels.has_value()) {
    const at::Tensor& labels = *options.labels;
    // Only the kept positions are scored, so only their labels must be valid class ids.
    return CatchTorchErrors([&]() -> absl::Status {
      std::variant<int64_t, at::Tensor> keep = options.logits_to_keep;
      if (auto* positions = std::get_if<at::Tensor>(&keep))
        *positions = positions->to(labels.device());
      const at::Tensor kept = SelectPositions(labels, keep);
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
  }
  return absl::OkStatus();
}

absl::Status LMHead::ValidateForward(const at::Tensor& x, const ForwardOptions& options) const {
  if (absl::Status status = ValidateStructure(x, options); !status.ok()) return status;
  return ValidateIndexRanges(x, options);
}

namespace {

// An index range check queued on the device: the number of bad entries, copied to pinned host
// memory behind the check's kernels, and the event after that copy.
struct QueuedIndexCheck {
  at::Tensor bad_count;  // () int64, pinned host memory
  c10::Event copied;
};

// Queues the count of out-of-range positions (in [0, seq_len)) and kept labels (in
// [0, vocab_size) or ignore_index) of `options`' device tensors, then makes them harmless to
// compute with: positions clamped, bad labels replaced by ignore_index. Needs seq_len > 0.
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
  const c10::Device device = bad_count.device();
  QueuedIndexCheck check{at::empty({}, bad_count.options().device(at::kCPU).pinned_memory(true)),
                         c10::Event(device.type())};
  check.bad_count.copy_(bad_count, /*non_blocking=*/true);
  check.copied.record(c10::impl::VirtualGuardImpl(device.type()).getStream(device));
  return check;
}

}  // namespace

absl::StatusOr<LMOutput> LMHead::Forward(const at::Tensor& x, const ForwardOptions& options) const {
  if (absl::Status status = ValidateStructure(x, options); !status.ok()) return status;
  const auto on_device = [](const at::Tensor& t) { return !t.is_cpu(); };
  const auto* positions = std::get_if<at::Tensor>(&options.logits_to_keep);
  const bool queue_index_check =
      x.size(1) > 0 && ((options.labels.has_value() && on_device(*options.labels)) ||
                        (positions != nullptr && on_device(*positions)));
  if (!queue_index_check) {
    if (absl::Status status = ValidateIndexRanges(x, options); !status.ok()) return status;
  }
  if (options.interrupt_check) {
    if (absl::Status status = options.interrupt_check(); !status.ok()) return status;
  }
  return CatchTorchErrors([&]() -> absl::StatusOr<LMOutput> {
    c10::InferenceMode inference;
    // Index tensors join x on its device without a synchronisation.
    ForwardOptions on_x_device = options;
    if (on_x_device.labels.has_value()) {
      on_x_device.labels = CopyToDevice(*on_x_device.labels, x.device());
    }
    if (auto* kept = std::get_if<at::Tensor>(&on_x_device.logits_to_keep)) {
      *kept = CopyToDevice(*kept, x.device());
    }
    if (!queue_index_check) return ForwardChecked(x, on_x_device);
    const QueuedIndexCheck check = QueueIndexCheck(x.size(1), vocab_size_, on_x_device);
    LMOutput output = ForwardChecked(x, on_x_device);
    check.copied.synchronize();  // waits for the check, queued ahead of the forward
    if (check.bad_count.item<int64_t>() == 0) return output;
    absl::Status status = ValidateIndexRanges(x, options);  // the message; synchronises
    if (status.ok()) status = absl::InternalError("index check: counted bad entries, found none");
    return status;
  });
}

LMOutput LMHead::ForwardChecked(const at::Tensor& x, const ForwardOptions& options) const {
  const int64_t batch = x.size(0);
  const at::Tensor h =
      SelectPositions(norm_ != nullptr ? norm_->Forward(x) : x, options.logits_to_keep);
  const std::optional<at::Tensor> bias =
      bias_.defined() ? std::optional<at::Tensor>(bias_) : std::nullopt;
  if (!options.labels.has_value()) {
    LMOutput out{at::linear(h, weight_, bias)};
    if (options.return_argmax) out.argmax = out.logits->argmax(-1);
    return out;
  }

  const at::Tensor labels =
      SelectPositions(*options.labels, options.logits_to_keep).contiguous().view(-1);
  std::optional<at::Tensor> logits;
  std::optional<at::Tensor> argmax;
  LossTerms terms;
  if (options.loss_implementation.value_or(config_.loss_implementation) ==
      LossImplementation::kDefault) {
    logits = at::linear(h, weight_, bias);
    terms = DefaultLoss(logits->view({-1, vocab_size_}), labels, options.ignore_index,
                        options.loss_reduction, options.z_loss_multiplier);
    if (options.return_argmax) argmax = logits->argmax(-1);
  } else {
    const auto between_chunks = [&options]() {
      if (!options.interrupt_check) return;
      if (absl::Status status = options.interrupt_check(); !status.ok()) throw StatusError(status);
    };
    terms = FusedLinearLoss(h.contiguous().view({-1, d_model_}), weight_, bias_, labels,
                            options.ignore_index, options.loss_reduction, options.z_loss_multiplier,
                            options.fused_chunk_bytes > 0 ? options.fused_chunk_bytes
                                                          : DefaultFusedChunkBytes(x.device()),
                            between_chunks, options.return_argmax);
    if (options.return_argmax) argmax = terms.argmax->view({h.size(0), h.size(1)});
  }
  LMOutput out = MakeOutput(std::move(logits), terms, batch, options);
  out.argmax = std::move(argmax);
  return out;
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

LMOutput NormalizedLMHead::ForwardChecked(const at::Tensor& x,
                                          const ForwardOptions& options) const {
  const int64_t batch = x.size(0);
  const at::Tensor h = SelectPositions(x, options.logits_to_keep);
  // sz * (sz_init_value / sz_init_scaling), the factor computed in double as upstream.
  const double factor = 1.0 / (1.0 / std::sqrt(static_cast<double>(d_model_)));
  const at::Tensor scale = sz_ * factor;
  const at::Tensor logits = scale * at::linear(h, weight_);
  std::optional<at::Tensor> argmax;
  if (options.return_argmax) argmax = logits.argmax(-1);
  if (!options.labels.has_value()) return {logits, {}, {}, {}, argmax};

  const at::Tensor labels =
      SelectPositions(*options.labels, options.logits_to_keep).contiguous().view(-1);
  LossTerms terms = DefaultLoss(logits.view({-1, vocab_size_}), labels, options.ignore_index,
                                options.loss_reduction, options.z_loss_multiplier);
  LMOutput out = MakeOutput(std::move(logits), terms, batch, options);
  out.argmax = std::move(argmax);
  return out;
}

}  // namespace lmhead

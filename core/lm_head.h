// LMHead and NormalizedLMHead: OLMo-core's language-model heads (olmo_core.nn.lm_head) on
// LibTorch, for one device, forward only. Behaviour, and where we deliberately differ from
// upstream: docs/SPEC.md.
#ifndef LMHEAD_CORE_LM_HEAD_H_
#define LMHEAD_CORE_LM_HEAD_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/config.h"
#include "core/scoring.h"

namespace lmhead {

// The keyword arguments of LMHead.forward, plus two service extensions at the end.
struct ForwardOptions {
  // (B, S) int64 target token ids; unset: return logits only.
  // Index tensors (labels, logits_to_keep positions, scoring's candidate_ids and segment_ids) may
  // be on x's device or on the CPU. On the CPU their range check is free and they are copied to
  // x's device without waiting for it; on a CUDA device the check is queued ahead of the forward
  // and read once the forward is queued (see LMHead::Forward).
  std::optional<at::Tensor> labels;
  int64_t ignore_index = -100;
  LossReduction loss_reduction = LossReduction::kMean;
  // Unset turns z-loss off (default implementation). 0.0 acts as 1e-4, as upstream.
  std::optional<double> z_loss_multiplier;
  // Divides loss, ce_loss and z_loss: nothing, a number, or a tensor that broadcasts.
  std::variant<std::monostate, double, at::Tensor> loss_div_factor;
  // Unset: logits are returned when the implementation has them.
  std::optional<bool> return_logits;
  // An int k (0 keeps all, k > 0 the last k positions, k < 0 drops the first |k|, Python slice
  // semantics) or a (B, K) int64 tensor of positions in [0, S) gathered per row.
  std::variant<int64_t, at::Tensor> logits_to_keep = int64_t{0};

  // Extension: overrides the head's configured loss implementation for this call.
  std::optional<LossImplementation> loss_implementation;
  // Extension: the most bytes of transient logits `fused_linear` keeps at once (one tile of
  // tokens x vocabulary columns, counting the logits in the input dtype and any working copies
  // the device's epilogue needs). 0 picks the device's default: 128 MiB on the CPU, 224 MiB on
  // CUDA (larger GEMMs; the whole forward then stays under 256 MB of extra device memory).
  int64_t logit_tile_bytes = 0;
  // Extension: also return LMOutput::argmax, each scored position's most likely token id. With
  // fused_linear it is found in the same pass as the loss, without logits.
  bool return_argmax = false;
  // Extension: scoring outputs for evaluation workers, returned in LMOutput::scoring (shapes,
  // dtypes and meaning: core/scoring.h); none by default. Entropy, top_k and candidate_ids work
  // without labels; the others need them. segment_ids are (B, S) like labels and sliced by
  // logits_to_keep as labels are; candidate_ids are (C,) or (B, S', C) over the kept positions.
  // `default` computes them from the logits (return_logits=False drops the logits after);
  // `fused_linear` in its pass over vocabulary tiles, without logits (core/fused_scoring.h).
  ScoringOptions scoring;
  // Extension: polled before the compute starts and between fused_linear tiles; the first
  // non-OK status it returns stops the forward, and Forward returns that status (the server
  // passes deadline and cancellation checks). Unset: never stops.
  std::function<absl::Status()> interrupt_check;
};

// What forward returns: logits alone when no labels were given, else LMOutputWithLoss
// (logits?, loss, ce_loss, z_loss?) with upstream's shapes and dtypes (docs/SPEC.md §3).
struct LMOutput {
  std::optional<at::Tensor> logits;
  std::optional<at::Tensor> loss;
  std::optional<at::Tensor> ce_loss;
  std::optional<at::Tensor> z_loss;
  // Extension, with ForwardOptions::return_argmax: (B, S') int64, logits.argmax(-1) (the first
  // id among equal logits), for every kept position (ignored labels too).
  std::optional<at::Tensor> argmax;
  // The number of scored positions: kept positions whose label is not ignore_index (0 without
  // labels). Counted on the host, free, when the labels (and a positions tensor) are there; else
  // on x's device, read after the forward is queued.
  int64_t num_scored_tokens = 0;
  // Extension: what ForwardOptions::scoring asks for (nothing when it asks for nothing).
  ScoringOutputs scoring;

  bool has_loss() const { return loss.has_value(); }
};

// One request of a packed forward (LMHead::ForwardBatch): Forward's two arguments.
struct ForwardItem {
  at::Tensor x;  // (B, S, d_model), as for Forward
  ForwardOptions options;
  // The caller has had ValidateForward pass, on a head of this configuration, for these options
  // and an x of this shape and dtype: ForwardBatch then does not check them again (the server
  // checks each request once, before it queues it). Default false.
  bool validated = false;
};

// A parameter name in OLMo-core's state-dict spelling ("w_out.weight") and its tensor.
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// The positions [start, seq_len) that an integer logits_to_keep k keeps, with Python slice
// semantics (x[:, -k:]): 0 keeps all, k > 0 the last min(k, seq_len), k < 0 drops the first
// min(|k|, seq_len). Defined for every int64 k (INT64_MIN included).
int64_t KeptStart(int64_t logits_to_keep, int64_t seq_len);

// The number of positions per row that `logits_to_keep` keeps of `seq_len`: K for a (B, K)
// positions tensor, seq_len - KeptStart(k, seq_len) for an integer k.
int64_t KeptLength(const std::variant<int64_t, at::Tensor>& logits_to_keep, int64_t seq_len);

// The shape and dtype of the loss outputs Forward returns (docs/SPEC.md §3).
struct LossOutputSpec {
  // (batch, kept) for "none", () for "mean" and "sum"; broadcast with the shape of a tensor
  // loss_div_factor, as the division does.
  std::vector<int64_t> shape;
  c10::ScalarType loss_dtype = c10::ScalarType::Float;
  c10::ScalarType ce_loss_dtype = c10::ScalarType::Float;
  // Present iff a z-loss multiplier is given: fp32 (default), the head's dtype (fused_linear),
  // promoted with a tensor divisor's dtype.
  std::optional<c10::ScalarType> z_loss_dtype;
};

// What LMHead::Forward returns as loss, ce_loss and z_loss for a head configured as `config`,
// `batch` rows of `kept` kept positions and `options`, from shapes alone: reads options'
// loss_reduction, z_loss_multiplier, loss_implementation and loss_div_factor (a tensor divisor
// only for its shape and dtype, so a meta tensor will do). INVALID_ARGUMENT "loss_div_factor: ..."
// when a tensor divisor is not floating point or does not broadcast against the losses.
absl::StatusOr<LossOutputSpec> LossOutputs(const LMHeadConfig& config, int64_t batch, int64_t kept,
                                           const ForwardOptions& options);

class LayerNorm;

// LMHead (an optional layer norm, then w_out) built from an LMHeadConfig. Immutable after
// building and loading: Forward is const and safe to call from many threads at once. Owns its
// parameters. Errors are returned as Status, never thrown.
class LMHead {
 public:
  // LMHeadConfig.build(d_model, vocab_size, init_device): validates the config, then creates
  // the head of the config's type on `device` ("cpu", "cuda:0", "meta") with PyTorch's default
  // initialisation drawn from a generator seeded with `seed`.
  static absl::StatusOr<std::unique_ptr<LMHead>> Build(const LMHeadConfig& config, int64_t d_model,
                                                       int64_t vocab_size,
                                                       const std::string& device = "cpu",
                                                       uint64_t seed = 0);
  virtual ~LMHead();
  LMHead(const LMHead&) = delete;
  LMHead& operator=(const LMHead&) = delete;

  // LMHead.forward(x, **options) on x of shape (B, S, d_model) in the head's dtype. Invalid
  // inputs are INVALID_ARGUMENT naming the argument. On CUDA no host synchronisation stalls the
  // device: index tensors on the host are range-checked there before any work is queued; on the
  // device their check is queued first (out-of-range entries are made harmless for the kernels)
  // and its result read after the whole forward is queued: the host then waits for the work
  // queued before the check and for the check, never for the forward. The number of
  // continuations G (the segment sums' width) is read on the host, or with that result (the sums
  // are made S' wide, then narrowed). Reading the outputs waits for the device.
  absl::StatusOr<LMOutput> Forward(const at::Tensor& x, const ForwardOptions& options) const;
  // Forward's checks alone, made at once: the status Forward would return for invalid inputs.
  // Index tensors on a CUDA device cost a synchronisation here.
  absl::Status ValidateForward(const at::Tensor& x, const ForwardOptions& options) const;

  // Dynamic batching: result i is what Forward(items[i].x, items[i].options) returns, up to
  // float rounding (GEMM tiling and the summation order of reductions; never the batch's
  // composition beyond that; in bf16 an argmax may then pick another of logits tied within
  // rounding). The kept positions of all items that compute with the same loss
  // implementation go through one GEMM (`fused_linear` with labels: one pass of per-token
  // statistics, no logits in memory; otherwise one GEMM of logits), and each item is then
  // finalised on its own slice: labels, ignore_index, logits_to_keep, z-loss, reduction,
  // loss_div_factor, return_logits, return_argmax and scoring act per item (a `default` item's
  // scoring outputs come from its slice of the packed logits, its continuation sums from its own
  // rows; `fused_linear` items asking for scoring outputs share one scoring pass of their own,
  // which computes for every token what any of them asks: the largest top_k, every candidate
  // list, and each item keeps its own). An invalid item, or one whose
  // interrupt_check fails before the batch starts, gets its status without affecting the others.
  // interrupt_check is polled once per item before the packed compute, not between its tiles.
  // Results come in item order. Each x must be on the head's device; index tensors may be on
  // the host, as for Forward.
  // Details: every item not marked `validated` is validated up front (ValidateForward), so index
  // tensors on a CUDA device cost a synchronisation per such item here. A group of one item runs
  // exactly as Forward (bit-identical results, interrupt_check polled between fused_linear tiles
  // too). The packed fused_linear pass finds the argmax if any item asks for it, and uses the
  // items' logit_tile_bytes when they all give the same, else the device's default. The logits of
  // a packed item are a view of its group's logits (they keep the whole group's alive). An
  // exception in the packed compute gives every item of its group that status.
  std::vector<absl::StatusOr<LMOutput>> ForwardBatch(const std::vector<ForwardItem>& items) const;

  // Parameters in registration order with OLMo-core's names (docs/SPEC.md §6). The tensors share
  // storage with the head's own.
  const NamedTensors& NamedParameters() const { return parameters_; }

  // Copies weights into the parameters. Accepts OLMo-core names with or without the
  // "lm_head." prefix and Hugging Face names ("lm_head.weight", "lm_head.bias",
  // "model.norm.weight", "model.norm.bias"). Every parameter must be given exactly once with its
  // shape and dtype; a missing, extra, duplicate or mismatched key is INVALID_ARGUMENT naming it.
  absl::Status LoadStateDict(const std::map<std::string, at::Tensor>& tensors);

  // Re-initialises the parameters as at construction (nn.Linear's default init, norm 1/0,
  // NormalizedLMHead's sz = 1/sqrt(d_model)).
  virtual absl::Status ResetParameters(uint64_t seed);

  // NormalizedLMHead.normalize_matrices(): rows of w_out.weight scaled to unit L2 norm.
  // FAILED_PRECONDITION on the default head, which has no such method.
  virtual absl::Status NormalizeMatrices();

  // 6 x the number of parameters (upstream ignores the sequence length).
  int64_t NumFlopsPerToken() const;

  const LMHeadConfig& config() const { return config_; }
  int64_t d_model() const { return d_model_; }
  int64_t vocab_size() const { return vocab_size_; }
  c10::Device device() const;

 protected:
  LMHead(const LMHeadConfig& config, int64_t d_model, int64_t vocab_size);

  // Creates the parameters on `device` (the layer norm for the default head).
  virtual absl::Status CreateParameters(const c10::Device& device);
  // Logits (..., V) of hidden states (..., d_model) after the norm and logits_to_keep.
  virtual at::Tensor Logits(const at::Tensor& h) const;
  // Whether `options` compute with fused_linear (labels given and the implementation chosen).
  bool UsesFusedLinear(const ForwardOptions& options) const;
  // Forward after ValidateStructure, the interrupt check and (unless `queue_index_check`, which
  // queues it on the device as Forward describes) ValidateIndexRanges.
  absl::StatusOr<LMOutput> ForwardValidated(const at::Tensor& x, const ForwardOptions& options,
                                            bool queue_index_check) const;
  // The compute of one forward, index tensors on x's device and valid, the segment sums S' wide
  // (the callers keep G of them); may throw c10::Error.
  LMOutput ComputeForwardOrThrow(const at::Tensor& x, const ForwardOptions& options) const;
  // ForwardBatch's packed compute of the items `group` (two or more, valid, on one path:
  // UsesFusedLinear for all or for none), writing their results.
  void ForwardPacked(const std::vector<ForwardItem>& items, const std::vector<size_t>& group,
                     bool fused_linear, std::vector<absl::StatusOr<LMOutput>>& results) const;
  // ForwardBatch's packed compute of the fused_linear items `group` (two or more, valid) that
  // ask for scoring outputs: one scoring pass (FusedScores) for all their kept tokens, asking what
  // any of them asks, then each item's loss terms and outputs from its own rows.
  void ForwardPackedScoring(const std::vector<ForwardItem>& items, const std::vector<size_t>& group,
                            std::vector<absl::StatusOr<LMOutput>>& results) const;
  // Everything ValidateForward checks except the values of the index tensors.
  absl::Status ValidateStructure(const at::Tensor& x, const ForwardOptions& options) const;
  // The values of the index tensors: positions in [0, seq_len), kept labels in [0, vocab_size)
  // or ignore_index, candidate ids in [0, vocab_size), kept segment ids in [-1, kept positions).
  // Free on the CPU; synchronises with a device that holds them.
  absl::Status ValidateIndexRanges(const at::Tensor& x, const ForwardOptions& options) const;

  LMHeadConfig config_;
  int64_t d_model_;
  int64_t vocab_size_;
  std::unique_ptr<LayerNorm> norm_;  // null without a layer norm
  at::Tensor weight_;                // w_out.weight (V, D)
  at::Tensor bias_;                  // w_out.bias (V,), undefined without a bias
  NamedTensors parameters_;          // all of the above (and sz), in registration order
};

// NormalizedLMHead (nGPT): logits = (sz * sqrt(d_model)) * (x W^T), no norm, no bias; the
// default loss implementation only.
class NormalizedLMHead final : public LMHead {
 public:
  absl::Status ResetParameters(uint64_t seed) override;
  absl::Status NormalizeMatrices() override;

 private:
  friend class LMHead;
  using LMHead::LMHead;

  absl::Status CreateParameters(const c10::Device& device) override;
  at::Tensor Logits(const at::Tensor& h) const override;

  at::Tensor sz_;  // (V,)
};

}  // namespace lmhead

#endif  // LMHEAD_CORE_LM_HEAD_H_

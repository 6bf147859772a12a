// The two loss implementations behind LMHead.forward (docs/SPEC.md §2.3, §2.4), before
// finalisation.
#ifndef LMHEAD_CORE_LOSSES_H_
#define LMHEAD_CORE_LOSSES_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "core/config.h"
#include "core/ops/logit_stats.h"

namespace lmhead {

// loss = ce_loss + z_loss (when z_loss is present), unreduced for kNone.
struct LossTerms {
  at::Tensor loss;
  at::Tensor ce_loss;
  std::optional<at::Tensor> z_loss;  // present iff a z-loss multiplier was given
  std::optional<at::Tensor> argmax;  // FusedLinearLoss with_argmax: (N,) int64 predicted ids
};

// The multiplier upstream passes on: `z_loss_multiplier or 1e-4` (so 0.0 acts as 1e-4).
double EffectiveZLossMultiplier(std::optional<double> z_loss_multiplier);

// `default`: olmo_core's cross_entropy_loss on logits (N, V) of any float dtype, upcast to fp32,
// with labels (N,) int64; z-loss only when a multiplier is given. For kNone the z-loss is not
// masked at ignored rows, as upstream. May throw c10::Error.
LossTerms DefaultLoss(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                      LossReduction reduction, std::optional<double> z_loss_multiplier);

// `fused_linear`: what OLMo-core's Liger path returns, forward only, without ever holding more
// than one tile of logits. h (N, D) and weight (V, D) share a dtype; bias (V,) may be undefined.
// The logits are formed one tile (token rows x vocabulary columns) at a time, and never more
// than `tile_bytes` of them exist at once (ComputeLogitStats, core/ops/logit_stats.h).
// Per token: lse (merged across vocabulary slices) and the label logit in fp32; ce = lse - label
// logit and z = s * lse^2 with s = EffectiveZLossMultiplier (added to `loss` even when no
// multiplier is given, as upstream); ignored rows are 0; "mean" divides each row by the number
// of valid tokens (0 valid tokens gives 0). z_loss is in the input dtype; ce_loss = loss - z_loss
// when a multiplier is given, else loss. `between_tiles`, when set, runs before each tile and
// may throw to abandon the work. `with_argmax` also returns each token's most likely id (what
// torch.argmax gives on its logits), found in the same pass. ComputeLogitStats, then
// FinishFusedLinearLoss. May throw c10::Error.
LossTerms FusedLinearLoss(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& labels, int64_t ignore_index, LossReduction reduction,
                          std::optional<double> z_loss_multiplier, int64_t tile_bytes,
                          const std::function<void()>& between_tiles = {},
                          bool with_argmax = false);

// The labels ComputeLogitStats takes for FusedLinearLoss: `labels` with ignore_index replaced
// by 0 (any valid id: those rows are masked out afterwards). May throw c10::Error.
at::Tensor FusedSafeLabels(const at::Tensor& labels, int64_t ignore_index);

// FusedLinearLoss after its statistics: `stats` (N,) as ComputeLogitStats returns them for the
// rows of h and FusedSafeLabels(labels, ignore_index) (any (N,) slice of a larger pass will do:
// every row's statistics depend on that row alone), labels (N,) as given, `input_dtype` h's
// dtype (the z-loss's). The argmax is passed on with `with_argmax` (stats.argmax must then be
// defined). FusedLinearLoss and LMHead::ForwardBatch share it. May throw c10::Error.
LossTerms FinishFusedLinearLoss(const LogitStats& stats, const at::Tensor& labels,
                                int64_t ignore_index, LossReduction reduction,
                                std::optional<double> z_loss_multiplier,
                                c10::ScalarType input_dtype, bool with_argmax);

// One request of PackedFusedLinearLoss: its kept labels (N,) int64 (on the host, else copied
// there) and FusedLinearLoss's options for it.
struct PackedLossRequest {
  at::Tensor labels;
  int64_t ignore_index = -100;
  LossReduction reduction = LossReduction::kMean;
  std::optional<double> z_loss_multiplier;
  bool with_argmax = false;
};

// One request's share of PackedFusedLinearLoss.
struct PackedLoss {
  LossTerms terms;     // views of the pass's tensors, shaped as FusedLinearLoss returns them
  int64_t scored = 0;  // labels that are not ignore_index
};

// FusedLinearLoss for several requests at once: h (sum of their N, D) holds their rows one
// request after another, in `requests`' order. One ComputeLogitStats pass over all rows, then a
// fixed number of kernels for every request's terms, however many there are: the labels, each
// row's z-loss multiplier and "mean" divisor and each request's first row go to the device as
// three host tables, and the sums of "mean" and "sum" requests are segment sums. Each request's
// terms equal FusedLinearLoss's on its rows alone, but for the order of the summation. With
// `with_argmax` (any request's with_argmax), the requests that ask get their argmax.
// LMHead::ForwardBatch's packed fused_linear path (docs/ARCHITECTURE.md "Packing"). May throw
// c10::Error.
std::vector<PackedLoss> PackedFusedLinearLoss(const at::Tensor& h, const at::Tensor& weight,
                                              const at::Tensor& bias,
                                              const std::vector<PackedLossRequest>& requests,
                                              int64_t tile_bytes, bool with_argmax);

// The tile budget FusedLinearLoss uses on `device` when the caller sets none.
int64_t DefaultLogitTileBytes(const c10::Device& device);

}  // namespace lmhead

#endif  // LMHEAD_CORE_LOSSES_H_

// Splitting a job into micro-batches along the batch dimension, and the one rule that combines
// their answers into what one Forward call over the whole job returns (docs/API.md "Combining
// micro-batches"; tests/data/micro_batch_vectors.json holds the test vectors that this and the
// Python client are both checked against). No LibTorch, no gRPC.
#ifndef LMHEAD_CLIENT_MICRO_BATCHES_H_
#define LMHEAD_CLIENT_MICRO_BATCHES_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/lmhead/v1/lmhead.pb.h"

namespace lmhead {

// Rows [begin, end) of `tensor` along dimension 0 (rank >= 1): CopyRowsTo (tensor_view.h) of
// its view.
v1::Tensor SliceRows(const v1::Tensor& tensor, int64_t begin, int64_t end);

// The value of a one-element FP32, BF16 or FP16 tensor; INVALID_ARGUMENT naming `field` else.
absl::StatusOr<double> ScalarValue(const v1::Tensor& tensor, absl::string_view field);

// A rank-0 tensor of `dtype` (FP32, BF16 or FP16) holding `value` rounded to nearest-even:
// first to float32, then to the 16-bit type, as a float32 result cast by LibTorch would be.
v1::Tensor ScalarTensor(double value, v1::DataType dtype);

// What the combination needs to know about the job.
struct CombineOptions {
  // The job's reduction (UNSPECIFIED means mean).
  v1::LossReduction reduction = v1::LOSS_REDUCTION_UNSPECIFIED;
  // A number loss_div_factor, applied once to the combined mean or sum. (A tensor divisor is
  // split with the batch for "none", and refused for mean and sum: see the doc.)
  std::optional<double> loss_div_factor;
  // The job's effective loss implementation. Only asked for a mean over zero scored tokens
  // (NaN for `default`, 0 for `fused_linear`, as upstream).
  std::function<absl::StatusOr<v1::LossImplementation>()> implementation;
};

// Combines the answers to a job's micro-batches, given in order. For mean and sum each
// micro-batch must have been sent with reduction sum and without loss_div_factor. Not
// thread-safe.
class MicroBatchCombiner {
 public:
  explicit MicroBatchCombiner(CombineOptions options);

  // Adds the answer to the next micro-batch. INVALID_ARGUMENT when its losses are not the
  // scalars of a sum (or, for "none", not rows) or its dtypes differ from the first answer's.
  absl::Status Add(const v1::ForwardResponse& response);

  // The combined answer: logits, argmax and "none" losses concatenated along the batch;
  // num_scored_tokens, num_nonfinite_inputs and timings added; mean/sum losses S / n / d (mean)
  // or S / d (sum) with S the float64 sum of the micro-batches' sums, n the scored tokens, d the
  // divisor (IEEE division: 0 gives inf or NaN), each in the dtype the micro-batches returned.
  // Scoring outputs: the per-position ones (B, S', ...) concatenated along the batch; the
  // per-segment ones (B, G) too, after widening each micro-batch's to the job's largest G with
  // what one call gives a segment no scored position has (sums 0, count 0, is_greedy true).
  absl::StatusOr<v1::ForwardResponse> Finish();

 private:
  bool scalar_losses() const;
  // Adds the next micro-batch's scoring outputs (`count_` is its index).
  absl::Status AddScoring(const v1::ForwardResponse& response);

  CombineOptions options_;
  v1::ForwardResponse combined_;
  int64_t count_ = 0;
  // For mean/sum: the float64 sums of loss, ce_loss, z_loss and their dtypes.
  double sums_[3] = {0, 0, 0};
  v1::DataType dtypes_[3] = {v1::DATA_TYPE_UNSPECIFIED, v1::DATA_TYPE_UNSPECIFIED,
                             v1::DATA_TYPE_UNSPECIFIED};
  // Whether the first answer had scoring outputs; the (B, G) segment outputs of each answer, by
  // field (kSegmentFields in the .cc), padded to the largest G by Finish.
  bool scoring_ = false;
  std::vector<std::vector<v1::Tensor>> segment_parts_;
};

}  // namespace lmhead

#endif  // LMHEAD_CLIENT_MICRO_BATCHES_H_

// The layer norms an LMHead may apply before w_out (olmo_core.nn.layer_norm, docs/SPEC.md §5).
#ifndef LMHEAD_CORE_LAYER_NORM_H_
#define LMHEAD_CORE_LAYER_NORM_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "core/config.h"

namespace lmhead {

// One built norm over the last dimension (of size `size`). Immutable once loaded; Forward is
// const and thread-safe. Owns its parameters (weight and bias, when the config has them).
class LayerNorm {
 public:
  // LayerNormConfig.build(size, init_device): validates, then creates weight = 1 and bias = 0
  // in the config's parameter dtype on `device`.
  static absl::StatusOr<std::unique_ptr<LayerNorm>> Build(const LayerNormConfig& config,
                                                          int64_t size, const c10::Device& device);

  // y = norm(x) in x's dtype. May throw c10::Error (callers convert it).
  at::Tensor Forward(const at::Tensor& x) const;

  // weight <- 1, bias <- 0.
  void ResetParameters();

  // Undefined tensors when the norm has no such parameter.
  const at::Tensor& weight() const { return weight_; }
  const at::Tensor& bias() const { return bias_; }

 private:
  LayerNorm(const LayerNormConfig& config, int64_t size) : config_(config), size_(size) {}

  LayerNormConfig config_;
  int64_t size_;
  at::Tensor weight_;
  at::Tensor bias_;
};

}  // namespace lmhead

#endif  // LMHEAD_CORE_LAYER_NORM_H_

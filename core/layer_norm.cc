#include "core/layer_norm.h"

#include <ATen/ATen.h>

#include "core/dtype.h"
#include "core/torch_errors.h"

namespace lmhead {
namespace {

// y = x * rsqrt(mean(x^2) + eps), in the op order of RMSNorm.forward.
at::Tensor RmsNormalize(const at::Tensor& x, double eps) {
  const at::Tensor variance = x.pow(2).mean(-1, /*keepdim=*/true);
  return x * at::rsqrt(variance + eps);
}

}  // namespace

absl::StatusOr<std::unique_ptr<LayerNorm>> LayerNorm::Build(const LayerNormConfig& config,
                                                            int64_t size,
                                                            const c10::Device& device) {
  if (absl::Status status = config.Validate(); !status.ok()) return status;
  std::unique_ptr<LayerNorm> norm(new LayerNorm(config, size));
  absl::Status created = CatchTorchErrors([&]() -> absl::Status {
    if (config.EffectiveAffine()) {
      const auto options =
          at::TensorOptions().dtype(ScalarTypeOf(config.EffectiveDType())).device(device);
      norm->weight_ = at::ones({size}, options);
      if (config.EffectiveBias()) norm->bias_ = at::zeros({size}, options);
    }
    return absl::OkStatus();
  });
  if (!created.ok()) return created;
  return norm;
}

void LayerNorm::ResetParameters() {
  if (weight_.defined()) weight_.fill_(1);
  if (bias_.defined()) bias_.fill_(0);
}

at::Tensor LayerNorm::Forward(const at::Tensor& x) const {
  const c10::ScalarType og_dtype = x.scalar_type();
  const double eps = config_.EffectiveEps();
  if (config_.name == LayerNormType::kL2Norm) {
    // l2_normalize: the norm in fp32, cast back, the division in x's dtype; no eps.
    return x / at::linalg_vector_norm(x, 2, {-1}, /*keepdim=*/true, at::kFloat).type_as(x);
  }
  const at::Tensor input = config_.EffectiveFullPrecision() ? x.to(at::kFloat) : x;
  const auto cast = [&](const at::Tensor& p) { return p.defined() ? p.type_as(input) : p; };
  switch (config_.name) {
    case LayerNormType::kDefault:
      return at::layer_norm(input, {size_}, cast(weight_), cast(bias_), eps).to(og_dtype);
    case LayerNormType::kQwenRms: {
      // Qwen3 rounding: back to the input dtype before the affine step.
      at::Tensor y = RmsNormalize(input, eps).to(og_dtype);
      if (weight_.defined()) y = y * weight_.type_as(y);
      if (bias_.defined()) y = y + bias_.type_as(y);
      return y;
    }
    case LayerNormType::kRms:
    case LayerNormType::kCuteRms:
    case LayerNormType::kFusedRms: {
      at::Tensor y = RmsNormalize(input, eps);
      if (weight_.defined()) {
        y = bias_.defined() ? cast(weight_) * y + cast(bias_) : cast(weight_) * y;
      }
      return y.to(og_dtype);
    }
    case LayerNormType::kL2Norm:
      break;
  }
  return x;
}

}  // namespace lmhead

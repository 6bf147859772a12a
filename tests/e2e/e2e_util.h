// Helpers shared by the end-to-end tests: wire tensors <-> at::Tensor and the demo head's
// reference (the same head the server builds with default flags, built in-process).
#ifndef LMHEAD_TESTS_E2E_E2E_UTIL_H_
#define LMHEAD_TESTS_E2E_E2E_UTIL_H_

#include <ATen/ATen.h>

#include <memory>

#include "core/lm_head.h"
#include "proto/lmhead/v1/lmhead.pb.h"

namespace lmhead {

inline v1::DataType WireType(c10::ScalarType type) {
  switch (type) {
    case at::kBFloat16:
      return v1::DATA_TYPE_BF16;
    case at::kHalf:
      return v1::DATA_TYPE_FP16;
    case at::kFloat:
      return v1::DATA_TYPE_FP32;
    case at::kInt:
      return v1::DATA_TYPE_INT32;
    case at::kLong:
      return v1::DATA_TYPE_INT64;
    default:
      return v1::DATA_TYPE_UNSPECIFIED;
  }
}

inline c10::ScalarType TorchType(int type) {
  switch (type) {
    case v1::DATA_TYPE_BF16:
      return at::kBFloat16;
    case v1::DATA_TYPE_FP16:
      return at::kHalf;
    case v1::DATA_TYPE_FP32:
      return at::kFloat;
    case v1::DATA_TYPE_INT32:
      return at::kInt;
    case v1::DATA_TYPE_INT64:
      return at::kLong;
    default:
      return at::kFloat;
  }
}

inline v1::Tensor ToWire(const at::Tensor& value) {
  const at::Tensor host = value.contiguous();
  v1::Tensor out;
  out.set_dtype(WireType(host.scalar_type()));
  for (int64_t size : host.sizes()) out.add_shape(size);
  out.set_data(std::string(static_cast<const char*>(host.data_ptr()), host.nbytes()));
  return out;
}

inline at::Tensor FromWire(const v1::Tensor& tensor) {
  std::vector<int64_t> shape(tensor.shape().begin(), tensor.shape().end());
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(TorchType(tensor.dtype())));
  std::memcpy(out.data_ptr(), tensor.data().data(), tensor.data().size());
  return out;
}

// The server's demo head (server/model_registry.cc Model::Demo) for `d_model`, `vocab_size`.
inline std::unique_ptr<LMHead> DemoReference(int64_t d_model = 64, int64_t vocab_size = 1000,
                                             uint64_t seed = 0) {
  LMHeadConfig config;
  config.layer_norm = LayerNormConfig{LayerNormType::kRms};
  config.layer_norm->bias = false;
  config.bias = false;
  return *LMHead::Build(config, d_model, vocab_size, "cpu", seed);
}

}  // namespace lmhead

#endif  // LMHEAD_TESTS_E2E_E2E_UTIL_H_

// Helpers shared by the end-to-end tests: wire tensors <-> at::Tensor (dtypes by the server's
// table, server/tensor_codec.h) and the demo head's reference (the same head the server builds with
// default flags, built in-process).
#ifndef LMHEAD_TESTS_E2E_E2E_UTIL_H_
#define LMHEAD_TESTS_E2E_E2E_UTIL_H_

#include <ATen/ATen.h>

#include <memory>

#include "core/lm_head.h"
#include "proto/lmhead/v1/lmhead.pb.h"
#include "server/tensor_codec.h"

namespace lmhead {

inline v1::Tensor ToWire(const at::Tensor& value) {
  const at::Tensor host = value.contiguous();
  v1::Tensor out;
  out.set_dtype(DataTypeOf(host.scalar_type()));
  for (int64_t size : host.sizes()) out.add_shape(size);
  out.set_data(std::string(static_cast<const char*>(host.data_ptr()), host.nbytes()));
  return out;
}

inline at::Tensor FromWire(const v1::Tensor& tensor) {
  std::vector<int64_t> shape(tensor.shape().begin(), tensor.shape().end());
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(ScalarTypeOf(tensor.dtype())));
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

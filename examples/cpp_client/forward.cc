// An example program of a workspace that depends on lmhead: it asks an lmhead server about its
// default model and runs one forward with labels through @lmhead//client:lmhead_client.
//
//   bazel build //:forward && bazel-bin/forward 127.0.0.1:50051
//
// Prints the server's health, the model, and the forward's losses (FP32 scalars, printed so
// that they read back to the same floats). The hidden states (2, 3, d_model) hold
// ((37 i) mod 101 - 50) / 64 for element i and the labels (2, 3) (7919 i) mod vocab_size, so
// another client can make the same call and compare.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "client/lmhead_client.h"

namespace {

// A v1::Tensor of `dtype` and `shape` holding `values` (T: the dtype's C++ type).
template <class T>
lmhead::v1::Tensor MakeTensor(lmhead::v1::DataType dtype, const std::vector<int64_t>& shape,
                              const std::vector<T>& values) {
  lmhead::v1::Tensor tensor;
  tensor.set_dtype(dtype);
  for (int64_t dim : shape) tensor.add_shape(dim);
  tensor.set_data(values.data(), values.size() * sizeof(T));  // little-endian, as the wire's
  return tensor;
}

// The value of an FP32 scalar the server returned.
float Scalar(const lmhead::v1::Tensor& tensor) {
  float value = 0;
  if (tensor.data().size() == sizeof(value)) std::memcpy(&value, tensor.data().data(), 4);
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s HOST:PORT\n", argv[0]);
    return 2;
  }
  std::unique_ptr<lmhead::LMHeadClient> client = lmhead::LMHeadClient::Connect(argv[1]);

  auto health = client->Health();
  if (!health.ok()) {
    std::fprintf(stderr, "health: %s\n", health.status().ToString().c_str());
    return 1;
  }
  std::printf("health %s\n",
              grpc::health::v1::HealthCheckResponse::ServingStatus_Name(*health).c_str());

  auto model = client->GetModel();  // the server's default model
  if (!model.ok()) {
    std::fprintf(stderr, "model: %s\n", model.status().ToString().c_str());
    return 1;
  }
  std::printf("model %s d_model %lld vocab_size %lld\n", model->name().c_str(),
              static_cast<long long>(model->d_model()),
              static_cast<long long>(model->vocab_size()));

  const int64_t batch = 2, seq_len = 3, d_model = model->d_model();
  std::vector<float> hidden(batch * seq_len * d_model);
  for (size_t i = 0; i < hidden.size(); ++i) hidden[i] = ((37 * i) % 101 - 50.0f) / 64.0f;
  std::vector<int64_t> labels(batch * seq_len);
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = (7919 * i) % model->vocab_size();

  lmhead::ForwardArgs args;  // LMHead.forward's keyword arguments
  args.labels = MakeTensor(lmhead::v1::DATA_TYPE_INT64, {batch, seq_len}, labels);
  args.z_loss_multiplier = 1e-4;
  args.return_logits = false;
  auto out = client->Forward(
      MakeTensor(lmhead::v1::DATA_TYPE_FP32, {batch, seq_len, d_model}, hidden), args);
  if (!out.ok()) {
    std::fprintf(stderr, "forward: %s\n", out.status().ToString().c_str());
    return 1;
  }
  std::printf("loss %.9g\nce_loss %.9g\nz_loss %.9g\nnum_scored_tokens %lld\n", Scalar(out->loss()),
              Scalar(out->ce_loss()), Scalar(out->z_loss()),
              static_cast<long long>(out->num_scored_tokens()));
  return 0;
}

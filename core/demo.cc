// A first look at the core: builds a small seeded head, runs forward with labels through both
// loss implementations and prints LMOutputWithLoss. `bazel run //core:demo`.
#include <ATen/ATen.h>

#include <iostream>

#include "core/lm_head.h"

namespace {

void Print(const char* title, const lmhead::LMOutput& out) {
  std::cout << title << "\n  logits: "
            << (out.logits ? c10::str(out.logits->sizes(), " ", out.logits->scalar_type())
                           : std::string("None"))
            << "\n  loss: " << out.loss->item<double>()
            << "\n  ce_loss: " << out.ce_loss->item<double>() << "\n  z_loss: "
            << (out.z_loss ? std::to_string(out.z_loss->item<double>()) : std::string("None"))
            << "\n";
}

}  // namespace

int main() {
  constexpr int64_t kDModel = 64, kVocab = 1000, kBatch = 2, kSeq = 8;
  lmhead::LMHeadConfig config;
  config.layer_norm = lmhead::LayerNormConfig{lmhead::LayerNormType::kRms};
  config.layer_norm->bias = false;
  config.bias = false;
  auto head = lmhead::LMHead::Build(config, kDModel, kVocab, "cpu", /*seed=*/0);
  if (!head.ok()) {
    std::cerr << head.status() << "\n";
    return 1;
  }
  at::Generator gen = at::detail::createCPUGenerator(42);
  const at::Tensor x = at::randn({kBatch, kSeq, kDModel}, gen);
  at::Tensor labels = at::randint(kVocab, {kBatch, kSeq}, gen, at::TensorOptions(at::kLong));
  labels.index_put_({0, 0}, -100);

  std::cout << "LMHead(d_model=" << kDModel << ", vocab_size=" << kVocab
            << ", layer_norm=rms, bias=False), " << config.NumParams(kDModel, kVocab)
            << " parameters; x " << x.sizes() << ", one label ignored\n";
  lmhead::ForwardOptions options;
  options.labels = labels;
  options.z_loss_multiplier = 1e-4;
  for (auto impl : {lmhead::LossImplementation::kDefault,
                    lmhead::LossImplementation::kFusedLinear}) {
    options.loss_implementation = impl;
    absl::StatusOr<lmhead::LMOutput> out = (*head)->Forward(x, options);
    if (!out.ok()) {
      std::cerr << out.status() << "\n";
      return 1;
    }
    Print(std::string("loss_implementation=" + std::string(lmhead::Name(impl))).c_str(), *out);
  }
  return 0;
}

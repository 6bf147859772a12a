#include "server/model_registry.h"

#include <ATen/ATen.h>

#include <fstream>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/config_json.h"
#include "core/lm_head.h"
#include "core/safetensors.h"
#include "core/torch_errors.h"
#include "server/logging.h"

namespace lmhead {
namespace {

// FNV-1a, 64 bits: a cheap fingerprint of the weights file that changes when any byte does.
std::string Fingerprint(absl::string_view bytes) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (const char c : bytes) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 0x100000001b3ull;
  }
  return absl::StrFormat("fnv1a64:%016x", hash);
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot open '", path, "'"));
  std::ostringstream bytes;
  bytes << file.rdbuf();
  if (!file && !file.eof()) return absl::DataLossError(absl::StrCat("cannot read '", path, "'"));
  return bytes.str();
}

// w_out.weight under any of the names LMHead::LoadStateDict accepts.
const at::Tensor* FindOutputWeight(const std::map<std::string, at::Tensor>& tensors) {
  for (const char* name : {"w_out.weight", "lm_head.w_out.weight", "lm_head.weight"}) {
    if (auto it = tensors.find(name); it != tensors.end()) return &it->second;
  }
  return nullptr;
}

absl::Status InContext(absl::string_view context, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

}  // namespace

Model::Model(std::string name, std::string version, std::string source,
             std::shared_ptr<const LMHead> head, int max_variants)
    : name_(std::move(name)),
      version_(std::move(version)),
      source_(std::move(source)),
      head_(std::move(head)),
      max_variants_(max_variants) {}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const ModelSpec& spec,
                                                   absl::string_view fallback_config_json,
                                                   const std::string& device, int max_variants) {
  const std::string context = absl::StrCat("model '", spec.name, "' (", spec.path, ")");
  absl::StatusOr<std::string> bytes = ReadFile(spec.path);
  if (!bytes.ok()) return InContext(context, bytes.status());

  std::string config_path = spec.path;
  if (absl::EndsWith(config_path, ".safetensors")) {
    config_path.resize(config_path.size() - std::string(".safetensors").size());
  }
  config_path += ".json";
  std::string config_json;
  if (std::ifstream(config_path).good()) {
    absl::StatusOr<std::string> text = ReadFile(config_path);
    if (!text.ok()) return InContext(context, text.status());
    config_json = *std::move(text);
  } else if (!fallback_config_json.empty()) {
    config_json = std::string(fallback_config_json);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(context, ": no head configuration: put it in '", config_path,
                     "' or pass --head_config (LMHeadConfig JSON, see docs/API.md)"));
  }
  absl::StatusOr<LMHeadConfig> config = LMHeadConfigFromJson(config_json);
  if (!config.ok()) return InContext(absl::StrCat(context, " head config"), config.status());

  absl::StatusOr<SafetensorsFile> file = ParseSafetensors(*bytes);
  if (!file.ok()) return InContext(context, file.status());
  const at::Tensor* weight = FindOutputWeight(file->tensors);
  if (weight == nullptr || weight->dim() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(context, ": expected a 2-D 'w_out.weight' (or 'lm_head.weight')"));
  }
  const int64_t vocab_size = weight->size(0);
  const int64_t d_model = weight->size(1);
  absl::StatusOr<std::unique_ptr<LMHead>> head =
      LMHead::Build(*config, d_model, vocab_size, device);
  if (!head.ok()) return InContext(context, head.status());
  if (absl::Status status = (*head)->LoadStateDict(file->tensors); !status.ok()) {
    return InContext(context, status);
  }
  return std::unique_ptr<Model>(new Model(spec.name, Fingerprint(*bytes), spec.path,
                                          std::shared_ptr<const LMHead>(*std::move(head)),
                                          max_variants));
}

absl::StatusOr<std::unique_ptr<Model>> Model::Demo(int64_t d_model, int64_t vocab_size,
                                                   uint64_t seed, const std::string& device,
                                                   int max_variants) {
  // The same head as core/demo.cc: rms layer norm without bias, w_out without bias, fp32.
  LMHeadConfig config;
  config.layer_norm = LayerNormConfig{LayerNormType::kRms};
  config.layer_norm->bias = false;
  config.bias = false;
  absl::StatusOr<std::unique_ptr<LMHead>> head =
      LMHead::Build(config, d_model, vocab_size, device, seed);
  if (!head.ok()) return InContext("demo head", head.status());
  return std::unique_ptr<Model>(
      new Model("demo", absl::StrCat("demo-seed", seed),
                absl::StrCat("embedded demo head (d_model=", d_model, ", vocab_size=", vocab_size,
                             ", seed=", seed, ")"),
                std::shared_ptr<const LMHead>(*std::move(head)), max_variants));
}

absl::StatusOr<std::shared_ptr<const LMHead>> Model::HeadFor(const LMHeadConfig& config) const {
  LMHeadConfig key_config = config;
  key_config.loss_implementation = head_->config().loss_implementation;
  const std::string key = LMHeadConfigToJson(key_config);
  if (key == LMHeadConfigToJson(head_->config())) return head_;

  absl::MutexLock lock(&mu_);
  if (auto it = variants_.find(key); it != variants_.end()) return it->second;
  if (static_cast<int>(variants_.size()) >= max_variants_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("config: model '", name_, "' already keeps ", variants_.size(),
                     " converted copies of its weights (--max_config_variants=", max_variants_,
                     "); use the model's own dtypes (see GetModel)"));
  }
  absl::StatusOr<std::unique_ptr<LMHead>> head =
      LMHead::Build(key_config, head_->d_model(), head_->vocab_size(), head_->device().str());
  if (!head.ok()) return InContext("config", head.status());
  // The fresh head's parameters give each tensor's target dtype.
  std::map<std::string, at::Tensor> converted;
  absl::Status status = CatchTorchErrors([&]() -> absl::Status {
    const NamedTensors& targets = (*head)->NamedParameters();
    const NamedTensors& sources = head_->NamedParameters();
    for (size_t i = 0; i < sources.size(); ++i) {
      converted[sources[i].first] = sources[i].second.to(targets[i].second.scalar_type());
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  if (status = (*head)->LoadStateDict(converted); !status.ok()) return InContext("config", status);
  std::shared_ptr<const LMHead> shared(*std::move(head));
  variants_.emplace(key, shared);
  return shared;
}

absl::StatusOr<std::unique_ptr<ModelRegistry>> ModelRegistry::Load(const Options& options) {
  if (absl::StartsWith(options.device, "cuda") && !at::hasCUDA()) {
    return absl::FailedPreconditionError(
        absl::StrCat("--device ", options.device,
                     ": this server has no usable CUDA backend (it needs a "
                     "--config=cuda build, LibTorch with CUDA and a GPU); use --device cpu"));
  }
  auto registry = std::unique_ptr<ModelRegistry>(new ModelRegistry());
  if (options.models.empty()) {
    absl::StatusOr<std::unique_ptr<Model>> demo =
        Model::Demo(options.demo_d_model, options.demo_vocab_size, options.demo_seed,
                    options.device, options.max_config_variants);
    if (!demo.ok()) return demo.status();
    registry->default_model_ = (*demo)->name();
    registry->models_.emplace((*demo)->name(), *std::move(demo));
    return registry;
  }
  // Names first, so that a typo fails before any large file is read.
  std::set<std::string> names;
  for (const ModelSpec& spec : options.models) {
    if (spec.name.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--model '", spec.path, "': expected NAME=PATH.safetensors"));
    }
    if (!names.insert(spec.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("--model: the name '", spec.name, "' is given twice"));
    }
  }
  for (const ModelSpec& spec : options.models) {
    absl::StatusOr<std::unique_ptr<Model>> model =
        Model::Load(spec, options.head_config_json, options.device, options.max_config_variants);
    if (!model.ok()) return model.status();
    if (registry->default_model_.empty()) registry->default_model_ = spec.name;
    registry->models_.emplace(spec.name, *std::move(model));
  }
  return registry;
}

absl::StatusOr<std::shared_ptr<const Model>> ModelRegistry::Find(absl::string_view name) const {
  if (name.empty()) name = default_model_;
  if (auto it = models_.find(name); it != models_.end()) return it->second;
  return absl::NotFoundError(absl::StrCat("model: no model named ", CallerText(name),
                                          " (ListModels lists this server's models)"));
}

std::vector<std::shared_ptr<const Model>> ModelRegistry::List() const {
  std::vector<std::shared_ptr<const Model>> models;
  for (const auto& [name, model] : models_) models.push_back(model);
  return models;
}

}  // namespace lmhead

#include "server/model_registry.h"

#include <ATen/ATen.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <errno.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/config_json.h"
#include "core/lm_head.h"
#include "core/safetensors.h"
#include "core/torch_errors.h"
#include "server/logging.h"
#include "server/status.h"

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
  errno = 0;
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    const int error = errno;
    if (error == EACCES || error == EPERM) {
      return absl::PermissionDeniedError(absl::StrCat(
          "cannot open '", path, "': permission denied (the server's user cannot read it)"));
    }
    return absl::NotFoundError(
        absl::StrCat("cannot open '", path, "'", error == ENOENT ? ": no such file" : ""));
  }
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

// Waits until the weights just written to `head` (queued on the current stream of its device)
// are there: executors read them on streams of their own, which are not ordered after it.
absl::Status AwaitWeights(const LMHead& head) {
  return CatchTorchErrors([&]() -> absl::Status {
    const c10::Device device = head.device();
    if (!device.is_cpu() && !device.is_meta()) {
      const c10::impl::VirtualGuardImpl guard(device.type());
      guard.synchronizeStream(guard.getStream(device));
    }
    return absl::OkStatus();
  });
}

}  // namespace

Model::Model(std::string name, std::string version, std::string source,
             std::vector<std::shared_ptr<const LMHead>> replicas, int max_variants)
    : name_(std::move(name)),
      version_(std::move(version)),
      source_(std::move(source)),
      replicas_(std::move(replicas)),
      max_variants_(max_variants) {}

absl::StatusOr<std::unique_ptr<Model>> Model::WithReplicas(std::string name, std::string version,
                                                           std::string source,
                                                           std::unique_ptr<LMHead> head,
                                                           const std::vector<std::string>& devices,
                                                           int max_variants) {
  std::vector<std::shared_ptr<const LMHead>> replicas = {std::move(head)};
  for (size_t i = 1; i < devices.size(); ++i) {
    std::shared_ptr<const LMHead> same;
    for (size_t j = 0; j < i; ++j) {
      if (devices[j] == devices[i]) same = replicas[j];
    }
    if (same != nullptr) {
      replicas.push_back(std::move(same));
      continue;
    }
    const LMHead& loaded = *replicas.front();
    absl::StatusOr<std::unique_ptr<LMHead>> copy =
        LMHead::Build(loaded.config(), loaded.d_model(), loaded.vocab_size(), devices[i]);
    if (!copy.ok())
      return InContext(absl::StrCat("model '", name, "' on ", devices[i]), copy.status());
    std::map<std::string, at::Tensor> weights;
    absl::Status status = CatchTorchErrors([&]() -> absl::Status {
      for (const auto& [key, tensor] : loaded.NamedParameters()) {
        weights[key] = tensor.to(c10::Device(devices[i]));
      }
      return absl::OkStatus();
    });
    if (status.ok()) status = (*copy)->LoadStateDict(weights);
    if (status.ok()) status = AwaitWeights(**copy);
    if (!status.ok()) return InContext(absl::StrCat("model '", name, "' on ", devices[i]), status);
    replicas.push_back(std::shared_ptr<const LMHead>(*std::move(copy)));
  }
  if (absl::Status status = AwaitWeights(*replicas.front()); !status.ok()) return status;
  return std::unique_ptr<Model>(new Model(std::move(name), std::move(version), std::move(source),
                                          std::move(replicas), max_variants));
}

std::vector<std::string> Model::devices() const {
  std::vector<std::string> devices;
  for (const auto& replica : replicas_) devices.push_back(replica->device().str());
  return devices;
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const ModelSpec& spec,
                                                   absl::string_view fallback_config_json,
                                                   const std::vector<std::string>& devices,
                                                   int max_variants) {
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
      LMHead::Build(*config, d_model, vocab_size, devices.front());
  if (!head.ok()) return InContext(context, head.status());
  if (absl::Status status = (*head)->LoadStateDict(file->tensors); !status.ok()) {
    return InContext(context, status);
  }
  return WithReplicas(spec.name, Fingerprint(*bytes), spec.path, *std::move(head), devices,
                      max_variants);
}

absl::StatusOr<std::unique_ptr<Model>> Model::Demo(int64_t d_model, int64_t vocab_size,
                                                   uint64_t seed, DType dtype,
                                                   const std::vector<std::string>& devices,
                                                   int max_variants) {
  // The same head as core/demo.cc: rms layer norm without bias, w_out without bias, in `dtype`.
  LMHeadConfig config;
  config.layer_norm = LayerNormConfig{LayerNormType::kRms};
  config.layer_norm->bias = false;
  config.bias = false;
  config.dtype = dtype;
  absl::StatusOr<std::unique_ptr<LMHead>> head =
      LMHead::Build(config, d_model, vocab_size, devices.front(), seed);
  if (!head.ok()) return InContext("demo head", head.status());
  return WithReplicas("demo", absl::StrCat("demo-seed", seed),
                      absl::StrCat("embedded demo head (d_model=", d_model,
                                   ", vocab_size=", vocab_size, ", seed=", seed, ")"),
                      *std::move(head), devices, max_variants);
}

std::string Model::VariantKey(const LMHeadConfig& config) const {
  LMHeadConfig key_config = config;
  key_config.loss_implementation = head().config().loss_implementation;
  return LMHeadConfigToJson(key_config);
}

absl::StatusOr<std::shared_ptr<const LMHead>> Model::HeadFor(const LMHeadConfig& config,
                                                             int replica) const {
  if (replica < 0 || replica >= static_cast<int>(replicas_.size())) {
    return absl::InternalError(absl::StrCat("model '", name_, "' has no replica ", replica));
  }
  const std::shared_ptr<const LMHead>& replica_head = replicas_[replica];
  const std::string key = VariantKey(config);
  if (key == LMHeadConfigToJson(replica_head->config())) return replica_head;
  LMHeadConfig key_config = config;
  key_config.loss_implementation = replica_head->config().loss_implementation;
  // Replicas that share a device share their converted copies too: filed under the first.
  replica = static_cast<int>(std::find(replicas_.begin(), replicas_.end(), replica_head) -
                             replicas_.begin());

  absl::MutexLock lock(&mu_);
  if (auto it = variants_.find({replica, key}); it != variants_.end()) return it->second;
  int kept = 0;
  for (const auto& [id, variant] : variants_) kept += id.first == replica ? 1 : 0;
  if (kept >= max_variants_) {
    // The same request would be refused again: clients are told not to retry it.
    return NotRetryable(absl::ResourceExhaustedError(
        absl::StrCat("config: model '", name_, "' already keeps ", kept,
                     " converted copies of its weights (--max_config_variants=", max_variants_,
                     "); use the model's own dtypes (see GetModel)")));
  }
  absl::StatusOr<std::unique_ptr<LMHead>> head =
      LMHead::Build(key_config, replica_head->d_model(), replica_head->vocab_size(),
                    replica_head->device().str());
  if (!head.ok()) return InContext("config", head.status());
  // The fresh head's parameters give each tensor's target dtype.
  std::map<std::string, at::Tensor> converted;
  absl::Status status = CatchTorchErrors([&]() -> absl::Status {
    const NamedTensors& targets = (*head)->NamedParameters();
    const NamedTensors& sources = replica_head->NamedParameters();
    for (size_t i = 0; i < sources.size(); ++i) {
      converted[sources[i].first] = sources[i].second.to(targets[i].second.scalar_type());
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  if (status = (*head)->LoadStateDict(converted); !status.ok()) return InContext("config", status);
  if (status = AwaitWeights(**head); !status.ok()) return status;
  std::shared_ptr<const LMHead> shared(*std::move(head));
  variants_.emplace(std::make_pair(replica, key), shared);
  return shared;
}

absl::StatusOr<std::vector<std::string>> ExecutorDevices(absl::string_view device_flag) {
  std::vector<std::string> devices;
  for (absl::string_view part : absl::StrSplit(device_flag, ',')) {
    if (absl::StartsWith(part, "cuda") && !at::hasCUDA()) {
      return absl::FailedPreconditionError(
          absl::StrCat("--device ", device_flag,
                       ": this server has no usable CUDA backend (it needs a "
                       "--config=cuda build, LibTorch with CUDA and a GPU); use --device cpu"));
    }
    if (part == "cuda") {
      for (int i = 0; i < static_cast<int>(at::getNumGPUs()); ++i) {
        devices.push_back(absl::StrCat("cuda:", i));
      }
      continue;
    }
    if (absl::ConsumePrefix(&part, "cuda:")) {
      int index = 0;
      if (!absl::SimpleAtoi(part, &index) || index >= static_cast<int>(at::getNumGPUs())) {
        return absl::FailedPreconditionError(
            absl::StrCat("--device ", device_flag, ": there is no cuda:", part,
                         " (this machine has ", at::getNumGPUs(), " visible GPUs)"));
      }
      devices.push_back(absl::StrCat("cuda:", index));
      continue;
    }
    devices.emplace_back(part);
  }
  return devices;
}

absl::StatusOr<std::unique_ptr<ModelRegistry>> ModelRegistry::Load(const Options& options) {
  absl::StatusOr<std::vector<std::string>> devices = ExecutorDevices(options.device);
  if (!devices.ok()) return devices.status();
  auto registry = std::unique_ptr<ModelRegistry>(new ModelRegistry());
  registry->devices_ = *devices;
  if (options.models.empty()) {
    absl::StatusOr<DType> dtype = ParseDType(options.demo_dtype, "--demo_dtype");
    if (!dtype.ok()) return dtype.status();
    absl::StatusOr<std::unique_ptr<Model>> demo =
        Model::Demo(options.demo_d_model, options.demo_vocab_size, options.demo_seed, *dtype,
                    registry->devices_, options.max_config_variants);
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
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(
        spec, options.head_config_json, registry->devices_, options.max_config_variants);
    if (!model.ok()) return model.status();
    if (registry->default_model_.empty()) registry->default_model_ = spec.name;
    registry->models_.emplace(spec.name, *std::move(model));
  }
  return registry;
}

absl::StatusOr<std::shared_ptr<const Model>> ModelRegistry::Find(absl::string_view name) const {
  const bool by_default = name.empty();
  if (by_default) name = default_model_;
  if (auto it = models_.find(name); it != models_.end()) return it->second;
  if (by_default) {
    return absl::NotFoundError(absl::StrCat("model: the default model ", CallerText(name),
                                            " is not loaded now; name a model (ListModels lists "
                                            "this server's models)"));
  }
  return absl::NotFoundError(absl::StrCat("model: no model named ", CallerText(name),
                                          " (ListModels lists this server's models)"));
}

std::unique_ptr<ModelRegistry> ModelRegistry::With(std::shared_ptr<const Model> model) const {
  auto copy = std::make_unique<ModelRegistry>(*this);
  const std::string name = model->name();
  copy->models_.insert_or_assign(name, std::move(model));
  return copy;
}

std::unique_ptr<ModelRegistry> ModelRegistry::Without(absl::string_view name) const {
  auto copy = std::make_unique<ModelRegistry>(*this);
  copy->models_.erase(std::string(name));
  return copy;
}

absl::StatusOr<std::string> ResolveInRepository(const std::string& repository,
                                                absl::string_view path) {
  namespace fs = std::filesystem;
  const std::string quoted = CallerText(path);
  if (std::any_of(path.begin(), path.end(), [](char c) { return c == '\0'; })) {
    return absl::InvalidArgumentError(
        absl::StrCat("path: a file's path has no NUL character, got ", quoted));
  }
  if (path.empty() || path.front() == '/') {
    return absl::InvalidArgumentError(absl::StrCat(
        "path: expected a file's path relative to the server's model repository, got ", quoted));
  }
  // Leaving by '..' is refused before the file system is asked, so the answers tell nothing
  // about files outside.
  const fs::path relative = fs::path(std::string(path)).lexically_normal();
  if (!relative.empty() && *relative.begin() == "..") {
    return absl::InvalidArgumentError(
        absl::StrCat("path: ", quoted, " leads out of the model repository"));
  }
  std::error_code error;
  const fs::path root = fs::canonical(repository, error);
  if (error) return absl::FailedPreconditionError("path: the model repository cannot be read");
  const fs::path file = fs::canonical(root / std::string(path), error);
  if (error) {
    return absl::NotFoundError(absl::StrCat("path: no file ", quoted, " in the model repository"));
  }
  // Inside: the repository is a prefix of the file's path, component by component.
  const auto [end, unused] = std::mismatch(root.begin(), root.end(), file.begin(), file.end());
  if (end != root.end() || file == root) {
    return absl::InvalidArgumentError(
        absl::StrCat("path: ", quoted, " leads out of the model repository"));
  }
  if (!fs::is_regular_file(file, error)) {
    return absl::NotFoundError(
        absl::StrCat("path: ", quoted, " is not a file in the model repository"));
  }
  return file.string();
}

std::vector<std::shared_ptr<const Model>> ModelRegistry::List() const {
  std::vector<std::shared_ptr<const Model>> models;
  for (const auto& [name, model] : models_) models.push_back(model);
  return models;
}

}  // namespace lmhead

// Model and ModelRegistry: the heads this server serves, loaded once at start-up from
// safetensors files (or the embedded demo head) and then shared, immutable, by every request.
#ifndef LMHEAD_SERVER_MODEL_REGISTRY_H_
#define LMHEAD_SERVER_MODEL_REGISTRY_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "core/config.h"
#include "server/options.h"

namespace lmhead {

class LMHead;  // core/lm_head.h; kept out of this header so it needs no LibTorch headers

// A loaded head with its name, version and source. The weights never change after loading.
// Thread-safe: HeadFor may add a converted copy of the weights for a per-request configuration
// (docs/API.md "Per-request configuration"); such copies are themselves immutable and kept
// until the model is destroyed, at most `max_variants` of them.
class Model {
 public:
  // Reads `spec.path`. The head's configuration comes from `<path without .safetensors>.json`
  // beside it, else from `fallback_config_json`; d_model and vocab_size from w_out's shape.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const ModelSpec& spec,
                                                     absl::string_view fallback_config_json,
                                                     const std::string& device, int max_variants);
  // The embedded demo head (Options::demo_*), named "demo".
  static absl::StatusOr<std::unique_ptr<Model>> Demo(int64_t d_model, int64_t vocab_size,
                                                     uint64_t seed, const std::string& device,
                                                     int max_variants);

  const std::string& name() const { return name_; }
  const std::string& version() const { return version_; }
  const std::string& source() const { return source_; }
  const LMHead& head() const { return *head_; }

  // The head to run for `config`, which must describe the same weights as head().config()
  // (the service checks that field by field): head() itself when the configurations agree up
  // to loss_implementation, else a copy with the weights converted to `config`'s dtypes,
  // built on first use. RESOURCE_EXHAUSTED when max_variants copies exist already.
  absl::StatusOr<std::shared_ptr<const LMHead>> HeadFor(const LMHeadConfig& config) const;

 private:
  Model(std::string name, std::string version, std::string source,
        std::shared_ptr<const LMHead> head, int max_variants);

  const std::string name_;
  const std::string version_;
  const std::string source_;
  const std::shared_ptr<const LMHead> head_;
  const int max_variants_;
  mutable absl::Mutex mu_;
  // LMHeadConfigToJson(config) -> its head.
  mutable std::map<std::string, std::shared_ptr<const LMHead>> variants_ ABSL_GUARDED_BY(mu_);
};

// The models a server serves, by name. Immutable once loaded; thread-safe.
class ModelRegistry {
 public:
  // Loads Options::models (or the demo head when there are none). The first error (naming the
  // model and file) stops loading.
  static absl::StatusOr<std::unique_ptr<ModelRegistry>> Load(const Options& options);

  // The model called `name`; the default model for an empty name. NOT_FOUND naming the loaded
  // models otherwise.
  absl::StatusOr<std::shared_ptr<const Model>> Find(absl::string_view name) const;

  // All models, sorted by name.
  std::vector<std::shared_ptr<const Model>> List() const;
  const std::string& default_model() const { return default_model_; }

 private:
  std::map<std::string, std::shared_ptr<const Model>, std::less<>> models_;
  std::string default_model_;
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_MODEL_REGISTRY_H_

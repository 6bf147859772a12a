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

// A loaded head with its name, version and source, and a replica of its weights on each of the
// server's devices (one per executor; executors on one device share it). The weights never
// change after loading. Thread-safe: HeadFor may add a converted copy of the weights for a
// per-request configuration (docs/API.md "Per-request configuration"); such copies are
// themselves immutable and kept until the model is destroyed, at most `max_variants` of them
// per replica.
class Model {
 public:
  // Reads `spec.path`. The head's configuration comes from `<path without .safetensors>.json`
  // beside it, else from `fallback_config_json`; d_model and vocab_size from w_out's shape.
  // Replica i lives on devices[i] (at least one device).
  static absl::StatusOr<std::unique_ptr<Model>> Load(const ModelSpec& spec,
                                                     absl::string_view fallback_config_json,
                                                     const std::vector<std::string>& devices,
                                                     int max_variants);
  // The embedded demo head (Options::demo_*), named "demo", with parameters in `dtype`.
  static absl::StatusOr<std::unique_ptr<Model>> Demo(int64_t d_model, int64_t vocab_size,
                                                     uint64_t seed, DType dtype,
                                                     const std::vector<std::string>& devices,
                                                     int max_variants);

  const std::string& name() const { return name_; }
  const std::string& version() const { return version_; }
  const std::string& source() const { return source_; }
  // Replica 0, as loaded.
  const LMHead& head() const { return *replicas_.front(); }
  // The devices of the replicas, in replica order.
  std::vector<std::string> devices() const;

  // The head to run for `config` on replica `replica`; `config` must describe the same weights
  // as head().config() (PlanForward checks that field by field): the replica itself when the
  // configurations agree up to loss_implementation, else a copy with the weights converted to
  // `config`'s dtypes, built on first use. RESOURCE_EXHAUSTED, marked NotRetryable
  // (server/status.h), when max_variants copies exist already.
  absl::StatusOr<std::shared_ptr<const LMHead>> HeadFor(const LMHeadConfig& config,
                                                        int replica = 0) const;

  // The key HeadFor files `config`'s copy under: equal keys, equal weights.
  std::string VariantKey(const LMHeadConfig& config) const;

 private:
  // Copies `head`'s weights to each device of `devices` (sharing where a device repeats).
  Model(std::string name, std::string version, std::string source,
        std::vector<std::shared_ptr<const LMHead>> replicas, int max_variants);
  static absl::StatusOr<std::unique_ptr<Model>> WithReplicas(
      std::string name, std::string version, std::string source, std::unique_ptr<LMHead> head,
      const std::vector<std::string>& devices, int max_variants);

  const std::string name_;
  const std::string version_;
  const std::string source_;
  const std::vector<std::shared_ptr<const LMHead>> replicas_;
  const int max_variants_;
  mutable absl::Mutex mu_;
  // (replica, VariantKey(config)) -> its head.
  mutable std::map<std::pair<int, std::string>, std::shared_ptr<const LMHead>> variants_
      ABSL_GUARDED_BY(mu_);
};

// --device's list ("cpu", "cuda" for every visible GPU, "cuda:N", comma-separated and repeatable)
// as one device per executor: FAILED_PRECONDITION naming the flag when a CUDA device is missing.
absl::StatusOr<std::vector<std::string>> ExecutorDevices(absl::string_view device_flag);

// The weights file that `path`, relative to the model repository directory `repository`, names:
// its canonical path. INVALID_ARGUMENT naming the field `path` for an empty or absolute path or
// one that leads out of the repository (through '..' or a link), NOT_FOUND when there is no
// regular file there. Messages quote `path` as given, never the repository's location.
absl::StatusOr<std::string> ResolveInRepository(const std::string& repository,
                                                absl::string_view path);

// The models a server serves, by name. Immutable once loaded (LoadModel and UnloadModel make
// a changed copy, which the service then serves); thread-safe.
class ModelRegistry {
 public:
  // Loads Options::models (or the demo head when there are none). The first error (naming the
  // model and file) stops loading.
  static absl::StatusOr<std::unique_ptr<ModelRegistry>> Load(const Options& options);

  // The model called `name`; the default model for an empty name. NOT_FOUND otherwise (also for
  // an empty name once the default model was unloaded).
  absl::StatusOr<std::shared_ptr<const Model>> Find(absl::string_view name) const;

  // All models, sorted by name.
  std::vector<std::shared_ptr<const Model>> List() const;
  // The model an empty name selects: the first model loaded at start. It stays the default when
  // unloaded (an empty name then finds nothing) and is again once a model of its name is loaded.
  const std::string& default_model() const { return default_model_; }
  // A copy with `model` added, in place of a loaded model of the same name if there is one.
  std::unique_ptr<ModelRegistry> With(std::shared_ptr<const Model> model) const;
  // A copy without the model called `name` (the same registry if none is).
  std::unique_ptr<ModelRegistry> Without(absl::string_view name) const;
  // One device per executor, in --device order (each model has a replica on each).
  const std::vector<std::string>& devices() const { return devices_; }

 private:
  std::map<std::string, std::shared_ptr<const Model>, std::less<>> models_;
  std::vector<std::string> devices_;
  std::string default_model_;
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_MODEL_REGISTRY_H_

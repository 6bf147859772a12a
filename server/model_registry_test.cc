#include "server/model_registry.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/match.h"
#include "core/lm_head.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

TEST(ModelRegistryTest, ServesTheDemoHeadWhenNoModelIsGiven) {
  Options options;
  options.demo_d_model = 8;
  options.demo_vocab_size = 20;
  absl::StatusOr<std::unique_ptr<ModelRegistry>> registry = ModelRegistry::Load(options);
  ASSERT_TRUE(registry.ok()) << registry.status();
  EXPECT_EQ((*registry)->default_model(), "demo");
  absl::StatusOr<std::shared_ptr<const Model>> model = (*registry)->Find("");
  ASSERT_TRUE(model.ok());
  EXPECT_EQ((*model)->name(), "demo");
  EXPECT_EQ((*model)->head().d_model(), 8);
  EXPECT_EQ((*model)->head().vocab_size(), 20);
  absl::StatusOr<std::shared_ptr<const Model>> missing = (*registry)->Find("other");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  // Issue 11: the message names the field, quotes what was asked, and lists no model.
  EXPECT_EQ(missing.status().message(),
            "model: no model named 'other' (ListModels lists this server's models)");
  absl::StatusOr<std::shared_ptr<const Model>> long_name =
      (*registry)->Find(std::string(64 << 10, 'x') + "\n");
  EXPECT_EQ(long_name.status().code(), absl::StatusCode::kNotFound);
  EXPECT_LT(long_name.status().message().size(), 200u);
  EXPECT_EQ(long_name.status().message().find('\n'), absl::string_view::npos);
}

TEST(ModelRegistryTest, ConvertedCopiesAreCachedAndBounded) {
  absl::StatusOr<std::unique_ptr<Model>> model =
      Model::Demo(8, 20, /*seed=*/0, DType::kFloat32, {"cpu"}, /*max_variants=*/1);
  ASSERT_TRUE(model.ok()) << model.status();
  LMHeadConfig config = (*model)->head().config();
  config.loss_implementation = LossImplementation::kFusedLinear;  // needs no copy
  absl::StatusOr<std::shared_ptr<const LMHead>> same = (*model)->HeadFor(config);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->get(), &(*model)->head());

  config.dtype = DType::kBFloat16;
  absl::StatusOr<std::shared_ptr<const LMHead>> bf16 = (*model)->HeadFor(config);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_NE(bf16->get(), &(*model)->head());
  EXPECT_EQ((*bf16)->config().dtype, DType::kBFloat16);
  // The copy holds the model's weights, converted.
  const at::Tensor& original = (*model)->head().NamedParameters().back().second;
  const at::Tensor& converted = (*bf16)->NamedParameters().back().second;
  EXPECT_TRUE(at::equal(converted, original.to(at::kBFloat16)));
  EXPECT_EQ((*model)->HeadFor(config)->get(), bf16->get());  // cached

  config.dtype = DType::kFloat16;
  EXPECT_EQ((*model)->HeadFor(config).status().code(), absl::StatusCode::kResourceExhausted);
}

// Executors on one device share its replica; each replica keeps its own converted copies.
TEST(ModelRegistryTest, OneReplicaPerExecutorSharedOnOneDevice) {
  Options options;
  options.device = "cpu,cpu";
  options.max_config_variants = 1;
  absl::StatusOr<std::unique_ptr<ModelRegistry>> registry = ModelRegistry::Load(options);
  ASSERT_TRUE(registry.ok()) << registry.status();
  EXPECT_EQ((*registry)->devices(), (std::vector<std::string>{"cpu", "cpu"}));
  const std::shared_ptr<const Model> model = *(*registry)->Find("");
  EXPECT_EQ(model->devices(), (std::vector<std::string>{"cpu", "cpu"}));
  LMHeadConfig config = model->head().config();
  EXPECT_EQ(model->HeadFor(config, 0)->get(), model->HeadFor(config, 1)->get());
  config.dtype = DType::kBFloat16;
  absl::StatusOr<std::shared_ptr<const LMHead>> first = model->HeadFor(config, 0);
  absl::StatusOr<std::shared_ptr<const LMHead>> second = model->HeadFor(config, 1);
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_TRUE(at::equal((*first)->NamedParameters().back().second,
                        (*second)->NamedParameters().back().second));
  EXPECT_EQ(model->HeadFor(config, 2).status().code(), absl::StatusCode::kInternal);
  // The CUDA entries of --device fail clearly on a build or machine without CUDA.
  if (!at::hasCUDA()) {
    EXPECT_EQ(ExecutorDevices("cpu,cuda:0").status().code(), absl::StatusCode::kFailedPrecondition);
  }
}

TEST(ModelRegistryTest, LoadErrorsNameTheModelAndFile) {
  Options options;
  options.models = {{"m", "/nonexistent/head.safetensors"}};
  absl::StatusOr<std::unique_ptr<ModelRegistry>> registry = ModelRegistry::Load(options);
  EXPECT_EQ(registry.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(registry.status().message().find("model 'm' (/nonexistent/head.safetensors)"),
            std::string::npos)
      << registry.status();
  options.models = {{"a", "x.safetensors"}, {"a", "y.safetensors"}};
  EXPECT_NE(ModelRegistry::Load(options).status().message().find("given twice"), std::string::npos);
}

// LoadModel and UnloadModel: copies with a model added, replaced or removed; the original and the
// models it shares are untouched.
TEST(ModelRegistryTest, WithAndWithoutMakeChangedCopies) {
  Options options;
  options.demo_d_model = 8;
  options.demo_vocab_size = 20;
  absl::StatusOr<std::unique_ptr<ModelRegistry>> registry = ModelRegistry::Load(options);
  ASSERT_TRUE(registry.ok()) << registry.status();
  const std::shared_ptr<const Model> demo = *(*registry)->Find("demo");
  absl::StatusOr<std::unique_ptr<Model>> other =
      Model::Demo(4, 10, /*seed=*/1, DType::kFloat32, {"cpu"}, /*max_variants=*/1);
  ASSERT_TRUE(other.ok());
  // A second demo head named "demo" replaces the first in the copy only.
  const std::shared_ptr<const Model> replacement = *std::move(other);
  std::unique_ptr<ModelRegistry> replaced = (*registry)->With(replacement);
  EXPECT_EQ(replaced->Find("demo")->get(), replacement.get());
  EXPECT_EQ((*registry)->Find("demo")->get(), demo.get());
  EXPECT_EQ(replaced->List().size(), 1u);

  std::unique_ptr<ModelRegistry> empty = (*registry)->Without("demo");
  EXPECT_TRUE(empty->List().empty());
  EXPECT_EQ(empty->default_model(), "demo");
  const absl::Status gone = empty->Find("").status();
  EXPECT_EQ(gone.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(gone.message(),
            "model: the default model 'demo' is not loaded now; name a model (ListModels lists "
            "this server's models)");
  EXPECT_EQ(empty->Find("demo").status().code(), absl::StatusCode::kNotFound);
  // Loaded again under its name, it is the default again.
  EXPECT_EQ(empty->With(demo)->Find("")->get(), demo.get());
  EXPECT_EQ((*registry)->Without("absent")->List().size(), 1u);
}

TEST(ModelRegistryTest, RepositoryPathsStayInside) {
  namespace fs = std::filesystem;
  const fs::path root = fs::path(::testing::TempDir()) / "repository";
  const fs::path outside = fs::path(::testing::TempDir()) / "outside.safetensors";
  fs::remove_all(root);
  fs::create_directories(root / "sub");
  std::ofstream(root / "sub" / "head.safetensors") << "x";
  std::ofstream(outside) << "x";
  fs::create_symlink(outside, root / "link.safetensors");
  fs::create_symlink(root / "sub" / "head.safetensors", root / "inner.safetensors");

  absl::StatusOr<std::string> inside = ResolveInRepository(root.string(), "sub/head.safetensors");
  ASSERT_TRUE(inside.ok()) << inside.status();
  EXPECT_EQ(*inside, fs::canonical(root / "sub" / "head.safetensors").string());
  EXPECT_TRUE(ResolveInRepository(root.string(), "sub/../sub/head.safetensors").ok());
  EXPECT_TRUE(ResolveInRepository(root.string(), "inner.safetensors").ok());

  struct Case {
    std::string path;
    absl::StatusCode code;
  };
  for (const Case& c : std::vector<Case>{
           {"", absl::StatusCode::kInvalidArgument},
           {outside.string(), absl::StatusCode::kInvalidArgument},
           {"../outside.safetensors", absl::StatusCode::kInvalidArgument},
           {"sub/../../outside.safetensors", absl::StatusCode::kInvalidArgument},
           {"link.safetensors", absl::StatusCode::kInvalidArgument},
           {".", absl::StatusCode::kInvalidArgument},
           {"sub", absl::StatusCode::kNotFound},
           {"missing.safetensors", absl::StatusCode::kNotFound},
           {"../missing.safetensors", absl::StatusCode::kInvalidArgument},
           {"sub/../../../missing", absl::StatusCode::kInvalidArgument},
           {std::string("sub/head.safetensors\0../../x", 28), absl::StatusCode::kInvalidArgument},
       }) {
    const absl::Status status = ResolveInRepository(root.string(), c.path).status();
    EXPECT_EQ(status.code(), c.code) << c.path << ": " << status;
    EXPECT_TRUE(absl::StartsWith(status.message(), "path: ")) << status;
    // The repository's location is never shown.
    EXPECT_EQ(status.message().find(root.string()), absl::string_view::npos) << status;
  }
}

}  // namespace
}  // namespace lmhead

// GPU tests (tag requires-gpu; run on the GPU machine by tools/gpu/test.sh): both loss
// implementations on CUDA against an fp64 reference and against the CPU path, over dtypes, head
// types and norms, vocab sizes that are not multiples of any tile, N=1, ignored and all-ignored
// labels, every logits_to_keep form and tilings that split tokens and vocabulary.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/lm_head.h"
#include "core/ops/logit_stats.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

struct Case {
  DType dtype;
  int64_t vocab;
  int64_t batch;
  int64_t seq;
  LossReduction reduction;
  std::optional<double> z;
  int ignore;  // 0 none, 1 some, 2 all
  int keep;    // 0: 0, 1: -3, 2: positions tensor
  int64_t tile_bytes;
  bool bias;
  int head;  // 0: RMS norm, 1: layer norm, 2: no norm, 3: NormalizedLMHead
};

const char* const kHeadNames[] = {"rms norm", "layer norm", "no norm", "normalized"};

std::string Describe(const Case& c) {
  return absl::StrCat(Name(c.dtype), " V=", c.vocab, " B=", c.batch, " S=", c.seq, " ",
                      Name(c.reduction), " z=", c.z ? std::to_string(*c.z) : "None",
                      " ignore=", c.ignore, " keep=", c.keep, " tile=", c.tile_bytes,
                      " bias=", c.bias, " head=", kHeadNames[c.head]);
}

std::vector<Case> Grid() {
  std::vector<Case> cases;
  const std::vector<int64_t> vocabs = {37, 1000, 50304, 100352 + 3};
  int i = 0;
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    for (int64_t vocab : vocabs) {
      for (LossReduction reduction :
           {LossReduction::kMean, LossReduction::kSum, LossReduction::kNone}) {
        for (int ignore : {0, 1, 2}) {
          ++i;
          Case c{dtype, vocab, 1 + i % 3, (i % 4 == 0) ? 1 : 5 + i % 7, reduction,
                 i % 2 ? std::optional<double>(1e-3) : std::nullopt, ignore, i % 3,
                 // small budgets split tokens and vocabulary into many tiles
                 i % 2 ? int64_t{128} << 20 : int64_t{4096} + 97 * i, i % 3 != 1, (i / 3) % 4};
          cases.push_back(c);
        }
      }
    }
  }
  // N = 1.
  cases.push_back(
      {DType::kBFloat16, 50304, 1, 1, LossReduction::kSum, 1e-4, 0, 0, 128 << 20, false, 0});
  return cases;
}

// Per-token ce and lse in fp64 from (possibly rounded) logits.
struct Reference {
  at::Tensor ce, lse, valid;
};
Reference Fp64(const at::Tensor& logits2d, const at::Tensor& labels1d, int64_t ignore_index) {
  const at::Tensor l = logits2d.to(at::kDouble).cpu();
  const at::Tensor y = labels1d.cpu();
  const at::Tensor valid = y.ne(ignore_index);
  const at::Tensor safe = at::where(valid, y, at::zeros_like(y));
  const at::Tensor lse = at::logsumexp(l, {1});
  const at::Tensor ce =
      at::where(valid, lse - l.gather(1, safe.unsqueeze(1)).squeeze(1), at::zeros_like(lse));
  return {ce, lse, valid};
}

// One rounding step of the dtype, relative (2^-7 for bf16, 2^-10 for fp16), with room for fp32
// GEMMs that may round a last bit differently.
double RoundingUnit(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
      return 1.6e-2;
    case DType::kFloat16:
      return 2e-3;
    case DType::kFloat32:
      return 1e-5;
  }
  return 1e-5;
}

class GpuLMHeadTest : public ::testing::TestWithParam<Case> {};

TEST_P(GpuLMHeadTest, MatchesFp64AndCpu) {
  if (c10::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Case& c = GetParam();
  SCOPED_TRACE(Describe(c));
  constexpr int64_t kD = 64;
  LMHeadConfig config;
  config.dtype = c.dtype;
  if (c.head == 3) {
    config.name = LMHeadType::kNormalized;
  } else {
    config.bias = c.bias;
    if (c.head == 0) config.layer_norm = LayerNormConfig{LayerNormType::kRms};
    if (c.head == 1) config.layer_norm = LayerNormConfig{LayerNormType::kDefault};
  }
  auto cpu = LMHead::Build(config, kD, c.vocab, "cpu", /*seed=*/7);
  auto gpu = LMHead::Build(config, kD, c.vocab, "cuda:0", /*seed=*/7);
  ASSERT_TRUE(cpu.ok() && gpu.ok());
  std::map<std::string, at::Tensor> weights;
  for (const auto& [name, t] : (*cpu)->NamedParameters()) weights[name] = t;
  ASSERT_TRUE((*gpu)->LoadStateDict(weights).ok());

  at::Generator gen = at::detail::createCPUGenerator(c.vocab * 31 + c.seq);
  const at::ScalarType st = ScalarTypeOf(c.dtype);
  const at::Tensor x = (at::randn({c.batch, c.seq, kD}, gen) * 3).to(st);
  at::Tensor labels = at::randint(c.vocab, {c.batch, c.seq}, gen, at::TensorOptions(at::kLong));
  if (c.ignore == 1) labels.select(1, 0).fill_(-100);
  if (c.ignore == 2) labels.fill_(-100);

  ForwardOptions options;
  options.labels = labels;
  options.loss_reduction = c.reduction;
  options.z_loss_multiplier = c.z;
  options.logit_tile_bytes = c.tile_bytes;
  options.loss_div_factor = 3.0;
  if (c.keep == 1) options.logits_to_keep = int64_t{-3};
  if (c.keep == 2) {
    options.logits_to_keep = at::randint(c.seq, {c.batch, 2}, gen, at::TensorOptions(at::kLong));
  }
  auto to_gpu = [](ForwardOptions o) {
    o.labels = o.labels->cuda();
    if (auto* p = std::get_if<at::Tensor>(&o.logits_to_keep)) o.logits_to_keep = p->cuda();
    return o;
  };

  // Logits on the GPU, rounded to the head dtype by the GEMM: the reference's input.
  ForwardOptions logits_only = to_gpu(options);
  logits_only.labels.reset();
  auto logits = (*gpu)->Forward(x.cuda(), logits_only);
  ASSERT_TRUE(logits.ok()) << logits.status();
  const int64_t kept = logits->logits->size(1);

  for (LossImplementation impl : {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
    SCOPED_TRACE(Name(impl));
    options.loss_implementation = impl;
    options.return_argmax = true;
    auto g = (*gpu)->Forward(x.cuda(), to_gpu(options));
    auto h = (*cpu)->Forward(x, options);
    // Labels and positions may also stay on the host (the server's way): the same numbers.
    auto g_host_labels = (*gpu)->Forward(x.cuda(), options);
    if (c.head == 3 && impl == LossImplementation::kFusedLinear) {
      // NormalizedLMHead refuses fused_linear upstream too, on every device.
      EXPECT_EQ(g.status().code(), absl::StatusCode::kUnimplemented) << g.status();
      EXPECT_EQ(h.status().code(), absl::StatusCode::kUnimplemented) << h.status();
      continue;
    }
    ASSERT_TRUE(g.ok()) << g.status();
    ASSERT_TRUE(h.ok()) << h.status();
    ASSERT_TRUE(g_host_labels.ok()) << g_host_labels.status();
    EXPECT_TRUE(at::allclose(g_host_labels->loss->cpu(), g->loss->cpu(), 0, 0, /*equal_nan=*/true));
    // The argmax picks a largest logit: default's equals torch.argmax on the same logits;
    // fused_linear's tiles, in GEMMs of their own, may round a logit differently by one unit, so
    // fused_linear's pick must reach the maximum within that.
    const at::Tensor all_logits = *logits->logits;
    ASSERT_TRUE(g->argmax.has_value());
    ASSERT_EQ(g->argmax->sizes(), all_logits.sizes().slice(0, 2));
    if (impl == LossImplementation::kDefault) {
      EXPECT_TRUE(at::equal(*g->argmax, all_logits.argmax(-1)));
    } else if (all_logits.numel() > 0) {
      const at::Tensor picked =
          all_logits.gather(-1, g->argmax->unsqueeze(-1)).squeeze(-1).to(at::kDouble);
      const at::Tensor best = std::get<0>(all_logits.max(-1)).to(at::kDouble);
      const double unit = RoundingUnit(c.dtype);
      EXPECT_TRUE((picked >= best - unit * best.abs() - 1e-6).all().item<bool>())
          << "fused argmax misses the maximum by " << (best - picked).max().item<double>();
    }
    ASSERT_EQ(g->loss->sizes(), h->loss->sizes());
    ASSERT_EQ(g->loss->scalar_type(), h->loss->scalar_type());
    ASSERT_EQ(g->z_loss.has_value(), h->z_loss.has_value());
    if (g->z_loss) {
      ASSERT_EQ(g->z_loss->scalar_type(), h->z_loss->scalar_type());
    }

    // Selected labels, flattened as the head does.
    at::Tensor kept_labels = labels;
    if (c.keep == 1) kept_labels = labels.slice(1, std::min<int64_t>(3, c.seq));  // [3:]
    if (c.keep == 2) kept_labels = labels.gather(1, std::get<at::Tensor>(options.logits_to_keep));
    const Reference ref =
        Fp64(logits->logits->reshape({-1, c.vocab}), kept_labels.reshape({-1}), -100);
    ASSERT_EQ(ref.ce.size(0), c.batch * kept);

    // Per-token loss against fp64 over the same logits: the epilogue is exact to fp32 rounding.
    // loss = ce + s * lse^2, where the z term is present with a multiplier (default: at every
    // row; fused: at valid rows) and also without one in fused (s = 1e-4).
    if (c.reduction == LossReduction::kNone) {
      const at::Tensor got = g->loss->reshape({-1}).to(at::kDouble).cpu() * 3.0;
      at::Tensor want = ref.ce;
      const bool fused = impl == LossImplementation::kFusedLinear;
      if (c.z || fused) {
        const double s = c.z ? *c.z : 1e-4;
        const at::Tensor z = s * ref.lse * ref.lse;
        want = want + (fused ? at::where(ref.valid, z, at::zeros_like(z)) : z);
      }
      const double max_err = got.numel() ? (got - want).abs().max().item<double>() : 0.0;
      EXPECT_LT(max_err, 1e-3) << "per-token loss differs from fp64 by " << max_err;
      if (got.numel() > 0) {
        EXPECT_LT((got - want).abs().median().item<double>(), 1e-4);
      }
    }
    // GPU vs CPU, same implementation, tolerance of the head dtype.
    const double rtol = c.dtype == DType::kFloat32 ? 1e-4 : RoundingUnit(c.dtype);
    const at::Tensor gl = g->loss->to(at::kDouble).cpu(), hl = h->loss->to(at::kDouble).cpu();
    EXPECT_TRUE(at::allclose(gl, hl, rtol, 1e-4, /*equal_nan=*/true))
        << "gpu " << gl << " cpu " << hl;
    if (c.ignore == 2 && c.reduction == LossReduction::kMean) {
      EXPECT_EQ(std::isnan(gl.item<double>()), impl == LossImplementation::kDefault);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Grid, GpuLMHeadTest, ::testing::ValuesIn(Grid()));

// fused_linear's argmax is torch.argmax's: exactly tied maxima split across vocabulary tiles
// (integer data: the logits are exact in any order) give the first id; so do tied +inf columns;
// the first NaN column wins over every number; an all-NaN row gives 0.
TEST(GpuLMHeadArgmaxTest, FirstOfTiesAcrossTilesInfAndNaN) {
  if (c10::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct Columns {
    const char* what;
    float value;
    std::vector<int64_t> ids;  // set to `value` in every row; the first one wins
  };
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const Columns& special :
       {Columns{"tied maxima", 3.f, {7, 20000, 50303}}, Columns{"+inf", inf, {12345, 45000}},
        Columns{"NaN", nan, {30000, 40000}}}) {
    for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
      LMHeadConfig config;
      config.dtype = dtype;
      config.bias = false;
      auto gpu = LMHead::Build(config, 64, 50304, "cuda:0", 1);
      ASSERT_TRUE(gpu.ok());
      const at::ScalarType st = dtype == DType::kBFloat16 ? at::kBFloat16 : at::kFloat;
      at::Generator gen = at::detail::createCPUGenerator(9);
      at::Tensor w = at::randint(-2, 3, {50304, 64}, gen, at::TensorOptions(at::kFloat));
      for (const int64_t id : special.ids) w[id].fill_(special.value);
      ASSERT_TRUE((*gpu)->LoadStateDict({{"w_out.weight", w.to(st)}}).ok());
      at::Tensor x = at::randint(1, 4, {3, 11, 64}, gen, at::TensorOptions(at::kFloat));
      x[2][4].fill_(nan);
      x = x.to(st).cuda();
      ForwardOptions logits_only;
      const at::Tensor expected = (*gpu)->Forward(x, logits_only)->logits->argmax(-1);
      ASSERT_EQ(expected[0][0].item<int64_t>(), special.ids[0]);
      ASSERT_EQ(expected[2][4].item<int64_t>(), 0);
      for (const int64_t tile_bytes : {int64_t{0}, int64_t{3000}, int64_t{1} << 20}) {
        SCOPED_TRACE(::testing::Message()
                     << special.what << ", " << Name(dtype) << ", tile_bytes " << tile_bytes);
        ForwardOptions options;
        options.labels = at::randint(50304, {3, 11}, gen, at::TensorOptions(at::kLong));
        options.loss_implementation = LossImplementation::kFusedLinear;
        options.logit_tile_bytes = tile_bytes;
        options.return_argmax = true;
        auto out = (*gpu)->Forward(x, options);
        ASSERT_TRUE(out.ok()) << out.status();
        EXPECT_TRUE(at::equal(*out->argmax, expected)) << *out->argmax;
      }
    }
  }
}

// Out-of-range labels and positions get the same InvalidArgument whether they are on the host or
// on the device, and the head keeps working afterwards.
TEST(GpuLMHeadErrorsTest, IndexTensorsOnHostOrDevice) {
  if (c10::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  LMHeadConfig config;
  auto gpu = LMHead::Build(config, 16, 50, "cuda:0", 1);
  ASSERT_TRUE(gpu.ok());
  const at::Tensor x = at::randn({2, 5, 16}).cuda();
  for (const bool on_device : {false, true}) {
    SCOPED_TRACE(on_device ? "index tensors on cuda:0" : "index tensors on the host");
    const auto place = [&](at::Tensor t) { return on_device ? t.cuda() : t; };
    for (LossImplementation impl :
         {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
      ForwardOptions bad_labels;
      bad_labels.loss_implementation = impl;
      at::Tensor labels = at::randint(50, {2, 5}, at::TensorOptions(at::kLong));
      labels[1][3] = 50;
      bad_labels.labels = place(labels);
      auto out = (*gpu)->Forward(x, bad_labels);
      ASSERT_FALSE(out.ok());
      EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(out.status().message().find("labels"), std::string::npos) << out.status();

      ForwardOptions bad_positions;
      bad_positions.loss_implementation = impl;
      bad_positions.labels = place(at::randint(50, {2, 5}, at::TensorOptions(at::kLong)));
      bad_positions.logits_to_keep = place(at::tensor({0, 5, 1, 2}, at::kLong).view({2, 2}));
      out = (*gpu)->Forward(x, bad_positions);
      ASSERT_FALSE(out.ok());
      EXPECT_NE(out.status().message().find("logits_to_keep"), std::string::npos) << out.status();

      labels[1][3] = -100;
      ForwardOptions good;
      good.loss_implementation = impl;
      good.labels = place(labels);
      out = (*gpu)->Forward(x, good);
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_TRUE(at::isfinite(*out->loss).item<bool>());
    }
  }
}

// Forward returns once its work is queued, with labels and positions on the host or on the
// device: the device is still busy with the forward's own GEMMs (milliseconds at these shapes)
// when it returns, so nothing inside it waited for them. d=2048 takes the fused GEMM on Hopper,
// d=4096 the tiled path.
class GpuLMHeadAsyncWidthTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(GpuLMHeadAsyncWidthTest, ForwardReturnsBeforeItsWorkIsDone) {
  if (c10::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  LMHeadConfig config;
  config.dtype = DType::kBFloat16;
  config.bias = false;
  const int64_t d = GetParam(), vocab = 128256, n = 8192;
  auto gpu = LMHead::Build(config, d, vocab, "cuda:0", 1);
  ASSERT_TRUE(gpu.ok());
  const at::Tensor x = at::randn({1, n, d}, at::TensorOptions(at::kCUDA).dtype(at::kBFloat16));
  const at::Tensor labels = at::randint(vocab, {1, n}, at::TensorOptions(at::kLong));
  const at::Tensor positions = at::arange(n, at::TensorOptions(at::kLong)).view({1, n});
  for (LossImplementation impl : {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
    for (const bool on_device : {false, true}) {
      for (const bool with_positions : {false, true}) {
        SCOPED_TRACE(absl::StrCat(Name(impl),
                                  on_device ? ", index tensors on cuda:0" : ", on the host",
                                  with_positions ? ", positions tensor" : ""));
        ForwardOptions options;
        options.loss_implementation = impl;
        options.labels = on_device ? labels.cuda() : labels;
        if (with_positions) options.logits_to_keep = on_device ? positions.cuda() : positions;
        options.return_logits = false;
        ASSERT_TRUE((*gpu)->Forward(x, options).ok());  // warm-up: allocator, cuBLAS
        c10::cuda::device_synchronize();
        auto out = (*gpu)->Forward(x, options);
        const bool busy_after_return = !c10::cuda::getCurrentCUDAStream().query();
        c10::cuda::device_synchronize();
        ASSERT_TRUE(out.ok()) << out.status();
        EXPECT_TRUE(busy_after_return);
        EXPECT_TRUE(at::isfinite(*out->loss).item<bool>());
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Widths, GpuLMHeadAsyncWidthTest, ::testing::Values(2048, 4096));

// After one forward of each kind, further forwards of the same shapes get all their device
// memory from LibTorch's caching allocator (no cudaMalloc), free all of it with their outputs,
// and never make the allocator synchronise the streams.
TEST(GpuLMHeadAsyncTest, NoDeviceAllocationAfterWarmUp) {
  if (c10::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  LMHeadConfig config;
  config.dtype = DType::kBFloat16;
  const int64_t d = 1024, vocab = 50304 + 3, n = 4096;
  auto gpu = LMHead::Build(config, d, vocab, "cuda:0", 1);
  ASSERT_TRUE(gpu.ok());
  const at::Tensor x = at::randn({2, n / 2, d}, at::TensorOptions(at::kCUDA).dtype(at::kBFloat16));
  const at::Tensor labels = at::randint(vocab, {2, n / 2}, at::TensorOptions(at::kLong));
  const auto run_each_kind = [&] {
    for (LossImplementation impl :
         {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
      for (const bool on_device : {false, true}) {
        ForwardOptions options;
        options.loss_implementation = impl;
        options.labels = on_device ? labels.cuda() : labels;
        options.return_argmax = true;
        options.z_loss_multiplier = 1e-4;
        options.logit_tile_bytes = 8 << 20;  // several tiles
        auto out = (*gpu)->Forward(x, options);
        ASSERT_TRUE(out.ok()) << out.status();
        c10::cuda::device_synchronize();
      }
    }
  };
  const auto stats = [] { return c10::cuda::CUDACachingAllocator::getDeviceStats(0); };
  const auto allocated = [&] {
    return stats()
        .allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
        .current;
  };
  run_each_kind();
  const int64_t device_allocs = stats().num_device_alloc;
  const int64_t stream_syncs = stats().num_sync_all_streams;
  const int64_t bytes = allocated();
  for (int i = 0; i < 3; ++i) run_each_kind();
  EXPECT_EQ(stats().num_device_alloc, device_allocs);
  EXPECT_EQ(stats().num_sync_all_streams, stream_syncs);
  EXPECT_EQ(allocated(), bytes);
}

// ForwardBatch on the GPU, as the server calls it (hidden states on the device, index tensors on
// the host, one on the device): every item of a packed group equals its own Forward on the same
// head, for both loss implementations, the three reductions, with and without z-loss (0.0 too),
// loss_div_factor as a number and a tensor, argmax, ignored and all-ignored labels, items that
// keep no position (also a whole group of them) and every logits_to_keep form, with the fused
// GEMM (bf16, no bias) and the tiled path (fp32, bias).
TEST(GpuLMHeadBatchTest, PackedItemsMatchTheirOwnForward) {
  if (c10::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const bool bf16 : {true, false}) {
    SCOPED_TRACE(bf16 ? "bf16, no bias" : "fp32, bias");
    LMHeadConfig config;
    config.dtype = bf16 ? DType::kBFloat16 : DType::kFloat32;
    config.bias = !bf16;
    const int64_t d = 256, vocab = 50304 + 3;
    auto gpu = LMHead::Build(config, d, vocab, "cuda:0", 3);
    ASSERT_TRUE(gpu.ok());
    at::manual_seed(5);
    std::vector<ForwardItem> items;
    int i = 0;
    for (LossImplementation impl :
         {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
      for (LossReduction reduction :
           {LossReduction::kMean, LossReduction::kSum, LossReduction::kNone}) {
        for (int variant = 0; variant < 4; ++variant, ++i) {
          const int64_t batch = 1 + i % 2, seq = 3 + 5 * (i % 4);
          ForwardItem item;
          item.x = at::randn({batch, seq, d}, at::TensorOptions(at::kCUDA))
                       .to(ScalarTypeOf(config.dtype));
          ForwardOptions& o = item.options;
          o.loss_implementation = impl;
          o.loss_reduction = reduction;
          o.return_logits = false;
          o.return_argmax = variant % 2 == 0;
          if (variant >= 2) o.z_loss_multiplier = variant == 2 ? 0.0 : 1e-3;  // 0.0 acts as 1e-4
          if (i % 4 == 1) o.loss_div_factor = 2.5;
          if (i % 8 == 5) o.loss_div_factor = at::full({}, 4.0, at::kFloat);
          o.ignore_index = variant == 3 ? 7 : -100;
          at::Tensor labels = at::randint(vocab, {batch, seq}, at::TensorOptions(at::kLong));
          labels = at::where(at::rand({batch, seq}).lt(0.25), o.ignore_index, labels);
          if (i % 7 == 3) labels.fill_(o.ignore_index);  // nothing scored
          o.labels = i % 5 == 4 ? labels.cuda() : labels;
          if (i % 3 == 1) o.logits_to_keep = -2;
          if (i % 6 == 2) o.logits_to_keep = at::tensor({0, 2}, at::kLong).expand({batch, 2});
          if (i == 5) o.logits_to_keep = seq + 1;   // keeps every position
          if (i % 7 == 6) o.logits_to_keep = -seq;  // keeps none
          items.push_back(std::move(item));
        }
      }
    }
    // And a group where no item keeps a position (sums over no rows).
    for (LossReduction reduction : {LossReduction::kSum, LossReduction::kMean}) {
      for (int k = 0; k < 2; ++k) {
        ForwardItem item;
        item.x = at::randn({2, 3, d}, at::TensorOptions(at::kCUDA)).to(ScalarTypeOf(config.dtype));
        item.options.loss_implementation = LossImplementation::kFusedLinear;
        item.options.loss_reduction = reduction;
        item.options.z_loss_multiplier = 1e-3;
        item.options.return_logits = false;
        item.options.labels = at::randint(vocab, {2, 3}, at::TensorOptions(at::kLong));
        item.options.logits_to_keep = -3;
        items.push_back(std::move(item));
      }
    }
    const std::vector<ForwardItem> empty_group(items.end() - 4, items.end());
    const std::vector<absl::StatusOr<LMOutput>> empty_results = (*gpu)->ForwardBatch(empty_group);
    for (size_t k = 0; k < empty_group.size(); ++k) {
      ASSERT_TRUE(empty_results[k].ok()) << empty_results[k].status();
      EXPECT_EQ(empty_results[k]->num_scored_tokens, 0);
      EXPECT_EQ(empty_results[k]->loss->cpu().item<float>(), 0.0f);
      EXPECT_EQ(empty_results[k]->z_loss->cpu().to(at::kFloat).item<float>(), 0.0f);
    }
    const std::vector<absl::StatusOr<LMOutput>> packed = (*gpu)->ForwardBatch(items);
    ASSERT_EQ(packed.size(), items.size());
    for (size_t k = 0; k < items.size(); ++k) {
      SCOPED_TRACE(absl::StrCat("item ", k, " ", Name(*items[k].options.loss_implementation), " ",
                                Name(items[k].options.loss_reduction)));
      const absl::StatusOr<LMOutput> solo = (*gpu)->Forward(items[k].x, items[k].options);
      ASSERT_TRUE(packed[k].ok()) << packed[k].status();
      ASSERT_TRUE(solo.ok()) << solo.status();
      EXPECT_EQ(packed[k]->num_scored_tokens, solo->num_scored_tokens);
      for (const auto& [name, got, want] :
           {std::make_tuple("loss", packed[k]->loss, solo->loss),
            std::make_tuple("ce_loss", packed[k]->ce_loss, solo->ce_loss),
            std::make_tuple("z_loss", packed[k]->z_loss, solo->z_loss)}) {
        ASSERT_EQ(got.has_value(), want.has_value()) << name;
        if (!got.has_value()) continue;
        ASSERT_EQ(got->sizes(), want->sizes()) << name;
        ASSERT_EQ(got->scalar_type(), want->scalar_type()) << name;
        const at::Tensor g = got->cpu().to(at::kDouble), w = want->cpu().to(at::kDouble);
        const double tolerance = bf16 ? 1e-2 : 1e-5;
        // NaN where upstream gives NaN (e.g. "mean" of the default path with nothing scored).
        EXPECT_TRUE(at::allclose(g, w, tolerance, tolerance, /*equal_nan=*/true)) << name << "\n"
                                                                                  << g << "\nvs\n"
                                                                                  << w;
      }
      ASSERT_EQ(packed[k]->argmax.has_value(), solo->argmax.has_value());
      if (packed[k]->argmax.has_value() && packed[k]->argmax->numel() > 0) {
        // Ties may resolve alike only up to rounding: nearly every id agrees.
        const double agree =
            packed[k]->argmax->eq(*solo->argmax).to(at::kDouble).mean().item<double>();
        EXPECT_GE(agree, 0.9);
      }
    }
  }
}

// ForwardBatch of a packed fused_linear group with labels on the host queues its work and
// returns: the device is still busy with the GEMMs when it returns.
TEST(GpuLMHeadBatchTest, PackedForwardReturnsBeforeItsWorkIsDone) {
  if (c10::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  LMHeadConfig config;
  config.dtype = DType::kBFloat16;
  config.bias = false;
  const int64_t d = 4096, vocab = 128256;
  auto gpu = LMHead::Build(config, d, vocab, "cuda:0", 1);
  ASSERT_TRUE(gpu.ok());
  std::vector<ForwardItem> items;
  for (int k = 0; k < 16; ++k) {
    ForwardItem item;
    item.x = at::randn({1, 256, d}, at::TensorOptions(at::kCUDA).dtype(at::kBFloat16));
    item.options.loss_implementation = LossImplementation::kFusedLinear;
    item.options.labels = at::randint(vocab, {1, 256}, at::TensorOptions(at::kLong));
    item.options.loss_reduction = k % 2 ? LossReduction::kSum : LossReduction::kNone;
    item.options.z_loss_multiplier = 1e-4;
    item.options.return_logits = false;
    item.validated = true;
    items.push_back(std::move(item));
  }
  ASSERT_TRUE((*gpu)->ForwardBatch(items).front().ok());  // warm-up: allocator, cuBLAS
  c10::cuda::device_synchronize();
  const std::vector<absl::StatusOr<LMOutput>> out = (*gpu)->ForwardBatch(items);
  const bool busy_after_return = !c10::cuda::getCurrentCUDAStream().query();
  c10::cuda::device_synchronize();
  EXPECT_TRUE(busy_after_return);
  for (const absl::StatusOr<LMOutput>& output : out) {
    ASSERT_TRUE(output.ok()) << output.status();
    EXPECT_TRUE(at::isfinite(*output->loss).all().item<bool>());
    EXPECT_EQ(output->num_scored_tokens, 256);
  }
}

// The fused GEMM (where it can run: Hopper, bf16 and fp16, no bias) against the tiled path
// and against fp64 over one cuBLAS GEMM's logits: ragged tiles in tokens and vocabulary, N=1,
// several token slices, with argmax. The two
// GEMMs may round a logit to the dtype differently (their fp32 sums differ in the last bits), so a
// few rows may differ by one rounding unit.
TEST(GpuFusedGemmTest, MatchesTiledAndFp64) {
  if (c10::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct Shape {
    int64_t n, v, d, tile_bytes;
  };
  // Two slices of 512 rows at V=32003: 126 vocabulary tiles of 256, 16 bytes each with argmax.
  const int64_t two_slices = 512 * 126 * 16;
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    for (const Shape& s : {Shape{1, 1000, 64, 1 << 20}, Shape{300, 5003, 128, 1 << 20},
                           Shape{1000, 32003, 256, two_slices}, Shape{4099, 50304, 1024, 64 << 20},
                           Shape{513, 256, 4096, 1 << 20}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " N=" << s.n << " V=" << s.v << " d=" << s.d
                                        << " tile_bytes=" << s.tile_bytes);
      at::Generator gen = at::detail::createCPUGenerator(s.n * 7 + s.v);
      const auto opts = at::TensorOptions(at::kCUDA).dtype(dtype);
      const at::Tensor h = at::randn({s.n, s.d}, gen).to(opts);
      const at::Tensor w = (at::randn({s.v, s.d}, gen) * (3.0 / std::sqrt(s.d))).to(opts);
      if (!FusedGemmApplies(h, w, at::Tensor())) {
        GTEST_SKIP() << "the fused GEMM needs a compute capability 9.0 device";
      }
      const at::Tensor labels = at::randint(s.v, {s.n}, gen, at::TensorOptions(at::kLong)).cuda();
      const LogitStats fused = ComputeLogitStatsFusedGemm(h, w, labels, s.tile_bytes, {}, true);
      const LogitStats tiled =
          ComputeLogitStatsTiled(h, w, at::Tensor(), labels, s.tile_bytes, {}, true);
      const at::Tensor logits = at::mm(h, w.t()).to(at::kDouble).cpu();
      const at::Tensor lse = at::logsumexp(logits, {1});
      const at::Tensor label_logit = logits.gather(1, labels.cpu().unsqueeze(1)).squeeze(1);
      const double unit =
          dtype == at::kBFloat16 ? RoundingUnit(DType::kBFloat16) : RoundingUnit(DType::kFloat16);
      const double bound = unit * logits.abs().max().item<double>();
      for (const LogitStats* got : {&fused, &tiled}) {
        SCOPED_TRACE(got == &fused ? "fused GEMM" : "tiled");
        const at::Tensor ce_error =
            ((got->lse.cpu().to(at::kDouble) - got->label_logit.cpu().to(at::kDouble)) -
             (lse - label_logit))
                .abs();
        EXPECT_LT(ce_error.median().item<double>(), 1e-4);
        EXPECT_LT(ce_error.max().item<double>(), bound);
        const at::Tensor picked = logits.gather(1, got->argmax.cpu().unsqueeze(1)).squeeze(1);
        const at::Tensor best = std::get<0>(logits.max(1));
        EXPECT_TRUE((picked >= best - unit * best.abs()).all().item<bool>());
      }
      EXPECT_TRUE(at::allclose(fused.lse, tiled.lse, 0, bound));
    }
  }
}

// Scoring in the fused GEMM's epilogue (label log-probabilities, entropy, rank and the argmax
// behind segment sums) against fp64 over one cuBLAS GEMM's logits in the compute dtype, and
// against the tiled pass (logit_tile_bytes below the fused GEMM's minimum): vocabularies that
// are not multiples of the tile, ignored labels, a NaN row, several token slices. The GEMMs may
// round a logit differently by one unit, so a rank is checked against the counts of logits
// surely above and possibly above the label's.
TEST(GpuFusedGemmTest, ScoringMatchesTiledAndFp64) {
  if (c10::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct Shape {
    int64_t n, v, d, tile_bytes;
  };
  // V=32003: 251 tiles of 128 at 24 bytes each with scoring; 128-row slices, so 8 of them.
  const int64_t slices_of_128 = 128 * 251 * 24;
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    for (const Shape& s : {Shape{1, 1000, 64, 64 << 20}, Shape{300, 5003, 128, 64 << 20},
                           Shape{1000, 32003, 256, slices_of_128}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " N=" << s.n << " V=" << s.v << " d=" << s.d);
      LMHeadConfig config;
      config.dtype = dtype == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
      config.bias = false;
      absl::StatusOr<std::unique_ptr<LMHead>> head =
          LMHead::Build(config, s.d, s.v, "cuda", static_cast<uint64_t>(s.v));
      ASSERT_TRUE(head.ok()) << head.status();
      at::Generator gen = at::detail::createCPUGenerator(s.n * 5 + s.v);
      const auto opts = at::TensorOptions(at::kCUDA).dtype(dtype);
      at::Tensor x = at::randn({1, s.n, s.d}, gen).to(opts);
      if (s.n > 2) x.select(1, 2).fill_(std::numeric_limits<float>::quiet_NaN());
      at::Tensor labels = at::randint(s.v, {1, s.n}, gen, at::TensorOptions(at::kLong));
      labels.narrow(1, 0, std::min<int64_t>(s.n, 3)).select(1, 0).fill_(-100);  // ignored
      at::Tensor w;
      for (const auto& [name, t] : (*head)->NamedParameters()) {
        if (name == "w_out.weight") w = t;
      }
      ASSERT_TRUE(w.defined());
      if (!FusedGemmApplies(x.view({s.n, s.d}), w, at::Tensor())) {
        GTEST_SKIP() << "the fused GEMM needs a compute capability 9.0 device";
      }
      const auto run = [&](int64_t tile_bytes) {
        ForwardOptions options;
        options.labels = labels;
        options.loss_implementation = LossImplementation::kFusedLinear;
        options.return_logits = false;
        options.logit_tile_bytes = tile_bytes;
        options.scoring.label_logprobs = true;
        options.scoring.entropy = true;
        options.scoring.label_rank = true;
        options.scoring.segment_ids =
            at::arange(s.n, at::TensorOptions(at::kLong)).floor_divide(7).view({1, s.n});
        absl::StatusOr<LMOutput> out = (*head)->Forward(x, options);
        EXPECT_TRUE(out.ok()) << out.status();
        return *std::move(out);
      };
      const LMOutput fused = run(s.tile_bytes);
      const LMOutput tiled = run(100000);  // below the minimum of every shape here
      // The reference: the logits of one cuBLAS GEMM in the compute dtype, in fp64.
      const at::Tensor logits = at::mm(x.view({s.n, s.d}), w.t()).to(at::kDouble).cpu();
      const at::Tensor flat_labels = labels.view({s.n});
      const at::Tensor valid = flat_labels.ne(-100);
      const at::Tensor safe = flat_labels.masked_fill(~valid, 0);
      const at::Tensor logp = at::log_softmax(logits, 1);
      const at::Tensor want_logprobs =
          logp.gather(1, safe.unsqueeze(1)).squeeze(1).masked_fill(~valid, 0.0);
      const at::Tensor want_entropy = -(logp.exp() * logp).nansum(1);
      const double unit =
          dtype == at::kBFloat16 ? RoundingUnit(DType::kBFloat16) : RoundingUnit(DType::kFloat16);
      const double bound = 2 * unit * logits.abs().nan_to_num(0, 0, 0).max().item<double>();
      const at::Tensor finite = at::isfinite(logits).all(1);
      const at::Tensor label_logit = logits.gather(1, safe.unsqueeze(1));
      const at::Tensor slack = unit * (label_logit.abs() + logits.abs());
      const at::Tensor rank_low = (logits - label_logit).gt(slack).sum(1) + 1;
      const at::Tensor rank_high = (logits - label_logit).ge(-slack).sum(1);
      for (const LMOutput* got : {&fused, &tiled}) {
        SCOPED_TRACE(got == &fused ? "fused GEMM" : "tiled");
        const at::Tensor logprobs = got->scoring.label_logprobs->view({s.n}).cpu().to(at::kDouble);
        const at::Tensor entropy = got->scoring.entropy->view({s.n}).cpu().to(at::kDouble);
        const at::Tensor rank = got->scoring.label_rank->view({s.n}).cpu();
        // A NaN row gives NaN scores (its ignored label too: only finite rows are compared).
        EXPECT_TRUE(at::equal(entropy.isnan(), ~finite));
        EXPECT_TRUE(at::equal(logprobs.isnan(), ~finite & valid));
        const at::Tensor rows = finite & valid;
        EXPECT_TRUE(at::allclose(logprobs.masked_select(rows), want_logprobs.masked_select(rows), 0,
                                 bound));
        EXPECT_TRUE(at::allclose(entropy.masked_select(finite), want_entropy.masked_select(finite),
                                 1e-3, bound));
        EXPECT_TRUE((rank.masked_select(~valid) == 0).all().item<bool>());
        EXPECT_TRUE((rank.masked_select(rows) >= rank_low.masked_select(rows)).all().item<bool>())
            << rank.masked_select(rows) << rank_low.masked_select(rows);
        EXPECT_TRUE((rank.masked_select(rows) <= rank_high.masked_select(rows)).all().item<bool>());
        EXPECT_TRUE(got->scoring.segment_logprob_sums.has_value());
      }
      // The segment sums are formed from the same per-token scores by the same code.
      const at::Tensor sums_fused = fused.scoring.segment_logprob_sums->cpu();
      const at::Tensor sums_tiled = tiled.scoring.segment_logprob_sums->cpu();
      EXPECT_TRUE(at::allclose(sums_fused, sums_tiled, 1e-3, 7 * bound, /*equal_nan=*/true));
    }
  }
}

// A head on the second card while the first is current (as in a server run with --device
// cuda:1): both implementations give the CPU's numbers, whichever device is current.
TEST(GpuLMHeadDeviceTest, HeadOnSecondDevice) {
  if (c10::cuda::device_count() < 2) GTEST_SKIP() << "needs two CUDA devices";
  c10::cuda::set_device(0);
  LMHeadConfig config;
  config.dtype = DType::kBFloat16;
  config.bias = false;
  auto cpu = LMHead::Build(config, 64, 5003, "cpu", 3);
  auto gpu = LMHead::Build(config, 64, 5003, "cuda:1", 3);
  ASSERT_TRUE(cpu.ok() && gpu.ok());
  std::map<std::string, at::Tensor> weights;
  for (const auto& [name, t] : (*cpu)->NamedParameters()) weights[name] = t;
  ASSERT_TRUE((*gpu)->LoadStateDict(weights).ok());
  const at::Tensor x = at::randn({2, 150, 64}).to(at::kBFloat16);
  for (LossImplementation impl : {LossImplementation::kDefault, LossImplementation::kFusedLinear}) {
    SCOPED_TRACE(Name(impl));
    ForwardOptions options;
    options.labels = at::randint(5003, {2, 150}, at::TensorOptions(at::kLong));
    options.loss_implementation = impl;
    auto g = (*gpu)->Forward(x.to(at::Device("cuda:1")), options);
    auto h = (*cpu)->Forward(x, options);
    ASSERT_TRUE(g.ok()) << g.status();
    ASSERT_TRUE(h.ok()) << h.status();
    EXPECT_EQ(g->loss->device(), at::Device("cuda:1"));
    EXPECT_TRUE(
        at::allclose(g->loss->cpu().to(at::kDouble), h->loss->to(at::kDouble), 1.6e-2, 1e-4));
  }
}

TEST(GpuLMHeadSmokeTest, SmallCaseForComputeSanitizer) {
  if (c10::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // With a bias and small tiles: the tiled path over ragged tiles. Without a bias, on
  // Hopper: the fused GEMM, over a ragged tile in tokens and vocabulary.
  for (const bool bias : {true, false}) {
    SCOPED_TRACE(bias ? "bias, tiled" : "no bias, fused GEMM where it applies");
    LMHeadConfig config;
    config.dtype = DType::kBFloat16;
    config.bias = bias;
    auto gpu = LMHead::Build(config, 32, 1003, "cuda:0", 1);
    ASSERT_TRUE(gpu.ok());
    ForwardOptions options;
    options.labels = at::randint(1003, {2, 90}, at::TensorOptions(at::kLong)).cuda();
    options.loss_implementation = LossImplementation::kFusedLinear;
    options.logit_tile_bytes = bias ? 3000 : 1 << 20;
    options.loss_reduction = LossReduction::kNone;
    options.return_argmax = true;
    auto out = (*gpu)->Forward(at::randn({2, 90, 32}).to(at::kBFloat16).cuda(), options);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_TRUE(at::isfinite(*out->loss).all().item<bool>());
  }
}

}  // namespace
}  // namespace lmhead

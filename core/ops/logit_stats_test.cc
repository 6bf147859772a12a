// The CPU side of the logit-statistics dispatch: the chunked path against fp64 over chunkings
// that split tokens and vocabulary, and the fused GEMM's entry points on CPU tensors (the GPU
// side is in tests/gpu).
#include "core/ops/logit_stats.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "gtest/gtest.h"

namespace lmhead {
namespace {

TEST(LogitStatsTest, ChunkedMatchesFp64OverChunkings) {
  at::manual_seed(3);
  const at::Tensor h = at::randn({37, 16});
  const at::Tensor w = at::randn({1003, 16});
  const at::Tensor labels = at::randint(1003, {37}, at::TensorOptions(at::kLong));
  const at::Tensor logits = at::mm(h.to(at::kDouble), w.to(at::kDouble).t());
  const at::Tensor lse = at::logsumexp(logits, {1});
  const at::Tensor label_logit = logits.gather(1, labels.unsqueeze(1)).squeeze(1);
  const at::Tensor argmax = logits.argmax(1);
  for (const int64_t chunk_bytes : {int64_t{1}, int64_t{5000}, int64_t{1} << 20}) {
    SCOPED_TRACE(chunk_bytes);
    const LogitStats stats = ComputeLogitStats(h, w, at::Tensor(), labels, chunk_bytes, {}, true);
    EXPECT_TRUE(at::allclose(stats.lse.to(at::kDouble), lse, 1e-5, 1e-5));
    EXPECT_TRUE(at::allclose(stats.label_logit.to(at::kDouble), label_logit, 1e-5, 1e-5));
    EXPECT_TRUE(at::equal(stats.argmax, argmax));
  }
}

TEST(LogitStatsTest, FusedGemmRefusesCpuTensors) {
  const at::Tensor h = at::randn({4, 16}).to(at::kBFloat16);
  const at::Tensor w = at::randn({100, 16}).to(at::kBFloat16);
  const at::Tensor labels = at::zeros({4}, at::TensorOptions(at::kLong));
  EXPECT_FALSE(FusedGemmApplies(h, w, at::Tensor()));
  EXPECT_THROW(ComputeLogitStatsFusedGemm(h, w, labels, int64_t{1} << 20), c10::Error);
  // ComputeLogitStats takes the chunked path here, whatever the budget.
  const LogitStats stats = ComputeLogitStats(h, w, at::Tensor(), labels, int64_t{1} << 20);
  EXPECT_TRUE(at::isfinite(stats.lse).all().item<bool>());
}

}  // namespace
}  // namespace lmhead

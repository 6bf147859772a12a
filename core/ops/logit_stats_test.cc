// The CPU side of the logit-statistics dispatch: the tiled path against fp64 over tilings
// that split tokens and vocabulary, and the fused GEMM's entry points on CPU tensors (the GPU
// side is in tests/gpu).
#include "core/ops/logit_stats.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "gtest/gtest.h"

namespace lmhead {
namespace {

TEST(LogitStatsTest, TiledMatchesFp64OverTilings) {
  at::manual_seed(3);
  const at::Tensor h = at::randn({37, 16});
  const at::Tensor w = at::randn({1003, 16});
  const at::Tensor labels = at::randint(1003, {37}, at::TensorOptions(at::kLong));
  const at::Tensor logits = at::mm(h.to(at::kDouble), w.to(at::kDouble).t());
  const at::Tensor lse = at::logsumexp(logits, {1});
  const at::Tensor label_logit = logits.gather(1, labels.unsqueeze(1)).squeeze(1);
  const at::Tensor argmax = logits.argmax(1);
  for (const int64_t tile_bytes : {int64_t{1}, int64_t{5000}, int64_t{1} << 20}) {
    SCOPED_TRACE(tile_bytes);
    const LogitStats stats = ComputeLogitStats(h, w, at::Tensor(), labels, tile_bytes, {}, true);
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
  // ComputeLogitStats takes the tiled path here, whatever the budget.
  const LogitStats stats = ComputeLogitStats(h, w, at::Tensor(), labels, int64_t{1} << 20);
  EXPECT_TRUE(at::isfinite(stats.lse).all().item<bool>());
}

// Every token count gets tiles within the budget whose vocabulary slices are the whole
// vocabulary or whole multiples of 128 columns (aligned GEMM rows), as far as the budget allows.
TEST(LogitStatsTest, TileColumnsAreAlignedAndWithinBudget) {
  for (const int64_t vocab : {int64_t{1000}, int64_t{50304 + 3}, int64_t{128256}}) {
    for (const int64_t tile_bytes : {int64_t{4096} + 97, int64_t{8} << 20, int64_t{1} << 30}) {
      for (int64_t tokens = 1; tokens <= 9000; tokens += 97) {
        SCOPED_TRACE(testing::Message()
                     << "V=" << vocab << " budget=" << tile_bytes << " N=" << tokens);
        const LogitTileShape shape = LogitTiling(tokens, vocab, 2, tile_bytes);
        EXPECT_GE(shape.token_rows, 1);
        EXPECT_LE(shape.token_rows, std::max<int64_t>(tokens, 1));
        EXPECT_GE(shape.vocab_columns, 1);
        EXPECT_LE(shape.vocab_columns, vocab);
        if (shape.token_rows * shape.vocab_columns > 1) {
          EXPECT_LE(shape.token_rows * shape.vocab_columns * 2, tile_bytes);
        }
        if (shape.vocab_columns < vocab && tile_bytes / 2 / shape.token_rows >= 128) {
          EXPECT_EQ(shape.vocab_columns % 128, 0) << shape.vocab_columns;
        }
      }
    }
  }
}

}  // namespace
}  // namespace lmhead

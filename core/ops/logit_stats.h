// The per-token statistics behind fused_linear: log-sum-exp and label logit of h W^T (+ b),
// computed without ever holding the whole logits. On Hopper (bf16, fp16, rows of h up to 4 KiB)
// one fused GEMM reduces each tile of logits in registers
// (core/ops/cuda/fused_logit_stats_cuda.h); elsewhere a GEMM per
// tile into a buffer, then an epilogue that folds the tile into the statistics: the kernel in
// core/ops/cuda for CUDA tensors (--config=cuda builds), ATen (core/ops/cpu) for other devices.
#ifndef LMHEAD_CORE_OPS_LOGIT_STATS_H_
#define LMHEAD_CORE_OPS_LOGIT_STATS_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>

namespace lmhead {

// How the (tokens x vocabulary) logits are tiled: tiles of token_rows x vocab_columns, both at
// least 1, of at most `tile_bytes` at `bytes_per_logit`; vocab_columns is the whole vocabulary
// or a multiple of 128 (unless the budget allows fewer than 128 columns).
struct LogitTileShape {
  int64_t token_rows = 1;
  int64_t vocab_columns = 1;
};
LogitTileShape LogitTiling(int64_t num_tokens, int64_t vocab_size, int64_t bytes_per_logit,
                           int64_t tile_bytes);

// Walks the logits h W^T (+ b) of h (N, D), weight (V, D) of one dtype and bias (V,) or
// undefined, in tiles of LogitTiling(N, V, h's element size + working_bytes_per_logit,
// tile_bytes)'s shape: token slices in order, each with its vocabulary slices in increasing
// column order. Each tile is formed in h's dtype in one reused buffer, a contiguous (rows, cols)
// view of its front, and passed to `fold(logits, v0)` (v0: its first column);
// `begin_rows(t0, rows)`, when set, runs before a token slice's first tile; `between_tiles`,
// when set, before each tile (either may throw to abandon the work). May throw c10::Error.
void ForEachLogitTile(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                      int64_t working_bytes_per_logit, int64_t tile_bytes,
                      const std::function<void()>& between_tiles,
                      const std::function<void(int64_t t0, int64_t rows)>& begin_rows,
                      const std::function<void(const at::Tensor& logits, int64_t v0)>& fold);

// (N,) each.
struct LogitStats {
  at::Tensor lse;          // log-sum-exp over the vocabulary, in fp32
  at::Tensor label_logit;  // the logit of the token's label, in fp32
  // int64 vocabulary id of the largest logit, as torch.argmax picks it (NaN above every number,
  // the lowest id among equals); undefined unless asked for.
  at::Tensor argmax;
};

// A running argmax over vocabulary tiles that come in increasing column order: (N,) fp32 best
// values (start at -inf) and (N,) int64 their vocabulary ids (start at INT64_MAX).
struct RunningArgmax {
  at::Tensor value;
  at::Tensor index;
};

// h (N, D) and weight (V, D) of one dtype, bias (V,) or undefined, safe_labels (N,) int64 in
// [0, V) (ignored tokens hold any valid id). The logits are formed in h's dtype, and at most
// `tile_bytes` of logits, their working copies or partial statistics exist at any time. May throw
// c10::Error.
// `between_tiles`, when set, runs before each tile (it may throw to abandon the work).
// `with_argmax` also fills LogitStats::argmax.
// ComputeLogitStatsFusedGemm where FusedGemmApplies, rows of h are at most 4 KiB (where it was
// measured faster on both Hopper cards) and tile_bytes allows it; ComputeLogitStatsTiled
// elsewhere. Why: docs/notes/fused_gemm_dispatch.md.
LogitStats ComputeLogitStats(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& safe_labels, int64_t tile_bytes,
                             const std::function<void()>& between_tiles = {},
                             bool with_argmax = false);

// The same by tiles: AccumulateLogitStats on every tile of ForEachLogitTile.
LogitStats ComputeLogitStatsTiled(const at::Tensor& h, const at::Tensor& weight,
                                  const at::Tensor& bias, const at::Tensor& safe_labels,
                                  int64_t tile_bytes,
                                  const std::function<void()>& between_tiles = {},
                                  bool with_argmax = false);

// The scoring pass's fold of one tile of logits (rows, cols), vocabulary columns from col0, on
// a CUDA device: one kernel (core/ops/cuda/logit_stats_cuda.h, AccumulateScoringStats) updates
// the rows' fp32 max, sum and weighted (the online log-sum-exp and entropy terms, relative to
// the max, or to 0 while it is -inf), label_logit, and with `threshold` and `above` (both or
// neither) the int64 count of logits above the label's, and with `argmax` the running argmax.
// Every state tensor is contiguous, (rows,), on the tile's device. Returns false, having done
// nothing, where the kernel does not run (not a CUDA tensor, or a build without CUDA). May throw
// c10::Error.
// Whether AccumulateScoringStats runs for tiles of logits on `h`'s device.
bool ScoringKernelApplies(const at::Tensor& h);
bool AccumulateScoringStats(const at::Tensor& logits, int64_t col0, const at::Tensor& safe_labels,
                            const at::Tensor& threshold, at::Tensor& max, at::Tensor& sum,
                            at::Tensor& weighted, at::Tensor& label_logit, at::Tensor& above,
                            RunningArgmax* argmax);

// The scoring pass's running top-k over tiles of logits (rows, cols), vocabulary columns from
// col0, on a CUDA device (core/ops/cuda/logit_stats_cuda.h, AccumulateTopK): `values` (rows, k)
// fp32 and `ids` (rows, k) int64, contiguous, each row best first by torch.argmax's order (NaN
// first, then the larger logit, then the lower id); empty slots hold (-inf, INT64_MAX), which is
// how they start. k from 1 to 64. Returns false, having done nothing, where the kernel does not
// run (as AccumulateScoringStats). May throw c10::Error.
bool AccumulateTopK(const at::Tensor& logits, int64_t col0, at::Tensor& values, at::Tensor& ids);

// Whether the fused GEMM can run: a --config=cuda build, CUDA tensors of bf16 or fp16 on a
// compute capability 9.0 device, no bias, and operands TMA can read (D a multiple of 8, 16-byte
// aligned rows).
bool FusedGemmApplies(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias);

// The smallest tile_bytes ComputeLogitStatsFusedGemm takes: one 128-token slice of partials.
int64_t FusedGemmMinTileBytes(int64_t vocab_size, bool with_argmax, bool with_scoring = false);

// Whether ComputeLogitStats (and the scoring pass) take the fused GEMM: FusedGemmApplies, rows of
// h of at most 4 KiB (where it was measured faster than the tiled path on both Hopper cards,
// docs/notes/fused_gemm_dispatch.md) and tile_bytes >= FusedGemmMinTileBytes.
bool FusedGemmPreferred(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                        int64_t tile_bytes, bool with_argmax, bool with_scoring = false);

// The scoring terms the fused GEMM adds (core/ops/cuda/fused_logit_stats_cuda.h,
// FusedScoringTerms): given `threshold`, (N,) fp32 (the label's logit computed before the GEMM,
// rounded as the GEMM rounds it) or undefined, it fills `entropy` (N,) fp32 and, with a
// threshold, `above` (N,) int64: the logits above the label's.
struct FusedGemmScoring {
  at::Tensor threshold;
  at::Tensor entropy;
  at::Tensor above;
};

// The same by one fused GEMM per slice of tokens (core/ops/cuda/fused_logit_stats_cuda.h: no
// logits in memory; the partials of a slice fit in tile_bytes), with the scoring terms when
// `scoring` is given. Requires FusedGemmApplies (no bias) and tile_bytes >=
// FusedGemmMinTileBytes; throws c10::Error otherwise.
LogitStats ComputeLogitStatsFusedGemm(const at::Tensor& h, const at::Tensor& weight,
                                      const at::Tensor& safe_labels, int64_t tile_bytes,
                                      const std::function<void()>& between_tiles = {},
                                      bool with_argmax = false,
                                      FusedGemmScoring* scoring = nullptr);

// One tile: logits (rows, cols) in the input dtype, vocabulary columns [col0, col0 + cols), unit
// column stride; lse and label_logit (rows,) fp32 views updated in place: lse <- logaddexp(lse,
// logsumexp(row)), label_logit <- the row's label logit where the label lies in this tile;
// `argmax`, when given, (rows,) views updated with the tile's best. On CUDA it runs on the
// current stream of the logits' device. May throw c10::Error.
void AccumulateLogitStats(const at::Tensor& logits, int64_t col0, const at::Tensor& safe_labels,
                          at::Tensor& lse, at::Tensor& label_logit,
                          RunningArgmax* argmax = nullptr);

}  // namespace lmhead

#endif  // LMHEAD_CORE_OPS_LOGIT_STATS_H_

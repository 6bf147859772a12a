#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/ops/cuda/fused_logit_stats_cuda.h"
#include "core/ops/cuda/softmax_state.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace lmhead::cuda {
namespace {

// The GEMM's schedule: a ping-pong kernel. Each of two consumer warpgroups owns a 128 x 128 tile,
// and one's epilogue runs while the other's MMAs do, so the epilogue costs no tensor-core time;
// clusters of two tiles along the vocabulary share each h tile's load (TMA multicast). When this
// kernel runs: docs/notes/fused_gemm_dispatch.md; why not the cooperative kernel:
// docs/notes/benchmark_history.md.
using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
constexpr int kTileColumns = decltype(cute::size<1>(TileShape{}))::value;

// Where the epilogue leaves each (vocabulary tile, row)'s partial state: arrays indexed
// [tile * tile_stride + row].
struct Partials {
  float* max;            // the row's largest logit in the tile (fmaxf: NaN-blind, as MaxSum)
  float* sum;            // sum over the tile of exp(logit - max)
  float* best_value;     // the tile's argmax value (argmax only)
  int32_t* best_column;  // and its vocabulary column
  float* weighted;       // scoring: sum over the tile of exp(logit - max) * (logit - max)
  int32_t* above;        // scoring, with thresholds: the tile's logits above the threshold
  int64_t tile_stride;
};

// A CUTLASS collective epilogue (the interface of epilogue::collective::DefaultEpilogue, wrapped
// by Sm90TmaWarpSpecializedAdapter) that writes no tensor: each row's logits in the tile, rounded
// to Element, become one Partials entry, and the label's logit is stored where the label's
// column lies in the tile. kScoring (with kArgmax) adds the entropy's term and, given
// thresholds, the count of logits above the label's: the label's own logit in the tile that
// holds its column, the threshold (computed before the GEMM) in the others.
template <class Element, bool kArgmax, bool kScoring>
class TileStatsEpilogue {
  static_assert(kArgmax || !kScoring, "the scoring epilogue computes the argmax too");

 public:
  // Aliases that CUTLASS's kernel and device adapter read; there is no C or D tensor.
  using ElementC = Element;
  using ElementD = Element;
  using ElementOutput = Element;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using StrideC = cute::Stride<int64_t, cute::_1, int64_t>;
  using StrideD = StrideC;
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<Element, 1, float, float>;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  using EpilogueSchedule = cutlass::epilogue::NoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;

  struct SharedStorage {};
  using TensorStorage = SharedStorage;

  struct Arguments {
    const int64_t* labels = nullptr;
    float* label_logit = nullptr;
    Partials partials = {};
    const float* threshold = nullptr;  // scoring: per row; null: no count
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(const ProblemShape&, const Arguments& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(const ProblemShape&, const Arguments&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(const ProblemShape&, const Arguments&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(const ProblemShape&, const Arguments&) {
    return true;
  }

  CUTLASS_HOST_DEVICE explicit TileStatsEpilogue(const Params& params,
                                                 const SharedStorage& = SharedStorage())
      : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  // An accumulator rounded to Element (to nearest even), as a GEMM into Element stores it.
  static CUTLASS_DEVICE float Rounded(float x) {
    if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
      return __bfloat162float(__float2bfloat16_rn(x));
    } else {
      return __half2float(__float2half_rn(x));
    }
  }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 const cute::Tensor<FrgEngine, FrgLayout>& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using cute::get;
    using cute::make_coord;
    const int rows = get<0>(problem_shape_mnkl);
    const int vocab = get<1>(problem_shape_mnkl);
    const int row0 = get<0>(blk_coord_mnkl) * cute::size<0>(blk_shape_mnk);
    const int tile = get<1>(blk_coord_mnkl);
    const int col0 = tile * cute::size<1>(blk_shape_mnk);
    // A cluster may reach past the last vocabulary tile; that tile has no partials to write.
    if (col0 >= vocab) return;
    // The (row, column) inside the tile of each accumulator this thread holds.
    const auto coords =
        tiled_mma.get_thread_slice(thread_idx)
            .partition_C(cute::make_identity_tensor(cute::take<0, 2>(blk_shape_mnk)));
    // Hopper's wgmma accumulators: ((2 adjacent columns, 2 rows 8 apart, column groups 8
    // apart), MMA_M, MMA_N); the four lanes of a quad hold one row's columns between them.
    static_assert(decltype(cute::size<0, 0>(FrgLayout{}))::value == 2 &&
                      decltype(cute::size<0, 1>(FrgLayout{}))::value == 2,
                  "unexpected accumulator layout");
    constexpr int kMmaM = decltype(cute::size<1>(FrgLayout{}))::value;
    const bool whole_tile = col0 + cute::size<1>(blk_shape_mnk) <= vocab;
    // The rows are folded in place: the adapter's store() holds its own copy of the accumulators,
    // dead after this call, so rounding them where they are saves a row's worth of registers.
    auto& values = const_cast<cute::Tensor<FrgEngine, FrgLayout>&>(accumulators);
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < kMmaM; ++m) {
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < 2; ++r) {
        if (whole_tile) {
          FoldRow<true>(values, coords, m, r, rows, vocab, row0, col0, tile, thread_idx);
        } else {
          FoldRow<false>(values, coords, m, r, rows, vocab, row0, col0, tile, thread_idx);
        }
      }
    }
  }

 private:
  // One row's values in this thread, in increasing column order: (column pair c, group g, MMA
  // tile n) for row r of MMA tile m.
  template <class Layout>
  static constexpr int kPerRow =
      decltype(cute::size<0, 2>(Layout{}))::value * 2 * decltype(cute::size<2>(Layout{}))::value;

  template <bool kWholeTile, class FrgEngine, class FrgLayout, class Coords>
  CUTLASS_DEVICE void FoldRow(cute::Tensor<FrgEngine, FrgLayout>& values, const Coords& coords,
                              int m, int r, int rows, int vocab, int row0, int col0, int tile,
                              int thread_idx) {
    using cute::get;
    using cute::make_coord;
    constexpr int kGroups = decltype(cute::size<0, 2>(FrgLayout{}))::value;
    constexpr int kMmaN = decltype(cute::size<2>(FrgLayout{}))::value;
    constexpr int kCount = kPerRow<FrgLayout>;
    const auto at = [](int k, int m, int r) {
      return make_coord(make_coord(k % 2, r, (k / 2) % kGroups), m, k / (2 * kGroups));
    };
    const int row = row0 + get<0>(coords(at(0, m, r)));
    const bool in_rows = row < rows;
    const int64_t label = in_rows ? params_.labels[row] : -1;
    // The logits rounded to Element, -inf past the vocabulary; the label's, where this thread
    // holds its column.
    const auto x = [&](int k) -> float& { return values(at(k, m, r)); };
    float label_value = 0.f;
    bool holds_label = false;
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < kCount; ++k) {
      x(k) = Rounded(x(k));
      const int col = col0 + get<1>(coords(at(k, m, r)));
      if (!kWholeTile && col >= vocab) x(k) = -INFINITY;
      if (col == label) {
        label_value = x(k);
        holds_label = true;
      }
    }
    if (holds_label) params_.label_logit[row] = label_value;
    // Max and sum of exp(x - max), four independent chains for instruction-level parallelism.
    constexpr int kChains = 4;
    static_assert(kCount % kChains == 0, "row values per thread");
    float hi_chain[kChains];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kChains; ++j) hi_chain[j] = x(j);
    CUTLASS_PRAGMA_UNROLL
    for (int k = kChains; k < kCount; ++k)
      hi_chain[k % kChains] = fmaxf(hi_chain[k % kChains], x(k));
    float hi = fmaxf(fmaxf(hi_chain[0], hi_chain[1]), fmaxf(hi_chain[2], hi_chain[3]));
    float sum = 0.f;
    float weighted = 0.f;  // scoring
    if (hi != -INFINITY) {
      constexpr float kLog2e = 1.4426950408889634f;
      const float offset = -hi * kLog2e;
      float sum_chain[kChains] = {0.f, 0.f, 0.f, 0.f};
      float weighted_chain[kChains] = {0.f, 0.f, 0.f, 0.f};
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kCount; ++k) {
        const float term = Exp2(fmaf(x(k), kLog2e, offset));
        sum_chain[k % kChains] += term;
        if constexpr (kScoring) {
          // A -inf logit adds 0, not 0 * -inf.
          if (x(k) != -INFINITY) {
            weighted_chain[k % kChains] = fmaf(term, x(k) - hi, weighted_chain[k % kChains]);
          }
        }
      }
      sum = (sum_chain[0] + sum_chain[1]) + (sum_chain[2] + sum_chain[3]);
      weighted = (weighted_chain[0] + weighted_chain[1]) + (weighted_chain[2] + weighted_chain[3]);
    }
    int above = 0;  // scoring, with thresholds
    if constexpr (kScoring) {
      if (params_.threshold != nullptr) {
        // The label's logit where one of the quad's lanes holds its column.
        bool quad_holds = holds_label;
        float quad_label = label_value;
        CUTLASS_PRAGMA_UNROLL
        for (int offset = 1; offset < 4; offset *= 2) {
          const bool other_holds = __shfl_xor_sync(0xffffffff, quad_holds, offset);
          const float other_label = __shfl_xor_sync(0xffffffff, quad_label, offset);
          if (other_holds && !quad_holds) {
            quad_holds = true;
            quad_label = other_label;
          }
        }
        const float threshold =
            quad_holds ? quad_label : (in_rows ? params_.threshold[row] : INFINITY);
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < kCount; ++k) above += x(k) > threshold ? 1 : 0;
      }
    }
    Best best{-INFINITY, INT64_MAX};
    if constexpr (kArgmax) {
      // The first column holding the max; a NaN anywhere (then the sum is NaN) makes the first
      // NaN the argmax, found by the general rule.
      int first = 0;
      if (!isnan(sum)) {
        CUTLASS_PRAGMA_UNROLL
        for (int k = kCount - 1; k >= 0; --k) first = x(k) == hi ? k : first;
        best = {hi, col0 + get<1>(coords(at(first, m, r)))};
      } else {
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < kCount; ++k) Consider(best, x(k), col0 + get<1>(coords(at(k, m, r))));
      }
      if (!kWholeTile && best.column >= vocab) best = {-INFINITY, INT64_MAX};
    }
    MaxSum state{hi, sum};
    MaxSumWeighted scored{hi, sum, weighted};  // scoring
    CUTLASS_PRAGMA_UNROLL
    for (int offset = 1; offset < 4; offset *= 2) {
      if constexpr (kScoring) {
        scored = Merge(scored, MaxSumWeighted{__shfl_xor_sync(0xffffffff, scored.m, offset),
                                              __shfl_xor_sync(0xffffffff, scored.s, offset),
                                              __shfl_xor_sync(0xffffffff, scored.w, offset)});
        above += __shfl_xor_sync(0xffffffff, above, offset);
      } else {
        state = Merge(state, MaxSum{__shfl_xor_sync(0xffffffff, state.m, offset),
                                    __shfl_xor_sync(0xffffffff, state.s, offset)});
      }
      if constexpr (kArgmax) {
        const float value = __shfl_xor_sync(0xffffffff, best.value, offset);
        const int64_t column = __shfl_xor_sync(0xffffffff, best.column, offset);
        Consider(best, value, column);
      }
    }
    if (in_rows && thread_idx % 4 == 0) {
      const Partials& p = params_.partials;
      const int64_t i = tile * p.tile_stride + row;
      if constexpr (kScoring) {
        p.max[i] = scored.m;
        p.sum[i] = scored.s;
        p.weighted[i] = scored.w;
        if (params_.threshold != nullptr) p.above[i] = above;
      } else {
        p.max[i] = state.m;
        p.sum[i] = state.s;
      }
      if constexpr (kArgmax) {
        p.best_value[i] = best.value;
        p.best_column[i] = static_cast<int32_t>(best.column);
      }
    }
  }

  // 2^x by the multi-function unit (ex2.approx, flushing denormals), as __expf uses it.
  static CUTLASS_DEVICE float Exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }

  Params params_;
};

template <class Element, bool kArgmax, bool kScoring>
struct FusedGemm {
  using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      TileStatsEpilogue<Element, kArgmax, kScoring>>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, 8,
      Element, cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename TileStatsEpilogue<Element, kArgmax, kScoring>::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop,
                                                      Epilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// Merges the partials of `tiles` vocabulary tiles: a block holds 32 rows (threadIdx.x) and 8
// slices of the tiles (threadIdx.y), merged at the end through shared memory.
constexpr int kMergeRows = 32;
constexpr int kMergeSlices = 8;

// The scoring outputs of the merge (kScoring): null pointers are not written.
struct ScoringOut {
  float* entropy;
  int64_t* above;  // with thresholds
};

template <bool kArgmax, bool kScoring>
__global__ void __launch_bounds__(kMergeRows* kMergeSlices)
    MergeTilesKernel(Partials partials, int tiles, int64_t rows, float* __restrict__ lse,
                     int64_t* __restrict__ argmax, ScoringOut scoring) {
  __shared__ MaxSumWeighted states[kMergeSlices][kMergeRows];
  __shared__ Best bests[kMergeSlices][kMergeRows];
  __shared__ int64_t aboves[kMergeSlices][kMergeRows];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRows + threadIdx.x;
  // Without scoring, w stays 0 and Merge's extra terms are 0.
  MaxSumWeighted state{-INFINITY, 0.f, 0.f};
  Best best{-INFINITY, INT64_MAX};
  int64_t above = 0;
  if (row < rows) {
    for (int tile = threadIdx.y; tile < tiles; tile += kMergeSlices) {
      const int64_t at = tile * partials.tile_stride + row;
      if constexpr (kScoring) {
        state =
            Merge(state, MaxSumWeighted{partials.max[at], partials.sum[at], partials.weighted[at]});
        if (scoring.above != nullptr) above += partials.above[at];
      } else {
        const MaxSum merged =
            Merge(MaxSum{state.m, state.s}, MaxSum{partials.max[at], partials.sum[at]});
        state = {merged.m, merged.s, 0.f};
      }
      if constexpr (kArgmax) Consider(best, partials.best_value[at], partials.best_column[at]);
    }
  }
  states[threadIdx.y][threadIdx.x] = state;
  if constexpr (kArgmax) bests[threadIdx.y][threadIdx.x] = best;
  if constexpr (kScoring) aboves[threadIdx.y][threadIdx.x] = above;
  __syncthreads();
  if (threadIdx.y != 0 || row >= rows) return;
  for (int slice = 1; slice < kMergeSlices; ++slice) {
    if constexpr (kScoring) {
      state = Merge(state, states[slice][threadIdx.x]);
      above += aboves[slice][threadIdx.x];
    } else {
      const MaxSum merged = Merge(MaxSum{state.m, state.s}, MaxSum{states[slice][threadIdx.x].m,
                                                                   states[slice][threadIdx.x].s});
      state = {merged.m, merged.s, 0.f};
    }
    if constexpr (kArgmax) {
      const Best other = bests[slice][threadIdx.x];
      Consider(best, other.value, other.column);
    }
  }
  lse[row] = state.m == -INFINITY ? -INFINITY : state.m + __logf(state.s);
  if constexpr (kArgmax) {
    if (argmax != nullptr) argmax[row] = best.column;
  }
  if constexpr (kScoring) {
    // -sum p log p = log(s) - w / s (NaN for a row of only -inf logits, as 0 / 0).
    if (scoring.entropy != nullptr) scoring.entropy[row] = logf(state.s) - state.w / state.s;
    if (scoring.above != nullptr) scoring.above[row] = above;
  }
}

int64_t NumTiles(int64_t vocab) { return (vocab + kTileColumns - 1) / kTileColumns; }

template <class Element, bool kArgmax, bool kScoring>
cudaError_t Run(const void* h, int64_t h_row_stride, const void* weight, int64_t weight_row_stride,
                int64_t rows, int64_t vocab, int64_t dim, const int64_t* labels, float* lse,
                float* label_logit, int64_t* argmax, const FusedScoringTerms* scoring,
                void* scratch, int sm_count, cudaStream_t stream) {
  using Gemm = typename FusedGemm<Element, kArgmax, kScoring>::Gemm;
  const int64_t tiles = NumTiles(vocab);
  const int64_t partial_count = tiles * rows;
  Partials partials;
  partials.tile_stride = rows;
  partials.max = static_cast<float*>(scratch);
  partials.sum = partials.max + partial_count;
  if constexpr (kArgmax) {
    partials.best_value = partials.sum + partial_count;
    partials.best_column = reinterpret_cast<int32_t*>(partials.best_value + partial_count);
  }
  ScoringOut scoring_out{nullptr, nullptr};
  const float* threshold = nullptr;
  if constexpr (kScoring) {
    partials.weighted = reinterpret_cast<float*>(partials.best_column + partial_count);
    partials.above = reinterpret_cast<int32_t*>(partials.weighted + partial_count);
    threshold = scoring->threshold;
    scoring_out = {scoring->entropy, threshold != nullptr ? scoring->above : nullptr};
  }
  int device = 0;
  if (const cudaError_t error = cudaGetDevice(&device); error != cudaSuccess) return error;
  typename Gemm::GemmKernel::StrideA stride_a{h_row_stride, cute::_1{}, rows * h_row_stride};
  typename Gemm::GemmKernel::StrideB stride_b{weight_row_stride, cute::_1{},
                                              vocab * weight_row_stride};
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device;
  hw_info.sm_count = sm_count;
  typename Gemm::Arguments arguments{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(rows), static_cast<int>(vocab), static_cast<int>(dim), 1},
      {static_cast<const Element*>(h), stride_a, static_cast<const Element*>(weight), stride_b},
      {labels, label_logit, partials, threshold},
      hw_info};
  Gemm gemm;
  if (gemm.can_implement(arguments) != cutlass::Status::kSuccess ||
      Gemm::get_workspace_size(arguments) != 0) {
    return cudaErrorInvalidValue;
  }
  if (gemm.initialize(arguments, nullptr, stream) != cutlass::Status::kSuccess ||
      gemm.run(stream) != cutlass::Status::kSuccess) {
    const cudaError_t error = cudaGetLastError();
    return error != cudaSuccess ? error : cudaErrorLaunchFailure;
  }
  const dim3 block(kMergeRows, kMergeSlices);
  const auto blocks = static_cast<unsigned>((rows + kMergeRows - 1) / kMergeRows);
  MergeTilesKernel<kArgmax, kScoring><<<blocks, block, 0, stream>>>(
      partials, static_cast<int>(tiles), rows, lse, argmax, scoring_out);
  return cudaGetLastError();
}

}  // namespace

bool FusedLogitStatsSupported(LogitType type, int major, int minor, int64_t dim, const void* h,
                              int64_t h_row_stride, const void* weight, int64_t weight_row_stride) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return (type == LogitType::kBFloat16 || type == LogitType::kFloat16) && major == 9 &&
         minor == 0 && dim > 0 && dim % 8 == 0 && h_row_stride % 8 == 0 &&
         weight_row_stride % 8 == 0 && aligned(h) && aligned(weight);
}

int64_t FusedLogitStatsScratchBytesPerRow(int64_t vocab, bool with_argmax, bool with_scoring) {
  return NumTiles(vocab) * (with_scoring ? 24 : with_argmax ? 16 : 8);
}

cudaError_t FusedLogitStats(const void* h, int64_t h_row_stride, const void* weight,
                            int64_t weight_row_stride, LogitType type, int64_t rows, int64_t vocab,
                            int64_t dim, const int64_t* labels, float* lse, float* label_logit,
                            int64_t* argmax, void* scratch, int sm_count, cudaStream_t stream,
                            const FusedScoringTerms* scoring) {
  if (rows == 0) return cudaSuccess;
  if (rows > INT32_MAX || vocab > INT32_MAX || dim > INT32_MAX) return cudaErrorInvalidValue;
  // One instantiation per (dtype, outputs): losses, losses with the argmax, scoring (which
  // computes the argmax too and writes it where asked).
  const auto run = [&](auto element) {
    using Element = decltype(element);
    if (scoring != nullptr) {
      return Run<Element, true, true>(h, h_row_stride, weight, weight_row_stride, rows, vocab, dim,
                                      labels, lse, label_logit, argmax, scoring, scratch, sm_count,
                                      stream);
    }
    if (argmax != nullptr) {
      return Run<Element, true, false>(h, h_row_stride, weight, weight_row_stride, rows, vocab, dim,
                                       labels, lse, label_logit, argmax, nullptr, scratch, sm_count,
                                       stream);
    }
    return Run<Element, false, false>(h, h_row_stride, weight, weight_row_stride, rows, vocab, dim,
                                      labels, lse, label_logit, argmax, nullptr, scratch, sm_count,
                                      stream);
  };
  switch (type) {
    case LogitType::kBFloat16:
      return run(cutlass::bfloat16_t{});
    case LogitType::kFloat16:
      return run(cutlass::half_t{});
    case LogitType::kFloat32:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace lmhead::cuda

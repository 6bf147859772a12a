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

// The GEMM's schedule. The default, a ping-pong kernel: each of two consumer warpgroups owns a
// 128 x 128 tile, and one's epilogue runs while the other's MMAs do, so the epilogue costs no
// tensor-core time; clusters of two tiles along the vocabulary share each h tile's load (TMA
// multicast). LMHEAD_FUSED_SCHEDULE=0 builds the cooperative kernel instead (two warpgroups on one
// 128 x 256 tile, the tensor cores idle during its epilogue), kept for `tools/gpu/run.sh
// variants`, which times both (docs/BENCHMARKS.md).
#if !defined(LMHEAD_FUSED_SCHEDULE) || LMHEAD_FUSED_SCHEDULE == 1
using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
#else
using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
#endif
constexpr int kTileColumns = decltype(cute::size<1>(TileShape{}))::value;

// Where the epilogue leaves each (vocabulary tile, row)'s partial state: arrays indexed
// [tile * tile_stride + row].
struct Partials {
  float* max;            // the row's largest logit in the tile (fmaxf: NaN-blind, as MaxSum)
  float* sum;            // sum over the tile of exp(logit - max)
  float* best_value;     // the tile's argmax value (argmax only)
  int32_t* best_column;  // and its vocabulary column
  int64_t tile_stride;
};

// A CUTLASS collective epilogue (the interface of epilogue::collective::DefaultEpilogue, wrapped
// by Sm90TmaWarpSpecializedAdapter) that writes no tensor: each row's logits in the tile, rounded
// to Element, become one Partials entry, and the label's logit is stored where the label's
// column lies in the tile.
template <class Element, bool kArgmax>
class TileStatsEpilogue {
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
#ifdef LMHEAD_FUSED_EMPTY_EPILOGUE  // timing experiment: the GEMM alone, wrong results
    if (thread_idx >= 0) return;
#endif
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
    if (hi != -INFINITY) {
      constexpr float kLog2e = 1.4426950408889634f;
      const float offset = -hi * kLog2e;
      float sum_chain[kChains] = {0.f, 0.f, 0.f, 0.f};
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kCount; ++k) {
        sum_chain[k % kChains] += Exp2(fmaf(x(k), kLog2e, offset));
      }
      sum = (sum_chain[0] + sum_chain[1]) + (sum_chain[2] + sum_chain[3]);
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
    CUTLASS_PRAGMA_UNROLL
    for (int offset = 1; offset < 4; offset *= 2) {
      state = Merge(state, MaxSum{__shfl_xor_sync(0xffffffff, state.m, offset),
                                  __shfl_xor_sync(0xffffffff, state.s, offset)});
      if constexpr (kArgmax) {
        const float value = __shfl_xor_sync(0xffffffff, best.value, offset);
        const int64_t column = __shfl_xor_sync(0xffffffff, best.column, offset);
        Consider(best, value, column);
      }
    }
    if (in_rows && thread_idx % 4 == 0) {
      const Partials& p = params_.partials;
      const int64_t i = tile * p.tile_stride + row;
      p.max[i] = state.m;
      p.sum[i] = state.s;
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

template <class Element, bool kArgmax>
struct FusedGemm {
  using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      TileStatsEpilogue<Element, kArgmax>>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, 8,
      Element, cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename TileStatsEpilogue<Element, kArgmax>::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop,
                                                      Epilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// Merges the partials of `tiles` vocabulary tiles: a block holds 32 rows (threadIdx.x) and 8
// slices of the tiles (threadIdx.y), merged at the end through shared memory.
constexpr int kMergeRows = 32;
constexpr int kMergeSlices = 8;

template <bool kArgmax>
__global__ void __launch_bounds__(kMergeRows* kMergeSlices)
    MergeTilesKernel(Partials partials, int tiles, int64_t rows, float* __restrict__ lse,
                     int64_t* __restrict__ argmax) {
  __shared__ MaxSum states[kMergeSlices][kMergeRows];
  __shared__ Best bests[kMergeSlices][kMergeRows];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRows + threadIdx.x;
  MaxSum state{-INFINITY, 0.f};
  Best best{-INFINITY, INT64_MAX};
  if (row < rows) {
    for (int tile = threadIdx.y; tile < tiles; tile += kMergeSlices) {
      const int64_t at = tile * partials.tile_stride + row;
      state = Merge(state, MaxSum{partials.max[at], partials.sum[at]});
      if constexpr (kArgmax) Consider(best, partials.best_value[at], partials.best_column[at]);
    }
  }
  states[threadIdx.y][threadIdx.x] = state;
  if constexpr (kArgmax) bests[threadIdx.y][threadIdx.x] = best;
  __syncthreads();
  if (threadIdx.y != 0 || row >= rows) return;
  for (int slice = 1; slice < kMergeSlices; ++slice) {
    state = Merge(state, states[slice][threadIdx.x]);
    if constexpr (kArgmax) {
      const Best other = bests[slice][threadIdx.x];
      Consider(best, other.value, other.column);
    }
  }
  lse[row] = state.m == -INFINITY ? -INFINITY : state.m + __logf(state.s);
  if constexpr (kArgmax) argmax[row] = best.column;
}

int64_t NumTiles(int64_t vocab) { return (vocab + kTileColumns - 1) / kTileColumns; }

template <class Element, bool kArgmax>
cudaError_t Run(const void* h, int64_t h_row_stride, const void* weight, int64_t weight_row_stride,
                int64_t rows, int64_t vocab, int64_t dim, const int64_t* labels, float* lse,
                float* label_logit, int64_t* argmax, void* scratch, int sm_count,
                cudaStream_t stream) {
  using Gemm = typename FusedGemm<Element, kArgmax>::Gemm;
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
      {labels, label_logit, partials},
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
  MergeTilesKernel<kArgmax>
      <<<blocks, block, 0, stream>>>(partials, static_cast<int>(tiles), rows, lse, argmax);
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

int64_t FusedLogitStatsScratchBytesPerRow(int64_t vocab, bool with_argmax) {
  return NumTiles(vocab) * (with_argmax ? 16 : 8);
}

cudaError_t FusedLogitStats(const void* h, int64_t h_row_stride, const void* weight,
                            int64_t weight_row_stride, LogitType type, int64_t rows, int64_t vocab,
                            int64_t dim, const int64_t* labels, float* lse, float* label_logit,
                            int64_t* argmax, void* scratch, int sm_count, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > INT32_MAX || vocab > INT32_MAX || dim > INT32_MAX) return cudaErrorInvalidValue;
  const bool with_argmax = argmax != nullptr;
  switch (type) {
    case LogitType::kBFloat16:
      return with_argmax
                 ? Run<cutlass::bfloat16_t, true>(h, h_row_stride, weight, weight_row_stride, rows,
                                                  vocab, dim, labels, lse, label_logit, argmax,
                                                  scratch, sm_count, stream)
                 : Run<cutlass::bfloat16_t, false>(h, h_row_stride, weight, weight_row_stride, rows,
                                                   vocab, dim, labels, lse, label_logit, argmax,
                                                   scratch, sm_count, stream);
    case LogitType::kFloat16:
      return with_argmax ? Run<cutlass::half_t, true>(h, h_row_stride, weight, weight_row_stride,
                                                      rows, vocab, dim, labels, lse, label_logit,
                                                      argmax, scratch, sm_count, stream)
                         : Run<cutlass::half_t, false>(h, h_row_stride, weight, weight_row_stride,
                                                       rows, vocab, dim, labels, lse, label_logit,
                                                       argmax, scratch, sm_count, stream);
    case LogitType::kFloat32:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace lmhead::cuda

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "core/ops/cuda/logit_stats_cuda.h"
#include "core/ops/cuda/softmax_state.cuh"

namespace lmhead::cuda {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

// Which of a lane's 16-byte vectors holds its best value, tracked with a few operations per
// vector; the column inside it is found at the end by reading that one vector again. Vectors come
// in increasing column order: a larger maximum, or a first NaN, moves `vector`; an equal maximum
// keeps the earlier one, and after a NaN nothing moves it.
struct BestVector {
  float value;     // the largest value so far, NaN once one was seen
  int64_t vector;  // the first vector holding it (the lane's first vector while all are -inf)
};

template <int N>
__device__ __forceinline__ void Track(BestVector& best, const float (&x)[N], int64_t vector) {
  float hi = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) hi = MaxOrNaN(hi, x[k]);
  const bool moves = !(hi <= best.value) && !isnan(best.value);
  best.value = moves ? hi : best.value;
  best.vector = moves ? vector : best.vector;
}

// One warp per row, kWarps rows per block: each lane reads 16-byte vectors (after a scalar
// prologue up to the first 16-byte boundary), keeping kInFlight of them in flight, then the warp
// merges its lanes' (max, sum) pairs with shuffles; no block-wide barrier. kArgmax also finds
// each lane's best (value, column) and merges those the same way.
constexpr int kWarps = kThreads / 32;

template <typename T, bool kArgmax>
__global__ void __launch_bounds__(kThreads)
    AccumulateLogitStatsKernel(const T* __restrict__ logits, int64_t rows, int64_t cols,
                               int64_t row_stride, int64_t col0, const int64_t* __restrict__ labels,
                               float* __restrict__ lse, float* __restrict__ label_logit,
                               float* __restrict__ best_value, int64_t* __restrict__ best_index) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const T* x = logits + row * row_stride;
  MaxSum state{-INFINITY, 0.f};
  Best best{-INFINITY, INT64_MAX};  // no column yet

  constexpr int kVec = 16 / sizeof(T);
  constexpr int kInFlight = 8;
  struct alignas(16) Vec {
    T v[kVec];
  };
  const int64_t misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) % 16);
  const int64_t to_boundary =
      misalignment == 0 ? 0 : (16 - misalignment) / static_cast<int64_t>(sizeof(T));
  const int64_t head = to_boundary < cols ? to_boundary : cols;
  if (lane < head) {
    Add(state, ToFloat(x[lane]));
    if constexpr (kArgmax) Consider(best, ToFloat(x[lane]), lane);
  }
  const int64_t num_vecs = (cols - head) / kVec;
  const Vec* xv = reinterpret_cast<const Vec*>(x + head);
  BestVector best_vector{-INFINITY, lane};
  for (int64_t base = lane; base < num_vecs; base += 32 * kInFlight) {
    Vec loaded[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      if (base + u * 32 < num_vecs) loaded[u] = xv[base + u * 32];
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      if (base + u * 32 < num_vecs) {
        float values[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) values[k] = ToFloat(loaded[u].v[k]);
        AddMany(state, values);
        if constexpr (kArgmax) Track(best_vector, values, base + u * 32);
      }
    }
  }
  if constexpr (kArgmax) {
    if (lane < num_vecs) {
      const Vec again = xv[best_vector.vector];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        Consider(best, ToFloat(again.v[k]), head + best_vector.vector * kVec + k);
      }
    }
  }
  for (int64_t j = head + num_vecs * kVec + lane; j < cols; j += 32) {
    Add(state, ToFloat(x[j]));
    if constexpr (kArgmax) Consider(best, ToFloat(x[j]), j);
  }

#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    MaxSum other{__shfl_xor_sync(0xffffffff, state.m, offset),
                 __shfl_xor_sync(0xffffffff, state.s, offset)};
    state = Merge(state, other);
    if constexpr (kArgmax) {
      const float value = __shfl_xor_sync(0xffffffff, best.value, offset);
      const int64_t column = __shfl_xor_sync(0xffffffff, best.column, offset);
      Consider(best, value, column);
    }
  }
  if (lane == 0) {
    const float tile_lse = state.m == -INFINITY ? -INFINITY : state.m + __logf(state.s);
    const float old = lse[row];
    const float hi = fmaxf(old, tile_lse);
    lse[row] = hi == -INFINITY ? -INFINITY : hi + log1pf(__expf(fminf(old, tile_lse) - hi));
    const int64_t column = labels[row] - col0;
    if (column >= 0 && column < cols) label_logit[row] = ToFloat(x[column]);
    if constexpr (kArgmax) {
      const Best so_far{best_value[row], best_index[row]};
      if (Beats(best.value, col0 + best.column, so_far)) {
        best_value[row] = best.value;
        best_index[row] = col0 + best.column;
      }
    }
  }
}

// Online softmax state with the entropy's term, relative to the running max m (while m is -inf
// the sums are 0): s = sum exp(x - m), w = sum exp(x - m) (x - m).
struct EntropyState {
  float m;
  float s;
  float w;
};

// A NaN logit makes the state NaN for good (m too, so that merges keep it): as log_softmax, the
// row's sums are then NaN.
__device__ __forceinline__ void AddEntropy(EntropyState& state, float x) {
  if (isnan(x) || isnan(state.m)) {
    state = {NAN, NAN, NAN};
    return;
  }
  if (x == -INFINITY) return;
  if (x > state.m) {
    if (state.m == -INFINITY) {
      state = {x, 1.f, 0.f};
      return;
    }
    const float d = state.m - x;
    const float e = __expf(d);
    state.w = (state.w + d * state.s) * e;
    state.s = state.s * e + 1.f;
    state.m = x;
    return;
  }
  const float d = x - state.m;
  const float e = __expf(d);
  state.s += e;
  state.w += e * d;
}

__device__ __forceinline__ EntropyState MergeEntropy(EntropyState a, EntropyState b) {
  if (isnan(a.m) || isnan(b.m)) return {NAN, NAN, NAN};
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  const float da = a.m - m;
  const float db = b.m - m;
  const float ea = __expf(da);
  const float eb = __expf(db);
  return {m, a.s * ea + b.s * eb, (a.w + da * a.s) * ea + (b.w + db * b.s) * eb};
}

// One warp per row, as AccumulateLogitStatsKernel: each lane folds its columns into an
// EntropyState, counts those above the row's threshold and (kArgmax) tracks its best column;
// the warp merges them with shuffles and lane 0 merges the tile into the row's state.
template <typename T, bool kRank, bool kArgmax>
__global__ void __launch_bounds__(kThreads)
    AccumulateScoringStatsKernel(const T* __restrict__ logits, int64_t rows, int64_t cols,
                                 int64_t row_stride, int64_t col0,
                                 const int64_t* __restrict__ labels,
                                 const float* __restrict__ threshold, float* __restrict__ max,
                                 float* __restrict__ sum, float* __restrict__ weighted,
                                 float* __restrict__ label_logit, int64_t* __restrict__ above,
                                 float* __restrict__ best_value, int64_t* __restrict__ best_index) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const T* x = logits + row * row_stride;
  const int64_t label_column = labels[row] - col0;
  const bool label_here = label_column >= 0 && label_column < cols;
  float bar = 0.f;
  if constexpr (kRank) bar = label_here ? ToFloat(x[label_column]) : threshold[row];
  EntropyState state{-INFINITY, 0.f, 0.f};
  int64_t count = 0;
  Best best{-INFINITY, INT64_MAX};
  const auto fold = [&](float value, int64_t column) {
    AddEntropy(state, value);
    if constexpr (kRank) count += value > bar ? 1 : 0;
    if constexpr (kArgmax) Consider(best, value, column);
  };

  constexpr int kVec = 16 / sizeof(T);
  constexpr int kInFlight = 4;
  struct alignas(16) Vec {
    T v[kVec];
  };
  const int64_t misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) % 16);
  const int64_t to_boundary =
      misalignment == 0 ? 0 : (16 - misalignment) / static_cast<int64_t>(sizeof(T));
  const int64_t head = to_boundary < cols ? to_boundary : cols;
  if (lane < head) fold(ToFloat(x[lane]), lane);
  const int64_t num_vecs = (cols - head) / kVec;
  const Vec* xv = reinterpret_cast<const Vec*>(x + head);
  for (int64_t base = lane; base < num_vecs; base += 32 * kInFlight) {
    Vec loaded[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      if (base + u * 32 < num_vecs) loaded[u] = xv[base + u * 32];
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      if (base + u * 32 < num_vecs) {
        const int64_t first = head + (base + u * 32) * kVec;
#pragma unroll
        for (int k = 0; k < kVec; ++k) fold(ToFloat(loaded[u].v[k]), first + k);
      }
    }
  }
  for (int64_t j = head + num_vecs * kVec + lane; j < cols; j += 32) fold(ToFloat(x[j]), j);

#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const EntropyState other{__shfl_xor_sync(0xffffffff, state.m, offset),
                             __shfl_xor_sync(0xffffffff, state.s, offset),
                             __shfl_xor_sync(0xffffffff, state.w, offset)};
    state = MergeEntropy(state, other);
    if constexpr (kRank) count += __shfl_xor_sync(0xffffffff, count, offset);
    if constexpr (kArgmax) {
      const float value = __shfl_xor_sync(0xffffffff, best.value, offset);
      const int64_t column = __shfl_xor_sync(0xffffffff, best.column, offset);
      Consider(best, value, column);
    }
  }
  if (lane == 0) {
    // The row's state is relative to its max, or to 0 while that is -inf (its sums are 0 then).
    const float old_max = max[row];
    EntropyState merged = state;
    if (old_max != -INFINITY) {
      merged = MergeEntropy(EntropyState{old_max, sum[row], weighted[row]}, state);
    }
    if (merged.m != -INFINITY || old_max != -INFINITY) {
      max[row] = merged.m;
      sum[row] = merged.s;
      weighted[row] = merged.w;
    }
    if (label_here) label_logit[row] = ToFloat(x[label_column]);
    if constexpr (kRank) above[row] += count;
    if constexpr (kArgmax) {
      const Best so_far{best_value[row], best_index[row]};
      if (Beats(best.value, col0 + best.column, so_far)) {
        best_value[row] = best.value;
        best_index[row] = col0 + best.column;
      }
    }
  }
}

template <typename T, bool kRank>
void LaunchScoring(unsigned blocks, const T* logits, int64_t rows, int64_t cols, int64_t row_stride,
                   int64_t col0, const int64_t* labels, const float* threshold, float* max,
                   float* sum, float* weighted, float* label_logit, int64_t* above,
                   float* best_value, int64_t* best_index, cudaStream_t stream) {
  if (best_value != nullptr) {
    AccumulateScoringStatsKernel<T, kRank, true><<<blocks, kThreads, 0, stream>>>(
        logits, rows, cols, row_stride, col0, labels, threshold, max, sum, weighted, label_logit,
        above, best_value, best_index);
  } else {
    AccumulateScoringStatsKernel<T, kRank, false>
        <<<blocks, kThreads, 0, stream>>>(logits, rows, cols, row_stride, col0, labels, threshold,
                                          max, sum, weighted, label_logit, above, nullptr, nullptr);
  }
}

template <typename T>
cudaError_t LaunchScoring(const void* logits, int64_t rows, int64_t cols, int64_t row_stride,
                          int64_t col0, const int64_t* labels, const float* threshold, float* max,
                          float* sum, float* weighted, float* label_logit, int64_t* above,
                          float* best_value, int64_t* best_index, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if ((best_value == nullptr) != (best_index == nullptr) ||
      (above == nullptr) != (threshold == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const auto blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  const T* typed = static_cast<const T*>(logits);
  if (above != nullptr) {
    LaunchScoring<T, true>(blocks, typed, rows, cols, row_stride, col0, labels, threshold, max, sum,
                           weighted, label_logit, above, best_value, best_index, stream);
  } else {
    LaunchScoring<T, false>(blocks, typed, rows, cols, row_stride, col0, labels, threshold, max,
                            sum, weighted, label_logit, above, best_value, best_index, stream);
  }
  return cudaGetLastError();
}

// One warp per row keeps the row's top-k in shared memory, sorted best first; each round the
// lanes read 32 consecutive columns, and the few that beat the k-th entry are inserted one at a
// time (ballot, then the warp shifts the worse entries down by one).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    AccumulateTopKKernel(const T* __restrict__ logits, int64_t rows, int64_t cols,
                         int64_t row_stride, int64_t col0, int k, float* __restrict__ top_values,
                         int64_t* __restrict__ top_ids) {
  __shared__ float values[kWarps][kMaxTopK];
  __shared__ int64_t ids[kWarps][kMaxTopK];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;
  float* v = values[warp];
  int64_t* id = ids[warp];
  for (int j = lane; j < k; j += 32) {
    v[j] = top_values[row * k + j];
    id[j] = top_ids[row * k + j];
  }
  __syncwarp();
  Best worst{v[k - 1], id[k - 1]};
  const T* x = logits + row * row_stride;
  for (int64_t base = 0; base < cols; base += 32) {
    const int64_t j = base + lane;
    const float value = j < cols ? ToFloat(x[j]) : -INFINITY;
    const int64_t column = col0 + j;
    unsigned pending = __ballot_sync(0xffffffff, j < cols && Beats(value, column, worst));
    while (pending != 0) {
      const int source = __ffs(pending) - 1;
      pending &= pending - 1;
      const float cv = __shfl_sync(0xffffffff, value, source);
      const int64_t cc = __shfl_sync(0xffffffff, column, source);
      if (!Beats(cv, cc, worst)) continue;  // an earlier insertion raised the bar
      // Its place: the number of entries that beat it (an empty slot beats nothing).
      const Best candidate{cv, cc};
      const int place =
          __popc(__ballot_sync(0xffffffff, lane < k && Beats(v[lane], id[lane], candidate))) +
          __popc(__ballot_sync(0xffffffff,
                               lane + 32 < k && Beats(v[lane + 32], id[lane + 32], candidate)));
      // Entries from `place` move down one; the last falls off.
      float moved[2];
      int64_t moved_id[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int slot = lane + 32 * h;
        if (slot > place && slot < k) {
          moved[h] = v[slot - 1];
          moved_id[h] = id[slot - 1];
        }
      }
      __syncwarp();
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int slot = lane + 32 * h;
        if (slot > place && slot < k) {
          v[slot] = moved[h];
          id[slot] = moved_id[h];
        }
      }
      if (lane == 0) {
        v[place] = cv;
        id[place] = cc;
      }
      __syncwarp();
      worst = Best{v[k - 1], id[k - 1]};
    }
  }
  for (int j = lane; j < k; j += 32) {
    top_values[row * k + j] = v[j];
    top_ids[row * k + j] = id[j];
  }
}

template <typename T>
cudaError_t LaunchTopK(const void* logits, int64_t rows, int64_t cols, int64_t row_stride,
                       int64_t col0, int k, float* top_values, int64_t* top_ids,
                       cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (k < 1 || k > kMaxTopK) return cudaErrorInvalidValue;
  const auto blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  AccumulateTopKKernel<T><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(logits), rows, cols, row_stride, col0, k, top_values, top_ids);
  return cudaGetLastError();
}

template <typename T>
cudaError_t Launch(const void* logits, int64_t rows, int64_t cols, int64_t row_stride, int64_t col0,
                   const int64_t* labels, float* lse, float* label_logit, float* best_value,
                   int64_t* best_index, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if ((best_value == nullptr) != (best_index == nullptr)) return cudaErrorInvalidValue;
  const auto blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  const T* typed = static_cast<const T*>(logits);
  if (best_value != nullptr) {
    AccumulateLogitStatsKernel<T, true><<<blocks, kThreads, 0, stream>>>(
        typed, rows, cols, row_stride, col0, labels, lse, label_logit, best_value, best_index);
  } else {
    AccumulateLogitStatsKernel<T, false><<<blocks, kThreads, 0, stream>>>(
        typed, rows, cols, row_stride, col0, labels, lse, label_logit, nullptr, nullptr);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t AccumulateLogitStats(const void* logits, LogitType type, int64_t rows, int64_t cols,
                                 int64_t row_stride, int64_t col0, const int64_t* labels,
                                 float* lse, float* label_logit, float* best_value,
                                 int64_t* best_index, cudaStream_t stream) {
  switch (type) {
    case LogitType::kFloat32:
      return Launch<float>(logits, rows, cols, row_stride, col0, labels, lse, label_logit,
                           best_value, best_index, stream);
    case LogitType::kBFloat16:
      return Launch<__nv_bfloat16>(logits, rows, cols, row_stride, col0, labels, lse, label_logit,
                                   best_value, best_index, stream);
    case LogitType::kFloat16:
      return Launch<__half>(logits, rows, cols, row_stride, col0, labels, lse, label_logit,
                            best_value, best_index, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t AccumulateScoringStats(const void* logits, LogitType type, int64_t rows, int64_t cols,
                                   int64_t row_stride, int64_t col0, const int64_t* labels,
                                   const float* threshold, float* max, float* sum, float* weighted,
                                   float* label_logit, int64_t* above, float* best_value,
                                   int64_t* best_index, cudaStream_t stream) {
  switch (type) {
    case LogitType::kFloat32:
      return LaunchScoring<float>(logits, rows, cols, row_stride, col0, labels, threshold, max, sum,
                                  weighted, label_logit, above, best_value, best_index, stream);
    case LogitType::kBFloat16:
      return LaunchScoring<__nv_bfloat16>(logits, rows, cols, row_stride, col0, labels, threshold,
                                          max, sum, weighted, label_logit, above, best_value,
                                          best_index, stream);
    case LogitType::kFloat16:
      return LaunchScoring<__half>(logits, rows, cols, row_stride, col0, labels, threshold, max,
                                   sum, weighted, label_logit, above, best_value, best_index,
                                   stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t AccumulateTopK(const void* logits, LogitType type, int64_t rows, int64_t cols,
                           int64_t row_stride, int64_t col0, int k, float* top_values,
                           int64_t* top_ids, cudaStream_t stream) {
  switch (type) {
    case LogitType::kFloat32:
      return LaunchTopK<float>(logits, rows, cols, row_stride, col0, k, top_values, top_ids,
                               stream);
    case LogitType::kBFloat16:
      return LaunchTopK<__nv_bfloat16>(logits, rows, cols, row_stride, col0, k, top_values, top_ids,
                                       stream);
    case LogitType::kFloat16:
      return LaunchTopK<__half>(logits, rows, cols, row_stride, col0, k, top_values, top_ids,
                                stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lmhead::cuda

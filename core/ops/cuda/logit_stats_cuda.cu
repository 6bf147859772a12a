#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "core/ops/cuda/logit_stats_cuda.h"

namespace lmhead::cuda {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

// Online softmax state: running max m and sum s of exp(x - m).
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum Merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ void Add(MaxSum& state, float x) {
  if (x > state.m) {
    state.s = state.s * __expf(state.m - x) + 1.f;
    state.m = x;
  } else {
    state.s += __expf(x - state.m);
  }
}

// Adds n values: the running max moves at most once, then one exp per value.
template <int N>
__device__ __forceinline__ void AddMany(MaxSum& state, const float (&x)[N]) {
  float hi = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) hi = fmaxf(hi, x[k]);
  if (hi > state.m) {
    state.s *= __expf(state.m - hi);  // exp(-inf) = 0 on the first values
    state.m = hi;
  }
  if (state.m == -INFINITY) return;  // every value so far is -inf
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < N; ++k) sum += __expf(x[k] - state.m);
  state.s += sum;
}

// One block per row. Each thread reads 16-byte vectors when the row is aligned for them, then the
// block merges the threads' (max, sum) pairs.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    AccumulateLogitStatsKernel(const T* __restrict__ logits, int64_t cols, int64_t row_stride,
                               int64_t col0, const int64_t* __restrict__ labels,
                               float* __restrict__ lse, float* __restrict__ label_logit) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  MaxSum state{-INFINITY, 0.f};

  constexpr int kVec = 16 / sizeof(T);
  // Vectors each thread keeps in flight before using them: the loads, not the exps, set the pace.
  constexpr int kInFlight = 8;
  struct alignas(16) Vec {
    T v[kVec];
  };
  int64_t vec_end = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    const int64_t num_vecs = cols / kVec;
    vec_end = num_vecs * kVec;
    const Vec* xv = reinterpret_cast<const Vec*>(x);
    for (int64_t base = threadIdx.x; base < num_vecs; base += kThreads * kInFlight) {
      Vec loaded[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int64_t i = base + u * kThreads;
        if (i < num_vecs) loaded[u] = xv[i];
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        if (base + u * kThreads < num_vecs) {
          float values[kVec];
#pragma unroll
          for (int k = 0; k < kVec; ++k) values[k] = ToFloat(loaded[u].v[k]);
          AddMany(state, values);
        }
      }
    }
  }
  for (int64_t j = vec_end + threadIdx.x; j < cols; j += kThreads) Add(state, ToFloat(x[j]));

  // Warp, then block reduction of (m, s).
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    MaxSum other{__shfl_xor_sync(0xffffffff, state.m, offset),
                 __shfl_xor_sync(0xffffffff, state.s, offset)};
    state = Merge(state, other);
  }
  __shared__ MaxSum warp_states[kThreads / 32];
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) warp_states[warp] = state;
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSum total = warp_states[0];
    for (int w = 1; w < kThreads / 32; ++w) total = Merge(total, warp_states[w]);
    const float chunk_lse = total.m == -INFINITY ? -INFINITY : total.m + __logf(total.s);
    const float old = lse[row];
    const float hi = fmaxf(old, chunk_lse);
    lse[row] = hi == -INFINITY ? -INFINITY
                               : hi + log1pf(__expf(fminf(old, chunk_lse) - hi));
    const int64_t column = labels[row] - col0;
    if (column >= 0 && column < cols) label_logit[row] = ToFloat(x[column]);
  }
}

template <typename T>
cudaError_t Launch(const void* logits, int64_t rows, int64_t cols, int64_t row_stride,
                   int64_t col0, const int64_t* labels, float* lse, float* label_logit,
                   cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  AccumulateLogitStatsKernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), cols, row_stride, col0, labels, lse, label_logit);
  return cudaGetLastError();
}

}  // namespace

cudaError_t AccumulateLogitStats(const void* logits, LogitType type, int64_t rows, int64_t cols,
                                 int64_t row_stride, int64_t col0, const int64_t* labels,
                                 float* lse, float* label_logit, cudaStream_t stream) {
  switch (type) {
    case LogitType::kFloat32:
      return Launch<float>(logits, rows, cols, row_stride, col0, labels, lse, label_logit, stream);
    case LogitType::kBFloat16:
      return Launch<__nv_bfloat16>(logits, rows, cols, row_stride, col0, labels, lse,
                                   label_logit, stream);
    case LogitType::kFloat16:
      return Launch<__half>(logits, rows, cols, row_stride, col0, labels, lse, label_logit,
                            stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lmhead::cuda

// Per-row softmax and argmax state shared by the CUDA kernels behind fused_linear: device
// functions only, included by .cu files.
#ifndef LMHEAD_CORE_OPS_CUDA_SOFTMAX_STATE_CUH_
#define LMHEAD_CORE_OPS_CUDA_SOFTMAX_STATE_CUH_

#include <cmath>
#include <cstdint>

namespace lmhead::cuda {

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

// Online softmax state with the entropy's term: running max m, sum s of exp(x - m) and sum w of
// exp(x - m) * (x - m); -sum p log p = log(s) - w / s.
struct MaxSumWeighted {
  float m;
  float s;
  float w;
};

__device__ __forceinline__ MaxSumWeighted Merge(MaxSumWeighted a, MaxSumWeighted b) {
  MaxSumWeighted out{fmaxf(a.m, b.m), 0.f, 0.f};
  if (out.m == -INFINITY) return out;
  // Each side rescaled to the common max; a side of only -inf values adds nothing.
  const auto add = [&out](const MaxSumWeighted& x) {
    if (x.m == -INFINITY) return;
    const float shift = x.m - out.m;
    const float scale = __expf(shift);
    out.s += x.s * scale;
    out.w += (x.w + shift * x.s) * scale;
  };
  add(a);
  add(b);
  return out;
}

// Argmax state: the best value so far and its column, in torch.argmax's order: NaN above every
// number (the first NaN wins), then the larger value, then the lower column.
struct Best {
  float value;
  int64_t column;
};

__device__ __forceinline__ bool Beats(float value, int64_t column, const Best& best) {
  if (isnan(value)) return !isnan(best.value) || column < best.column;
  if (isnan(best.value)) return false;
  return value > best.value || (value == best.value && column < best.column);
}

__device__ __forceinline__ void Consider(Best& best, float value, int64_t column) {
  if (Beats(value, column, best)) best = {value, column};
}

// The larger of a and b, or NaN if either is NaN (PTX max.NaN, sm_80 and later).
__device__ __forceinline__ float MaxOrNaN(float a, float b) {
  float larger;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(larger) : "f"(a), "f"(b));
  return larger;
}

}  // namespace lmhead::cuda

#endif  // LMHEAD_CORE_OPS_CUDA_SOFTMAX_STATE_CUH_

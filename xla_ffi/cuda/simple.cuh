// The simple kernels' shared pieces (no shared memory, any K and s): flat output-point indices,
// window taps, row dot products and the per-point logits and stats of one warp.
#ifndef SAPA_JAX_XLA_FFI_CUDA_SIMPLE_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_SIMPLE_CUH_

#include "cuda/device.cuh"

namespace sapa::cuda {

// Index of the output point pt = ((b * oH + oy) * oW + ox) and its low-res centre.
struct FlatPoint {
  int64_t b;
  int oy, ox, Y, X;
};

__device__ __forceinline__ FlatPoint flat_point(int64_t pt, const Params& P) {
  FlatPoint f;
  f.ox = static_cast<int>(pt % P.oW);
  const int64_t rest = pt / P.oW;
  f.oy = static_cast<int>(rest % P.oH);
  f.b = rest / P.oH;
  f.Y = f.oy / P.s;
  f.X = f.ox / P.s;
  return f;
}

__device__ __forceinline__ bool tap_inside(int p, int Y, int X, const Params& P, int* y, int* x) {
  const int dy = p / P.K - P.r;
  *y = Y + dy;
  *x = X + (p - (p / P.K) * P.K) - P.r;
  return *y >= 0 && *y < P.H && *x >= 0 && *x < P.W;
}

template <typename T>
__device__ __forceinline__ float dot_rows(const T* __restrict__ a, const T* __restrict__ b,
                                          int n) {
  float s = 0.f;
  for (int c = 0; c < n; ++c) s = fmaf(to_f(a[c]), to_f(b[c]), s);
  return s;
}

// a . 0: 0, or NaN when the row holds a non-finite value (an out-of-map tap's product with the
// zero padding, sapa_common.h).
template <typename T>
__device__ __forceinline__ float zero_dot(const T* __restrict__ a, int n) {
  float s = 0.f;
  for (int c = 0; c < n; ++c) s = fmaf(to_f(a[c]), 0.f, s);
  return s;
}

// Logit of tap p of a point; `qzero` (zero_dot of q) outside the map, as the zeros border
// defines it.
template <typename T>
__device__ __forceinline__ float simple_logit(const T* __restrict__ qrow, const T* __restrict__ k,
                                              int p, const FlatPoint& f, const Params& P,
                                              float qzero, bool* inside) {
  int y, x;
  *inside = tap_inside(p, f.Y, f.X, P, &y, &x);
  return *inside ? dot_rows(qrow, k + pixel(f.b, y, x, P.H, P.W) * P.d, P.d) : qzero;
}

// Stats of a point computed by its warp: lanes take taps lane, lane + 32, ...
template <typename T>
__device__ __forceinline__ float2 simple_stats(const T* __restrict__ qrow,
                                               const T* __restrict__ k, const FlatPoint& f,
                                               float qzero, const Params& P) {
  const int lane = threadIdx.x & 31;
  float top = -INFINITY, sum = 0.f;
  if (P.normalizer == sapa::kSoftmax) {
    for (int p = lane; p < P.T; p += 32) {
      bool inside;
      const float x = simple_logit(qrow, k, p, f, P, qzero, &inside);
      if (sapa::tap_counted(P.border, inside)) top = sapa::nan_max(top, x);
    }
    top = warp_max(top);
    for (int p = lane; p < P.T; p += 32) {
      bool inside;
      const float x = simple_logit(qrow, k, p, f, P, qzero, &inside);
      if (sapa::tap_counted(P.border, inside)) sum += expf(x - top);
    }
    sum = warp_sum(sum);
  } else if (P.normalizer != sapa::kNone) {
    for (int p = lane; p < P.T; p += 32) {
      bool inside;
      const float x = simple_logit(qrow, k, p, f, P, qzero, &inside);
      if (sapa::tap_counted(P.border, inside)) sum += sapa::h_value(P.normalizer, x);
    }
    sum = warp_sum(sum);
  }
  float2 st;
  sapa::finish_stats<float>(P.normalizer, P.eps, top, sum, &st.x, &st.y);
  return st;
}

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_SIMPLE_CUH_

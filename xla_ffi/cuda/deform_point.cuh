// SAPA-D on CUDA (docs/design.md §6.4): the per-sample helpers of the three kernels
// (deform_forward.cuh, deform_backward_points.cuh, deform_backward_gather.cuh), on the shared
// cell and corner weights of deform_common.h and the element types and warp reductions of
// device.cuh.
//
// Warp-level helpers: every lane of the warp computes the same cell (the same two offset loads,
// the same operations), so every branch on the cell's kind is warp-uniform and the butterfly
// sums of device.cuh leave the bitwise same value in every lane. The lanes take the channels
// e = lane + 32 m of the group.
#ifndef SAPA_JAX_XLA_FFI_CUDA_DEFORM_POINT_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_DEFORM_POINT_CUH_

#include <cmath>
#include <cstdint>

#include "cuda/device.cuh"
#include "deform_common.h"

namespace sapa::cuda {

using sapa::DeformCell;
using sapa::DeformGeometry;

// The f32 workspace of one call, (points, G, P) each: the staged logits, and (backward) the
// softmax weights and logit gradients that pass B reads; plus R_b per batch element.
struct DeformWorkspace {
  float* logit;
  float* attn;
  float* dlogit;
  int* radius;
};

// Output point `pt` (flat over n, oH, oW) as (b, i, j).
struct DeformPoint {
  int64_t b, i, j;
};
__device__ __forceinline__ DeformPoint deform_point(int64_t pt, const DeformGeometry& g) {
  const int64_t j = pt % g.oW(), rest = pt / g.oW();
  return DeformPoint{rest / g.oH(), rest % g.oH(), j};
}

// The cell of point p of group grp at output point f; off_pt is the point's G*P*2 offsets.
template <typename T>
__device__ __forceinline__ DeformCell<float> deform_cell_of(const DeformGeometry& g,
                                                            const DeformPoint& f,
                                                            const T* __restrict__ off_pt,
                                                            int64_t grp, int64_t p) {
  const T* o = off_pt + (grp * g.P + p) * 2;
  float py, px;
  sapa::deform_position(g, f.i, f.j, to_f(o[0]), to_f(o[1]), &py, &px);
  return sapa::deform_cell(py, px, g.H, g.W);
}

// Element e of the sample of a read cell: sum over the corners in the map of w_c x_c[e]
// (x: rows of width ld, the group's channels from c0); an off-map corner adds nothing.
template <typename T>
__device__ __forceinline__ float sample_at(const DeformCell<float>& cell,
                                           const T* __restrict__ x, const DeformGeometry& g,
                                           int64_t b, int64_t ld, int64_t c0, int64_t e) {
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < 4; ++c)
    if (cell.corner_inside(c, g.H, g.W))
      s = fmaf(cell.w[c], to_f(x[g.pixel(b, cell.corner_y(c), cell.corner_x(c)) * ld + c0 + e]),
               s);
  return s;
}

// sum_e a[e] * 0 over the warp: 0, or NaN where a holds a NaN or an infinity (what jnp's
// product of a with a zero sample gives).
template <typename T>
__device__ __forceinline__ float warp_times_zero(const T* __restrict__ a, int64_t n, int lane) {
  float part = 0.f;
  for (int64_t e = lane; e < n; e += 32) part += to_f(a[e]) * 0.f;
  return warp_sum(part);
}

// The logit of one sample, q_g . sample(k) over the group's E channels (the same value in every
// lane); q_zero is the warp's q_g . 0, the logit of a sample that reads nothing.
template <typename T>
__device__ __forceinline__ float deform_logit(const DeformCell<float>& cell,
                                              const T* __restrict__ q_g,
                                              const T* __restrict__ k, const DeformGeometry& g,
                                              int64_t b, int64_t grp, float q_zero, int lane) {
  if (cell.kind == sapa::kSampleOutside) return q_zero;
  if (cell.kind == sapa::kSampleNan) return NAN;
  float part = 0.f;
  for (int64_t e = lane; e < g.E; e += 32)
    part = fmaf(to_f(q_g[e]), sample_at(cell, k, g, b, g.qk_dim(), grp * g.E, e), part);
  return warp_sum(part);
}

// Lane 0 stages the P logits of one (point, group) in `logit`; returns their NaN-propagating
// maximum (every lane). The caller's __syncwarp makes the staged logits visible to the lanes.
template <typename T>
__device__ __forceinline__ float stage_logits(const DeformGeometry& g, const DeformPoint& f,
                                              const T* __restrict__ q_g,
                                              const T* __restrict__ k,
                                              const T* __restrict__ off_pt, int64_t grp,
                                              float* __restrict__ logit, int lane) {
  const float q_zero = warp_times_zero(q_g, g.E, lane);
  float top = 0.f;
  for (int64_t p = 0; p < g.P; ++p) {
    const float z = deform_logit(deform_cell_of(g, f, off_pt, grp, p), q_g, k, g, f.b, grp,
                                 q_zero, lane);
    if (lane == 0) logit[p] = z;
    top = p == 0 ? z : sapa::nan_max(top, z);
  }
  return top;
}

// softmax as jnp: attn_p = exp(z_p - max) / sum_p exp(z_p - max), the sum in point order.
__device__ __forceinline__ float softmax_sum(const float* __restrict__ logit, int64_t P,
                                             float top) {
  float sum = 0.f;
  for (int64_t p = 0; p < P; ++p) sum += expf(logit[p] - top);
  return sum;
}
__device__ __forceinline__ float softmax_weight(float z, float top, float sum) {
  return expf(z - top) / sum;
}

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_DEFORM_POINT_CUH_

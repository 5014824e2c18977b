// SAPA-D backward pass A on CUDA (docs/design.md §6.4): one warp per output point, the groups
// in turn; everything it writes is owned by the point (no conflicts).
//
//   1. the P logits, staged by lane 0 (as the forward), then a warp barrier;
//   2. the softmax sum, and attn . dattn with dattn_p = g . sample_p(v) = sum_c w_c (g . v_c);
//   3. per point p: dlogit_p = attn_p (dattn_p - attn . dattn), the offset gradients from the
//      cell derivatives of both samples (written by lane 0), and lane 0 stores attn_p and
//      dlogit_p in the workspace for pass B; then a warp barrier;
//   4. the lanes take the E channels of dq = sum_p dlogit_p sample_p(k), reading the staged
//      dlogits.
// Off-map corners and unread samples follow the CPU pass (cpu/deform_passes.h) operation for
// operation where it matters for NaN and Inf: g . 0 and ds . 0 are computed, not assumed 0.
#ifndef SAPA_JAX_XLA_FFI_CUDA_DEFORM_BACKWARD_POINTS_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_DEFORM_BACKWARD_POINTS_CUH_

#include <cstdint>

#include "cuda/deform_point.cuh"
#include "cuda/device.cuh"

namespace sapa::cuda {

// dattn of one sample (every lane): g_zero (g . 0) for a sample that reads nothing, NaN for a
// NaN position, else sum_c w_c gv[c] with gv[c] = g . v_c (g_zero for an off-map corner).
template <typename T>
__device__ __forceinline__ float deform_dattn(const DeformCell<float>& cell,
                                              const T* __restrict__ g_g,
                                              const T* __restrict__ v, const DeformGeometry& g,
                                              int64_t b, int64_t grp, float g_zero, int lane,
                                              float gv[4]) {
  if (cell.kind == sapa::kSampleOutside) return g_zero;
  if (cell.kind == sapa::kSampleNan) return NAN;
  float d = 0.f;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    gv[c] = g_zero;
    if (cell.corner_inside(c, g.H, g.W)) {
      const T* row = v + g.pixel(b, cell.corner_y(c), cell.corner_x(c)) * g.C() + grp * g.Cg;
      float part = 0.f;
      for (int64_t e = lane; e < g.Cg; e += 32) part = fmaf(to_f(g_g[e]), to_f(row[e]), part);
      gv[c] = warp_sum(part);
    }
    d = fmaf(cell.w[c], gv[c], d);
  }
  return d;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    deform_backward_points(DeformGeometry g, const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const T* __restrict__ offsets,
                           const T* __restrict__ gout, T* __restrict__ dq,
                           T* __restrict__ doffsets, DeformWorkspace ws) {
  const int lane = threadIdx.x & 31;
  const int64_t npts = g.n * g.oH() * g.oW();
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t pt = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); pt < npts;
       pt += step) {
    const DeformPoint f = deform_point(pt, g);
    const T* off_pt = offsets + pt * g.off_dim();
    for (int64_t grp = 0; grp < g.G; ++grp) {
      const int64_t slot = (pt * g.G + grp) * g.P;
      const T* q_g = q + pt * g.qk_dim() + grp * g.E;
      const T* g_g = gout + pt * g.C() + grp * g.Cg;
      const float* logit = ws.logit + slot;
      const float top = stage_logits(g, f, q_g, k, off_pt, grp, ws.logit + slot, lane);
      __syncwarp();  // lane 0's logits staged before every lane reads them
      const float sum = softmax_sum(logit, g.P, top);
      const float g_zero = warp_times_zero(g_g, g.Cg, lane);
      float gv[4];
      float attn_dot = 0.f;
      for (int64_t p = 0; p < g.P; ++p) {
        const DeformCell<float> cell = deform_cell_of(g, f, off_pt, grp, p);
        const float d = deform_dattn(cell, g_g, v, g, f.b, grp, g_zero, lane, gv);
        attn_dot = fmaf(softmax_weight(logit[p], top, sum), d, attn_dot);
      }
      T* doff = doffsets + pt * g.off_dim() + grp * g.P * 2;
      for (int64_t p = 0; p < g.P; ++p) {
        const DeformCell<float> cell = deform_cell_of(g, f, off_pt, grp, p);
        const float attn = softmax_weight(logit[p], top, sum);
        const float dlogit =
            attn * (deform_dattn(cell, g_g, v, g, f.b, grp, g_zero, lane, gv) - attn_dot);
        float dlx = cell.kind == sapa::kSampleNan ? NAN : 0.f, dly = dlx;
        if (cell.kind == sapa::kSampleRead) {
          // d w_c = ds . k_c + attn (g . v_c), ds = dlogit q_g (ds . 0 for an off-map corner)
          float part_zero = 0.f;
          for (int64_t e = lane; e < g.E; e += 32) part_zero += dlogit * to_f(q_g[e]) * 0.f;
          const float ds_zero = warp_sum(part_zero);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            float ds_k = ds_zero;
            if (cell.corner_inside(c, g.H, g.W)) {
              const T* row = k + g.pixel(f.b, cell.corner_y(c), cell.corner_x(c)) * g.qk_dim() +
                             grp * g.E;
              float part = 0.f;
              for (int64_t e = lane; e < g.E; e += 32)
                part = fmaf(dlogit * to_f(q_g[e]), to_f(row[e]), part);
              ds_k = warp_sum(part);
            }
            const float dw = ds_k + attn * gv[c];
            dly = fmaf(dw, cell.dw_dly(c), dly);
            dlx = fmaf(dw, cell.dw_dlx(c), dlx);
          }
        }
        // After the point's last warp sum, so that pass 4's barrier is the one that orders
        // these stores before the lanes' reads.
        if (lane == 0) {
          doff[p * 2] = from_f<T>(dlx);
          doff[p * 2 + 1] = from_f<T>(dly);
          ws.attn[slot + p] = attn;
          ws.dlogit[slot + p] = dlogit;
        }
      }
      __syncwarp();  // lane 0's dlogits staged before every lane reads them for dq
      for (int64_t e = lane; e < g.E; e += 32) {
        float acc = 0.f;
        for (int64_t p = 0; p < g.P; ++p) {
          const DeformCell<float> cell = deform_cell_of(g, f, off_pt, grp, p);
          const float s = cell.kind == sapa::kSampleRead
                              ? sample_at(cell, k, g, f.b, g.qk_dim(), grp * g.E, e)
                              : (cell.kind == sapa::kSampleNan ? NAN : 0.f);
          acc = fmaf(ws.dlogit[slot + p], s, acc);  // zero and NaN samples too, as jnp
        }
        dq[pt * g.qk_dim() + grp * g.E + e] = from_f<T>(acc);
      }
    }
  }
}

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_DEFORM_BACKWARD_POINTS_CUH_

// SAPA-D forward on CUDA (docs/design.md §6.4): one warp per output point, the groups in turn.
// Per group the P logits q . sample(k) (lanes over the E channels, butterfly sums), staged by
// lane 0 in the workspace; after a warp barrier every lane reads them for the softmax, and the
// lanes take the group's value channels: out[c] = sum_p attn_p sum_corner w v[c], points in
// order. Nothing P-expanded is stored; every output element has one writer.
#ifndef SAPA_JAX_XLA_FFI_CUDA_DEFORM_FORWARD_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_DEFORM_FORWARD_CUH_

#include <cstdint>

#include "cuda/deform_point.cuh"
#include "cuda/device.cuh"

namespace sapa::cuda {

// Two blocks per multiprocessor (<= 128 registers): with the bare block size, ptxas for sm_80
// kept the 16-bit instantiations at 64 registers and spilled 8 bytes.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    deform_forward(DeformGeometry g, const T* __restrict__ q, const T* __restrict__ k,
                   const T* __restrict__ v, const T* __restrict__ offsets, T* __restrict__ out,
                   float* __restrict__ logit_ws) {
  const int lane = threadIdx.x & 31;
  const int64_t npts = g.n * g.oH() * g.oW();
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t pt = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); pt < npts;
       pt += step) {
    const DeformPoint f = deform_point(pt, g);
    const T* off_pt = offsets + pt * g.off_dim();
    for (int64_t grp = 0; grp < g.G; ++grp) {
      float* logit = logit_ws + (pt * g.G + grp) * g.P;
      const float top =
          stage_logits(g, f, q + pt * g.qk_dim() + grp * g.E, k, off_pt, grp, logit, lane);
      __syncwarp();  // lane 0's logits staged before every lane reads them
      const float sum = softmax_sum(logit, g.P, top);
      // A NaN logit (or +inf) makes every weight NaN: the group's output is NaN, as jnp's
      // attn * 0 terms give (attn is all NaN or all non-NaN).
      const float attn0 = softmax_weight(logit[0], top, sum);
      const bool nan_group = attn0 != attn0;
      for (int64_t c = lane; c < g.Cg; c += 32) {
        float acc = nan_group ? NAN : 0.f;
        for (int64_t p = 0; p < g.P && !nan_group; ++p) {
          const DeformCell<float> cell = deform_cell_of(g, f, off_pt, grp, p);
          if (cell.kind != sapa::kSampleRead) continue;  // a zero sample adds attn * 0 = 0
          const float a = softmax_weight(logit[p], top, sum);
#pragma unroll
          for (int cr = 0; cr < 4; ++cr)
            if (cell.corner_inside(cr, g.H, g.W))
              acc = fmaf(a * cell.w[cr],
                         to_f(v[g.pixel(f.b, cell.corner_y(cr), cell.corner_x(cr)) * g.C() +
                                grp * g.Cg + c]),
                         acc);
        }
        out[pt * g.C() + grp * g.Cg + c] = from_f<T>(acc);
      }
    }
  }
}

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_DEFORM_FORWARD_CUH_

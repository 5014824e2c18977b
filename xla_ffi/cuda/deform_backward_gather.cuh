// SAPA-D backward pass B on CUDA (docs/design.md §6.4): dk and dv, the scatter from learned
// positions turned into a gather, without atomics.
//
// deform_window_radius: one block per batch element b, R_b = ceil(max |offset|) over its finite
// offsets (a max is exact, so the order of the reduction cannot matter), capped at max(H, W),
// where the window below already covers the map.
//
// deform_backward_gather: one thread per element of dk or dv, i.e. per target (b, u, g) and
// channel. A sample within R_b of its parent pixel has its corners within R_b + 1 rows and
// columns of it, so target u = (y, x) receives only from the output points whose parents lie in
// rows [y - R_b - 1, y + R_b] and columns [x - R_b - 1, x + R_b], clamped to the map: exact for
// any R_b (a non-finite position reads no pixel, so it needs no window). The thread walks that
// window's output points row-major, then the points p, recomputes each cell and adds the
// contribution of the one corner that can land on u: w_c dlogit_p q[channel] to dk, w_c attn_p
// g[channel] to dv, in increasing source order (i', j', p). The threads of a warp share the
// target and so the whole walk.
#ifndef SAPA_JAX_XLA_FFI_CUDA_DEFORM_BACKWARD_GATHER_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_DEFORM_BACKWARD_GATHER_CUH_

#include <cmath>
#include <cstdint>

#include "cuda/deform_point.cuh"
#include "cuda/device.cuh"

namespace sapa::cuda {

// R from the maximum m of |finite offset| (m >= 0): ceil(m), at most `cap`. A NaN m cannot come
// from the data (non-finite offsets are left out) and gives 0.
__device__ __forceinline__ int window_radius(float m, int cap) {
  if (m >= static_cast<float>(cap)) return cap;
  return m > 0.f ? static_cast<int>(ceilf(m)) : 0;
}

// Launch with gridDim.x = n and kWarps floats of dynamic shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    deform_window_radius(DeformGeometry g, const T* __restrict__ offsets, int* __restrict__ radius,
                         int cap) {
  extern __shared__ float warp_top[];
  const int64_t b = blockIdx.x;
  const int64_t count = g.oH() * g.oW() * g.off_dim();
  const T* off = offsets + b * count;
  float m = 0.f;
  for (int64_t idx = threadIdx.x; idx < count; idx += kThreads) {
    const float a = fabsf(to_f(off[idx]));
    if (a <= 3.402823466e38f) m = a > m ? a : m;  // finite only: NaN and inf compare false
  }
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) warp_top[threadIdx.x >> 5] = m;
  __syncthreads();  // every warp's maximum in shared memory before thread 0 combines them
  if (threadIdx.x == 0) {
    float top = warp_top[0];
    for (int w = 1; w < kWarps; ++w) top = sapa::nan_max(top, warp_top[w]);
    radius[b] = window_radius(top, cap);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    deform_backward_gather(DeformGeometry g, const T* __restrict__ q,
                           const T* __restrict__ offsets, const T* __restrict__ gout,
                           T* __restrict__ dk, T* __restrict__ dv, DeformWorkspace ws) {
  const int64_t width = g.E + g.Cg;  // a target's dk then dv channels
  const int64_t total = g.n * g.H * g.W * g.G * width;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += step) {
    const int64_t ch = idx % width, grp = (idx / width) % g.G, pix = idx / (width * g.G);
    const int64_t x = pix % g.W, y = (pix / g.W) % g.H, b = pix / (g.W * g.H);
    const bool is_k = ch < g.E;
    const int64_t R = ws.radius[b];
    const int64_t i0 = (y - R - 1 > 0 ? y - R - 1 : 0) * g.s;
    const int64_t i1 = ((y + R < g.H - 1 ? y + R : g.H - 1) + 1) * g.s;
    const int64_t j0 = (x - R - 1 > 0 ? x - R - 1 : 0) * g.s;
    const int64_t j1 = ((x + R < g.W - 1 ? x + R : g.W - 1) + 1) * g.s;
    float acc = 0.f;
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t pt = (b * g.oH() + i) * g.oW() + j;
        const DeformPoint f{b, i, j};
        const T* off_pt = offsets + pt * g.off_dim();
        for (int64_t p = 0; p < g.P; ++p) {
          const DeformCell<float> cell = deform_cell_of(g, f, off_pt, grp, p);
          const int64_t cy = y - cell.y0, cx = x - cell.x0;
          if (cell.kind != sapa::kSampleRead || cy < 0 || cy > 1 || cx < 0 || cx > 1) continue;
          // constant indices only: a computed one would put cell.w in local memory
          const float w = cy ? (cx ? cell.w[3] : cell.w[2]) : (cx ? cell.w[1] : cell.w[0]);
          const int64_t slot = (pt * g.G + grp) * g.P + p;
          acc = is_k ? fmaf(w, ws.dlogit[slot] * to_f(q[pt * g.qk_dim() + grp * g.E + ch]), acc)
                     : fmaf(w * ws.attn[slot], to_f(gout[pt * g.C() + grp * g.Cg + ch - g.E]),
                            acc);
        }
      }
    }
    if (is_k)
      dk[pix * g.qk_dim() + grp * g.E + ch] = from_f<T>(acc);
    else
      dv[pix * g.C() + grp * g.Cg + ch - g.E] = from_f<T>(acc);
  }
}

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_DEFORM_BACKWARD_GATHER_CUH_

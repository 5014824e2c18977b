// Backward pass 1 ("points"), per output point: logits again, w from the saved stats,
// dw_p = g . v[l+p], dlogit (sapa::point_logit_gradients), dq = sum_p dlogit_p k[l+p]; w and
// dlogit go to the scratch outputs for the gather.
//
// backward_points_tiled, shared memory (floats, as in forward.cuh):
//   [w: TH*TW*T*s2pad][dlogit: same][poison: TH*TW*s2pad]
//   [points: TH*TW*s2*kChunkStride][halo: kh*kw*kChunkStride]
// backward_points_simple: one warp per output point, the taps split over the lanes.
#ifndef SAPA_JAX_XLA_FFI_CUDA_BACKWARD_POINTS_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_BACKWARD_POINTS_CUH_

#include "cuda/simple.cuh"
#include "cuda/tile.cuh"

namespace sapa::cuda {

// The scratch outputs of a tile from its per-tap buffers ([centre][tap][sub-pixel], see
// tile.cuh): each output row of the tile is one contiguous run of cw*s*T floats. s, T and
// s2pad are arguments so that a caller with compile-time values (backward_points_v2) gets its
// divisions folded.
__device__ __forceinline__ void write_scratch(float* __restrict__ w_out,
                                              float* __restrict__ dlogit_out, const float* wbuf,
                                              const float* dbuf, const Tile& t, const Params& P,
                                              int s, int T, int s2pad) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int run = t.cw * s * T;
  for (int row = warp; row < t.ch * s; row += kWarps) {
    const int cy = row / s, sy = row - cy * s;
    const int64_t base = pixel(t.b, t.ty0 * s + row, t.tx0 * s, P.oH, P.oW) * T;
    for (int e = lane; e < run; e += 32) {
      const int col = e / T, tap = e - col * T;
      const int cx = col / s, sx = col - cx * s;
      const int idx = ((cy * t.cw + cx) * T + tap) * s2pad + sy * s + sx;
      w_out[base + e] = wbuf[idx];
      dlogit_out[base + e] = dbuf[idx];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kTiledBlocksPerSm)
    backward_points_tiled(Params P, const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const float* __restrict__ stats,
                          const T* __restrict__ g, T* __restrict__ dq, float* __restrict__ w_out,
                          float* __restrict__ dlogit_out) {
  extern __shared__ float4 shared4[];
  const int tap_max = P.TH * P.TW * P.T * P.s2pad;
  float* const wbuf = reinterpret_cast<float*>(shared4);  // logits, then w
  float* const dbuf = wbuf + tap_max;                     // dw, then dlogit
  float* const poison = dbuf + tap_max;                   // of dq, per point
  float* const points = poison + P.TH * P.TW * P.s2pad;
  float* const halo = points + P.TH * P.TW * P.s2 * kChunkStride;
  const Tile t = tile_of_block(P);
  const int npts = t.ncent * P.s2;

  zero_shared(wbuf, tap_buffer_size(t, P));
  zero_shared(dbuf, tap_buffer_size(t, P));
  __syncthreads();  // the chunk loops' barriers would do, but they have none when d == C == 0

  // dw_p = g . v[l + p] over chunks of 32 value channels.
  for (int c0 = 0; c0 < P.C; c0 += kChunk) {
    const int width = min(kChunk, P.C - c0);
    stage_halo(halo, kChunkStride, kChunk, v, P.C, c0, width, t, P);
    stage_points(points, g, P.C, c0, width, t, P);
    __syncthreads();
    accumulate_dots(dbuf, halo, t, P, [&](int pt, const Point&, float (&a)[kChunk]) {
      load_staged_chunk(points, pt, a);
    });
    __syncthreads();
  }
  // Logits; afterwards the halo holds the last key chunk.
  const int key_chunks = (P.d + kChunk - 1) / kChunk;
  for (int c0 = 0; c0 < P.d; c0 += kChunk) {
    stage_halo(halo, kChunkStride, kChunk, k, P.d, c0, min(kChunk, P.d - c0), t, P);
    __syncthreads();
    accumulate_dots(wbuf, halo, t, P, [&](int, const Point& pt, float (&a)[kChunk]) {
      load_query_chunk(q, c0, t, pt, P, a);
    });
    __syncthreads();
  }

  // Per point: w from the saved stats, then dlogit (only inside taps carry gradient).
  for (int pt = threadIdx.x; pt < npts; pt += kThreads) {
    const Point p = point_of(pt, t, P);
    float* w = wbuf + p.ci * P.T * P.s2pad + p.si;
    float* dw = dbuf + p.ci * P.T * P.s2pad + p.si;
    const float2 st = reinterpret_cast<const float2*>(stats)[pixel(t.b, p.oy, p.ox, P.oH, P.oW)];
    // dq's poison (sapa_common.h): with border "valid" from the raw logits, before they become
    // weights; with border "zeros" from the logit gradients, after.
    float outside = 0.f;
    if (P.border == sapa::kValid)
      for_each_tap(p.Y, p.X, P, [&](int tap, bool inside) {
        if (!inside) outside += sapa::dq_poison_term<float>(P.normalizer, P.border, w[tap * P.s2pad], 0.f);
      });
    // In place: tap p's logit becomes its weight, its dw its logit gradient.
    sapa::point_logit_gradients<float>(
        P.normalizer, P.eps, st.x, st.y, P.T,
        [&](int64_t tap, float* x, float* wt, float* dwt) {
          const bool counted =
              P.border == sapa::kZeros || tap_in_map(static_cast<int>(tap), p.Y, p.X, P);
          *x = w[tap * P.s2pad];
          *wt = sapa::tap_weight(P.normalizer, *x, st.x, st.y, counted);
          *dwt = dw[tap * P.s2pad];
          return counted;
        },
        [&](int64_t tap, float wt, float dl) {
          w[tap * P.s2pad] = wt;
          dw[tap * P.s2pad] = dl;
        });
    if (P.border == sapa::kZeros)
      for_each_tap(p.Y, p.X, P, [&](int tap, bool inside) {
        if (!inside) outside += sapa::dq_poison_term<float>(P.normalizer, P.border, 0.f, dw[tap * P.s2pad]);
      });
    poison[p.ci * P.s2pad + p.si] = outside;
  }
  __syncthreads();

  write_scratch(w_out, dlogit_out, wbuf, dbuf, t, P, P.s, P.T, P.s2pad);

  // dq = sum_p dlogit_p k[l + p]; with a single key chunk the halo still holds it.
  for (int c0 = 0; c0 < P.d; c0 += kChunk) {
    const int width = min(kChunk, P.d - c0);
    if (key_chunks > 1) {
      __syncthreads();
      stage_halo(halo, kChunkStride, kChunk, k, P.d, c0, width, t, P);
      __syncthreads();
    }
    assemble_chunk(dq, P.d, c0, width, halo, kChunkStride, dbuf, poison, t, P);
  }
}

// Backward pass 1, one warp per output point: lanes take taps, then channels of dq.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_points_simple(Params P, const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const float* __restrict__ stats,
                           const T* __restrict__ g, T* __restrict__ dq, float* w_out,
                           float* dlogit_out) {
  const int lane = threadIdx.x & 31;
  const int64_t npts = P.n * P.oH * static_cast<int64_t>(P.oW);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t pt = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); pt < npts;
       pt += step) {
    const FlatPoint f = flat_point(pt, P);
    const T* qrow = q + pt * P.d;
    const T* grow = g + pt * P.C;
    const float qzero = zero_dot(qrow, P.d), gzero = zero_dot(grow, P.C);
    float* wrow = w_out + pt * P.T;
    float* drow = dlogit_out + pt * P.T;
    const float2 st = reinterpret_cast<const float2*>(stats)[pt];
    sapa::SpreadSums<float> part;  // this lane's taps (sapa_common.h); its first top tap:
    int top_tap = P.T;
    for (int p = lane; p < P.T; p += 32) {
      bool inside;
      const float x = simple_logit(qrow, k, p, f, P, qzero, &inside);
      const float w = sapa::tap_weight(P.normalizer, x, st.x, st.y,
                                       sapa::tap_counted(P.border, inside));
      float dw = gzero;  // g . 0 outside the map
      if (inside) {
        int y, xx;
        tap_inside(p, f.Y, f.X, P, &y, &xx);
        dw = dot_rows(grow, v + pixel(f.b, y, xx, P.H, P.W) * P.C, P.C);
      }
      wrow[p] = w;
      drow[p] = dw;  // dw for now; the lane rewrites it as dlogit below
      if (w > part.top) top_tap = p;
      part.add(w, dw);
    }
    // The passes of sapa::point_logit_gradients with the taps split over the lanes: the same W
    // (summed in another order) and the same pivot (the first tap of largest weight).
    float weight = 0.f, centre = 0.f, residual = 0.f;
    if (P.normalizer != sapa::kNone) {
      weight = warp_sum(part.weight);
      centre = sapa::spread_centre(warp_pivot(part.top, top_tap, part.pivot));
      float part_r = 0.f;
      for (int p = lane; p < P.T; p += 32) part_r += sapa::spread_residual(wrow[p], drow[p], centre);
      residual = warp_sum(part_r);
    }
    for (int p = lane; p < P.T; p += 32) {
      bool inside;
      const float x = simple_logit(qrow, k, p, f, P, qzero, &inside);
      drow[p] = sapa::tap_counted(P.border, inside)
                    ? sapa::tap_logit_gradient(P.normalizer, P.eps, st.x, st.y, x, wrow[p],
                                               drow[p],
                                               sapa::spread(weight, centre, residual, drow[p]))
                    : 0.f;
    }
    // dq's poison (sapa_common.h): with border "valid" the same for every out-of-map tap.
    const float valid_poison = sapa::dq_poison_term<float>(P.normalizer, sapa::kValid, qzero, 0.f);
    const bool zeros = P.border == sapa::kZeros;
    __syncwarp();  // dlogit of every tap visible to every lane
    for (int c = lane; c < P.d; c += 32) {
      float acc = 0.f;
      int p = 0;
      for (int dy = -P.r; dy <= P.r; ++dy) {
        const int y = f.Y + dy;
        for (int dx = -P.r; dx <= P.r; ++dx, ++p) {
          const int x = f.X + dx;
          if (y < 0 || y >= P.H || x < 0 || x >= P.W) {  // k is 0 outside: only the poison
            acc += zeros ? drow[p] * 0.f : valid_poison;
            continue;
          }
          acc = fmaf(drow[p], to_f(k[pixel(f.b, y, x, P.H, P.W) * P.d + c]), acc);
        }
      }
      dq[pt * P.d + c] = from_f<T>(acc);
    }
  }
}

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_BACKWARD_POINTS_CUH_

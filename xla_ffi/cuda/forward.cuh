// Forward kernels: logits q.k, stats, weights and out = sum_p w_p v[l+p] in one pass.
//
// forward_tiled: logits with one thread per output point, its 32-channel chunk of q in
// registers, k rows of the halo read from shared memory as float4 (points of one centre read the
// same rows: broadcast). Assembly: threads run along the channels (coalesced v loads and out
// stores); each thread computes 4 sub-pixel outputs of one centre for 2 channels, so every
// shared-memory v value feeds 4 FMAs and one float4 of weights feeds 8. Shared memory (floats,
// every region 16-byte aligned; kh = min(TH + 2r, H), kw = min(TW + 2r, W), see shared_floats):
//   [weights: TH*TW*T*s2pad][poison: TH*TW*s2pad][halo: kh*kw*max(kChunkStride, vstride)]
// forward_simple: one warp per output point, global memory only (any K and s).
#ifndef SAPA_JAX_XLA_FFI_CUDA_FORWARD_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_FORWARD_CUH_

#include "cuda/simple.cuh"
#include "cuda/tile.cuh"

namespace sapa::cuda {

template <typename T>
__global__ void __launch_bounds__(kThreads, kTiledBlocksPerSm)
    forward_tiled(Params P, const T* __restrict__ q, const T* __restrict__ k,
                  const T* __restrict__ v, T* __restrict__ out, float* __restrict__ stats) {
  extern __shared__ float4 shared4[];
  float* const wbuf = reinterpret_cast<float*>(shared4);
  float* const poison = wbuf + P.TH * P.TW * P.T * P.s2pad;
  float* const halo = poison + P.TH * P.TW * P.s2pad;
  const Tile t = tile_of_block(P);
  const int npts = t.ncent * P.s2;

  zero_shared(wbuf, tap_buffer_size(t, P));  // padded sub-pixels stay 0
  __syncthreads();  // the chunk loop's barriers would do, but it has none when d == 0

  // Logits, accumulated over chunks of 32 key channels.
  for (int c0 = 0; c0 < P.d; c0 += kChunk) {
    stage_halo(halo, kChunkStride, kChunk, k, P.d, c0, min(kChunk, P.d - c0), t, P);
    __syncthreads();
    accumulate_dots(wbuf, halo, t, P, [&](int, const Point& pt, float (&a)[kChunk]) {
      load_query_chunk(q, c0, t, pt, P, a);
    });
    __syncthreads();  // halo is restaged next
  }

  // Normalise in place. Each thread touches only the points it accumulated above.
  for (int pt = threadIdx.x; pt < npts; pt += kThreads) {
    const Point p = point_of(pt, t, P);
    float* w = wbuf + p.ci * P.T * P.s2pad + p.si;
    const float2 st = tap_stats(w, P.s2pad, p.Y, p.X, P);
    float outside = 0.f;
    for_each_tap(p.Y, p.X, P, [&](int tap, bool inside) {
      float& x = w[tap * P.s2pad];
      x = sapa::tap_weight(P.normalizer, x, st.x, st.y, sapa::tap_counted(P.border, inside));
      if (!inside) outside += sapa::out_poison_term<float>(P.border, x);
    });
    poison[p.ci * P.s2pad + p.si] = outside;
    reinterpret_cast<float2*>(stats)[pixel(t.b, p.oy, p.ox, P.oH, P.oW)] = st;
  }

  // Assembly over chunks of 64 value channels.
  for (int c0 = 0; c0 < P.C; c0 += kValueChunk) {
    const int width = min(kValueChunk, P.C - c0);
    __syncthreads();  // weights complete / previous chunk consumed
    stage_halo(halo, P.vstride, width, v, P.C, c0, width, t, P);
    __syncthreads();
    assemble_chunk(out, P.C, c0, width, halo, P.vstride, wbuf, poison, t, P);
  }
}


// One warp per output point (grid-stride, warp-uniform loop).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_simple(Params P, const T* __restrict__ q, const T* __restrict__ k,
                   const T* __restrict__ v, T* __restrict__ out, float* __restrict__ stats) {
  const int lane = threadIdx.x & 31;
  const int64_t npts = P.n * P.oH * static_cast<int64_t>(P.oW);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t pt = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); pt < npts;
       pt += step) {
    const FlatPoint f = flat_point(pt, P);
    const T* qrow = q + pt * P.d;
    const float qzero = zero_dot(qrow, P.d);
    const float2 st = simple_stats(qrow, k, f, qzero, P);
    if (lane == 0) reinterpret_cast<float2*>(stats)[pt] = st;
    for (int c0 = 0; c0 < P.C; c0 += 32) {
      const int c = c0 + lane;
      float acc = 0.f;
      for (int p = 0; p < P.T; ++p) {
        bool inside;
        const float x = simple_logit(qrow, k, p, f, P, qzero, &inside);  // every lane, same
        const float w =
            sapa::tap_weight(P.normalizer, x, st.x, st.y, sapa::tap_counted(P.border, inside));
        if (c >= P.C) continue;
        if (!inside) {  // v is 0 outside the map
          acc += sapa::out_poison_term<float>(P.border, w);
          continue;
        }
        int y, xx;
        tap_inside(p, f.Y, f.X, P, &y, &xx);
        acc = fmaf(w, to_f(v[pixel(f.b, y, xx, P.H, P.W) * P.C + c]), acc);
      }
      if (c < P.C) out[pt * P.C + c] = from_f<T>(acc);
    }
  }
}

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_FORWARD_CUH_

// Backward pass 2 ("gather"), per low-res point m: dk[m] = sum dlogit * q, dv[m] = sum w * g over
// the taps p and the s*s output points of centre m - p, read from the scratch of backward pass 1
// in a fixed order (taps dy outer, dx inner, then sub-pixels ascending). No atomics.
//
// backward_gather_tiled, shared memory (floats, as in forward.cuh):
//   [gathered tap values: TH*TW*T*s2pad][halo points: kh*kw*s2*kChunk]
// backward_gather_simple: one thread per element of dk or dv, global memory only.
#ifndef SAPA_JAX_XLA_FFI_CUDA_BACKWARD_GATHER_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_BACKWARD_GATHER_CUH_

#include "cuda/simple.cuh"
#include "cuda/tile.cuh"

namespace sapa::cuda {

// Gathers per-tap values of the output points whose windows reach the tile's low-res points:
// buf[(mi * T + p) * s2pad + si] = src[point (centre m - p, sub-pixel si)][p], 0 where the centre
// is outside the map. Reads the scratch rows of the halo's output rows contiguously.
__device__ __forceinline__ void gather_tap_values(float* buf, const float* __restrict__ src,
                                                  const Tile& t, const Params& P) {
  zero_shared(buf, tap_buffer_size(t, P));
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int run = t.hw * P.s * P.T;
  for (int row = warp; row < t.hh * P.s; row += kWarps) {
    const int hy = row / P.s, sy = row - hy * P.s;
    const float* base = src + pixel(t.b, t.hy0 * P.s + row, t.hx0 * P.s, P.oH, P.oW) * P.T;
    for (int e = lane; e < run; e += 32) {
      const int col = e / P.T, tap = e - col * P.T;
      const int hx = col / P.s, sx = col - hx * P.s;
      const int dy = tap / P.K - P.r, dx = tap - (tap / P.K) * P.K - P.r;
      const int my = t.hy0 + hy + dy - t.ty0, mx = t.hx0 + hx + dx - t.tx0;
      if (my >= 0 && my < t.ch && mx >= 0 && mx < t.cw)
        buf[((my * t.cw + mx) * P.T + tap) * P.s2pad + sy * P.s + sx] = base[e];
    }
  }
}

// dst[m][c0 + c] = sum over taps p (dy outer, dx inner) and sub-pixels si (ascending) of
// buf[m][p][si] * rows[point (m - p, si)][c]. Work item = (low-res point, lane = channel).
template <typename T>
__device__ __forceinline__ void gather_chunk(T* __restrict__ dst, int row_len, int c0, int width,
                                             const float* rows, const float* buf, const Tile& t,
                                             const Params& P) {
  const int groups = P.s2pad / kSub;
  const int items = t.ncent * 32;
  for (int it = threadIdx.x; it < items; it += kThreads) {
    const int lane = it & 31;
    if (lane >= width) continue;
    const int mi = it >> 5;
    const int cy = mi / t.cw;
    const int my = t.ty0 + cy, mx = t.tx0 + (mi - cy * t.cw);
    const float* wrow = buf + mi * P.T * P.s2pad;
    float acc = 0.f;
    int p = 0;
    for (int dy = -P.r; dy <= P.r; ++dy) {
      const int ly = my - dy;
      if (ly < 0 || ly >= P.H) {
        p += P.K;
        continue;
      }
      for (int dx = -P.r; dx <= P.r; ++dx, ++p) {
        const int lx = mx - dx;
        if (lx < 0 || lx >= P.W) continue;
        const float* src = rows + ((ly - t.hy0) * t.hw + (lx - t.hx0)) * P.s2 * kChunk + lane;
        const float4* w4 = reinterpret_cast<const float4*>(wrow + p * P.s2pad);
        for (int sg = 0; sg < groups; ++sg) {
          const float4 w = w4[sg];
          const int si = sg * kSub;  // < s2 always; the next three may be padding
          acc = fmaf(w.x, src[si * kChunk], acc);
          if (si + 1 < P.s2) acc = fmaf(w.y, src[(si + 1) * kChunk], acc);
          if (si + 2 < P.s2) acc = fmaf(w.z, src[(si + 2) * kChunk], acc);
          if (si + 3 < P.s2) acc = fmaf(w.w, src[(si + 3) * kChunk], acc);
        }
      }
    }
    dst[pixel(t.b, my, mx, P.H, P.W) * row_len + c0 + lane] = from_f<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kTiledBlocksPerSm)
    backward_gather_tiled(Params P, const T* __restrict__ q, const T* __restrict__ g,
                          const float* __restrict__ w_in, const float* __restrict__ dlogit_in,
                          T* __restrict__ dk, T* __restrict__ dv) {
  extern __shared__ float4 shared4[];
  float* const buf = reinterpret_cast<float*>(shared4);
  float* const rows = buf + P.TH * P.TW * P.T * P.s2pad;
  const Tile t = tile_of_block(P);

  // dk = sum dlogit * q over key-channel chunks.
  gather_tap_values(buf, dlogit_in, t, P);
  for (int c0 = 0; c0 < P.d; c0 += kChunk) {
    const int width = min(kChunk, P.d - c0);
    __syncthreads();  // buf complete / previous chunk consumed
    stage_halo_points(rows, q, P.d, c0, width, t, P);
    __syncthreads();
    gather_chunk(dk, P.d, c0, width, rows, buf, t, P);
  }
  __syncthreads();  // buf is rewritten below
  // dv = sum w * g over value-channel chunks.
  gather_tap_values(buf, w_in, t, P);
  for (int c0 = 0; c0 < P.C; c0 += kChunk) {
    const int width = min(kChunk, P.C - c0);
    __syncthreads();
    stage_halo_points(rows, g, P.C, c0, width, t, P);
    __syncthreads();
    gather_chunk(dv, P.C, c0, width, rows, buf, t, P);
  }
}


// Backward pass 2, one thread per element of dk (j < d) or dv (j >= d) of a low-res point; same
// summation order as the tiled kernel (taps dy outer, dx inner, then sub-pixels ascending).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_gather_simple(Params P, const T* __restrict__ q, const T* __restrict__ g,
                           const float* __restrict__ w_in, const float* __restrict__ dlogit_in,
                           T* __restrict__ dk, T* __restrict__ dv) {
  const int row = P.d + P.C;
  const int64_t total = P.n * P.H * static_cast<int64_t>(P.W) * row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += step) {
    const int j = static_cast<int>(idx % row);
    const int64_t m = idx / row;
    const int X = static_cast<int>(m % P.W);
    const int64_t rest = m / P.W;
    const int Y = static_cast<int>(rest % P.H);
    const int64_t b = rest / P.H;
    const bool key = j < P.d;
    const int c = key ? j : j - P.d;
    const int len = key ? P.d : P.C;
    const T* src = key ? q : g;
    const float* tapv = key ? dlogit_in : w_in;
    float acc = 0.f;
    int p = 0;
    for (int dy = -P.r; dy <= P.r; ++dy) {
      for (int dx = -P.r; dx <= P.r; ++dx, ++p) {
        const int ly = Y - dy, lx = X - dx;
        if (ly < 0 || ly >= P.H || lx < 0 || lx >= P.W) continue;
        for (int sy = 0; sy < P.s; ++sy) {
          for (int sx = 0; sx < P.s; ++sx) {
            const int64_t o = pixel(b, ly * P.s + sy, lx * P.s + sx, P.oH, P.oW);
            acc = fmaf(tapv[o * P.T + p], to_f(src[o * len + c]), acc);
          }
        }
      }
    }
    if (key)
      dk[m * P.d + c] = from_f<T>(acc);
    else
      dv[m * P.C + c] = from_f<T>(acc);
  }
}

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_BACKWARD_GATHER_CUH_

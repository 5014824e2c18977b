// Second-generation backward pass 2 (issue 15): dk[m] = sum dlogit * q and dv[m] = sum w * g,
// gathered per low-res point m over the taps p and sub-pixels of the centres m - p, with K and s
// fixed at compile time (every division is by a constant), the halo of output points staged
// unclipped with zeros outside the map (no bounds checks in the gather), and a register-blocked
// gather: a thread owns one channel of a vertical strip of two low-res points, so each staged
// value it loads feeds both points' FMAs (K + 1 halo rows serve the 2 x K tap rows).
//
// The order of the sum is fixed (halo row, then column, then sub-pixel), so the results are
// bitwise reproducible; it differs from the generic kernel's tap order, hence rounding-level
// differences between the two generations.
//
// Shared memory (floats): [per-tap values: TH*TW*T*s2pad][halo points: rows*cols*s2*kChunk] with
// rows = TH rounded up to even + 2r and cols = TW + 2r (the strip's second point of an odd last
// row reads one row past the tile; its result is discarded).
#ifndef SAPA_JAX_XLA_FFI_CUDA_V2_GATHER_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_V2_GATHER_CUH_

#include "cuda/tile.cuh"
#include "cuda/v2_forward.cuh"  // Shape, div_small
#include "cuda/v2_plan.h"
#include "cuda/v2_stage.cuh"  // stage_points_padded

namespace sapa::cuda::v2 {
template <int K, int S> constexpr int kUnrollRows = K * S * S <= 20 ? K + 1 : 1;

__device__ __forceinline__ PaddedHalo strip_halo(const Tile& t, int r) {
  return PaddedHalo{t.ty0 - r, t.tx0 - r, (t.ch + kStrip - 1) / kStrip * kStrip + 2 * r,
                    t.cw + 2 * r};
}

// buf[(mi * T + p) * s2pad + si] = src[point (centre m - p, sub-pixel si)][p] for the centres
// m - p inside the map (0 elsewhere): the scratch rows of the halo's output rows, read
// contiguously. As gather_tap_values, with every division by a compile-time constant.
template <int K, int S>
__device__ __forceinline__ void gather_taps(float* buf, const float* __restrict__ src,
                                            const Tile& t, const Params& P) {
  using Sh = Shape<K, S>;
  zero_shared(buf, t.ncent * Sh::T * Sh::s2pad);
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // The halo centres that exist (clipped to the map): their output rows are the scratch rows.
  const int ly0 = max(t.ty0 - Sh::r, 0), ly1 = min(t.ty0 + t.ch + Sh::r, P.H);
  const int lx0 = max(t.tx0 - Sh::r, 0), lx1 = min(t.tx0 + t.cw + Sh::r, P.W);
  const int run = (lx1 - lx0) * S * Sh::T;
  for (int row = warp; row < (ly1 - ly0) * S; row += kWarps) {
    const int hy = row / S, sy = row - hy * S;
    const float* base = src + pixel(t.b, ly0 * S + row, lx0 * S, P.oH, P.oW) * Sh::T;
    for (int e = lane; e < run; e += 32) {
      const int col = e / Sh::T, tap = e - col * Sh::T;
      const int hx = col / S, sx = col - hx * S;
      const int ky = tap / K, kx = tap - ky * K;
      const int my = ly0 + hy + ky - Sh::r - t.ty0, mx = lx0 + hx + kx - Sh::r - t.tx0;
      if (my >= 0 && my < t.ch && mx >= 0 && mx < t.cw)
        buf[((my * t.cw + mx) * Sh::T + tap) * Sh::s2pad + sy * S + sx] = base[e];
    }
  }
}

// dst[m][c0 + c] = sum over the taps p and sub-pixels si of buf[m][p][si] * rows[m - p][si][c],
// for the two points (cy, cx) and (cy + 1, cx) of a strip. Work item = (strip, lane = channel).
// Halo row cy + j (j = 0 .. K) holds the centres m - p of tap row K - 1 - j of the first point
// and K - j of the second: one load, up to two FMAs.
template <int K, int S, typename T>
__device__ __forceinline__ void gather_strips(T* __restrict__ dst, int row_len, int c0, int width,
                                              const float* rows, const float* buf,
                                              const PaddedHalo& h, const Tile& t,
                                              const Params& P) {
  using Sh = Shape<K, S>;
  const int strips_y = (t.ch + kStrip - 1) / kStrip;
  const int items = strips_y * t.cw * 32;
  const float inv_cw = 1.f / static_cast<float>(t.cw);
  for (int it = threadIdx.x; it < items; it += kThreads) {
    const int lane = it & 31;
    if (lane >= width) continue;
    const int strip = it >> 5;
    const int sy = div_small(strip, inv_cw), cx = strip - sy * t.cw;
    const int cy = sy * kStrip;
    const bool second = cy + 1 < t.ch;
    const int m0 = cy * t.cw + cx;
    const float* w0 = buf + m0 * Sh::T * Sh::s2pad;
    const float* w1 = second ? w0 + t.cw * Sh::T * Sh::s2pad : w0;  // discarded if !second
    // Halo pixel (cy + j, cx + 2r - kx) is centre m - p for the tap (K - 1 - j, kx) of m0.
    const float* src = rows + (cy * h.cols + cx + 2 * Sh::r) * Sh::s2 * kChunk + lane;
    float acc0 = 0.f, acc1 = 0.f;
    // Halo rows unrolled only while the row holds few FMAs: beyond that (K = 7 or s = 4) a fully
    // unrolled strip needs more than the 80 registers of 3 blocks per SM and ptxas spills.
#pragma unroll(kUnrollRows<K, S>)
    for (int j = 0; j <= K; ++j) {
#pragma unroll
      for (int kx = 0; kx < K; ++kx) {
        const float* v = src + (j * h.cols - kx) * Sh::s2 * kChunk;
#pragma unroll
        for (int g = 0; g < Sh::groups; ++g) {
          float x[kSub];  // the group's staged values, loaded once for both points
#pragma unroll
          for (int i = 0; i < kSub; ++i)
            x[i] = 4 * g + i < Sh::s2 ? v[(4 * g + i) * kChunk] : 0.f;
          if (j < K) {  // tap row K - 1 - j of the first point
            const float4 w = reinterpret_cast<const float4*>(
                w0 + ((K - 1 - j) * K + kx) * Sh::s2pad)[g];
            acc0 = fmaf(w.x, x[0], acc0);
            if (4 * g + 1 < Sh::s2) acc0 = fmaf(w.y, x[1], acc0);
            if (4 * g + 2 < Sh::s2) acc0 = fmaf(w.z, x[2], acc0);
            if (4 * g + 3 < Sh::s2) acc0 = fmaf(w.w, x[3], acc0);
          }
          if (j > 0) {  // tap row K - j of the second point
            const float4 w = reinterpret_cast<const float4*>(
                w1 + ((K - j) * K + kx) * Sh::s2pad)[g];
            acc1 = fmaf(w.x, x[0], acc1);
            if (4 * g + 1 < Sh::s2) acc1 = fmaf(w.y, x[1], acc1);
            if (4 * g + 2 < Sh::s2) acc1 = fmaf(w.z, x[2], acc1);
            if (4 * g + 3 < Sh::s2) acc1 = fmaf(w.w, x[3], acc1);
          }
        }
      }
    }
    T* o = dst + pixel(t.b, t.ty0 + cy, t.tx0 + cx, P.H, P.W) * row_len + c0 + lane;
    o[0] = from_f<T>(acc0);
    if (second) o[int64_t{P.W} * row_len] = from_f<T>(acc1);
  }
}

// The chunks of this block's channel split (grid y), re-read from the block index at every use:
// the volatile read cannot be hoisted, so the range lives in no register between uses.
__device__ __forceinline__ ChunkRange block_chunks(const Params& P) {
#ifdef __CUDA_ARCH__
  unsigned split;
  asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(split));
#else
  const unsigned split = blockIdx.y;
#endif
  return split_range(gather_chunks(P), P.splits, static_cast<int>(split));
}

template <typename T, int K, int S>
__global__ void __launch_bounds__(kThreads, kTiledBlocksPerSm)
    backward_gather_v2(Params P, const T* __restrict__ q, const T* __restrict__ g,
                       const float* __restrict__ w_in, const float* __restrict__ dlogit_in,
                       T* __restrict__ dk, T* __restrict__ dv) {
  using Sh = Shape<K, S>;
  extern __shared__ float4 shared4[];
  float* const buf = reinterpret_cast<float*>(shared4);
  float* const rows = buf + P.TH * P.TW * Sh::T * Sh::s2pad;
  const Tile t = tile_of_block(P);
  const PaddedHalo h = strip_halo(t, Sh::r);
  // Channel split (grid y): the P.splits blocks of a tile take a share each of the chunk list
  // (dk chunks over d, then dv chunks over C). The share is recomputed where it is tested
  // (block_chunks), so that no register carries it through the gather, which runs at the
  // 80-register limit of 3 blocks per SM.
  const int keys = gather_key_chunks(P);

  // dk = sum dlogit * q over the split's key-channel chunks.
  if (block_chunks(P).begin < keys) {
    gather_taps<K, S>(buf, dlogit_in, t, P);
    for (int c0 = block_chunks(P).begin * kChunk; c0 < P.d && c0 < block_chunks(P).end * kChunk;
         c0 += kChunk) {
      const int width = min(kChunk, P.d - c0);
      __syncthreads();  // buf complete / previous chunk consumed
      stage_points_padded<S>(rows, q, P.d, c0, width, h, t, P);
      __syncthreads();
      gather_strips<K, S>(dk, P.d, c0, width, rows, buf, h, t, P);
    }
    __syncthreads();  // buf is rewritten below
  }
  // dv = sum w * g over the split's value-channel chunks.
  if (block_chunks(P).end > keys) {
    gather_taps<K, S>(buf, w_in, t, P);
    for (int c0 = (max(block_chunks(P).begin, keys) - keys) * kChunk;
         c0 < P.C && c0 < (block_chunks(P).end - keys) * kChunk; c0 += kChunk) {
      const int width = min(kChunk, P.C - c0);
      __syncthreads();
      stage_points_padded<S>(rows, g, P.C, c0, width, h, t, P);
      __syncthreads();
      gather_strips<K, S>(dv, P.C, c0, width, rows, buf, h, t, P);
    }
  }
}

}  // namespace sapa::cuda::v2

#endif  // SAPA_JAX_XLA_FFI_CUDA_V2_GATHER_CUH_

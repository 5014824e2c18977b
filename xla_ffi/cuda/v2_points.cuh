// Second-generation backward pass 1 ("backward_points", issue 15): per output point the logits
// again, w from the saved stats, dw_p = g . v[l+p], dlogit (sapa::point_logit_gradients),
// dq = sum_p dlogit_p k[l+p], and w, dlogit into the scratch outputs, with K and s fixed at
// compile time, the k/v halo staged unclipped with zeros outside the map (cuda/v2_stage.cuh),
// so no tap loop checks bounds, and g held in registers like q: each thread takes one output
// point and its 32-channel chunk of g (or q) as vector loads from global memory, and runs the
// forward's unrolled window dot (logits_unrolled) over the staged v (or k) halo. Nothing per
// point is staged, so the tile can hold as many output points as the block has threads (8 x 8
// centres at s = 2: 256), and the per-point phases keep every thread busy.
//
// Zero padding and the poison terms (sapa_common.h): a padded tap's logit is q . 0 (0, or NaN
// for a non-finite q) and its dw g . 0, exactly what the generic kernel computes for an
// out-of-map tap; in dq the padded k is 0, so with border "zeros" dlogit_p * 0 is dq's poison
// term itself. With border "valid" the padded taps are not counted (the counted-tap mask below,
// outside the tap loops): their dlogit is 0, and dq's poison (raw logit * 0 under sigmoid and
// softplus) is kept per point, as in the generic kernel.
//
// Shared memory (floats; host side: v2::points_shared_floats in cuda/v2_plan.h):
//   [w: TH*TW*T*s2pad][dlogit: same][poison: TH*TW*s2pad][halo: (TH+2r)*(TW+2r)*kChunkStride]
// The halo holds v chunks for dw, then k chunks for the logits and dq; dq runs its chunks from
// the last one down, so the chunk the logits left in the halo is used without restaging.
#ifndef SAPA_JAX_XLA_FFI_CUDA_V2_POINTS_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_V2_POINTS_CUH_

#include "cuda/backward_points.cuh"  // write_scratch
#include "cuda/tile.cuh"
#include "cuda/v2_forward.cuh"  // Shape, centre_point, div_small, logits_unrolled
#include "cuda/v2_plan.h"
#include "cuda/v2_stage.cuh"

namespace sapa::cuda::v2 {

// Bit i set where row (or column) centre + i - K / 2 of a window lies in 0 .. n - 1.
template <int K> __device__ __forceinline__ unsigned inside_bits(int centre, int n) {
  unsigned bits = 0;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int y = centre + i - K / 2;
    bits |= (y >= 0 && y < n ? 1u : 0u) << i;
  }
  return bits;
}

// Per output point, in place: logits -> weights (wbuf) and dw -> dlogit (dbuf), and dq's
// poison. One thread per point, the same points per thread as logits_unrolled, so no barrier
// separates them.
template <int K, int S>
__device__ __forceinline__ void point_gradients(float* wbuf, float* dbuf, float* poison,
                                                const float* __restrict__ stats, const Tile& t,
                                                const Params& P) {
  using Sh = Shape<K, S>;
  const int npts = t.ncent * Sh::s2;
  const float inv_cw = 1.f / static_cast<float>(t.cw);
  const bool zeros = P.border == sapa::kZeros;
  for (int pt = threadIdx.x; pt < npts; pt += kThreads) {
    const CentrePoint<S> cp = centre_point<S>(pt, t, inv_cw);
    const int Y = t.ty0 + cp.cy, X = t.tx0 + cp.cx;
    float* w = wbuf + cp.ci * Sh::T * Sh::s2pad + cp.si;
    float* dw = dbuf + cp.ci * Sh::T * Sh::s2pad + cp.si;
    const float2 st = reinterpret_cast<const float2*>(
        stats)[pixel(t.b, Y * S + cp.sy, X * S + cp.sx, P.oH, P.oW)];
    // Counted taps: all with border "zeros", the inside ones with "valid".
    const unsigned all = (1u << K) - 1;
    const unsigned rows = zeros ? all : inside_bits<K>(Y, P.H);
    const unsigned cols = zeros ? all : inside_bits<K>(X, P.W);
    auto counted = [&](int p) { return ((rows >> (p / K)) & (cols >> (p % K)) & 1u) != 0; };
    float outside = 0.f;  // dq's poison, border "valid": from the raw logits, before they change
    if (!zeros)
#pragma unroll
      for (int p = 0; p < Sh::T; ++p)
        if (!counted(p))
          outside += sapa::dq_poison_term<float>(P.normalizer, sapa::kValid, w[p * Sh::s2pad],
                                                 0.f);
    sapa::point_logit_gradients<float>(
        P.normalizer, P.eps, st.x, st.y, Sh::T,
        [&](int64_t tap, float* x, float* wt, float* dwt) {
          const bool c = counted(static_cast<int>(tap));
          *x = w[tap * Sh::s2pad];
          *wt = sapa::tap_weight(P.normalizer, *x, st.x, st.y, c);
          *dwt = dw[tap * Sh::s2pad];
          return c;
        },
        [&](int64_t tap, float wt, float dl) {
          w[tap * Sh::s2pad] = wt;
          dw[tap * Sh::s2pad] = dl;
        });
    poison[cp.ci * Sh::s2pad + cp.si] = outside;
  }
}

// dst[point][c0 + c] = poison[point] + sum over the T taps p of dlogit[ci][p][si] *
// Kh[padded halo pixel of l + p][c] for c < width <= kChunk, Kh a key chunk at row stride
// kChunkStride. Work item = (centre, group of 4 sub-pixels, 4 adjacent channels), the forward's
// blocked tap loop: 8 lanes cover the chunk, a warp four items; padded taps and channels past
// width read the staged zeros.
template <int K, int S, typename T>
__device__ __forceinline__ void assemble_dq(T* __restrict__ dst, int c0, int width,
                                            const float* Kh, const float* dbuf,
                                            const float* poison, const PaddedHalo& h,
                                            const Tile& t, const Params& P) {
  using Sh = Shape<K, S>;
  constexpr int kLanes = kChunk / kBlockChannels;  // work items per (centre, group)
  const int items = t.ncent * Sh::groups * kLanes;
  const float inv_cw = 1.f / static_cast<float>(t.cw);
  const int64_t out_row = int64_t{P.oW} * P.d;  // one output row, in elements
  for (int it = threadIdx.x; it < items; it += kThreads) {
    const BlockItem b = block_item<kLanes, Sh::groups>(it, t, inv_cw);
    if (b.c >= width) continue;
    const float4 p4 = *reinterpret_cast<const float4*>(poison + b.ci * Sh::s2pad + b.sg * kSub);
    AssemblyBlock acc;
    const float start[kSub] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
    for (int i = 0; i < kSub; ++i)
#pragma unroll
      for (int j = 0; j < kBlockChannels; ++j) acc[i][j] = start[i];
    blocked_taps<K, kChunkStride, Sh::s2pad>(Kh + (b.cy * h.cols + b.cx) * kChunkStride + b.c,
                                             h.cols, dbuf + b.ci * Sh::T * Sh::s2pad + b.sg * kSub,
                                             acc);
    T* const o0 =
        dst + pixel(t.b, (t.ty0 + b.cy) * S, (t.tx0 + b.cx) * S, P.oH, P.oW) * P.d + c0 + b.c;
    store_block<S>(o0, out_row, P.d, b.sg, min(kBlockChannels, width - b.c), acc);
  }
}

// Two blocks per multiprocessor, so up to 128 registers: at three (80 registers) ptxas spills
// a few bytes in most instantiations (q's or g's chunk, 32 floats, is live across the unrolled
// window dot while the tile's state lives across all phases).
constexpr int kPointsBlocksPerSm = 2;

template <typename T, int K, int S>
__global__ void __launch_bounds__(kThreads, kPointsBlocksPerSm)
    backward_points_v2(Params P, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const float* __restrict__ stats,
                       const T* __restrict__ g, T* __restrict__ dq, float* __restrict__ w_out,
                       float* __restrict__ dlogit_out) {
  using Sh = Shape<K, S>;
  extern __shared__ float4 shared4[];
  const int tap_max = P.TH * P.TW * Sh::T * Sh::s2pad;
  float* const wbuf = reinterpret_cast<float*>(shared4);  // logits, then w
  float* const dbuf = wbuf + tap_max;                     // dw, then dlogit
  float* const poison = dbuf + tap_max;                   // of dq, per point
  float* const halo = poison + P.TH * P.TW * Sh::s2pad;
  const Tile t = tile_of_block(P);
  const PaddedHalo h = padded_halo(t, Sh::r);

  // Padded sub-pixels stay 0, and so does everything when d == 0 or C == 0.
  zero_shared(wbuf, t.ncent * Sh::T * Sh::s2pad);
  zero_shared(dbuf, t.ncent * Sh::T * Sh::s2pad);
  zero_shared(poison, t.ncent * Sh::s2pad);
  __syncthreads();  // the chunk loops' barriers would do, but they have none when d == C == 0

  // dw_p = g . v[l + p] over chunks of 32 value channels: logits_unrolled with g's rows (C
  // channels) in place of q's.
  Params Pg = P;
  Pg.d = P.C;
  for (int c0 = 0; c0 < P.C; c0 += kChunk) {
    stage_padded(halo, kChunkStride, kChunk, v, P.C, c0, min(kChunk, P.C - c0), h, t, P);
    __syncthreads();
    if (c0 == 0)
      logits_unrolled<K, S, true>(dbuf, halo, g, c0, h, t, Pg);
    else
      logits_unrolled<K, S, false>(dbuf, halo, g, c0, h, t, Pg);
    __syncthreads();  // halo is restaged next
  }
  // Logits; afterwards the halo holds the last key chunk.
  for (int c0 = 0; c0 < P.d; c0 += kChunk) {
    stage_padded(halo, kChunkStride, kChunk, k, P.d, c0, min(kChunk, P.d - c0), h, t, P);
    __syncthreads();
    if (c0 == 0)
      logits_unrolled<K, S, true>(wbuf, halo, q, c0, h, t, P);
    else
      logits_unrolled<K, S, false>(wbuf, halo, q, c0, h, t, P);
    __syncthreads();  // halo is restaged next
  }

  point_gradients<K, S>(wbuf, dbuf, poison, stats, t, P);
  __syncthreads();  // every point's w and dlogit in place

  write_scratch(w_out, dlogit_out, wbuf, dbuf, t, P, S, Sh::T, Sh::s2pad);

  // dq over the key chunks, last first: the logits left that one in the halo.
  const int last = P.d > 0 ? (P.d - 1) / kChunk * kChunk : -1;
  for (int c0 = last; c0 >= 0; c0 -= kChunk) {
    const int width = min(kChunk, P.d - c0);
    if (c0 != last) {
      __syncthreads();  // previous chunk consumed
      stage_padded(halo, kChunkStride, kChunk, k, P.d, c0, width, h, t, P);
      __syncthreads();
    }
    assemble_dq<K, S>(dq, c0, width, halo, dbuf, poison, h, t, P);
  }
}

}  // namespace sapa::cuda::v2

#endif  // SAPA_JAX_XLA_FFI_CUDA_V2_POINTS_CUH_

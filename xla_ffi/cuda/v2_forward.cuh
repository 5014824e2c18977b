// Second-generation tiled forward kernel (issue 15): K and s fixed at compile time, taps fully
// unrolled, and the k/v halo staged *unclipped*, with zeros where the window leaves the map, so
// the tap loops carry no bounds checks. Zero padding is the operator's own border rule
// (docs/design.md §1): an out-of-map tap's logit is q.0 and its value 0, so
//   zeros border: the padded tap's weight w times the staged 0 is exactly the "poison" term the
//                 generic kernel adds separately (0, or NaN for a non-finite w; sapa_common.h);
//   valid border: the tap is not counted (tap_weight gives 0), so it adds 0 * 0 = 0.
// The counted-tap decision for border="valid" stays in the per-point normalisation, outside the
// tap loops, exactly as in the generic kernel.
//
// Shared memory (floats): [weights: TH*TW*T*s2pad][halo: (TH+2r)*(TW+2r)*kValueChunk]; the halo
// region holds k chunks at row stride kChunkStride, then v chunks at row stride kValueChunk.
//
// Host side (where v2 applies, its shared-memory size): cuda/v2_plan.h.
#ifndef SAPA_JAX_XLA_FFI_CUDA_V2_FORWARD_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_V2_FORWARD_CUH_

#include "cuda/tile.cuh"
#include "cuda/v2_plan.h"
#include "cuda/v2_stage.cuh"  // PaddedHalo, stage_padded

namespace sapa::cuda::v2 {

// Compile-time shape of one specialisation.
template <int K, int S> struct Shape {
  static constexpr int r = K / 2;
  static constexpr int T = K * K;
  static constexpr int s2 = S * S;
  static constexpr int s2pad = (s2 + kSub - 1) / kSub * kSub;
  static constexpr int groups = s2pad / kSub;  // float4 groups of sub-pixel weights per tap
};

// n / m for 0 <= n < 2^20 and 1 <= m <= 2^10 given inv = 1.f / m (correctly rounded): (n + 0.5) / m
// is at least 1 / (2m) from an integer, far more than the float error of the product, so the
// truncation is exact. Replaces the ~25-instruction integer division by a runtime tile width.
__device__ __forceinline__ int div_small(int n, float inv) {
  return static_cast<int>((static_cast<float>(n) + 0.5f) * inv);
}

// Output point pt of a tile (numbered centre-major, as point_of), with s known at compile time
// and the division by the tile width done by div_small.
template <int S> struct CentrePoint {
  int ci, si, cy, cx, sy, sx;  // centre (index, tile row and column), sub-pixel (index, row, col)
};
template <int S>
__device__ __forceinline__ CentrePoint<S> centre_point(int pt, const Tile& t, float inv_cw) {
  CentrePoint<S> q;
  q.ci = pt / (S * S);
  q.si = pt - q.ci * (S * S);
  q.cy = div_small(q.ci, inv_cw);
  q.cx = q.ci - q.cy * t.cw;
  q.sy = q.si / S;
  q.sx = q.si - q.sy * S;
  return q;
}

// a[c] = channel c0 + c of row (0 past d) as 4-element vector loads; needs P.vec_q (d % 4 == 0
// and an aligned q), which the launcher checks before it picks a v2 kernel. A whole chunk (every
// chunk but a tail) loads without the per-quad tests and zeroed registers.
template <typename T>
__device__ __forceinline__ void load_query_quads(const T* __restrict__ row, int width,
                                                 float (&a)[kChunk]) {
  const bool whole = width >= kChunk;
#pragma unroll
  for (int u = 0; u < kChunk / 4; ++u) {
    const float4 x =
        whole || 4 * u < width ? load4(row + 4 * u) : make_float4(0.f, 0.f, 0.f, 0.f);
    a[4 * u + 0] = x.x;
    a[4 * u + 1] = x.y;
    a[4 * u + 2] = x.z;
    a[4 * u + 3] = x.w;
  }
}

// buf[(ci * T + p) * s2pad + si] (+)= q_pt . k[l + p] over one 32-channel chunk, for every tap p
// of every output point pt of the tile: one thread per point, its q chunk in registers, the k
// rows of the padded halo read as float4 at compile-time offsets. One FMA chain per tap (the 25
// or 49 independent taps give the scheduler its parallelism). kFirst stores instead of adding
// (the first chunk, the only one for d <= 32), which saves a shared load and an add per tap.
template <int K, int S, bool kFirst, typename T>
__device__ __forceinline__ void logits_unrolled(float* buf, const float* B,
                                                const T* __restrict__ q, int c0,
                                                const PaddedHalo& h, const Tile& t,
                                                const Params& P) {
  using Sh = Shape<K, S>;
  const int npts = t.ncent * Sh::s2;
  const int width = min(kChunk, P.d - c0);
  const float inv_cw = 1.f / static_cast<float>(t.cw);
  // q of the tile's first output point; the others are rows and columns away from it.
  const T* const q0 = q + pixel(t.b, t.ty0 * S, t.tx0 * S, P.oH, P.oW) * P.d + c0;
  const int64_t q_row = int64_t{P.oW} * P.d;
  for (int pt = threadIdx.x; pt < npts; pt += kThreads) {
    const CentrePoint<S> cp = centre_point<S>(pt, t, inv_cw);
    float a[kChunk];
    load_query_quads(q0 + (cp.cy * S + cp.sy) * q_row + (cp.cx * S + cp.sx) * P.d, width, a);
    const float* base = B + (cp.cy * h.cols + cp.cx) * kChunkStride;  // window's top-left
    float* acc = buf + cp.ci * Sh::T * Sh::s2pad + cp.si;
#pragma unroll
    for (int dy = 0; dy < K; ++dy) {
      const float* brow = base + dy * h.cols * kChunkStride;
#pragma unroll
      for (int dx = 0; dx < K; ++dx) {
        const float4* b4 = reinterpret_cast<const float4*>(brow + dx * kChunkStride);
        float dot = 0.f;
#pragma unroll
        for (int u = 0; u < kChunk / 4; ++u) {
          const float4 bv = b4[u];
          dot = fmaf(a[4 * u + 0], bv.x, dot);
          dot = fmaf(a[4 * u + 1], bv.y, dot);
          dot = fmaf(a[4 * u + 2], bv.z, dot);
          dot = fmaf(a[4 * u + 3], bv.w, dot);
        }
        float& slot = acc[(dy * K + dx) * Sh::s2pad];
        if (kFirst)
          slot = dot;
        else
          slot += dot;
      }
    }
  }
}

// Register block of the assemblies: kSub sub-pixels x kBlockChannels adjacent channels of one
// centre, one work item's outputs (docs/design.md §3, register-blocked assembly).
constexpr int kBlockChannels = 4;
using AssemblyBlock = float[kSub][kBlockChannels];

// acc[i][j] += sum over the T taps p of w[p * kTapStride + i] * x[window pixel p][j], taps in
// row-major order (that of the unblocked loops it replaced, so the sums are bitwise theirs).
// x points at the item's first channel in the window's top-left pixel of a padded halo (pixel
// stride kPixel floats, cols pixels a row), w at the item's sub-pixel group of tap 0. One float4
// of x and one of w feed 16 FMAs: the tap loop of both the forward assembly and pass 1's dq.
template <int K, int kPixel, int kTapStride>
__device__ __forceinline__ void blocked_taps(const float* x, int cols, const float* w,
                                             AssemblyBlock& acc) {
// K = 7: one window row per iteration (49 unrolled taps spilled at s = 4)
#pragma unroll(K <= 5 ? K : 1)
  for (int dy = 0; dy < K; ++dy) {
    const float* xrow = x + dy * cols * kPixel;
#pragma unroll
    for (int dx = 0; dx < K; ++dx) {
      const float4 x4 = *reinterpret_cast<const float4*>(xrow + dx * kPixel);
      const float4 w4 = *reinterpret_cast<const float4*>(w + (dy * K + dx) * kTapStride);
      const float xs[kBlockChannels] = {x4.x, x4.y, x4.z, x4.w};
      const float ws[kSub] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
      for (int i = 0; i < kSub; ++i)
#pragma unroll
        for (int j = 0; j < kBlockChannels; ++j) acc[i][j] = fmaf(ws[i], xs[j], acc[i][j]);
    }
  }
}

// Work item `it` of a blocked assembly (kLanes items per centre and sub-pixel group, each
// kBlockChannels channels): its first channel c in the chunk, its centre (index ci, tile row cy,
// column cx) and its sub-pixel group sg.
struct BlockItem {
  int c, ci, sg, cy, cx;
};
template <int kLanes, int kGroups>
__device__ __forceinline__ BlockItem block_item(int it, const Tile& t, float inv_cw) {
  BlockItem b;
  b.c = kBlockChannels * (it % kLanes);
  const int grp = it / kLanes;
  b.ci = grp / kGroups;
  b.sg = grp - b.ci * kGroups;
  b.cy = div_small(b.ci, inv_cw);
  b.cx = b.ci - b.cy * t.cw;
  return b;
}

// Writes a work item's block: channels 0 .. n - 1 (n <= kBlockChannels) of the sub-pixels of
// group sg that exist. o0 points at the item's first channel of the centre's sub-pixel (0, 0);
// the others are whole output rows (out_row elements) and points (row_len elements) away.
template <int S, typename T>
__device__ __forceinline__ void store_block(T* __restrict__ o0, int64_t out_row, int row_len,
                                            int sg, int n, const AssemblyBlock& acc) {
#pragma unroll
  for (int i = 0; i < kSub; ++i) {
    const int si = sg * kSub + i;
    if (si >= S * S) break;
    const int sy = si / S;
    T* o = o0 + sy * out_row + (si - sy * S) * row_len;
#pragma unroll
    for (int j = 0; j < kBlockChannels; ++j)
      if (j < n) o[j] = from_f<T>(acc[i][j]);
  }
}

// dst[point][c0 + c] = sum over all T taps p of wbuf[ci][p][si] * V[padded halo pixel of l + p][c]
// for c < width <= kValueChunk. Work item = (centre, group of 4 sub-pixels, 4 adjacent
// channels): 16 lanes cover the chunk, a warp two items. Out-of-map taps read the staged zeros,
// and so do channels past width (the chunk is staged zero-padded): no branches in the taps.
template <int K, int S, typename T>
__device__ __forceinline__ void assemble_unrolled(T* __restrict__ dst, int row_len, int c0,
                                                  int width, const float* V, const float* wbuf,
                                                  const PaddedHalo& h, const Tile& t,
                                                  const Params& P) {
  using Sh = Shape<K, S>;
  constexpr int kLanes = kValueChunk / kBlockChannels;  // work items per (centre, group)
  const int items = t.ncent * Sh::groups * kLanes;
  const float inv_cw = 1.f / static_cast<float>(t.cw);
  const int64_t out_row = int64_t{P.oW} * row_len;  // one output row, in elements
  for (int it = threadIdx.x; it < items; it += kThreads) {
    const BlockItem b = block_item<kLanes, Sh::groups>(it, t, inv_cw);
    if (b.c >= width) continue;
    AssemblyBlock acc = {};
    blocked_taps<K, kValueChunk, Sh::s2pad>(V + (b.cy * h.cols + b.cx) * kValueChunk + b.c,
                                            h.cols, wbuf + b.ci * Sh::T * Sh::s2pad + b.sg * kSub,
                                            acc);
    T* const o0 = dst + pixel(t.b, (t.ty0 + b.cy) * S, (t.tx0 + b.cx) * S, P.oH, P.oW) * row_len +
                  c0 + b.c;
    store_block<S>(o0, out_row, row_len, b.sg, min(kBlockChannels, width - b.c), acc);
  }
}

// Normalises the logits of every output point of the tile in place and writes its stats (the
// generic kernel's per-point phase, without the poison buffer the padded halo makes needless);
// stats == nullptr: another block of the tile (channel split) writes them.
__device__ __forceinline__ void normalise_points(float* wbuf, float* __restrict__ stats,
                                                 const Tile& t, const Params& P) {
  const int npts = t.ncent * P.s2;
  for (int pt = threadIdx.x; pt < npts; pt += kThreads) {
    const Point p = point_of(pt, t, P);
    float* w = wbuf + p.ci * P.T * P.s2pad + p.si;
    const float2 st = tap_stats(w, P.s2pad, p.Y, p.X, P);
    for_each_tap(p.Y, p.X, P, [&](int tap, bool inside) {
      float& x = w[tap * P.s2pad];
      x = sapa::tap_weight(P.normalizer, x, st.x, st.y, sapa::tap_counted(P.border, inside));
    });
    if (stats) reinterpret_cast<float2*>(stats)[pixel(t.b, p.oy, p.ox, P.oH, P.oW)] = st;
  }
}

template <typename T, int K, int S>
__global__ void __launch_bounds__(kThreads, kTiledBlocksPerSm)
    forward_v2(Params P, const T* __restrict__ q, const T* __restrict__ k,
               const T* __restrict__ v, T* __restrict__ out, float* __restrict__ stats) {
  using Sh = Shape<K, S>;
  extern __shared__ float4 shared4[];
  float* const wbuf = reinterpret_cast<float*>(shared4);
  float* const halo = wbuf + P.TH * P.TW * Sh::T * Sh::s2pad;
  const Tile t = tile_of_block(P);
  const PaddedHalo h = padded_halo(t, Sh::r);

  zero_shared(wbuf, t.ncent * Sh::T * Sh::s2pad);  // padded sub-pixels stay 0; d == 0 too
  __syncthreads();  // the chunk loop's barriers would do, but it has none when d == 0

  // Logits over chunks of 32 key channels; the first chunk stores.
  for (int c0 = 0; c0 < P.d; c0 += kChunk) {
    stage_padded(halo, kChunkStride, kChunk, k, P.d, c0, min(kChunk, P.d - c0), h, t, P);
    __syncthreads();
    if (c0 == 0)
      logits_unrolled<K, S, true>(wbuf, halo, q, c0, h, t, P);
    else
      logits_unrolled<K, S, false>(wbuf, halo, q, c0, h, t, P);
    __syncthreads();  // halo is restaged next
  }

  // Channel split (grid y, read only here so that no register holds it through the logits):
  // the P.splits blocks of a tile compute its weights alike and assemble a share of the value
  // chunks each; the first writes the stats.
  const int split = static_cast<int>(blockIdx.y);
  // each thread touches only the points it accumulated
  normalise_points(wbuf, split == 0 ? stats : nullptr, t, P);

  // Assembly over the split's chunks of 64 value channels.
  const ChunkRange values = split_range(forward_chunks(P), P.splits, split);
  const int c_end = min(P.C, values.end * kValueChunk);
  for (int c0 = values.begin * kValueChunk; c0 < c_end; c0 += kValueChunk) {
    const int width = min(kValueChunk, P.C - c0);
    __syncthreads();  // weights complete / previous chunk consumed
    stage_padded(halo, kValueChunk, kValueChunk, v, P.C, c0, width, h, t, P);
    __syncthreads();
    assemble_unrolled<K, S>(out, P.C, c0, width, halo, wbuf, h, t, P);
  }
}

}  // namespace sapa::cuda::v2

#endif  // SAPA_JAX_XLA_FFI_CUDA_V2_FORWARD_CUH_

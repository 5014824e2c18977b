// Fused SAPA core for XLA:GPU (CUDA). Contract: docs/design.md §1 to §3; layouts, tap
// order, border rule and normaliser statistics: sapa_common.h; handler signature:
// sapa_handlers.h.
//
// Tiled kernels (the normal path). A block owns a tile of TH x TW low-res centres, i.e. the
// s*TH x s*TW output points whose windows are centred on them, and stages the low-res halo the
// tile sees (clipped to the map) in shared memory, channel chunk by channel chunk, so that no
// K*K-expanded copy of k or v ever exists in global memory.
//   forward          logits q.k -> softmax or h/(S+eps) -> out = sum_p w_p v[l+p] and stats.
//                    Logits: one thread per output point, its 32-channel chunk of q in
//                    registers, k rows of the halo read from shared memory as float4 (points of
//                    one centre read the same rows: broadcast). Assembly: threads run along the
//                    channels (coalesced v loads and out stores); each thread computes 4
//                    sub-pixel outputs of one centre for 2 channels, so every shared-memory v
//                    value feeds 4 FMAs and one float4 of weights feeds 8.
//   backward pass 1  per output point: logits again, w from the saved stats, dw_p = g.v[l+p],
//                    dlogit, dq; w and dlogit go to the scratch outputs.
//   backward pass 2  per low-res point m: dk[m] = sum dlogit * q, dv[m] = sum w * g over the taps
//                    p and the s*s output points of centre m - p, gathered in a fixed order.
// No atomics anywhere: every output element is summed by one thread in a fixed order, so the
// results are bitwise reproducible.
//
// Simple kernels (fallback) cover what the tiles cannot hold in shared memory (very large K or
// s): one warp per output point (forward, backward pass 1) and one thread per gradient element
// (backward pass 2), reading global memory directly. They are also an independent check of the
// tiled kernels: sapa::set_cuda_planner (the module's set_planner, for tests) can select them for
// every call, or cap the tile at n x n centres, to exercise every path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "sapa_common.h"
// The FFI headers trip diagnostics in nvcc's front end and in the host compiler behind it that a
// plain g++ build does not report (missing return after an exhaustive switch, always_inline on
// non-inline functions); they are not ours to fix.
#pragma nv_diagnostic push
#pragma nv_diag_suppress 940
#pragma nv_diag_suppress 2473
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wreturn-type"
#include "xla/ffi/api/ffi.h"
#include "sapa_handlers.h"
#include "sapa_validate.h"
#pragma GCC diagnostic pop
#pragma nv_diagnostic pop

namespace ffi = xla::ffi;

namespace {

constexpr int kThreads = 256;            // threads of every block
constexpr int kTiledBlocksPerSm = 3;     // tiled blocks meant to share a multiprocessor: the
                                         // planner gives each a third of its shared memory, and
                                         // __launch_bounds__ caps registers to match (<= 80)
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;               // channels per staged chunk in the dot products
constexpr int kChunkStride = 36;         // its shared row stride: 9 float4, an odd number, so
                                         // 8 consecutive rows hit 8 distinct 16-byte bank groups
constexpr int kValueChunk = 64;          // value channels per chunk in the forward assembly
constexpr int kSub = 4;                  // sub-pixel weights read together as one float4
constexpr int kMaxTilePoints = 512;      // output points per tile, for the preferred tiles

// Everything a kernel needs to know about the problem and the tiling; passed by value.
struct Params {
  int64_t n;          // flattened batch
  int H, W, oH, oW;   // low-res and output maps
  int s, s2, s2pad;   // scale, s*s, s*s rounded up to kSub
  int K, r, T;        // kernel size, radius, taps
  int d, C;           // query/key and value channels
  int normalizer, border;
  float eps;
  int TH, TW;             // tile of low-res centres
  int tiles_y, tiles_x;   // tile grid per image
  int vstride;            // shared row stride of the forward value chunks
  int vec_q;              // q rows can be read as aligned 4-element vectors
};

// ----------------------------------------------------------------------------------------------
// Element types: loads convert to float, stores round to nearest even.

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Four consecutive elements from a 4-element-aligned address, as one vector load.
__device__ __forceinline__ float4 load4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  __nv_bfloat162 lo, hi;
  memcpy(&lo, &raw.x, sizeof lo);
  memcpy(&hi, &raw.y, sizeof hi);
  const float2 a = __bfloat1622float2(lo), b = __bfloat1622float2(hi);
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 load4(const __half* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  __half2 lo, hi;
  memcpy(&lo, &raw.x, sizeof lo);
  memcpy(&hi, &raw.y, sizeof hi);
  const float2 a = __half22float2(lo), b = __half22float2(hi);
  return make_float4(a.x, a.y, b.x, b.y);
}

// Butterfly reductions: lane i adds x_i + x_{i^o}, lane i^o adds x_{i^o} + x_i, which is the
// same float, so every lane ends with the bitwise same result.
template <typename F> __device__ __forceinline__ F warp_sum(F x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
// The dw of the warp's first tap of largest weight, from each lane's (largest weight, its tap,
// its dw); every lane ends with the same one.
__device__ __forceinline__ float warp_pivot(float top, int tap, float pivot) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other_top = __shfl_xor_sync(0xffffffffu, top, o);
    const int other_tap = __shfl_xor_sync(0xffffffffu, tap, o);
    const float other_pivot = __shfl_xor_sync(0xffffffffu, pivot, o);
    if (other_top > top || (other_top == top && other_tap < tap)) {
      top = other_top;
      tap = other_tap;
      pivot = other_pivot;
    }
  }
  return pivot;
}
// NaN-propagating (fmaxf would drop a NaN, see sapa_common.h).
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = sapa::nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Offset of pixel (y, x) of batch element b in an (n, rows, cols, .) map, in pixels.
__device__ __forceinline__ int64_t pixel(int64_t b, int y, int x, int rows, int cols) {
  return (b * rows + y) * static_cast<int64_t>(cols) + x;
}

// Calls f(p, inside) for every tap p of the window centred on low-res (Y, X), in tap order.
template <class F>
__device__ __forceinline__ void for_each_tap(int Y, int X, const Params& P, F f) {
  int p = 0;
  for (int dy = -P.r; dy <= P.r; ++dy) {
    const bool row_in = Y + dy >= 0 && Y + dy < P.H;
    for (int dx = -P.r; dx <= P.r; ++dx, ++p) f(p, row_in && X + dx >= 0 && X + dx < P.W);
  }
}

// Is tap p of the window centred on low-res (Y, X) inside the map?
__device__ __forceinline__ bool tap_in_map(int p, int Y, int X, const Params& P) {
  const int y = Y + p / P.K - P.r, x = X + p % P.K - P.r;
  return y >= 0 && y < P.H && x >= 0 && x < P.W;
}

// Normaliser statistics of one output point from its logits w[p * stride] (sapa_common.h).
__device__ __forceinline__ float2 tap_stats(const float* w, int stride, int Y, int X,
                                            const Params& P) {
  float2 st;
  sapa::point_stats<float>(
      P.normalizer, P.eps, P.T, [&](int64_t p) { return w[p * stride]; },
      [&](int64_t p) {
        return P.border == sapa::kZeros || tap_in_map(static_cast<int>(p), Y, X, P);
      },
      &st.x, &st.y);
  return st;
}

// ----------------------------------------------------------------------------------------------
// Tiles.

struct Tile {
  int64_t b;
  int ty0, tx0, ch, cw, ncent;  // centres [ty0, ty0 + ch) x [tx0, tx0 + cw) of image b
  int hy0, hx0, hh, hw;         // low-res pixels their windows reach, clipped to the map
};

__device__ __forceinline__ Tile tile_of_block(const Params& P) {
  Tile t;
  int64_t blk = blockIdx.x;
  const int tx = static_cast<int>(blk % P.tiles_x);
  blk /= P.tiles_x;
  const int ty = static_cast<int>(blk % P.tiles_y);
  t.b = blk / P.tiles_y;
  t.ty0 = ty * P.TH;
  t.tx0 = tx * P.TW;
  t.ch = min(P.TH, P.H - t.ty0);
  t.cw = min(P.TW, P.W - t.tx0);
  t.ncent = t.ch * t.cw;
  t.hy0 = max(t.ty0 - P.r, 0);
  t.hx0 = max(t.tx0 - P.r, 0);
  t.hh = min(t.ty0 + t.ch + P.r, P.H) - t.hy0;
  t.hw = min(t.tx0 + t.cw + P.r, P.W) - t.hx0;
  return t;
}

// Output point pt of a tile: points are numbered centre-major (pt = ci * s2 + si), so the s*s
// points of one centre are neighbours in a warp and read the same k/v rows.
struct Point {
  int ci, si;   // centre index in the tile, sub-pixel index sy * s + sx
  int Y, X;     // low-res centre
  int oy, ox;   // output pixel
};

__device__ __forceinline__ Point point_of(int pt, const Tile& t, const Params& P) {
  Point q;
  q.ci = pt / P.s2;
  q.si = pt - q.ci * P.s2;
  const int cy = q.ci / t.cw;
  q.Y = t.ty0 + cy;
  q.X = t.tx0 + (q.ci - cy * t.cw);
  const int sy = q.si / P.s;
  q.oy = q.Y * P.s + sy;
  q.ox = q.X * P.s + (q.si - sy * P.s);
  return q;
}

// Per-tap buffers of a tile live in shared memory as [centre][tap][sub-pixel] (sub-pixels padded
// to s2pad), so the 4 sub-pixel weights of one tap are one aligned float4.
__device__ __forceinline__ int tap_buffer_size(const Tile& t, const Params& P) {
  return t.ncent * P.T * P.s2pad;
}

__device__ __forceinline__ void zero_shared(float* buf, int count) {
  for (int i = threadIdx.x; i < count; i += kThreads) buf[i] = 0.f;
}

// dst[pix * stride + c] = channel c0 + c of halo pixel pix (row-major over the clipped halo) for
// c < width, 0 for width <= c < pad. One warp per pixel: lanes read consecutive channels.
template <typename T>
__device__ __forceinline__ void stage_halo(float* dst, int stride, int pad,
                                           const T* __restrict__ src, int row_len, int c0,
                                           int width, const Tile& t, const Params& P) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int npix = t.hh * t.hw;
#pragma unroll 4  // several pixels' loads in flight per warp before their shared stores
  for (int pix = warp; pix < npix; pix += kWarps) {
    const int hy = pix / t.hw, hx = pix - hy * t.hw;
    const T* row = src + pixel(t.b, t.hy0 + hy, t.hx0 + hx, P.H, P.W) * row_len + c0;
    float* out = dst + pix * stride;
    for (int c = lane; c < pad; c += 32) out[c] = c < width ? to_f(row[c]) : 0.f;
  }
}

// dst[pt * kChunkStride + c] = channel c0 + c of the tile's output point pt (0 past width).
template <typename T>
__device__ __forceinline__ void stage_points(float* dst, const T* __restrict__ src, int row_len,
                                             int c0, int width, const Tile& t, const Params& P) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int npts = t.ncent * P.s2;
#pragma unroll 4
  for (int pt = warp; pt < npts; pt += kWarps) {
    const Point q = point_of(pt, t, P);
    const T* row = src + pixel(t.b, q.oy, q.ox, P.oH, P.oW) * row_len + c0;
    dst[pt * kChunkStride + lane] = lane < width ? to_f(row[lane]) : 0.f;
  }
}

// Rows of the output points whose centres lie in the clipped halo, for backward pass 2:
// dst[((hy * hw + hx) * s2 + si) * kChunk + c] = channel c0 + c of that point.
template <typename T>
__device__ __forceinline__ void stage_halo_points(float* dst, const T* __restrict__ src,
                                                  int row_len, int c0, int width, const Tile& t,
                                                  const Params& P) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int cols = t.hw * P.s;
  const int npts = t.hh * P.s * cols;
#pragma unroll 4
  for (int i = warp; i < npts; i += kWarps) {
    const int row = i / cols, col = i - row * cols;
    const int hy = row / P.s, sy = row - hy * P.s;
    const int hx = col / P.s, sx = col - hx * P.s;
    const T* src_row = src + pixel(t.b, t.hy0 * P.s + row, t.hx0 * P.s + col, P.oH, P.oW) *
                                 row_len + c0;
    const int dst_row = (hy * t.hw + hx) * P.s2 + sy * P.s + sx;
    dst[dst_row * kChunk + lane] = lane < width ? to_f(src_row[lane]) : 0.f;
  }
}

// buf[(ci * T + p) * s2pad + si] += sum_{c < kChunk} a_pt[c] * B[halo pixel of l + p][c] for the
// inside taps p of every output point pt of the tile. One thread per point; load_a(pt, point, a)
// fills the point's chunk. B rows have stride kChunkStride and are zero past the chunk width.
template <class LoadA>
__device__ __forceinline__ void accumulate_dots(float* buf, const float* B, const Tile& t,
                                                const Params& P, LoadA load_a) {
  const int npts = t.ncent * P.s2;
  for (int pt = threadIdx.x; pt < npts; pt += kThreads) {
    const Point q = point_of(pt, t, P);
    float a[kChunk];
    load_a(pt, q, a);
    float* acc = buf + q.ci * P.T * P.s2pad + q.si;
    // An out-of-map tap's product with the zero padding: 0, or NaN for a non-finite a
    // (sapa_common.h, "Non-finite values").
    float zero = 0.f;
#pragma unroll
    for (int u = 0; u < kChunk; ++u) zero = fmaf(a[u], 0.f, zero);
    int p = 0;
    for (int dy = -P.r; dy <= P.r; ++dy) {
      const int yy = q.Y + dy;
      if (yy < 0 || yy >= P.H) {
        for (int dx = 0; dx < P.K; ++dx, ++p) acc[p * P.s2pad] += zero;
        continue;
      }
      const float* brow = B + (yy - t.hy0) * t.hw * kChunkStride;
      for (int dx = -P.r; dx <= P.r; ++dx, ++p) {
        const int xx = q.X + dx;
        if (xx < 0 || xx >= P.W) {
          acc[p * P.s2pad] += zero;
          continue;
        }
        const float4* b4 = reinterpret_cast<const float4*>(brow + (xx - t.hx0) * kChunkStride);
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll
        for (int u = 0; u < kChunk / 4; ++u) {
          const float4 bv = b4[u];
          s0 = fmaf(a[4 * u + 0], bv.x, s0);
          s1 = fmaf(a[4 * u + 1], bv.y, s1);
          s2 = fmaf(a[4 * u + 2], bv.z, s2);
          s3 = fmaf(a[4 * u + 3], bv.w, s3);
        }
        acc[p * P.s2pad] += (s0 + s1) + (s2 + s3);
      }
    }
  }
}

// Loader for accumulate_dots: channels [c0, c0 + kChunk) of the point's row of a high-res
// (n, oH, oW, d) tensor straight from global memory (zeros past d).
template <typename T>
__device__ __forceinline__ void load_query_chunk(const T* __restrict__ q, int c0, const Tile& t,
                                                 const Point& pt, const Params& P,
                                                 float (&a)[kChunk]) {
  const T* row = q + pixel(t.b, pt.oy, pt.ox, P.oH, P.oW) * P.d + c0;
  const int width = min(kChunk, P.d - c0);
  if (P.vec_q) {  // d % 4 == 0 and q 4-element aligned, so whole quads are in or out
#pragma unroll
    for (int u = 0; u < kChunk / 4; ++u) {
      const float4 x = 4 * u < width ? load4(row + 4 * u) : make_float4(0.f, 0.f, 0.f, 0.f);
      a[4 * u + 0] = x.x;
      a[4 * u + 1] = x.y;
      a[4 * u + 2] = x.z;
      a[4 * u + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int u = 0; u < kChunk; ++u) a[u] = u < width ? to_f(row[u]) : 0.f;
  }
}

// Loader for accumulate_dots: the point's row of a chunk staged by stage_points.
__device__ __forceinline__ void load_staged_chunk(const float* A, int pt, float (&a)[kChunk]) {
  const float4* row = reinterpret_cast<const float4*>(A + pt * kChunkStride);
#pragma unroll
  for (int u = 0; u < kChunk / 4; ++u) {
    const float4 x = row[u];
    a[4 * u + 0] = x.x;
    a[4 * u + 1] = x.y;
    a[4 * u + 2] = x.z;
    a[4 * u + 3] = x.w;
  }
}

// dst[point][c0 + c] = sum over inside taps p of wbuf[ci][p][si] * V[halo pixel of l + p][c] for
// c < width <= 64 and every output point of the tile. Work item = (centre, group of 4 sub-pixels,
// lane); the lane owns channels lane and lane + 32, so a warp stores 32 consecutive channels.
// Every sum starts from the point's poison[ci * s2pad + si] (0, or NaN: the out-of-map taps'
// terms, sapa_common.h).
template <typename T>
__device__ __forceinline__ void assemble_chunk(T* __restrict__ dst, int row_len, int c0,
                                               int width, const float* V, int vstride,
                                               const float* wbuf, const float* poison,
                                               const Tile& t, const Params& P) {
  const int groups_per_centre = P.s2pad / kSub;
  const int items = t.ncent * groups_per_centre * 32;
  for (int it = threadIdx.x; it < items; it += kThreads) {
    const int lane = it & 31;
    if (lane >= width) continue;
    const bool two = lane + 32 < width;
    const int grp = it >> 5;
    const int ci = grp / groups_per_centre, sg = grp - ci * groups_per_centre;
    const int cy = ci / t.cw;
    const int Y = t.ty0 + cy, X = t.tx0 + (ci - cy * t.cw);
    float acc[kSub][2];
#pragma unroll
    for (int i = 0; i < kSub; ++i) {
      const int si = sg * kSub + i;
      acc[i][0] = acc[i][1] = si < P.s2 ? poison[ci * P.s2pad + si] : 0.f;
    }
    const float* wcol = wbuf + ci * P.T * P.s2pad + sg * kSub;
    int p = 0;
    for (int dy = -P.r; dy <= P.r; ++dy) {
      const int yy = Y + dy;
      if (yy < 0 || yy >= P.H) {
        p += P.K;
        continue;
      }
      const float* vrow = V + (yy - t.hy0) * t.hw * vstride;
      for (int dx = -P.r; dx <= P.r; ++dx, ++p) {
        const int xx = X + dx;
        if (xx < 0 || xx >= P.W) continue;  // v is 0 outside the map
        const float* vp = vrow + (xx - t.hx0) * vstride + lane;
        const float v0 = vp[0];
        const float v1 = two ? vp[32] : 0.f;
        const float4 w4 = *reinterpret_cast<const float4*>(wcol + p * P.s2pad);
        acc[0][0] = fmaf(w4.x, v0, acc[0][0]);
        acc[0][1] = fmaf(w4.x, v1, acc[0][1]);
        acc[1][0] = fmaf(w4.y, v0, acc[1][0]);
        acc[1][1] = fmaf(w4.y, v1, acc[1][1]);
        acc[2][0] = fmaf(w4.z, v0, acc[2][0]);
        acc[2][1] = fmaf(w4.z, v1, acc[2][1]);
        acc[3][0] = fmaf(w4.w, v0, acc[3][0]);
        acc[3][1] = fmaf(w4.w, v1, acc[3][1]);
      }
    }
#pragma unroll
    for (int i = 0; i < kSub; ++i) {
      const int si = sg * kSub + i;
      if (si >= P.s2) break;
      const int sy = si / P.s;
      const int oy = Y * P.s + sy, ox = X * P.s + (si - sy * P.s);
      T* o = dst + pixel(t.b, oy, ox, P.oH, P.oW) * row_len + c0 + lane;
      o[0] = from_f<T>(acc[i][0]);
      if (two) o[32] = from_f<T>(acc[i][1]);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Tiled kernels. Shared memory layouts (floats; every region starts 16-byte aligned):
//   forward  [weights: TH*TW*T*s2pad][poison: TH*TW*s2pad][halo: kh*kw*max(kChunkStride, vstride)]
//   pass 1   [w: TH*TW*T*s2pad][dlogit: same][poison: TH*TW*s2pad]
//            [points: TH*TW*s2*kChunkStride][halo: kh*kw*kChunkStride]
//   pass 2   [gathered tap values: TH*TW*T*s2pad][halo points: kh*kw*s2*kChunk]
// with kh = min(TH + 2r, H), kw = min(TW + 2r, W) (see shared_floats on the host).

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

  // Scratch rows: each output row of the tile is one contiguous run of cw*s*T floats.
  {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int run = t.cw * P.s * P.T;
    for (int row = warp; row < t.ch * P.s; row += kWarps) {
      const int cy = row / P.s, sy = row - cy * P.s;
      const int64_t base = pixel(t.b, t.ty0 * P.s + row, t.tx0 * P.s, P.oH, P.oW) * P.T;
      for (int e = lane; e < run; e += 32) {
        const int col = e / P.T, tap = e - col * P.T;
        const int cx = col / P.s, sx = col - cx * P.s;
        const int idx = ((cy * t.cw + cx) * P.T + tap) * P.s2pad + sy * P.s + sx;
        w_out[base + e] = wbuf[idx];
        dlogit_out[base + e] = dbuf[idx];
      }
    }
  }

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
    backward_lowres_tiled(Params P, const T* __restrict__ q, const T* __restrict__ g,
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

// ----------------------------------------------------------------------------------------------
// Simple kernels: no shared memory, any K and s.

// Index of the output point pt = ((b * oH + oy) * oW + ox) and its low-res centre.
struct FlatPoint {
  int64_t b;
  int oy, ox, Y, X;
};

__device__ __forceinline__ FlatPoint flat_point(int64_t pt, const Params& P) {
  FlatPoint f;
  f.ox = static_cast<int>(pt % P.oW);
  const int64_t rest = pt / P.oW;
  f.oy = static_cast<int>(rest % P.oH);
  f.b = rest / P.oH;
  f.Y = f.oy / P.s;
  f.X = f.ox / P.s;
  return f;
}

__device__ __forceinline__ bool tap_inside(int p, int Y, int X, const Params& P, int* y, int* x) {
  const int dy = p / P.K - P.r;
  *y = Y + dy;
  *x = X + (p - (p / P.K) * P.K) - P.r;
  return *y >= 0 && *y < P.H && *x >= 0 && *x < P.W;
}

template <typename T>
__device__ __forceinline__ float dot_rows(const T* __restrict__ a, const T* __restrict__ b,
                                          int n) {
  float s = 0.f;
  for (int c = 0; c < n; ++c) s = fmaf(to_f(a[c]), to_f(b[c]), s);
  return s;
}

// a . 0: 0, or NaN when the row holds a non-finite value (an out-of-map tap's product with the
// zero padding, sapa_common.h).
template <typename T>
__device__ __forceinline__ float zero_dot(const T* __restrict__ a, int n) {
  float s = 0.f;
  for (int c = 0; c < n; ++c) s = fmaf(to_f(a[c]), 0.f, s);
  return s;
}

// Logit of tap p of a point; `qzero` (zero_dot of q) outside the map, as the zeros border
// defines it.
template <typename T>
__device__ __forceinline__ float simple_logit(const T* __restrict__ qrow, const T* __restrict__ k,
                                              int p, const FlatPoint& f, const Params& P,
                                              float qzero, bool* inside) {
  int y, x;
  *inside = tap_inside(p, f.Y, f.X, P, &y, &x);
  return *inside ? dot_rows(qrow, k + pixel(f.b, y, x, P.H, P.W) * P.d, P.d) : qzero;
}

// Stats of a point computed by its warp: lanes take taps lane, lane + 32, ...
template <typename T>
__device__ __forceinline__ float2 simple_stats(const T* __restrict__ qrow,
                                               const T* __restrict__ k, const FlatPoint& f,
                                               float qzero, const Params& P) {
  const int lane = threadIdx.x & 31;
  float top = -INFINITY, sum = 0.f;
  if (P.normalizer == sapa::kSoftmax) {
    for (int p = lane; p < P.T; p += 32) {
      bool inside;
      const float x = simple_logit(qrow, k, p, f, P, qzero, &inside);
      if (sapa::tap_counted(P.border, inside)) top = sapa::nan_max(top, x);
    }
    top = warp_max(top);
    for (int p = lane; p < P.T; p += 32) {
      bool inside;
      const float x = simple_logit(qrow, k, p, f, P, qzero, &inside);
      if (sapa::tap_counted(P.border, inside)) sum += expf(x - top);
    }
    sum = warp_sum(sum);
  } else if (P.normalizer != sapa::kNone) {
    for (int p = lane; p < P.T; p += 32) {
      bool inside;
      const float x = simple_logit(qrow, k, p, f, P, qzero, &inside);
      if (sapa::tap_counted(P.border, inside)) sum += sapa::h_value(P.normalizer, x);
    }
    sum = warp_sum(sum);
  }
  float2 st;
  sapa::finish_stats<float>(P.normalizer, P.eps, top, sum, &st.x, &st.y);
  return st;
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

// Backward pass 2, one thread per element of dk (j < d) or dv (j >= d) of a low-res point; same
// summation order as the tiled kernel (taps dy outer, dx inner, then sub-pixels ascending).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_lowres_simple(Params P, const T* __restrict__ q, const T* __restrict__ g,
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

// ----------------------------------------------------------------------------------------------
// Host side: validation, planning, launches.

enum class Kernel { kForward, kBackwardPoints, kBackwardLowres };

struct Plan {
  bool tiled = false;
  int TH = 0, TW = 0;
  size_t shared_bytes = 0;
  int64_t blocks = 0;
};

// Shared floats of a tiled kernel for a TH x TW tile (layouts above the kernels).
int64_t shared_floats(Kernel kernel, const Params& P, int64_t TH, int64_t TW) {
  const int64_t kh = std::min<int64_t>(TH + 2 * int64_t{P.r}, P.H);
  const int64_t kw = std::min<int64_t>(TW + 2 * int64_t{P.r}, P.W);
  const int64_t taps = TH * TW * P.T * P.s2pad;
  switch (kernel) {
    case Kernel::kForward:
      return taps + TH * TW * P.s2pad + kh * kw * std::max<int64_t>(kChunkStride, P.vstride);
    case Kernel::kBackwardPoints:
      return 2 * taps + TH * TW * P.s2pad + TH * TW * P.s2 * kChunkStride +
             kh * kw * kChunkStride;
    case Kernel::kBackwardLowres:
      return taps + kh * kw * P.s2 * kChunk;
  }
  return 0;
}

struct DeviceLimits {
  int optin = 48 * 1024;     // max dynamic shared memory per block (opt-in)
  int per_sm = 100 * 1024;   // shared memory per multiprocessor
  int sms = 1;
};

// Queried once per device; the runtime's current device is the one of XLA's stream.
ffi::Error device_limits(DeviceLimits* out) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached_optin[kMaxDevices];  // 0 = not queried yet
  static std::atomic<int> cached_per_sm[kMaxDevices];
  static std::atomic<int> cached_sms[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("cudaGetDevice failed: ") + cudaGetErrorString(err));
  if (dev >= 0 && dev < kMaxDevices && cached_optin[dev].load() > 0) {
    out->optin = cached_optin[dev].load();
    out->per_sm = cached_per_sm[dev].load();
    out->sms = cached_sms[dev].load();
    return ffi::Error::Success();
  }
  int optin = 0, per_sm = 0, sms = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("cudaDeviceGetAttribute failed: ") +
                                cudaGetErrorString(err));
  out->optin = std::max(optin, 48 * 1024);
  out->per_sm = std::max(per_sm, out->optin);
  out->sms = std::max(sms, 1);
  if (dev >= 0 && dev < kMaxDevices) {
    cached_per_sm[dev].store(out->per_sm);
    cached_sms[dev].store(out->sms);
    cached_optin[dev].store(out->optin);  // last: readers test it
  }
  return ffi::Error::Success();
}

// sapa::set_cuda_planner (tests, through the pybind11 module): read once per make_plan.
std::atomic<bool> force_simple_setting{false};
std::atomic<int> tile_cap_setting{1 << 20};

// Picks the tile for a tiled kernel: the largest candidate (at most kMaxTilePoints output points)
// whose shared memory lets about three blocks share a multiprocessor; failing that the largest
// that fits a block at all; failing that (huge K or s) the simple kernel.
Plan make_plan(Kernel kernel, const Params& P, const DeviceLimits& dev) {
  Plan plan;
  if (force_simple_setting.load()) return plan;
  static const int kCandidates[][2] = {{8, 16}, {8, 8}, {4, 8}, {4, 4}, {2, 4},
                                       {2, 2},  {1, 2}, {1, 1}};
  const int cap = tile_cap_setting.load();
  const int64_t preferred = std::min<int64_t>(dev.optin, dev.per_sm / kTiledBlocksPerSm - 1024);
  for (int pass = 0; pass < 2 && !plan.tiled; ++pass) {
    for (const auto& cand : kCandidates) {
      const int TH = std::min({cand[0], P.H, cap}), TW = std::min({cand[1], P.W, cap});
      const int64_t points = int64_t{TH} * TW * P.s2;
      if (pass == 0 && points > kMaxTilePoints && !(TH == 1 && TW == 1)) continue;
      const int64_t bytes = shared_floats(kernel, P, TH, TW) * int64_t{sizeof(float)};
      if (bytes > (pass == 0 ? preferred : int64_t{dev.optin})) continue;
      const int64_t tiles_y = (P.H + TH - 1) / TH, tiles_x = (P.W + TW - 1) / TW;
      const int64_t blocks = P.n * tiles_y * tiles_x;
      if (blocks > 0x7fffffff) break;  // grid too large for a tile per block
      plan.tiled = true;
      plan.TH = TH;
      plan.TW = TW;
      plan.shared_bytes = static_cast<size_t>(bytes);
      plan.blocks = blocks;
      break;
    }
  }
  return plan;
}

// Grid of a grid-stride simple kernel: enough blocks to fill the device a few times over.
unsigned simple_blocks(int64_t work_items, int per_block, const DeviceLimits& dev) {
  const int64_t needed = (work_items + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>(needed, int64_t{dev.sms} * 32)));
}

ffi::Error launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("SAPA CUDA ") + what +
                              " launch failed: " + cudaGetErrorString(err));
}

// Shared memory above the 48 KiB default needs an opt-in per kernel.
template <typename Fn>
ffi::Error allow_shared(Fn* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return ffi::Error::Success();
  const cudaError_t err = cudaFuncSetAttribute(
      reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(bytes));
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("cudaFuncSetAttribute failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

Params with_tile(Params P, const Plan& plan) {
  if (plan.tiled) {
    P.TH = plan.TH;
    P.TW = plan.TW;
    P.tiles_y = (P.H + plan.TH - 1) / plan.TH;
    P.tiles_x = (P.W + plan.TW - 1) / plan.TW;
  }
  return P;
}

template <typename T>
ffi::Error launch_forward(cudaStream_t stream, const Params& base, const DeviceLimits& dev,
                          const void* q, const void* k, const void* v, void* out, void* stats) {
  const Plan plan = make_plan(Kernel::kForward, base, dev);
  const Params P = with_tile(base, plan);
  const T* qt = static_cast<const T*>(q);
  const T* kt = static_cast<const T*>(k);
  const T* vt = static_cast<const T*>(v);
  if (plan.tiled) {
    if (auto err = allow_shared(forward_tiled<T>, plan.shared_bytes); err.failure()) return err;
    forward_tiled<T><<<static_cast<unsigned>(plan.blocks), kThreads, plan.shared_bytes, stream>>>(
        P, qt, kt, vt, static_cast<T*>(out), static_cast<float*>(stats));
    return launch_error("forward_tiled");
  }
  const int64_t npts = P.n * P.oH * int64_t{P.oW};
  forward_simple<T><<<simple_blocks(npts, kWarps, dev), kThreads, 0, stream>>>(
      P, qt, kt, vt, static_cast<T*>(out), static_cast<float*>(stats));
  return launch_error("forward_simple");
}

template <typename T>
ffi::Error launch_backward(cudaStream_t stream, const Params& base, const DeviceLimits& dev,
                           const void* q, const void* k, const void* v, const void* stats,
                           const void* g, void* dq, void* dk, void* dv, void* w_scratch,
                           void* dlogit_scratch) {
  const T* qt = static_cast<const T*>(q);
  const T* kt = static_cast<const T*>(k);
  const T* vt = static_cast<const T*>(v);
  const T* gt = static_cast<const T*>(g);
  const float* st = static_cast<const float*>(stats);
  float* ws = static_cast<float*>(w_scratch);
  float* ds = static_cast<float*>(dlogit_scratch);

  // Pass 1: dq and the per-tap scratch.
  const Plan plan1 = make_plan(Kernel::kBackwardPoints, base, dev);
  const Params P1 = with_tile(base, plan1);
  if (plan1.tiled) {
    if (auto err = allow_shared(backward_points_tiled<T>, plan1.shared_bytes); err.failure())
      return err;
    backward_points_tiled<T>
        <<<static_cast<unsigned>(plan1.blocks), kThreads, plan1.shared_bytes, stream>>>(
            P1, qt, kt, vt, st, gt, static_cast<T*>(dq), ws, ds);
    if (auto err = launch_error("backward_points_tiled"); err.failure()) return err;
  } else {
    const int64_t npts = P1.n * P1.oH * int64_t{P1.oW};
    backward_points_simple<T><<<simple_blocks(npts, kWarps, dev), kThreads, 0, stream>>>(
        P1, qt, kt, vt, st, gt, static_cast<T*>(dq), ws, ds);
    if (auto err = launch_error("backward_points_simple"); err.failure()) return err;
  }

  // Pass 2: dk and dv gathered from the scratch (same stream, so after pass 1).
  const Plan plan2 = make_plan(Kernel::kBackwardLowres, base, dev);
  const Params P2 = with_tile(base, plan2);
  if (plan2.tiled) {
    if (auto err = allow_shared(backward_lowres_tiled<T>, plan2.shared_bytes); err.failure())
      return err;
    backward_lowres_tiled<T>
        <<<static_cast<unsigned>(plan2.blocks), kThreads, plan2.shared_bytes, stream>>>(
            P2, qt, gt, ws, ds, static_cast<T*>(dk), static_cast<T*>(dv));
    return launch_error("backward_lowres_tiled");
  }
  const int64_t items = P2.n * P2.H * int64_t{P2.W} * (P2.d + P2.C);
  if (items == 0) return ffi::Error::Success();
  backward_lowres_simple<T><<<simple_blocks(items, kThreads, dev), kThreads, 0, stream>>>(
      P2, qt, gt, ws, ds, static_cast<T*>(dk), static_cast<T*>(dv));
  return launch_error("backward_lowres_simple");
}

// ---- validation: sapa_validate.h, plus the int ranges the kernels index with ----

// The problem part of the parameters (the tile is set by with_tile), from validated sizes.
Params problem_params(int64_t n, int H, int W, int s, int K, int d, int C, int normalizer,
                      int border, double eps, bool q_aligned) {
  Params P{};
  P.n = n;
  P.H = H;
  P.W = W;
  P.oH = H * s;
  P.oW = W * s;
  P.s = s;
  P.s2 = s * s;
  P.s2pad = (P.s2 + kSub - 1) / kSub * kSub;
  P.K = K;
  P.r = K / 2;
  P.T = K * K;
  P.d = d;
  P.C = C;
  P.normalizer = normalizer;
  P.border = border;
  P.eps = static_cast<float>(eps);  // the kernels compute in float
  P.TH = P.TW = P.tiles_y = P.tiles_x = 1;
  P.vstride = C > kChunk ? kValueChunk : kChunk;
  P.vec_q = d % 4 == 0 && q_aligned;
  return P;
}

bool supported(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}
constexpr const char* kSupportedNames = "float32, bfloat16 or float16";

// Validates attributes and q, k, v; fills the problem part of `P` and `g`. "" on success.
std::string make_params(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                        const ffi::AnyBuffer& v, int64_t kernel_size, int64_t scale,
                        int64_t normalizer, int64_t border, double eps, sapa::Geometry* g,
                        Params* P) {
  std::string error = sapa::check_inputs(q, k, v, kernel_size, scale, normalizer, border, eps,
                                         supported, kSupportedNames, g);
  if (!error.empty()) return error;
  constexpr int64_t kIntMax = 0x7fffffff;
  if (g->oH() > kIntMax / 2 || g->oW() > kIntMax / 2 || g->d > kIntMax / 2 ||
      g->C > kIntMax / 2)
    return "dimensions too large for the CUDA kernels: q " + sapa::describe(q.dimensions()) +
           ", v " + sapa::describe(v.dimensions());
  const size_t elem = q.element_type() == ffi::DataType::F32 ? 4 : 2;
  const bool q_aligned = reinterpret_cast<uintptr_t>(q.untyped_data()) % (4 * elem) == 0;
  *P = problem_params(g->n, static_cast<int>(g->H), static_cast<int>(g->W),
                      static_cast<int>(g->s), static_cast<int>(g->K), static_cast<int>(g->d),
                      static_cast<int>(g->C), static_cast<int>(normalizer),
                      static_cast<int>(border), eps, q_aligned);
  return std::string();
}

int64_t output_points(const Params& P) { return P.n * P.oH * int64_t{P.oW}; }

ffi::Error SapaForwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                               ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                               ffi::Result<ffi::AnyBuffer> stats, int64_t kernel_size,
                               int64_t scale, int64_t normalizer, int64_t border, double eps) {
  Params P;
  sapa::Geometry geometry{};
  std::string error =
      make_params(q, k, v, kernel_size, scale, normalizer, border, eps, &geometry, &P);
  if (error.empty()) error = sapa::check_forward_outputs(q, geometry, *out, *stats);
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_forward: " + error);
  if (output_points(P) == 0) return ffi::Error::Success();
  DeviceLimits dev;
  if (auto err = device_limits(&dev); err.failure()) return err;
  switch (q.element_type()) {
    case ffi::DataType::F32:
      return launch_forward<float>(stream, P, dev, q.untyped_data(), k.untyped_data(),
                                   v.untyped_data(), out->untyped_data(), stats->untyped_data());
    case ffi::DataType::BF16:
      return launch_forward<__nv_bfloat16>(stream, P, dev, q.untyped_data(), k.untyped_data(),
                                           v.untyped_data(), out->untyped_data(),
                                           stats->untyped_data());
    default:  // F16; make_params admits nothing else
      return launch_forward<__half>(stream, P, dev, q.untyped_data(), k.untyped_data(),
                                    v.untyped_data(), out->untyped_data(), stats->untyped_data());
  }
}

ffi::Error SapaBackwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                ffi::AnyBuffer v, ffi::AnyBuffer stats, ffi::AnyBuffer g,
                                ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                                ffi::Result<ffi::AnyBuffer> dv,
                                ffi::Result<ffi::AnyBuffer> w_scratch,
                                ffi::Result<ffi::AnyBuffer> dlogit_scratch, int64_t kernel_size,
                                int64_t scale, int64_t normalizer, int64_t border, double eps) {
  Params P;
  sapa::Geometry geometry{};
  std::string error =
      make_params(q, k, v, kernel_size, scale, normalizer, border, eps, &geometry, &P);
  if (error.empty())
    error = sapa::check_backward_buffers(q, geometry, stats, g, *dq, *dk, *dv, *w_scratch,
                                         *dlogit_scratch);
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_backward: " + error);
  const ffi::DataType type = q.element_type();
  if (output_points(P) == 0) return ffi::Error::Success();
  DeviceLimits dev;
  if (auto err = device_limits(&dev); err.failure()) return err;
  switch (type) {
    case ffi::DataType::F32:
      return launch_backward<float>(stream, P, dev, q.untyped_data(), k.untyped_data(),
                                    v.untyped_data(), stats.untyped_data(), g.untyped_data(),
                                    dq->untyped_data(), dk->untyped_data(), dv->untyped_data(),
                                    w_scratch->untyped_data(), dlogit_scratch->untyped_data());
    case ffi::DataType::BF16:
      return launch_backward<__nv_bfloat16>(
          stream, P, dev, q.untyped_data(), k.untyped_data(), v.untyped_data(),
          stats.untyped_data(), g.untyped_data(), dq->untyped_data(), dk->untyped_data(),
          dv->untyped_data(), w_scratch->untyped_data(), dlogit_scratch->untyped_data());
    default:
      return launch_backward<__half>(stream, P, dev, q.untyped_data(), k.untyped_data(),
                                     v.untyped_data(), stats.untyped_data(), g.untyped_data(),
                                     dq->untyped_data(), dk->untyped_data(), dv->untyped_data(),
                                     w_scratch->untyped_data(), dlogit_scratch->untyped_data());
  }
}

}  // namespace

namespace sapa {
void set_cuda_planner(const PlannerSettings& settings) {
  force_simple_setting.store(settings.force_simple);
  tile_cap_setting.store(std::max(settings.tile_cap, 1));
}
}  // namespace sapa

// XLA's stream, then the signature shared with the CPU handlers (sapa_handlers.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SapaForwardCuda, SapaForwardCudaImpl,
    sapa::bind_forward(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SapaBackwardCuda, SapaBackwardCudaImpl,
    sapa::bind_backward(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()));

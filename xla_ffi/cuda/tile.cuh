// The tiled kernels' shared pieces: a block's tile of low-res centres and its output points,
// staging of the halo (and of per-point rows) into shared memory channel chunk by channel
// chunk, the chunked dot products over a window, and the assembly sum_p w_p rows[l + p].
#ifndef SAPA_JAX_XLA_FFI_CUDA_TILE_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_TILE_CUH_

#include "cuda/device.cuh"

namespace sapa::cuda {

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

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_TILE_CUH_

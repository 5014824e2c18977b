// Staging of the second-generation kernels (issue 15): halos copied from global into shared
// memory as floats, *unclipped*, with zeros where the window leaves the map or past the channel
// width, so the tap loops that read them carry no bounds checks. One header for every v2 kernel
// (forward_v2, backward_points_v2, backward_gather_v2).
//
// Division-free: warps take staged rows, lanes take channels. From float inputs every entry is
// an asynchronous copy (cp.async, through cuda_pipeline_primitives.h): no register holds the
// value, so all of a thread's loads of a staging are in flight at once, waited for once at its
// end. Other dtypes are converted through a register, a row's columns walked with
// `#pragma unroll 4` so that several loads are in flight before their shared stores. (Batching
// those loads explicitly in registers cost forward_v2<bf16, 7, 2> and
// backward_gather_v2<float, 5, 2> spills at the 80 registers of three blocks per multiprocessor.)
#ifndef SAPA_JAX_XLA_FFI_CUDA_V2_STAGE_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_V2_STAGE_CUH_

#include <cuda_pipeline_primitives.h>

#include <type_traits>

#include "cuda/tile.cuh"

namespace sapa::cuda::v2 {

// *dst = in ? float(*src) : 0, dst in shared memory: from float an asynchronous copy, complete
// only after end_staging<T>(); src is read only where in.
template <typename T>
__device__ __forceinline__ void stage_entry(float* dst, const T* src, bool in) {
  if constexpr (std::is_same_v<T, float>) {
    if (in)
      __pipeline_memcpy_async(dst, src, sizeof(float));
    else
      *dst = 0.f;
  } else {
    *dst = in ? to_f(*src) : 0.f;
  }
}

// Waits for this thread's copies of the staging (the callers' barrier then publishes them).
template <typename T>
__device__ __forceinline__ void end_staging() {
  if constexpr (std::is_same_v<T, float>) {
    __pipeline_commit();
    __pipeline_wait_prior(0);
  }
}

// The unclipped halo of a tile: rows y0 .. y0 + rows - 1, columns x0 .. x0 + cols - 1.
struct PaddedHalo {
  int y0, x0, rows, cols;
};

__device__ __forceinline__ PaddedHalo padded_halo(const Tile& t, int r) {
  return PaddedHalo{t.ty0 - r, t.tx0 - r, t.ch + 2 * r, t.cw + 2 * r};
}

// Channels per 16-byte copy. f32 rows take the vector loops where every row starts 16-byte
// aligned (row_len % 4 == 0 and an aligned base; c0 is a multiple of 32): then the channel
// width is a multiple of 4 too, and each group of 4 is copied whole or zeroed whole.
constexpr int kVec = 4;
__device__ __forceinline__ bool vector_rows(const float* src, int row_len) {
  return row_len % kVec == 0 && reinterpret_cast<uintptr_t>(src) % (kVec * sizeof(float)) == 0;
}
__device__ __forceinline__ void stage_group(float* dst, const float* src, bool in) {
  if (in)
    __pipeline_memcpy_async(dst, src, kVec * sizeof(float));
  else
    *reinterpret_cast<float4*>(dst) = make_float4(0.f, 0.f, 0.f, 0.f);
}

// The vector loops' lane layout needs whole pixels per warp step: pad / kVec lanes per pixel
// dividing 32 (pad is kChunk or kValueChunk).
static_assert(32 % (kChunk / kVec) == 0 && 32 % (kValueChunk / kVec) == 0,
              "v2 vector staging: a staged chunk must span a divisor of 32 lanes");

// stage_padded's loops. Vector: lanes take groups of kVec channels and 32 / (pad / kVec)
// pixels of a row at a time. Entries: lanes take channels, a row's pixels one by one. Two loops,
// not one over a lane layout: each keeps its own source line, by which scripts/sass_report.py
// tells the vector loop (the f32 preset's) from the fallback inlined beside it.
__device__ __forceinline__ void stage_padded_vectors(float* dst, int stride, int pad,
                                                     const float* __restrict__ src,
                                                     int row_len, int c0, int width,
                                                     const PaddedHalo& h, const Tile& t,
                                                     const Params& P) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int groups = pad / kVec, step = 32 / groups;
  const int first = lane / groups, c = kVec * (lane - first * groups);
  for (int hy = warp; hy < h.rows; hy += kWarps) {
    const int y = h.y0 + hy;
    const bool row_in = y >= 0 && y < P.H;
    float* drow = dst + hy * h.cols * stride + c;
    // element index of this lane's group in pixel (y, x0 + hx), stepped (read only where in)
    int64_t at = pixel(t.b, y, h.x0 + first, P.H, P.W) * row_len + c0 + c;
#pragma unroll 1  // asynchronous copies: in flight without unrolling
    for (int hx = first; hx < h.cols; hx += step, at += step * row_len) {
      const int x = h.x0 + hx;
      const bool in = row_in && x >= 0 && x < P.W && c < width;
      stage_group(drow + hx * stride, src + (in ? at : 0), in);
    }
  }
}
template <typename T>
__device__ __forceinline__ void stage_padded_entries(float* dst, int stride, int pad,
                                                     const T* __restrict__ src, int row_len,
                                                     int c0, int width, const PaddedHalo& h,
                                                     const Tile& t, const Params& P) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int hy = warp; hy < h.rows; hy += kWarps) {
    const int y = h.y0 + hy;
    const bool row_in = y >= 0 && y < P.H;
    float* drow = dst + hy * h.cols * stride;
    // element index of channel c0 of pixel (y, x0 + hx), stepped per column (read only where in)
    int64_t at = pixel(t.b, y, h.x0, P.H, P.W) * row_len + c0;
#pragma unroll(std::is_same_v<T, float> ? 1 : 2)
    for (int hx = 0; hx < h.cols; ++hx, at += row_len) {
      const int x = h.x0 + hx;
      const bool in = row_in && x >= 0 && x < P.W;
      const T* srow = src + (in ? at : 0);
      for (int c = lane; c < pad; c += 32)
        stage_entry(drow + hx * stride + c, srow + c, in && c < width);
    }
  }
}

// dst[(hy * cols + hx) * stride + c] = channel c0 + c of map pixel (y0 + hy, x0 + hx) for
// c < width, and 0 for width <= c < pad (pad a multiple of 32) or a pixel outside the map.
template <typename T>
__device__ __forceinline__ void stage_padded(float* dst, int stride, int pad,
                                             const T* __restrict__ src, int row_len, int c0,
                                             int width, const PaddedHalo& h, const Tile& t,
                                             const Params& P) {
  if constexpr (std::is_same_v<T, float>) {
    if (vector_rows(src, row_len))
      stage_padded_vectors(dst, stride, pad, src, row_len, c0, width, h, t, P);
    else
      stage_padded_entries(dst, stride, pad, src, row_len, c0, width, h, t, P);
  } else {
    stage_padded_entries(dst, stride, pad, src, row_len, c0, width, h, t, P);
  }
  end_staging<T>();
}

// stage_points_padded's loops, as stage_padded's (vector: 4 points of an output row at a time).
template <int S>
__device__ __forceinline__ void stage_points_vectors(float* dst, const float* __restrict__ src,
                                                     int row_len, int c0, int width,
                                                     const PaddedHalo& h, const Tile& t,
                                                     const Params& P) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int groups = kChunk / kVec, step = 32 / groups;
  const int first = lane / groups, c = kVec * (lane - first * groups);
  for (int row = warp; row < h.rows * S; row += kWarps) {
    const int hy = row / S, sy = row - hy * S;
    const int y = h.y0 + hy;
    const bool row_in = y >= 0 && y < P.H && c < width;
    int64_t at = pixel(t.b, y * S + sy, h.x0 * S + first, P.oH, P.oW) * row_len + c0 + c;
#pragma unroll 1  // asynchronous copies: in flight without unrolling
    for (int col = first; col < h.cols * S; col += step, at += step * row_len) {
      const int hx = col / S, sx = col - hx * S;
      const int x = h.x0 + hx;
      const bool in = row_in && x >= 0 && x < P.W;
      stage_group(dst + ((hy * h.cols + hx) * (S * S) + sy * S + sx) * kChunk + c,
                  src + (in ? at : 0), in);
    }
  }
}
template <int S, typename T>
__device__ __forceinline__ void stage_points_entries(float* dst, const T* __restrict__ src,
                                                     int row_len, int c0, int width,
                                                     const PaddedHalo& h, const Tile& t,
                                                     const Params& P) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool lane_in = lane < width;
  for (int row = warp; row < h.rows * S; row += kWarps) {
    const int hy = row / S, sy = row - hy * S;
    const int y = h.y0 + hy;
    const bool row_in = y >= 0 && y < P.H;
    // element index of this lane's channel of output point (row, col), stepped per column
    int64_t at = pixel(t.b, y * S + sy, h.x0 * S, P.oH, P.oW) * row_len + c0 + lane;
#pragma unroll(std::is_same_v<T, float> ? 1 : 2)
    for (int col = 0; col < h.cols * S; ++col, at += row_len) {
      const int hx = col / S, sx = col - hx * S;
      const int x = h.x0 + hx;
      const bool in = lane_in && row_in && x >= 0 && x < P.W;
      stage_entry(dst + ((hy * h.cols + hx) * (S * S) + sy * S + sx) * kChunk + lane,
                  src + (in ? at : 0), in);
    }
  }
}

// dst[((hy * cols + hx) * s2 + si) * kChunk + c] = channel c0 + c of output point (sub-pixel si
// of padded-halo centre (hy, hx)), 0 past width or for a centre outside the map. Warps take
// output rows of the halo.
template <int S, typename T>
__device__ __forceinline__ void stage_points_padded(float* dst, const T* __restrict__ src,
                                                    int row_len, int c0, int width,
                                                    const PaddedHalo& h, const Tile& t,
                                                    const Params& P) {
  if constexpr (std::is_same_v<T, float>) {
    if (vector_rows(src, row_len))
      stage_points_vectors<S>(dst, src, row_len, c0, width, h, t, P);
    else
      stage_points_entries<S>(dst, src, row_len, c0, width, h, t, P);
  } else {
    stage_points_entries<S>(dst, src, row_len, c0, width, h, t, P);
  }
  end_staging<T>();
}

}  // namespace sapa::cuda::v2

#endif  // SAPA_JAX_XLA_FFI_CUDA_V2_STAGE_CUH_

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

// dst[(hy * cols + hx) * stride + c] = channel c0 + c of map pixel (y0 + hy, x0 + hx) for
// c < width, and 0 for width <= c < pad (pad a multiple of 32) or a pixel outside the map.
template <typename T>
__device__ __forceinline__ void stage_padded(float* dst, int stride, int pad,
                                             const T* __restrict__ src, int row_len, int c0,
                                             int width, const PaddedHalo& h, const Tile& t,
                                             const Params& P) {
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
  end_staging<T>();
}

// dst[((hy * cols + hx) * s2 + si) * kChunk + c] = channel c0 + c of output point (sub-pixel si
// of padded-halo centre (hy, hx)), 0 past width or for a centre outside the map. Warps take
// output rows of the halo, lanes take channels.
template <int S, typename T>
__device__ __forceinline__ void stage_points_padded(float* dst, const T* __restrict__ src,
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
  end_staging<T>();
}

}  // namespace sapa::cuda::v2

#endif  // SAPA_JAX_XLA_FFI_CUDA_V2_STAGE_CUH_

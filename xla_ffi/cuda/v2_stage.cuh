// Staging of the second-generation kernels (issue 15): halos copied from global into shared
// memory as floats, *unclipped*, with zeros where the window leaves the map or past the channel
// width, so the tap loops that read them carry no bounds checks. One header for every v2 kernel
// (forward_v2, backward_points_v2, backward_gather_v2).
//
// Division-free: warps take staged rows, lanes take channels, and a row's columns are walked
// with `#pragma unroll 4`, so several loads can be in flight before their shared stores.
// Explicit batching (all loads of 4 entries into registers, then the 4 stores) was tried and
// dropped: it costs forward_v2<bf16, 7, 2> and backward_gather_v2<float, 5, 2> spills at the 80
// registers of three blocks per multiprocessor (issue 15 item 4 stays open).
#ifndef SAPA_JAX_XLA_FFI_CUDA_V2_STAGE_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_V2_STAGE_CUH_

#include "cuda/tile.cuh"

namespace sapa::cuda::v2 {

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
#pragma unroll 4  // several pixels' loads in flight before their shared stores
    for (int hx = 0; hx < h.cols; ++hx) {
      const int x = h.x0 + hx;
      const bool in = row_in && x >= 0 && x < P.W;
      const T* srow = in ? src + pixel(t.b, y, x, P.H, P.W) * row_len + c0 : src;
      for (int c = lane; c < pad; c += 32)
        drow[hx * stride + c] = in && c < width ? to_f(srow[c]) : 0.f;
    }
  }
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
#pragma unroll 4  // several points' loads in flight before their shared stores
    for (int col = 0; col < h.cols * S; ++col) {
      const int hx = col / S, sx = col - hx * S;
      const int x = h.x0 + hx;
      const bool in = lane_in && row_in && x >= 0 && x < P.W;
      float value = 0.f;
      if (in)
        value = to_f(src[pixel(t.b, y * S + sy, x * S + sx, P.oH, P.oW) * row_len + c0 + lane]);
      dst[((hy * h.cols + hx) * (S * S) + sy * S + sx) * kChunk + lane] = value;
    }
  }
}

}  // namespace sapa::cuda::v2

#endif  // SAPA_JAX_XLA_FFI_CUDA_V2_STAGE_CUH_

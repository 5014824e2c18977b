// Staging of the second-generation kernels (issue 15): halos copied from global into shared
// memory as floats, *unclipped*, with zeros where the window leaves the map or past the channel
// width, so the tap loops that read them carry no bounds checks. One header for every v2 kernel
// (forward_v2, backward_points_v2, backward_gather_v2).
//
// Pipelined by batching (issue 15 item 4): each lane issues the global loads of kStageBatch
// staged entries into registers before it stores any of them, so a warp keeps kStageBatch
// loads in flight per lane instead of one load-store round trip per entry. Everything is
// division-free: warps take staged rows, lanes take channels, and a row's columns are walked.
#ifndef SAPA_JAX_XLA_FFI_CUDA_V2_STAGE_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_V2_STAGE_CUH_

#include "cuda/tile.cuh"

namespace sapa::cuda::v2 {

constexpr int kStageBatch = 4;  // staged entries whose loads a lane has in flight at once

// The unclipped halo of a tile: rows y0 .. y0 + rows - 1, columns x0 .. x0 + cols - 1.
struct PaddedHalo {
  int y0, x0, rows, cols;
};

__device__ __forceinline__ PaddedHalo padded_halo(const Tile& t, int r) {
  return PaddedHalo{t.ty0 - r, t.tx0 - r, t.ch + 2 * r, t.cw + 2 * r};
}

// For j = 0 .. n - 1: store(j, load(j)), one lane's entries of a staged row (load gives the
// float of the entry, 0 outside the map). The loads of a batch all precede its stores.
template <class Load, class Store>
__device__ __forceinline__ void stage_batched(int n, Load load, Store store) {
  for (int j0 = 0; j0 < n; j0 += kStageBatch) {
    float x[kStageBatch];
#pragma unroll
    for (int b = 0; b < kStageBatch; ++b) x[b] = j0 + b < n ? load(j0 + b) : 0.f;
#pragma unroll
    for (int b = 0; b < kStageBatch; ++b)
      if (j0 + b < n) store(j0 + b, x[b]);
  }
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
    for (int c = lane; c < pad; c += 32) {
      const bool in = row_in && c < width;
      stage_batched(
          h.cols,
          [&](int hx) {
            const int x = h.x0 + hx;
            return in && x >= 0 && x < P.W
                       ? to_f(src[pixel(t.b, y, x, P.H, P.W) * row_len + c0 + c])
                       : 0.f;
          },
          [&](int hx, float value) { drow[hx * stride + c] = value; });
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
  for (int row = warp; row < h.rows * S; row += kWarps) {
    const int hy = row / S, sy = row - hy * S;
    const int y = h.y0 + hy;
    const bool in = lane < width && y >= 0 && y < P.H;
    float* drow = dst + sy * S * kChunk + lane;
    stage_batched(
        h.cols * S,
        [&](int col) {
          const int x = h.x0 + col / S;
          return in && x >= 0 && x < P.W
                     ? to_f(src[pixel(t.b, y * S + sy, x * S + col % S, P.oH, P.oW) * row_len +
                                c0 + lane])
                     : 0.f;
        },
        [&](int col, float value) {
          const int hx = col / S;
          drow[((hy * h.cols + hx) * (S * S) + col - hx * S) * kChunk] = value;
        });
  }
}

}  // namespace sapa::cuda::v2

#endif  // SAPA_JAX_XLA_FFI_CUDA_V2_STAGE_CUH_

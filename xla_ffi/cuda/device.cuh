// Device basics of the CUDA kernels: block shape and chunk constants, the problem parameters
// every kernel takes, element-type loads and stores, warp reductions, and the per-point window
// helpers (tap order, border rule and stats from sapa_common.h).
#ifndef SAPA_JAX_XLA_FFI_CUDA_DEVICE_CUH_
#define SAPA_JAX_XLA_FFI_CUDA_DEVICE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "sapa_common.h"

namespace sapa::cuda {

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
  int splits;             // v2 kernels: blocks per tile, each over a share of the channel chunks
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

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_DEVICE_CUH_

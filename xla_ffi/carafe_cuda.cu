// Fused CARAFE core for XLA:GPU (docs/design.md §5; layout, geometry and validation in
// carafe_common.h, the normaliser maths in sapa_common.h). Simple kernels, no shared memory:
//
//   forward        one warp per output point: per group the stats (every lane reduces the
//                  group's K*K logits in tap order, so all lanes hold the same bits), then the
//                  lanes take the group's channels: out = sum_t w_t x[l + t] (+ poison terms).
//   backward_points  one warp per output point: per group the lanes take taps, w_t from the
//                  stats and dw_t = g . x[l + t] over the group's channels, staged in w_scratch;
//                  after a warp barrier every lane reads the group's dw in tap order for the
//                  normaliser's vjp (sapa_common.h's point_logit_gradients), writes its taps'
//                  dlogits and, after a second barrier, their weights over the staged dw.
//   backward_gather  one thread per element of dx: gathers w g over the taps and the s*s children
//                  of every centre whose window covers the pixel, in a fixed order.
// No atomics and every output element has one writer, so results do not depend on the schedule.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "carafe_common.h"
#include "carafe_handlers.h"
#include "cuda/device.cuh"
#include "cuda/launch.h"
#include "sapa_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Everything a kernel needs to know, by value; int sizes (checked on the host).
struct CarafeParams {
  int64_t n;
  int H, W, oH, oW, s, K, r, T, G, C, Cg, LC;  // T = K*K taps, LC = G*T logit channels
  int normalizer;
  float eps;
};

// Element types: sapa::cuda::to_f / from_f of the kernel layer (cuda/device.cuh).
using sapa::cuda::from_f;
using sapa::cuda::grid_for;
using sapa::cuda::launch_error;
using sapa::cuda::to_f;

struct PointIndex {
  int64_t b;
  int Y, X;  // low-res centre
};

__device__ __forceinline__ PointIndex point_index(int64_t pt, const CarafeParams& P) {
  const int ox = static_cast<int>(pt % P.oW);
  const int64_t rest = pt / P.oW;
  const int oy = static_cast<int>(rest % P.oH);
  return PointIndex{rest / P.oH, oy / P.s, ox / P.s};
}

// Low-res pixel of tap t of centre (Y, X) and whether it lies inside the map.
__device__ __forceinline__ bool tap_pixel(int t, int Y, int X, const CarafeParams& P, int* y,
                                          int* x) {
  *y = Y + t / P.K - P.r;
  *x = X + t % P.K - P.r;
  return *y >= 0 && *y < P.H && *x >= 0 && *x < P.W;
}

__device__ __forceinline__ int64_t x_offset(int64_t b, int y, int x, const CarafeParams& P) {
  return ((b * P.H + y) * static_cast<int64_t>(P.W) + x) * P.C;
}

// The stats of one group of one point (sapa_common.h's point_stats, in tap order; every tap
// counts).
template <typename T>
__device__ __forceinline__ float2 group_stats(const T* __restrict__ lrow, const CarafeParams& P) {
  float2 st;
  sapa::point_stats<float>(
      P.normalizer, P.eps, P.T, [&](int64_t t) { return to_f(lrow[t]); },
      [](int64_t) { return true; }, &st.x, &st.y);
  return st;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    carafe_forward_simple(CarafeParams P, const T* __restrict__ x, const T* __restrict__ logits,
                          T* __restrict__ out, float* __restrict__ stats) {
  const int lane = threadIdx.x & 31;
  const int64_t npts = P.n * P.oH * static_cast<int64_t>(P.oW);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t pt = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); pt < npts;
       pt += step) {
    const PointIndex f = point_index(pt, P);
    for (int grp = 0; grp < P.G; ++grp) {
      const T* lrow = logits + pt * P.LC + grp * P.T;
      const float2 st = group_stats(lrow, P);
      if (lane == 0) {
        stats[(pt * P.G + grp) * 2] = st.x;
        stats[(pt * P.G + grp) * 2 + 1] = st.y;
      }
      const int c_end = (grp + 1) * P.Cg;
      for (int c = grp * P.Cg + lane; c < c_end; c += 32) {
        float acc = 0.f;
        for (int t = 0; t < P.T; ++t) {
          const float w = sapa::tap_weight(P.normalizer, to_f(lrow[t]), st.x, st.y, true);
          int y, xx;
          if (!tap_pixel(t, f.Y, f.X, P, &y, &xx)) {  // x is 0 outside the map
            acc += sapa::out_poison_term<float>(sapa::kZeros, w);
            continue;
          }
          acc = fmaf(w, to_f(x[x_offset(f.b, y, xx, P) + c]), acc);
        }
        out[pt * P.C + c] = from_f<T>(acc);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    carafe_backward_points_simple(CarafeParams P, const T* __restrict__ x,
                                  const T* __restrict__ logits, const float* __restrict__ stats,
                                  const T* __restrict__ g, T* __restrict__ dlogits,
                                  float* w_out) {
  const int lane = threadIdx.x & 31;
  const int64_t npts = P.n * P.oH * static_cast<int64_t>(P.oW);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t pt = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); pt < npts;
       pt += step) {
    const PointIndex f = point_index(pt, P);
    for (int grp = 0; grp < P.G; ++grp) {
      const T* lrow = logits + pt * P.LC + grp * P.T;
      const T* grow = g + pt * P.C + grp * P.Cg;
      float* wrow = w_out + pt * P.LC + grp * P.T;  // dw first, the weights at the end
      const float st0 = stats[(pt * P.G + grp) * 2], st1 = stats[(pt * P.G + grp) * 2 + 1];
      for (int t = lane; t < P.T; t += 32) {
        int y, xx;
        const bool inside = tap_pixel(t, f.Y, f.X, P, &y, &xx);
        const T* xrow = x + (inside ? x_offset(f.b, y, xx, P) : 0) + grp * P.Cg;
        float dw = 0.f;  // g . 0 outside the map: 0, or NaN for a non-finite g (jnp's padding)
        for (int c = 0; c < P.Cg; ++c)
          dw = fmaf(to_f(grow[c]), inside ? to_f(xrow[c]) : 0.f, dw);
        wrow[t] = dw;
      }
      __syncwarp();  // every tap's dw staged before the lanes read all of them
      // The group's logit gradients (sapa_common.h's shared formula): every lane runs the
      // three passes over all taps in tap order, so all lanes see the same sums, and keeps the
      // gradients of its own taps t = lane + 32 i (i < 4: K <= 11).
      float dl_mine[4] = {0.f, 0.f, 0.f, 0.f};
      sapa::point_logit_gradients<float>(
          P.normalizer, P.eps, st0, st1, P.T,
          [&](int64_t u, float* logit, float* w, float* dw) {
            *logit = to_f(lrow[u]);
            *w = sapa::tap_weight(P.normalizer, *logit, st0, st1, true);
            *dw = wrow[u];
            return true;
          },
          [&](int64_t u, float, float dl) {
#pragma unroll
            for (int i = 0; i < 4; ++i)  // constant indices: dl_mine stays in registers
              if (u == lane + 32 * i) dl_mine[i] = dl;
          });
      __syncwarp();  // every lane done reading the staged dw before the weights replace it
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = lane + 32 * i;
        if (t >= P.T) break;
        dlogits[pt * P.LC + grp * P.T + t] = from_f<T>(dl_mine[i]);
        wrow[t] = sapa::tap_weight(P.normalizer, to_f(lrow[t]), st0, st1, true);
      }
    }
  }
}

// One thread per element of dx: taps dy outer, dx inner, then the children row-major.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    carafe_backward_gather_simple(CarafeParams P, const T* __restrict__ g,
                                  const float* __restrict__ w_in, T* __restrict__ dx) {
  const int64_t total = P.n * P.H * static_cast<int64_t>(P.W) * P.C;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += step) {
    const int c = static_cast<int>(idx % P.C);
    const int64_t m = idx / P.C;
    const int X = static_cast<int>(m % P.W);
    const int64_t rest = m / P.W;
    const int Y = static_cast<int>(rest % P.H);
    const int64_t b = rest / P.H;
    const int tap0 = (c / P.Cg) * P.T;
    float acc = 0.f;
    int t = 0;
    for (int dy = -P.r; dy <= P.r; ++dy) {
      for (int dxo = -P.r; dxo <= P.r; ++dxo, ++t) {
        const int ly = Y - dy, lx = X - dxo;
        if (ly < 0 || ly >= P.H || lx < 0 || lx >= P.W) continue;
        for (int sy = 0; sy < P.s; ++sy) {
          const int64_t o0 = (b * P.oH + ly * P.s + sy) * static_cast<int64_t>(P.oW) + lx * P.s;
          const float* wp = w_in + o0 * P.LC + tap0 + t;
          const T* gp = g + o0 * P.C + c;
          for (int sx = 0; sx < P.s; ++sx, wp += P.LC, gp += P.C)
            acc = fmaf(*wp, to_f(*gp), acc);
        }
      }
    }
    dx[m * P.C + c] = from_f<T>(acc);
  }
}

// ---- host side ----

bool supported(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}
constexpr const char* kSupportedNames = "float32, bfloat16 or float16";
constexpr int kMaxTapsPerLane = 4;  // dl_mine in carafe_backward_points_simple

// Validates the call (carafe_common.h, plus the int ranges the kernels index with).
std::string make_params(const ffi::AnyBuffer& x, const ffi::AnyBuffer& logits,
                        int64_t kernel_size, int64_t scale, int64_t groups, int64_t normalizer,
                        double eps, sapa::CarafeGeometry* g, CarafeParams* P) {
  std::string error = sapa::check_carafe_inputs(x, logits, kernel_size, scale, groups,
                                                normalizer, eps, supported, kSupportedNames, g);
  if (!error.empty()) return error;
  if (g->taps() > 32 * kMaxTapsPerLane)
    return "kernel_size must be <= 11 for the CUDA kernel, got " + std::to_string(kernel_size);
  constexpr int64_t kIntMax = 0x7fffffff;
  if (g->oH() > kIntMax / 2 || g->oW() > kIntMax / 2 || g->C > kIntMax / 2 ||
      g->logit_channels() > kIntMax / 2)
    return "dimensions too large for the CUDA kernels: x " + sapa::describe(x.dimensions()) +
           ", logits " + sapa::describe(logits.dimensions());
  *P = CarafeParams{g->n,
                    static_cast<int>(g->H),
                    static_cast<int>(g->W),
                    static_cast<int>(g->oH()),
                    static_cast<int>(g->oW()),
                    static_cast<int>(g->s),
                    static_cast<int>(g->K),
                    static_cast<int>(g->r),
                    static_cast<int>(g->taps()),
                    static_cast<int>(g->G),
                    static_cast<int>(g->C),
                    static_cast<int>(g->Cg()),
                    static_cast<int>(g->logit_channels()),
                    static_cast<int>(normalizer),
                    static_cast<float>(eps)};
  return std::string();
}

template <typename T>
ffi::Error launch_forward(cudaStream_t stream, const CarafeParams& P, const void* x,
                          const void* logits, void* out, void* stats) {
  const int64_t npts = P.n * P.oH * int64_t{P.oW};
  carafe_forward_simple<T><<<grid_for(stream, npts, kWarps), kThreads, 0, stream>>>(
      P, static_cast<const T*>(x), static_cast<const T*>(logits), static_cast<T*>(out),
      static_cast<float*>(stats));
  return launch_error("CARAFE", "carafe_forward_simple");
}

template <typename T>
ffi::Error launch_backward(cudaStream_t stream, const CarafeParams& P, const void* x,
                           const void* logits, const void* stats, const void* g, void* dx,
                           void* dlogits, void* w) {
  const int64_t npts = P.n * P.oH * int64_t{P.oW};
  const unsigned grid1 = grid_for(stream, npts, kWarps);
  carafe_backward_points_simple<T><<<grid1, kThreads, 0, stream>>>(
      P, static_cast<const T*>(x), static_cast<const T*>(logits),
      static_cast<const float*>(stats), static_cast<const T*>(g), static_cast<T*>(dlogits),
      static_cast<float*>(w));
  if (auto err = launch_error("CARAFE", "carafe_backward_points_simple"); err.failure()) return err;
  const int64_t items = P.n * P.H * int64_t{P.W} * P.C;
  if (items == 0) return ffi::Error::Success();
  const unsigned grid2 = grid_for(stream, items, kThreads);
  carafe_backward_gather_simple<T><<<grid2, kThreads, 0, stream>>>(
      P, static_cast<const T*>(g), static_cast<const float*>(w), static_cast<T*>(dx));
  return launch_error("CARAFE", "carafe_backward_gather_simple");
}

ffi::Error CarafeForwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer logits,
                                 ffi::Result<ffi::AnyBuffer> out,
                                 ffi::Result<ffi::AnyBuffer> stats, int64_t kernel_size,
                                 int64_t scale, int64_t groups, int64_t normalizer, double eps) {
  CarafeParams P;
  sapa::CarafeGeometry geometry{};
  std::string error =
      make_params(x, logits, kernel_size, scale, groups, normalizer, eps, &geometry, &P);
  if (error.empty()) error = sapa::check_carafe_forward_outputs(x, geometry, *out, *stats);
  if (!error.empty()) return ffi::Error::InvalidArgument("carafe_forward: " + error);
  if (P.n * P.oH * int64_t{P.oW} == 0) return ffi::Error::Success();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return launch_forward<float>(stream, P, x.untyped_data(), logits.untyped_data(),
                                   out->untyped_data(), stats->untyped_data());
    case ffi::DataType::BF16:
      return launch_forward<__nv_bfloat16>(stream, P, x.untyped_data(), logits.untyped_data(),
                                           out->untyped_data(), stats->untyped_data());
    default:  // F16; make_params admits nothing else
      return launch_forward<__half>(stream, P, x.untyped_data(), logits.untyped_data(),
                                    out->untyped_data(), stats->untyped_data());
  }
}

ffi::Error CarafeBackwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer logits,
                                  ffi::AnyBuffer stats, ffi::AnyBuffer g,
                                  ffi::Result<ffi::AnyBuffer> dx,
                                  ffi::Result<ffi::AnyBuffer> dlogits,
                                  ffi::Result<ffi::AnyBuffer> w_scratch, int64_t kernel_size,
                                  int64_t scale, int64_t groups, int64_t normalizer,
                                  double eps) {
  CarafeParams P;
  sapa::CarafeGeometry geometry{};
  std::string error =
      make_params(x, logits, kernel_size, scale, groups, normalizer, eps, &geometry, &P);
  if (error.empty())
    error = sapa::check_carafe_backward_buffers(x, geometry, stats, g, *dx, *dlogits,
                                                *w_scratch);
  if (!error.empty()) return ffi::Error::InvalidArgument("carafe_backward: " + error);
  if (P.n * P.oH * int64_t{P.oW} == 0) return ffi::Error::Success();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return launch_backward<float>(stream, P, x.untyped_data(), logits.untyped_data(),
                                    stats.untyped_data(), g.untyped_data(), dx->untyped_data(),
                                    dlogits->untyped_data(), w_scratch->untyped_data());
    case ffi::DataType::BF16:
      return launch_backward<__nv_bfloat16>(
          stream, P, x.untyped_data(), logits.untyped_data(), stats.untyped_data(),
          g.untyped_data(), dx->untyped_data(), dlogits->untyped_data(),
          w_scratch->untyped_data());
    default:
      return launch_backward<__half>(stream, P, x.untyped_data(), logits.untyped_data(),
                                     stats.untyped_data(), g.untyped_data(), dx->untyped_data(),
                                     dlogits->untyped_data(), w_scratch->untyped_data());
  }
}

}  // namespace

// Command-buffer compatible: a call only launches kernels on the stream (no synchronisation,
// allocation or environment; the device's limits are queried once, cuda/runtime.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CarafeForwardCuda, CarafeForwardCudaImpl,
    sapa::bind_carafe_forward(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CarafeBackwardCuda, CarafeBackwardCudaImpl,
    sapa::bind_carafe_backward(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});

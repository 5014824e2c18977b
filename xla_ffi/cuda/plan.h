// Launch planning of the CUDA kernels (host code): the problem parameters from validated sizes,
// the device's shared-memory limits, and the tile planner that picks, per kernel, the largest
// tile that leaves room for kTiledBlocksPerSm blocks per multiprocessor, or the simple kernel.
// Test-only planner settings (sapa::set_cuda_planner) are read once per plan.
#ifndef SAPA_JAX_XLA_FFI_CUDA_PLAN_H_
#define SAPA_JAX_XLA_FFI_CUDA_PLAN_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/device.cuh"
#include "cuda/v2_plan.h"

namespace sapa::cuda {

// The kernels the planner plans for: forward, backward pass 1 and backward pass 2, and the
// second-generation forward, pass 2 and pass 1 (cuda/v2_plan.h).
enum class Kernel {
  kForward, kBackwardPoints, kBackwardGather, kForwardV2, kBackwardGatherV2, kBackwardPointsV2
};

struct Plan {
  bool tiled = false;
  int TH = 0, TW = 0;
  size_t shared_bytes = 0;
  int64_t blocks = 0;
};

// The problem part of the parameters (the tile is set by with_tile), from validated sizes.
inline Params problem_params(int64_t n, int H, int W, int s, int K, int d, int C, int normalizer,
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

// Shared floats of a tiled kernel for a TH x TW tile (the layouts in forward.cuh,
// backward_points.cuh and backward_gather.cuh).
inline int64_t shared_floats(Kernel kernel, const Params& P, int64_t TH, int64_t TW) {
  const int64_t kh = std::min<int64_t>(TH + 2 * int64_t{P.r}, P.H);
  const int64_t kw = std::min<int64_t>(TW + 2 * int64_t{P.r}, P.W);
  const int64_t taps = TH * TW * P.T * P.s2pad;
  switch (kernel) {
    case Kernel::kForward:
      return taps + TH * TW * P.s2pad + kh * kw * std::max<int64_t>(kChunkStride, P.vstride);
    case Kernel::kBackwardPoints:
      return 2 * taps + TH * TW * P.s2pad + TH * TW * P.s2 * kChunkStride +
             kh * kw * kChunkStride;
    case Kernel::kBackwardGather:
      return taps + kh * kw * P.s2 * kChunk;
    case Kernel::kForwardV2:
      return v2::forward_shared_floats(P, TH, TW);
    case Kernel::kBackwardGatherV2:
      return v2::gather_shared_floats(P, TH, TW);
    case Kernel::kBackwardPointsV2:
      return v2::points_shared_floats(P, TH, TW);
  }
  return 0;
}

struct DeviceLimits {
  int optin = 48 * 1024;     // max dynamic shared memory per block (opt-in)
  int per_sm = 100 * 1024;   // shared memory per multiprocessor
  int sms = 1;
};

// Queried once per device; the runtime's current device is the one of XLA's stream. "" on
// success, else what failed.
inline std::string device_limits(DeviceLimits* out) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached_optin[kMaxDevices];  // 0 = not queried yet
  static std::atomic<int> cached_per_sm[kMaxDevices];
  static std::atomic<int> cached_sms[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return std::string("cudaGetDevice failed: ") + cudaGetErrorString(err);
  if (dev >= 0 && dev < kMaxDevices && cached_optin[dev].load() > 0) {
    out->optin = cached_optin[dev].load();
    out->per_sm = cached_per_sm[dev].load();
    out->sms = cached_sms[dev].load();
    return std::string();
  }
  int optin = 0, per_sm = 0, sms = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess)
    return std::string("cudaDeviceGetAttribute failed: ") + cudaGetErrorString(err);
  out->optin = std::max(optin, 48 * 1024);
  out->per_sm = std::max(per_sm, out->optin);
  out->sms = std::max(sms, 1);
  if (dev >= 0 && dev < kMaxDevices) {
    cached_per_sm[dev].store(out->per_sm);
    cached_sms[dev].store(out->sms);
    cached_optin[dev].store(out->optin);  // last: readers test it
  }
  return std::string();
}

// sapa::set_cuda_planner (tests, through the pybind11 module): read once per make_plan.
inline std::atomic<bool> force_simple_setting{false};
inline std::atomic<int> tile_cap_setting{1 << 20};

// Picks the tile for a tiled kernel: the largest candidate (at most kMaxTilePoints output points)
// whose shared memory lets about three blocks share a multiprocessor; failing that the largest
// that fits a block at all; failing that (huge K or s) the simple kernel.
inline Plan make_plan(Kernel kernel, const Params& P, const DeviceLimits& dev) {
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

// The parameters with the plan's tile.
inline Params with_tile(Params P, const Plan& plan) {
  if (plan.tiled) {
    P.TH = plan.TH;
    P.TW = plan.TW;
    P.tiles_y = (P.H + plan.TH - 1) / plan.TH;
    P.tiles_x = (P.W + plan.TW - 1) / plan.TW;
  }
  return P;
}

// Grid of a grid-stride simple kernel: enough blocks to fill the device a few times over.
inline unsigned simple_blocks(int64_t work_items, int per_block, const DeviceLimits& dev) {
  const int64_t needed = (work_items + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>(needed, int64_t{dev.sms} * 32)));
}

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_PLAN_H_

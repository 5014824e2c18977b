// Launch planning of the CUDA kernels (host code): the problem parameters from validated sizes
// and the tile planners. Generic kernels: the largest tile that leaves room for
// kTiledBlocksPerSm blocks per multiprocessor, or the simple kernel. v2 kernels: the tile and
// channel split of least modelled time (waves x the modelled block, cost_plan below). Device
// limits and shared-memory opt-ins: cuda/runtime.h. Test-only planner settings
// (sapa::set_cuda_planner) are read once per plan.
#ifndef SAPA_JAX_XLA_FFI_CUDA_PLAN_H_
#define SAPA_JAX_XLA_FFI_CUDA_PLAN_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/device.cuh"
#include "cuda/runtime.h"
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
  int splits = 1;          // blocks per tile (v2 channel split)
  size_t shared_bytes = 0;
  int64_t blocks = 0;
  int per_sm = 0;          // resident blocks per multiprocessor (shared memory, registers)
  double waves = 0;        // blocks / (SMs x per_sm)
  double halo_ratio = 0;   // staged / useful elements of a block (v2 plans)
  double model_us = 0;     // modelled time (v2 plans)
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
  P.splits = 1;
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

// sapa::set_cuda_planner (tests, through the pybind11 module): read once per make_plan.
inline std::atomic<bool> force_simple_setting{false};
inline std::atomic<int> tile_cap_setting{1 << 20};
inline std::atomic<int> channel_split_setting{0};  // 0: the cost model's; n: n where possible

// Resident blocks per multiprocessor of a tiled kernel: its registers allow kTiledBlocksPerSm
// (__launch_bounds__), its shared memory (plus the 1 KiB the hardware reserves per block) and
// the 2048 threads of a multiprocessor may allow fewer.
inline int resident_blocks(int64_t shared_bytes, const DeviceLimits& dev) {
  const int64_t by_shared = dev.per_sm / (shared_bytes + 1024);
  return static_cast<int>(std::min<int64_t>({by_shared, kTiledBlocksPerSm, 2048 / kThreads}));
}

// Modelled time of a grid on the device: each wave of SMs x per_sm blocks takes as long as
// kTiledBlocksPerSm modelled blocks issued at 4 warp instructions per cycle (a full SM of this
// kernel; an SM holding fewer blocks is assumed latency-bound at the same time per block), at
// 1.98 GHz (H100 / H200 SXM boost clock). A last, partial wave costs a whole one.
inline double modelled_us(int64_t blocks, int per_sm, double block_instr, const DeviceLimits& d) {
  const double slots = double{1} * d.sms * per_sm;
  const double waves = std::ceil(static_cast<double>(blocks) / slots);
  return waves * kTiledBlocksPerSm * block_instr / 4 / 1980.0;
}

// One v2 plan as the cost model sees it: a TH x TW tile split over `splits` blocks; not tiled
// when it does not fit the device.
inline Plan modelled_plan(Kernel kernel, const Params& P, const DeviceLimits& dev, int TH, int TW,
                          int splits) {
  Plan c;
  const int64_t bytes = shared_floats(kernel, P, TH, TW) * int64_t{sizeof(float)};
  const int per_sm = resident_blocks(bytes, dev);
  const int64_t tiles = P.n * ((P.H + TH - 1) / TH) * ((P.W + TW - 1) / TW);
  if (bytes > dev.optin || per_sm < 1 || tiles > 0x7fffffff) return c;  // grid x: a tile a block
  const v2::BlockModel m = kernel == Kernel::kForwardV2 ? v2::forward_block(P, TH, TW, splits)
                                                        : v2::gather_block(P, TH, TW, splits);
  c.tiled = true;
  c.TH = TH;
  c.TW = TW;
  c.splits = splits;
  c.shared_bytes = static_cast<size_t>(bytes);
  c.blocks = tiles * splits;
  c.per_sm = per_sm;
  c.waves = static_cast<double>(c.blocks) / (double{1} * dev.sms * per_sm);
  c.halo_ratio = m.useful > 0 ? m.staged / m.useful : 0;
  c.model_us = modelled_us(c.blocks, per_sm, m.instr, dev);
  return c;
}

// The v2 planner: over tiles TH x TW (powers of two up to 16 x 32, clipped to the map and the
// test cap) and channel splits (1 .. 8, at most the kernel's chunks), the plan of least modelled
// time whose shared memory fits a block; a split must gain 10% on the best unsplit plan (the
// model ignores its extra L2 traffic and launch overheads). Ties keep the earlier candidate:
// fewer splits, then taller and wider tiles. Deterministic: a function of P and the device.
inline Plan cost_plan(Kernel kernel, const Params& P, const DeviceLimits& dev) {
  const bool forward = kernel == Kernel::kForwardV2;
  const int chunks = forward ? v2::forward_chunks(P) : v2::gather_chunks(P);
  const int forced = channel_split_setting.load(), cap = tile_cap_setting.load();
  const int max_splits = std::max(1, std::min(forced > 0 ? forced : 8, chunks));
  int tiles_h[5], tiles_w[6], nh = 0, nw = 0;  // the candidate sides, clipped, distinct
  for (int th = 16; th >= 1; th /= 2) {
    const int side = std::min({th, P.H, cap});
    if (nh == 0 || tiles_h[nh - 1] != side) tiles_h[nh++] = side;
  }
  for (int tw = 32; tw >= 1; tw /= 2) {
    const int side = std::min({tw, P.W, cap});
    if (nw == 0 || tiles_w[nw - 1] != side) tiles_w[nw++] = side;
  }
  Plan best, best_unsplit;
  for (int splits = forced > 0 ? max_splits : 1; splits <= max_splits; ++splits) {
    for (int ih = 0; ih < nh; ++ih) {
      for (int iw = 0; iw < nw; ++iw) {
        const Plan c = modelled_plan(kernel, P, dev, tiles_h[ih], tiles_w[iw], splits);
        if (!c.tiled) continue;
        Plan& slot = splits == 1 ? best_unsplit : best;
        if (!slot.tiled || c.model_us < slot.model_us) slot = c;
      }
    }
  }
  if (!best_unsplit.tiled) return best;
  if (best.tiled && (forced > 0 || best.model_us < 0.9 * best_unsplit.model_us)) return best;
  return best_unsplit;
}

// Picks the tile for a tiled kernel. v2 kernels: cost_plan. Generic kernels: the largest
// candidate (at most kMaxTilePoints output points) whose shared memory lets about three blocks
// share a multiprocessor; failing that the largest that fits a block at all; failing that (huge
// K or s) the simple kernel.
inline Plan make_plan(Kernel kernel, const Params& P, const DeviceLimits& dev) {
  Plan plan;
  if (force_simple_setting.load()) return plan;
  if (kernel == Kernel::kForwardV2 || kernel == Kernel::kBackwardGatherV2)
    return cost_plan(kernel, P, dev);
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
      plan.per_sm = resident_blocks(bytes, dev);
      plan.waves = static_cast<double>(blocks) / (double{1} * dev.sms * std::max(plan.per_sm, 1));
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
    P.splits = plan.splits;
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

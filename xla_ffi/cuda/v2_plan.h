// Host side of the second-generation kernels (issue 15, cuda/v2_forward.cuh and
// cuda/v2_gather.cuh): which generation runs, where v2 applies, and its shared-memory sizes for
// the planner (plan.h). Generation 2 (the default) runs forward_v2 and backward_gather_v2 where
// they apply (K in {3, 5, 7}, s in {1, 2, 4}, the tile fits; the forward also needs
// 4-element-aligned q rows) and the generic kernels everywhere else; generation 1 always runs the
// generic kernels, so that one process can measure both (sapa::set_cuda_kernel_generation, the
// module's set_kernel_generation).
#ifndef SAPA_JAX_XLA_FFI_CUDA_V2_PLAN_H_
#define SAPA_JAX_XLA_FFI_CUDA_V2_PLAN_H_

#include <atomic>
#include <cstdint>

#include "cuda/device.cuh"

namespace sapa::cuda::v2 {

inline std::atomic<int> generation_setting{2};

constexpr int kStrip = 2;  // low-res points per thread in the v2 gather, stacked vertically

constexpr bool specialised(int K, int s) {
  return (K == 3 || K == 5 || K == 7) && (s == 1 || s == 2 || s == 4);
}
inline bool use_forward(const Params& P) {
  return generation_setting.load() == 2 && specialised(P.K, P.s) && P.vec_q;
}
inline bool use_gather(const Params& P) {
  return generation_setting.load() == 2 && specialised(P.K, P.s);
}

// Shared floats of forward_v2 for a TH x TW tile: weights, then the unclipped halo at the value
// chunk's row stride (k chunks use the first kChunkStride floats of each row).
inline int64_t forward_shared_floats(const Params& P, int64_t TH, int64_t TW) {
  const int64_t halo = (TH + 2 * int64_t{P.r}) * (TW + 2 * int64_t{P.r});
  return TH * TW * P.T * P.s2pad + halo * kValueChunk;
}
// Shared floats of backward_gather_v2: per-tap values, then the unclipped halo of output points
// with the tile's rows rounded up to whole strips.
inline int64_t gather_shared_floats(const Params& P, int64_t TH, int64_t TW) {
  const int64_t rows = (TH + kStrip - 1) / kStrip * kStrip + 2 * int64_t{P.r};
  return TH * TW * P.T * P.s2pad + rows * (TW + 2 * int64_t{P.r}) * P.s2 * kChunk;
}

// backward_points_v2 (cuda/v2_points.cuh) reads q and g rows as 4-element vectors.
inline bool use_points(const Params& P, bool g_aligned) {
  return generation_setting.load() == 2 && specialised(P.K, P.s) && P.vec_q && P.C % 4 == 0 &&
         g_aligned;
}
// Shared floats of backward_points_v2: w and dlogit per tap, dq's poison per point, then the
// unclipped halo of one 32-channel chunk (no per-point staging: q and g stay in registers).
inline int64_t points_shared_floats(const Params& P, int64_t TH, int64_t TW) {
  const int64_t halo = (TH + 2 * int64_t{P.r}) * (TW + 2 * int64_t{P.r});
  return 2 * TH * TW * P.T * P.s2pad + TH * TW * P.s2pad + halo * kChunkStride;
}

}  // namespace sapa::cuda::v2

#endif  // SAPA_JAX_XLA_FFI_CUDA_V2_PLAN_H_

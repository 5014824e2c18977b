// Host side of the second-generation kernels (issue 15, cuda/v2_forward.cuh and
// cuda/v2_gather.cuh): which generation runs, where v2 applies, and its shared-memory sizes for
// the planner (plan.h). Generation 2 (the default) runs forward_v2 and backward_gather_v2 where
// they apply (K in {3, 5, 7}, s in {1, 2, 4}, the tile fits; the forward also needs
// 4-element-aligned q rows) and the generic kernels everywhere else; generation 1 always runs the
// generic kernels, so that one process can measure both (sapa::set_cuda_kernel_generation, the
// module's set_kernel_generation).
#ifndef SAPA_JAX_XLA_FFI_CUDA_V2_PLAN_H_
#define SAPA_JAX_XLA_FFI_CUDA_V2_PLAN_H_

#include <algorithm>
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

// Channel split (the planner's answer to a grid short of a wave): P.splits blocks share a tile,
// block j of them takes channel chunks [begin, end) of the kernel's chunk list. Splits fall on
// chunk boundaries, so every output element is summed by one thread in the same order as
// without a split: bitwise the same results.
struct ChunkRange {
  int begin, end;
};
__host__ __device__ inline ChunkRange split_range(int chunks, int splits, int j) {
  return ChunkRange{j * chunks / splits, (j + 1) * chunks / splits};
}
// forward_v2 splits the assembly's value chunks (every block computes the tile's weights).
__host__ __device__ inline int forward_chunks(const Params& P) {
  return (P.C + kValueChunk - 1) / kValueChunk;
}
// backward_gather_v2 splits the list of dk chunks (over d) followed by dv chunks (over C).
__host__ __device__ inline int gather_key_chunks(const Params& P) {
  return (P.d + kChunk - 1) / kChunk;
}
__host__ __device__ inline int gather_chunks(const Params& P) {
  return gather_key_chunks(P) + (P.C + kChunk - 1) / kChunk;
}

// ---- the planner's model of one block (plan.h) ----
// Instruction costs in warp instructions, from scripts/sass_report.py at sm_90 (K=5, s=2; f32
// rows 16-byte aligned): staging one 32-channel pixel row (16-byte cp.async: stage_padded 6.0,
// stage_points_padded 6.5); one tap of a 32-channel q.k per thread (logits_unrolled 43.7); the
// assembly per centre, group of 4 sub-pixels, tap and 64-channel chunk (assemble_unrolled: 22.0
// per item of 4 sub-pixels x 4 channels, 16 items a chunk = half a warp: 11.0); one point-tap
// of the gather per group of 4 sub-pixels (8.6). The per-point normalisation and the scratch
// gather are estimates (no report line).
inline constexpr double kStageRowInstr = 6.3;
inline constexpr double kLogitTapInstr = 43.7;
inline constexpr double kAssembleTapInstr = 11.0;
inline constexpr double kGatherTapInstr = 8.6;
inline constexpr double kNormaliseTapInstr = 24.0;   // estimate, per point and tap
inline constexpr double kScratchInstr = 16.0;        // estimate, per scratch element gathered
inline constexpr double kBlockInstr = 600.0;         // estimate: set-up, zeroing, barriers

struct BlockModel {
  double staged = 0, useful = 0;  // elements staged in shared memory; the block's share of
                                  // the input elements (each counted once over the grid)
  double instr = 0;               // warp instructions of the block
};

// The slowest block of a tile of forward_v2 (split j with the most value chunks).
inline BlockModel forward_block(const Params& P, int TH, int TW, int splits) {
  const double cent = double{1} * TH * TW, pts = cent * P.s2;
  const double halo = double{1} * (TH + 2 * P.r) * (TW + 2 * P.r);
  const int key_chunks = (P.d + kChunk - 1) / kChunk;
  int value_chunks = 0;
  for (int j = 0; j < splits; ++j) {
    const ChunkRange cr = split_range(forward_chunks(P), splits, j);
    value_chunks = cr.end - cr.begin > value_chunks ? cr.end - cr.begin : value_chunks;
  }
  const double value_channels = std::min<double>(P.C, value_chunks * double{kValueChunk});
  BlockModel m;
  m.staged = halo * (P.d + value_channels);
  m.useful = cent * (P.d + P.C) / splits;
  m.instr = kBlockInstr + halo * (key_chunks + 2.0 * value_chunks) * kStageRowInstr +
            pts * P.T * (key_chunks * kLogitTapInstr + kNormaliseTapInstr) / 32 +
            cent * (P.s2pad / kSub) * P.T * kAssembleTapInstr * value_chunks;
  return m;
}

// The slowest block of a tile of backward_gather_v2.
inline BlockModel gather_block(const Params& P, int TH, int TW, int splits) {
  const double cent = double{1} * TH * TW;
  const double strips = double{1} * (TH + kStrip - 1) / kStrip * TW;
  const double halo = double{1} * ((TH + kStrip - 1) / kStrip * kStrip + 2 * P.r) *
                      (TW + 2 * P.r);  // padded halo centres
  const double scratch = double{1} * (TH + 2 * P.r) * (TW + 2 * P.r) * P.s2 * P.T;
  const int keys = gather_key_chunks(P), chunks = gather_chunks(P);
  BlockModel m;
  for (int j = 0; j < splits; ++j) {
    const ChunkRange cr = split_range(chunks, splits, j);
    const int parts = (cr.begin < keys && cr.end > cr.begin) + (cr.end > keys);
    const int n = cr.end - cr.begin;
    const double instr = kBlockInstr + parts * scratch * kScratchInstr / 32 +
                         halo * P.s2 * n * kStageRowInstr +
                         strips * kStrip * P.T * (P.s2pad / kSub) * kGatherTapInstr * n;
    if (instr > m.instr) {
      m.instr = instr;
      m.staged = halo * P.s2 * std::min<double>(n * double{kChunk}, P.d + P.C) + parts * scratch;
    }
  }
  m.useful = cent * P.s2 * (P.d + P.C + 2.0 * P.T) / splits;
  return m;
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

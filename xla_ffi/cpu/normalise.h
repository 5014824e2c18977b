// The normaliser in row form, shared by the CPU passes of SAPA and CARAFE: `taps` rows of
// `width` lanes, tap-major (logit[t * width + j]), every lane j one output point. The stats
// layout and finish_stats are sapa_common.h's. The forward and the backward's recomputation run
// the same operations, so the backward sees the forward's weights bit for bit.
#ifndef SAPA_JAX_XLA_FFI_CPU_NORMALISE_H_
#define SAPA_JAX_XLA_FFI_CPU_NORMALISE_H_

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cpu/simd.h"
#include "cpu/types.h"
#include "sapa_common.h"

namespace sapa::cpu {
inline namespace SAPA_CPU_ISA {  // one copy per SIMD level, like simd.h

// Weights w and stats st0[j], st1[j] of every lane from its taps' logits.
template <typename A>
SAPA_INLINE void normalise_rows(int64_t normalizer, A eps, int64_t taps, int64_t width,
                                const A* logit, A* w, A* st0, A* st1) {
  if (normalizer == sapa::kNone) {
    std::copy(logit, logit + taps * width, w);
    std::fill(st0, st0 + width, A(0));
    std::fill(st1, st1 + width, A(0));
    return;
  }
  A* sum = st1;  // the sums first, then stat 1
  std::fill(sum, sum + width, A(0));
  if (normalizer == sapa::kSoftmax) {
    A* top = st0;
    std::fill(top, top + width, -std::numeric_limits<A>::infinity());
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t j = 0; j < width; ++j) top[j] = sapa::nan_max(top[j], logit[t * width + j]);
    for (int64_t t = 0; t < taps; ++t) {
      exp_shifted(logit + t * width, top, w + t * width, width);
      for (int64_t j = 0; j < width; ++j) sum[j] += w[t * width + j];
    }
  } else {
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t j = 0; j < width; ++j) {
        w[t * width + j] = sapa::h_value(normalizer, logit[t * width + j]);
        sum[j] += w[t * width + j];
      }
  }
  for (int64_t j = 0; j < width; ++j)
    sapa::finish_stats(normalizer, eps, st0[j], sum[j], &st0[j], &st1[j]);
  const A* scale = normalizer == sapa::kSoftmax ? st1 : st0;
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t j = 0; j < width; ++j) w[t * width + j] *= scale[j];
}

// The same weights recomputed from saved stats (the same operations, so the same bits).
template <typename A>
SAPA_INLINE void weights_from_stats(int64_t normalizer, int64_t taps, int64_t width,
                                    const A* logit, const A* st0, const A* st1, A* w) {
  if (normalizer == sapa::kNone) {
    std::copy(logit, logit + taps * width, w);
    return;
  }
  for (int64_t t = 0; t < taps; ++t) {
    A* wt = w + t * width;
    if (normalizer == sapa::kSoftmax) {
      exp_shifted(logit + t * width, st0, wt, width);
      for (int64_t j = 0; j < width; ++j) wt[j] *= st1[j];
    } else {
      for (int64_t j = 0; j < width; ++j)
        wt[j] = sapa::h_value(normalizer, logit[t * width + j]) * st0[j];
    }
  }
}

}  // namespace SAPA_CPU_ISA
}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_NORMALISE_H_

// SIMD primitives of the CPU kernels: channel loops (column_dots, weighted_rows), the
// vectorised exp, register transposes and row upsampling.
#ifndef SAPA_JAX_XLA_FFI_CPU_SIMD_H_
#define SAPA_JAX_XLA_FFI_CPU_SIMD_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/types.h"

namespace sapa::cpu {
inline namespace SAPA_CPU_ISA {

// ----------------------------------------------------------------------------------------------
// Channel loops. Fixed-size blocks of independent accumulators keep partial sums in registers
// and let g++ vectorise without -ffast-math; every lane sums in a fixed order, so results do not
// depend on blocking or threads. The passes are compiled once per SIMD level (cpu/levels.h), in
// files of their own with their own -m flags; helpers are force-inlined into them.

#define SAPA_INLINE inline __attribute__((always_inline))
#define SAPA_CLONES  // (was target_clones; the levels are whole translation units now)

// Explicit vectors (GCC/Clang vector extensions) of SAPA_CPU_VECTOR_BYTES: 64 (zmm) in the
// AVX-512 build, 32 (ymm, or pairs of xmm in the baseline) otherwise. Auto-vectorisation of
// these loops proved fragile. (-Wpsabi warns about passing such vectors by value; these helpers
// are always inlined.)
#ifndef SAPA_CPU_VECTOR_BYTES
#define SAPA_CPU_VECTOR_BYTES 32
#endif
#pragma GCC diagnostic ignored "-Wpsabi"
inline constexpr int kVectorBytes = SAPA_CPU_VECTOR_BYTES;
template <typename A> struct Simd {
  typedef A type __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t lanes = kVectorBytes / sizeof(A);
};
template <typename A> SAPA_INLINE typename Simd<A>::type load_vec(const A* p) {
  typename Simd<A>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// *p = v, unaligned, without taking v's address: a memcpy from an accumulator array made g++
// keep the array on the stack and store every accumulator to it on each iteration.
template <typename A> SAPA_INLINE void put_vec(A* p, typename Simd<A>::type v) {
  typedef A Unaligned __attribute__((vector_size(kVectorBytes), aligned(alignof(A)), may_alias));
  *reinterpret_cast<Unaligned*>(p) = v;
}
// Stores the lanes of v at p, converted to the storage type T.
template <typename T, typename A>
SAPA_INLINE void store_vec(typename Simd<A>::type v, T* p) {
  if constexpr (std::is_same_v<T, A>) {
    put_vec(p, v);
  } else {
    A lanes[Simd<A>::lanes];
    std::memcpy(lanes, &v, sizeof v);
    for (int64_t u = 0; u < Simd<A>::lanes; ++u) p[u] = From<T>::of(lanes[u]);
  }
}
// Eight floats, whatever the level: the register transposes below are written for them.
typedef float Float8 __attribute__((vector_size(32)));
SAPA_INLINE Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline constexpr int64_t kLanes = 32;  // output columns per block of the tap products
// Independent vector sums in flight (hides the FMA latency): half the register file.
inline constexpr int64_t kAccumulators = kVectorBytes == 64 ? 16 : 8;

// out_m[j] = sum_c a[c * a_stride + j] * b_m[c * b_stride + j] for M = 1 or 2 right-hand
// sides b_m sharing the loads of a; j < width, a multiple of kLanes.
template <int M, typename A>
SAPA_INLINE void column_dots(const A* __restrict a, int64_t a_stride, const A* const* b,
                             int64_t b_stride, int64_t channels, int64_t width, A* const* out) {
  using V = typename Simd<A>::type;
  constexpr int64_t L = Simd<A>::lanes, NV = kLanes / L;
  for (int64_t j0 = 0; j0 < width; j0 += kLanes) {
    V acc[M][NV] = {};
    for (int64_t c = 0; c < channels; ++c) {
      V x[NV];
      for (int64_t v = 0; v < NV; ++v) x[v] = load_vec(a + c * a_stride + j0 + v * L);
      for (int m = 0; m < M; ++m)
        for (int64_t v = 0; v < NV; ++v)
          acc[m][v] += x[v] * load_vec(b[m] + c * b_stride + j0 + v * L);
    }
    for (int m = 0; m < M; ++m)
      for (int64_t v = 0; v < NV; ++v) put_vec(out[m] + j0 + v * L, acc[m][v]);
  }
}

// Register blocking of the tap products over S left-hand rows (the s output rows that share one
// window of k or v) and M right-hand sides (taps): each loaded b vector feeds S sums and each
// loaded a vector M, (S + M) / (S M) loads per FMA. kTapGroup taps and kDotVectors vectors of
// columns per block keep the S * M * kDotVectors sums in registers: 32 zmm at AVX-512, 16 ymm
// at AVX2, 16 xmm (two per vector) in the baseline.
#if defined(__AVX512F__)
inline constexpr int kTapGroup = 5;
inline constexpr int64_t kDotVectors = 2;
#elif defined(__AVX__)
inline constexpr int kTapGroup = 5;
inline constexpr int64_t kDotVectors = 1;
#else
inline constexpr int kTapGroup = 2;
inline constexpr int64_t kDotVectors = 1;
#endif

// out[si * M + m][j] = sum_c a_si[c * a_stride + j] * b_m[c * b_stride + j] for si < S, m < M,
// j < width (a multiple of kLanes). Every element sums over c in order, with one accumulator,
// as column_dots does: the same bits, whatever S and M.
template <int S, int M, typename A>
SAPA_INLINE void column_dots_rows(const A* const* a, int64_t a_stride, const A* const* b,
                                  int64_t b_stride, int64_t channels, int64_t width,
                                  A* const* out) {
  using V = typename Simd<A>::type;
  constexpr int64_t L = Simd<A>::lanes, NV = std::min<int64_t>(kDotVectors, kLanes / L);
  for (int64_t j0 = 0; j0 < width; j0 += NV * L) {
    V acc[S][M][NV] = {};
    for (int64_t c = 0; c < channels; ++c) {
      V x[S][NV];
      for (int si = 0; si < S; ++si)
        for (int64_t v = 0; v < NV; ++v) x[si][v] = load_vec(a[si] + c * a_stride + j0 + v * L);
      for (int m = 0; m < M; ++m)
        for (int64_t v = 0; v < NV; ++v) {
          const V y = load_vec(b[m] + c * b_stride + j0 + v * L);
          for (int si = 0; si < S; ++si) acc[si][m][v] += x[si][v] * y;
        }
    }
    // unrolled early, so that acc becomes registers: inlined into the passes, a rolled copy
    // loop kept acc on the stack and g++ stored every sum there in each step of the c loop
#pragma GCC unroll 16
    for (int si = 0; si < S; ++si)
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
        for (int64_t v = 0; v < NV; ++v)
          put_vec(out[si * M + m] + j0 + v * L, acc[si][m][v]);
  }
}

// column_dots_rows for S left-hand rows and 1 <= m <= kTapGroup right-hand sides.
template <int S, typename A>
SAPA_INLINE void column_dots_rows_any(int m, const A* const* a, int64_t a_stride,
                                      const A* const* b, int64_t b_stride, int64_t channels,
                                      int64_t width, A* const* out) {
  static_assert(kTapGroup == 2 || kTapGroup == 5);
  switch (m) {
    case 1: column_dots_rows<S, 1>(a, a_stride, b, b_stride, channels, width, out); break;
    case 2: column_dots_rows<S, 2>(a, a_stride, b, b_stride, channels, width, out); break;
    default:
      if constexpr (kTapGroup == 5) {
        switch (m) {
          case 3: column_dots_rows<S, 3>(a, a_stride, b, b_stride, channels, width, out); break;
          case 4: column_dots_rows<S, 4>(a, a_stride, b, b_stride, channels, width, out); break;
          default: column_dots_rows<S, 5>(a, a_stride, b, b_stride, channels, width, out); break;
        }
      }
  }
}

// Channels [c0, c0 + NV * lanes) of weighted_rows_with below. With few accumulators (P * NV
// small, as for one point and few channels) the terms t go round-robin into U partial sums that
// are added at the end, so that U * P * NV independent FMA chains hide the FMA latency.
template <int P, int64_t NV, typename T, typename A, typename Coef>
SAPA_INLINE void weighted_rows_block(const Coef& coef, const A* const* rows, int64_t count,
                                     int64_t c0, T* const* out) {
  using V = typename Simd<A>::type;
  constexpr int64_t L = Simd<A>::lanes;
  constexpr int64_t U = std::clamp<int64_t>(kAccumulators / (P * NV), 1, 4);
  V acc[U][P][NV] = {};
  int64_t t = 0;
  for (; t + U <= count; t += U) {
    for (int64_t u = 0; u < U; ++u) {
      V x[NV];
      for (int64_t v = 0; v < NV; ++v) x[v] = load_vec(rows[t + u] + c0 + v * L);
      for (int p = 0; p < P; ++p) {
        const A w = coef(p, t + u);
        for (int64_t v = 0; v < NV; ++v) acc[u][p][v] += w * x[v];
      }
    }
  }
  for (; t < count; ++t) {
    V x[NV];
    for (int64_t v = 0; v < NV; ++v) x[v] = load_vec(rows[t] + c0 + v * L);
    for (int p = 0; p < P; ++p) {
      const A w = coef(p, t);
      for (int64_t v = 0; v < NV; ++v) acc[0][p][v] += w * x[v];
    }
  }
  for (int64_t u = 1; u < U; ++u)
    for (int p = 0; p < P; ++p)
      for (int64_t v = 0; v < NV; ++v) acc[0][p][v] += acc[u][p][v];
  for (int p = 0; p < P; ++p) {
    for (int64_t v = 0; v < NV; ++v) store_vec<T, A>(acc[0][p][v], out[p] + c0 + v * L);
  }
}

// out[p][c] = sum_t coef(p, t) * rows[t][c], t = 0..count-1 in order, stored as T, for P points
// sharing the rows (the s output points of one low-res centre). Channels go in blocks of
// decreasing width, then scalars. The order of the sum depends on count, P and the channel's
// block only, never on threads, data or how coef(p, t) finds its value.
template <int P, typename T, typename A, typename Coef>
SAPA_INLINE void weighted_rows_with(const Coef& coef, const A* const* rows, int64_t count,
                                    int64_t channels, T* const* out) {
  constexpr int64_t L = Simd<A>::lanes;
  constexpr int64_t NV = P >= kAccumulators ? 1 : kAccumulators / P;
  int64_t c0 = 0;
  for (; c0 + NV * L <= channels; c0 += NV * L)
    weighted_rows_block<P, NV>(coef, rows, count, c0, out);
  if constexpr (NV > 4) {
    for (; c0 + 4 * L <= channels; c0 += 4 * L)
      weighted_rows_block<P, 4>(coef, rows, count, c0, out);
  }
  if constexpr (NV > 2) {
    if (c0 + 2 * L <= channels) {
      weighted_rows_block<P, 2>(coef, rows, count, c0, out);
      c0 += 2 * L;
    }
  }
  if constexpr (NV > 1) {
    if (c0 + L <= channels) {
      weighted_rows_block<P, 1>(coef, rows, count, c0, out);
      c0 += L;
    }
  }
  for (; c0 < channels; ++c0)
    for (int p = 0; p < P; ++p) {
      A acc = A(0);
      for (int64_t t = 0; t < count; ++t) acc += coef(p, t) * rows[t][c0];
      out[p][c0] = From<T>::of(acc);
    }
}

// weighted_rows_with, coefficient t of point p at coef[p * coef_stride + t].
template <int P, typename T, typename A>
SAPA_INLINE void weighted_rows(const A* coef, int64_t coef_stride, const A* const* rows,
                               int64_t count, int64_t channels, T* const* out) {
  weighted_rows_with<P>([&](int p, int64_t t) { return coef[p * coef_stride + t]; }, rows, count,
                        channels, out);
}

// weighted_rows_with, coefficient t of point p at coef[p][t] (no copy into a block).
template <int P, typename T, typename A>
SAPA_INLINE void weighted_rows_at(const A* const* coef, const A* const* rows, int64_t count,
                                  int64_t channels, T* const* out) {
  weighted_rows_with<P>([&](int p, int64_t t) { return coef[p][t]; }, rows, count, channels,
                        out);
}

// fn(std::integral_constant<int, P>, p0) for the points p0 .. p0 + P - 1, in groups of up to 4:
// the weighted_rows kernels are instantiated for P = 1..4 only.
template <typename Fn> SAPA_INLINE void in_point_groups(int64_t points, const Fn& fn) {
  for (int64_t p0 = 0; p0 < points; p0 += 4) {
    switch (std::min<int64_t>(points - p0, 4)) {
      case 1: fn(std::integral_constant<int, 1>{}, p0); break;
      case 2: fn(std::integral_constant<int, 2>{}, p0); break;
      case 3: fn(std::integral_constant<int, 3>{}, p0); break;
      default: fn(std::integral_constant<int, 4>{}, p0); break;
    }
  }
}

// weighted_rows_at for any number of points.
template <typename T, typename A>
SAPA_INLINE void weighted_rows_at_any(int64_t points, const A* const* coef, const A* const* rows,
                                      int64_t count, int64_t channels, T* const* out) {
  in_point_groups(points, [&](auto group, int64_t p0) {
    weighted_rows_at<decltype(group)::value>(coef + p0, rows, count, channels, out + p0);
  });
}

// weighted_rows for any number of points.
template <typename T, typename A>
SAPA_INLINE void weighted_rows_any(int64_t points, const A* coef, int64_t coef_stride,
                                   const A* const* rows, int64_t count, int64_t channels,
                                   T* const* out) {
  in_point_groups(points, [&](auto group, int64_t p0) {
    weighted_rows<decltype(group)::value>(coef + p0 * coef_stride, coef_stride, rows, count,
                                          channels, out + p0);
  });
}

// out[j] = exp(x[j] - shift[j]) for j < width (a multiple of kLanes). For float a vectorised
// Cephes-style exp: x = n ln2 + r, a degree-6 polynomial for e^r, 2^n through the exponent
// bits; relative error about 2e-7, 0 below ln(FLT_MIN) (no subnormals), NaN in NaN out. The
// forward and the backward both compute the softmax weights through this function, so the
// backward sees the forward's weights bit for bit.
SAPA_INLINE void exp_shifted(const float* __restrict x, const float* __restrict shift,
                             float* __restrict out, int64_t width) {
  using V = Simd<float>::type;
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  constexpr int64_t L = Simd<float>::lanes;
  const V lo = V{} - 87.336544f, hi = V{} + 88.0f, magic = V{} + 12582912.0f;  // 1.5 * 2^23
  for (int64_t j = 0; j < width; j += L) {
    const V arg = load_vec(x + j) - load_vec(shift + j);
    const VI big = (VI)(arg > hi);  // false for NaN, which goes through and comes out NaN
    const V xc = (V)(((VI)arg & ~big) | ((VI)hi & big));
    const V t = xc * 1.44269504088896341f + magic;  // n in the low mantissa bits of t
    const V n = t - magic;
    const V r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 in two parts
    V p = V{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const V er = p * r * r + r + 1.0f;
    const V scale = (V)((((VI)t - (VI)magic) + 127) << 23);
    const V e = er * scale;
    const V result = (V)((VI)e & ~(VI)(arg < lo));  // also exp(-inf) = 0
    std::memcpy(out + j, &result, sizeof result);
  }
}

SAPA_INLINE void exp_shifted(const double* __restrict x, const double* __restrict shift,
                             double* __restrict out, int64_t width) {
  for (int64_t j = 0; j < width; ++j) out[j] = std::exp(x[j] - shift[j]);
}

// dst[c * dst_stride + r] = to_acc(src[r * src_stride + c]) for r < rows, c < cols. For float
// in 8 x 8 tiles transposed in registers (unpack / shuffle / 128-bit swap, as one would with
// AVX intrinsics), the rest element by element.
template <typename T, typename A>
SAPA_INLINE void transpose(const T* __restrict src, int64_t src_stride, int64_t rows,
                           int64_t cols, A* __restrict dst, int64_t dst_stride) {
  int64_t r0 = 0, c0 = 0;
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    using V = Float8;
    for (; r0 + 8 <= rows; r0 += 8) {
      for (c0 = 0; c0 + 8 <= cols; c0 += 8) {
        V x[8], t[8], u[8];
        for (int i = 0; i < 8; ++i) x[i] = load8(src + (r0 + i) * src_stride + c0);
        for (int i = 0; i < 8; i += 2) {
          t[i] = __builtin_shufflevector(x[i], x[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
          t[i + 1] = __builtin_shufflevector(x[i], x[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
        }
        for (int i = 0; i < 8; i += 4) {
          u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
          u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
          u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
          u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
        }
        for (int i = 0; i < 4; ++i) {
          const V lo = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
          const V hi = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
          std::memcpy(dst + (c0 + i) * dst_stride + r0, &lo, sizeof lo);
          std::memcpy(dst + (c0 + i + 4) * dst_stride + r0, &hi, sizeof hi);
        }
      }
      for (int64_t c = c0; c < cols; ++c)
        for (int64_t r = r0; r < r0 + 8; ++r) dst[c * dst_stride + r] = src[r * src_stride + c];
    }
  }
#endif
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = r0; r < rows; ++r) dst[c * dst_stride + r] = to_acc(src[r * src_stride + c]);
}

// out[j] = in[j / s] for j < n * s (nearest-neighbour upsampling of one row).
template <typename A>
SAPA_INLINE void repeat_each(const A* __restrict in, int64_t n, int64_t s, A* __restrict out) {
  int64_t i = 0;
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  if constexpr (std::is_same_v<A, float>) {
    using V = Float8;
    if (s == 2) {
      for (; i + 8 <= n; i += 8) {
        const V x = load8(in + i);
        const V lo = __builtin_shufflevector(x, x, 0, 0, 1, 1, 2, 2, 3, 3);
        const V hi = __builtin_shufflevector(x, x, 4, 4, 5, 5, 6, 6, 7, 7);
        std::memcpy(out + 2 * i, &lo, sizeof lo);
        std::memcpy(out + 2 * i + 8, &hi, sizeof hi);
      }
    }
  }
#endif
  for (; i < n; ++i)
    for (int64_t k = 0; k < s; ++k) out[i * s + k] = in[i];
}

}  // namespace SAPA_CPU_ISA
}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_SIMD_H_

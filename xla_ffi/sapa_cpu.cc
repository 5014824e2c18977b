// Fused SAPA core for XLA:CPU (DESIGN.md sections 1 and 3; layout and shared index, border and
// normaliser logic in sapa_common.h).
//
// Forward: for each output row, the K*K logits q . k of every point, their normalisation and
// out = sum_p w_p v[l+p], in one pass; k and v are never expanded into K*K patches.
// Backward in two passes, without atomics: pass 1 per output row recomputes the logits and
// weights from the saved stats, dw_p = g . v[l+p], the logit gradients and dq, and writes the
// per-tap weights and logit gradients to the scratch outputs; pass 2 per low-res point gathers
// dk and dv from the (s*K)^2 output points whose windows cover it. Every sum runs in a fixed
// order and work items are independent, so results are bitwise reproducible and do not depend
// on the number of threads.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "sapa_common.h"
#include "sapa_handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using sapa::Geometry;

// ----------------------------------------------------------------------------------------------
// 16-bit floats, converted by hand (round to nearest even, NaN kept quiet, subnormals exact).

struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

inline float float_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(BF16 x) { return float_from_bits(uint32_t(x.bits) << 16); }
inline float to_acc(F16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1f) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
  const float magnitude = float(mantissa) * 0x1p-24f;  // subnormal or zero, exact
  return sign ? -magnitude : magnitude;
}

template <typename T> struct From;
template <> struct From<float> { static float of(float a) { return a; } };
template <> struct From<double> { static double of(double a) { return a; } };
template <> struct From<BF16> {
  static BF16 of(float a) {
    uint32_t u = bits_of(a);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);  // carries into the exponent (and to inf) as it should
    return {uint16_t(u >> 16)};
  }
};
template <> struct From<F16> {
  static F16 of(float a) {
    const uint32_t u = bits_of(a);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    const uint32_t mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return {uint16_t(sign | 0x7e00u | ((mag >> 13) & 0x3ffu))};
    if (mag >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
    if (mag >= 0x38800000u) {  // normal half: round at bit 13, then rebias 127 -> 15
      const uint32_t rounded = mag + 0xfffu + ((mag >> 13) & 1u) - (112u << 23);
      return {uint16_t(sign | (rounded >> 13))};
    }
    // Subnormal half: adding 0.5 leaves an ulp of 2^-24, so the FPU's round-to-nearest-even
    // produces the half mantissa in the low bits.
    const float shifted = float_from_bits(mag) + 0.5f;
    return {uint16_t(sign | (bits_of(shifted) - 0x3f000000u))};
  }
};

// ----------------------------------------------------------------------------------------------
// Channel loops. Fixed-size blocks of independent accumulators keep partial sums in registers
// and let g++ vectorise without -ffast-math; every lane sums in a fixed order, so results do not
// depend on blocking or threads. The hot functions get an x86-64-v3 (AVX2 + FMA) clone next to
// the baseline one, chosen once at load time; helpers are force-inlined into them.

#ifndef SAPA_CLONES  // (-DSAPA_CLONES= builds the baseline code only, e.g. to test it)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SAPA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SAPA_CLONES
#endif
#endif
#define SAPA_INLINE inline __attribute__((always_inline))

// Explicit 32-byte vectors (GCC/Clang vector extensions): AVX registers in the v3 clone, pairs
// of SSE registers in the baseline one. Auto-vectorisation of these loops proved fragile.
// (-Wpsabi warns about passing such vectors by value; these helpers are always inlined.)
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename A> struct Simd {
  typedef A type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(A);
};
template <typename A> SAPA_INLINE typename Simd<A>::type load_vec(const A* p) {
  typename Simd<A>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

constexpr int64_t kLanes = 32;  // output columns per block of the tap products
constexpr int64_t kAccumulators = 8;  // independent vector sums in flight (hides FMA latency)

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
      for (int64_t v = 0; v < NV; ++v) std::memcpy(out[m] + j0 + v * L, &acc[m][v], sizeof(V));
  }
}

// Channels [c0, c0 + NV * lanes) of weighted_rows below.
template <int P, int64_t NV, typename T, typename A>
SAPA_INLINE void weighted_rows_block(const A* __restrict coef, int64_t coef_stride,
                                     const A* const* rows, int64_t count, int64_t c0,
                                     T* const* out) {
  using V = typename Simd<A>::type;
  constexpr int64_t L = Simd<A>::lanes;
  V acc[P][NV] = {};
  for (int64_t t = 0; t < count; ++t) {
    V x[NV];
    for (int64_t v = 0; v < NV; ++v) x[v] = load_vec(rows[t] + c0 + v * L);
    for (int p = 0; p < P; ++p) {
      const A w = coef[p * coef_stride + t];
      for (int64_t v = 0; v < NV; ++v) acc[p][v] += w * x[v];
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int64_t v = 0; v < NV; ++v) {
      if constexpr (std::is_same_v<T, A>) {
        std::memcpy(out[p] + c0 + v * L, &acc[p][v], sizeof(V));
      } else {
        A result[L];
        std::memcpy(result, &acc[p][v], sizeof result);
        for (int64_t u = 0; u < L; ++u) out[p][c0 + v * L + u] = From<T>::of(result[u]);
      }
    }
  }
}

// out[p][c] = sum_t coef[p * coef_stride + t] * rows[t][c], t = 0..count-1 in order, stored as
// T, for P points sharing the rows (the s output points of one low-res centre). Channels go in
// blocks of decreasing width, then scalars: the same order per channel whichever block.
template <int P, typename T, typename A>
SAPA_INLINE void weighted_rows(const A* coef, int64_t coef_stride, const A* const* rows,
                               int64_t count, int64_t channels, T* const* out) {
  constexpr int64_t L = Simd<A>::lanes;
  constexpr int64_t NV = P >= kAccumulators ? 1 : kAccumulators / P;
  int64_t c0 = 0;
  for (; c0 + NV * L <= channels; c0 += NV * L)
    weighted_rows_block<P, NV>(coef, coef_stride, rows, count, c0, out);
  if constexpr (NV > 4) {
    if (c0 + 4 * L <= channels) {
      weighted_rows_block<P, 4>(coef, coef_stride, rows, count, c0, out);
      c0 += 4 * L;
    }
  }
  if constexpr (NV > 2) {
    if (c0 + 2 * L <= channels) {
      weighted_rows_block<P, 2>(coef, coef_stride, rows, count, c0, out);
      c0 += 2 * L;
    }
  }
  if constexpr (NV > 1) {
    if (c0 + L <= channels) {
      weighted_rows_block<P, 1>(coef, coef_stride, rows, count, c0, out);
      c0 += L;
    }
  }
  for (; c0 < channels; ++c0)
    for (int p = 0; p < P; ++p) {
      A acc = A(0);
      for (int64_t t = 0; t < count; ++t) acc += coef[p * coef_stride + t] * rows[t][c0];
      out[p][c0] = From<T>::of(acc);
    }
}

// weighted_rows for any number of points, in groups of up to 4.
template <typename T, typename A>
SAPA_INLINE void weighted_rows_any(int64_t points, const A* coef, int64_t coef_stride,
                                   const A* const* rows, int64_t count, int64_t channels,
                                   T* const* out) {
  for (int64_t p0 = 0; p0 < points; p0 += 4) {
    const A* c = coef + p0 * coef_stride;
    switch (std::min<int64_t>(points - p0, 4)) {
      case 1: weighted_rows<1>(c, coef_stride, rows, count, channels, out + p0); break;
      case 2: weighted_rows<2>(c, coef_stride, rows, count, channels, out + p0); break;
      case 3: weighted_rows<3>(c, coef_stride, rows, count, channels, out + p0); break;
      default: weighted_rows<4>(c, coef_stride, rows, count, channels, out + p0); break;
    }
  }
}

// out[j] = exp(x[j] - shift[j]) for j < width (a multiple of kLanes). For float a vectorised
// Cephes-style exp: x = n ln2 + r, a degree-6 polynomial for e^r, 2^n through the exponent
// bits; relative error about 2e-7, 0 below ln(FLT_MIN) (no subnormals), NaN in NaN out. The
// forward and the backward both compute the softmax weights through this function, so the
// backward sees the forward's weights bit for bit.
SAPA_INLINE void exp_shifted(const float* __restrict x, const float* __restrict shift,
                             float* __restrict out, int64_t width) {
  using V = Simd<float>::type;
  typedef int32_t VI __attribute__((vector_size(32)));
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
    using V = Simd<float>::type;
    for (; r0 + 8 <= rows; r0 += 8) {
      for (c0 = 0; c0 + 8 <= cols; c0 += 8) {
        V x[8], t[8], u[8];
        for (int i = 0; i < 8; ++i) x[i] = load_vec(src + (r0 + i) * src_stride + c0);
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
    using V = Simd<float>::type;
    if (s == 2) {
      for (; i + 8 <= n; i += 8) {
        const V x = load_vec(in + i);
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

// A window of pixel rows of one NHWC image, point-major, in the accumulation type: direct
// pointers when the storage type already is the accumulation type, else rows converted into a
// ring of `slots` rows (a row stays converted while consecutive windows keep using it).
template <typename T, typename A>
class RowBand {
 public:
  RowBand(int64_t width, int64_t channels, int64_t slots)
      : width_(width), channels_(channels), slots_(slots),
        buffer_(std::is_same_v<T, A> ? 0 : size_t(slots * width * channels)),
        tags_(std::is_same_v<T, A> ? 0 : size_t(slots), nullptr) {}

  // `image` points at row 0 of one batch element; rows [row0, row1) (at most `slots` of
  // them) become addressable.
  void load(const T* image, int64_t row0, int64_t row1) {
    image_ = image;
    if constexpr (!std::is_same_v<T, A>) {
      const int64_t row_size = width_ * channels_;
      for (int64_t row = row0; row < row1; ++row) {
        const T* src = image + row * row_size;
        const size_t slot = size_t(row % slots_);
        if (tags_[slot] == src) continue;
        tags_[slot] = src;
        A* dst = buffer_.data() + slot * row_size;
        for (int64_t e = 0; e < row_size; ++e) dst[e] = to_acc(src[e]);
      }
    }
  }

  const A* at(int64_t row, int64_t col) const {
    if constexpr (std::is_same_v<T, A>) {
      return image_ + (row * width_ + col) * channels_;
    } else {
      return buffer_.data() + ((row % slots_) * width_ + col) * channels_;
    }
  }

 private:
  int64_t width_, channels_, slots_;
  const T* image_ = nullptr;
  std::vector<A> buffer_;
  std::vector<const T*> tags_;  // which image row each slot holds
};

template <typename A> std::vector<A> zeros(int64_t n) { return std::vector<A>(size_t(n), A(0)); }

// ----------------------------------------------------------------------------------------------
// Parallel-for over [0, items): threads take chunks of consecutive items from a shared counter
// (a slow or descheduled thread does not hold the others up); inline for small work. Items
// are independent, so which thread runs which item does not change a bit of the result.

int64_t num_threads() {
  if (const char* env = std::getenv("SAPA_JAX_NUM_THREADS")) {
    char* end = nullptr;
    const long value = std::strtol(env, &end, 10);
    if (end != env && value > 0) return std::min<long>(value, 256);
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int64_t>(hw);
}

// fn(begin, end) runs items [begin, end) and is called several times per thread; make_state()
// builds one per-thread state (buffers) that is passed to every call of that thread.
template <typename MakeState, typename Fn>
void parallel_for(int64_t items, double flops_per_item, const MakeState& make_state,
                  const Fn& fn) {
  if (items <= 0) return;
  constexpr double kFlopsPerThread = 2e5;  // below this a thread costs more than it saves
  const double by_work = double(items) * flops_per_item / kFlopsPerThread;
  int64_t threads = std::min<int64_t>(num_threads(), items);
  if (by_work < double(threads)) threads = std::max<int64_t>(1, int64_t(by_work));
  if (threads <= 1) {
    auto state = make_state();
    fn(state, int64_t(0), items);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, items / (threads * 4));
  std::atomic<int64_t> next{0};
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  auto run = [&](int64_t t) {
    try {
      auto state = make_state();
      for (int64_t begin; (begin = next.fetch_add(chunk)) < items;)
        fn(state, begin, std::min(begin + chunk, items));
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
      next.store(items);  // stop handing out work
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int64_t t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(run, t);
    } catch (...) {  // could not start a thread: the others take its share
      break;
    }
  }
  run(0);
  for (auto& thread : pool) thread.join();
  for (auto& error : errors)
    if (error) std::rethrow_exception(error);
}

// Rows of a low-res tensor (n, H, W, ch) transposed to channel-major and upsampled by s along
// the columns into zero-padded rows of stride band_w: row(b, i)[c * band_w + r s + jj] =
// x[b, i, jj / s, c]. Tap (dy, dx) of output column j then sits at column j + (dx + r) s of
// window row dy, and out-of-map columns read the zero padding (the logit 0 of an outside tap).
// A ring of K rows: consecutive work items of a thread share K - 1 of their window rows.
template <typename T, typename A>
class Band {
 public:
  Band(const Geometry& g, int64_t ch, int64_t band_w)
      : g_(g), ch_(ch), band_w_(band_w), data_(zeros<A>(g.K * ch * band_w)),
        low_(zeros<A>(ch * g.W)), tags_(size_t(g.K), -1) {}

  SAPA_INLINE const A* row(const T* x, int64_t b, int64_t i) {
    const int64_t slot = i % g_.K, key = b * g_.H + i;
    A* dst = data_.data() + slot * ch_ * band_w_ + g_.r * g_.s;
    if (tags_[slot] != key) {  // the padding columns are never written: they stay zero
      tags_[slot] = key;
      const T* src = x + key * g_.W * ch_;
      if (g_.s == 1) {
        transpose(src, ch_, g_.W, ch_, dst, band_w_);
      } else {
        transpose(src, ch_, g_.W, ch_, low_.data(), g_.W);
        for (int64_t c = 0; c < ch_; ++c)
          repeat_each(low_.data() + c * g_.W, g_.W, g_.s, dst + c * band_w_);
      }
    }
    return dst - g_.r * g_.s;
  }

 private:
  Geometry g_;
  int64_t ch_, band_w_;
  std::vector<A> data_, low_;  // the ring; one transposed row before upsampling
  std::vector<int64_t> tags_;
};

// ----------------------------------------------------------------------------------------------
// The kernels. One work item is (batch element, low-res row): s output rows in the forward and
// the first backward pass, one low-res row of dk/dv in the second.
//
// Tap products (logits q.k, and g.v in the backward) are computed per output row with the
// output columns on the vector lanes: the row of q (or g) is transposed to channel-major and
// multiplied with the K window rows of k (or v) held in a Band.

struct Options {
  int64_t normalizer, border;
  float eps;
};

template <typename T, typename A>
struct Kernel {
  Geometry g;
  Options o;
  int64_t width;   // oW rounded up to kLanes: row stride of transposed rows and tap products
  int64_t band_w;  // width + 2 r s: row stride of a band

  Kernel(const Geometry& geometry, const Options& options)
      : g(geometry), o(options), width((g.oW() + kLanes - 1) / kLanes * kLanes),
        band_w(width + 2 * g.r * g.s) {}

  int64_t taps() const { return g.taps(); }
  int64_t centre_tap() const { return g.r * g.K + g.r; }  // always inside the map

  // rowT[c * width + j] = x[j, c] for the oW points of one output row (padding lanes stay 0).
  SAPA_INLINE void transpose_row(const T* x, int64_t ch, A* rowT) const {
    transpose(x, ch, g.oW(), ch, rowT, width);
  }

  // zero[j] = rowT[:, j] . 0: 0, or NaN when the point's row holds a NaN or an infinity. It is
  // the product of an out-of-map tap, whose k (or v) is the zero padding in the jnp
  // formulation: a non-finite q (or g) makes it NaN there, and so it must here.
  SAPA_INLINE void zero_products(const A* rowT, int64_t ch, A* zero) const {
    std::fill(zero, zero + width, A(0));
    for (int64_t c = 0; c < ch; ++c)
      for (int64_t j = 0; j < width; ++j) zero[j] += rowT[c * width + j] * A(0);
  }

  // prod[t * width + j] = rowT[:, j] . (tap t of column j in the band); zero[j] (see
  // zero_products) on window rows outside the map (band row nullptr), as the band's zero
  // padding gives on the others. Taps go in pairs sharing the loads of rowT.
  SAPA_INLINE void tap_products(const A* rowT, const A* const* band, int64_t ch, A* prod,
                                A* zero) const {
    zero_products(rowT, ch, zero);
    for (int64_t dy = 0; dy < g.K; ++dy)
      for (int64_t dx = 0; dx < g.K; dx += 2) {
        const bool pair = dx + 1 < g.K;
        A* first = prod + (dy * g.K + dx) * width;
        A* out[2] = {first, pair ? first + width : nullptr};
        if (!band[dy]) {
          for (int m = 0; m < (pair ? 2 : 1); ++m) std::copy(zero, zero + width, out[m]);
          continue;
        }
        const A* rhs[2] = {band[dy] + dx * g.s, pair ? band[dy] + (dx + 1) * g.s : nullptr};
        if (pair)
          column_dots<2>(rowT, width, rhs, band_w, ch, width, out);
        else
          column_dots<1>(rowT, width, rhs, band_w, ch, width, out);
      }
  }

  // Window rows li-r..li+r of a low-res tensor, as band rows (nullptr outside the map).
  SAPA_INLINE void window(Band<T, A>& band, const T* x, int64_t b, int64_t li,
                          const A** rows) const {
    for (int64_t dy = 0; dy < g.K; ++dy) {
      const int64_t i = li - g.r + dy;
      rows[dy] = i >= 0 && i < g.H ? band.row(x, b, i) : nullptr;
    }
  }

  // inside[t * width + j]: is tap t of output column j inside the map (window rows around li)?
  // 0 in the padding lanes j >= oW.
  SAPA_INLINE void inside_mask(int64_t li, uint8_t* inside) const {
    int64_t t = 0;
    std::fill(inside, inside + taps() * width, uint8_t(0));
    for (int64_t dy = -g.r; dy <= g.r; ++dy)
      for (int64_t dx = -g.r; dx <= g.r; ++dx, ++t)
        for (int64_t lj = 0; lj < g.W; ++lj)
          if (g.inside(li, lj, dy, dx))
            std::fill_n(inside + t * width + lj * g.s, g.s, uint8_t(1));
  }

  // Logits of taps left out of the normalisation (border "valid", outside the map) become
  // -inf: every normaliser then gives them weight exactly 0, as h(-inf) = exp(-inf) = 0; for
  // "none", whose weights are the logits, they become 0.
  SAPA_INLINE void mask_uncounted(A* logit, const uint8_t* inside) const {
    if (o.border == sapa::kZeros) return;  // every tap counts
    const A masked = o.normalizer == sapa::kNone ? A(0) : -std::numeric_limits<A>::infinity();
    for (int64_t e = 0; e < taps() * width; ++e)
      if (!sapa::tap_counted(o.border, inside[e])) logit[e] = masked;
  }

  // Is tap t of lane j counted? Zeros border: all (padding lanes included, harmlessly).
  SAPA_INLINE bool counted(const uint8_t* inside, int64_t e) const {
    return sapa::tap_counted(o.border, inside[e] != 0);
  }

  // poison[j]: the sum of out_poison_term (sapa_common.h) over the out-of-map taps of lane j,
  // from the weights w.
  SAPA_INLINE void out_poison(const A* w, const uint8_t* inside, A* poison) const {
    std::fill(poison, poison + width, A(0));
    for (int64_t e = 0; e < taps() * width; e += width)
      for (int64_t j = 0; j < width; ++j)
        if (!inside[e + j]) poison[j] += sapa::out_poison_term(o.border, w[e + j]);
  }

  // The same for dq: dq_poison_term from the logit gradients dl and qzero (zero_products of q:
  // the raw logit of every out-of-map tap).
  SAPA_INLINE void dq_poison(const A* dl, const A* qzero, const uint8_t* inside,
                             A* poison) const {
    std::fill(poison, poison + width, A(0));
    for (int64_t e = 0; e < taps() * width; e += width)
      for (int64_t j = 0; j < width; ++j)
        if (!inside[e + j])
          poison[j] += sapa::dq_poison_term(o.normalizer, o.border, qzero[j], dl[e + j]);
  }

  // Forward normalisation of one output row, every lane j a point: weights w[t * width + j]
  // and stats st0[j], st1[j] (layout and finish_stats in sapa_common.h).
  SAPA_INLINE void normalise_row(const A* logit, A* w, A* st0, A* st1) const {
    const int64_t n = taps();
    if (o.normalizer == sapa::kNone) {
      std::copy(logit, logit + n * width, w);
      std::fill(st0, st0 + width, A(0));
      std::fill(st1, st1 + width, A(0));
      return;
    }
    A* sum = st1;  // the sums first, then stat 1
    std::fill(sum, sum + width, A(0));
    if (o.normalizer == sapa::kSoftmax) {
      A* top = st0;
      std::fill(top, top + width, -std::numeric_limits<A>::infinity());
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < width; ++j) top[j] = sapa::nan_max(top[j], logit[t * width + j]);
      for (int64_t t = 0; t < n; ++t) {
        exp_shifted(logit + t * width, top, w + t * width, width);
        for (int64_t j = 0; j < width; ++j) sum[j] += w[t * width + j];
      }
    } else {
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < width; ++j) {
          w[t * width + j] = sapa::h_value(o.normalizer, logit[t * width + j]);
          sum[j] += w[t * width + j];
        }
    }
    for (int64_t j = 0; j < width; ++j)
      sapa::finish_stats(o.normalizer, A(o.eps), st0[j], sum[j], &st0[j], &st1[j]);
    const A* scale = o.normalizer == sapa::kSoftmax ? st1 : st0;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < width; ++j) w[t * width + j] *= scale[j];
  }

  // The same weights recomputed from saved stats (the same operations, so the same bits).
  SAPA_INLINE void weights_row(const A* logit, const A* st0, const A* st1, A* w) const {
    if (o.normalizer == sapa::kNone) {
      std::copy(logit, logit + taps() * width, w);
      return;
    }
    for (int64_t t = 0; t < taps(); ++t) {
      A* wt = w + t * width;
      if (o.normalizer == sapa::kSoftmax) {
        exp_shifted(logit + t * width, st0, wt, width);
        for (int64_t j = 0; j < width; ++j) wt[j] *= st1[j];
      } else {
        for (int64_t j = 0; j < width; ++j)
          wt[j] = sapa::h_value(o.normalizer, logit[t * width + j]) * st0[j];
      }
    }
  }

  // Inside taps of centre (li, lj) and their rows in `band` (tap_of: their tap indices).
  // Returns their number.
  SAPA_INLINE int64_t inside_rows(const RowBand<T, A>& band, int64_t li, int64_t lj, bool* inside,
                      const A** rows, int64_t* tap_of) const {
    int64_t count = 0, t = 0;
    for (int64_t dy = -g.r; dy <= g.r; ++dy)
      for (int64_t dx = -g.r; dx <= g.r; ++dx, ++t) {
        inside[t] = g.inside(li, lj, dy, dx);
        if (inside[t]) {
          rows[count] = band.at(li + dy, lj + dx);
          tap_of[count++] = t;
        }
      }
    return count;
  }

  // The normaliser's Jacobian, row form: dlogit[t * width + j] from the weights w, the
  // dw_t = g . v[l + t] and the stats, for every counted tap (out-of-map ones too: their
  // gradient only feeds dq's poison, see dq_poison); uncounted taps get 0.
  //   softmax:   dlogit_t = w_t (dw_t - sum_u w_u dw_u)
  //   h / (S + eps): dlogit_t = h'(x_t) (eps dw_t + sum_u h_u (dw_t - dw_u)) / (S + eps)^2,
  // the cancellation-free form of DESIGN.md: with w_u = h_u / (S + eps) summing to nearly 1,
  // dw_t - sum_u w_u dw_u would lose the eps / S part that the gradient consists of. For an
  // all-zero window (stat 1 set) jnp's safe denominator is 1: dh = dw.
  //   none:      dlogit_t = dw_t
  SAPA_INLINE void logit_gradients(const A* logit, const A* w, const A* dw, const A* st0,
                                   const A* st1, const uint8_t* inside, A* h, A* mean,
                                   A* dl) const {
    const int64_t n = taps();
    if (o.normalizer == sapa::kNone) {
      for (int64_t e = 0; e < n * width; ++e) dl[e] = counted(inside, e) ? dw[e] : A(0);
      return;
    }
    if (o.normalizer == sapa::kSoftmax) {
      std::fill(mean, mean + width, A(0));
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < width; ++j) mean[j] += w[t * width + j] * dw[t * width + j];
      for (int64_t e = 0; e < n * width; e += width)
        for (int64_t j = 0; j < width; ++j)
          dl[e + j] = counted(inside, e + j) ? w[e + j] * (dw[e + j] - mean[j]) : A(0);
      return;
    }
    for (int64_t e = 0; e < n * width; ++e) h[e] = sapa::h_value(o.normalizer, logit[e]);
    A* acc = mean;
    for (int64_t t = 0; t < n; ++t) {
      const A* dwt = dw + t * width;
      for (int64_t j = 0; j < width; ++j) acc[j] = A(o.eps) * dwt[j];
      for (int64_t u = 0; u < n; ++u)
        for (int64_t j = 0; j < width; ++j)
          acc[j] += h[u * width + j] * (dwt[j] - dw[u * width + j]);
      for (int64_t j = 0; j < width; ++j) {
        const int64_t e = t * width + j;
        const A dh = st1[j] != A(0) ? dwt[j] : acc[j] * (st0[j] * st0[j]);
        dl[e] = counted(inside, e) ? sapa::h_vjp(o.normalizer, logit[e], dh) : A(0);
      }
    }
  }

  // Per-thread buffers of the forward and the first backward pass.
  struct Work {
    Band<T, A> kband, vband;
    std::vector<A> qT, gT, logit, w, dw, dl, h, st0, st1, mean, qzero, gzero, poison, coef;
    std::vector<uint8_t> inside;
    std::vector<const A*> rows, kwin, vwin;
    std::vector<T*> outs;
    std::vector<int64_t> tap_of;
    std::unique_ptr<bool[]> centre_inside;
    RowBand<T, A> k, v;
    Work(const Kernel& kn, bool backward)
        : kband(kn.g, kn.g.d, kn.band_w), vband(kn.g, backward ? kn.g.C : 0, kn.band_w),
          qT(zeros<A>(kn.g.d * kn.width)), gT(zeros<A>(backward ? kn.g.C * kn.width : 0)),
          logit(zeros<A>(kn.taps() * kn.width)), w(logit),
          dw(zeros<A>(backward ? kn.taps() * kn.width : 0)), dl(dw), h(dw), st0(zeros<A>(kn.width)),
          st1(st0), mean(st0), qzero(st0), gzero(st0), poison(st0),
          coef(zeros<A>(kn.g.s * kn.taps())),
          inside(size_t(kn.taps() * kn.width)), rows(size_t(kn.taps())), kwin(size_t(kn.g.K)),
          vwin(size_t(kn.g.K)), outs(size_t(kn.g.s)), tap_of(size_t(kn.taps())),
          centre_inside(new bool[kn.taps()]), k(kn.g.W, kn.g.d, backward ? kn.g.K : 0),
          v(kn.g.W, kn.g.C, backward ? 0 : kn.g.K) {}  // point-major rows: dq needs k, out v
  };

  // Forward: out and stats of output rows li*s .. li*s+s-1 of batch element b. The s points
  // of an output row that share a low-res centre are assembled together.
  SAPA_CLONES void forward_item(const T* q, const T* k, const T* v, T* out, A* stat, int64_t b,
                                int64_t li, Work& wk) const {
    const int64_t n = taps();
    window(wk.kband, k, b, li, wk.kwin.data());
    wk.v.load(v + g.v_at(b, 0, 0), std::max<int64_t>(li - g.r, 0), std::min(li + g.r + 1, g.H));
    inside_mask(li, wk.inside.data());
    for (int64_t i = li * g.s; i < (li + 1) * g.s; ++i) {
      transpose_row(q + g.q_at(b, i, 0), g.d, wk.qT.data());
      tap_products(wk.qT.data(), wk.kwin.data(), g.d, wk.logit.data(), wk.qzero.data());
      mask_uncounted(wk.logit.data(), wk.inside.data());
      normalise_row(wk.logit.data(), wk.w.data(), wk.st0.data(), wk.st1.data());
      out_poison(wk.w.data(), wk.inside.data(), wk.poison.data());
      for (int64_t j = 0; j < g.oW(); ++j) {
        stat[g.stat_at(b, i, j)] = wk.st0[j];
        stat[g.stat_at(b, i, j) + 1] = wk.st1[j];
      }
      for (int64_t lj = 0; lj < g.W; ++lj) {
        // v is 0 outside the map: only inside taps enter the sum
        const int64_t count = inside_rows(wk.v, li, lj, wk.centre_inside.get(), wk.rows.data(),
                                          wk.tap_of.data());
        for (int64_t sj = 0; sj < g.s; ++sj) {
          const int64_t j = lj * g.s + sj;
          for (int64_t e = 0; e < count; ++e)
            wk.coef[sj * n + e] = wk.w[wk.tap_of[e] * width + j] +
                                  (wk.tap_of[e] == centre_tap() ? wk.poison[j] : A(0));
          wk.outs[sj] = out + g.out_at(b, i, j);
        }
        weighted_rows_any(g.s, wk.coef.data(), n, wk.rows.data(), count, g.C, wk.outs.data());
      }
    }
  }

  // Backward pass 1: dq of output rows li*s .. li*s+s-1, and the weights and logit gradients
  // of every tap into scratch.
  SAPA_CLONES void backward_point_item(const T* q, const T* k, const T* v, const A* stat,
                                       const T* gout, T* dq, A* w_out, A* dl_out, int64_t b,
                                       int64_t li, Work& wk) const {
    const int64_t n = taps();
    window(wk.kband, k, b, li, wk.kwin.data());
    window(wk.vband, v, b, li, wk.vwin.data());
    wk.k.load(k + g.k_at(b, 0, 0), std::max<int64_t>(li - g.r, 0), std::min(li + g.r + 1, g.H));
    inside_mask(li, wk.inside.data());
    A *logit = wk.logit.data(), *w = wk.w.data(), *dw = wk.dw.data(), *dl = wk.dl.data();
    A *st0 = wk.st0.data(), *st1 = wk.st1.data(), *mean = wk.mean.data();
    const uint8_t* inside = wk.inside.data();
    for (int64_t i = li * g.s; i < (li + 1) * g.s; ++i) {
      transpose_row(q + g.q_at(b, i, 0), g.d, wk.qT.data());
      transpose_row(gout + g.out_at(b, i, 0), g.C, wk.gT.data());
      tap_products(wk.qT.data(), wk.kwin.data(), g.d, logit, wk.qzero.data());
      tap_products(wk.gT.data(), wk.vwin.data(), g.C, dw, wk.gzero.data());  // dw_t = g . v[l+t]
      mask_uncounted(logit, inside);
      for (int64_t j = 0; j < g.oW(); ++j) {
        st0[j] = stat[g.stat_at(b, i, j)];
        st1[j] = stat[g.stat_at(b, i, j) + 1];
      }
      weights_row(logit, st0, st1, w);
      logit_gradients(logit, w, dw, st0, st1, inside, wk.h.data(), mean, dl);
      dq_poison(dl, wk.qzero.data(), inside, wk.poison.data());
      transpose(w, width, n, g.oW(), w_out + g.tap_at(b, i, 0), n);
      transpose(dl, width, n, g.oW(), dl_out + g.tap_at(b, i, 0), n);
      for (int64_t lj = 0; lj < g.W; ++lj) {
        const int64_t count = inside_rows(wk.k, li, lj, wk.centre_inside.get(), wk.rows.data(),
                                          wk.tap_of.data());
        for (int64_t sj = 0; sj < g.s; ++sj) {
          const int64_t j = lj * g.s + sj;
          for (int64_t e = 0; e < count; ++e)
            wk.coef[sj * n + e] = dl[wk.tap_of[e] * width + j] +
                                  (wk.tap_of[e] == centre_tap() ? wk.poison[j] : A(0));
          wk.outs[sj] = dq + g.q_at(b, i, j);
        }
        weighted_rows_any(g.s, wk.coef.data(), n, wk.rows.data(), count, g.d, wk.outs.data());
      }
    }
  }

  // Backward pass 2: dk and dv of low-res row mi, gathered from the output points of every
  // centre l = m - p whose window reaches m: taps in order, then the s x s points in order.
  struct GatherWork {
    std::vector<A> cdl, cw;
    std::vector<const A*> rq, rg;
    RowBand<T, A> q, gout;
    explicit GatherWork(const Kernel& kn)
        : cdl(zeros<A>(kn.taps() * kn.g.s * kn.g.s)), cw(cdl), rq(cdl.size()), rg(cdl.size()),
          q(kn.g.oW(), kn.g.d, kn.g.K * kn.g.s),
          gout(kn.g.oW(), kn.g.C, kn.g.K * kn.g.s) {}
  };

  SAPA_CLONES void backward_gather_item(const T* q, const T* gout, const A* w_in,
                                        const A* dl_in, T* dk, T* dv, int64_t b, int64_t mi,
                                        GatherWork& wk) const {
    const int64_t centre0 = std::max<int64_t>(mi - g.r, 0);
    const int64_t centre1 = std::min(mi + g.r + 1, g.H);
    wk.q.load(q + g.q_at(b, 0, 0), centre0 * g.s, centre1 * g.s);
    wk.gout.load(gout + g.out_at(b, 0, 0), centre0 * g.s, centre1 * g.s);
    for (int64_t mj = 0; mj < g.W; ++mj) {
      int64_t count = 0, p = 0;
      for (int64_t dy = -g.r; dy <= g.r; ++dy) {
        for (int64_t dx = -g.r; dx <= g.r; ++dx, ++p) {
          const int64_t li = mi - dy, lj = mj - dx;
          if (li < 0 || li >= g.H || lj < 0 || lj >= g.W) continue;
          const A* w_tap = w_in + g.tap_at(b, li * g.s, lj * g.s) + p;
          const A* dl_tap = dl_in + g.tap_at(b, li * g.s, lj * g.s) + p;
          for (int64_t si = 0; si < g.s; ++si) {
            for (int64_t sj = 0; sj < g.s; ++sj, ++count) {
              const int64_t at = (si * g.oW() + sj) * g.taps();
              wk.cdl[count] = dl_tap[at];
              wk.cw[count] = w_tap[at];
              wk.rq[count] = wk.q.at(li * g.s + si, lj * g.s + sj);
              wk.rg[count] = wk.gout.at(li * g.s + si, lj * g.s + sj);
            }
          }
        }
      }
      T* dk_out = dk + g.k_at(b, mi, mj);
      T* dv_out = dv + g.v_at(b, mi, mj);
      weighted_rows<1>(wk.cdl.data(), 0, wk.rq.data(), count, g.d, &dk_out);
      weighted_rows<1>(wk.cw.data(), 0, wk.rg.data(), count, g.C, &dv_out);
    }
  }

  // Flops of one work item (a low-res row of output points), for the threading decision.
  double item_flops() const {
    return double(g.s * g.s * g.W) * double(taps()) * double(2 * (g.d + g.C) + 8);
  }

  void forward(const T* q, const T* k, const T* v, T* out, A* stat) const {
    parallel_for(
        g.n * g.H, item_flops(), [&] { return Work(*this, false); },
        [&](Work& wk, int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item)
            forward_item(q, k, v, out, stat, item / g.H, item % g.H, wk);
        });
  }

  void backward(const T* q, const T* k, const T* v, const A* stat, const T* gout, T* dq, T* dk,
                T* dv, A* w, A* dl) const {
    parallel_for(
        g.n * g.H, 2 * item_flops(), [&] { return Work(*this, true); },
        [&](Work& wk, int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item)
            backward_point_item(q, k, v, stat, gout, dq, w, dl, item / g.H, item % g.H, wk);
        });
    parallel_for(
        g.n * g.H, item_flops(), [&] { return GatherWork(*this); },
        [&](GatherWork& wk, int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item)
            backward_gather_item(q, gout, w, dl, dk, dv, item / g.H, item % g.H, wk);
        });
  }
};

// ----------------------------------------------------------------------------------------------
// Validation. Shapes are (leading..., height, width, channels); every leading dim goes to n.

constexpr int64_t kMaxKernelSize = 4095;  // keeps every index product far from overflow
constexpr double kMaxThreadBytes = double(1 << 30);  // per-thread row buffers (see Work)

std::string describe(ffi::AnyBuffer::Dimensions dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + (dims.size() == 1 ? ",)" : ")");
}

std::string type_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "F32";
    case ffi::DataType::F64: return "F64";
    case ffi::DataType::BF16: return "BF16";
    case ffi::DataType::F16: return "F16";
    default: return "type code " + std::to_string(static_cast<int>(t));
  }
}

bool supported(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::F64 || t == ffi::DataType::BF16 ||
         t == ffi::DataType::F16;
}

ffi::DataType acc_type(ffi::DataType t) {
  return t == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
}

// Checks buffers against q: same rank and leading dims, given trailing (h, w, c) and dtype.
// Keeps the first error.
class Validator {
 public:
  explicit Validator(const ffi::AnyBuffer& q) : lead_(q.dimensions()) {}

  void expect(const char* name, const ffi::AnyBuffer& x, int64_t h, int64_t w, int64_t c,
              ffi::DataType dtype) {
    if (!error_.empty()) return;
    std::vector<int64_t> want(lead_.begin(), lead_.end() - 3);
    want.insert(want.end(), {h, w, c});
    if (!(x.dimensions() == ffi::AnyBuffer::Dimensions(want))) {
      error_ = std::string(name) + " must have shape " + describe(want) + ", got " +
               describe(x.dimensions());
    } else if (x.element_type() != dtype) {
      error_ = std::string(name) + " must have element type " + type_name(dtype) + ", got " +
               type_name(x.element_type());
    }
  }
  const std::string& error() const { return error_; }

 private:
  ffi::AnyBuffer::Dimensions lead_;
  std::string error_;
};

// Checks q, k, v and the attributes; on success fills the geometry and returns "".
std::string check_inputs(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                         const ffi::AnyBuffer& v, int64_t kernel_size, int64_t scale,
                         int64_t normalizer, int64_t border, float eps, Geometry* g) {
  std::string error = sapa::check_attributes(kernel_size, scale, normalizer, border, eps);
  if (!error.empty()) return error;
  if (kernel_size > kMaxKernelSize)
    return "kernel_size must be <= " + std::to_string(kMaxKernelSize) +
           " for the CPU kernel, got " + std::to_string(kernel_size);
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() < 4)
    return "q must have rank >= 4 (..., height, width, channels), got shape " + describe(qd);
  if (kd.size() != qd.size() || vd.size() != qd.size())
    return "q, k and v must have the same rank, got shapes " + describe(qd) + ", " +
           describe(kd) + ", " + describe(vd);
  if (!supported(q.element_type()))
    return "q must have element type F32, F64, BF16 or F16, got " + type_name(q.element_type());
  const size_t rank = qd.size();
  const int64_t oh = qd[rank - 3], ow = qd[rank - 2], d = qd[rank - 1], c = vd[rank - 1];
  if (oh % scale != 0 || ow % scale != 0)
    return "q spatial shape " + describe(qd) + " is not divisible by scale " +
           std::to_string(scale);
  Validator check(q);
  check.expect("k", k, oh / scale, ow / scale, d, q.element_type());
  check.expect("v", v, oh / scale, ow / scale, c, q.element_type());
  if (!check.error().empty()) return check.error();
  int64_t n = 1;
  for (size_t i = 0; i + 3 < rank; ++i) n *= qd[i];
  *g = Geometry{n, oh / scale, ow / scale, scale, kernel_size, kernel_size / 2, d, c};
  // A thread holds a few (K*K, output width) rows and K band rows of k and v; refuse sizes
  // whose buffers would be absurd rather than die allocating them.
  const double lanes = double(ow + kLanes + 2 * g->r * scale);
  const double bytes = 8.0 * lanes * (6.0 * double(g->taps()) + double(g->K) * double(d + c));
  if (bytes > kMaxThreadBytes)
    return "kernel_size " + std::to_string(kernel_size) + " with an output width of " +
           std::to_string(ow) + " needs " + std::to_string(int64_t(bytes / (1 << 20))) +
           " MiB of buffers per thread in the CPU kernel (limit " +
           std::to_string(int64_t(kMaxThreadBytes) >> 20) + " MiB)";
  return std::string();
}

template <typename Fn>
ffi::Error dispatch(ffi::DataType dtype, Fn&& fn) {
  try {
    switch (dtype) {
      case ffi::DataType::F32: fn(float(), float()); break;
      case ffi::DataType::F64: fn(double(), double()); break;
      case ffi::DataType::BF16: fn(BF16(), float()); break;
      case ffi::DataType::F16: fn(F16(), float()); break;
      default: return ffi::Error::InvalidArgument("unsupported element type");
    }
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "SAPA CPU kernel: out of memory");
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("SAPA CPU kernel: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error SapaForwardImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> stats,
                           int64_t kernel_size, int64_t scale, int64_t normalizer, int64_t border,
                           float eps) {
  Geometry g{};
  std::string error = check_inputs(q, k, v, kernel_size, scale, normalizer, border, eps, &g);
  if (error.empty()) {
    Validator check(q);
    check.expect("out", *out, g.oH(), g.oW(), g.C, q.element_type());
    check.expect("stats", *stats, g.oH(), g.oW(), 2, acc_type(q.element_type()));
    error = check.error();
  }
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_forward: " + error);
  const Options o{normalizer, border, eps};
  return dispatch(q.element_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    Kernel<T, A>(g, o).forward(
        static_cast<const T*>(q.untyped_data()), static_cast<const T*>(k.untyped_data()),
        static_cast<const T*>(v.untyped_data()), static_cast<T*>(out->untyped_data()),
        static_cast<A*>(stats->untyped_data()));
  });
}

ffi::Error SapaBackwardImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::AnyBuffer stats, ffi::AnyBuffer gout,
                            ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                            ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> w,
                            ffi::Result<ffi::AnyBuffer> dlogit, int64_t kernel_size,
                            int64_t scale, int64_t normalizer, int64_t border, float eps) {
  Geometry g{};
  std::string error = check_inputs(q, k, v, kernel_size, scale, normalizer, border, eps, &g);
  if (error.empty()) {
    const ffi::DataType t = q.element_type(), a = acc_type(t);
    Validator check(q);
    check.expect("stats", stats, g.oH(), g.oW(), 2, a);
    check.expect("g", gout, g.oH(), g.oW(), g.C, t);
    check.expect("dq", *dq, g.oH(), g.oW(), g.d, t);
    check.expect("dk", *dk, g.H, g.W, g.d, t);
    check.expect("dv", *dv, g.H, g.W, g.C, t);
    check.expect("w_scratch", *w, g.oH(), g.oW(), g.taps(), a);
    check.expect("dlogit_scratch", *dlogit, g.oH(), g.oW(), g.taps(), a);
    error = check.error();
  }
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_backward: " + error);
  const Options o{normalizer, border, eps};
  return dispatch(q.element_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    Kernel<T, A>(g, o).backward(
        static_cast<const T*>(q.untyped_data()), static_cast<const T*>(k.untyped_data()),
        static_cast<const T*>(v.untyped_data()), static_cast<const A*>(stats.untyped_data()),
        static_cast<const T*>(gout.untyped_data()), static_cast<T*>(dq->untyped_data()),
        static_cast<T*>(dk->untyped_data()), static_cast<T*>(dv->untyped_data()),
        static_cast<A*>(w->untyped_data()), static_cast<A*>(dlogit->untyped_data()));
  });
}

}  // namespace

// The signature is shared with the CUDA handlers (sapa_handlers.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(SapaForwardCpu, SapaForwardImpl,
                              sapa::bind_forward(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SapaBackwardCpu, SapaBackwardImpl,
                              sapa::bind_backward(ffi::Ffi::Bind()));

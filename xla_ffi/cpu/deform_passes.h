// SAPA-D fused passes for XLA:CPU (docs/design.md §6), on the CPU layer's element types and
// conversions (types.h), its weighted row sums (simd.h) and its thread-pool parallel_for
// (parallel.h).
//
// Forward, one work item per (batch element, output row): per output point and group the P
// sample positions and bilinear cells, the logits q . sample(k), their softmax and
// out = sum_p attn_p sample_p(v), all in one pass over the four corners of every sample; nothing
// P-expanded is stored.
//
// Backward, one work item per (batch element, group, band of output rows): per output point the
// forward is recomputed, then dq and the offset gradients (owned by the point) and the
// contributions to dk and dv, added into the item's own accumulation buffer in the canonical
// order (output point row-major, point p, corner). The bands are a function of the shape only,
// and a second pass sums a pixel's band buffers in band order, so the result is bitwise the same
// for any number of threads. No atomics.
#ifndef SAPA_JAX_XLA_FFI_CPU_DEFORM_PASSES_H_
#define SAPA_JAX_XLA_FFI_CPU_DEFORM_PASSES_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "cpu/types.h"
#include "deform_common.h"
#include "xla/ffi/api/ffi.h"

namespace sapa::cpu {

using sapa::DeformCell;
using sapa::DeformGeometry;

// ---------------------------------------------------------------------------------- channel loops
// Fixed blocks of independent partial sums: vectorisable without -ffast-math, and the order of
// every sum is a function of the length only.

template <typename A>
inline A dot(const A* __restrict a, const A* __restrict b, int64_t n) {
  constexpr int kPartials = 8;
  A part[kPartials] = {};
  int64_t i = 0;
  for (; i + kPartials <= n; i += kPartials)
    for (int u = 0; u < kPartials; ++u) part[u] += a[i + u] * b[i + u];
  for (int u = 0; i < n; ++i, ++u) part[u] += a[i] * b[i];
  A sum = A(0);
  for (int u = 0; u < kPartials; ++u) sum += part[u];
  return sum;
}

// sum_i a[i] * 0: 0, or NaN where a holds a NaN or an infinity (what jnp's product of a with a
// zero sample gives).
template <typename A> inline A times_zero(const A* a, int64_t n) {
  A sum = A(0);
  for (int64_t i = 0; i < n; ++i) sum += a[i] * A(0);
  return sum;
}

template <typename A>
inline void axpy(A alpha, const A* __restrict x, A* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T, typename A> inline void convert_in(const T* src, int64_t n, A* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_acc(src[i]);
}
template <typename T, typename A> inline void convert_out(const A* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = From<T>::of(src[i]);
}

// A tensor in the accumulation type: the caller's buffer when T == A, else a converted copy
// (k and v are low-res: converting them once costs less than converting every corner read).
template <typename T, typename A> class AccView {
 public:
  AccView(ffi::ThreadPool& pool, const T* src, int64_t rows, int64_t row_size) {
    if constexpr (std::is_same_v<T, A>) {
      data_ = src;
    } else {
      copy_.resize(size_t(rows * row_size));
      A* dst = copy_.data();
      parallel_for(pool, rows, double(row_size), [] { return 0; },
                   [&](int&, int64_t begin, int64_t end) {
                     convert_in(src + begin * row_size, (end - begin) * row_size,
                                dst + begin * row_size);
                   });
      data_ = dst;
    }
  }
  const A* data() const { return data_; }

 private:
  const A* data_ = nullptr;
  std::vector<A> copy_;
};

// One row of a high-res tensor in A (converted into `buffer` unless T == A).
template <typename T, typename A>
inline const A* acc_row(const T* src, int64_t n, std::vector<A>& buffer) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    buffer.resize(size_t(n));
    convert_in(src, n, buffer.data());
    return buffer.data();
  }
}

// ---------------------------------------------------------------------------------- the kernel

template <typename T, typename A> struct DeformKernel {
  const DeformGeometry g;

  // Per-thread buffers of one group at one output point.
  struct Point {
    std::vector<DeformCell<A>> cells;  // P
    std::vector<A> logit, attn;        // P
    std::vector<A> sample_k;           // P * E
    std::vector<A> acc;                // max(E, Cg)
    std::vector<A> g_dot_v;            // P * 4: gout . v at each corner (backward)
    std::vector<A> d_attn;             // P
    std::vector<A> d_sample;           // E
    std::vector<A> q_row, g_row, off_row;  // conversions of one output row (T != A)
    std::vector<A> coef;                   // 4P: weights of the corner rows read
    std::vector<const A*> rows;            // 4P: the corner rows read
    explicit Point(const DeformGeometry& g)
        : cells(size_t(g.P)), logit(size_t(g.P)), attn(size_t(g.P)),
          sample_k(size_t(g.P * g.E)), acc(size_t(std::max(g.E, g.Cg))),
          g_dot_v(size_t(g.P * 4)), d_attn(size_t(g.P)), d_sample(size_t(g.E)),
          coef(size_t(4 * g.P)), rows(size_t(4 * g.P)) {}
  };

  // Cells, sampled keys and logits of group `grp` at output point (i, j); q_g is its E queries,
  // off its G*P*2 offsets.
  void logits(const A* k, int64_t b, int64_t i, int64_t j, int64_t grp, const A* q_g,
              const A* off, Point& pt) const {
    const int64_t E = g.E, ld = g.qk_dim();
    const A q_zero = times_zero(q_g, E);  // logit of a sample that reads nothing: q . 0
    for (int64_t p = 0; p < g.P; ++p) {
      A py, px;
      const A* o = off + (grp * g.P + p) * 2;
      sapa::deform_position(g, i, j, o[0], o[1], &py, &px);
      DeformCell<A>& cell = pt.cells[size_t(p)];
      cell = sapa::deform_cell(py, px, g.H, g.W);
      A* s = pt.sample_k.data() + p * E;
      if (cell.kind == sapa::kSampleOutside) {
        std::fill(s, s + E, A(0));
        pt.logit[size_t(p)] = q_zero;
        continue;
      }
      if (cell.kind == sapa::kSampleNan) {
        std::fill(s, s + E, std::numeric_limits<A>::quiet_NaN());
        pt.logit[size_t(p)] = std::numeric_limits<A>::quiet_NaN();
        continue;
      }
      int64_t count = 0;
      for (int c = 0; c < 4; ++c)
        if (cell.corner_inside(c, g.H, g.W)) {
          pt.coef[size_t(count)] = cell.w[c];
          pt.rows[size_t(count++)] =
              k + g.pixel(b, cell.corner_y(c), cell.corner_x(c)) * ld + grp * E;
        }
      weighted_rows<1, A, A>(pt.coef.data(), 0, pt.rows.data(), count, E, &s);
      pt.logit[size_t(p)] = dot(q_g, s, E);
    }
  }

  // attn = softmax(logit) as jnp: exp(logit - max) / sum; NaN-propagating max.
  void softmax(Point& pt) const {
    A top = pt.logit[0];
    for (int64_t p = 1; p < g.P; ++p) top = sapa::nan_max(top, pt.logit[size_t(p)]);
    A sum = A(0);
    for (int64_t p = 0; p < g.P; ++p) {
      pt.attn[size_t(p)] = std::exp(pt.logit[size_t(p)] - top);
      sum += pt.attn[size_t(p)];
    }
    for (int64_t p = 0; p < g.P; ++p) pt.attn[size_t(p)] = pt.attn[size_t(p)] / sum;
  }

  // ------------------------------------------------------------------------------ forward
  void forward(ffi::ThreadPool& pool, const T* q, const T* k, const T* v, const T* offsets,
               T* out) const {
    const int64_t ld_k = g.qk_dim(), C = g.C(), Cg = g.Cg;
    const AccView<T, A> kv(pool, k, g.n * g.H * g.W, ld_k), vv(pool, v, g.n * g.H * g.W, C);
    const A* ka = kv.data();
    const A* va = vv.data();
    const double flops = double(g.oW() * g.G * g.P) * 8.0 * double(g.E + g.Cg);
    parallel_for(pool, g.n * g.oH(), flops, [&] { return Point(g); },
                 [&](Point& pt, int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / g.oH(), i = item % g.oH();
        const A* q_row = acc_row<T, A>(q + g.q_at(b, i, 0), g.oW() * ld_k, pt.q_row);
        const A* off_row = acc_row<T, A>(offsets + g.off_at(b, i, 0), g.oW() * g.off_dim(),
                                         pt.off_row);
        for (int64_t j = 0; j < g.oW(); ++j) {
          for (int64_t grp = 0; grp < g.G; ++grp) {
            logits(ka, b, i, j, grp, q_row + j * ld_k + grp * g.E, off_row + j * g.off_dim(),
                   pt);
            softmax(pt);
            A* acc = pt.acc.data();
            T* o = out + g.out_at(b, i, j) + grp * Cg;
            if (pt.attn[0] != pt.attn[0]) {  // a NaN logit: the whole group is NaN, as in jnp
              std::fill(acc, acc + Cg, std::numeric_limits<A>::quiet_NaN());
              convert_out(acc, Cg, o);
              continue;
            }
            // out = sum over the corner rows read of attn_p w_c v_c, in (p, c) order
            int64_t count = 0;
            for (int64_t p = 0; p < g.P; ++p) {
              const DeformCell<A>& cell = pt.cells[size_t(p)];
              if (cell.kind != sapa::kSampleRead) continue;  // a zero sample adds attn * 0 = 0
              for (int c = 0; c < 4; ++c)
                if (cell.corner_inside(c, g.H, g.W)) {
                  pt.coef[size_t(count)] = pt.attn[size_t(p)] * cell.w[c];
                  pt.rows[size_t(count++)] =
                      va + g.pixel(b, cell.corner_y(c), cell.corner_x(c)) * C + grp * Cg;
                }
            }
            weighted_rows<1, T, A>(pt.coef.data(), 0, pt.rows.data(), count, Cg, &o);
          }
        }
      }
    });
  }

  // ------------------------------------------------------------------------------ backward
  // Rows of output per band: the bands give the pass enough items to spread over the threads
  // when n * G is small; their number is a function of the shape only (see the file comment).
  int64_t bands(int64_t max_bytes) const {
    constexpr int64_t kTargetItems = 32;
    int64_t count = std::max<int64_t>(1, (kTargetItems + g.n * g.G - 1) / (g.n * g.G));
    count = std::min(count, g.oH());
    const double per_band = double(g.n * g.H * g.W) * double(g.qk_dim() + g.C()) * sizeof(A);
    while (count > 1 && per_band * double(count) > double(max_bytes)) --count;
    return count;
  }

  void backward(ffi::ThreadPool& pool, const T* q, const T* k, const T* v, const T* offsets,
                const T* gout, T* dq, T* dk, T* dv, T* doffsets, int64_t max_bytes) const {
    const int64_t ld_k = g.qk_dim(), C = g.C(), E = g.E, Cg = g.Cg;
    const int64_t pixels = g.n * g.H * g.W;
    const AccView<T, A> kv(pool, k, pixels, ld_k), vv(pool, v, pixels, C);
    const A* ka = kv.data();
    const A* va = vv.data();
    const int64_t nb = bands(max_bytes), rows_per_band = (g.oH() + nb - 1) / nb;
    // Band buffers of dk and dv in A; a single band of T == A accumulates in dk, dv directly.
    const bool direct = nb == 1 && std::is_same_v<T, A>;
    std::vector<A> band_k, band_v;
    A* acc_k;
    A* acc_v;
    if (direct) {
      acc_k = reinterpret_cast<A*>(dk);
      acc_v = reinterpret_cast<A*>(dv);
    } else {
      band_k.resize(size_t(nb * pixels * ld_k));
      band_v.resize(size_t(nb * pixels * C));
      acc_k = band_k.data();
      acc_v = band_v.data();
    }
    const double flops = double(rows_per_band * g.oW() * g.P) * 16.0 * double(E + Cg);
    parallel_for(pool, g.n * g.G * nb, flops, [&] { return Point(g); },
                 [&](Point& pt, int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t band = item % nb, grp = (item / nb) % g.G, b = item / (nb * g.G);
        A* bk = acc_k + band * pixels * ld_k;
        A* bv = acc_v + band * pixels * C;
        for (int64_t pix = b * g.H * g.W; pix < (b + 1) * g.H * g.W; ++pix) {
          std::fill(bk + pix * ld_k + grp * E, bk + pix * ld_k + (grp + 1) * E, A(0));
          std::fill(bv + pix * C + grp * Cg, bv + pix * C + (grp + 1) * Cg, A(0));
        }
        const int64_t i_end = std::min(g.oH(), (band + 1) * rows_per_band);
        for (int64_t i = band * rows_per_band; i < i_end; ++i)
          for (int64_t j = 0; j < g.oW(); ++j)
            backward_point(ka, va, q, offsets, gout, dq, doffsets, b, i, j, grp, bk, bv, pt);
      }
    });
    if (direct) return;
    // dk, dv = sum over the bands in band order (every pixel by one worker).
    parallel_for(pool, g.n * g.H, double(g.W * (ld_k + C) * nb), [] { return 0; },
                 [&](int&, int64_t begin, int64_t end) {
      std::vector<A> sum(size_t(std::max(ld_k, C)));
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t x = 0; x < g.W; ++x) {
          const int64_t pix = row * g.W + x;
          for (int pass = 0; pass < 2; ++pass) {
            const int64_t width = pass ? C : ld_k;
            const A* src = pass ? acc_v : acc_k;
            std::fill(sum.begin(), sum.begin() + width, A(0));
            for (int64_t band = 0; band < nb; ++band)
              axpy(A(1), src + (band * pixels + pix) * width, sum.data(), width);
            convert_out(sum.data(), width, (pass ? dv : dk) + pix * width);
          }
        }
      }
    });
  }

  void backward_point(const A* k, const A* v, const T* q, const T* offsets, const T* gout, T* dq,
                      T* doffsets, int64_t b, int64_t i, int64_t j, int64_t grp, A* bk, A* bv,
                      Point& pt) const {
    const int64_t ld_k = g.qk_dim(), C = g.C(), E = g.E, Cg = g.Cg, P = g.P;
    const A* q_g = acc_row<T, A>(q + g.q_at(b, i, j) + grp * E, E, pt.q_row);
    const A* g_g = acc_row<T, A>(gout + g.out_at(b, i, j) + grp * Cg, Cg, pt.g_row);
    const A* off = acc_row<T, A>(offsets + g.off_at(b, i, j), g.off_dim(), pt.off_row);
    logits(k, b, i, j, grp, q_g, off, pt);
    softmax(pt);
    const A nan = std::numeric_limits<A>::quiet_NaN();
    const A g_zero = times_zero(g_g, Cg);  // g . 0: the attention gradient of a zero sample
    // d attn_p = g . sample_p(v) = sum_c w_c (g . v_c)
    A attn_dot = A(0);
    for (int64_t p = 0; p < P; ++p) {
      const DeformCell<A>& cell = pt.cells[size_t(p)];
      A* gv = pt.g_dot_v.data() + p * 4;
      A d = g_zero;
      if (cell.kind == sapa::kSampleNan) {
        d = nan;
      } else if (cell.kind == sapa::kSampleRead) {
        d = A(0);
        for (int c = 0; c < 4; ++c) {
          gv[c] = cell.corner_inside(c, g.H, g.W)
                      ? dot(g_g, v + g.pixel(b, cell.corner_y(c), cell.corner_x(c)) * C +
                                     grp * Cg, Cg)
                      : g_zero;
          d += cell.w[c] * gv[c];
        }
      }
      pt.d_attn[size_t(p)] = d;
      attn_dot += pt.attn[size_t(p)] * d;
    }
    A* dq_acc = pt.acc.data();
    std::fill(dq_acc, dq_acc + E, A(0));
    T* doff = doffsets + g.off_at(b, i, j) + grp * P * 2;
    for (int64_t p = 0; p < P; ++p) {
      const DeformCell<A>& cell = pt.cells[size_t(p)];
      const A attn = pt.attn[size_t(p)];
      const A dlogit = attn * (pt.d_attn[size_t(p)] - attn_dot);
      const A* s = pt.sample_k.data() + p * E;
      axpy(dlogit, s, dq_acc, E);  // zero or NaN samples included, as jnp's dlogit * sample
      if (cell.kind != sapa::kSampleRead) {
        const A d = cell.kind == sapa::kSampleNan ? nan : A(0);
        doff[p * 2] = From<T>::of(d);
        doff[p * 2 + 1] = From<T>::of(d);
        continue;
      }
      A* ds = pt.d_sample.data();
      for (int64_t e = 0; e < E; ++e) ds[e] = dlogit * q_g[e];
      const A* gv = pt.g_dot_v.data() + p * 4;
      A dly = A(0), dlx = A(0);
      for (int c = 0; c < 4; ++c) {
        A dw;
        if (cell.corner_inside(c, g.H, g.W)) {
          const int64_t pix = g.pixel(b, cell.corner_y(c), cell.corner_x(c));
          const A* kc = k + pix * ld_k + grp * E;
          dw = dot(ds, kc, E) + attn * gv[c];
          axpy(cell.w[c], ds, bk + pix * ld_k + grp * E, E);
          axpy(cell.w[c] * attn, g_g, bv + pix * C + grp * Cg, Cg);
        } else {
          dw = times_zero(ds, E) + attn * gv[c];  // the zero corner: 0, or NaN as jnp's
        }
        dly += dw * cell.dw_dly(c);
        dlx += dw * cell.dw_dlx(c);
      }
      doff[p * 2] = From<T>::of(dlx);
      doff[p * 2 + 1] = From<T>::of(dly);
    }
    convert_out(dq_acc, E, dq + g.q_at(b, i, j) + grp * E);
  }
};

}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_DEFORM_PASSES_H_

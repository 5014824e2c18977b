// SAPA's passes on XLA:CPU (docs/design.md §1 and §3; layout and shared index, border and
// normaliser logic in sapa_common.h).
//
// Forward: for each output row, the K*K logits q . k of every point, their normalisation and
// out = sum_p w_p v[l+p], in one pass; k and v are never expanded into K*K patches.
// Backward in two passes, without atomics: backward_points per output row recomputes the logits
// and weights from the saved stats, dw_p = g . v[l+p], the logit gradients and dq, and writes the
// per-tap weights and logit gradients to the scratch outputs; backward_gather per block of
// low-res points gathers dk and dv from the (s*K)^2 output points whose windows cover each. Every sum runs in a fixed
// order and work items are independent, so results are bitwise reproducible and do not depend
// on the number of threads.
#ifndef SAPA_JAX_XLA_FFI_CPU_SAPA_PASSES_H_
#define SAPA_JAX_XLA_FFI_CPU_SAPA_PASSES_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/normalise.h"
#include "cpu/parallel.h"
#include "cpu/rows.h"
#include "cpu/simd.h"
#include "cpu/types.h"
#include "sapa_common.h"
#include "xla/ffi/api/ffi.h"

namespace sapa::cpu {
inline namespace SAPA_CPU_ISA {

using sapa::Geometry;

// ----------------------------------------------------------------------------------------------
// The kernels. One work item is (batch element, low-res row): s output rows in the forward and
// the first backward pass, one low-res row of dk/dv in the second.
//
// Tap products (logits q.k, and g.v in the backward) are computed per output row with the
// output columns on the vector lanes: the row of q (or g) is transposed to channel-major and
// multiplied with the K window rows of k (or v) held in a Band.

struct Options {
  int64_t normalizer, border;
  double eps;
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

  // prod[si][t * width + j] = rowT[si][:, j] . (tap t of column j in the band) for `rows` output
  // rows si of one centre row; zero[si][j] (see zero_products) on window rows outside the map
  // (band row nullptr), as the band's zero padding gives on the others. The rows go in pairs
  // and the taps in groups of kTapGroup, sharing the loads of the band and of rowT
  // (column_dots_rows); each product sums over the channels in order, whatever the grouping.
  SAPA_INLINE void tap_products_rows(int64_t rows, const A* const* rowT, const A* const* band,
                                     int64_t ch, A* const* prod, A* const* zero) const {
    for (int64_t si = 0; si < rows; ++si) zero_products(rowT[si], ch, zero[si]);
    for (int64_t r0 = 0; r0 < rows; r0 += 2) {
      const int pair = rows - r0 >= 2 ? 2 : 1;
      for (int64_t dy = 0; dy < g.K; ++dy)
        for (int64_t dx = 0; dx < g.K; dx += kTapGroup) {
          const int group = int(std::min<int64_t>(kTapGroup, g.K - dx));
          const A* rhs[kTapGroup];
          A* out[2 * kTapGroup];
          for (int si = 0; si < pair; ++si)
            for (int m = 0; m < group; ++m) {
              out[si * group + m] = prod[r0 + si] + (dy * g.K + dx + m) * width;
              if (!band[dy]) std::copy(zero[r0 + si], zero[r0 + si] + width, out[si * group + m]);
            }
          if (!band[dy]) continue;
          for (int m = 0; m < group; ++m) rhs[m] = band[dy] + (dx + m) * g.s;
          if (pair == 2)
            column_dots_rows_any<2>(group, rowT + r0, width, rhs, band_w, ch, width, out);
          else
            column_dots_rows_any<1>(group, rowT + r0, width, rhs, band_w, ch, width, out);
        }
    }
  }

  // tap_products_rows of one row.
  SAPA_INLINE void tap_products(const A* rowT, const A* const* band, int64_t ch, A* prod,
                                A* zero) const {
    tap_products_rows(1, &rowT, band, ch, &prod, &zero);
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
      for (int64_t dx = -g.r; dx <= g.r; ++dx, ++t) {
        if (!g.inside(li, 0, dy, 0)) continue;  // the window row is outside the map
        // centres lj with 0 <= lj + dx < W: one run of lanes per tap (not one fill per centre,
        // which cost a memset call per (tap, centre) pair)
        const int64_t lj0 = std::max<int64_t>(0, -dx), lj1 = std::min(g.W, g.W - dx);
        if (lj1 > lj0) std::fill(inside + t * width + lj0 * g.s, inside + t * width + lj1 * g.s,
                                 uint8_t(1));
      }
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

  // fn(j) for the lanes j < oW of output rows of centre row li that can have an out-of-map
  // tap: all of them near the top and bottom, else the r s lanes at either end.
  template <typename Fn> SAPA_INLINE void border_lanes(int64_t li, const Fn& fn) const {
    const int64_t edge = std::min(g.r * g.s, g.oW());
    if (li < g.r || li + g.r >= g.H) {
      for (int64_t j = 0; j < g.oW(); ++j) fn(j);
      return;
    }
    for (int64_t j = 0; j < edge; ++j) fn(j);
    for (int64_t j = std::max(edge, g.oW() - g.r * g.s); j < g.oW(); ++j) fn(j);
  }

  // poison[j]: the sum of out_poison_term (sapa_common.h) over the out-of-map taps of lane j,
  // from the weights w (0 for lanes without such taps).
  SAPA_INLINE void out_poison(int64_t li, const A* w, const uint8_t* inside, A* poison) const {
    std::fill(poison, poison + width, A(0));
    border_lanes(li, [&](int64_t j) {
      for (int64_t e = 0; e < taps() * width; e += width)
        if (!inside[e + j]) poison[j] += sapa::out_poison_term(o.border, w[e + j]);
    });
  }

  // The same for dq: dq_poison_term from the logit gradients dl and qzero (zero_products of q:
  // the raw logit of every out-of-map tap).
  SAPA_INLINE void dq_poison(int64_t li, const A* dl, const A* qzero, const uint8_t* inside,
                             A* poison) const {
    std::fill(poison, poison + width, A(0));
    border_lanes(li, [&](int64_t j) {
      for (int64_t e = 0; e < taps() * width; e += width)
        if (!inside[e + j])
          poison[j] += sapa::dq_poison_term(o.normalizer, o.border, qzero[j], dl[e + j]);
    });
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

  // The normaliser's Jacobian, row form: dlogit[t * width + j] from the weights w (uncounted
  // taps 0), dw_t = g . v[l + t] and the stats, for every counted tap (out-of-map ones too:
  // their gradient only feeds dq's poison, see dq_poison); uncounted taps get 0. The one formula
  // of both back ends, sapa::point_logit_gradients (sapa_common.h), with its pieces applied
  // lane by lane: per lane j the same operations in the same order, so the same bits as the
  // per-point form. `spread` holds 4 rows of width: W, the top weight, the pivot (then c), R.
  SAPA_INLINE void logit_gradients(const A* logit, const A* w, const A* dw, const A* st0,
                                   const A* st1, const uint8_t* inside, A* spread,
                                   A* dl) const {
    const int64_t n = taps();
    A *weight = spread, *top = spread + width, *centre = spread + 2 * width;
    A* residual = spread + 3 * width;
    std::fill(weight, weight + 4 * width, A(0));
    if (o.normalizer != sapa::kNone) {
      std::fill(top, top + width, -std::numeric_limits<A>::infinity());
      for (int64_t e = 0; e < n * width; e += width)  // pass 1: sapa::SpreadSums::add
        for (int64_t j = 0; j < width; ++j) {
          weight[j] += w[e + j];
          const bool higher = w[e + j] > top[j];
          top[j] = higher ? w[e + j] : top[j];
          centre[j] = higher ? dw[e + j] : centre[j];
        }
      for (int64_t j = 0; j < width; ++j) centre[j] = sapa::spread_centre(centre[j]);
      for (int64_t e = 0; e < n * width; e += width)  // pass 2
        for (int64_t j = 0; j < width; ++j)
          residual[j] += sapa::spread_residual(w[e + j], dw[e + j], centre[j]);
    }
    const A eps = A(o.eps);
    // pass 3, with the border test and (softmax, none) the normaliser compile-time constants so
    // that the lane loop vectorises; the formula per lane is the same
    auto pass3 = [&](auto all_counted, auto norm) {
      const int64_t normalizer = norm.value >= 0 ? norm.value : o.normalizer;
      for (int64_t e = 0; e < n * width; e += width)
        for (int64_t j = 0; j < width; ++j) {
          const A grad = sapa::tap_logit_gradient(
              normalizer, eps, st0[j], st1[j], logit[e + j], w[e + j], dw[e + j],
              sapa::spread(weight[j], centre[j], residual[j], dw[e + j]));
          dl[e + j] = all_counted.value || inside[e + j] ? grad : A(0);
        }
    };
    auto by_normalizer = [&](auto all_counted) {
      if (o.normalizer == sapa::kSoftmax)
        pass3(all_counted, std::integral_constant<int64_t, sapa::kSoftmax>());
      else if (o.normalizer == sapa::kNone)
        pass3(all_counted, std::integral_constant<int64_t, sapa::kNone>());
      else
        pass3(all_counted, std::integral_constant<int64_t, -1>());
    };
    if (o.border == sapa::kZeros)
      by_normalizer(std::true_type());
    else
      by_normalizer(std::false_type());
  }

  // Per-thread buffers of the forward and the first backward pass. qT, gT, logit, dw, qzero,
  // gzero (and w, dl in the backward) hold the s output rows of a work item (row si at si times
  // the row's size).
  struct Work {
    Band<T, A> kband, vband;
    std::vector<A> qT, gT, logit, w, dw, dl, spread, st0, st1, qzero, gzero, poison, coef;
    // w and dl point-major: the taps of lane j at [j * taps], s rows, row si at si * oW * taps
    // (coef and outs: the s * s points of one centre)
    std::vector<A> wT, dlT;
    std::vector<uint8_t> inside;
    std::vector<const A*> rows, rows0, coefs, kwin, vwin;  // rows0, coefs: the forward's
    std::vector<A*> qrows, grows;  // row si of qT and gT
    std::vector<A*> logits, dws, qzeros, gzeros;
    std::vector<T*> outs;
    std::vector<int64_t> tap_of;
    std::unique_ptr<bool[]> centre_inside;
    RowBand<T, A> k, v;
    Work(const Kernel& kn, bool backward)
        : kband(kn.g, kn.g.d, kn.band_w), vband(kn.g, backward ? kn.g.C : 0, kn.band_w),
          qT(zeros<A>(kn.g.s * kn.g.d * kn.width)),
          gT(zeros<A>(backward ? kn.g.s * kn.g.C * kn.width : 0)),
          logit(zeros<A>(kn.g.s * kn.taps() * kn.width)),
          w(zeros<A>((backward ? kn.g.s : 1) * kn.taps() * kn.width)),
          dw(zeros<A>(backward ? kn.g.s * kn.taps() * kn.width : 0)),
          dl(zeros<A>(backward ? kn.g.s * kn.taps() * kn.width : 0)),
          spread(zeros<A>(backward ? 4 * kn.width : 0)), st0(zeros<A>(kn.width)), st1(st0),
          qzero(zeros<A>(kn.g.s * kn.width)), gzero(zeros<A>(backward ? kn.g.s * kn.width : 0)),
          poison(st0), coef(zeros<A>(kn.g.s * kn.g.s * kn.taps())),
          wT(zeros<A>(kn.g.s * kn.taps() * kn.width)),
          dlT(zeros<A>(backward ? kn.g.s * kn.taps() * kn.width : 0)),
          inside(size_t(kn.taps() * kn.width)), rows(size_t(kn.taps())), rows0(rows),
          coefs(size_t(kn.g.s * kn.g.s)),
          kwin(size_t(kn.g.K)), vwin(size_t(kn.g.K)), qrows(size_t(kn.g.s)), grows(qrows),
          logits(size_t(kn.g.s)), dws(logits), qzeros(logits), gzeros(logits),
          outs(size_t(kn.g.s * kn.g.s)), tap_of(size_t(kn.taps())),
          centre_inside(new bool[kn.taps()]),
          k(kn.g.W, kn.g.d, backward ? kn.g.K : 0),
          v(kn.g.W, kn.g.C, backward ? 0 : kn.g.K) {  // point-major rows: dq needs k, out v
      const int64_t row = kn.taps() * kn.width;
      for (int64_t si = 0; si < kn.g.s; ++si) {
        qrows[si] = qT.data() + si * kn.g.d * kn.width;
        logits[si] = logit.data() + si * row;
        qzeros[si] = qzero.data() + si * kn.width;
        if (backward) {
          grows[si] = gT.data() + si * kn.g.C * kn.width;
          dws[si] = dw.data() + si * row;
          gzeros[si] = gzero.data() + si * kn.width;
        }
      }
    }
  };

  // coefT (point-major, see Work::wT) with poison[j] added to the centre tap of every lane.
  SAPA_INLINE void add_poison(A* coefT, const A* poison) const {
    for (int64_t j = 0; j < g.oW(); ++j) coefT[j * taps() + centre_tap()] += poison[j];
  }

  // out[p] = sum over the inside taps of one centre of coef[p * taps + tap] * row(tap) for its
  // `points` points p (coef: their point-major coefficients of every tap; rows, tap_of and
  // count as centre_rows gives them): straight from coef where every tap is inside, else
  // gathered for the inside ones.
  SAPA_INLINE void assemble_centre(int64_t points, int64_t count, const A* coef,
                                   int64_t channels, Work& wk) const {
    const int64_t n = taps();
    if (count != n) {
      for (int64_t p = 0; p < points; ++p)
        for (int64_t e = 0; e < count; ++e) wk.coef[p * n + e] = coef[p * n + wk.tap_of[e]];
      coef = wk.coef.data();
    }
    weighted_rows_any(points, coef, n, wk.rows.data(), count, channels, wk.outs.data());
  }

  // The rows in `band` of the inside taps of centre (li, lj), in tap order, and their tap
  // indices; returns their number (inside_rows without the per-tap flags).
  SAPA_INLINE int64_t centre_rows(const RowBand<T, A>& band, int64_t li, int64_t lj,
                                  const A** rows, int64_t* tap_of) const {
    const int64_t dx0 = std::max(-g.r, -lj), dx1 = std::min(g.r, g.W - 1 - lj);
    int64_t count = 0;
    for (int64_t dy = -g.r; dy <= g.r; ++dy) {
      if (li + dy < 0 || li + dy >= g.H) continue;
      const int64_t t0 = (dy + g.r) * g.K + g.r;
      for (int64_t dx = dx0; dx <= dx1; ++dx) {
        rows[count] = band.at(li + dy, lj + dx);
        tap_of[count++] = t0 + dx;
      }
    }
    return count;
  }

  // Forward: out and stats of output rows li*s .. li*s+s-1 of batch element b. The s * s points
  // that share a low-res centre (and so the K*K rows of v) are assembled together: each loaded
  // row of v feeds s * s sums (register-blocked in weighted_rows, 4 points per block).
  SAPA_CLONES void forward_item(const T* q, const T* k, const T* v, T* out, A* stat, int64_t b,
                                int64_t li, Work& wk) const {
    const int64_t n = taps(), ss = g.s * g.s, row = g.oW() * n;
    window(wk.kband, k, b, li, wk.kwin.data());
    wk.v.load(v + g.v_at(b, 0, 0), std::max<int64_t>(li - g.r, 0), std::min(li + g.r + 1, g.H));
    inside_mask(li, wk.inside.data());
    for (int64_t si = 0; si < g.s; ++si)
      transpose_row(q + g.q_at(b, li * g.s + si, 0), g.d, wk.qrows[si]);
    tap_products_rows(g.s, wk.qrows.data(), wk.kwin.data(), g.d, wk.logits.data(),
                      wk.qzeros.data());
    for (int64_t si = 0; si < g.s; ++si) {  // weights of the s rows, point-major in wT
      const int64_t i = li * g.s + si;
      A* logit = wk.logits[si];
      mask_uncounted(logit, wk.inside.data());
      normalise_rows(o.normalizer, A(o.eps), taps(), width, logit, wk.w.data(), wk.st0.data(),
                     wk.st1.data());
      out_poison(li, wk.w.data(), wk.inside.data(), wk.poison.data());
      for (int64_t j = 0; j < g.oW(); ++j) {
        stat[g.stat_at(b, i, j)] = wk.st0[j];
        stat[g.stat_at(b, i, j) + 1] = wk.st1[j];
      }
      transpose(wk.w.data(), width, n, g.oW(), wk.wT.data() + si * row, n);
      add_poison(wk.wT.data() + si * row, wk.poison.data());
    }
    // v is 0 outside the map: only inside taps enter the sum. Centres with every tap inside
    // (the interior) take their rows by offset from those of centre column r and their weights
    // in place from wT; the others gather the weights of their inside taps into coef.
    const bool rows_inside = li >= g.r && li + g.r < g.H;
    if (rows_inside && g.r < g.W - g.r)
      inside_rows(wk.v, li, g.r, wk.centre_inside.get(), wk.rows0.data(), wk.tap_of.data());
    for (int64_t lj = 0; lj < g.W; ++lj) {
      int64_t count = n;
      if (rows_inside && lj >= g.r && lj + g.r < g.W) {
        const int64_t shift = (lj - g.r) * g.C;
        for (int64_t t = 0; t < n; ++t) wk.rows[t] = wk.rows0[t] + shift;
      } else {
        count = inside_rows(wk.v, li, lj, wk.centre_inside.get(), wk.rows.data(),
                            wk.tap_of.data());
      }
      for (int64_t si = 0; si < g.s; ++si)
        for (int64_t sj = 0; sj < g.s; ++sj) {
          const int64_t p = si * g.s + sj;
          const A* coef = wk.wT.data() + si * row + (lj * g.s + sj) * n;
          if (count == n) {
            wk.coefs[p] = coef;
          } else {
            A* dst = wk.coef.data() + p * n;
            for (int64_t e = 0; e < count; ++e) dst[e] = coef[wk.tap_of[e]];
            wk.coefs[p] = dst;
          }
          wk.outs[p] = out + g.out_at(b, li * g.s + si, lj * g.s + sj);
        }
      weighted_rows_at_any(ss, wk.coefs.data(), wk.rows.data(), count, g.C, wk.outs.data());
    }
  }

  // The scratch between the backward passes is this back end's own (Python drops it): the
  // weights and logit gradients in gather order, (n, H, W, K*K, s, s): entry (m, p, si, sj) is
  // tap p of output point (l s + si, l_j s + sj) with centre l = m - p. backward_gather reads the
  // (s K)^2 coefficients of low-res point m contiguously; entries whose centre is outside the
  // map are never written nor read.
  int64_t gather_at(int64_t b, int64_t mi, int64_t mj) const {
    return ((b * g.H + mi) * g.W + mj) * taps() * g.s * g.s;
  }

  // Writes the row-form w and dl (tap t of lane j at [t * width + j], row si at si * taps *
  // width) of the s output rows of centre row li into the gather-ordered scratch: the s * s
  // points of a centre are contiguous there, so each (target, tap) takes one short run. S: s
  // when it is small (the copies inline, not a memmove call each), else 0.
  template <int S>
  SAPA_INLINE void scatter_rows(const A* w, const A* dl, int64_t b, int64_t li, A* w_out,
                                A* dl_out) const {
    const int64_t s = S > 0 ? S : g.s, ss = s * s, row = taps() * width;
    for (int64_t dy = -g.r; dy <= g.r; ++dy) {
      const int64_t mi = li + dy, p0 = (dy + g.r) * g.K + g.r;  // p0: the tap dx = 0
      if (mi < 0 || mi >= g.H) continue;
      for (int64_t mj = 0; mj < g.W; ++mj) {
        const int64_t at = gather_at(b, mi, mj) + p0 * ss;
        A *wd = w_out + at, *dld = dl_out + at;
        // taps dx whose centre lj = mj - dx is inside the row
        const int64_t dx0 = std::max(-g.r, mj - (g.W - 1)), dx1 = std::min(g.r, mj);
        for (int64_t dx = dx0; dx <= dx1; ++dx) {
          const int64_t src = (p0 + dx) * width + (mj - dx) * s, dst = dx * ss;
          if constexpr (S > 0) {  // through a local block: fixed-size copies, no aliasing
            A wb[S * S], dlb[S * S];
            for (int64_t si = 0; si < S; ++si) {
              std::memcpy(wb + si * S, w + si * row + src, S * sizeof(A));
              std::memcpy(dlb + si * S, dl + si * row + src, S * sizeof(A));
            }
            std::memcpy(wd + dst, wb, sizeof wb);
            std::memcpy(dld + dst, dlb, sizeof dlb);
          } else {
            for (int64_t si = 0; si < s; ++si)
              for (int64_t sj = 0; sj < s; ++sj) {
                wd[dst + si * s + sj] = w[si * row + src + sj];
                dld[dst + si * s + sj] = dl[si * row + src + sj];
              }
          }
        }
      }
    }
  }

  SAPA_INLINE void scatter_taps(const A* w, const A* dl, int64_t b, int64_t li, A* w_out,
                                A* dl_out) const {
    switch (g.s) {
      case 1: scatter_rows<1>(w, dl, b, li, w_out, dl_out); break;
      case 2: scatter_rows<2>(w, dl, b, li, w_out, dl_out); break;
      case 3: scatter_rows<3>(w, dl, b, li, w_out, dl_out); break;
      case 4: scatter_rows<4>(w, dl, b, li, w_out, dl_out); break;
      default: scatter_rows<0>(w, dl, b, li, w_out, dl_out); break;
    }
  }

  // backward_points (pass 1): dq of output rows li*s .. li*s+s-1, and the weights and logit
  // gradients of every tap into the gather-ordered scratch.
  SAPA_CLONES void backward_points_item(const T* q, const T* k, const T* v, const A* stat,
                                       const T* gout, T* dq, A* w_out, A* dl_out, int64_t b,
                                       int64_t li, Work& wk) const {
    const int64_t n = taps();
    window(wk.kband, k, b, li, wk.kwin.data());
    window(wk.vband, v, b, li, wk.vwin.data());
    wk.k.load(k + g.k_at(b, 0, 0), std::max<int64_t>(li - g.r, 0), std::min(li + g.r + 1, g.H));
    inside_mask(li, wk.inside.data());
    A *st0 = wk.st0.data(), *st1 = wk.st1.data();
    const uint8_t* inside = wk.inside.data();
    for (int64_t si = 0; si < g.s; ++si) {
      transpose_row(q + g.q_at(b, li * g.s + si, 0), g.d, wk.qrows[si]);
      transpose_row(gout + g.out_at(b, li * g.s + si, 0), g.C, wk.grows[si]);
    }
    tap_products_rows(g.s, wk.qrows.data(), wk.kwin.data(), g.d, wk.logits.data(),
                      wk.qzeros.data());
    tap_products_rows(g.s, wk.grows.data(), wk.vwin.data(), g.C, wk.dws.data(),
                      wk.gzeros.data());  // dw_t = g . v[l+t]
    const int64_t row = n * width;
    for (int64_t si = 0; si < g.s; ++si) {
      const int64_t i = li * g.s + si;
      A *logit = wk.logits[si], *dw = wk.dws[si], *w = wk.w.data() + si * row;
      A* dl = wk.dl.data() + si * row;
      mask_uncounted(logit, inside);
      for (int64_t j = 0; j < g.oW(); ++j) {
        st0[j] = stat[g.stat_at(b, i, j)];
        st1[j] = stat[g.stat_at(b, i, j) + 1];
      }
      weights_from_stats(o.normalizer, taps(), width, logit, st0, st1, w);
      logit_gradients(logit, w, dw, st0, st1, inside, wk.spread.data(), dl);
      dq_poison(li, dl, wk.qzeros[si], inside, wk.poison.data());
      // point-major (row si at si * oW * taps): the s points of a centre in a row side by side
      A* dlT = wk.dlT.data() + si * g.oW() * n;
      transpose(dl, width, n, g.oW(), dlT, n);
      add_poison(dlT, wk.poison.data());
    }
    scatter_taps(wk.w.data(), wk.dl.data(), b, li, w_out, dl_out);
    for (int64_t lj = 0; lj < g.W; ++lj) {  // dq: the s * s points of each centre
      const int64_t count = centre_rows(wk.k, li, lj, wk.rows.data(), wk.tap_of.data());
      for (int64_t si = 0; si < g.s; ++si) {
        for (int64_t sj = 0; sj < g.s; ++sj)
          wk.outs[sj] = dq + g.q_at(b, li * g.s + si, lj * g.s + sj);
        assemble_centre(g.s, count, wk.dlT.data() + (si * g.oW() + lj * g.s) * n, g.d, wk);
      }
    }
  }

  // backward_gather (pass 2): dk and dv of low-res row mi, gathered from the output points
  // of every centre l = m - p whose window reaches m. Each m sums its terms in the order
  // (dy, si, lj, sj): window row dy, sub-row si, centre column lj = mj - dx ascending,
  // sub-column sj; the coefficients come from the gather-ordered scratch.
  //
  // kGatherBlock consecutive points m of the row are gathered together (gather_block): a row
  // of q (or g) serves every m of the block whose window holds it, so each loaded row feeds
  // up to kGatherBlock sums instead of one, and rows are addressed by strides, not pointer
  // lists. Each m still sums exactly its own terms in its own order: the bits do not depend
  // on the blocking.
  static constexpr int kGatherBlock = 4;

  struct GatherWork {
    RowBand<T, A> q, gout;
    explicit GatherWork(const Kernel& kn)
        : q(kn.g.oW(), kn.g.d, kn.g.K * kn.g.s), gout(kn.g.oW(), kn.g.C, kn.g.K * kn.g.s) {}
  };

  // Channels [c0, c0 + NV lanes) of out[mm] (the points mj0 + mm, mm < M, of row mi) from
  // rows of `band` (point-major, ch channels) and the coefficients in `coef` (scratch).
  template <int M, int64_t NV>
  SAPA_INLINE void gather_block(const RowBand<T, A>& band, const A* coef, int64_t ch,
                                int64_t b, int64_t mi, int64_t mj0, int64_t c0,
                                T* const* out) const {
    using V = typename Simd<A>::type;
    constexpr int64_t L = Simd<A>::lanes;
    const int64_t ss = g.s * g.s, step = (taps() + 1) * ss;  // from m to m + 1 at a fixed term
    const int64_t lj0 = std::max<int64_t>(mj0 - g.r, 0);
    const int64_t lj1 = std::min<int64_t>(mj0 + M - 1 + g.r, g.W - 1);
    V acc[M][NV] = {};
    for (int64_t dy = -g.r; dy <= g.r; ++dy) {
      const int64_t li = mi - dy;
      if (li < 0 || li >= g.H) continue;
      for (int64_t si = 0; si < g.s; ++si) {
        // coefficient of m = mj0 + mm, centre column lj, sub-column sj:
        // row_coef[(mj0 - lj + r) * ss + sj + mm * step]
        const int64_t row_coef = gather_at(b, mi, mj0) + (dy + g.r) * g.K * ss + si * g.s;
        for (int64_t lj = lj0; lj <= lj1; ++lj) {
          const int64_t rel = lj - mj0;  // m = mj0 + mm holds centre lj when |mm - rel| <= r
          const int64_t c = row_coef + (g.r - rel) * ss;  // of m = mj0 + rel - r (maybe < 0)
          const A* x = band.at(li * g.s + si, lj * g.s) + c0;  // sub-columns sj are contiguous
          for (int64_t sj = 0; sj < g.s; ++sj, x += ch) {
            V xv[NV];
            for (int64_t v = 0; v < NV; ++v) xv[v] = load_vec(x + v * L);
            for (int mm = 0; mm < M; ++mm) {
              if (mm < rel - g.r || mm > rel + g.r) continue;
              const A w = coef[c + sj + mm * step];
              for (int64_t v = 0; v < NV; ++v) acc[mm][v] += w * xv[v];
            }
          }
        }
      }
    }
    for (int mm = 0; mm < M; ++mm)
      for (int64_t v = 0; v < NV; ++v) store_vec<T, A>(acc[mm][v], out[mm] + c0 + v * L);
  }

  // gather_block over every channel of M points: blocks of NV vectors, then scalars.
  template <int M>
  SAPA_INLINE void gather_points(const RowBand<T, A>& band, const A* coef, int64_t ch,
                                 int64_t b, int64_t mi, int64_t mj0, T* const* out) const {
    constexpr int64_t L = Simd<A>::lanes;
    constexpr int64_t NV = kAccumulators / M >= 4 ? 4 : (kAccumulators / M >= 2 ? 2 : 1);
    int64_t c0 = 0;
    for (; c0 + NV * L <= ch; c0 += NV * L)
      gather_block<M, NV>(band, coef, ch, b, mi, mj0, c0, out);
    if constexpr (NV > 2) {
      if (c0 + 2 * L <= ch) {
        gather_block<M, 2>(band, coef, ch, b, mi, mj0, c0, out);
        c0 += 2 * L;
      }
    }
    if constexpr (NV > 1) {
      if (c0 + L <= ch) {
        gather_block<M, 1>(band, coef, ch, b, mi, mj0, c0, out);
        c0 += L;
      }
    }
    const int64_t ss = g.s * g.s;
    for (; c0 < ch; ++c0)  // the same terms in the same order, one channel at a time
      for (int mm = 0; mm < M; ++mm) {
        const int64_t mj = mj0 + mm;
        A acc = A(0);
        for (int64_t dy = -g.r; dy <= g.r; ++dy) {
          const int64_t li = mi - dy;
          if (li < 0 || li >= g.H) continue;
          for (int64_t si = 0; si < g.s; ++si)
            for (int64_t lj = std::max<int64_t>(mj - g.r, 0);
                 lj <= std::min<int64_t>(mj + g.r, g.W - 1); ++lj)
              for (int64_t sj = 0; sj < g.s; ++sj) {
                const int64_t p = (dy + g.r) * g.K + (mj - lj + g.r);
                acc += coef[gather_at(b, mi, mj) + p * ss + si * g.s + sj] *
                       band.at(li * g.s + si, lj * g.s + sj)[c0];
              }
        }
        out[mm][c0] = From<T>::of(acc);
      }
  }

  SAPA_CLONES void backward_gather_item(const T* q, const T* gout, const A* w_in,
                                        const A* dl_in, T* dk, T* dv, int64_t b, int64_t mi,
                                        GatherWork& wk) const {
    const int64_t centre0 = std::max<int64_t>(mi - g.r, 0);
    const int64_t centre1 = std::min(mi + g.r + 1, g.H);
    wk.q.load(q + g.q_at(b, 0, 0), centre0 * g.s, centre1 * g.s);
    wk.gout.load(gout + g.out_at(b, 0, 0), centre0 * g.s, centre1 * g.s);
    constexpr int M = kGatherBlock;
    T *dk_out[M], *dv_out[M];
    int64_t mj0 = 0;
    for (; mj0 < g.W; mj0 += M) {
      const int64_t m = std::min<int64_t>(M, g.W - mj0);
      for (int64_t mm = 0; mm < m; ++mm) {
        dk_out[mm] = dk + g.k_at(b, mi, mj0 + mm);
        dv_out[mm] = dv + g.v_at(b, mi, mj0 + mm);
      }
      if (m == M) {
        gather_points<M>(wk.q, dl_in, g.d, b, mi, mj0, dk_out);
        gather_points<M>(wk.gout, w_in, g.C, b, mi, mj0, dv_out);
      } else {
        for (int64_t mm = 0; mm < m; ++mm) {
          gather_points<1>(wk.q, dl_in, g.d, b, mi, mj0 + mm, dk_out + mm);
          gather_points<1>(wk.gout, w_in, g.C, b, mi, mj0 + mm, dv_out + mm);
        }
      }
    }
  }

  // Flops of one work item (a low-res row of output points), for the threading decision.
  double item_flops() const {
    return double(g.s * g.s * g.W) * double(taps()) * double(2 * (g.d + g.C) + 8);
  }

  void forward(ffi::ThreadPool& pool, const T* q, const T* k, const T* v, T* out,
               A* stat) const {
    parallel_for(
        pool, g.n * g.H, item_flops(), [&] { return Work(*this, false); },
        [&](Work& wk, int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item)
            forward_item(q, k, v, out, stat, item / g.H, item % g.H, wk);
        });
  }

  void backward(ffi::ThreadPool& pool, const T* q, const T* k, const T* v, const A* stat,
                const T* gout, T* dq, T* dk, T* dv, A* w, A* dl) const {
    parallel_for(
        pool, g.n * g.H, 2 * item_flops(), [&] { return Work(*this, true); },
        [&](Work& wk, int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item)
            backward_points_item(q, k, v, stat, gout, dq, w, dl, item / g.H, item % g.H, wk);
        });
    parallel_for(
        pool, g.n * g.H, item_flops(), [&] { return GatherWork(*this); },
        [&](GatherWork& wk, int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item)
            backward_gather_item(q, gout, w, dl, dk, dv, item / g.H, item % g.H, wk);
        });
  }
};

}  // namespace SAPA_CPU_ISA
}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_SAPA_PASSES_H_

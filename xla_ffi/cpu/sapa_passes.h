// SAPA's passes on XLA:CPU (docs/design.md §1 and §3; layout and shared index, border and
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
#ifndef SAPA_JAX_XLA_FFI_CPU_SAPA_PASSES_H_
#define SAPA_JAX_XLA_FFI_CPU_SAPA_PASSES_H_

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/rows.h"
#include "cpu/simd.h"
#include "cpu/types.h"
#include "sapa_common.h"
#include "xla/ffi/api/ffi.h"

namespace sapa::cpu {

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
  // the cancellation-free form of docs/design.md §2: with w_u = h_u / (S + eps) summing to nearly 1,
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
            backward_point_item(q, k, v, stat, gout, dq, w, dl, item / g.H, item % g.H, wk);
        });
    parallel_for(
        pool, g.n * g.H, item_flops(), [&] { return GatherWork(*this); },
        [&](GatherWork& wk, int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item)
            backward_gather_item(q, gout, w, dl, dk, dv, item / g.H, item % g.H, wk);
        });
  }
};

}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_SAPA_PASSES_H_

// The fused CARAFE passes for XLA:CPU (docs/design.md §5; layout in carafe_common.h), on the
// CPU kernel layer's primitives (dtype conversion, transposes, the vectorised exp, column dots,
// weighted rows, row bands and the parallel-for).
//
// One work item is (batch element, low-res row li), as in SAPA's kernels.
// forward: per output row, the logits transposed to tap-major with the output columns on the
// vector lanes, each group normalised lane-wise (stats as SAPA's), then every point's
// out[group channels] = sum of its inside taps' weights times rows of x; x is never expanded
// into K*K patches. backward_points per output row: weights again from the stats, dw_t = g . x
// [l + t] per group (column dots of g against K band rows of x, zero padding included), the
// normaliser's vjp (sapa_common.h's point_logit_gradients) into dlogits, and the weights into
// w_scratch. backward_gather per low-res row gathers
// dx[m, group channels] = sum w g over the taps and the s*s children of every centre m - t,
// in a fixed order: no atomics, every output element written by one worker.
#ifndef SAPA_JAX_XLA_FFI_CPU_CARAFE_PASSES_H_
#define SAPA_JAX_XLA_FFI_CPU_CARAFE_PASSES_H_

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "carafe_common.h"
#include "cpu/normalise.h"
#include "cpu/parallel.h"
#include "cpu/rows.h"
#include "cpu/simd.h"
#include "cpu/types.h"
#include "sapa_common.h"
#include "xla/ffi/api/ffi.h"

// The item functions get the SIMD clones of cpu/simd.h while it offers them (SAPA_CLONES);
// once the passes are compiled per SIMD level instead, the macro may be gone: plain then.
#ifndef SAPA_CLONES
#define SAPA_CLONES
#endif

namespace sapa::cpu {

template <typename T, typename A>
struct CarafeKernel {
  CarafeGeometry g;
  int64_t normalizer;
  double eps;
  int64_t width;   // oW rounded up to kLanes: the lane stride of tap-major rows
  int64_t band_w;  // width + 2 r s: row stride of a band

  CarafeKernel(const CarafeGeometry& geometry, int64_t normalizer_code, double eps_value)
      : g(geometry), normalizer(normalizer_code), eps(eps_value),
        width((g.oW() + kLanes - 1) / kLanes * kLanes), band_w(width + 2 * g.r * g.s) {}

  int64_t taps() const { return g.taps(); }
  int64_t centre_tap() const { return g.r * g.K + g.r; }  // always inside the map
  // The sapa::Geometry of the bands of x: d unused, C the channels of x.
  sapa::Geometry band_geometry() const {
    return sapa::Geometry{g.n, g.H, g.W, g.s, g.K, g.r, g.C, g.C};
  }

  // The normaliser's vjp for one group: dl (taps, width) from the logits, weights, dw_t =
  // g . x[l + t] and stats, per lane with the shared formula (sapa_common.h,
  // point_logit_gradients; every tap counts).
  SAPA_INLINE void group_logit_gradients(const A* logit, const A* w, const A* dw, const A* st0,
                                         const A* st1, A* dl) const {
    for (int64_t j = 0; j < width; ++j)
      sapa::point_logit_gradients<A>(
          normalizer, A(eps), st0[j], st1[j], taps(),
          [&](int64_t p, A* x, A* wp, A* dwp) {
            *x = logit[p * width + j];
            *wp = w[p * width + j];
            *dwp = dw[p * width + j];
            return true;
          },
          [&](int64_t p, A, A dlogit) { dl[p * width + j] = dlogit; });
  }

  // dst[j * stride + c] = From<T>(src[c * width + j]) for j < oW, c < ch: a tap-major row back
  // to point-major storage.
  template <typename D>
  SAPA_INLINE void untranspose(const A* src, int64_t ch, D* dst, int64_t stride) const {
    for (int64_t j = 0; j < g.oW(); ++j)
      for (int64_t c = 0; c < ch; ++c) dst[j * stride + c] = From<D>::of(src[c * width + j]);
  }

  // Inside taps of centre (li, lj): their rows in `band` and tap indices; returns the count.
  SAPA_INLINE int64_t inside_rows(const RowBand<T, A>& band, int64_t li, int64_t lj,
                                  const A** rows, int64_t* tap_of) const {
    int64_t count = 0, t = 0;
    for (int64_t dy = -g.r; dy <= g.r; ++dy)
      for (int64_t dx = -g.r; dx <= g.r; ++dx, ++t)
        if (g.inside(li, lj, dy, dx)) {
          rows[count] = band.at(li + dy, lj + dx);
          tap_of[count++] = t;
        }
    return count;
  }

  // Per-thread buffers of the forward and of backward pass 1.
  struct Work {
    std::vector<A> lT, w, st0, st1, poison, coef, gT, dw, dl, zero;
    std::vector<const A*> rows, grows, xwin;
    std::vector<T*> outs;
    std::vector<int64_t> tap_of;
    RowBand<T, A> x;
    Band<T, A> xband;
    Work(const CarafeKernel& kn, bool backward)
        : lT(zeros<A>(kn.g.logit_channels() * kn.width)), w(lT),
          st0(zeros<A>(kn.g.G * kn.width)), st1(st0), poison(st0),
          coef(zeros<A>(kn.g.s * kn.taps())),
          gT(zeros<A>(backward ? kn.g.C * kn.width : 0)),
          dw(zeros<A>(backward ? kn.g.logit_channels() * kn.width : 0)), dl(dw),
          zero(zeros<A>(kn.width)), rows(size_t(kn.taps())), grows(rows), xwin(size_t(kn.g.K)),
          outs(size_t(kn.g.s)), tap_of(size_t(kn.taps())),
          x(kn.g.W, kn.g.C, backward ? 0 : kn.g.K),
          xband(kn.band_geometry(), backward ? kn.g.C : 0, kn.band_w) {}
  };

  // Logits of output row i, tap-major: lT[(grp * taps + t) * width + j] (padding lanes 0).
  SAPA_INLINE void load_logits(const T* logits, int64_t b, int64_t i, A* lT) const {
    transpose(logits + g.logit_at(b, i, 0), g.logit_channels(), g.oW(), g.logit_channels(), lT,
              width);
  }

  SAPA_INLINE void save_stats(A* stat, int64_t b, int64_t i, const A* st0, const A* st1) const {
    for (int64_t j = 0; j < g.oW(); ++j)
      for (int64_t grp = 0; grp < g.G; ++grp) {
        stat[g.stat_at(b, i, j) + 2 * grp] = st0[grp * width + j];
        stat[g.stat_at(b, i, j) + 2 * grp + 1] = st1[grp * width + j];
      }
  }

  SAPA_INLINE void load_stats(const A* stat, int64_t b, int64_t i, A* st0, A* st1) const {
    for (int64_t j = 0; j < g.oW(); ++j)
      for (int64_t grp = 0; grp < g.G; ++grp) {
        st0[grp * width + j] = stat[g.stat_at(b, i, j) + 2 * grp];
        st1[grp * width + j] = stat[g.stat_at(b, i, j) + 2 * grp + 1];
      }
  }

  // poison[grp * width + j]: the sum of out_poison_term over the out-of-map taps of the point.
  SAPA_INLINE void out_poison(const A* w, int64_t li, A* poison) const {
    std::fill(poison, poison + g.G * width, A(0));
    for (int64_t grp = 0; grp < g.G; ++grp) {
      int64_t t = 0;
      for (int64_t dy = -g.r; dy <= g.r; ++dy)
        for (int64_t dx = -g.r; dx <= g.r; ++dx, ++t) {
          const A* wt = w + (grp * taps() + t) * width;
          for (int64_t j = 0; j < g.oW(); ++j)
            if (!g.inside(li, j / g.s, dy, dx))
              poison[grp * width + j] += sapa::out_poison_term(sapa::kZeros, wt[j]);
        }
    }
  }

  // Forward: out and stats of output rows li*s .. li*s+s-1 of batch element b; the s points
  // of an output row that share a low-res centre are reassembled together.
  SAPA_CLONES void forward_item(const T* x, const T* logits, T* out, A* stat, int64_t b,
                                int64_t li, Work& wk) const {
    const int64_t n = taps(), cg = g.Cg();
    wk.x.load(x + g.x_at(b, 0, 0), std::max<int64_t>(li - g.r, 0), std::min(li + g.r + 1, g.H));
    for (int64_t i = li * g.s; i < (li + 1) * g.s; ++i) {
      load_logits(logits, b, i, wk.lT.data());
      for (int64_t grp = 0; grp < g.G; ++grp)
        normalise_rows(normalizer, A(eps), taps(), width, wk.lT.data() + grp * n * width,
                       wk.w.data() + grp * n * width, wk.st0.data() + grp * width,
                       wk.st1.data() + grp * width);
      save_stats(stat, b, i, wk.st0.data(), wk.st1.data());
      out_poison(wk.w.data(), li, wk.poison.data());
      for (int64_t lj = 0; lj < g.W; ++lj) {
        // x is 0 outside the map: only inside taps enter the sum
        const int64_t count = inside_rows(wk.x, li, lj, wk.rows.data(), wk.tap_of.data());
        for (int64_t grp = 0; grp < g.G; ++grp) {
          const A* w = wk.w.data() + grp * n * width;
          for (int64_t e = 0; e < count; ++e) wk.grows[e] = wk.rows[e] + grp * cg;
          for (int64_t sj = 0; sj < g.s; ++sj) {
            const int64_t j = lj * g.s + sj;
            for (int64_t e = 0; e < count; ++e)
              wk.coef[sj * n + e] = w[wk.tap_of[e] * width + j] +
                                    (wk.tap_of[e] == centre_tap() ? wk.poison[grp * width + j]
                                                                  : A(0));
            wk.outs[sj] = out + g.out_at(b, i, j) + grp * cg;
          }
          weighted_rows_any(g.s, wk.coef.data(), n, wk.grows.data(), count, cg, wk.outs.data());
        }
      }
    }
  }

  // dw[(grp * taps + t) * width + j] = g[j, group channels] . x[l + t, group channels], as
  // column dots of gT against the K window rows of x in the band; a window row outside the map
  // gives g . 0 (the zero product, as jnp's zero padding; out-of-map columns read the band's
  // zero padding and give the same).
  SAPA_INLINE void group_tap_products(const A* gT, const A* const* win, int64_t grp, A* dw,
                                      A* zero) const {
    const int64_t cg = g.Cg();
    const A* a = gT + grp * cg * width;
    std::fill(zero, zero + width, A(0));
    for (int64_t c = 0; c < cg; ++c)
      for (int64_t j = 0; j < width; ++j) zero[j] += a[c * width + j] * A(0);
    for (int64_t dy = 0; dy < g.K; ++dy)
      for (int64_t dx = 0; dx < g.K; dx += 2) {
        const bool pair = dx + 1 < g.K;
        A* first = dw + (grp * taps() + dy * g.K + dx) * width;
        A* outs[2] = {first, pair ? first + width : nullptr};
        if (!win[dy]) {
          for (int m = 0; m < (pair ? 2 : 1); ++m) std::copy(zero, zero + width, outs[m]);
          continue;
        }
        const A* base = win[dy] + grp * cg * band_w;
        const A* rhs[2] = {base + dx * g.s, pair ? base + (dx + 1) * g.s : nullptr};
        if (pair)
          column_dots<2>(a, width, rhs, band_w, cg, width, outs);
        else
          column_dots<1>(a, width, rhs, band_w, cg, width, outs);
      }
  }

  // Backward pass 1: dlogits of output rows li*s .. li*s+s-1, and their weights into scratch.
  SAPA_CLONES void backward_points_item(const T* x, const T* logits, const A* stat,
                                       const T* gout, T* dlogits, A* w_out, int64_t b,
                                       int64_t li, Work& wk) const {
    const int64_t n = taps();
    for (int64_t dy = 0; dy < g.K; ++dy) {
      const int64_t row = li - g.r + dy;
      wk.xwin[dy] = row >= 0 && row < g.H ? wk.xband.row(x, b, row) : nullptr;
    }
    for (int64_t i = li * g.s; i < (li + 1) * g.s; ++i) {
      load_logits(logits, b, i, wk.lT.data());
      load_stats(stat, b, i, wk.st0.data(), wk.st1.data());
      transpose(gout + g.out_at(b, i, 0), g.C, g.oW(), g.C, wk.gT.data(), width);
      for (int64_t grp = 0; grp < g.G; ++grp) {
        const int64_t at = grp * n * width;
        A *st0 = wk.st0.data() + grp * width, *st1 = wk.st1.data() + grp * width;
        weights_from_stats(normalizer, taps(), width, wk.lT.data() + at, st0, st1,
                           wk.w.data() + at);
        group_tap_products(wk.gT.data(), wk.xwin.data(), grp, wk.dw.data(), wk.zero.data());
        group_logit_gradients(wk.lT.data() + at, wk.w.data() + at, wk.dw.data() + at, st0, st1,
                              wk.dl.data() + at);
      }
      untranspose(wk.w.data(), g.logit_channels(), w_out + g.logit_at(b, i, 0),
                  g.logit_channels());
      untranspose(wk.dl.data(), g.logit_channels(), dlogits + g.logit_at(b, i, 0),
                  g.logit_channels());
    }
  }

  // Backward pass 2: dx of low-res row mi, gathered from the output points of every centre
  // l = m - t whose window reaches m: taps in order, then the s x s children in order.
  struct GatherWork {
    std::vector<A> cw;
    std::vector<const A*> rg, grg;
    std::vector<int64_t> at;
    RowBand<T, A> gout;
    explicit GatherWork(const CarafeKernel& kn)
        : cw(zeros<A>(kn.taps() * kn.g.s * kn.g.s)), rg(cw.size()), grg(cw.size()),
          at(cw.size()), gout(kn.g.oW(), kn.g.C, kn.g.K * kn.g.s) {}
  };

  SAPA_CLONES void backward_gather_item(const T* gout, const A* w_in, T* dx, int64_t b,
                                        int64_t mi, GatherWork& wk) const {
    const int64_t cg = g.Cg();
    const int64_t centre0 = std::max<int64_t>(mi - g.r, 0);
    const int64_t centre1 = std::min(mi + g.r + 1, g.H);
    wk.gout.load(gout + g.out_at(b, 0, 0), centre0 * g.s, centre1 * g.s);
    for (int64_t mj = 0; mj < g.W; ++mj) {
      int64_t count = 0, t = 0;
      for (int64_t dy = -g.r; dy <= g.r; ++dy)
        for (int64_t dx_ = -g.r; dx_ <= g.r; ++dx_, ++t) {
          const int64_t li = mi - dy, lj = mj - dx_;
          if (li < 0 || li >= g.H || lj < 0 || lj >= g.W) continue;
          for (int64_t si = 0; si < g.s; ++si)
            for (int64_t sj = 0; sj < g.s; ++sj, ++count) {
              wk.at[count] = g.logit_at(b, li * g.s + si, lj * g.s + sj) + t;
              wk.rg[count] = wk.gout.at(li * g.s + si, lj * g.s + sj);
            }
        }
      for (int64_t grp = 0; grp < g.G; ++grp) {
        for (int64_t e = 0; e < count; ++e) {
          wk.cw[e] = w_in[wk.at[e] + grp * taps()];
          wk.grg[e] = wk.rg[e] + grp * cg;
        }
        T* dx_out = dx + g.x_at(b, mi, mj) + grp * cg;
        weighted_rows<1>(wk.cw.data(), 0, wk.grg.data(), count, cg, &dx_out);
      }
    }
  }

  // Flops of one work item (s output rows), for the threading decision.
  double item_flops() const {
    return double(g.s * g.s * g.W) * double(taps()) * double(2 * g.C + 8 * g.G);
  }

  void forward(ffi::ThreadPool& pool, const T* x, const T* logits, T* out, A* stat) const {
    parallel_for(
        pool, g.n * g.H, item_flops(), [&] { return Work(*this, false); },
        [&](Work& wk, int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item)
            forward_item(x, logits, out, stat, item / g.H, item % g.H, wk);
        });
  }

  void backward(ffi::ThreadPool& pool, const T* x, const T* logits, const A* stat,
                const T* gout, T* dx, T* dlogits, A* w) const {
    parallel_for(
        pool, g.n * g.H, item_flops(), [&] { return Work(*this, true); },
        [&](Work& wk, int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item)
            backward_points_item(x, logits, stat, gout, dlogits, w, item / g.H, item % g.H, wk);
        });
    parallel_for(
        pool, g.n * g.H, item_flops(), [&] { return GatherWork(*this); },
        [&](GatherWork& wk, int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item)
            backward_gather_item(gout, w, dx, item / g.H, item % g.H, wk);
        });
  }
};

}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_CARAFE_PASSES_H_

// Shared index, border and normaliser logic of the SAPA core, used by the CPU and CUDA kernels
// alike so that the two back ends cannot drift apart. Everything here is plain arithmetic that
// compiles as host code (g++) and as host+device code (nvcc).
//
// Layout (NHWC, any leading dims flattened into one batch axis `n`):
//   q     (n, sH, sW, d)   high-res queries
//   k     (n, H,  W,  d)   low-res keys
//   v     (n, H,  W,  C)   low-res values
//   out   (n, sH, sW, C)
//   stats (n, sH, sW, 2)   per output point, in the accumulation type:
//                          softmax: {max logit, 1 / sum exp(logit - max)}
//                          h-norm : {1 / (sum h + eps), 0}, or {0, 1} when sum h + eps == 0
//                                   (weights 0; the backward then sees dh = dw, as jnp does)
//                          none   : {0, 0} (the logits are the weights)
// Tap p = (dy + r) * K + (dx + r), dy outer, dx inner, dy, dx in -r..r.
#ifndef SAPA_JAX_XLA_FFI_SAPA_COMMON_H_
#define SAPA_JAX_XLA_FFI_SAPA_COMMON_H_

#include <cmath>
#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define SAPA_HD __host__ __device__ __forceinline__
#else
#define SAPA_HD inline
#endif

namespace sapa {

enum Normalizer : int64_t { kSoftmax = 0, kRelu = 1, kSigmoid = 2, kSoftplus = 3, kNone = 4 };
constexpr int64_t kNumNormalizers = 5;
enum Border : int64_t { kZeros = 0, kValid = 1 };

// Accumulation type: double for double inputs, float for everything else.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

struct Geometry {
  int64_t n;      // flattened batch
  int64_t H, W;   // low-res map
  int64_t s;      // scale
  int64_t K, r;   // kernel size and radius
  int64_t d, C;   // query/key and value channels
  SAPA_HD int64_t oH() const { return H * s; }
  SAPA_HD int64_t oW() const { return W * s; }
  SAPA_HD int64_t taps() const { return K * K; }
  // Flat offsets of the first channel of a pixel.
  SAPA_HD int64_t q_at(int64_t b, int64_t i, int64_t j) const { return ((b * oH() + i) * oW() + j) * d; }
  SAPA_HD int64_t k_at(int64_t b, int64_t i, int64_t j) const { return ((b * H + i) * W + j) * d; }
  SAPA_HD int64_t v_at(int64_t b, int64_t i, int64_t j) const { return ((b * H + i) * W + j) * C; }
  SAPA_HD int64_t out_at(int64_t b, int64_t i, int64_t j) const { return ((b * oH() + i) * oW() + j) * C; }
  SAPA_HD int64_t tap_at(int64_t b, int64_t i, int64_t j) const { return ((b * oH() + i) * oW() + j) * taps(); }
  SAPA_HD int64_t stat_at(int64_t b, int64_t i, int64_t j) const { return ((b * oH() + i) * oW() + j) * 2; }
  // Is the low-res neighbour (li + dy, lj + dx) inside the map?
  SAPA_HD bool inside(int64_t li, int64_t lj, int64_t dy, int64_t dx) const {
    return li + dy >= 0 && li + dy < H && lj + dx >= 0 && lj + dx < W;
  }
};

// Non-finite values (docs/design.md §2): every back end makes exactly the output points and
// gradient entries NaN that the jnp formulation makes NaN. Hence the comparisons below are
// written so that a NaN operand wins (std::max, fmaxf and `x > 0 ? x : 0` would drop it).

// max(a, b) that returns NaN when either is NaN, as jnp.max does.
template <typename A> SAPA_HD A nan_max(A a, A b) { return (a < b || b != b) ? b : a; }

// h(x) of the "h / (sum h + eps)" normalisers; relu(NaN) = NaN as jnp.maximum(x, 0).
template <typename A> SAPA_HD A h_value(int64_t normalizer, A x) {
  switch (normalizer) {
    case kRelu: return x < A(0) ? A(0) : x;
    case kSigmoid: return A(1) / (A(1) + exp(-x));
    default:  // kSoftplus, computed without overflow for large |x|
      return (x > A(0) ? x : A(0)) + log1p(exp(-(x > A(0) ? x : -x)));
  }
}

// h'(x); relu'(0) = 0 as in JAX. sigmoid' = sig(x) sig(-x) = e / (1 + e)^2 with e = exp(-|x|):
// sig (1 - sig) would lose every digit of 1 - sig for large x. softplus' = sig.
template <typename A> SAPA_HD A h_grad(int64_t normalizer, A x) {
  switch (normalizer) {
    case kRelu: return x > A(0) ? A(1) : A(0);
    case kSigmoid: {
      const A e = exp(-(x > A(0) ? x : -x));
      return e / ((A(1) + e) * (A(1) + e));
    }
    default: return A(1) / (A(1) + exp(-x));
  }
}

// The gradient of h(x) for the cotangent dh. relu is a select in JAX (its custom JVP), so a
// non-finite dh does not leak through x <= 0 (or x = NaN); the others multiply.
template <typename A> SAPA_HD A h_vjp(int64_t normalizer, A x, A dh) {
  if (normalizer == kRelu) return x > A(0) ? dh : A(0);
  return h_grad(normalizer, x) * dh;
}

// 1 / (S + eps) of the h-normalisers, 0 for an all-zero window (weights 0, never NaN). A NaN
// or infinite denominator passes through (h * 0 = NaN for an infinite h, as h / inf in jnp).
template <typename A> SAPA_HD A h_inverse(A denom) { return denom == A(0) ? A(0) : A(1) / denom; }

// Weight of a tap from its logit and the point's stats (see the layout note above).
// `counted` is false for a tap that does not take part in the normalisation (border "valid").
template <typename A> SAPA_HD A tap_weight(int64_t normalizer, A logit, A stat0, A stat1, bool counted) {
  if (!counted) return A(0);
  if (normalizer == kSoftmax) return exp(logit - stat0) * stat1;
  if (normalizer == kNone) return logit;
  return h_value(normalizer, logit) * stat0;
}

// The stats of one point (layout note above) from its counted taps' reductions: `top` the
// NaN-propagating max of the logits (softmax) and `sum` the sum of exp(logit - top) (softmax)
// or of h(logit) (h-normalisers). The one place both back ends turn reductions into stats.
template <typename A> SAPA_HD void finish_stats(int64_t normalizer, A eps, A top, A sum, A* stat0,
                                                A* stat1) {
  if (normalizer == kSoftmax) {
    *stat0 = top;
    *stat1 = A(1) / sum;  // sum >= 1 (or NaN): the max is a counted tap, the centre always counts
  } else if (normalizer == kNone) {
    *stat0 = A(0);
    *stat1 = A(0);
  } else {
    const A denom = sum + eps;
    *stat0 = h_inverse(denom);
    *stat1 = denom == A(0) ? A(1) : A(0);
  }
}

// Out-of-map taps. jnp multiplies their weights by the zero padding of v, and their logit
// gradients by that of k (for dq); the kernels skip those products and add these terms to the
// point's sums instead: 0, or NaN where jnp's product is NaN. `raw_logit` is the tap's logit
// before masking, q . 0 (0 or NaN). With border "valid" jnp masks h(logit) by a select, whose
// gradient 0 * h'(raw_logit) is NaN for a NaN logit under sigmoid and softplus (relu's select
// and softmax's masked logits give an exact 0).
template <typename A> SAPA_HD A out_poison_term(int64_t border, A w) {
  return border == kZeros ? w * A(0) : A(0);
}
template <typename A> SAPA_HD A dq_poison_term(int64_t normalizer, int64_t border, A raw_logit,
                                               A dlogit) {
  if (border == kZeros) return dlogit * A(0);
  return normalizer == kSigmoid || normalizer == kSoftplus ? raw_logit * A(0) : A(0);
}

// Does a tap take part in the normalisation? Zeros border: every tap (outside ones have logit 0).
SAPA_HD bool tap_counted(int64_t border, bool inside) { return border == kZeros || inside; }

// The stats of one point from its logits: logit(p) for p < taps, counted(p) as tap_counted.
// Sums run in tap order (a back end that splits the taps over lanes reduces the same terms
// through finish_stats itself).
template <typename A, typename Logit, typename Counted>
SAPA_HD void point_stats(int64_t normalizer, A eps, int64_t taps, Logit logit, Counted counted,
                         A* stat0, A* stat1) {
  A top = -A(INFINITY), sum = A(0);
  if (normalizer == kSoftmax) {
    for (int64_t p = 0; p < taps; ++p)
      if (counted(p)) top = nan_max(top, logit(p));
    for (int64_t p = 0; p < taps; ++p)
      if (counted(p)) sum += exp(logit(p) - top);
  } else if (normalizer != kNone) {
    for (int64_t p = 0; p < taps; ++p)
      if (counted(p)) sum += h_value(normalizer, logit(p));
  }
  finish_stats(normalizer, eps, top, sum, stat0, stat1);
}

// ---- Logit gradients: one formula for both back ends ---------------------------------------
// For one output point with weights w_j (0 for uncounted taps) and dw_j = g . v[l + j] over its
// taps, every normaliser's logit gradient rests on the spread G_p = sum_j w_j (dw_p - dw_j):
//   softmax        dlogit_p = w_p G_p                            (sum_j w_j = 1)
//   h / (S + eps)  dlogit_p = h'(x_p) inv (eps inv dw_p + G_p)   (inv = 1 / (S + eps) = stat 0,
//                  w_j = h_j inv): docs/design.md §2's cancellation-free form; for an all-zero
//                  window (stat 1 set) dh_p = dw_p, as jnp's safe denominator 1 gives
//   none           dlogit_p = dw_p
// G_p costs O(taps) per point, without the cancellation of W dw_p - sum_j w_j dw_j, as
//   G_p = W (dw_p - c) - R,   W = sum_j w_j,   R = sum_j w_j (dw_j - c),
// which holds for any c. c is the pivot: the dw of the (first) tap of largest weight w_q, an
// input value, so the dw_j - c are exact where dw_j is near c and the terms are small where the
// weight is: W |dw_p - c| <= (W / w_q) sum_j w_j |dw_p - dw_j|, and W / w_q <= taps. The error of
// G_p is then first order, a few (taps + 2) (1 + 2 W / w_q) units of the working precision
// times sum_j w_j |dw_p - dw_j| (the bound tests/test_cuda_emulated.py::
// test_logit_gradient_error_bound checks against float64 / long double at K = 1..9); no double
// arithmetic is needed on either back end. A non-finite pivot is replaced by 0: G_p is then
// W dw_p - sum_j w_j dw_j, whose NaNs and infinities are those of jnp's chain rule (a finite
// pivot keeps them too: an infinite dw_j reaches R and every dw_p - c alike).

// Pass 1 of one point, in tap order: W and the pivot.
template <typename A> struct SpreadSums {
  A weight = A(0);       // W
  A top = -A(INFINITY);  // the largest weight so far (NaN weights never win)
  A pivot = A(0);        // its dw
  SAPA_HD void add(A w, A dw) {
    weight += w;
    if (w > top) {
      top = w;
      pivot = dw;
    }
  }
};
// c from the pivot (pivot - pivot is NaN exactly when the pivot is NaN or infinite).
template <typename A> SAPA_HD A spread_centre(A pivot) { return pivot - pivot == A(0) ? pivot : A(0); }
// One term of R (pass 2).
template <typename A> SAPA_HD A spread_residual(A w, A dw, A centre) { return w * (dw - centre); }
// G_p (pass 3).
template <typename A> SAPA_HD A spread(A weight, A centre, A residual, A dw) {
  return weight * (dw - centre) - residual;
}

// dlogit of one counted tap from its logit, w, dw, the point's stats and G_p.
template <typename A>
SAPA_HD A tap_logit_gradient(int64_t normalizer, A eps, A stat0, A stat1, A logit, A w, A dw,
                             A spread_p) {
  if (normalizer == kNone) return dw;
  if (normalizer == kSoftmax) return w * spread_p;
  const A dh = stat1 != A(0) ? dw : stat0 * (eps * stat0 * dw + spread_p);
  return h_vjp(normalizer, logit, dh);
}

// The logit gradients of one output point, in three passes over its taps (sums, residual,
// gradients), each in tap order. tap(p, &logit, &w, &dw) loads tap p < taps and returns whether
// it is counted; store(p, w, dlogit) receives the tap's weight and gradient (0 when uncounted).
// A back end that splits the taps over lanes composes the same pieces with its own reductions.
template <typename A, typename Tap, typename Store>
SAPA_HD void point_logit_gradients(int64_t normalizer, A eps, A stat0, A stat1, int64_t taps,
                                   Tap tap, Store store) {
  A x, w, dw, residual = A(0), centre = A(0);
  SpreadSums<A> sums;
  if (normalizer != kNone) {
    for (int64_t p = 0; p < taps; ++p) {
      tap(p, &x, &w, &dw);
      sums.add(w, dw);
    }
    centre = spread_centre(sums.pivot);
    for (int64_t p = 0; p < taps; ++p) {
      tap(p, &x, &w, &dw);
      residual += spread_residual(w, dw, centre);
    }
  }
  for (int64_t p = 0; p < taps; ++p) {
    const bool counted = tap(p, &x, &w, &dw);
    store(p, w, counted ? tap_logit_gradient(normalizer, eps, stat0, stat1, x, w, dw,
                                             spread(sums.weight, centre, residual, dw))
                        : A(0));
  }
}

// The same for taps laid out with a stride (the CPU's rows: tap p of lane j at p * width + j):
// logit, w, dw, inside and dlogit of tap p at [p * stride]; dlogit may alias dw.
template <typename A>
SAPA_HD void point_logit_gradients(int64_t normalizer, int64_t border, A eps, A stat0, A stat1,
                                   int64_t taps, int64_t stride, const A* logit, const A* w,
                                   const A* dw, const uint8_t* inside, A* dlogit) {
  point_logit_gradients<A>(
      normalizer, eps, stat0, stat1, taps,
      [&](int64_t p, A* x, A* wp, A* dwp) {
        *x = logit[p * stride];
        *wp = w[p * stride];
        *dwp = dw[p * stride];
        return tap_counted(border, inside[p * stride] != 0);
      },
      [&](int64_t p, A, A dl) { dlogit[p * stride] = dl; });
}

// Attribute check shared by all handlers; returns an empty string when the attributes are valid.
inline std::string check_attributes(int64_t kernel_size, int64_t scale, int64_t normalizer,
                                    int64_t border, double eps) {
  if (kernel_size < 1 || kernel_size % 2 == 0)
    return "kernel_size must be a positive odd integer, got " + std::to_string(kernel_size);
  if (scale < 1) return "scale must be an integer >= 1, got " + std::to_string(scale);
  if (normalizer < 0 || normalizer >= kNumNormalizers)
    return "normalizer code must be 0.." + std::to_string(kNumNormalizers - 1) + ", got " +
           std::to_string(normalizer);
  if (border != kZeros && border != kValid)
    return "border code must be 0 (zeros) or 1 (valid), got " + std::to_string(border);
  if (!(eps >= 0.0)) return "eps must be >= 0, got " + std::to_string(eps);
  return std::string();
}

}  // namespace sapa

#endif  // SAPA_JAX_XLA_FFI_SAPA_COMMON_H_

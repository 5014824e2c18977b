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

// Non-finite values (DESIGN.md section 1): every back end makes exactly the output points and
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

// h'(x); relu'(0) = 0 as in JAX.
template <typename A> SAPA_HD A h_grad(int64_t normalizer, A x) {
  switch (normalizer) {
    case kRelu: return x > A(0) ? A(1) : A(0);
    default: {  // sigmoid' = sig (1 - sig), softplus' = sig
      A sig = A(1) / (A(1) + exp(-x));
      return normalizer == kSigmoid ? sig * (A(1) - sig) : sig;
    }
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

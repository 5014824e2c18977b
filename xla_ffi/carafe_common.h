// The CARAFE core's shared layer (docs/design.md §5), host and device: the geometry of the
// fused CARAFE kernels on both back ends and the validation of their FFI calls (host only).
//
// Layout (NHWC, leading dims flattened into the batch n; G groups, Cg = C / G channels each):
//   x        (n, H,  W,  C)       low-res feature
//   logits   (n, sH, sW, G*K*K)   channel g*K*K + t: tap t of group g (pixel-shuffled)
//   out      (n, sH, sW, C)       out[l', c] = sum_t w[l', g(c), t] x[l'/s + t, c], g(c) = c / Cg
//   stats    (n, sH, sW, 2*G)     per output point and group the two numbers of SAPA's stats
//                                 (sapa_common.h: softmax {max, 1/sum}, h {1/(S+eps), flag})
//   w_scratch (n, sH, sW, G*K*K)  the weights, written by backward pass 1 for the gather
// Every tap counts in the normalisation (CARAFE has no border option): an out-of-map tap keeps
// its predicted weight and meets x = 0, so it adds only its poison term (out_poison_term with
// border zeros) to the output and the product g . 0 to dw.
#ifndef SAPA_JAX_XLA_FFI_CARAFE_COMMON_H_
#define SAPA_JAX_XLA_FFI_CARAFE_COMMON_H_

#include <cstdint>
#include <string>

#include "sapa_common.h"
#include "sapa_validate.h"

namespace sapa {

struct CarafeGeometry {
  int64_t n;      // flattened batch
  int64_t H, W;   // low-res map
  int64_t s;      // scale
  int64_t K, r;   // kernel size and radius
  int64_t G, C;   // groups and channels of x (C = G * Cg)
  SAPA_HD int64_t oH() const { return H * s; }
  SAPA_HD int64_t oW() const { return W * s; }
  SAPA_HD int64_t taps() const { return K * K; }
  SAPA_HD int64_t Cg() const { return C / G; }
  SAPA_HD int64_t logit_channels() const { return G * K * K; }
  SAPA_HD int64_t point(int64_t b, int64_t i, int64_t j) const { return (b * oH() + i) * oW() + j; }
  SAPA_HD int64_t x_at(int64_t b, int64_t i, int64_t j) const { return ((b * H + i) * W + j) * C; }
  SAPA_HD int64_t out_at(int64_t b, int64_t i, int64_t j) const { return point(b, i, j) * C; }
  SAPA_HD int64_t logit_at(int64_t b, int64_t i, int64_t j) const {
    return point(b, i, j) * logit_channels();
  }
  SAPA_HD int64_t stat_at(int64_t b, int64_t i, int64_t j) const { return point(b, i, j) * 2 * G; }
  SAPA_HD bool inside(int64_t li, int64_t lj, int64_t dy, int64_t dx) const {
    return li + dy >= 0 && li + dy < H && lj + dx >= 0 && lj + dx < W;
  }
};


// Attributes, x and logits of a CARAFE call against the element types a back end supports;
// on success fills `g` and returns "". The limits and message format are SAPA's.
template <typename Supported>
std::string check_carafe_inputs(const xla::ffi::AnyBuffer& x, const xla::ffi::AnyBuffer& logits,
                                int64_t kernel_size, int64_t scale, int64_t groups,
                                int64_t normalizer, double eps, const Supported& supported,
                                const char* supported_names, CarafeGeometry* g) {
  std::string error = check_attributes(kernel_size, scale, normalizer, kZeros, eps);
  if (!error.empty()) return error;
  if (kernel_size > kMaxKernelSize)
    return "kernel_size must be <= " + std::to_string(kMaxKernelSize) + ", got " +
           std::to_string(kernel_size);
  if (scale > kMaxScale)
    return "scale must be <= " + std::to_string(kMaxScale) + ", got " + std::to_string(scale);
  if (groups < 1 || groups > kMaxKernelSize)
    return "groups must be 1.." + std::to_string(kMaxKernelSize) + ", got " +
           std::to_string(groups);
  const auto xd = x.dimensions(), ld = logits.dimensions();
  if (xd.size() < 4)
    return "x must have rank >= 4 (..., height, width, channels), got shape " + describe(xd);
  if (ld.size() != xd.size())
    return "x and logits must have the same rank, got shapes " + describe(xd) + ", " +
           describe(ld);
  if (!supported(x.element_type()))
    return std::string("x must have element type ") + supported_names + ", got " +
           type_name(x.element_type());
  const size_t lead = xd.size() - 3;
  const int64_t H = xd[lead], W = xd[lead + 1], C = xd[lead + 2];
  if (C % groups != 0)
    return "the channels of x must be divisible by groups, got " + std::to_string(C) +
           " channels and groups=" + std::to_string(groups);
  Validator check(x);
  check.expect("logits", logits, H * scale, W * scale, groups * kernel_size * kernel_size,
               x.element_type());
  if (!check.error().empty()) return check.error();
  int64_t n = 1;
  for (size_t i = 0; i < lead; ++i) n *= xd[i];
  *g = CarafeGeometry{n, H, W, scale, kernel_size, kernel_size / 2, groups, C};
  return std::string();
}

inline std::string check_carafe_forward_outputs(const xla::ffi::AnyBuffer& x,
                                                const CarafeGeometry& g,
                                                const xla::ffi::AnyBuffer& out,
                                                const xla::ffi::AnyBuffer& stats) {
  Validator check(x);
  check.expect("out", out, g.oH(), g.oW(), g.C, x.element_type());
  check.expect("stats", stats, g.oH(), g.oW(), 2 * g.G, acc_type(x.element_type()));
  return check.error();
}

inline std::string check_carafe_backward_buffers(
    const xla::ffi::AnyBuffer& x, const CarafeGeometry& g, const xla::ffi::AnyBuffer& stats,
    const xla::ffi::AnyBuffer& gout, const xla::ffi::AnyBuffer& dx,
    const xla::ffi::AnyBuffer& dlogits, const xla::ffi::AnyBuffer& w_scratch) {
  const xla::ffi::DataType t = x.element_type(), a = acc_type(t);
  Validator check(x);
  check.expect("stats", stats, g.oH(), g.oW(), 2 * g.G, a);
  check.expect("g", gout, g.oH(), g.oW(), g.C, t);
  check.expect("dx", dx, g.H, g.W, g.C, t);
  check.expect("dlogits", dlogits, g.oH(), g.oW(), g.logit_channels(), t);
  check.expect("w_scratch", w_scratch, g.oH(), g.oW(), g.logit_channels(), a);
  return check.error();
}

}  // namespace sapa

#endif  // SAPA_JAX_XLA_FFI_CARAFE_COMMON_H_

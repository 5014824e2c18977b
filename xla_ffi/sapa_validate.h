// Argument validation shared by the CPU and CUDA handlers: one message format, one set of
// limits, the same text on both back ends (tests/kernel_cases.py pins it on both). Host code;
// the back ends add only checks of their own resources (CPU buffer sizes, CUDA int ranges).
//
// Shapes are (leading..., height, width, channels); every leading dim goes to the batch n.
// H, W come from k, the low-res map; q must be (..., s H, s W, d) and v (..., H, W, C).
#ifndef SAPA_JAX_XLA_FFI_SAPA_VALIDATE_H_
#define SAPA_JAX_XLA_FFI_SAPA_VALIDATE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "sapa_common.h"
#include "xla/ffi/api/ffi.h"

namespace sapa {

constexpr int64_t kMaxKernelSize = 4095;  // K*K and every index product stay far from overflow
constexpr int64_t kMaxScale = 46340;      // s*s fits an int (the CUDA kernels index with int)

inline std::string describe(xla::ffi::AnyBuffer::Dimensions dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + (dims.size() == 1 ? ",)" : ")");
}

// NumPy's names, as the Python side speaks them.
inline std::string type_name(xla::ffi::DataType t) {
  switch (t) {
    case xla::ffi::DataType::F32: return "float32";
    case xla::ffi::DataType::F64: return "float64";
    case xla::ffi::DataType::BF16: return "bfloat16";
    case xla::ffi::DataType::F16: return "float16";
    default: return "type code " + std::to_string(static_cast<int>(t));
  }
}

inline xla::ffi::DataType acc_type(xla::ffi::DataType t) {
  return t == xla::ffi::DataType::F64 ? xla::ffi::DataType::F64 : xla::ffi::DataType::F32;
}

// Checks buffers against q's leading dims: same rank and leading dims, the given trailing
// (h, w, c) and dtype. Keeps the first error.
class Validator {
 public:
  explicit Validator(const xla::ffi::AnyBuffer& q) : lead_(q.dimensions()) {}

  void expect(const char* name, const xla::ffi::AnyBuffer& x, int64_t h, int64_t w, int64_t c,
              xla::ffi::DataType dtype) {
    if (!error_.empty()) return;
    std::vector<int64_t> want(lead_.begin(), lead_.end() - 3);
    want.insert(want.end(), {h, w, c});
    if (!(x.dimensions() == xla::ffi::AnyBuffer::Dimensions(want))) {
      error_ = std::string(name) + " must have shape " + describe(want) + ", got " +
               describe(x.dimensions());
    } else if (x.element_type() != dtype) {
      error_ = std::string(name) + " must have element type " + type_name(dtype) + ", got " +
               type_name(x.element_type());
    }
  }
  const std::string& error() const { return error_; }

 private:
  xla::ffi::AnyBuffer::Dimensions lead_;
  std::string error_;
};

// The element types a back end supports, in the order its contract lists them.
template <size_t N> using TypeList = const xla::ffi::DataType (&)[N];

template <size_t N> bool is_supported(TypeList<N> types, xla::ffi::DataType t) {
  for (xla::ffi::DataType s : types)
    if (s == t) return true;
  return false;
}

// "float32, bfloat16 or float16", for the messages.
template <size_t N> std::string type_names(TypeList<N> types) {
  std::string text;
  for (size_t i = 0; i < N; ++i)
    text += (i == 0 ? "" : i + 1 == N ? " or " : ", ") + type_name(types[i]);
  return text;
}

// Checks the attributes and q, k, v against the element types a back end supports
// (`supported`, listed in `supported_names` for the message); on success fills `g` and
// returns "".
template <typename Supported>
std::string check_inputs(const xla::ffi::AnyBuffer& q, const xla::ffi::AnyBuffer& k,
                         const xla::ffi::AnyBuffer& v, int64_t kernel_size, int64_t scale,
                         int64_t normalizer, int64_t border, double eps,
                         const Supported& supported, const char* supported_names, Geometry* g) {
  std::string error = check_attributes(kernel_size, scale, normalizer, border, eps);
  if (!error.empty()) return error;
  if (kernel_size > kMaxKernelSize)
    return "kernel_size must be <= " + std::to_string(kMaxKernelSize) + ", got " +
           std::to_string(kernel_size);
  if (scale > kMaxScale)
    return "scale must be <= " + std::to_string(kMaxScale) + ", got " + std::to_string(scale);
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() < 4)
    return "q must have rank >= 4 (..., height, width, channels), got shape " + describe(qd);
  if (kd.size() != qd.size() || vd.size() != qd.size())
    return "q, k and v must have the same rank, got shapes " + describe(qd) + ", " +
           describe(kd) + ", " + describe(vd);
  if (!supported(q.element_type()))
    return std::string("q must have element type ") + supported_names + ", got " +
           type_name(q.element_type());
  const size_t lead = qd.size() - 3;
  const int64_t H = kd[lead], W = kd[lead + 1], d = kd[lead + 2], C = vd[lead + 2];
  Validator check(q);
  check.expect("q", q, H * scale, W * scale, d, q.element_type());
  check.expect("k", k, H, W, d, q.element_type());
  check.expect("v", v, H, W, C, q.element_type());
  if (!check.error().empty()) return check.error();
  int64_t n = 1;
  for (size_t i = 0; i < lead; ++i) n *= qd[i];
  *g = Geometry{n, H, W, scale, kernel_size, kernel_size / 2, d, C};
  return std::string();
}

// The same for a back end's list of supported types.
template <size_t N>
std::string check_inputs(const xla::ffi::AnyBuffer& q, const xla::ffi::AnyBuffer& k,
                         const xla::ffi::AnyBuffer& v, int64_t kernel_size, int64_t scale,
                         int64_t normalizer, int64_t border, double eps, TypeList<N> types,
                         Geometry* g) {
  return check_inputs(
      q, k, v, kernel_size, scale, normalizer, border, eps,
      [&](xla::ffi::DataType t) { return is_supported(types, t); }, type_names(types).c_str(), g);
}

// The outputs of a forward call; "" when they match.
inline std::string check_forward_outputs(const xla::ffi::AnyBuffer& q, const Geometry& g,
                                         const xla::ffi::AnyBuffer& out,
                                         const xla::ffi::AnyBuffer& stats) {
  Validator check(q);
  check.expect("out", out, g.oH(), g.oW(), g.C, q.element_type());
  check.expect("stats", stats, g.oH(), g.oW(), 2, acc_type(q.element_type()));
  return check.error();
}

// The other inputs and the outputs of a backward call; "" when they match.
inline std::string check_backward_buffers(
    const xla::ffi::AnyBuffer& q, const Geometry& g, const xla::ffi::AnyBuffer& stats,
    const xla::ffi::AnyBuffer& gout, const xla::ffi::AnyBuffer& dq,
    const xla::ffi::AnyBuffer& dk, const xla::ffi::AnyBuffer& dv,
    const xla::ffi::AnyBuffer& w_scratch, const xla::ffi::AnyBuffer& dlogit_scratch) {
  const xla::ffi::DataType t = q.element_type(), a = acc_type(t);
  Validator check(q);
  check.expect("stats", stats, g.oH(), g.oW(), 2, a);
  check.expect("g", gout, g.oH(), g.oW(), g.C, t);
  check.expect("dq", dq, g.oH(), g.oW(), g.d, t);
  check.expect("dk", dk, g.H, g.W, g.d, t);
  check.expect("dv", dv, g.H, g.W, g.C, t);
  check.expect("w_scratch", w_scratch, g.oH(), g.oW(), g.taps(), a);
  check.expect("dlogit_scratch", dlogit_scratch, g.oH(), g.oW(), g.taps(), a);
  return check.error();
}

}  // namespace sapa

#endif  // SAPA_JAX_XLA_FFI_SAPA_VALIDATE_H_

// SAPA-D argument checks shared by the CPU and CUDA handlers (host code; docs/design.md §6).
// Shapes are (leading..., height, width, channels); every leading dim goes to the batch n.
// H, W come from k; q and offsets must be (..., s H, s W, .), v (..., H, W, C), C % G == 0.
#ifndef SAPA_JAX_XLA_FFI_DEFORM_VALIDATE_H_
#define SAPA_JAX_XLA_FFI_DEFORM_VALIDATE_H_

#include <cstdint>
#include <string>

#include "deform_common.h"
#include "sapa_validate.h"
#include "xla/ffi/api/ffi.h"

namespace sapa {

// On success fills `g` and returns "".
template <typename Supported>
std::string check_deform_inputs(const xla::ffi::AnyBuffer& q, const xla::ffi::AnyBuffer& k,
                                const xla::ffi::AnyBuffer& v, const xla::ffi::AnyBuffer& offsets,
                                int64_t num_points, int64_t groups, int64_t scale,
                                const Supported& supported, const char* supported_names,
                                DeformGeometry* g) {
  std::string error = check_deform_attributes(num_points, groups, scale);
  if (!error.empty()) return error;
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() < 4)
    return "q must have rank >= 4 (..., height, width, channels), got shape " + describe(qd);
  if (kd.size() != qd.size() || vd.size() != qd.size() || offsets.dimensions().size() != qd.size())
    return "q, k, v and offsets must have the same rank, got shapes " + describe(qd) + ", " +
           describe(kd) + ", " + describe(vd) + ", " + describe(offsets.dimensions());
  if (!supported(q.element_type()))
    return std::string("q must have element type ") + supported_names + ", got " +
           type_name(q.element_type());
  const size_t lead = qd.size() - 3;
  const int64_t H = kd[lead], W = kd[lead + 1], d = kd[lead + 2], C = vd[lead + 2];
  if (d % groups != 0)
    return "q and k channels must be divisible by groups=" + std::to_string(groups) + ", got " +
           std::to_string(d);
  if (C % groups != 0)
    return "v channels must be divisible by groups=" + std::to_string(groups) + ", got " +
           std::to_string(C);
  Validator check(q);
  check.expect("q", q, H * scale, W * scale, d, q.element_type());
  check.expect("k", k, H, W, d, q.element_type());
  check.expect("v", v, H, W, C, q.element_type());
  check.expect("offsets", offsets, H * scale, W * scale, groups * num_points * 2,
               q.element_type());
  if (!check.error().empty()) return check.error();
  int64_t n = 1;
  for (size_t i = 0; i < lead; ++i) n *= qd[i];
  *g = DeformGeometry{n, H, W, scale, num_points, groups, d / groups, C / groups};
  return std::string();
}

inline std::string check_deform_backward_buffers(
    const xla::ffi::AnyBuffer& q, const DeformGeometry& g, const xla::ffi::AnyBuffer& gout,
    const xla::ffi::AnyBuffer& dq, const xla::ffi::AnyBuffer& dk, const xla::ffi::AnyBuffer& dv,
    const xla::ffi::AnyBuffer& doffsets) {
  const xla::ffi::DataType t = q.element_type();
  Validator check(q);
  check.expect("g", gout, g.oH(), g.oW(), g.C(), t);
  check.expect("dq", dq, g.oH(), g.oW(), g.qk_dim(), t);
  check.expect("dk", dk, g.H, g.W, g.qk_dim(), t);
  check.expect("dv", dv, g.H, g.W, g.C(), t);
  check.expect("doffsets", doffsets, g.oH(), g.oW(), g.off_dim(), t);
  return check.error();
}

}  // namespace sapa

#endif  // SAPA_JAX_XLA_FFI_DEFORM_VALIDATE_H_

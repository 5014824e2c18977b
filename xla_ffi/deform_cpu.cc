// SAPA-D fused kernels for XLA:CPU: the FFI handlers (docs/design.md §6; the passes are in
// cpu/deform_passes.h, the per-sample math in deform_common.h, the checks in deform_validate.h).
//
//   sapa_deform_forward(q, k, v, offsets) -> out
//   sapa_deform_backward(q, k, v, offsets, g) -> (dq, dk, dv, doffsets)
//
// with int64 attributes num_points, groups, scale; all buffers share one element type (F32,
// F64, BF16, F16), accumulation in F64 for F64 and F32 otherwise.
#include <cstdint>
#include <string>

#include "cpu/deform_passes.h"
#include "cpu/handler.h"
#include "cpu/types.h"
#include "deform_common.h"
#include "deform_handlers.h"
#include "deform_validate.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using sapa::DeformGeometry;
using sapa::cpu::DeformKernel;
using sapa::cpu::dispatch_dtype;
using sapa::cpu::kSupportedNames;
using sapa::cpu::supported_dtype;

// The band buffers of the backward (see deform_passes.h): above this the bands are fewer.
constexpr int64_t kMaxBandBytes = int64_t(1) << 29;


template <typename T> const T* in(const ffi::AnyBuffer& x) {
  return static_cast<const T*>(x.untyped_data());
}
template <typename T> T* out(ffi::Result<ffi::AnyBuffer>& x) {
  return static_cast<T*>(x->untyped_data());
}

ffi::Error DeformForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                             ffi::AnyBuffer v, ffi::AnyBuffer offsets,
                             ffi::Result<ffi::AnyBuffer> result, int64_t num_points,
                             int64_t groups, int64_t scale) {
  DeformGeometry g{};
  std::string error = sapa::check_deform_inputs(q, k, v, offsets, num_points, groups, scale,
                                                supported_dtype, kSupportedNames, &g);
  if (error.empty()) {
    sapa::Validator check(q);
    check.expect("out", *result, g.oH(), g.oW(), g.C(), q.element_type());
    error = check.error();
  }
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_deform_forward: " + error);
  return dispatch_dtype("SAPA-D", q.element_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    DeformKernel<T, A>{g}.forward(pool, in<T>(q), in<T>(k), in<T>(v),
                                                   in<T>(offsets), out<T>(result));
  });
}

ffi::Error DeformBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                              ffi::AnyBuffer v, ffi::AnyBuffer offsets, ffi::AnyBuffer gout,
                              ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                              ffi::Result<ffi::AnyBuffer> dv,
                              ffi::Result<ffi::AnyBuffer> doffsets, int64_t num_points,
                              int64_t groups, int64_t scale) {
  DeformGeometry g{};
  std::string error = sapa::check_deform_inputs(q, k, v, offsets, num_points, groups, scale,
                                                supported_dtype, kSupportedNames, &g);
  if (error.empty())
    error = sapa::check_deform_backward_buffers(q, g, gout, *dq, *dk, *dv, *doffsets);
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_deform_backward: " + error);
  return dispatch_dtype("SAPA-D", q.element_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    DeformKernel<T, A>{g}.backward(
        pool, in<T>(q), in<T>(k), in<T>(v), in<T>(offsets), in<T>(gout), out<T>(dq),
        out<T>(dk), out<T>(dv), out<T>(doffsets), kMaxBandBytes);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SapaDeformForwardCpu, DeformForwardImpl,
                              sapa::bind_deform_forward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SapaDeformBackwardCpu, DeformBackwardImpl,
                              sapa::bind_deform_backward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

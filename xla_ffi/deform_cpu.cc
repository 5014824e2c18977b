// SAPA-D fused kernels for XLA:CPU: the FFI handlers (docs/design.md §6; the passes are in
// cpu/deform_passes.h, the per-sample math in deform_common.h, the checks in deform_validate.h).
//
//   sapa_deform_forward(q, k, v, offsets) -> out
//   sapa_deform_backward(q, k, v, offsets, g) -> (dq, dk, dv, doffsets)
//
// with int64 attributes num_points, groups, scale; all buffers share one element type (F32,
// F64, BF16, F16), accumulation in F64 for F64 and F32 otherwise.
#include <cstdint>
#include <exception>
#include <new>
#include <string>

#include "cpu/deform_passes.h"
#include "cpu/types.h"
#include "deform_common.h"
#include "deform_handlers.h"
#include "deform_validate.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using sapa::DeformGeometry;
using sapa::cpu::BF16;
using sapa::cpu::DeformKernel;
using sapa::cpu::F16;

// The band buffers of the backward (see deform_passes.h): above this the bands are fewer.
constexpr int64_t kMaxBandBytes = int64_t(1) << 29;

bool supported(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::F64 || t == ffi::DataType::BF16 ||
         t == ffi::DataType::F16;
}
constexpr const char* kSupportedNames = "float32, float64, bfloat16 or float16";

template <typename Fn> ffi::Error dispatch(ffi::DataType dtype, Fn&& fn) {
  try {
    switch (dtype) {
      case ffi::DataType::F32: fn(float(), float()); break;
      case ffi::DataType::F64: fn(double(), double()); break;
      case ffi::DataType::BF16: fn(BF16(), float()); break;
      case ffi::DataType::F16: fn(F16(), float()); break;
      default: return ffi::Error::InvalidArgument("unsupported element type");
    }
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "SAPA-D CPU kernel: out of memory");
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("SAPA-D CPU kernel: ") + err.what());
  }
  return ffi::Error::Success();
}

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
                                                supported, kSupportedNames, &g);
  if (error.empty()) {
    sapa::Validator check(q);
    check.expect("out", *result, g.oH(), g.oW(), g.C(), q.element_type());
    error = check.error();
  }
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_deform_forward: " + error);
  return dispatch(q.element_type(), [&](auto t, auto a) {
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
                                                supported, kSupportedNames, &g);
  if (error.empty())
    error = sapa::check_deform_backward_buffers(q, g, gout, *dq, *dk, *dv, *doffsets);
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_deform_backward: " + error);
  return dispatch(q.element_type(), [&](auto t, auto a) {
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

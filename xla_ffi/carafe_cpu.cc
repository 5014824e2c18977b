// FFI handlers of the fused CARAFE core for XLA:CPU (docs/design.md §5): validation, dtype
// dispatch and the handler symbols. The passes are in cpu/carafe_passes.h, on the CPU kernel
// layer's primitives (cpu/{types,simd,rows,parallel}.h).
#include <cstdint>
#include <string>

#include "carafe_common.h"
#include "carafe_handlers.h"
#include "cpu/carafe_passes.h"
#include "cpu/handler.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "cpu/types.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace sapa::cpu;  // NOLINT: the kernel's own primitives
using sapa::CarafeGeometry;


std::string check_inputs(const ffi::AnyBuffer& x, const ffi::AnyBuffer& logits,
                         int64_t kernel_size, int64_t scale, int64_t groups, int64_t normalizer,
                         double eps, CarafeGeometry* g) {
  std::string error = sapa::check_carafe_inputs(x, logits, kernel_size, scale, groups,
                                                normalizer, eps, supported_dtype,
                                                kSupportedNames, g);
  if (!error.empty()) return error;
  // A worker holds a few (G*K*K, output width) rows and K band rows of x (C channels).
  const double lanes = double(g->oW() + kLanes + 2 * g->r * g->s);
  const double bytes = 8.0 * lanes * (6.0 * double(g->logit_channels()) +
                                      double(g->K) * double(g->C) + double(g->C));
  return thread_bytes_error(kernel_size, g->oW(), bytes);
}

ffi::Error CarafeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer logits,
                             ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> stats,
                             int64_t kernel_size, int64_t scale, int64_t groups,
                             int64_t normalizer, double eps) {
  CarafeGeometry g{};
  std::string error = check_inputs(x, logits, kernel_size, scale, groups, normalizer, eps, &g);
  if (error.empty()) error = sapa::check_carafe_forward_outputs(x, g, *out, *stats);
  if (!error.empty()) return ffi::Error::InvalidArgument("carafe_forward: " + error);
  return dispatch_dtype("CARAFE", x.element_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    CarafeKernel<T, A>(g, normalizer, eps)
        .forward(pool, static_cast<const T*>(x.untyped_data()),
                 static_cast<const T*>(logits.untyped_data()),
                 static_cast<T*>(out->untyped_data()), static_cast<A*>(stats->untyped_data()));
  });
}

ffi::Error CarafeBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer logits,
                              ffi::AnyBuffer stats, ffi::AnyBuffer gout,
                              ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dlogits,
                              ffi::Result<ffi::AnyBuffer> w, int64_t kernel_size, int64_t scale,
                              int64_t groups, int64_t normalizer, double eps) {
  CarafeGeometry g{};
  std::string error = check_inputs(x, logits, kernel_size, scale, groups, normalizer, eps, &g);
  if (error.empty())
    error = sapa::check_carafe_backward_buffers(x, g, stats, gout, *dx, *dlogits, *w);
  if (!error.empty()) return ffi::Error::InvalidArgument("carafe_backward: " + error);
  return dispatch_dtype("CARAFE", x.element_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    CarafeKernel<T, A>(g, normalizer, eps)
        .backward(pool, static_cast<const T*>(x.untyped_data()),
                  static_cast<const T*>(logits.untyped_data()),
                  static_cast<const A*>(stats.untyped_data()),
                  static_cast<const T*>(gout.untyped_data()),
                  static_cast<T*>(dx->untyped_data()), static_cast<T*>(dlogits->untyped_data()),
                  static_cast<A*>(w->untyped_data()));
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CarafeForwardCpu, CarafeForwardImpl,
                              sapa::bind_carafe_forward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CarafeBackwardCpu, CarafeBackwardImpl,
                              sapa::bind_carafe_backward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

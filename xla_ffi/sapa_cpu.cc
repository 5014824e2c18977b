// FFI handlers of the fused SAPA core for XLA:CPU (docs/design.md §1 and §3): validation,
// dtype dispatch and the handler symbols. The passes are in cpu/sapa_passes.h, their
// primitives in cpu/{types,simd,rows,parallel}.h.
#include <algorithm>
#include <cstdint>
#include <exception>
#include <new>
#include <string>

#include "cpu/parallel.h"
#include "cpu/sapa_passes.h"
#include "cpu/simd.h"
#include "cpu/types.h"
#include "sapa_common.h"
#include "sapa_handlers.h"
#include "sapa_validate.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace sapa::cpu;  // NOLINT: the kernel's own primitives
using sapa::Geometry;

// ----------------------------------------------------------------------------------------------
// Validation: sapa_validate.h, plus the one limit of this back end's own.

constexpr double kMaxThreadBytes = double(1 << 30);  // per-thread row buffers (see Work)

bool supported(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::F64 || t == ffi::DataType::BF16 ||
         t == ffi::DataType::F16;
}
constexpr const char* kSupportedNames = "float32, float64, bfloat16 or float16";

std::string check_inputs(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                         const ffi::AnyBuffer& v, int64_t kernel_size, int64_t scale,
                         int64_t normalizer, int64_t border, double eps, Geometry* g) {
  std::string error = sapa::check_inputs(q, k, v, kernel_size, scale, normalizer, border, eps,
                                         supported, kSupportedNames, g);
  if (!error.empty()) return error;
  // A worker holds a few (K*K, output width) rows and K band rows of k and v; refuse sizes
  // whose buffers would be absurd rather than die allocating them.
  const double lanes = double(g->oW() + kLanes + 2 * g->r * g->s);
  const double bytes =
      8.0 * lanes * (6.0 * double(g->taps()) + double(g->K) * double(g->d + g->C));
  if (bytes > kMaxThreadBytes)
    return "kernel_size " + std::to_string(kernel_size) + " with an output width of " +
           std::to_string(g->oW()) + " needs " + std::to_string(int64_t(bytes / (1 << 20))) +
           " MiB of buffers per thread in the CPU kernel (limit " +
           std::to_string(int64_t(kMaxThreadBytes) >> 20) + " MiB)";
  return std::string();
}

template <typename Fn>
ffi::Error dispatch(ffi::DataType dtype, Fn&& fn) {
  try {
    switch (dtype) {
      case ffi::DataType::F32: fn(float(), float()); break;
      case ffi::DataType::F64: fn(double(), double()); break;
      case ffi::DataType::BF16: fn(BF16(), float()); break;
      case ffi::DataType::F16: fn(F16(), float()); break;
      default: return ffi::Error::InvalidArgument("unsupported element type");
    }
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "SAPA CPU kernel: out of memory");
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("SAPA CPU kernel: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error SapaForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v,
                           ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> stats,
                           int64_t kernel_size, int64_t scale, int64_t normalizer, int64_t border,
                           double eps) {
  Geometry g{};
  std::string error = check_inputs(q, k, v, kernel_size, scale, normalizer, border, eps, &g);
  if (error.empty()) error = sapa::check_forward_outputs(q, g, *out, *stats);
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_forward: " + error);
  const Options o{normalizer, border, eps};
  return dispatch(q.element_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    Kernel<T, A>(g, o).forward(
        pool, static_cast<const T*>(q.untyped_data()), static_cast<const T*>(k.untyped_data()),
        static_cast<const T*>(v.untyped_data()), static_cast<T*>(out->untyped_data()),
        static_cast<A*>(stats->untyped_data()));
  });
}

ffi::Error SapaBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v,
                            ffi::AnyBuffer stats, ffi::AnyBuffer gout,
                            ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                            ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> w,
                            ffi::Result<ffi::AnyBuffer> dlogit, int64_t kernel_size,
                            int64_t scale, int64_t normalizer, int64_t border, double eps) {
  Geometry g{};
  std::string error = check_inputs(q, k, v, kernel_size, scale, normalizer, border, eps, &g);
  if (error.empty())
    error = sapa::check_backward_buffers(q, g, stats, gout, *dq, *dk, *dv, *w, *dlogit);
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_backward: " + error);
  const Options o{normalizer, border, eps};
  return dispatch(q.element_type(), [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    Kernel<T, A>(g, o).backward(
        pool, static_cast<const T*>(q.untyped_data()), static_cast<const T*>(k.untyped_data()),
        static_cast<const T*>(v.untyped_data()), static_cast<const A*>(stats.untyped_data()),
        static_cast<const T*>(gout.untyped_data()), static_cast<T*>(dq->untyped_data()),
        static_cast<T*>(dk->untyped_data()), static_cast<T*>(dv->untyped_data()),
        static_cast<A*>(w->untyped_data()), static_cast<A*>(dlogit->untyped_data()));
  });
}

}  // namespace

namespace sapa {
void set_cpu_max_workers(int64_t workers) {
  sapa::cpu::max_workers_setting.store(std::max<int64_t>(workers, 0));
}
}  // namespace sapa

// XLA's intra-op thread pool, then the signature shared with the CUDA handlers
// (sapa_handlers.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(SapaForwardCpu, SapaForwardImpl,
                              sapa::bind_forward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SapaBackwardCpu, SapaBackwardImpl,
                              sapa::bind_backward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

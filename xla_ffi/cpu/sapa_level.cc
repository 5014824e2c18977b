// SAPA's CPU passes at one SIMD level (cpu/levels.h): compiled once per level by CMakeLists.txt
// with SAPA_CPU_ISA = the level's name, SAPA_CPU_VECTOR_BYTES and the level's -m flags.
#include <stdexcept>

#include "cpu/types.h"  // first: it opens the inline namespace of this level
#include "cpu/levels.h"
#include "cpu/sapa_passes.h"

namespace sapa::cpu {
inline namespace SAPA_CPU_ISA {
namespace {

template <typename Fn> void by_type(xla::ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case xla::ffi::DataType::F32: fn(float()); break;
    case xla::ffi::DataType::F64: fn(double()); break;
    case xla::ffi::DataType::BF16: fn(BF16()); break;
    case xla::ffi::DataType::F16: fn(F16()); break;
    default: throw std::invalid_argument("unsupported element type");
  }
}

}  // namespace

void sapa_forward(const PassCall& call, const void* q, const void* k, const void* v, void* out,
                  void* stats) {
  by_type(call.dtype, [&](auto t) {
    using T = decltype(t);
    using A = Acc<T>;
    Kernel<T, A>(call.g, Options{call.normalizer, call.border, call.eps})
        .forward(*call.pool, static_cast<const T*>(q), static_cast<const T*>(k),
                 static_cast<const T*>(v), static_cast<T*>(out), static_cast<A*>(stats));
  });
}

void sapa_backward(const PassCall& call, const void* q, const void* k, const void* v,
                   const void* stats, const void* gout, void* dq, void* dk, void* dv,
                   void* w_scratch, void* dlogit_scratch) {
  by_type(call.dtype, [&](auto t) {
    using T = decltype(t);
    using A = Acc<T>;
    Kernel<T, A>(call.g, Options{call.normalizer, call.border, call.eps})
        .backward(*call.pool, static_cast<const T*>(q), static_cast<const T*>(k),
                  static_cast<const T*>(v), static_cast<const A*>(stats),
                  static_cast<const T*>(gout), static_cast<T*>(dq), static_cast<T*>(dk),
                  static_cast<T*>(dv), static_cast<A*>(w_scratch),
                  static_cast<A*>(dlogit_scratch));
  });
}

}  // namespace SAPA_CPU_ISA
}  // namespace sapa::cpu

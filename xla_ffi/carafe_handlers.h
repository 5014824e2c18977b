// FFI handler symbols of the fused CARAFE core (docs/design.md §5; layout in carafe_common.h).
// Both back ends bind the same signature:
//
//   carafe_forward(x, logits) -> (out, stats)
//   carafe_backward(x, logits, stats, g) -> (dx, dlogits, w_scratch)
//
// with typed attributes kernel_size: int64, scale: int64, groups: int64, normalizer: int64
// (sapa::Normalizer), eps: float64. x, logits, out, g, dx, dlogits share one element type;
// stats and w_scratch are in the accumulation type (sapa_handlers.h).
#ifndef SAPA_JAX_XLA_FFI_CARAFE_HANDLERS_H_
#define SAPA_JAX_XLA_FFI_CARAFE_HANDLERS_H_

#include <cstdint>
#include <utility>

#include "xla/ffi/api/api.h"
#include "xla/ffi/api/ffi.h"

namespace sapa {

template <typename Binding> auto bind_carafe_attributes(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("kernel_size")
      .template Attr<int64_t>("scale")
      .template Attr<int64_t>("groups")
      .template Attr<int64_t>("normalizer")
      .template Attr<double>("eps");
}

template <typename Binding> auto bind_carafe_forward(Binding binding) {
  using xla::ffi::AnyBuffer;
  return bind_carafe_attributes(std::move(binding).template Arg<AnyBuffer>()  // x
                                    .template Arg<AnyBuffer>()     // logits
                                    .template Ret<AnyBuffer>()     // out
                                    .template Ret<AnyBuffer>());   // stats
}

template <typename Binding> auto bind_carafe_backward(Binding binding) {
  using xla::ffi::AnyBuffer;
  return bind_carafe_attributes(std::move(binding).template Arg<AnyBuffer>()  // x
                                    .template Arg<AnyBuffer>()     // logits
                                    .template Arg<AnyBuffer>()     // stats
                                    .template Arg<AnyBuffer>()     // g
                                    .template Ret<AnyBuffer>()     // dx
                                    .template Ret<AnyBuffer>()     // dlogits
                                    .template Ret<AnyBuffer>());   // w_scratch
}

}  // namespace sapa

XLA_FFI_DECLARE_HANDLER_SYMBOL(CarafeForwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CarafeBackwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CarafeForwardCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CarafeBackwardCuda);

#endif  // SAPA_JAX_XLA_FFI_CARAFE_HANDLERS_H_

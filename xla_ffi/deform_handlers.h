// FFI handler symbols of the SAPA-D kernels (docs/design.md §6). Both back ends bind the same
// signature:
//
//   sapa_deform_forward(q, k, v, offsets) -> out
//   sapa_deform_backward(q, k, v, offsets, g) -> (dq, dk, dv, doffsets)
//
// with int64 attributes num_points, groups, scale. All buffers share one element type.
#ifndef SAPA_JAX_XLA_FFI_DEFORM_HANDLERS_H_
#define SAPA_JAX_XLA_FFI_DEFORM_HANDLERS_H_

#include <cstdint>
#include <utility>

#include "xla/ffi/api/api.h"
#include "xla/ffi/api/ffi.h"

namespace sapa {

template <typename Binding> auto bind_deform_attributes(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("num_points")
      .template Attr<int64_t>("groups")
      .template Attr<int64_t>("scale");
}

template <typename Binding> auto bind_deform_forward(Binding binding) {
  using xla::ffi::AnyBuffer;
  return bind_deform_attributes(std::move(binding).template Arg<AnyBuffer>()  // q
                                    .template Arg<AnyBuffer>()     // k
                                    .template Arg<AnyBuffer>()     // v
                                    .template Arg<AnyBuffer>()     // offsets
                                    .template Ret<AnyBuffer>());   // out
}

template <typename Binding> auto bind_deform_backward(Binding binding) {
  using xla::ffi::AnyBuffer;
  return bind_deform_attributes(std::move(binding).template Arg<AnyBuffer>()  // q
                                    .template Arg<AnyBuffer>()     // k
                                    .template Arg<AnyBuffer>()     // v
                                    .template Arg<AnyBuffer>()     // offsets
                                    .template Arg<AnyBuffer>()     // g
                                    .template Ret<AnyBuffer>()     // dq
                                    .template Ret<AnyBuffer>()     // dk
                                    .template Ret<AnyBuffer>()     // dv
                                    .template Ret<AnyBuffer>());   // doffsets
}

}  // namespace sapa

XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaDeformForwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaDeformBackwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaDeformForwardCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaDeformBackwardCuda);

#endif  // SAPA_JAX_XLA_FFI_DEFORM_HANDLERS_H_

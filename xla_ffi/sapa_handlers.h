// FFI handler symbols of the SAPA kernels. Both back ends bind the same signature:
//
//   sapa_forward(q, k, v) -> (out, stats)
//   sapa_backward(q, k, v, stats, g) -> (dq, dk, dv, w_scratch, dlogit_scratch)
//
// with typed attributes kernel_size: int64, scale: int64, normalizer: int64 (sapa::Normalizer),
// border: int64 (sapa::Border), eps: float64 (so that float64 callers get their eps unrounded).
// The CPU handlers also take XLA's intra-op thread pool from the FFI context, the CUDA ones
// XLA's stream. q, k, v, out, g, dq, dk, dv share one element type
// (F32, BF16, F16; F64 on CPU); stats and the two scratch buffers are in the accumulation type
// (F64 for F64 inputs, else F32). Scratch buffers hold n*sH*sW*K*K elements: the per-point
// weights and logit gradients written by the first backward pass and gathered by the second, in
// each back end's own order (CUDA (n, sH, sW, K*K); CPU (n, H, W, K*K, s, s), gather order;
// Python drops them). Any number of
// leading dims is flattened into the batch (that is what vmap's broadcast_all produces).
#ifndef SAPA_JAX_XLA_FFI_SAPA_HANDLERS_H_
#define SAPA_JAX_XLA_FFI_SAPA_HANDLERS_H_

#include <cstdint>
#include <utility>

#include "xla/ffi/api/api.h"
#include "xla/ffi/api/ffi.h"

namespace sapa {

// The one FFI signature of both back ends, so CPU and CUDA cannot drift apart: `binding` is
// ffi::Ffi::Bind(), with the CUDA stream context already bound on that back end. Binding's
// methods take *this as an rvalue, hence the moves.
template <typename Binding> auto bind_attributes(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("kernel_size")
      .template Attr<int64_t>("scale")
      .template Attr<int64_t>("normalizer")
      .template Attr<int64_t>("border")
      .template Attr<double>("eps");
}

template <typename Binding> auto bind_forward(Binding binding) {
  using xla::ffi::AnyBuffer;
  return bind_attributes(std::move(binding).template Arg<AnyBuffer>()  // q
                             .template Arg<AnyBuffer>()     // k
                             .template Arg<AnyBuffer>()     // v
                             .template Ret<AnyBuffer>()     // out
                             .template Ret<AnyBuffer>());   // stats
}

template <typename Binding> auto bind_backward(Binding binding) {
  using xla::ffi::AnyBuffer;
  return bind_attributes(std::move(binding).template Arg<AnyBuffer>()  // q
                             .template Arg<AnyBuffer>()     // k
                             .template Arg<AnyBuffer>()     // v
                             .template Arg<AnyBuffer>()     // stats
                             .template Arg<AnyBuffer>()     // g
                             .template Ret<AnyBuffer>()     // dq
                             .template Ret<AnyBuffer>()     // dk
                             .template Ret<AnyBuffer>()     // dv
                             .template Ret<AnyBuffer>()     // w_scratch
                             .template Ret<AnyBuffer>());   // dlogit_scratch
}

// Test-only settings of the compiled modules, set from Python through their pybind11 functions
// (nothing in xla_ffi/ reads the environment). CPU: the most workers one call splits its work
// over (0: the thread pool's size plus the calling thread).
void set_cpu_max_workers(int64_t workers);
// CUDA tile planner: every call takes the simple kernels; tiles capped at cap x cap centres;
// channel_split n > 0: the v2 kernels split each tile's channels over n blocks (at most one per
// channel chunk), 0: as the cost model decides.
struct PlannerSettings {
  bool force_simple = false;
  int tile_cap = 1 << 20;
  int channel_split = 0;
};
void set_cuda_planner(const PlannerSettings& settings);
// Kernel generation of the CUDA module (cuda/v2_plan.h): 2 (default) the specialised kernels
// where they apply, 1 the generic kernels only. Returns the previous generation; throws
// std::invalid_argument for anything but 1 or 2.
int set_cuda_kernel_generation(int generation);

}  // namespace sapa

XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaForwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaBackwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaForwardCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaBackwardCuda);

#endif  // SAPA_JAX_XLA_FFI_SAPA_HANDLERS_H_

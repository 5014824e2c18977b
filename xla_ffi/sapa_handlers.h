// FFI handler symbols of the SAPA kernels. Both back ends bind the same signature:
//
//   sapa_forward(q, k, v) -> (out, stats)
//   sapa_backward(q, k, v, stats, g) -> (dq, dk, dv, w_scratch, dlogit_scratch)
//
// with typed attributes kernel_size: int64, scale: int64, normalizer: int64 (sapa::Normalizer),
// border: int64 (sapa::Border), eps: float32. q, k, v, out, g, dq, dk, dv share one element type
// (F32, BF16, F16; F64 on CPU); stats and the two scratch buffers are in the accumulation type
// (F64 for F64 inputs, else F32). Scratch buffers are (n, sH, sW, K*K): the per-point weights and
// logit gradients written by the first backward pass and gathered by the second. Any number of
// leading dims is flattened into the batch (that is what vmap's broadcast_all produces).
#ifndef SAPA_JAX_XLA_FFI_SAPA_HANDLERS_H_
#define SAPA_JAX_XLA_FFI_SAPA_HANDLERS_H_

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaForwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaBackwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaForwardCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(SapaBackwardCuda);

#endif  // SAPA_JAX_XLA_FFI_SAPA_HANDLERS_H_

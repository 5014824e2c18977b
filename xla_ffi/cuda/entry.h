// Entry points of the CUDA back end, defined in sapa_cuda.cu: validation (sapa_validate.h),
// planning (plan.h) and the launches of one forward or backward call on XLA's stream. The FFI
// handlers SapaForwardCuda / SapaBackwardCuda bind exactly these (sapa_handlers.h); the CPU
// emulator of the kernels (tests/cuda_emulator/) calls them through this header.
#ifndef SAPA_JAX_XLA_FFI_CUDA_ENTRY_H_
#define SAPA_JAX_XLA_FFI_CUDA_ENTRY_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace sapa::cuda {

// The element types of q, k, v (the contract's dtypes and the validation's list).
inline constexpr xla::ffi::DataType kSupportedTypes[] = {
    xla::ffi::DataType::F32, xla::ffi::DataType::BF16, xla::ffi::DataType::F16};

// sapa_forward(q, k, v) -> (out, stats)
xla::ffi::Error forward(cudaStream_t stream, xla::ffi::AnyBuffer q, xla::ffi::AnyBuffer k,
                        xla::ffi::AnyBuffer v, xla::ffi::Result<xla::ffi::AnyBuffer> out,
                        xla::ffi::Result<xla::ffi::AnyBuffer> stats, int64_t kernel_size,
                        int64_t scale, int64_t normalizer, int64_t border, double eps);

// sapa_backward(q, k, v, stats, g) -> (dq, dk, dv, w_scratch, dlogit_scratch)
xla::ffi::Error backward(cudaStream_t stream, xla::ffi::AnyBuffer q, xla::ffi::AnyBuffer k,
                         xla::ffi::AnyBuffer v, xla::ffi::AnyBuffer stats, xla::ffi::AnyBuffer g,
                         xla::ffi::Result<xla::ffi::AnyBuffer> dq,
                         xla::ffi::Result<xla::ffi::AnyBuffer> dk,
                         xla::ffi::Result<xla::ffi::AnyBuffer> dv,
                         xla::ffi::Result<xla::ffi::AnyBuffer> w_scratch,
                         xla::ffi::Result<xla::ffi::AnyBuffer> dlogit_scratch,
                         int64_t kernel_size, int64_t scale, int64_t normalizer, int64_t border,
                         double eps);

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_ENTRY_H_

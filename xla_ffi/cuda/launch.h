// Host helpers of the simple (grid-stride) CUDA kernels of CARAFE and SAPA-D: the grid size and
// the error of the last launch.
#ifndef SAPA_JAX_XLA_FFI_CUDA_LAUNCH_H_
#define SAPA_JAX_XLA_FFI_CUDA_LAUNCH_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/runtime.h"
#include "xla/ffi/api/ffi.h"

namespace sapa::cuda {

// Grid of a grid-stride kernel on the stream's device: enough blocks to fill it a few times over
// (its multiprocessors queried once per device, cuda/runtime.h; 1 if they cannot be).
inline unsigned grid_for(cudaStream_t stream, int64_t work_items, int per_block) {
  DeviceLimits dev;
  const int sms = device_limits(stream, &dev).empty() ? dev.sms : 1;
  const int64_t needed = (work_items + per_block - 1) / per_block;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(needed, int64_t{std::max(sms, 1)} * 32)));
}

// The error of the last launch of `kernel`, if any, naming the operator.
inline xla::ffi::Error launch_error(const char* op, const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return xla::ffi::Error::Success();
  return xla::ffi::Error::Internal(std::string(op) + " CUDA " + kernel +
                                   " launch failed: " + cudaGetErrorString(err));
}

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_LAUNCH_H_

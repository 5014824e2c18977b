// What the CPU handlers of every operator share (sapa_cpu.cc, carafe_cpu.cc, deform_cpu.cc):
// the one list of element types, the per-thread buffer limit and its message, and the dtype
// dispatch that turns what a pass throws into an ffi::Error instead of a crashed process.
#ifndef SAPA_JAX_XLA_FFI_CPU_HANDLER_H_
#define SAPA_JAX_XLA_FFI_CPU_HANDLER_H_

#include <cstdint>
#include <exception>
#include <new>
#include <string>

#include "cpu/types.h"
#include "xla/ffi/api/ffi.h"

namespace sapa::cpu {

// The element types of the CPU kernels (module_cpu.cc's contract names the same four).
inline bool supported_dtype(xla::ffi::DataType t) {
  using xla::ffi::DataType;
  return t == DataType::F32 || t == DataType::F64 || t == DataType::BF16 || t == DataType::F16;
}
constexpr const char* kSupportedNames = "float32, float64, bfloat16 or float16";

// A call whose per-thread row buffers would exceed this is refused rather than left to die
// allocating them.
constexpr double kMaxThreadBytes = double(1 << 30);

// "" when `bytes` of per-thread buffers are within kMaxThreadBytes, else the message.
inline std::string thread_bytes_error(int64_t kernel_size, int64_t out_width, double bytes) {
  if (bytes <= kMaxThreadBytes) return std::string();
  return "kernel_size " + std::to_string(kernel_size) + " with an output width of " +
         std::to_string(out_width) + " needs " + std::to_string(int64_t(bytes / (1 << 20))) +
         " MiB of buffers per thread in the CPU kernel (limit " +
         std::to_string(int64_t(kMaxThreadBytes) >> 20) + " MiB)";
}

// Runs fn() and turns what it throws into an ffi::Error naming `kernel` ("SAPA", "CARAFE"...).
template <typename Fn> xla::ffi::Error guarded(const char* kernel, Fn&& fn) {
  try {
    fn();
  } catch (const std::bad_alloc&) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kResourceExhausted,
                           std::string(kernel) + " CPU kernel: out of memory");
  } catch (const std::exception& err) {
    return xla::ffi::Error::Internal(std::string(kernel) + " CPU kernel: " + err.what());
  }
  return xla::ffi::Error::Success();
}

// guarded(kernel, fn(T(), A())) for the storage type T of `dtype` and its accumulation type A.
template <typename Fn>
xla::ffi::Error dispatch_dtype(const char* kernel, xla::ffi::DataType dtype, Fn&& fn) {
  using xla::ffi::DataType;
  if (!supported_dtype(dtype)) return xla::ffi::Error::InvalidArgument("unsupported element type");
  return guarded(kernel, [&] {
    switch (dtype) {
      case DataType::F64: fn(double(), double()); break;
      case DataType::BF16: fn(BF16(), float()); break;
      case DataType::F16: fn(F16(), float()); break;
      default: fn(float(), float());  // F32
    }
  });
}

}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_HANDLER_H_

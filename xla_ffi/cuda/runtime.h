// Host-side CUDA runtime state of the SAPA and CARAFE handlers: the device of XLA's stream, the
// device limits queried once per device, and the dynamic shared-memory opt-in set once per
// (device, kernel). Thread-safe; nothing here reads the environment or synchronises, so the
// handlers that use it can be captured into command buffers (CUDA graphs).
#ifndef SAPA_JAX_XLA_FFI_CUDA_RUNTIME_H_
#define SAPA_JAX_XLA_FFI_CUDA_RUNTIME_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <mutex>
#include <set>
#include <string>
#include <utility>

namespace sapa::cuda {

inline constexpr int kDefaultDynamicShared = 48 * 1024;  // above this a kernel needs an opt-in

struct DeviceLimits {
  int device = 0;
  int optin = kDefaultDynamicShared;  // max dynamic shared memory per block (opt-in)
  int per_sm = 100 * 1024;            // shared memory per multiprocessor
  int sms = 1;
};

// The device XLA's stream belongs to (not the calling thread's current device).
inline cudaError_t stream_device(cudaStream_t stream, int* device) {
#if CUDART_VERSION >= 12080
  return cudaStreamGetDevice(stream, device);
#else
  (void)stream;  // runtimes before 12.8 cannot ask the stream; XLA makes its device current
  return cudaGetDevice(device);
#endif
}

// The limits of the stream's device, queried once per device. "" on success, else what failed.
inline std::string device_limits(cudaStream_t stream, DeviceLimits* out) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached_optin[kMaxDevices];  // 0 = not queried yet
  static std::atomic<int> cached_per_sm[kMaxDevices];
  static std::atomic<int> cached_sms[kMaxDevices];
  int dev = 0;
  cudaError_t err = stream_device(stream, &dev);
  if (err != cudaSuccess)
    return std::string("cudaStreamGetDevice failed: ") + cudaGetErrorString(err);
  out->device = dev;
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if (cacheable && cached_optin[dev].load() > 0) {
    out->optin = cached_optin[dev].load();
    out->per_sm = cached_per_sm[dev].load();
    out->sms = cached_sms[dev].load();
    return std::string();
  }
  int optin = 0, per_sm = 0, sms = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess)
    return std::string("cudaDeviceGetAttribute failed: ") + cudaGetErrorString(err);
  out->optin = std::max(optin, kDefaultDynamicShared);
  out->per_sm = std::max(per_sm, out->optin);
  out->sms = std::max(sms, 1);
  if (cacheable) {  // racing first calls store the same values
    cached_per_sm[dev].store(out->per_sm);
    cached_sms[dev].store(out->sms);
    cached_optin[dev].store(out->optin);  // last: readers test it
  }
  return std::string();
}

// Lets `kernel` launch with up to the device's opt-in maximum of dynamic shared memory, set once
// per (device, kernel) (the attribute is the kernel's on the current device, which XLA makes the
// stream's). Launches needing no more than the default set nothing.
inline cudaError_t allow_dynamic_shared(const void* kernel, size_t bytes,
                                        const DeviceLimits& dev) {
  if (bytes <= static_cast<size_t>(kDefaultDynamicShared)) return cudaSuccess;
  static std::mutex mutex;
  static std::set<std::pair<int, const void*>> done;
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count({dev.device, kernel})) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dev.optin);
  if (err == cudaSuccess) done.insert({dev.device, kernel});
  return err;
}

}  // namespace sapa::cuda

#endif  // SAPA_JAX_XLA_FFI_CUDA_RUNTIME_H_

// Host runtime API used by sapa_cuda.cu and carafe_cuda.cu, answered by the emulator (see
// emu_core.h). Several devices with their own limits (emu::devices), streams that belong to one
// of them, and per-call counters of the queries the handlers make, so that tests can check that
// the device comes from the stream and that limits and opt-ins are asked once per device.
#pragma once
#include <map>
#include <utility>

#include "emu_core.h"

#define CUDART_VERSION 13000

typedef emu::Stream* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 4,
  cudaErrorInvalidDevice = 101,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor,
  cudaDevAttrMultiProcessorCount,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

inline cudaError_t cudaGetLastError() {
  const bool failed = !emu::last_error.empty();
  if (failed) emu::last_error_reported = emu::last_error;
  emu::last_error.clear();
  return failed ? cudaErrorLaunchFailure : cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t err) {
  if (err == cudaErrorInvalidDevice) return "invalid device ordinal";
  return err == cudaSuccess ? "no error" : emu::last_error_reported.c_str();
}
// The calling thread's current device; the handlers should not need it (counted).
inline cudaError_t cudaGetDevice(int* device) {
  ++emu::calls.get_device;
  *device = emu::current_device;
  return cudaSuccess;
}
// The device a stream belongs to; the legacy default stream (nullptr) is the current device's.
inline cudaError_t cudaStreamGetDevice(cudaStream_t stream, int* device) {
  ++emu::calls.stream_get_device;
  *device = stream ? stream->device : emu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= emu::kDevices) return cudaErrorInvalidDevice;
  ++emu::calls.device_attribute;
  const emu::Device& d = emu::devices[device];
  *value = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? d.optin
           : attr == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? d.per_sm
           : d.sms;
  return cudaSuccess;
}
// As on a GPU, the attribute applies to the kernel on the current device.
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute, int value) {
  ++emu::calls.func_set_attribute;
  ++emu::opt_in_calls[{emu::current_device, kernel}];
  if (value > emu::devices[emu::current_device].optin) return cudaErrorInvalidValue;
  emu::max_dynamic_shared[{emu::current_device, kernel}] = value;
  return cudaSuccess;
}

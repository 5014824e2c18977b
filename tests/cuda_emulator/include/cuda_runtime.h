// Host runtime API used by sapa_cuda.cu, answered by the emulator (see emu_core.h).
#pragma once
#include "emu_core.h"

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
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
  return err == cudaSuccess ? "no error" : emu::last_error_reported.c_str();
}
inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::kOptinShared
           : attr == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? emu::kSharedPerSm
           : emu::kSms;
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute, int value) {
  if (value > emu::kOptinShared) return cudaErrorInvalidValue;
  emu::max_dynamic_shared[kernel] = value;
  return cudaSuccess;
}

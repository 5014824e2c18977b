// The pybind11 side shared by the emulator modules (emu_module.cc: SAPA, carafe_emu_module.cc,
// deform_emu_module.cc): NumPy arrays as XLA_FFI_Buffers without copies, ffi::Error as a
// message ("" on success), XLA's scratch allocator answered from the host heap, and the
// emulator's controls (runtime state and launch log, schedule, dropped barrier).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "emu_core.h"
#include "runtime_bindings.h"
#include "xla/ffi/api/ffi.h"

namespace emu {

namespace py = pybind11;
namespace ffi = xla::ffi;

inline XLA_FFI_DataType dtype_of(const std::string& name) {
  if (name == "float32") return XLA_FFI_DataType_F32;
  if (name == "bfloat16") return XLA_FFI_DataType_BF16;
  if (name == "float16") return XLA_FFI_DataType_F16;
  if (name == "float64") return XLA_FFI_DataType_F64;
  throw std::invalid_argument("unsupported dtype " + name);
}

// Keeps the dims alive for as long as the XLA_FFI_Buffer that points at them.
struct Buf {
  XLA_FFI_Buffer buf{};
  std::vector<int64_t> dims;
  explicit Buf(py::array a) {
    if (!(a.flags() & py::array::c_style)) throw std::invalid_argument("array not C-contiguous");
    dims.assign(a.shape(), a.shape() + a.ndim());
    buf.struct_size = sizeof(XLA_FFI_Buffer);
    buf.dtype = dtype_of(py::str(a.dtype()));
    buf.data = const_cast<void*>(a.data());
    buf.rank = a.ndim();
    buf.dims = dims.data();
  }
  ffi::AnyBuffer any() { return ffi::AnyBuffer(&buf); }
};

inline std::string message(const ffi::Error& e) {
  if (!e.failure()) return "";
  return e.message().empty() ? "error without a message" : e.message();
}

// XLA's scratch allocator on the host heap. Every allocation is filled with 0xff bytes (NaN as
// float, -1 as int), so that a read of an entry no kernel wrote poisons the result.
inline XLA_FFI_Error* scratch_allocate(XLA_FFI_DeviceMemory_Allocate_Args* args) {
  const size_t align = args->alignment < 16 ? 16 : args->alignment;
  const size_t bytes = (args->size + align - 1) / align * align;
  args->data = std::aligned_alloc(align, bytes == 0 ? align : bytes);
  if (args->data != nullptr) std::memset(args->data, 0xff, bytes);
  return nullptr;  // a null data is the allocator's failure, seen by the caller
}
inline XLA_FFI_Error* scratch_free(XLA_FFI_DeviceMemory_Free_Args* args) {
  std::free(args->data);
  return nullptr;
}

// One handler call's ffi::ScratchAllocator (it frees its allocations when destroyed).
struct Scratch {
  XLA_FFI_Api api{};
  ffi::DiagnosticEngine diagnostic;
  Scratch() {
    api.XLA_FFI_DeviceMemory_Allocate = scratch_allocate;
    api.XLA_FFI_DeviceMemory_Free = scratch_free;
  }
  ffi::ScratchAllocator allocator() {
    return *ffi::CtxDecoding<ffi::ScratchAllocator>::Decode(&api, nullptr, diagnostic);
  }
};

// The controls every emulator module offers the tests.
inline void add_controls(py::module_& m) {
  bind_runtime(m);  // device, stream, runtime-call counters and the launch log
  // Thread and block order: 0 in order, 1 reversed, 2 shuffled from `seed` (emu_core.h).
  m.def("set_schedule", &set_schedule, py::arg("mode"), py::arg("seed") = 0);
  // Barrier the kernels skip (numbers from transform.py), -1 for none.
  m.def("drop_barrier", [](int index) { dropped_barrier = index; });
}

}  // namespace emu

// pybind11 module handing the CUDA handlers to Python as capsules (see sapa_jax/_ffi.py, which
// registers them for platform "CUDA" under the same target names as the CPU ones).
#include <pybind11/pybind11.h>

#include "sapa_handlers.h"

namespace py = pybind11;

template <typename Fn> static py::capsule Capsule(Fn* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

PYBIND11_MODULE(_sapa_cuda, m) {
  m.doc() = "SAPA fused kernels for XLA:GPU (CUDA)";
  m.def("registrations", []() {
    py::dict targets;
    targets["sapa_forward"] = Capsule(SapaForwardCuda);
    targets["sapa_backward"] = Capsule(SapaBackwardCuda);
    return targets;
  });
}

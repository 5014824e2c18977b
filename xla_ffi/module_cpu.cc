// pybind11 module handing the CPU handlers to Python as capsules (see sapa_jax/_ffi.py).
#include <pybind11/pybind11.h>

#include "sapa_handlers.h"

namespace py = pybind11;

template <typename Fn> static py::capsule Capsule(Fn* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

PYBIND11_MODULE(_sapa_cpu, m) {
  m.doc() = "SAPA fused kernels for XLA:CPU";
  m.def("registrations", []() {
    py::dict targets;
    targets["sapa_forward"] = Capsule(SapaForwardCpu);
    targets["sapa_backward"] = Capsule(SapaBackwardCpu);
    return targets;
  });
}

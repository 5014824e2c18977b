// pybind11 module handing the CPU handlers to Python as capsules (see sapa_jax/_ffi.py).
#include <pybind11/pybind11.h>

#include "deform_handlers.h"
#include "sapa_contract.h"
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
    targets["sapa_deform_forward"] = Capsule(SapaDeformForwardCpu);
    targets["sapa_deform_backward"] = Capsule(SapaDeformBackwardCpu);
    return targets;
  });
  m.def("contract", [] { return sapa::contract({"float32", "float64", "bfloat16", "float16"}); },
        "Attribute codes and supported dtypes of the CPU handlers.");
  m.def("set_max_workers", &sapa::set_cpu_max_workers, py::arg("workers"),
        "Test-only: the most workers a call splits its work over (0: no cap).");
}

// pybind11 module handing the CPU handlers to Python as capsules (see sapa_jax/_ffi.py).
#include <pybind11/pybind11.h>

#include <pybind11/stl.h>

#include "cpu/levels.h"
#include "carafe_handlers.h"
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
    targets["carafe_forward"] = Capsule(CarafeForwardCpu);
    targets["carafe_backward"] = Capsule(CarafeBackwardCpu);
    return targets;
  });
  m.def("contract", [] { return sapa::contract({"float32", "float64", "bfloat16", "float16"}); },
        "Attribute codes and supported dtypes of the CPU handlers.");
  m.def("set_max_workers", &sapa::set_cpu_max_workers, py::arg("workers"),
        "Test-only: the most workers a call splits its work over (0: no cap).");
  m.def("simd_levels", &sapa::cpu::simd_levels,
        "SIMD levels of the CPU kernels compiled in and supported here, worst first.");
  m.def("simd_level", &sapa::cpu::simd_level, "The SIMD level the CPU kernels run at.");
  m.def("set_simd_level", &sapa::cpu::set_simd_level, py::arg("level"),
        "Test-only: run the CPU kernels at `level` (one of simd_levels(), or \"auto\": the best, "
        "as chosen at load). ValueError for a level this build or processor does not have.");
}

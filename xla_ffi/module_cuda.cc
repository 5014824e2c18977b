// pybind11 module handing the CUDA handlers to Python as capsules (see sapa_jax/_ffi.py, which
// registers them for platform "CUDA" under the same target names as the CPU ones).
#include <pybind11/pybind11.h>

#include "sapa_contract.h"
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
  m.def("contract", [] { return sapa::contract({"float32", "bfloat16", "float16"}); },
        "Attribute codes and supported dtypes of the CUDA handlers.");
  m.def(
      "set_planner",
      [](bool force_simple, int tile_cap) {
        sapa::set_cuda_planner(sapa::PlannerSettings{force_simple, tile_cap});
      },
      py::arg("force_simple") = false, py::arg("tile_cap") = 1 << 20,
      "Test-only: take the simple kernels for every call, or cap the tiles at tile_cap^2.");
}

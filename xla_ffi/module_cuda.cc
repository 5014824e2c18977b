// pybind11 module handing the CUDA handlers to Python as capsules (see sapa_jax/_ffi.py, which
// registers them for platform "CUDA" under the same target names as the CPU ones).
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include "carafe_handlers.h"
#include "cuda/entry.h"
#include "deform_handlers.h"
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
    targets["carafe_forward"] = Capsule(CarafeForwardCuda);
    targets["carafe_backward"] = Capsule(CarafeBackwardCuda);
    targets["sapa_deform_forward"] = Capsule(SapaDeformForwardCuda);
    targets["sapa_deform_backward"] = Capsule(SapaDeformBackwardCuda);
    return targets;
  });
  // Can this module's kernels run here? Versions are CUDA's encoding (1000 * major + 10 * minor);
  // driver_version 0 means no driver could be loaded. sapa_jax/_ffi.py decides from these.
  m.def("cuda_probe", []() {
    int driver = 0, runtime = 0, devices = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
    if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
    const cudaError_t count_status = cudaGetDeviceCount(&devices);
    if (count_status != cudaSuccess) devices = 0;
    py::dict probe;
    probe["driver_version"] = driver;
    probe["runtime_version"] = runtime;
    probe["device_count"] = devices;
    probe["error"] = count_status == cudaSuccess ? "" : cudaGetErrorString(count_status);
    return probe;
  });
  m.def("contract", [] { return sapa::contract(sapa::cuda::kSupportedTypes); },
        "Attribute codes and supported dtypes of the CUDA handlers.");
  m.def(
      "set_planner",
      [](bool force_simple, int tile_cap, int channel_split) {
        sapa::set_cuda_planner(sapa::PlannerSettings{force_simple, tile_cap, channel_split});
      },
      py::arg("force_simple") = false, py::arg("tile_cap") = 1 << 20,
      py::arg("channel_split") = 0,
      "Test-only: take the simple kernels for every call, cap the tiles at tile_cap^2, or "
      "split the v2 kernels' channels over channel_split blocks per tile (0: the cost model).");
  m.def("set_kernel_generation", &sapa::set_cuda_kernel_generation, py::arg("generation"),
        "2 (default): the specialised v2 kernels where they apply; 1: the generic kernels only. "
        "Returns the previous generation.");
}

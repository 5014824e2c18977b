// Python bindings of the emulated runtime's state (include/cuda_runtime.h), shared by the SAPA and
// CARAFE emulator modules: the current device and the stream the entry points get, the runtime
// calls the host code made, the opt-ins per (device, kernel) and the launch log.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_runtime.h>

namespace emu {

inline Stream* call_stream = &streams[0];  // the stream the emulated handlers are called with

// The stream of the next handler calls: nullptr (the legacy default stream) or one of a device.
inline cudaStream_t handler_stream() { return call_stream; }

inline void bind_runtime(pybind11::module_& m) {
  namespace py = pybind11;
  // The calling thread's current device and the device of the stream the handlers get
  // (stream_device -1: the same; -2: the legacy default stream, nullptr).
  m.def(
      "set_device",
      [](int device, int stream_device) {
        if (device < 0 || device >= kDevices || stream_device < -2 || stream_device >= kDevices)
          throw std::invalid_argument("no such emulated device");
        current_device = device;
        call_stream = stream_device == -2 ? nullptr
                                          : &streams[stream_device == -1 ? device : stream_device];
      },
      py::arg("device"), py::arg("stream_device") = -1);
  // How often the host code called the runtime's device queries; reset=True zeroes the counts.
  m.def(
      "runtime_calls",
      [](bool reset) {
        std::map<std::string, int> out{{"cudaGetDevice", calls.get_device},
                                       {"cudaStreamGetDevice", calls.stream_get_device},
                                       {"cudaDeviceGetAttribute", calls.device_attribute},
                                       {"cudaFuncSetAttribute", calls.func_set_attribute}};
        if (reset) calls = Calls{};
        return out;
      },
      py::arg("reset") = false);
  // cudaFuncSetAttribute calls per (device, kernel), as (device, calls) in no particular order.
  m.def("opt_in_calls", [] {
    std::vector<std::tuple<int, int>> out;
    for (const auto& [key, n] : opt_in_calls) out.emplace_back(key.first, n);
    return out;
  });
  // (grid, block, dynamic shared bytes[, device]) of every launch since the last call; empties
  // the log.
  m.def(
      "take_launches",
      [](bool with_device) {
        py::list out;
        for (const auto& l : launches) {
          if (with_device)
            out.append(py::make_tuple(l.grid, l.block, l.shared_bytes, l.device));
          else
            out.append(py::make_tuple(l.grid, l.block, l.shared_bytes));
        }
        launches.clear();
        return out;
      },
      py::arg("with_device") = false);
}

}  // namespace emu

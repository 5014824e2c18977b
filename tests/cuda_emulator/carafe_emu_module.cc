// pybind11 module around the FFI implementation functions of xla_ffi/carafe_cuda.cu, compiled
// on the CPU against the emulator headers (see emu_core.h and emu_module.cc, its SAPA twin).
// NumPy arrays are handed over as XLA_FFI_Buffers without copies; a call returns "" on success,
// else the ffi::Error message.
#include "carafe_cuda.cu"  // the rewritten one (transform.py), before xla_ffi/ on the path

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "runtime_bindings.h"
#include "sapa_contract.h"

namespace py = pybind11;

namespace {

XLA_FFI_DataType dtype_of(const std::string& name) {
  if (name == "float32") return XLA_FFI_DataType_F32;
  if (name == "bfloat16") return XLA_FFI_DataType_BF16;
  if (name == "float16") return XLA_FFI_DataType_F16;
  if (name == "float64") return XLA_FFI_DataType_F64;
  throw std::invalid_argument("unsupported dtype " + name);
}

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

std::string message(const ffi::Error& e) {
  if (!e.failure()) return "";
  return e.message().empty() ? "error without a message" : e.message();
}

std::string forward(py::array x, py::array logits, py::array out, py::array stats,
                    int64_t kernel_size, int64_t scale, int64_t groups, int64_t normalizer,
                    double eps) {
  Buf bx(x), bl(logits), bo(out), bs(stats);
  return message(CarafeForwardCudaImpl(emu::handler_stream(), bx.any(), bl.any(), bo.any(),
                                       bs.any(), kernel_size, scale, groups, normalizer, eps));
}

std::string backward(py::array x, py::array logits, py::array stats, py::array g, py::array dx,
                     py::array dlogits, py::array w_scratch, int64_t kernel_size, int64_t scale,
                     int64_t groups, int64_t normalizer, double eps) {
  Buf bx(x), bl(logits), bs(stats), bg(g), bdx(dx), bdl(dlogits), bw(w_scratch);
  return message(CarafeBackwardCudaImpl(emu::handler_stream(), bx.any(), bl.any(), bs.any(),
                                        bg.any(), bdx.any(), bdl.any(), bw.any(), kernel_size,
                                        scale, groups, normalizer, eps));
}

}  // namespace

PYBIND11_MODULE(carafe_cuda_emu, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  emu::bind_runtime(m);
  m.def("set_schedule", &emu::set_schedule, py::arg("mode"), py::arg("seed") = 0);
  m.def("drop_barrier", [](int index) { emu::dropped_barrier = index; });
  m.def("contract", [] { return sapa::contract({"float32", "bfloat16", "float16"}); });
}

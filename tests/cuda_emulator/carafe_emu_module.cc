// pybind11 module around the FFI implementation functions of xla_ffi/carafe_cuda.cu, compiled
// on the CPU against the emulator headers (see emu_core.h; the pybind11 side is emu_module.h).
#include "carafe_cuda.cu"  // the rewritten one (transform.py), before xla_ffi/ on the path

#include <string>

#include "emu_module.h"
#include "sapa_contract.h"

namespace py = pybind11;

namespace {

using emu::Buf;
using emu::message;

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
  emu::add_controls(m);
  m.def("contract", [] { return sapa::contract({"float32", "bfloat16", "float16"}); });
}

// pybind11 module around the FFI implementation functions of xla_ffi/deform_cuda.cu, compiled
// on the CPU against the emulator headers (see emu_core.h; the pybind11 side is emu_module.h).
// The workspace comes from emu::Scratch, XLA's scratch allocator on the host heap.
#include "deform_cuda.cu"  // the rewritten one (transform.py), before xla_ffi/ on the path

#include <string>

#include "emu_module.h"
#include "sapa_contract.h"

namespace py = pybind11;

namespace {

using emu::Buf;
using emu::message;

std::string forward(py::array q, py::array k, py::array v, py::array offsets, py::array out,
                    int64_t num_points, int64_t groups, int64_t scale) {
  Buf bq(q), bk(k), bv(v), bo(offsets), bout(out);
  emu::Scratch scratch;
  return message(DeformForwardCudaImpl(nullptr, scratch.allocator(), bq.any(), bk.any(),
                                       bv.any(), bo.any(), bout.any(), num_points, groups,
                                       scale));
}

std::string backward(py::array q, py::array k, py::array v, py::array offsets, py::array g,
                     py::array dq, py::array dk, py::array dv, py::array doffsets,
                     int64_t num_points, int64_t groups, int64_t scale) {
  Buf bq(q), bk(k), bv(v), bo(offsets), bg(g), bdq(dq), bdk(dk), bdv(dv), bdo(doffsets);
  emu::Scratch scratch;
  return message(DeformBackwardCudaImpl(nullptr, scratch.allocator(), bq.any(), bk.any(),
                                        bv.any(), bo.any(), bg.any(), bdq.any(), bdk.any(),
                                        bdv.any(), bdo.any(), num_points, groups, scale));
}

}  // namespace

PYBIND11_MODULE(deform_cuda_emu, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  emu::add_controls(m);
  m.def("contract", [] { return sapa::contract({"float32", "bfloat16", "float16"}); });
}

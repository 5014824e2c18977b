// The Python <-> C++ contract, in one place: the attribute codes of the normalisers and border
// modes, and the element types each back end supports. The pybind11 modules hand it to
// sapa_jax/_ffi.py (`contract()`), which reads the codes from there rather than repeating them.
#ifndef SAPA_JAX_XLA_FFI_SAPA_CONTRACT_H_
#define SAPA_JAX_XLA_FFI_SAPA_CONTRACT_H_

#include <pybind11/pybind11.h>

#include <initializer_list>

#include "sapa_common.h"
#include "sapa_validate.h"

namespace sapa {

// {"normalizers": {name: code}, "borders": {name: code}, "dtypes": [numpy dtype names]}
inline pybind11::dict contract(std::initializer_list<const char*> dtypes) {
  namespace py = pybind11;
  py::dict normalizers, borders, out;
  normalizers["softmax"] = int64_t{kSoftmax};
  normalizers["relu"] = int64_t{kRelu};
  normalizers["sigmoid"] = int64_t{kSigmoid};
  normalizers["softplus"] = int64_t{kSoftplus};
  normalizers["none"] = int64_t{kNone};
  borders["zeros"] = int64_t{kZeros};
  borders["valid"] = int64_t{kValid};
  py::list names;
  for (const char* name : dtypes) names.append(name);
  out["normalizers"] = normalizers;
  out["borders"] = borders;
  out["dtypes"] = names;
  return out;
}

// The same from a back end's list of supported types (sapa_validate.h), so that the contract,
// the validation and its messages come from one list.
template <size_t N> pybind11::dict contract(TypeList<N> types) {
  pybind11::dict out = contract({});
  pybind11::list names;
  for (xla::ffi::DataType t : types) names.append(type_name(t));
  out["dtypes"] = names;
  return out;
}

}  // namespace sapa

#endif  // SAPA_JAX_XLA_FFI_SAPA_CONTRACT_H_

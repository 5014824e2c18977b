// The SIMD levels of the CPU kernels. cpu/sapa_level.cc is compiled once per level, with that
// level's -m flags and SAPA_CPU_ISA set to its name (CMakeLists.txt), and defines the entry
// points below in namespace sapa::cpu::<level>. sapa_cpu.cc picks the best level the processor
// has once, at load time; tests can pin a level (sapa::cpu::set_simd_level, through the pybind11
// module) to check every path. Only ISA-independent types cross this boundary.
#ifndef SAPA_JAX_XLA_FFI_CPU_LEVELS_H_
#define SAPA_JAX_XLA_FFI_CPU_LEVELS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "sapa_common.h"
#include "xla/ffi/api/ffi.h"

namespace sapa::cpu {

// One call of a pass: geometry, options, element type and XLA's intra-op pool.
struct PassCall {
  Geometry g;
  int64_t normalizer, border;
  double eps;
  xla::ffi::DataType dtype;  // of q, k, v, out, g, dq, dk, dv; stats and scratch in Acc<dtype>
  xla::ffi::ThreadPool* pool;
};

using ForwardEntry = void (*)(const PassCall& call, const void* q, const void* k, const void* v,
                              void* out, void* stats);
using BackwardEntry = void (*)(const PassCall& call, const void* q, const void* k, const void* v,
                               const void* stats, const void* gout, void* dq, void* dk, void* dv,
                               void* w_scratch, void* dlogit_scratch);

// The entry points of one level (exceptions propagate to the handler).
#define SAPA_CPU_DECLARE_LEVEL(level)                                                        \
  namespace level {                                                                          \
  void sapa_forward(const PassCall& call, const void* q, const void* k, const void* v,       \
                    void* out, void* stats);                                                 \
  void sapa_backward(const PassCall& call, const void* q, const void* k, const void* v,      \
                     const void* stats, const void* gout, void* dq, void* dk, void* dv,      \
                     void* w_scratch, void* dlogit_scratch);                                 \
  }
SAPA_CPU_DECLARE_LEVEL(baseline)
#if defined(SAPA_CPU_X86_LEVELS)
SAPA_CPU_DECLARE_LEVEL(avx2)
SAPA_CPU_DECLARE_LEVEL(avx512)
#endif
#undef SAPA_CPU_DECLARE_LEVEL

// Level names, worst first: "baseline", "avx2" (x86-64-v3: AVX2 + FMA), "avx512" (x86-64-v4).
// simd_levels(): those compiled in and supported by this processor. set_simd_level(name): one of
// those, or "auto" (the best, as chosen at load); throws std::invalid_argument otherwise.
std::vector<std::string> simd_levels();
std::string simd_level();
void set_simd_level(const std::string& name);

}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_LEVELS_H_

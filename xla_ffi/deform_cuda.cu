// SAPA-D fused kernels for XLA:GPU (docs/design.md §6.4): the FFI handlers, their validation
// (deform_validate.h, the CPU handler's checks and messages) and the launches. The kernels are
// in xla_ffi/cuda/, one header per role, on the per-sample math of deform_common.h:
//   deform_point.cuh            per-sample warp helpers, the workspace layout
//   deform_forward.cuh          forward: one warp per output point
//   deform_backward_points.cuh  backward pass A: one warp per output point (dq, doffsets and
//                               the softmax weights and logit gradients for pass B)
//   deform_backward_gather.cuh  R_b per batch element, then pass B: one thread per element of
//                               dk and dv, gathering over a window clamped to the map
// f32, bf16, f16 buffers, f32 arithmetic. No atomics: every output element has one writer that
// sums in a fixed order, so the results are bitwise reproducible. The f32 workspace (staged
// logits; for the backward also attn, dlogit and R_b) comes from XLA's scratch allocator.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/deform_backward_gather.cuh"
#include "cuda/deform_backward_points.cuh"
#include "cuda/deform_forward.cuh"
#include "cuda/device.cuh"
#include "cuda/launch.h"
#include "deform_common.h"
#include "deform_handlers.h"
#include "deform_validate.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using sapa::DeformGeometry;
using sapa::cuda::DeformWorkspace;
using sapa::cuda::grid_for;
using sapa::cuda::kThreads;
using sapa::cuda::kWarps;
using sapa::cuda::launch_error;

bool supported(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}
constexpr const char* kSupportedNames = "float32, bfloat16 or float16";

// The checks of both back ends, plus the int ranges of the launches (n blocks, R_b as int).
std::string check_inputs(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                         const ffi::AnyBuffer& v, const ffi::AnyBuffer& offsets,
                         int64_t num_points, int64_t groups, int64_t scale, DeformGeometry* g) {
  std::string error = sapa::check_deform_inputs(q, k, v, offsets, num_points, groups, scale,
                                                supported, kSupportedNames, g);
  if (!error.empty()) return error;
  constexpr int64_t kIntMax = 0x7fffffff;
  if (g->n > kIntMax || g->H > kIntMax || g->W > kIntMax)
    return "dimensions too large for the CUDA kernels: q " + sapa::describe(q.dimensions()) +
           ", k " + sapa::describe(k.dimensions());
  return std::string();
}

int64_t weights_per_call(const DeformGeometry& g) {  // one float per (point, group, p)
  return g.n * g.oH() * g.oW() * g.G * g.P;
}

// `floats` f32 then `ints` int32 of scratch, or nullptr (with the error in *error).
void* allocate(ffi::ScratchAllocator& scratch, const char* op, int64_t floats, int64_t ints,
               ffi::Error* error) {
  const size_t bytes = size_t(floats) * sizeof(float) + size_t(ints) * sizeof(int);
  std::optional<void*> memory = scratch.Allocate(bytes, 256);
  if (!memory.has_value() || *memory == nullptr) {
    *error = ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        std::string(op) + ": cannot allocate the " + std::to_string(bytes) +
                            "-byte workspace");
    return nullptr;
  }
  return *memory;
}

template <typename T> const T* in(const ffi::AnyBuffer& x) {
  return static_cast<const T*>(x.untyped_data());
}
template <typename T> T* out(ffi::Result<ffi::AnyBuffer>& x) {
  return static_cast<T*>(x->untyped_data());
}

template <typename F> ffi::Error dispatch(ffi::DataType t, F f) {
  switch (t) {
    case ffi::DataType::F32:
      return f(float{});
    case ffi::DataType::BF16:
      return f(__nv_bfloat16{});
    default:  // F16; the checks admit nothing else
      return f(__half{});
  }
}

ffi::Error DeformForwardCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                                 ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                 ffi::AnyBuffer offsets, ffi::Result<ffi::AnyBuffer> result,
                                 int64_t num_points, int64_t groups, int64_t scale) {
  DeformGeometry g{};
  std::string error = check_inputs(q, k, v, offsets, num_points, groups, scale, &g);
  if (error.empty()) {
    sapa::Validator check(q);
    check.expect("out", *result, g.oH(), g.oW(), g.C(), q.element_type());
    error = check.error();
  }
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_deform_forward: " + error);
  const int64_t npts = g.n * g.oH() * g.oW();
  if (npts == 0 || g.C() == 0) return ffi::Error::Success();
  ffi::Error failed = ffi::Error::Success();
  float* logit = static_cast<float*>(
      allocate(scratch, "sapa_deform_forward", weights_per_call(g), 0, &failed));
  if (logit == nullptr) return failed;
  return dispatch(q.element_type(), [&](auto t) {
    using T = decltype(t);
    sapa::cuda::deform_forward<T><<<grid_for(stream, npts, kWarps), kThreads, 0, stream>>>(
        g, in<T>(q), in<T>(k), in<T>(v), in<T>(offsets), out<T>(result), logit);
    return launch_error("SAPA-D", "deform_forward");
  });
}

ffi::Error DeformBackwardCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                                  ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                  ffi::AnyBuffer offsets, ffi::AnyBuffer gout,
                                  ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                                  ffi::Result<ffi::AnyBuffer> dv,
                                  ffi::Result<ffi::AnyBuffer> doffsets, int64_t num_points,
                                  int64_t groups, int64_t scale) {
  DeformGeometry g{};
  std::string error = check_inputs(q, k, v, offsets, num_points, groups, scale, &g);
  if (error.empty())
    error = sapa::check_deform_backward_buffers(q, g, gout, *dq, *dk, *dv, *doffsets);
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_deform_backward: " + error);
  const int64_t npts = g.n * g.oH() * g.oW(), pixels = g.n * g.H * g.W;
  if (pixels == 0) return ffi::Error::Success();
  const int64_t per = weights_per_call(g);
  ffi::Error failed = ffi::Error::Success();
  float* base =
      static_cast<float*>(allocate(scratch, "sapa_deform_backward", 3 * per, g.n, &failed));
  if (base == nullptr) return failed;
  const DeformWorkspace ws{base, base + per, base + 2 * per,
                           reinterpret_cast<int*>(base + 3 * per)};
  const int cap = static_cast<int>(g.H > g.W ? g.H : g.W);
  const int64_t items = pixels * g.G * (g.E + g.Cg);
  const unsigned point_grid = grid_for(stream, npts, kWarps);
  const unsigned gather_grid = grid_for(stream, items, kThreads);
  return dispatch(q.element_type(), [&](auto t) {
    using T = decltype(t);
    sapa::cuda::deform_backward_points<T><<<point_grid, kThreads, 0, stream>>>(
        g, in<T>(q), in<T>(k), in<T>(v), in<T>(offsets), in<T>(gout), out<T>(dq),
        out<T>(doffsets), ws);
    if (auto err = launch_error("SAPA-D", "deform_backward_points"); err.failure()) return err;
    sapa::cuda::deform_window_radius<T>
        <<<static_cast<unsigned>(g.n), kThreads, kWarps * sizeof(float), stream>>>(
            g, in<T>(offsets), ws.radius, cap);
    if (auto err = launch_error("SAPA-D", "deform_window_radius"); err.failure()) return err;
    if (items == 0) return ffi::Error::Success();
    sapa::cuda::deform_backward_gather<T><<<gather_grid, kThreads, 0, stream>>>(
        g, in<T>(q), in<T>(offsets), in<T>(gout), out<T>(dk), out<T>(dv), ws);
    return launch_error("SAPA-D", "deform_backward_gather");
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SapaDeformForwardCuda, DeformForwardCudaImpl,
    sapa::bind_deform_forward(ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SapaDeformBackwardCuda, DeformBackwardCudaImpl,
    sapa::bind_deform_backward(ffi::Ffi::Bind()
                                   .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                   .Ctx<ffi::ScratchAllocator>()));

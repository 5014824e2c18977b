// Fused SAPA core for XLA:GPU (CUDA): the FFI handlers, their validation and the kernel
// launches. Contract: docs/design.md §1 to §3; layouts, tap order, border rule, normaliser
// statistics and logit gradients: sapa_common.h; handler signature: sapa_handlers.h; entry
// points: cuda/entry.h. The rest lives in xla_ffi/cuda/, one file per responsibility:
//   device.cuh           constants, Params, element types, warp reductions, window helpers
//   tile.cuh             tiles, halo staging, chunked dot products and assembly (tiled kernels)
//   simple.cuh           per-point helpers of the simple kernels
//   forward.cuh          forward_tiled, forward_simple
//   backward_points.cuh  backward pass 1: backward_points_tiled, backward_points_simple
//   backward_gather.cuh  backward pass 2: backward_gather_tiled, backward_gather_simple
//   v2_*.cuh             second generation (compile-time K, s): forward_v2,
//                        backward_points_v2, backward_gather_v2; v2_stage.cuh their staging
//   plan.h               host: problem parameters and the tile planners (v2: cost model)
//   runtime.h            host: device of the stream, limits and opt-ins, once per device
//
// Tiled kernels (the normal path). A block owns a tile of TH x TW low-res centres, i.e. the
// s*TH x s*TW output points whose windows are centred on them, and stages the low-res halo the
// tile sees (clipped to the map) in shared memory, channel chunk by channel chunk, so that no
// K*K-expanded copy of k or v ever exists in global memory. Simple kernels (fallback) cover
// what no tile holds in shared memory (very large K or s): one warp per output point (forward,
// backward pass 1) and one thread per gradient element (backward pass 2), reading global memory
// directly. They are also an independent check of the tiled kernels: sapa::set_cuda_planner
// (the module's set_planner, for tests) can select them for every call, or cap the tile at
// n x n centres, to exercise every path. No atomics anywhere: every output element is summed by
// one thread in a fixed order, so the results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <cstdint>
#include <string>

#include "cuda/backward_gather.cuh"
#include "cuda/backward_points.cuh"
#include "cuda/forward.cuh"
#include "cuda/launch.h"
#include "cuda/plan.h"
#include "cuda/v2_forward.cuh"
#include "cuda/v2_gather.cuh"
#include "cuda/v2_points.cuh"
#include "sapa_common.h"
// The FFI headers trip diagnostics in nvcc's front end and in the host compiler behind it that a
// plain g++ build does not report (missing return after an exhaustive switch, always_inline on
// non-inline functions); they are not ours to fix.
#pragma nv_diagnostic push
#pragma nv_diag_suppress 940
#pragma nv_diag_suppress 2473
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wreturn-type"
#include "xla/ffi/api/ffi.h"
#include "cuda/entry.h"
#include "sapa_handlers.h"
#include "sapa_validate.h"
#pragma GCC diagnostic pop
#pragma nv_diagnostic pop

namespace ffi = xla::ffi;

namespace sapa::cuda {
namespace {

// The error of the last launch, if any, naming SAPA (cuda/launch.h).
ffi::Error launch_error(const char* kernel) { return sapa::cuda::launch_error("SAPA", kernel); }

// Shared memory above the 48 KiB default needs an opt-in, set once per device and kernel
// (cuda/runtime.h).
template <typename Fn>
ffi::Error allow_shared(Fn* kernel, size_t bytes, const DeviceLimits& dev) {
  const cudaError_t err =
      allow_dynamic_shared(reinterpret_cast<const void*>(kernel), bytes, dev);
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("cudaFuncSetAttribute failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

// ---- second-generation kernels (cuda/v2_plan.h): one launcher per (K, s) specialisation ----

// Grid of a v2 kernel: x the tiles, y the channel split (plan.h).
dim3 v2_grid(const Plan& plan) {
  return dim3(static_cast<unsigned>(plan.blocks / plan.splits),
              static_cast<unsigned>(plan.splits));
}

// Launch<K, S>::run(args...) for the specialisation of (K, s); v2::specialised(K, s) holds.
template <template <int, int> class Launch, typename... Args>
ffi::Error by_shape(int K, int s, const Args&... args) {
  switch (K * 16 + s) {
    case 3 * 16 + 1: return Launch<3, 1>::run(args...);
    case 3 * 16 + 2: return Launch<3, 2>::run(args...);
    case 3 * 16 + 4: return Launch<3, 4>::run(args...);
    case 5 * 16 + 1: return Launch<5, 1>::run(args...);
    case 5 * 16 + 2: return Launch<5, 2>::run(args...);
    case 5 * 16 + 4: return Launch<5, 4>::run(args...);
    case 7 * 16 + 1: return Launch<7, 1>::run(args...);
    case 7 * 16 + 2: return Launch<7, 2>::run(args...);
    case 7 * 16 + 4: return Launch<7, 4>::run(args...);
    default: break;
  }
  return ffi::Error::Internal("SAPA CUDA: no v2 kernel for K = " + std::to_string(K) +
                              ", s = " + std::to_string(s));
}

template <typename T> struct ForwardV2 {
  template <int K, int S> struct At {
    static ffi::Error run(cudaStream_t stream, const DeviceLimits& dev, const Params& P,
                          const Plan& plan, const T* q, const T* k, const T* v, T* out,
                          float* stats) {
      if (auto err = allow_shared(v2::forward_v2<T, K, S>, plan.shared_bytes, dev);
          err.failure())
        return err;
      v2::forward_v2<T, K, S><<<v2_grid(plan), kThreads, plan.shared_bytes, stream>>>(
          P, q, k, v, out, stats);
      return launch_error("forward_v2");
    }
  };
};

template <typename T> struct GatherV2 {
  template <int K, int S> struct At {
    static ffi::Error run(cudaStream_t stream, const DeviceLimits& dev, const Params& P,
                          const Plan& plan, const T* q, const T* g, const float* w,
                          const float* dlogit, T* dk, T* dv) {
      if (auto err = allow_shared(v2::backward_gather_v2<T, K, S>, plan.shared_bytes, dev);
          err.failure())
        return err;
      v2::backward_gather_v2<T, K, S><<<v2_grid(plan), kThreads, plan.shared_bytes, stream>>>(
          P, q, g, w, dlogit, dk, dv);
      return launch_error("backward_gather_v2");
    }
  };
};

template <typename T> struct PointsV2 {
  template <int K, int S> struct At {
    static ffi::Error run(cudaStream_t stream, const DeviceLimits& dev, const Params& P,
                          const Plan& plan, const T* q, const T* k, const T* v,
                          const float* stats, const T* g, T* dq, float* w, float* dlogit) {
      if (auto err = allow_shared(v2::backward_points_v2<T, K, S>, plan.shared_bytes, dev);
          err.failure())
        return err;
      v2::backward_points_v2<T, K, S><<<static_cast<unsigned>(plan.blocks), kThreads,
                                        plan.shared_bytes, stream>>>(P, q, k, v, stats, g, dq,
                                                                     w, dlogit);
      return launch_error("backward_points_v2");
    }
  };
};

template <typename T>
ffi::Error launch_forward(cudaStream_t stream, const Params& base, const DeviceLimits& dev,
                          const void* q, const void* k, const void* v, void* out, void* stats) {
  const Plan plan = make_plan(Kernel::kForward, base, dev);
  const Params P = with_tile(base, plan);
  const T* qt = static_cast<const T*>(q);
  const T* kt = static_cast<const T*>(k);
  const T* vt = static_cast<const T*>(v);
  if (v2::use_forward(base)) {
    const Plan plan2 = make_plan(Kernel::kForwardV2, base, dev);
    if (plan2.tiled)
      return by_shape<ForwardV2<T>::template At>(base.K, base.s, stream, dev,
                                                 with_tile(base, plan2), plan2, qt, kt, vt,
                                                 static_cast<T*>(out),
                                                 static_cast<float*>(stats));
  }
  if (plan.tiled) {
    if (auto err = allow_shared(forward_tiled<T>, plan.shared_bytes, dev); err.failure())
      return err;
    forward_tiled<T><<<static_cast<unsigned>(plan.blocks), kThreads, plan.shared_bytes, stream>>>(
        P, qt, kt, vt, static_cast<T*>(out), static_cast<float*>(stats));
    return launch_error("forward_tiled");
  }
  const int64_t npts = P.n * P.oH * int64_t{P.oW};
  forward_simple<T><<<simple_blocks(npts, kWarps, dev), kThreads, 0, stream>>>(
      P, qt, kt, vt, static_cast<T*>(out), static_cast<float*>(stats));
  return launch_error("forward_simple");
}

template <typename T>
ffi::Error launch_backward(cudaStream_t stream, const Params& base, const DeviceLimits& dev,
                           const void* q, const void* k, const void* v, const void* stats,
                           const void* g, void* dq, void* dk, void* dv, void* w_scratch,
                           void* dlogit_scratch) {
  const T* qt = static_cast<const T*>(q);
  const T* kt = static_cast<const T*>(k);
  const T* vt = static_cast<const T*>(v);
  const T* gt = static_cast<const T*>(g);
  const float* st = static_cast<const float*>(stats);
  float* ws = static_cast<float*>(w_scratch);
  float* ds = static_cast<float*>(dlogit_scratch);

  // Pass 1: dq and the per-tap scratch.
  const bool g_aligned = reinterpret_cast<uintptr_t>(g) % (4 * sizeof(T)) == 0;
  const Plan plan1v2 = v2::use_points(base, g_aligned)
                           ? make_plan(Kernel::kBackwardPointsV2, base, dev)
                           : Plan{};
  const Plan plan1 = make_plan(Kernel::kBackwardPoints, base, dev);
  const Params P1 = with_tile(base, plan1);
  if (plan1v2.tiled) {
    if (auto err = by_shape<PointsV2<T>::template At>(
            base.K, base.s, stream, dev, with_tile(base, plan1v2), plan1v2, qt, kt, vt, st, gt,
            static_cast<T*>(dq), ws, ds);
        err.failure())
      return err;
  } else if (plan1.tiled) {
    if (auto err = allow_shared(backward_points_tiled<T>, plan1.shared_bytes, dev); err.failure())
      return err;
    backward_points_tiled<T>
        <<<static_cast<unsigned>(plan1.blocks), kThreads, plan1.shared_bytes, stream>>>(
            P1, qt, kt, vt, st, gt, static_cast<T*>(dq), ws, ds);
    if (auto err = launch_error("backward_points_tiled"); err.failure()) return err;
  } else {
    const int64_t npts = P1.n * P1.oH * int64_t{P1.oW};
    backward_points_simple<T><<<simple_blocks(npts, kWarps, dev), kThreads, 0, stream>>>(
        P1, qt, kt, vt, st, gt, static_cast<T*>(dq), ws, ds);
    if (auto err = launch_error("backward_points_simple"); err.failure()) return err;
  }

  // Pass 2: dk and dv gathered from the scratch (same stream, so after pass 1).
  if (v2::use_gather(base)) {
    const Plan plan = make_plan(Kernel::kBackwardGatherV2, base, dev);
    if (plan.tiled)
      return by_shape<GatherV2<T>::template At>(base.K, base.s, stream, dev, with_tile(base, plan),
                                                plan, qt, gt, static_cast<const float*>(ws),
                                                static_cast<const float*>(ds),
                                                static_cast<T*>(dk), static_cast<T*>(dv));
  }
  const Plan plan2 = make_plan(Kernel::kBackwardGather, base, dev);
  const Params P2 = with_tile(base, plan2);
  if (plan2.tiled) {
    if (auto err = allow_shared(backward_gather_tiled<T>, plan2.shared_bytes, dev); err.failure())
      return err;
    backward_gather_tiled<T>
        <<<static_cast<unsigned>(plan2.blocks), kThreads, plan2.shared_bytes, stream>>>(
            P2, qt, gt, ws, ds, static_cast<T*>(dk), static_cast<T*>(dv));
    return launch_error("backward_gather_tiled");
  }
  const int64_t items = P2.n * P2.H * int64_t{P2.W} * (P2.d + P2.C);
  if (items == 0) return ffi::Error::Success();
  backward_gather_simple<T><<<simple_blocks(items, kThreads, dev), kThreads, 0, stream>>>(
      P2, qt, gt, ws, ds, static_cast<T*>(dk), static_cast<T*>(dv));
  return launch_error("backward_gather_simple");
}

// ---- validation: sapa_validate.h, plus the int ranges the kernels index with ----

// Validates attributes and q, k, v; fills the problem part of `P` and `g`. "" on success.
std::string make_params(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                        const ffi::AnyBuffer& v, int64_t kernel_size, int64_t scale,
                        int64_t normalizer, int64_t border, double eps, sapa::Geometry* g,
                        Params* P) {
  std::string error = sapa::check_inputs(q, k, v, kernel_size, scale, normalizer, border, eps,
                                         kSupportedTypes, g);
  if (!error.empty()) return error;
  constexpr int64_t kIntMax = 0x7fffffff;
  if (g->oH() > kIntMax / 2 || g->oW() > kIntMax / 2 || g->d > kIntMax / 2 ||
      g->C > kIntMax / 2)
    return "dimensions too large for the CUDA kernels: q " + sapa::describe(q.dimensions()) +
           ", v " + sapa::describe(v.dimensions());
  const size_t elem = q.element_type() == ffi::DataType::F32 ? 4 : 2;
  const bool q_aligned = reinterpret_cast<uintptr_t>(q.untyped_data()) % (4 * elem) == 0;
  *P = problem_params(g->n, static_cast<int>(g->H), static_cast<int>(g->W),
                      static_cast<int>(g->s), static_cast<int>(g->K), static_cast<int>(g->d),
                      static_cast<int>(g->C), static_cast<int>(normalizer),
                      static_cast<int>(border), eps, q_aligned);
  return std::string();
}

int64_t output_points(const Params& P) { return P.n * P.oH * int64_t{P.oW}; }

// The limits of the stream's device; an ffi::Error when they cannot be queried.
ffi::Error query_device(cudaStream_t stream, DeviceLimits* dev) {
  const std::string error = device_limits(stream, dev);
  return error.empty() ? ffi::Error::Success() : ffi::Error::Internal(error);
}

}  // namespace

ffi::Error forward(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> stats,
                   int64_t kernel_size, int64_t scale, int64_t normalizer, int64_t border,
                   double eps) {
  Params P;
  sapa::Geometry geometry{};
  std::string error =
      make_params(q, k, v, kernel_size, scale, normalizer, border, eps, &geometry, &P);
  if (error.empty()) error = sapa::check_forward_outputs(q, geometry, *out, *stats);
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_forward: " + error);
  if (output_points(P) == 0) return ffi::Error::Success();
  DeviceLimits dev;
  if (auto err = query_device(stream, &dev); err.failure()) return err;
  switch (q.element_type()) {
    case ffi::DataType::F32:
      return launch_forward<float>(stream, P, dev, q.untyped_data(), k.untyped_data(),
                                   v.untyped_data(), out->untyped_data(), stats->untyped_data());
    case ffi::DataType::BF16:
      return launch_forward<__nv_bfloat16>(stream, P, dev, q.untyped_data(), k.untyped_data(),
                                           v.untyped_data(), out->untyped_data(),
                                           stats->untyped_data());
    default:  // F16; make_params admits nothing else (kSupportedTypes)
      return launch_forward<__half>(stream, P, dev, q.untyped_data(), k.untyped_data(),
                                    v.untyped_data(), out->untyped_data(), stats->untyped_data());
  }
}

ffi::Error backward(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer stats, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                    ffi::Result<ffi::AnyBuffer> w_scratch,
                    ffi::Result<ffi::AnyBuffer> dlogit_scratch, int64_t kernel_size,
                    int64_t scale, int64_t normalizer, int64_t border, double eps) {
  Params P;
  sapa::Geometry geometry{};
  std::string error =
      make_params(q, k, v, kernel_size, scale, normalizer, border, eps, &geometry, &P);
  if (error.empty())
    error = sapa::check_backward_buffers(q, geometry, stats, g, *dq, *dk, *dv, *w_scratch,
                                         *dlogit_scratch);
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_backward: " + error);
  const ffi::DataType type = q.element_type();
  if (output_points(P) == 0) return ffi::Error::Success();
  DeviceLimits dev;
  if (auto err = query_device(stream, &dev); err.failure()) return err;
  switch (type) {
    case ffi::DataType::F32:
      return launch_backward<float>(stream, P, dev, q.untyped_data(), k.untyped_data(),
                                    v.untyped_data(), stats.untyped_data(), g.untyped_data(),
                                    dq->untyped_data(), dk->untyped_data(), dv->untyped_data(),
                                    w_scratch->untyped_data(), dlogit_scratch->untyped_data());
    case ffi::DataType::BF16:
      return launch_backward<__nv_bfloat16>(
          stream, P, dev, q.untyped_data(), k.untyped_data(), v.untyped_data(),
          stats.untyped_data(), g.untyped_data(), dq->untyped_data(), dk->untyped_data(),
          dv->untyped_data(), w_scratch->untyped_data(), dlogit_scratch->untyped_data());
    default:
      return launch_backward<__half>(stream, P, dev, q.untyped_data(), k.untyped_data(),
                                     v.untyped_data(), stats.untyped_data(), g.untyped_data(),
                                     dq->untyped_data(), dk->untyped_data(), dv->untyped_data(),
                                     w_scratch->untyped_data(), dlogit_scratch->untyped_data());
  }
}

}  // namespace sapa::cuda

namespace sapa {
int set_cuda_kernel_generation(int generation) {
  if (generation != 1 && generation != 2)
    throw std::invalid_argument("generation must be 1 or 2, got " + std::to_string(generation));
  return cuda::v2::generation_setting.exchange(generation);
}
void set_cuda_planner(const PlannerSettings& settings) {
  cuda::force_simple_setting.store(settings.force_simple);
  cuda::tile_cap_setting.store(std::max(settings.tile_cap, 1));
  cuda::channel_split_setting.store(std::max(settings.channel_split, 0));
}
}  // namespace sapa

// XLA's stream, then the signature shared with the CPU handlers (sapa_handlers.h). Command-buffer
// compatible: a call only launches kernels on the stream (no synchronisation, no allocation, no
// environment); the per-device state it keeps is set once (cuda/runtime.h), and its plan is a
// function of the shapes, the device and the test-only planner settings, which a captured
// command buffer replays as they were when it was captured.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SapaForwardCuda, sapa::cuda::forward,
    sapa::bind_forward(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SapaBackwardCuda, sapa::cuda::backward,
    sapa::bind_backward(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});



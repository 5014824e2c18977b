// Host side of the second-generation kernels (issue 15): which generation runs, and the
// launchers of the compile-time specialisations. Generation 2 (the default) runs forward_v2 and
// backward_gather_v2 where they apply (K in {3, 5, 7}, s in {1, 2, 4}, the tile fits; the forward
// also needs 4-element-aligned q rows), and the generic kernels everywhere else; generation 1
// always runs the generic kernels, so that one process can measure both
// (sapa::set_cuda_kernel_generation, the module's set_kernel_generation).
#pragma once

#include <atomic>

namespace v2 {

inline std::atomic<int> generation_setting{2};

constexpr bool specialised(int K, int s) {
  return (K == 3 || K == 5 || K == 7) && (s == 1 || s == 2 || s == 4);
}

inline bool use_forward(const Params& P) {
  return generation_setting.load() == 2 && specialised(P.K, P.s) && P.vec_q;
}
inline bool use_gather(const Params& P) {
  return generation_setting.load() == 2 && specialised(P.K, P.s);
}

// Calls Launch<K, S>::run(args...) for the specialisation of (K, s); specialised(K, s) holds.
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

template <typename T> struct Forward {
  template <int K, int S> struct At {
    static ffi::Error run(cudaStream_t stream, const Params& P, const Plan& plan, const T* q,
                          const T* k, const T* v, T* out, float* stats) {
      if (auto err = allow_shared(forward_v2<T, K, S>, plan.shared_bytes); err.failure())
        return err;
      forward_v2<T, K, S><<<static_cast<unsigned>(plan.blocks), kThreads, plan.shared_bytes,
                            stream>>>(P, q, k, v, out, stats);
      return launch_error("forward_v2");
    }
  };
};

template <typename T> struct Gather {
  template <int K, int S> struct At {
    static ffi::Error run(cudaStream_t stream, const Params& P, const Plan& plan, const T* q,
                          const T* g, const float* w, const float* dlogit, T* dk, T* dv) {
      if (auto err = allow_shared(backward_gather_v2<T, K, S>, plan.shared_bytes); err.failure())
        return err;
      backward_gather_v2<T, K, S><<<static_cast<unsigned>(plan.blocks), kThreads,
                                    plan.shared_bytes, stream>>>(P, q, g, w, dlogit, dk, dv);
      return launch_error("backward_gather_v2");
    }
  };
};

}  // namespace v2

// pybind11 module around the entry points of the CUDA back end (xla_ffi/cuda/entry.h), compiled
// on the CPU against the emulator headers (see emu_core.h; the pybind11 side is emu_module.h).
#include "sapa_cuda.cu"  // the rewritten one (transform.py), with its rewritten cuda/ headers

#include "cuda/entry.h"
#include "cuda/plan.h"

#include <tuple>
#include <vector>

#include "emu_module.h"
#include "sapa_contract.h"

namespace py = pybind11;

namespace {

using emu::Buf;
using emu::message;

std::string forward(py::array q, py::array k, py::array v, py::array out, py::array stats,
                    int64_t kernel_size, int64_t scale, int64_t normalizer, int64_t border,
                    double eps) {
  Buf bq(q), bk(k), bv(v), bo(out), bs(stats);
  return message(sapa::cuda::forward(emu::handler_stream(), bq.any(), bk.any(), bv.any(),
                                     bo.any(), bs.any(), kernel_size, scale, normalizer, border,
                                     eps));
}

std::string backward(py::array q, py::array k, py::array v, py::array stats, py::array g,
                     py::array dq, py::array dk, py::array dv, py::array w_scratch,
                     py::array dlogit_scratch, int64_t kernel_size, int64_t scale,
                     int64_t normalizer, int64_t border, double eps) {
  Buf bq(q), bk(k), bv(v), bs(stats), bg(g), bdq(dq), bdk(dk), bdv(dv), bw(w_scratch),
      bd(dlogit_scratch);
  return message(sapa::cuda::backward(emu::handler_stream(), bq.any(), bk.any(), bv.any(),
                                      bs.any(), bg.any(), bdq.any(), bdk.any(), bdv.any(),
                                      bw.any(), bd.any(),
                                      kernel_size, scale, normalizer, border, eps));
}

// A device with the given shared-memory limits and multiprocessors, for the planner bindings.
sapa::cuda::DeviceLimits device_with(int optin, int per_sm, int sms) {
  sapa::cuda::DeviceLimits dev;
  dev.optin = optin;
  dev.per_sm = per_sm;
  dev.sms = sms;
  return dev;
}

// The v2 planner's whole plan (plan.h's Plan) for one problem on a device with the given limits;
// kernel 3 forward_v2, 4 backward_gather_v2. TH > 0: the model's view of that tile and split
// instead of the planner's choice.
py::dict plan_details(int kernel, int64_t n, int H, int W, int s, int K, int d, int C,
                      int optin, int per_sm, int sms, int TH, int TW, int splits) {
  using namespace sapa::cuda;
  const Params P = problem_params(n, H, W, s, K, d, C, 0, 0, 1e-6f, true);
  const DeviceLimits dev = device_with(optin, per_sm, sms);
  const Plan p = TH > 0 ? modelled_plan(static_cast<Kernel>(kernel), P, dev, TH, TW, splits)
                       : make_plan(static_cast<Kernel>(kernel), P, dev);
  py::dict out;
  out["tiled"] = p.tiled;
  out["TH"] = p.TH;
  out["TW"] = p.TW;
  out["splits"] = p.splits;
  out["shared_bytes"] = p.shared_bytes;
  out["blocks"] = p.blocks;
  out["per_sm"] = p.per_sm;
  out["waves"] = p.waves;
  out["halo_ratio"] = p.halo_ratio;
  out["model_us"] = p.model_us;
  return out;
}

// The tile planner's choice for one problem on a device with the given limits:
// (tiled, TH, TW, dynamic shared bytes, blocks); kernel 0 forward, 1 and 2 backward passes.
std::tuple<bool, int, int, size_t, int64_t> plan(int kernel, int64_t n, int H, int W, int s,
                                                 int K, int d, int C, int optin, int per_sm,
                                                 int sms) {
  using namespace sapa::cuda;
  const Params P = problem_params(n, H, W, s, K, d, C, 0, 0, 1e-6f, true);
  const DeviceLimits dev = device_with(optin, per_sm, sms);
  const Plan p = make_plan(static_cast<Kernel>(kernel), P, dev);
  return {p.tiled, p.TH, p.TW, p.shared_bytes, p.blocks};
}

// Test-only: the shared normaliser layer of sapa_common.h (point_stats, tap_weight,
// point_logit_gradients) on given logits and dw of shape (points, taps), in A = float or double;
// inside: which taps are in the map (border "valid" counts only those). Returns
// (stats (points, 2), w, dlogit), all in A.
template <typename A>
py::tuple logit_gradients(int64_t normalizer, int64_t border, double eps,
                          py::array_t<A, py::array::c_style> logit,
                          py::array_t<A, py::array::c_style> dw,
                          py::array_t<bool, py::array::c_style> inside) {
  if (logit.ndim() != 2 || dw.ndim() != 2 || inside.ndim() != 2 ||
      dw.shape(0) != logit.shape(0) || dw.shape(1) != logit.shape(1) ||
      inside.shape(0) != logit.shape(0) || inside.shape(1) != logit.shape(1))
    throw std::invalid_argument("logit, dw and inside must have one (points, taps) shape");
  const int64_t points = logit.shape(0), taps = logit.shape(1);
  py::array_t<A> stats({points, int64_t{2}}), w({points, taps}), dlogit({points, taps});
  const A* x = logit.data();
  const A* g = dw.data();
  const bool* in = inside.data();
  A* st = stats.mutable_data();
  A* wo = w.mutable_data();
  A* dl = dlogit.mutable_data();
  for (int64_t i = 0; i < points; ++i) {
    const A* xi = x + i * taps;
    const bool* ini = in + i * taps;
    auto counted = [&](int64_t p) { return sapa::tap_counted(border, ini[p]); };
    sapa::point_stats<A>(normalizer, A(eps), taps, [&](int64_t p) { return xi[p]; }, counted,
                         &st[2 * i], &st[2 * i + 1]);
    for (int64_t p = 0; p < taps; ++p)
      wo[i * taps + p] = sapa::tap_weight(normalizer, xi[p], st[2 * i], st[2 * i + 1], counted(p));
    std::vector<uint8_t> mask(ini, ini + taps);
    sapa::point_logit_gradients<A>(normalizer, border, A(eps), st[2 * i], st[2 * i + 1], taps, 1,
                                   xi, wo + i * taps, g + i * taps, mask.data(), dl + i * taps);
  }
  return py::make_tuple(stats, w, dlogit);
}

// One block of 32 threads exercising the emulator's asynchronous copies
// (include/cuda_pipeline_primitives.h), for the tests of that model. Thread t copies src[t] and
// src[32 + t] into shared memory in two groups and writes what it then reads to out[t] and
// out[32 + t]. Modes: 0 waits for both groups; 1 reads before waiting; 2 never commits; 3
// waits for all but the newest group; 4 copies to a misaligned and 5 to a global destination.
void async_copy_probe_kernel(int mode, const float* src, float* out) {
  float* sh = reinterpret_cast<float*>(emu::dyn_shared());
  const int t = static_cast<int>(threadIdx.x);
  float* dst = sh;
  if (mode == 4) dst = reinterpret_cast<float*>(reinterpret_cast<char*>(sh) + 2);
  if (mode == 5) dst = out;
  for (int group = 0; group < 2; ++group) {
    __pipeline_memcpy_async(dst + 32 * group + t, src + 32 * group + t, sizeof(float));
    if (mode != 2) __pipeline_commit();
  }
  if (mode == 1)
    for (int group = 0; group < 2; ++group) out[32 * group + t] = sh[32 * group + t];
  __pipeline_wait_prior(mode == 3 ? 1 : 0);
  if (mode != 1 && mode != 5)
    for (int group = 0; group < 2; ++group) out[32 * group + t] = sh[32 * group + t];
}

// (launch error, out) of async_copy_probe_kernel in `mode` with src = 0, 1, ..., 63.
py::tuple async_copy_probe(int mode) {
  std::vector<float> src(64), out(64, -1.f);
  for (int i = 0; i < 64; ++i) src[i] = static_cast<float>(i);
  emu::launch(async_copy_probe_kernel, emu::Cfg(dim3(1), 32, 64 * sizeof(float)), mode,
              src.data(), out.data());
  std::string error;
  error.swap(emu::last_error);
  return py::make_tuple(error, py::array_t<float>(64, out.data()));
}

}  // namespace

PYBIND11_MODULE(sapa_cuda_emu, m) {
  m.def("forward", &forward);
  m.def("plan", &plan);
  m.def("plan_details", &plan_details, py::arg("kernel"), py::arg("n"), py::arg("H"),
        py::arg("W"), py::arg("s"), py::arg("K"), py::arg("d"), py::arg("C"), py::arg("optin"),
        py::arg("per_sm"), py::arg("sms"), py::arg("TH") = 0, py::arg("TW") = 0,
        py::arg("splits") = 1);
  m.def("backward", &backward);
  m.def("logit_gradients_f32", &logit_gradients<float>);
  m.def("logit_gradients_f64", &logit_gradients<double>);
  m.def("async_copy_probe", &async_copy_probe, py::arg("mode"));
  emu::add_controls(m);
  m.def("contract", [] { return sapa::contract(sapa::cuda::kSupportedTypes); });
  // The planner settings of the CUDA module's set_planner (sapa_handlers.h).
  m.def(
      "set_planner",
      [](bool force_simple, int tile_cap, int channel_split) {
        sapa::set_cuda_planner(sapa::PlannerSettings{force_simple, tile_cap, channel_split});
      },
      py::arg("force_simple") = false, py::arg("tile_cap") = 1 << 20,
      py::arg("channel_split") = 0);
  // The CUDA module's set_kernel_generation (sapa_handlers.h): 1 generic kernels, 2 v2.
  m.def("set_kernel_generation", &sapa::set_cuda_kernel_generation, py::arg("generation"));
}

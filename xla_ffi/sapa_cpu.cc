// FFI handlers of the fused SAPA core for XLA:CPU (docs/design.md §1 and §3): validation, the
// choice of SIMD level and the handler symbols. The passes are in cpu/sapa_passes.h (compiled
// once per level through cpu/sapa_level.cc), their primitives in cpu/{types,simd,rows,parallel}.h.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/handler.h"
#include "cpu/levels.h"
#include "cpu/parallel.h"
#include "sapa_common.h"
#include "sapa_handlers.h"
#include "sapa_validate.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using sapa::Geometry;
using sapa::cpu::PassCall;

// ----------------------------------------------------------------------------------------------
// SIMD levels: the best one this processor has, chosen once at load; tests may pin another.

struct Level {
  const char* name;
  sapa::cpu::ForwardEntry forward;
  sapa::cpu::BackwardEntry backward;
  bool (*supported)();
};

const Level kLevels[] = {
    {"baseline", sapa::cpu::baseline::sapa_forward, sapa::cpu::baseline::sapa_backward,
     [] { return true; }},
#if defined(SAPA_CPU_X86_LEVELS)
    {"avx2", sapa::cpu::avx2::sapa_forward, sapa::cpu::avx2::sapa_backward,
     [] { return bool(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")); }},
    {"avx512", sapa::cpu::avx512::sapa_forward, sapa::cpu::avx512::sapa_backward,
     [] {
       return bool(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("fma"));
     }},
#endif
};
constexpr int kLevelCount = int(sizeof kLevels / sizeof kLevels[0]);

int best_level() {
  int best = 0;
  for (int i = 0; i < kLevelCount; ++i)
    if (kLevels[i].supported()) best = i;
  return best;
}

std::atomic<int> current_level{best_level()};

// ----------------------------------------------------------------------------------------------
// Validation: sapa_validate.h, plus the one limit of this back end's own.


std::string check_inputs(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                         const ffi::AnyBuffer& v, int64_t kernel_size, int64_t scale,
                         int64_t normalizer, int64_t border, double eps, Geometry* g) {
  std::string error = sapa::check_inputs(q, k, v, kernel_size, scale, normalizer, border, eps,
                                         sapa::cpu::supported_dtype, sapa::cpu::kSupportedNames, g);
  if (!error.empty()) return error;
  // A worker holds a few (K*K, output width) rows and K band rows of k and v; refuse sizes
  // whose buffers would be absurd rather than die allocating them.
  const double lanes = double(g->oW() + 32 + 2 * g->r * g->s);
  const double bytes =
      8.0 * lanes * (6.0 * double(g->taps()) + double(g->K) * double(g->d + g->C));
  return sapa::cpu::thread_bytes_error(kernel_size, g->oW(), bytes);
}

ffi::Error SapaForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v,
                           ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> stats,
                           int64_t kernel_size, int64_t scale, int64_t normalizer, int64_t border,
                           double eps) {
  Geometry g{};
  std::string error = check_inputs(q, k, v, kernel_size, scale, normalizer, border, eps, &g);
  if (error.empty()) error = sapa::check_forward_outputs(q, g, *out, *stats);
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_forward: " + error);
  const PassCall call{g, normalizer, border, eps, q.element_type(), &pool};
  const Level& level = kLevels[current_level.load()];
  return sapa::cpu::guarded("SAPA", [&] {
    level.forward(call, q.untyped_data(), k.untyped_data(), v.untyped_data(),
                  out->untyped_data(), stats->untyped_data());
  });
}

ffi::Error SapaBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v,
                            ffi::AnyBuffer stats, ffi::AnyBuffer gout,
                            ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                            ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> w,
                            ffi::Result<ffi::AnyBuffer> dlogit, int64_t kernel_size,
                            int64_t scale, int64_t normalizer, int64_t border, double eps) {
  Geometry g{};
  std::string error = check_inputs(q, k, v, kernel_size, scale, normalizer, border, eps, &g);
  if (error.empty())
    error = sapa::check_backward_buffers(q, g, stats, gout, *dq, *dk, *dv, *w, *dlogit);
  if (!error.empty()) return ffi::Error::InvalidArgument("sapa_backward: " + error);
  const PassCall call{g, normalizer, border, eps, q.element_type(), &pool};
  const Level& level = kLevels[current_level.load()];
  return sapa::cpu::guarded("SAPA", [&] {
    level.backward(call, q.untyped_data(), k.untyped_data(), v.untyped_data(),
                   stats.untyped_data(), gout.untyped_data(), dq->untyped_data(),
                   dk->untyped_data(), dv->untyped_data(), w->untyped_data(),
                   dlogit->untyped_data());
  });
}

}  // namespace

namespace sapa {
void set_cpu_max_workers(int64_t workers) {
  sapa::cpu::max_workers_setting.store(std::max<int64_t>(workers, 0));
}
}  // namespace sapa

namespace sapa::cpu {
std::vector<std::string> simd_levels() {
  std::vector<std::string> names;
  for (const Level& level : kLevels)
    if (level.supported()) names.push_back(level.name);
  return names;
}

std::string simd_level() { return kLevels[current_level.load()].name; }

void set_simd_level(const std::string& name) {
  if (name == "auto") {
    current_level.store(best_level());
    return;
  }
  for (int i = 0; i < kLevelCount; ++i) {
    if (name != kLevels[i].name) continue;
    if (!kLevels[i].supported())
      throw std::invalid_argument("simd level " + name + " is not supported by this processor");
    current_level.store(i);
    return;
  }
  std::string known = "\"auto\"";
  for (const std::string& level : simd_levels()) known += ", \"" + level + "\"";
  throw std::invalid_argument("level must be one of " + known + ", got \"" + name + "\"");
}
}  // namespace sapa::cpu

// XLA's intra-op thread pool, then the signature shared with the CUDA handlers
// (sapa_handlers.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(SapaForwardCpu, SapaForwardImpl,
                              sapa::bind_forward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SapaBackwardCpu, SapaBackwardImpl,
                              sapa::bind_backward(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

// The CPU kernels' parallel-for on XLA's intra-op thread pool (ffi::ThreadPool).
#ifndef SAPA_JAX_XLA_FFI_CPU_PARALLEL_H_
#define SAPA_JAX_XLA_FFI_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>

#include "cpu/types.h"
#include "xla/ffi/api/ffi.h"

namespace sapa::cpu {

namespace ffi = xla::ffi;

// The test-only cap of every level's parallel_for (sapa::set_cpu_max_workers); 0: no cap.
inline std::atomic<int64_t> max_workers_setting{0};

inline namespace SAPA_CPU_ISA {

// ----------------------------------------------------------------------------------------------
// Parallel-for over [0, items) on XLA's intra-op thread pool (ffi::ThreadPool): the caller and up
// to the pool's size of scheduled tasks take chunks of consecutive items from a shared counter
// (a slow or descheduled worker does not hold the others up); inline for small work. Items are
// independent, so which worker runs which item does not change a bit of the result.
//
// Pool tasks start late: XLA's pool threads sleep between calls and a woken one started 0.2-0.3
// ms after Schedule on this 2-core VM (a call at the SAPA CPU preset lasts about 1 ms), and
// 40-90% of them only after the caller had finished every item (BENCHMARKS.md, CPU roofline).
// So the caller works from the start and tasks take whatever is left when they come.
//
// The caller never waits for a task that has not started: a task registers as active before it
// touches the caller's state, and one that starts after the caller has finished every item finds
// the job closed and returns. So a busy pool (or a pool thread calling this) cannot deadlock.

struct Join {  // shared by the caller and its tasks, which may outlive the call
  std::mutex mutex;
  std::condition_variable done;
  int64_t active = 0;
  bool closed = false;
  std::exception_ptr error;
};

// fn(state, begin, end) runs items [begin, end) and is called several times per worker;
// make_state() builds one per-worker state (buffers) that is passed to every call of it.
template <typename MakeState, typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t items, double flops_per_item,
                  const MakeState& make_state, const Fn& fn) {
  if (items <= 0) return;
  constexpr double kFlopsPerWorker = 2e5;  // below this a worker costs more than it saves
  int64_t workers = 1 + std::max<int64_t>(pool.num_threads(), 0);
  if (const int64_t cap = max_workers_setting.load(); cap > 0) workers = std::min(workers, cap);
  workers = std::min(workers, items);
  const double by_work = double(items) * flops_per_item / kFlopsPerWorker;
  if (by_work < double(workers)) workers = std::max<int64_t>(1, int64_t(by_work));
  if (workers <= 1) {
    auto state = make_state();
    fn(state, int64_t(0), items);
    return;
  }
  std::atomic<int64_t> next{0};
  auto join = std::make_shared<Join>();
  auto work = [&] {
    try {
      auto state = make_state();
      // Guided chunks: a share of what is left, so the last chunks are short and the caller
      // does not wait long for a task that took a big one (pool tasks start late, see above).
      for (int64_t begin = next.load(std::memory_order_relaxed); begin < items;) {
        const int64_t size = std::max<int64_t>(1, (items - begin) / (2 * workers));
        if (!next.compare_exchange_weak(begin, begin + size, std::memory_order_relaxed))
          continue;  // begin now holds the counter's current value
        fn(state, begin, begin + size);
        begin = next.load(std::memory_order_relaxed);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(join->mutex);
      if (!join->error) join->error = std::current_exception();
      next.store(items);  // stop handing out work
    }
  };
  for (int64_t t = 1; t < workers; ++t) {
    pool.Schedule([join, &work] {
      {
        std::lock_guard<std::mutex> lock(join->mutex);
        if (join->closed) return;  // the caller is done (or gone): nothing of it to touch
        ++join->active;
      }
      work();
      std::lock_guard<std::mutex> lock(join->mutex);
      if (--join->active == 0) join->done.notify_all();
    });
  }
  work();
  std::unique_lock<std::mutex> lock(join->mutex);
  join->closed = true;
  join->done.wait(lock, [&] { return join->active == 0; });
  if (join->error) std::rethrow_exception(join->error);
}

}  // namespace SAPA_CPU_ISA
}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_PARALLEL_H_

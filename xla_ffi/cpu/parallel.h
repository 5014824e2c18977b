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

#include "xla/ffi/api/ffi.h"

namespace sapa::cpu {

namespace ffi = xla::ffi;

// ----------------------------------------------------------------------------------------------
// Parallel-for over [0, items) on XLA's intra-op thread pool (ffi::ThreadPool): the caller and up
// to the pool's size of scheduled tasks take chunks of consecutive items from a shared counter
// (a slow or descheduled worker does not hold the others up); inline for small work. Items are
// independent, so which worker runs which item does not change a bit of the result.
//
// The caller never waits for a task that has not started: a task registers as active before it
// touches the caller's state, and one that starts after the caller has finished every item finds
// the job closed and returns. So a busy pool (or a pool thread calling this) cannot deadlock.

inline std::atomic<int64_t> max_workers_setting{0};  // sapa::set_cpu_max_workers (tests); 0: no cap

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
  const int64_t chunk = std::max<int64_t>(1, items / (workers * 4));
  std::atomic<int64_t> next{0};
  auto join = std::make_shared<Join>();
  auto work = [&] {
    try {
      auto state = make_state();
      for (int64_t begin; (begin = next.fetch_add(chunk)) < items;)
        fn(state, begin, std::min(begin + chunk, items));
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

}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_PARALLEL_H_

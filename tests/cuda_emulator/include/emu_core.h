// CPU emulation of the CUDA execution model, just enough to run xla_ffi/sapa_cuda.cu unchanged.
//
// Blocks run one after another. The threads of a block are fibers (ucontext) on the calling OS
// thread, switched only at __syncthreads / __syncwarp / shuffles: deterministic, cheap (no OS
// thread per CUDA thread) and a divergent barrier is reported as an error instead of a hang.
// Dynamic shared memory is filled with NaN before every block (a read of an unstaged entry
// poisons the result) and followed by a NaN guard that is checked after the block (overflowing
// writes).
//
// Races. Within a barrier interval each fiber runs alone, start to barrier, so a missing barrier
// shows up as a thread reading what another has not yet (or has already) written. Which one it
// sees depends on the order the fibers run in, and that order is a setting (set_schedule):
// in order, reversed, or shuffled with a seed, both for the threads of every interval and for
// the blocks of a grid. Race-free kernels give bitwise the same results under every schedule
// (every thread owns its outputs and sums in a fixed order); the tests compare them. What it
// cannot see: races whose outcome is the same value either way, memory coalescing, bank
// conflicts, registers, occupancy and timing.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

struct dim3 {  // CUDA's: a 3-d grid or block; the emulator runs grids of x * y blocks
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };  // CUDA's alignment, checked by UBSan
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace emu {

// Devices the planner sees (cuda_runtime.h), all with H100 shared-memory limits. Device 0 has a
// single multiprocessor so that the grid-stride loops of the simple kernels wrap around even on
// the tiny test shapes; device 1 has an H100's 132, so that tiny grids are short of a wave.
struct Device { int optin, per_sm, sms; };
constexpr int kDevices = 2;
constexpr int kOptinShared = 232448, kSharedPerSm = 233472;
inline constexpr Device devices[kDevices] = {{kOptinShared, kSharedPerSm, 1},
                                             {kOptinShared, kSharedPerSm, 132}};
inline int current_device = 0;  // cudaGetDevice's answer; launches must match their stream's
// A stream of one device (cudaStream_t is a pointer to one of these).
struct Stream { int device; };
inline Stream streams[kDevices] = {{0}, {1}};
// Runtime calls of the host code, for the tests (cuda_runtime.h counts them).
struct Calls { int get_device = 0, stream_get_device = 0, device_attribute = 0,
               func_set_attribute = 0; };
inline Calls calls;
constexpr int kDefaultShared = 48 * 1024;  // above this a kernel needs cudaFuncSetAttribute
constexpr size_t kGuardFloats = 1024;      // NaN guard after dynamic shared memory
constexpr size_t kStackBytes = 256 * 1024;

struct Launch { unsigned grid; int block; size_t shared_bytes; int device; };  // grid: blocks

enum class State { kRunning, kAtBlockBarrier, kAtWarpBarrier, kDone };
// An asynchronous global -> shared copy (cuda_pipeline_primitives.h), performed at its wait.
struct AsyncCopy { void* dst; const void* src; size_t bytes; };
struct Fiber {
  ucontext_t ctx;
  State state;
  std::vector<AsyncCopy> open;                 // issued since the last commit
  std::vector<std::vector<AsyncCopy>> groups;  // committed, oldest first, not yet waited for
};

inline dim3 cur_thread, cur_block, block_dim, grid_dim;
inline std::vector<Fiber> fibers;
inline std::vector<std::vector<char>> stacks;
inline int cur = 0;
inline ucontext_t scheduler;
inline std::function<void()> body;
inline std::vector<float4> shared;
inline float shuffle_buf[1024];
inline int shuffle_buf_int[1024];
inline std::string last_error;           // set by a failed launch, cleared by cudaGetLastError
inline std::string last_error_reported;  // what cudaGetErrorString shows
// cudaFuncSetAttribute's opt-ins and how often each was set, by (device, kernel)
inline std::map<std::pair<int, const void*>, int> max_dynamic_shared, opt_in_calls;
inline std::vector<Launch> launches;  // read by the tests
inline std::string device_fault;      // a misuse seen inside a kernel, reported by the launch

// Order in which fibers (per barrier interval) and blocks (per grid) run; see the header.
enum class Schedule { kInOrder = 0, kReversed = 1, kShuffled = 2 };
inline Schedule schedule = Schedule::kInOrder;
inline std::mt19937_64 schedule_rng;

inline void set_schedule(int mode, uint64_t seed) {
  schedule = static_cast<Schedule>(mode);
  schedule_rng.seed(seed);
}

// Barrier number the kernels skip (transform.py numbers them), -1 for none.
inline int dropped_barrier = -1;

// 0..n-1 in the current schedule's order.
inline const std::vector<int>& run_order(int n) {
  static std::vector<int> order;
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  if (schedule == Schedule::kReversed) std::reverse(order.begin(), order.end());
  if (schedule == Schedule::kShuffled) std::shuffle(order.begin(), order.end(), schedule_rng);
  return order;
}

inline float4* dyn_shared() { return shared.data(); }

inline void wait(State s) {
  fibers[cur].state = s;
  swapcontext(&fibers[cur].ctx, &scheduler);
}

inline void fiber_entry() {
  body();
  fibers[cur].state = State::kDone;  // uc_link returns to the scheduler
}

// Runs every fiber up to its next barrier, then releases the barriers that are complete.
// Exited threads count as arrived. Returns an error when nothing can move (divergent barrier).
inline std::string run_block(int threads) {
  for (;;) {
    for (const int t : run_order(threads)) {
      cur = t;
      if (fibers[cur].state != State::kRunning) continue;
      cur_thread = dim3{unsigned(cur), 0, 0};
      swapcontext(&scheduler, &fibers[cur].ctx);
    }
    bool all_done = true, all_block = true, released = false;
    for (int w = 0; w < threads / 32; ++w) {
      bool warp_waits = true, any = false;
      for (int l = 32 * w; l < 32 * w + 32; ++l) {
        const State s = fibers[l].state;
        all_done &= s == State::kDone;
        all_block &= s != State::kAtWarpBarrier;
        warp_waits &= s != State::kAtBlockBarrier;
        any |= s == State::kAtWarpBarrier;
      }
      if (warp_waits && any) {
        for (int l = 32 * w; l < 32 * w + 32; ++l)
          if (fibers[l].state == State::kAtWarpBarrier) fibers[l].state = State::kRunning;
        released = true;
      }
    }
    if (all_done) return {};
    if (released) continue;
    if (!all_block) return "deadlock: a warp is split between __syncwarp and __syncthreads";
    for (int t = 0; t < threads; ++t)
      if (fibers[t].state == State::kAtBlockBarrier) fibers[t].state = State::kRunning;
  }
}

inline bool guard_intact(size_t floats) {
  const float* f = reinterpret_cast<const float*>(shared.data());
  for (size_t i = floats; i < floats + kGuardFloats; ++i)
    if (!std::isnan(f[i])) return false;
  return true;
}

struct Cfg {
  dim3 grid; int block; size_t shared_bytes; int device;  // the stream's device
  Cfg(dim3 g, int b, size_t s, const Stream* stream)
      : grid(g), block(b), shared_bytes(s), device(stream ? stream->device : current_device) {}
  Cfg(dim3 g, int b, size_t s = 0)
      : grid(g), block(b), shared_bytes(s), device(current_device) {}
};

// Fresh fiber t for the next block. A function of its own: getcontext may return twice, and
// locals of the frame calling it (the launch loop's) would be "clobbered" (-Wclobbered).
__attribute__((noinline)) inline void init_fiber(int t) {
  stacks[t].resize(kStackBytes);
  getcontext(&fibers[t].ctx);
  fibers[t].ctx.uc_stack.ss_sp = stacks[t].data();
  fibers[t].ctx.uc_stack.ss_size = kStackBytes;
  fibers[t].ctx.uc_link = &scheduler;
  fibers[t].state = State::kRunning;
  fibers[t].open.clear();  // copies a finished block never waited for are lost
  fibers[t].groups.clear();
  makecontext(&fibers[t].ctx, fiber_entry, 0);
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), Cfg cfg, Args&&... args) {
  const unsigned blocks = cfg.grid.x * cfg.grid.y;
  launches.push_back({blocks, cfg.block, cfg.shared_bytes, cfg.device});
  device_fault.clear();
  auto it = max_dynamic_shared.find({cfg.device, reinterpret_cast<const void*>(kernel)});
  const size_t allowed = it == max_dynamic_shared.end() ? kDefaultShared : it->second;
  if (cfg.device != current_device) {  // a GPU refuses a stream of another device
    last_error = "invalid resource handle: stream of device " + std::to_string(cfg.device) +
                 ", current device " + std::to_string(current_device);
    return;
  }
  if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.y > 65535 || cfg.grid.z != 1 ||
      cfg.block <= 0 || cfg.block > 1024 || cfg.block % 32 != 0) {
    last_error = "invalid configuration argument";
    return;
  }
  if (cfg.shared_bytes > allowed) {
    last_error = "too much dynamic shared memory: " + std::to_string(cfg.shared_bytes) + " > " +
                 std::to_string(allowed);
    return;
  }
  const size_t floats = (cfg.shared_bytes + 15) / 16 * 4;
  shared.assign(floats / 4 + kGuardFloats / 4, float4{});
  fibers.resize(cfg.block);
  stacks.resize(cfg.block);
  block_dim = dim3{unsigned(cfg.block), 1, 1};
  grid_dim = dim3{cfg.grid.x, cfg.grid.y, 1};
  body = [&]() { kernel(args...); };
  const std::vector<int> block_order = run_order(static_cast<int>(blocks));
  for (const int b : block_order) {
    cur_block = dim3{unsigned(b) % cfg.grid.x, unsigned(b) / cfg.grid.x, 0};
    float* f = reinterpret_cast<float*>(shared.data());
    std::fill(f, f + shared.size() * 4, std::nanf(""));
    for (int t = 0; t < cfg.block; ++t) init_fiber(t);
    std::string err = run_block(cfg.block);
    if (err.empty() && !guard_intact(floats)) err = "write past the end of dynamic shared memory";
    if (err.empty()) err.swap(device_fault);
    if (!err.empty()) {
      last_error = err + " (block " + std::to_string(b) + ")";
      return;
    }
  }
}

}  // namespace emu

#define threadIdx emu::cur_thread
#define blockIdx emu::cur_block
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::wait(emu::State::kAtBlockBarrier); }
// A barrier call of the kernels, numbered by transform.py, unless it is the one dropped.
#define EMU_BARRIER(index, call) ((emu::dropped_barrier == (index)) ? void() : call)
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::State::kAtWarpBarrier); }
// One lane-exchange buffer per shuffled type, so no value passes through another type.
template <typename V> inline V shuffle_xor(V* warp_buf, V x, int lane_mask) {
  const int lane = threadIdx.x & 31;
  V* buf = warp_buf + (threadIdx.x & ~31u);
  buf[lane] = x;
  __syncwarp();
  const V other = buf[lane ^ lane_mask];
  __syncwarp();  // nobody overwrites buf before every lane has read it
  return other;
}
inline float __shfl_xor_sync(unsigned, float x, int lane_mask) {
  return shuffle_xor(emu::shuffle_buf, x, lane_mask);
}
inline int __shfl_xor_sync(unsigned, int x, int lane_mask) {
  return shuffle_xor(emu::shuffle_buf_int, x, lane_mask);
}

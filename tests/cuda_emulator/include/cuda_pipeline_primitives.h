// CUDA's asynchronous-copy primitives (cp.async, sm_80+) as the emulator runs them.
//
// A copy is not done when it is issued: its destination is filled with NaN at once, and the
// bytes arrive only when the issuing thread waits for its group (__pipeline_wait_prior(n)
// completes every committed group but the newest n; copies not yet committed are never waited
// for). So a kernel that reads staged data before its wait, or whose wait is dropped
// (transform.py numbers the waits with the barriers), reads NaN; one that reads another
// thread's copy without a barrier after that thread's wait is a race the schedules expose.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "emu_core.h"

namespace emu {

inline bool in_shared(const void* p, size_t bytes) {
  const char* lo = reinterpret_cast<const char*>(shared.data());
  const char* c = static_cast<const char*>(p);
  return c >= lo && c + bytes <= lo + shared.size() * sizeof(float4);
}

inline void async_copy_fault(const std::string& what) {
  if (device_fault.empty()) device_fault = "__pipeline_memcpy_async: " + what;
}

}  // namespace emu

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global,
                                    size_t size_and_align, size_t zfill = 0) {
  const size_t n = size_and_align;
  if (n != 4 && n != 8 && n != 16) return emu::async_copy_fault("size must be 4, 8 or 16 bytes");
  if (zfill != 0) return emu::async_copy_fault("zfill is not modelled");
  if (reinterpret_cast<uintptr_t>(dst_shared) % n || reinterpret_cast<uintptr_t>(src_global) % n)
    return emu::async_copy_fault("source and destination must be aligned to the size");
  if (!emu::in_shared(dst_shared, n))
    return emu::async_copy_fault("destination outside dynamic shared memory");
  if (emu::in_shared(src_global, n)) return emu::async_copy_fault("source in shared memory");
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (size_t i = 0; i < n; i += sizeof nan)
    std::memcpy(static_cast<char*>(dst_shared) + i, &nan, sizeof nan);
  emu::fibers[emu::cur].open.push_back({dst_shared, src_global, n});
}

inline void __pipeline_commit() {
  emu::Fiber& f = emu::fibers[emu::cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

inline void __pipeline_wait_prior(size_t prior) {
  auto& groups = emu::fibers[emu::cur].groups;
  while (groups.size() > prior) {
    for (const emu::AsyncCopy& c : groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    groups.erase(groups.begin());
  }
}

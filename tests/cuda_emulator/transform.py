"""Source rewrite of xla_ffi/sapa_cuda.cu into C++ that g++ compiles against include/.

Only the two constructs a header cannot emulate are rewritten; everything else (the kernels,
the planner, the FFI entry points) is compiled unchanged. Each rewrite checks that it still
matches the .cu, so a change of the CUDA source fails loudly instead of testing stale code.

Every barrier call (`__syncthreads()`, `__syncwarp()`) in the kernels is also numbered and
wrapped so that the emulator can skip one of them at run time (`emu::dropped_barrier`): the
tests drop each barrier in turn and check that the race checks notice, which shows both that the
barrier is needed and that the checks can see its absence.
"""
from __future__ import annotations

import re
from typing import NamedTuple

# `extern __shared__ float4 shared4[];` -> a pointer to the emulator's per-block buffer.
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
# `name<T><<<grid, block, bytes, stream>>>(` -> `emu::launch(name<T>, emu::Cfg(...), `
LAUNCH = re.compile(r"(\w+\s*<\s*\w+\s*>)\s*<<<(.*?)>>>\s*\(", re.S)
# The entry points the pybind11 module calls (emu_module.cc binds their argument lists).
ENTRY_POINTS = ("ffi::Error SapaForwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer q,",
                "ffi::Error SapaBackwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer q,")


CARAFE_ENTRY_POINTS = (
    "ffi::Error CarafeForwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer x,",
    "ffi::Error CarafeBackwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer x,")


BARRIER = re.compile(r"\b(__syncthreads|__syncwarp)\(\)")


class TransformMismatch(RuntimeError):
    """sapa_cuda.cu no longer has the shape the rewrite expects."""


class BarrierSite(NamedTuple):
    """One barrier call of sapa_cuda.cu: its number in the emulator, where it is, what it says."""
    index: int
    line: int
    call: str
    comment: str

    def __str__(self):
        note = f"  // {self.comment}" if self.comment else ""
        return f"barrier #{self.index} at sapa_cuda.cu:{self.line}: {self.call}(){note}"


def number_barriers(src: str) -> tuple[str, list[BarrierSite]]:
    """Wraps every barrier call in code (not comments) as EMU_BARRIER(index, call())."""
    sites: list[BarrierSite] = []
    lines = src.splitlines(keepends=True)
    for i, line in enumerate(lines):
        code, sep, comment = line.partition("//")

        def wrap(m, line_no=i + 1, comment=comment.strip()):
            sites.append(BarrierSite(len(sites), line_no, m[1], comment))
            return f"EMU_BARRIER({len(sites) - 1}, {m[0]})"

        lines[i] = BARRIER.sub(wrap, code) + sep + comment
    if not sites:
        raise TransformMismatch("no __syncthreads() or __syncwarp() call found in the kernels")
    return "".join(lines), sites


def transform(src: str, entry_points=ENTRY_POINTS,
              needs_shared: bool = True) -> tuple[str, list[BarrierSite]]:
    """The emulator's C++ source, and the barrier calls it numbered. `entry_points` and
    `needs_shared` (does the source declare dynamic shared memory) describe the .cu: the
    defaults sapa_cuda.cu, CARAFE_ENTRY_POINTS and False xla_ffi/carafe_cuda.cu."""
    src, sites = number_barriers(src)  # first, while the line numbers are the .cu's
    src, n_shared = DYNAMIC_SHARED.subn(
        lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(emu::dyn_shared());", src)
    if n_shared == 0 and needs_shared:
        raise TransformMismatch(
            f"pattern DYNAMIC_SHARED ({DYNAMIC_SHARED.pattern!r}) matched nothing: the tiled "
            "kernels no longer declare `extern __shared__ T name[];`")
    # A static `__shared__ T buf[N];` would silently become a per-thread local array.
    code = [l for l in src.splitlines() if "__shared__" in l and not l.lstrip().startswith("//")]
    if code:
        raise TransformMismatch(
            f"a __shared__ declaration the emulator does not handle: {code[0].strip()!r}")

    n_chevrons = src.count("<<<")
    src, n_launch = LAUNCH.subn(
        lambda m: f"emu::launch({m[1]}, emu::Cfg({m[2]}), ", src)
    if n_launch == 0 or "<<<" in src:
        raise TransformMismatch(
            f"pattern LAUNCH ({LAUNCH.pattern!r}) rewrote {n_launch} of {n_chevrons} kernel "
            "launches: a launch is no longer `kernel<T><<<...>>>(args)`")

    for entry in entry_points:
        if entry not in src:
            raise TransformMismatch(
                f"entry point {entry!r} not found: the FFI implementation functions were "
                "renamed or their signature changed; update emu_module.cc")
    return src, sites

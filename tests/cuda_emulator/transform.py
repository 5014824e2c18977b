"""Source rewrite of the CUDA back end (xla_ffi/sapa_cuda.cu and xla_ffi/cuda/) into C++ that g++
compiles against include/.

Only the two constructs a header cannot emulate are rewritten; everything else (the kernels,
the planner, the entry points of cuda/entry.h) is compiled unchanged. Each rewrite checks that it
still matches the sources, so a change of the CUDA code fails loudly instead of testing stale
code. The entry points are not found here: emu_module.cc includes cuda/entry.h and calls them,
so a changed signature fails to compile.

Every barrier call (`__syncthreads()`, `__syncwarp()`) in the kernels is also numbered (across
all files) and wrapped so that the emulator can skip one of them at run time
(`emu::dropped_barrier`): the tests drop each barrier in turn and check that the race checks
notice, which shows both that the barrier is needed and that the checks can see its absence.
The waits for asynchronous copies (`__pipeline_wait_prior(n)`) are numbered with them: a dropped
wait leaves its copies undone (include/cuda_pipeline_primitives.h), which the tests must notice
too.
"""
from __future__ import annotations

import re
from typing import NamedTuple

# `extern __shared__ float4 shared4[];` -> a pointer to the emulator's per-block buffer.
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
# `name<T><<<grid, block, bytes, stream>>>(` -> `emu::launch(name<T>, emu::Cfg(...), `
# (also `ns::name<T, K, S>`: the v2 kernels have compile-time K and s)
LAUNCH = re.compile(r"((?:\w+::)*\w+\s*<[\w\s,:]*>)\s*<<<(.*?)>>>\s*\(", re.S)
BARRIER = re.compile(r"\b(__syncthreads|__syncwarp|__pipeline_wait_prior)\(\d*\)")


class TransformMismatch(RuntimeError):
    """The CUDA sources no longer have the shape the rewrite expects."""


class BarrierSite(NamedTuple):
    """One barrier call (or async-copy wait) of the CUDA sources: its number in the emulator,
    where it is, what it says."""
    index: int
    file: str
    line: int
    call: str
    comment: str

    def __str__(self):
        note = f"  // {self.comment}" if self.comment else ""
        return f"barrier #{self.index} at {self.file}:{self.line}: {self.call}{note}"


def number_barriers(name: str, src: str, first: int) -> tuple[str, list[BarrierSite]]:
    """Wraps every barrier call in code (not comments) as EMU_BARRIER(index, call()), numbering
    from `first`."""
    sites: list[BarrierSite] = []
    lines = src.splitlines(keepends=True)
    for i, line in enumerate(lines):
        code, sep, comment = line.partition("//")

        def wrap(m, line_no=i + 1, comment=comment.strip()):
            index = first + len(sites)
            sites.append(BarrierSite(index, name, line_no, m[0], comment))
            return f"EMU_BARRIER({index}, {m[0]})"

        lines[i] = BARRIER.sub(wrap, code) + sep + comment
    return "".join(lines), sites


def transform_file(name: str, src: str, first_barrier: int):
    """One file's rewrite: (source, barrier sites, dynamic-shared rewrites, launch rewrites)."""
    src, sites = number_barriers(name, src, first_barrier)  # first, while lines are the file's
    src, n_shared = DYNAMIC_SHARED.subn(
        lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(emu::dyn_shared());", src)
    # A static `__shared__ T buf[N];` would silently become a per-thread local array.
    code = [l for l in src.splitlines() if "__shared__" in l and not l.lstrip().startswith("//")]
    if code:
        raise TransformMismatch(
            f"{name}: a __shared__ declaration the emulator does not handle: {code[0].strip()!r}")
    n_chevrons = src.count("<<<")
    src, n_launch = LAUNCH.subn(lambda m: f"emu::launch({m[1]}, emu::Cfg({m[2]}), ", src)
    if "<<<" in src:
        raise TransformMismatch(
            f"{name}: pattern LAUNCH ({LAUNCH.pattern!r}) rewrote {n_launch} of {n_chevrons} "
            "kernel launches: a launch is no longer `kernel<T><<<...>>>(args)`")
    return src, sites, n_shared, n_launch


def transform(sources: dict[str, str],
              needs_shared: bool = True) -> tuple[dict[str, str], list[BarrierSite]]:
    """The emulator's C++ sources ({relative path: text}, same paths as given) and the barrier
    calls they number. `needs_shared`: must the sources declare dynamic shared memory (the SAPA
    tiled kernels do; the CARAFE kernels have none)."""
    out: dict[str, str] = {}
    sites: list[BarrierSite] = []
    n_shared = n_launch = 0
    for name in sorted(sources):
        text, file_sites, shared, launches = transform_file(name, sources[name], len(sites))
        out[name] = text
        sites += file_sites
        n_shared += shared
        n_launch += launches
    if not sites:
        raise TransformMismatch("no __syncthreads() or __syncwarp() call found in the kernels")
    if n_shared == 0 and needs_shared:
        raise TransformMismatch(
            f"pattern DYNAMIC_SHARED ({DYNAMIC_SHARED.pattern!r}) matched nothing: the tiled "
            "kernels no longer declare `extern __shared__ T name[];`")
    if n_launch == 0:
        raise TransformMismatch(f"pattern LAUNCH ({LAUNCH.pattern!r}) matched no kernel launch")
    return out, sites

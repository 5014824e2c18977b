"""Source rewrite of xla_ffi/sapa_cuda.cu into C++ that g++ compiles against include/.

Only the two constructs a header cannot emulate are rewritten; everything else (the kernels,
the planner, the FFI entry points) is compiled unchanged. Each rewrite checks that it still
matches the .cu, so a change of the CUDA source fails loudly instead of testing stale code.
"""
from __future__ import annotations

import re

# `extern __shared__ float4 shared4[];` -> a pointer to the emulator's per-block buffer.
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
# `name<T><<<grid, block, bytes, stream>>>(` -> `emu::launch(name<T>, emu::Cfg(...), `
LAUNCH = re.compile(r"(\w+\s*<\s*\w+\s*>)\s*<<<(.*?)>>>\s*\(", re.S)
# The entry points the pybind11 module calls (emu_module.cc binds their argument lists).
ENTRY_POINTS = ("ffi::Error SapaForwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer q,",
                "ffi::Error SapaBackwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer q,")


class TransformMismatch(RuntimeError):
    """sapa_cuda.cu no longer has the shape the rewrite expects."""


def transform(src: str) -> str:
    src, n_shared = DYNAMIC_SHARED.subn(
        lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(emu::dyn_shared());", src)
    if n_shared == 0:
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

    for entry in ENTRY_POINTS:
        if entry not in src:
            raise TransformMismatch(
                f"entry point {entry!r} not found: the FFI implementation functions were "
                "renamed or their signature changed; update emu_module.cc")
    return src

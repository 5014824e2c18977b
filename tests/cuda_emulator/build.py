"""Builds the CPU emulation of the CUDA back end (xla_ffi/sapa_cuda.cu, xla_ffi/cuda/) as a Python
extension (see emu_core.h)."""
from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess
import sysconfig

from .transform import TransformMismatch, transform  # noqa: F401  (re-exported)

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
FFI_DIR = REPO / "xla_ffi"
# The CUDA sources, relative to xla_ffi/: the handlers and every header of xla_ffi/cuda/.
CUDA_SOURCES = ("sapa_cuda.cu", "cuda")
MODULE = "sapa_cuda_emu"
UBSAN_CHECKS = "alignment,bounds,signed-integer-overflow"
UBSAN_REPORT = "runtime error:"  # how every UBSan report begins its message


class ToolMissing(RuntimeError):
    """g++, pybind11 or the jaxlib FFI headers are not available."""


class BuildFailed(RuntimeError):
    """g++ rejected the emulated source."""


def _include_dirs() -> list[str]:
    if shutil.which("g++") is None:
        raise ToolMissing("g++ not found on PATH")
    try:
        import pybind11
    except ImportError as e:
        raise ToolMissing(f"pybind11 is not installed ({e})") from e
    try:
        import jax.ffi
        ffi_include = jax.ffi.include_dir()
    except (ImportError, AttributeError) as e:
        raise ToolMissing(f"jax.ffi.include_dir() unavailable ({e})") from e
    return [str(HERE / "include"), str(REPO / "xla_ffi"), ffi_include, pybind11.get_include(),
            sysconfig.get_paths()["include"]]


def build(out_dir: pathlib.Path):
    """Rewrites, compiles and imports the emulator module; returns the module, with the numbered
    barrier calls of the source as `module.barrier_sites` (transform.BarrierSite)."""
    sources = {}
    for entry in CUDA_SOURCES:
        path = FFI_DIR / entry
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        # the SAPA-D kernels (cuda/deform_*) are build_deform's: their barriers are not SAPA's
        files = [p for p in files if not p.name.startswith("deform_")]
        sources.update({str(p.relative_to(FFI_DIR)): p.read_text() for p in files})
    return _compile(out_dir, MODULE, sources, HERE / "emu_module.cc")


# The CARAFE kernels: their .cu and the kernel-layer headers they use (they have no barriers).
CARAFE_SOURCES = ("carafe_cuda.cu", "cuda/device.cuh", "cuda/runtime.h")
CARAFE_MODULE = "carafe_cuda_emu"


def build_carafe(out_dir: pathlib.Path):
    """`build` for the CARAFE kernels (xla_ffi/carafe_cuda.cu, carafe_emu_module.cc)."""
    sources = {name: (FFI_DIR / name).read_text() for name in CARAFE_SOURCES}
    return _compile(out_dir, CARAFE_MODULE, sources, HERE / "carafe_emu_module.cc",
                    needs_shared=False)


# The SAPA-D kernels: their .cu and every cuda/deform_* header (the other kernel-layer headers
# they include have no barriers and need no rewrite).
DEFORM_MODULE = "deform_cuda_emu"


def build_deform(out_dir: pathlib.Path):
    """`build` for the SAPA-D kernels (xla_ffi/deform_cuda.cu, deform_emu_module.cc)."""
    names = ["deform_cuda.cu"] + sorted(
        str(p.relative_to(FFI_DIR)) for p in (FFI_DIR / "cuda").glob("deform_*"))
    sources = {name: (FFI_DIR / name).read_text() for name in names}
    return _compile(out_dir, DEFORM_MODULE, sources, HERE / "deform_emu_module.cc")


def _compile(out_dir, module_name, sources, module_source, needs_shared=True):
    includes = _include_dirs()
    out_dir = pathlib.Path(out_dir)
    rewritten, sites = transform(sources, needs_shared=needs_shared)
    # Mirrored under out_dir, which comes first on the include path: the rewritten .cu includes
    # the rewritten headers ("cuda/forward.cuh", ...), and sapa_common.h & co. from xla_ffi/.
    for name, text in rewritten.items():
        target_file = out_dir / name
        target_file.parent.mkdir(parents=True, exist_ok=True)
        target_file.write_text(text)
    target = out_dir / (module_name + sysconfig.get_config_var("EXT_SUFFIX"))
    # -O1: the build is part of the test's time budget; -O2 buys little on these tiny shapes.
    # UBSan reports (on stderr, the run goes on) what x86 would let pass but a GPU would not:
    # misaligned vector loads and stores, and out-of-range indices into fixed-size arrays; plus
    # int overflow in the index arithmetic. The tests fail on any such report.
    # Warnings are errors, as in the CUDA build (SAPA_STRICT); the CUDA-only pragmas (#pragma
    # unroll, nv_diag_*) are unknown to g++, and the FFI, pybind11 and Python headers are
    # system headers (not ours to fix).
    local, system = includes[:2], includes[2:]
    cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
           "-Wno-unknown-pragmas", f"-fsanitize={UBSAN_CHECKS}", f"-I{out_dir}",
           *(f"-I{d}" for d in local), *(f"-isystem{d}" for d in system),
           str(module_source), "-o", str(target)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [l for l in proc.stderr.splitlines() if "error" in l][:20]
        raise BuildFailed(f"g++ failed to compile the emulated {module_name} sources:\n"
                          + "\n".join(errors))
    spec = importlib.util.spec_from_file_location(module_name, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.barrier_sites = sites
    return module

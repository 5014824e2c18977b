"""Builds the CPU emulation of xla_ffi/sapa_cuda.cu as a Python extension (see emu_core.h)."""
from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess
import sysconfig

from .transform import CARAFE_ENTRY_POINTS, TransformMismatch, transform  # noqa: F401

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
CUDA_SOURCE = REPO / "xla_ffi" / "sapa_cuda.cu"
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
    source, sites = transform(CUDA_SOURCE.read_text())
    return _compile(out_dir, MODULE, source, sites, HERE / "emu_module.cc")


CARAFE_SOURCE = REPO / "xla_ffi" / "carafe_cuda.cu"
CARAFE_MODULE = "carafe_cuda_emu"


def build_carafe(out_dir: pathlib.Path):
    """`build` for the CARAFE kernels (xla_ffi/carafe_cuda.cu, carafe_emu_module.cc)."""
    source, sites = transform(CARAFE_SOURCE.read_text(), CARAFE_ENTRY_POINTS,
                              needs_shared=False)
    return _compile(out_dir, CARAFE_MODULE, source, sites, HERE / "carafe_emu_module.cc")


def _compile(out_dir, module_name, source, sites, module_source):
    includes = _include_dirs()
    out_dir = pathlib.Path(out_dir)
    (out_dir / f"{module_name}.inc").write_text(source)
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
        raise BuildFailed(f"g++ failed to compile the emulated {module_name}:\n"
                          + "\n".join(errors))
    spec = importlib.util.spec_from_file_location(module_name, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.barrier_sites = sites
    return module

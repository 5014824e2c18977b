"""Shared test fixtures: scoped float64 mode, GPU skipping, random inputs."""
from __future__ import annotations

import os

# Eight host devices for the sharding tests; set before JAX starts (device count is fixed then).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax
import numpy as np
import pytest


def _gpu_visible() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_visible():
        return
    skip = pytest.mark.skip(reason="no GPU visible to JAX")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def x64():
    """Run one test with jax_enable_x64 on, restoring the previous value after it."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def random_qkv(seed, batch, height, width, scale, dim, channels, dtype=np.float32, magnitude=1.0):
    """NumPy q (B, sH, sW, d), k (B, H, W, d), v (B, H, W, C) with entries of size `magnitude`."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, height * scale, width * scale, dim)) * magnitude
    k = rng.standard_normal((batch, height, width, dim)) * magnitude
    v = rng.standard_normal((batch, height, width, channels))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def build_emulator(tmp_path_factory, builder: str, what: str):
    """One emulator module from `tests/cuda_emulator/build.py`'s `builder`, for `what` (the
    sources named in the failure message); skipped where the tools are missing."""
    from cuda_emulator import build as emu_build  # tests/ is on sys.path (rootdir conftest)
    try:
        return getattr(emu_build, builder)(tmp_path_factory.mktemp(builder))
    except emu_build.ToolMissing as e:
        pytest.skip(f"cannot build the CUDA emulator: {e}")
    except emu_build.BuildFailed as e:
        pytest.fail(str(e), pytrace=False)
    except emu_build.TransformMismatch as e:
        pytest.fail(f"{what} no longer match(es) tests/cuda_emulator/transform.py: {e}",
                    pytrace=False)


@pytest.fixture(scope="session")
def emu_module(tmp_path_factory):
    """The CUDA emulator (tests/cuda_emulator), built once per session for every test file that
    runs the SAPA CUDA kernels on it (test_cuda_emulated.py, test_cuda_v2_emulated.py,
    test_cuda_plan_emulated.py)."""
    return build_emulator(tmp_path_factory, "build", "the SAPA CUDA sources")


@pytest.fixture(scope="session")
def carafe_emu_module(tmp_path_factory):
    """The CARAFE kernels on the CUDA emulator, built once per session
    (test_carafe_cuda_emulated.py, test_cuda_plan_emulated.py)."""
    return build_emulator(tmp_path_factory, "build_carafe", "xla_ffi/carafe_cuda.cu")


@pytest.fixture(scope="session")
def deform_emu_module(tmp_path_factory):
    """The SAPA-D kernels on the CUDA emulator, built once per session
    (test_deform_cuda_emulated.py)."""
    return build_emulator(tmp_path_factory, "build_deform", "xla_ffi/deform_cuda.cu")

"""Every SIMD level of the CPU kernel (baseline, AVX2, AVX-512), pinned through the compiled
module's test-only `set_simd_level`: each matches the float64 jnp reference and is bitwise
deterministic across runs and thread counts. Levels this build or processor lacks are skipped.

The level is a run-time switch of the handlers, so one compiled program serves every level:
the programs and references are built once per case and shared by the level parametrisations.
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sapa_jax

from conftest import random_qkv

pytestmark = pytest.mark.skipif(not sapa_jax.ffi_available("cpu"),
                                reason="the SAPA CPU FFI kernel is not built")

LEVELS = ("baseline", "avx2", "avx512")

# (normalizer, border, scale, kernel_size, batch, height, width, d, C, dtype, tolerance)
CASES = [
    # 68 output columns: three lane blocks, the last one partial; C = 77: every channel block
    ("softmax", "zeros", 2, 5, 2, 4, 34, 16, 77, "float32", 1e-5),
    ("softplus", "valid", 3, 3, 1, 3, 5, 33, 20, "float32", 1e-5),
    ("sigmoid", "zeros", 1, 7, 1, 5, 6, 8, 40, "float64", 1e-12),
    ("softmax", "valid", 2, 5, 1, 3, 9, 12, 64, "bfloat16", 1e-2),
]


def _module():
    return importlib.import_module("sapa_jax._sapa_cpu")


@pytest.fixture
def level(request):
    module = _module()
    if request.param not in module.simd_levels():
        pytest.skip(f"SIMD level {request.param} is not compiled in or not supported here "
                    f"(available: {module.simd_levels()})")
    module.set_simd_level(request.param)
    try:
        yield request.param
    finally:
        module.set_simd_level("auto")
        module.set_max_workers(0)


@functools.lru_cache(maxsize=None)
def _programs(case):
    """(Under the x64 fixture, as every caller is.) The case's inputs, cotangent, its jitted ffi out+vjp, and the float64 xla reference."""
    normalizer, border, scale, kernel_size, batch, height, width, dim, channels, dtype, _ = case
    q, k, v = random_qkv(0, batch, height, width, scale, dim, channels, dtype=np.float64,
                         magnitude=dim ** -0.25)
    opts = dict(kernel_size=kernel_size, scale=scale, normalizer=normalizer, border=border)
    cot = np.random.default_rng(1).standard_normal((batch, height * scale, width * scale,
                                                    channels))
    args = tuple(jnp.asarray(a, dtype) for a in (q, k, v, cot))

    def value_and_vjp(impl):
        f = lambda q, k, v: sapa_jax.sapa_upsample(q, k, v, impl=impl, **opts)

        @jax.jit
        def run(q, k, v, cot):
            out, vjp = jax.vjp(f, q, k, v)
            return (out, *vjp(cot))
        return run

    want = [np.asarray(a, np.float64) for a in value_and_vjp("xla")(
        *(jnp.asarray(np.asarray(a, np.float64)) for a in args))]
    return args, value_and_vjp("ffi"), want


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:4] + c[9:10])))
def test_level_matches_reference(x64, level, case):
    args, run, want = _programs(case)
    got = run(*args)
    assert _module().simd_level() == level
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == jnp.dtype(case[9]), name
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=case[10], atol=case[10],
                                   err_msg=f"{name} at {level}")


@pytest.mark.parametrize("level", LEVELS, indirect=True)
def test_level_is_deterministic_across_threads(x64, level):
    # Big enough that a call splits its work over XLA's pool and the caller.
    case = ("softmax", "zeros", 2, 5, 2, 16, 16, 16, 32, "float32", 1e-5)
    args, run, _ = _programs(case)
    module = _module()
    first = [np.asarray(a) for a in run(*args)]
    again = [np.asarray(a) for a in run(*args)]
    module.set_max_workers(1)
    single = [np.asarray(a) for a in run(*args)]
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), first, again, single):
        assert np.array_equal(a, b), f"{name} at {level}: runs differ"
        assert np.array_equal(a, c), f"{name} at {level}: thread counts differ"


def test_set_simd_level_rejects_unknown_names():
    module = _module()
    assert module.simd_levels()[0] == "baseline"
    assert module.simd_level() == module.simd_levels()[-1]  # the best is chosen at load
    with pytest.raises(ValueError, match=r'level must be one of .*got "sse9"'):
        module.set_simd_level("sse9")
    assert module.simd_level() == module.simd_levels()[-1]

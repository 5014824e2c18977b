"""SAPA-D fused kernel (impl="ffi") against the jnp path (impl="xla"), which tests/test_deform.py
holds to the independent PyTorch oracle: values and gradients of all four inputs, samples off
the map, at fractional and integer positions and on the range boundary; every dtype; bitwise
determinism over runs and thread counts; non-finite values; malformed calls.
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sapa_jax
from sapa_jax import _ffi
from test_deform import core_inputs
from test_parity_torch import rel_err

pytestmark = pytest.mark.skipif(not _ffi.deform_built("cpu"),
                                reason="the CPU kernel module is not built")
NAMES = ("out", "dq", "dk", "dv", "doffsets")


@functools.lru_cache(maxsize=None)
def _value_and_grads_fn(impl, num_points, groups, scale):
    def loss(q, k, v, off, cot):
        out = sapa_jax.deform_upsample(q, k, v, off, num_points=num_points, groups=groups,
                                       scale=scale, impl=impl)
        return jnp.sum(out * cot.astype(out.dtype)), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def value_and_grads(impl, arrays, cot, *, num_points, groups, scale):
    """out and the gradients of sum(out * cot) w.r.t. q, k, v, offsets (jitted once per
    option set and shape)."""
    (_, out), grads = _value_and_grads_fn(impl, num_points, groups, scale)(*arrays, cot)
    return [np.asarray(a) for a in (out, *grads)]


def case_arrays(case, dtype, seed=0):
    points, groups, dim, cg, s, (b, h, w) = case
    q, k, v, off = core_inputs(seed + points, b, h, w, s, points, groups, dim, groups * cg)
    # integer positions too: point 1 of group 0 sits exactly on a pixel everywhere
    if points > 1:
        off[..., 2:4] = np.round(off[..., 2:4])
    cot = np.random.default_rng(seed + 1).standard_normal((b, h * s, w * s, groups * cg))
    return [jnp.asarray(a, dtype) for a in (q, k, v, off)], jnp.asarray(cot, jnp.float32)


# (P, G, E, C/G, s, (B, H, W))
CASES = [(9, 4, 3, 2, 2, (1, 3, 4)), (4, 2, 5, 3, 3, (2, 2, 3)), (1, 1, 4, 3, 1, (1, 4, 3)),
         (3, 2, 9, 17, 2, (1, 5, 3))]
CASE_IDS = [f"P{c[0]}-G{c[1]}-E{c[2]}-Cg{c[3]}-s{c[4]}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_jnp_f64(x64, case):
    arrays, cot = case_arrays(case, jnp.float64)
    opts = dict(num_points=case[0], groups=case[1], scale=case[4])
    got = value_and_grads("ffi", arrays, cot.astype(jnp.float64), **opts)
    want = value_and_grads("xla", arrays, cot.astype(jnp.float64), **opts)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == np.float64
        assert rel_err(a, b) < 1e-12, (name, rel_err(a, b))
    assert np.any(got[4] != 0)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("bfloat16", 2e-2), ("float16", 3e-3)])
def test_matches_jnp_low_precision(dtype, tol):
    """Both paths compute in float32 from the same rounded inputs; they differ only in the
    order of the sums and in the final rounding to the storage type."""
    case = CASES[0]
    arrays, cot = case_arrays(case, jnp.dtype(dtype))
    opts = dict(num_points=case[0], groups=case[1], scale=case[4])
    got = value_and_grads("ffi", arrays, cot, **opts)
    want = value_and_grads("xla", arrays, cot, **opts)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == jnp.dtype(dtype), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


def test_auto_uses_the_kernel_and_promotes():
    case = CASES[1]
    arrays, _ = case_arrays(case, jnp.float32)
    opts = dict(num_points=case[0], groups=case[1], scale=case[4])
    text = jax.jit(lambda *a: sapa_jax.deform_upsample(*a, **opts)).lower(*arrays).as_text()
    assert "sapa_deform_forward" in text
    mixed = sapa_jax.deform_upsample(arrays[0].astype(jnp.bfloat16), *arrays[1:], impl="ffi",
                                     **opts)
    assert mixed.dtype == jnp.float32


def test_boundary_and_integer_positions(x64):
    """py = -1 exactly: not read, value 0 and zero gradient; an integer position inside takes
    the derivative of the cell to its lower right, as jnp; py just above -1 reads row 0."""
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((1, 2, 2, 3)), rng.standard_normal((1, 2, 2, 3))
    v = rng.standard_normal((1, 2, 2, 2))

    def run(impl, dy, dx=0.0):
        off = np.zeros((1, 2, 2, 4))
        off[0, 0, 0, 2:4] = (dx, dy)
        f = lambda v, off: sapa_jax.deform_upsample(jnp.asarray(q), jnp.asarray(k), v, off,
                                                    num_points=2, groups=1, scale=1, impl=impl)
        out, vjp = jax.vjp(f, jnp.asarray(v), jnp.asarray(off))
        return [np.asarray(out)] + [np.asarray(g) for g in vjp(jnp.ones_like(out))]

    for dy, dx in ((-1.0, 0.0), (0.0, -1.0), (-0.75, 0.0), (1.0, 0.0), (0.0, 1.0),
                   (-1.0 + 2.0 ** -40, 0.5)):
        got, want = run("ffi", dy, dx), run("xla", dy, dx)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    _, _, d_off = run("ffi", -1.0)
    assert d_off[0, 0, 0, 3] == 0.0 and d_off[0, 0, 0, 2] == 0.0
    _, _, d_off = run("ffi", -1.0 + 2.0 ** -40, 0.5)
    assert d_off[0, 0, 0, 3] != 0.0


def test_backward_is_bitwise_deterministic():
    """Same bits over repeated runs and with one worker instead of the pool; B * G = 2 here,
    so the backward's output-row bands carry the parallelism."""
    q, k, v, off = core_inputs(11, 1, 16, 16, 2, 9, 2, 8, 32, spread=2.5)
    arrays = [jnp.asarray(a, jnp.float32) for a in (q, k, v, off)]
    cot = jnp.asarray(np.random.default_rng(2).standard_normal((1, 32, 32, 32)), jnp.float32)
    run = lambda: value_and_grads("ffi", arrays, cot, num_points=9, groups=2, scale=2)
    module = importlib.import_module("sapa_jax._sapa_cpu")
    try:
        module.set_max_workers(0)
        first, second = run(), run()
        module.set_max_workers(1)
        single = run()
    finally:
        module.set_max_workers(0)
    for name, a, b, c in zip(NAMES, first, second, single):
        assert np.array_equal(a, b), name
        assert np.array_equal(a, c), name


NONFINITE = [("q", (0, 1, 2, 0)), ("k", (0, 0, 0, 1)), ("k", (0, 1, 2, 3)), ("v", (0, 0, 0, 1)),
             ("v", (0, 2, 1, 0)), ("offsets", (0, 1, 2, 1)), ("offsets", (0, 0, 0, 4))]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_inputs_propagate_as_in_jnp(value):
    """One non-finite entry at a time: the NaN masks of out and of the four gradients equal
    the jnp path's; elsewhere the values agree."""
    case = (2, 2, 2, 2, 2, (1, 3, 3))
    base, cot = case_arrays(case, jnp.float32, seed=5)
    base = [np.asarray(a) for a in base]
    # small offsets, so that most pixels are read only near their parents
    base[3] = np.clip(base[3], -0.7, 0.7)
    names = ("q", "k", "v", "offsets")
    for name, index in NONFINITE:
        arrays = [a.copy() for a in base]
        arrays[names.index(name)][index] = value
        arrays = [jnp.asarray(a) for a in arrays]
        opts = dict(num_points=2, groups=2, scale=2)
        got = value_and_grads("ffi", arrays, cot, **opts)
        want = value_and_grads("xla", arrays, cot, **opts)
        for what, a, b in zip(NAMES, got, want):
            where = f"{name}{index}={value}: {what}"
            assert np.array_equal(np.isnan(a), np.isnan(b)), where
            finite = ~np.isnan(b)
            np.testing.assert_allclose(a[finite], b[finite], rtol=1e-4, atol=1e-5,
                                       err_msg=where)


def _forward(q, k, v, off, **attrs):
    opts = _ffi.DeformOptions(**{**dict(num_points=2, groups=2, scale=2), **attrs})
    return jax.block_until_ready(_ffi.deform_forward_call(q, k, v, off, opts))


def test_bad_calls_raise_instead_of_crashing():
    q, k, v = jnp.ones((1, 4, 4, 4)), jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 6))
    off = jnp.ones((1, 4, 4, 8))
    _forward(q, k, v, off)  # the good call
    bad = [
        ((q, k, v, off[..., :6]), {}, "sapa_deform_forward: offsets must have shape "
                                      "(1, 4, 4, 8), got (1, 4, 4, 6)"),
        ((q, k, v[:, :1], off), {}, "v must have shape (1, 2, 2, 6), got (1, 1, 2, 6)"),
        ((q, k, jnp.ones((1, 2, 2, 5)), off), {}, "v channels must be divisible by groups=2"),
        ((q[..., :3], k[..., :3], v, off), {}, "q and k channels must be divisible by groups=2"),
        ((q, k, v, off), dict(scale=3), "q must have shape (1, 6, 6, 4), got (1, 4, 4, 4)"),
        ((q, k, v, off), dict(num_points=0), "num_points must be in 1..65536, got 0"),
        ((q, k, v.astype(jnp.float16), off), {}, "v must have element type float32, got "
                                                 "float16"),
        ((q[0], k[0], v[0], off[0]), {}, "q must have rank >= 4"),
    ]
    for args, attrs, message in bad:
        with pytest.raises(Exception) as err:
            _forward(*args, **attrs)
        assert message in str(err.value), (message, str(err.value))
    qi = q.astype(jnp.int32)
    with pytest.raises(Exception, match="q must have element type float32, float64, bfloat16 "
                                        "or float16"):
        _forward(qi, k.astype(jnp.int32), v.astype(jnp.int32), off.astype(jnp.int32))
    opts = _ffi.DeformOptions(2, 2, 2)
    with pytest.raises(Exception, match="sapa_deform_backward: g must have shape"):
        jax.block_until_ready(_ffi.deform_backward_call(q, k, v, off, v, opts))


def test_vmap_folds_into_the_kernel_batch():
    """vmap folds the mapped axis into the kernel's batch: the same bits as one batch."""
    case = CASES[1]
    arrays, cot = case_arrays(case, jnp.float32)
    opts = dict(num_points=case[0], groups=case[1], scale=case[4], impl="ffi")
    f = lambda *a: sapa_jax.deform_upsample(*a, **opts)
    stacked = [a.reshape(2, 1, *a.shape[1:]) for a in arrays]
    batched = jax.jit(jax.vmap(f))(*stacked)
    np.testing.assert_array_equal(np.asarray(batched).reshape(2, *batched.shape[2:]),
                                  np.asarray(jax.jit(f)(*arrays)))
    grads = jax.jit(jax.vmap(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3))))(
        *stacked)
    want = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a[:4]) ** 2), argnums=(0, 1, 2, 3)))(*arrays)
    for a, b in zip(grads, want):
        np.testing.assert_array_equal(np.asarray(a).reshape(b.shape), np.asarray(b))

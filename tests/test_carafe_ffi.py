"""The fused CARAFE CPU kernel (impl="ffi") against the jnp path (impl="xla").

Every new shape is a new XLA compile, so K, s, groups, the normalisers and the map sizes are
varied along one short list instead of a cross product.
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sapa_jax
from sapa_jax import _ffi

import kernel_cases

pytestmark = pytest.mark.skipif(not _ffi.carafe_built("cpu"),
                                reason="the CARAFE CPU FFI kernel is not built")

# (normalizer, kernel_size, scale, groups, batch, height, width, channels)
CASES = [
    ("softmax", 5, 2, 1, 2, 5, 7, 9),
    ("softmax", 3, 3, 2, 1, 4, 3, 64),      # vector blocks per group
    ("softmax", 5, 4, 4, 1, 2, 3, 36),      # map smaller than the kernel
    ("softmax", 1, 1, 1, 3, 3, 2, 5),
    ("relu", 3, 2, 2, 1, 3, 4, 6),
    ("sigmoid", 7, 1, 1, 1, 5, 4, 33),      # vectors and a scalar tail
    ("softplus", 3, 2, 4, 2, 2, 17, 8),     # 34 output columns: two lane blocks
    ("none", 5, 3, 2, 1, 3, 3, 10),         # the logits are the weights
]


def _inputs(case, dtype=np.float32, seed=0):
    normalizer, ksize, scale, groups, batch, height, width, channels = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, height, width, channels))
    logits = 1.5 * rng.standard_normal((batch, height * scale, width * scale,
                                        groups * ksize * ksize))
    logits[:, 0] = -np.abs(logits[:, 0])  # all-negative windows: all-zero relu windows
    opts = dict(kernel_size=ksize, scale=scale, groups=groups, normalizer=normalizer)
    return (x.astype(dtype), logits.astype(dtype)), opts


def _value_and_vjp(impl, args, opts, cot_dtype=None, seed=1, eps=1e-6):
    """out, dx, dlogits for a random cotangent (drawn in float64, rounded to `cot_dtype`)."""
    f = lambda x, logits: sapa_jax.carafe_upsample(x, logits, impl=impl, eps=eps, **opts)
    return kernel_cases.value_and_vjp(f, args, cot_dtype, seed)


def _assert_matches(args, opts, rtol, atol, eps=1e-6):
    """The kernel in the inputs' dtype against the jnp path in float64 on the same values."""
    got = _value_and_vjp("ffi", args, opts, eps=eps)
    want = _value_and_vjp("xla", [np.asarray(a, np.float64) for a in args], opts,
                          cot_dtype=got[0].dtype, eps=eps)
    for name, a, b, like in zip(("out", "dx", "dlogits"), got, want, (args[0], *args)):
        assert a.dtype == like.dtype, name
        assert a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol,
                                   err_msg=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_jnp_f32(x64, case):
    args, opts = _inputs(case)
    _assert_matches(args, opts, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[6]], ids=["softmax", "relu", "softplus"])
def test_matches_jnp_f64(x64, case):
    args, opts = _inputs(case, dtype=np.float64)
    # eps as a float64 attribute: unrounded, as a 1e-12 match of the h-normalisers needs
    _assert_matches(args, opts, rtol=1e-12, atol=1e-12, eps=1e-3)


# A few ulps of the storage type: the kernel computes in float32 on the rounded inputs.
@pytest.mark.parametrize("dtype, case, tol", [
    (jnp.bfloat16, CASES[1], 1e-2),
    (np.float16, CASES[5], 2e-3),
    (jnp.bfloat16, CASES[6], 1e-2),
    (np.float16, CASES[0], 2e-3),
])
def test_matches_jnp_half(x64, dtype, case, tol):
    args, opts = _inputs(case, dtype=dtype)
    _assert_matches(args, opts, rtol=tol, atol=tol)


def test_check_grads_f64(x64):
    (x, logits), opts = _inputs(("sigmoid", 3, 2, 2, 1, 3, 2, 4), dtype=np.float64)
    check_grads(lambda x, l: sapa_jax.carafe_upsample(x, l, impl="ffi", eps=2.0 ** -10, **opts),
                (x, logits), order=1, modes=["rev"])


def test_auto_runs_the_kernel_and_forward_mode_works(x64):
    (x, logits), opts = _inputs(CASES[1], dtype=np.float64)
    f = lambda impl: (lambda x, l: sapa_jax.carafe_upsample(x, l, impl=impl, **opts))
    lowered = jax.jit(jax.grad(lambda x, l: jnp.sum(f("auto")(x, l)), argnums=(0, 1)))
    text = lowered.lower(x, logits).as_text()
    assert "carafe_forward" in text and "carafe_backward" in text
    # forward mode and second order go through the jnp formulation (docs/design.md §4)
    tangents = (np.ones_like(x), np.ones_like(logits))
    a = jax.jvp(f("ffi"), (x, logits), tangents)
    b = jax.jvp(f("xla"), (x, logits), tangents)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)
    hvp = lambda impl: jax.grad(lambda l: jnp.sum(jax.grad(
        lambda l: jnp.sum(jnp.sin(f(impl)(x, l))))(l) ** 2))(logits)
    np.testing.assert_allclose(hvp("ffi"), hvp("xla"), rtol=1e-10, atol=1e-12)


def test_vmap_and_mixed_dtypes():
    (x, logits), opts = _inputs(CASES[4])
    f = lambda impl: jax.jit(jax.vmap(
        lambda x, l: sapa_jax.carafe_upsample(x, l, impl=impl, **opts), in_axes=(0, None)))
    xs = np.stack([x, -x])
    np.testing.assert_allclose(f("ffi")(xs, logits), f("xla")(xs, logits), rtol=1e-5, atol=1e-5)
    out = sapa_jax.carafe_upsample(x.astype(jnp.bfloat16), logits, impl="ffi", **opts)
    assert out.dtype == jnp.float32  # promoted, as the jnp path


def test_backward_is_deterministic():
    # Big enough that the kernel splits the work over XLA's thread pool (and the caller).
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 16, 16, 32)).astype(np.float32)
    logits = rng.standard_normal((2, 32, 32, 2 * 25)).astype(np.float32)
    opts = dict(kernel_size=5, scale=2, groups=2)
    grad = jax.jit(jax.grad(
        lambda x, l: jnp.sum(sapa_jax.carafe_upsample(x, l, impl="ffi", **opts) ** 2),
        argnums=(0, 1)))
    module = importlib.import_module("sapa_jax._sapa_cpu")
    try:
        module.set_max_workers(0)
        first = [np.asarray(g) for g in grad(x, logits)]
        second = [np.asarray(g) for g in grad(x, logits)]
        module.set_max_workers(1)
        single = [np.asarray(g) for g in grad(x, logits)]
    finally:
        module.set_max_workers(0)
    for a, b, c in zip(first, second, single):
        assert np.array_equal(a, b)
        assert np.array_equal(a, c)  # the thread count does not change a bit


def test_all_zero_relu_windows_give_zero():
    x = np.random.default_rng(6).standard_normal((1, 3, 2, 4)).astype(np.float32)
    logits = -np.ones((1, 6, 4, 9), np.float32)
    out, dx, dlogits = _value_and_vjp("ffi", (x, logits),
                                      dict(kernel_size=3, scale=2, groups=1, normalizer="relu"),
                                      eps=0.0)
    for a in (out, dx, dlogits):
        assert np.array_equal(a, np.zeros_like(a))


# ------------------------------------------------------------------------------- bad calls

def _call(x_shape, logits_shape, kernel_size=3, scale=2, groups=1, normalizer=0, eps=1e-6,
          dtype=jnp.float32):
    opts = _ffi.CarafeOptions(kernel_size, scale, groups, normalizer, eps)
    x, logits = jnp.ones(x_shape, dtype), jnp.ones(logits_shape, dtype)
    return jax.block_until_ready(_ffi.carafe_forward_call(x, logits, opts))


@pytest.mark.parametrize("args, message", [
    (((1, 2, 2, 4), (1, 4, 4, 8)), "carafe_forward: logits must have shape (1, 4, 4, 9), "
                                   "got (1, 4, 4, 8)"),
    (((1, 2, 2, 4), (1, 4, 6, 9)), "carafe_forward: logits must have shape (1, 4, 4, 9), "
                                   "got (1, 4, 6, 9)"),
    (((1, 2, 2, 4), (1, 4, 4, 18), 3, 2, 3), "carafe_forward: the channels of x must be "
                                             "divisible by groups, got 4 channels and groups=3"),
    (((2, 2, 4), (4, 4, 9)), "carafe_forward: x must have rank >= 4 (..., height, width, "
                             "channels), got shape (2, 2, 4)"),
    (((1, 2, 2, 4), (1, 4, 4, 16), 4), "carafe_forward: kernel_size must be a positive odd "
                                       "integer, got 4"),
    (((1, 2, 2, 4), (1, 4, 4, 9), 3, 2, 1, 7), "carafe_forward: normalizer code must be 0..4, "
                                               "got 7"),
    (((1, 2, 2, 4), (1, 4, 4, 9), 3, 2, 1, 0, -1.0), "carafe_forward: eps must be >= 0"),
    (((1, 2, 2, 4), (1, 4, 4, 9), 3, 2, 0), "carafe_forward: groups must be 1..4095, got 0"),
])
def test_bad_input_raises_instead_of_crashing(args, message):
    with pytest.raises(Exception) as err:
        _call(*args)
    assert message in str(err.value)


def test_bad_dtype_and_backward_buffers_raise():
    with pytest.raises(Exception, match="x must have element type float32, float64, bfloat16 "
                                        "or float16, got type code"):
        _call((1, 2, 2, 4), (1, 4, 4, 9), dtype=jnp.int32)
    opts = _ffi.CarafeOptions(3, 2, 1, 0, 1e-6)
    x, logits = jnp.ones((1, 2, 2, 4)), jnp.ones((1, 4, 4, 9))
    out, stats = _ffi.carafe_forward_call(x, logits, opts)
    with pytest.raises(Exception, match="carafe_backward: stats must have shape"):
        jax.block_until_ready(_ffi.carafe_backward_call(x, logits, stats[..., :1], out, opts))
    with pytest.raises(Exception, match="carafe_backward: g must have shape"):
        jax.block_until_ready(_ffi.carafe_backward_call(x, logits, stats, out[:, :-1], opts))


# ------------------------------------------------------------------------- non-finite values
# One NaN or infinity in x or in logits at a time, near the corner (out-of-map taps) and in the
# middle: the isnan masks of out, dx and dlogits must equal impl="xla"'s.
NONFINITE_PLACES = {"x": [(0, 0, 0, 1), (0, 1, 2, 3)], "logits": [(0, 0, 1, 4), (0, 3, 4, 11)]}


def _nonfinite_cases():
    return [(name, index, value) for name, places in NONFINITE_PLACES.items()
            for index in places for value in (np.nan, np.inf, -np.inf)]


def _nonfinite_results(impl, normalizer, cases):
    opts = dict(kernel_size=3, scale=2, groups=2, normalizer=normalizer, eps=1e-6)

    @jax.jit
    def run(x, logits, g):
        out, vjp = jax.vjp(lambda x, l: sapa_jax.carafe_upsample(x, l, impl=impl, **opts),
                           x, logits)
        return (out, *vjp(g))

    results = []
    for name, index, value in cases:
        rng = np.random.default_rng(7)
        args = {"x": rng.standard_normal((1, 3, 4, 4)),
                "logits": rng.standard_normal((1, 6, 8, 18))}
        g = rng.standard_normal((1, 6, 8, 4))
        args[name][index] = value
        results.append([np.asarray(a) for a in run(*(np.float32(args[n]) for n in ("x", "logits")),
                                                     np.float32(g))])
    return results


@pytest.mark.parametrize("normalizer", sapa_jax._checks.NORMALIZERS)
def test_nonfinite_inputs_propagate_as_in_jnp(normalizer):
    cases = _nonfinite_cases()
    got = _nonfinite_results("ffi", normalizer, cases)
    want = _nonfinite_results("xla", normalizer, cases)
    for case, a, b in zip(cases, got, want):
        if np.isnan(case[2]):  # (an infinity may be harmless: a -inf logit under softmax)
            assert not all(np.isfinite(x).all() for x in b), f"{case}: no effect on the results"
        kernel_cases.assert_same_nan(a, b, f"{normalizer}, {case[0]}{list(case[1])} = {case[2]}",
                                     names=("out", "dx", "dlogits"))



def test_kernel_size_limit_of_a_back_end_routes_to_jnp(monkeypatch):
    # The CUDA kernel takes K <= 11 (_ffi.CARAFE_MAX_KERNEL_SIZE); the same rule on CPU here.
    monkeypatch.setitem(_ffi.CARAFE_MAX_KERNEL_SIZE, "cpu", 3)
    x, logits = jnp.ones((1, 3, 3, 2)), jnp.zeros((1, 6, 6, 25))
    f = lambda impl: jax.jit(lambda x, l: sapa_jax.carafe_upsample(x, l, kernel_size=5,
                                                                   impl=impl))
    assert "carafe_forward" not in f("auto").lower(x, logits).as_text()
    with pytest.raises(RuntimeError, match=r"impl='ffi' was asked for, but the CARAFE "
                                           r"\(kernel_size=5\) fused kernel is not built for "
                                           r"platform 'cpu'"):
        sapa_jax.carafe_upsample(x, logits, kernel_size=5, impl="ffi")
    small = jnp.zeros((1, 6, 6, 9))
    g = jax.jit(lambda x, l: sapa_jax.carafe_upsample(x, l, kernel_size=3, impl="auto"))
    assert "carafe_forward" in g.lower(x, small).as_text()

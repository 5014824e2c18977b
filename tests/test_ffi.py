"""The fused CPU kernel (impl="ffi") against the jnp reference (impl="xla").

Every new shape is a new XLA compile, so the option matrix is covered pairwise by a dozen
cases rather than by a cross product.
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
from conftest import random_qkv

pytestmark = pytest.mark.skipif(not sapa_jax.ffi_available("cpu"),
                                reason="the SAPA CPU FFI kernel is not built")

# (normalizer, border, scale, kernel_size, batch, height, width, d, C)
F32_CASES = [
    ("softmax", "zeros", 2, 5, 2, 5, 7, 6, 9),
    ("softmax", "valid", 1, 3, 1, 4, 6, 3, 5),
    ("relu", "zeros", 3, 7, 1, 2, 3, 17, 33),      # map smaller than the kernel
    ("relu", "valid", 4, 1, 5, 3, 2, 4, 8),
    ("sigmoid", "zeros", 1, 9, 1, 5, 4, 8, 3),
    ("sigmoid", "valid", 2, 7, 2, 2, 3, 5, 7),     # map smaller than the kernel
    ("softplus", "zeros", 4, 3, 1, 3, 3, 33, 17),
    ("softplus", "valid", 3, 5, 5, 3, 4, 2, 77),   # channel blocks, vectors and a scalar tail
    ("softmax", "zeros", 2, 9, 1, 3, 17, 32, 40),  # 34 output columns: two lane blocks
    ("softmax", "valid", 3, 5, 2, 7, 5, 12, 64),
    ("none", "zeros", 2, 5, 1, 4, 3, 5, 9),        # the logits are the weights
    ("none", "valid", 3, 3, 2, 2, 5, 7, 33),
]


def _inputs(case, dtype=np.float32, seed=0):
    normalizer, border, scale, kernel_size, batch, height, width, dim, channels = case
    # q, k of size d**-1/4 keep the logits O(1), so the comparison tests the kernel rather than
    # the conditioning of a peaked softmax.
    q, k, v = random_qkv(seed, batch, height, width, scale, dim, channels, dtype=dtype,
                         magnitude=dim ** -0.25)
    opts = dict(kernel_size=kernel_size, scale=scale, normalizer=normalizer, border=border)
    return (q, k, v), opts


def _value_and_vjp(impl, args, opts, cot_dtype=None, seed=1):
    """Output and (dq, dk, dv) for a random cotangent, drawn in float64 and rounded to
    `cot_dtype` (default: the output's dtype), so that two calls can share its values.
    Jitted: one compile per case instead of one per primitive."""
    f = lambda q, k, v: sapa_jax.sapa_upsample(q, k, v, impl=impl, **opts)
    return kernel_cases.value_and_vjp(f, args, cot_dtype, seed)


def _assert_matches(args, opts, rtol, atol):
    """The kernel in the inputs' dtype against the reference in float64 on the same values.

    Needs the x64 fixture. A float64 reference measures the kernel's own error: the float32
    reference has errors of its own of about 1e-4 in the gradients of the h-normalisers for
    small sum h / eps, where autodiff of h / (S + eps) cancels (the kernel does not).
    """
    got = _value_and_vjp("ffi", args, opts)
    want = _value_and_vjp("xla", [np.asarray(a, np.float64) for a in args], opts,
                          cot_dtype=got[0].dtype)
    for name, a, b, x in zip(("out", "dq", "dk", "dv"), got, want, (args[0], *args)):
        assert a.dtype == x.dtype, name
        assert a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol,
                                   err_msg=name)


@pytest.mark.parametrize("case", F32_CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference_f32(x64, case):
    args, opts = _inputs(case)
    _assert_matches(args, opts, rtol=1e-5, atol=1e-5)


# About 2.5 ulps of the storage type: the kernel computes in float32, so its error is the
# rounding of the inputs' gradients and of the output (one ulp at most, measured).
@pytest.mark.parametrize("dtype, case, tol", [
    (jnp.bfloat16, F32_CASES[0], 1e-2),
    (np.float16, F32_CASES[3], 1.5e-3),
    (jnp.bfloat16, F32_CASES[7], 1e-2),
])
def test_matches_reference_half(x64, dtype, case, tol):
    args, opts = _inputs(case, dtype=dtype)
    out = sapa_jax.sapa_upsample(*args, impl="ffi", **opts)
    assert out.dtype == jnp.dtype(dtype)
    _assert_matches(args, opts, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", [F32_CASES[5], F32_CASES[6]], ids=["sigmoid-valid", "softplus"])
def test_matches_reference_f64(x64, case):
    args, opts = _inputs(case, dtype=np.float64)
    # eps travels as a float64 attribute: one that float32 would round (by 2e-11 relative)
    # must reach the kernel exactly for a 1e-12 match.
    opts["eps"] = 1e-3
    _assert_matches(args, opts, rtol=1e-12, atol=1e-12)


def test_mixed_dtypes_promote():
    (q, k, v), opts = _inputs(F32_CASES[0])
    q = q.astype(jnp.bfloat16)
    out = sapa_jax.sapa_upsample(q, k, v, impl="ffi", **opts)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, sapa_jax.sapa_upsample(q, k, v, impl="xla", **opts),
                               rtol=1e-5, atol=1e-5)
    dq = jax.grad(lambda q: sapa_jax.sapa_upsample(q, k, v, impl="ffi", **opts).sum())(q)
    assert dq.dtype == jnp.bfloat16


def none_oracle(q, k, v, kernel_size, scale, border):
    """normalizer="none" as plain loops (float64): w = logit, uncounted taps 0 (valid)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, out_h, out_w, _ = q.shape
    height, width, channels = v.shape[1:]
    r = kernel_size // 2
    out = np.zeros((batch, out_h, out_w, channels))
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        y, x = i // scale + dy, j // scale + dx
                        if 0 <= y < height and 0 <= x < width:  # else v = 0 (and w = 0 if valid)
                            out[b, i, j] += (q[b, i, j] @ k[b, y, x]) * v[b, y, x]
    return out


@pytest.mark.parametrize("case", [c for c in F32_CASES if c[0] == "none"],
                         ids=lambda c: "-".join(map(str, c)))
def test_none_matches_loop_oracle(x64, case):
    (q, k, v), opts = _inputs(case, dtype=np.float64)
    want = none_oracle(q, k, v, opts["kernel_size"], opts["scale"], opts["border"])
    for impl in ("ffi", "xla"):
        got = sapa_jax.sapa_upsample(q, k, v, impl=impl, **opts)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12, err_msg=impl)
    # With border "zeros" the out-of-map taps have logit 0: "none" gives the same either way.
    if opts["border"] == "zeros":
        other = sapa_jax.sapa_upsample(q, k, v, impl="ffi", **{**opts, "border": "valid"})
        np.testing.assert_allclose(np.asarray(other), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalizer, border",
                         [("softmax", "valid"), ("softplus", "zeros"), ("none", "valid")])
def test_check_grads_f64(x64, normalizer, border):
    q, k, v = random_qkv(3, 1, 3, 2, 2, 3, 2, dtype=np.float64)
    opts = dict(kernel_size=3, scale=2, normalizer=normalizer, border=border, eps=2.0 ** -10)
    check_grads(lambda q, k, v: sapa_jax.sapa_upsample(q, k, v, impl="ffi", **opts),
                (q, k, v), order=1, modes=["rev"])


def test_backward_is_deterministic():
    # Big enough that the kernel splits the work over XLA's thread pool (and the caller).
    q, k, v = random_qkv(4, 2, 16, 16, 2, 16, 32)
    opts = dict(kernel_size=5, scale=2, normalizer="softmax", border="zeros")
    grad = jax.jit(jax.grad(
        lambda q, k, v: jnp.sum(sapa_jax.sapa_upsample(q, k, v, impl="ffi", **opts) ** 2),
        argnums=(0, 1, 2)))
    module = importlib.import_module("sapa_jax._sapa_cpu")
    try:
        module.set_max_workers(0)  # the pool's threads and the caller
        first = [np.asarray(g) for g in grad(q, k, v)]
        second = [np.asarray(g) for g in grad(q, k, v)]
        module.set_max_workers(1)
        single = [np.asarray(g) for g in grad(q, k, v)]
    finally:
        module.set_max_workers(0)
    for a, b, c in zip(first, second, single):
        assert np.array_equal(a, b)
        assert np.array_equal(a, c)  # the thread count does not change a bit


def test_jit_vmap_checkpoint():
    (q, k, v), opts = _inputs(F32_CASES[1])
    f = lambda impl: (lambda q, k, v: sapa_jax.sapa_upsample(q, k, v, impl=impl, **opts))
    stack = lambda x: np.stack([x, 0.5 * x[::-1], -x])  # an extra leading axis of 3

    ref = f("xla")(q, k, v)
    np.testing.assert_allclose(jax.jit(f("ffi"))(q, k, v), ref, rtol=1e-5, atol=1e-5)

    qs, ks, vs = stack(q), stack(k), stack(v)
    np.testing.assert_allclose(jax.vmap(f("ffi"))(qs, ks, vs), jax.vmap(f("xla"))(qs, ks, vs),
                               rtol=1e-5, atol=1e-5)
    # Unbatched operands are broadcast; gradients flow through the batched call too.
    shared = jax.vmap(f("ffi"), in_axes=(0, None, 0))(qs, k, vs)
    np.testing.assert_allclose(shared, jax.vmap(f("xla"), in_axes=(0, None, 0))(qs, k, vs),
                               rtol=1e-5, atol=1e-5)
    loss = lambda impl: (lambda q, k, v: jnp.sum(jnp.sin(f(impl)(q, k, v))))
    shared_grad = lambda impl: jax.grad(  # k shared by the batch: its gradient sums over it
        lambda k: jnp.sum(jnp.sin(jax.vmap(f(impl), in_axes=(0, None, 0))(qs, k, vs))))(k)
    np.testing.assert_allclose(shared_grad("ffi"), shared_grad("xla"), rtol=1e-5, atol=1e-5)
    per_example = lambda impl: jax.jit(jax.vmap(jax.grad(loss(impl), argnums=(0, 1, 2))))
    for a, b in zip(per_example("ffi")(qs, ks, vs), per_example("xla")(qs, ks, vs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    plain = jax.grad(loss("ffi"), argnums=(0, 1, 2))(q, k, v)
    remat = jax.jit(jax.grad(jax.checkpoint(loss("ffi")), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(plain, remat):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_large_logits_stay_finite():
    # Entries of size 30 with d = 16: logits of order 1e4.
    q, k, v = random_qkv(5, 1, 4, 5, 2, 16, 6, magnitude=30.0)
    logits = sapa_jax.similarity(q, k, kernel_size=5, scale=2)
    assert float(jnp.max(jnp.abs(logits))) > 5e3
    for normalizer in ("softmax", "relu", "sigmoid", "softplus"):
        opts = dict(kernel_size=5, scale=2, normalizer=normalizer, border="valid")
        out, dq, dk, dv = _value_and_vjp("ffi", (q, k, v), opts)
        for name, a in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv)):
            assert np.all(np.isfinite(a)), (normalizer, name)


def test_large_logits_match_reference_f64(x64):
    q, k, v = random_qkv(5, 1, 4, 5, 2, 16, 6, dtype=np.float64, magnitude=30.0)
    opts = dict(kernel_size=5, scale=2, normalizer="softmax", border="zeros")
    _assert_matches((q, k, v), opts, rtol=1e-9, atol=1e-9)


def test_all_zero_relu_window_gives_zero():
    # q > 0 and k < 0: every inside logit is negative, outside ones are 0, so relu is 0 on the
    # whole window; with eps = 0 the weights must be 0, not 0/0.
    rng = np.random.default_rng(6)
    q = np.abs(rng.standard_normal((1, 6, 4, 3))).astype(np.float32) + 0.1
    k = -np.abs(rng.standard_normal((1, 3, 2, 3))).astype(np.float32) - 0.1
    v = rng.standard_normal((1, 3, 2, 4)).astype(np.float32)
    for border in ("zeros", "valid"):
        opts = dict(kernel_size=3, scale=2, normalizer="relu", border=border, eps=0.0)
        out, dq, dk, dv = _value_and_vjp("ffi", (q, k, v), opts)
        assert np.array_equal(out, np.zeros_like(out))
        for a in (dq, dk, dv):
            assert np.array_equal(a, np.zeros_like(a))


def _opts(kernel_size=3, scale=2, normalizer=0, border=0, eps=1e-6):  # codes: contract()
    return _ffi.Options(kernel_size, scale, normalizer, border, eps)


@pytest.mark.parametrize("case", kernel_cases.BAD_FORWARD_CALLS.values(),
                         ids=kernel_cases.BAD_FORWARD_CALLS.keys())
def test_bad_input_raises_instead_of_crashing(case):
    # The same message as the CUDA handler's (test_cuda_emulated.py), from sapa_validate.h.
    shapes, attrs, message = case
    q, k, v = (jnp.ones(s, jnp.float32) for s in shapes)
    with pytest.raises(Exception) as err:
        jax.block_until_ready(_ffi.forward_call(q, k, v, _opts(*attrs)))
    assert message in str(err.value)


def test_bad_dtypes_raise():
    q, k, v = jnp.ones((1, 4, 4, 3)), jnp.ones((1, 2, 2, 3), jnp.float16), jnp.ones((1, 2, 2, 5))
    with pytest.raises(Exception, match=kernel_cases.MIXED_DTYPE_MESSAGE):
        jax.block_until_ready(_ffi.forward_call(q, k, v, _opts()))
    qi = jnp.ones((1, 4, 4, 3), jnp.int32)
    with pytest.raises(Exception, match="q must have element type float32, float64, bfloat16 "
                                        "or float16, got type code"):
        jax.block_until_ready(_ffi.forward_call(qi, qi[:, :2, :2], qi[:, :2, :2], _opts()))


def test_bad_backward_input_raises():
    (q, k, v), opts = _inputs(F32_CASES[0])
    o = _opts(kernel_size=opts["kernel_size"], scale=opts["scale"])
    out, stats = _ffi.forward_call(q, k, v, o)
    with pytest.raises(Exception, match="stats must have shape"):
        jax.block_until_ready(_ffi.backward_call(q, k, v, stats[..., :1], out, o))
    with pytest.raises(Exception, match="g must have shape"):
        jax.block_until_ready(_ffi.backward_call(q, k, v, stats, out[:, :-1], o))


# ------------------------------------------------------------------------- non-finite values
# kernel_cases.py: one non-finite entry in q, k or v at a time; the isnan masks of out, dq, dk
# and dv must equal impl="xla"'s.


def nonfinite_results(impl, normalizer, border, cases):
    """out, dq, dk, dv (NumPy) of impl for every case, from one jit compile."""
    opts = dict(kernel_size=kernel_cases.NONFINITE_KERNEL_SIZE,
                scale=kernel_cases.NONFINITE_SHAPE[3], normalizer=normalizer, border=border,
                eps=1e-6)

    @jax.jit
    def run(q, k, v, g):
        out, vjp = jax.vjp(lambda q, k, v: sapa_jax.sapa_upsample(q, k, v, impl=impl, **opts),
                           q, k, v)
        return (out, *vjp(g))

    return [[np.asarray(a) for a in run(*kernel_cases.nonfinite_inputs(case))]
            for case in cases]


@pytest.mark.parametrize("normalizer", sapa_jax._checks.NORMALIZERS)
@pytest.mark.parametrize("border", ["zeros", "valid"])
def test_nonfinite_inputs_propagate_as_in_jnp(normalizer, border):
    cases = kernel_cases.nonfinite_cases()
    got = nonfinite_results("ffi", normalizer, border, cases)
    want = nonfinite_results("xla", normalizer, border, cases)
    for case, a, b in zip(cases, got, want):
        assert not all(np.isfinite(x).all() for x in b), f"{case}: no effect on the results"
        kernel_cases.assert_same_nan(
            a, b, f"{normalizer}/{border}, {case[0]}{list(case[1])} = {case[2]}")


@pytest.mark.parametrize("operator", ["sapa", "carafe"])
def test_cpu_kernels_refuse_absurd_thread_buffers(operator):
    """A kernel size whose per-thread row buffers would pass 1 GiB is refused with one message
    (cpu/handler.h) by every CPU kernel that sizes its buffers by K, not died allocating."""
    if not _ffi.carafe_built("cpu"):
        pytest.skip("CPU kernels not built")
    x = jnp.ones((1, 1, 1, 1), jnp.float32)
    if operator == "sapa":
        call = lambda: sapa_jax.sapa_upsample(x, x, x, kernel_size=301, scale=1, impl="ffi")
    else:
        logits = jnp.ones((1, 1, 1, 301 * 301), jnp.float32)
        call = lambda: sapa_jax.carafe_upsample(x, logits, kernel_size=301, scale=1, impl="ffi")
    with pytest.raises(Exception, match=r"kernel_size 301 with an output width of 1 needs \d+ "
                                        r"MiB of buffers per thread in the CPU kernel"):
        jax.block_until_ready(call())

"""The jnp core (impl="xla") against a brute-force loop oracle, its gradients, and its checks."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sapa_jax
from conftest import random_qkv

NORMALIZERS = ["softmax", "relu", "sigmoid", "softplus"]
BORDERS = ["zeros", "valid"]
H_FUNCS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "softplus": lambda x: np.logaddexp(0.0, x),
}


def loop_oracle(q, k, v, kernel_size, scale, normalizer="softmax", border="zeros", eps=1e-6):
    """docs/design.md §1 written as plain loops over output points and taps (float64)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, out_h, out_w, _ = q.shape
    height, width, channels = v.shape[1:]
    r = kernel_size // 2
    out = np.zeros((batch, out_h, out_w, channels))
    for b, i, j in itertools.product(range(batch), range(out_h), range(out_w)):
        li, lj = i // scale, j // scale
        logits, inside, values = [], [], []
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                y, x = li + dy, lj + dx
                ok = 0 <= y < height and 0 <= x < width
                logits.append(q[b, i, j] @ k[b, y, x] if ok else 0.0)
                inside.append(ok)
                values.append(v[b, y, x] if ok else np.zeros(channels))
        logits, inside = np.array(logits), np.array(inside)
        counted = inside if border == "valid" else np.ones_like(inside)
        if normalizer == "softmax":
            e = np.where(counted, np.exp(logits - logits[counted].max()), 0.0)
            w = e / e.sum()
        else:
            h = np.where(counted, H_FUNCS[normalizer](logits), 0.0)
            w = h / (h.sum() + eps) if h.sum() + eps > 0 else np.zeros_like(h)
        out[b, i, j] = w @ np.array(values)
    return out


@pytest.mark.parametrize(
    "normalizer,border,kernel_size,scale,low,batch",
    [
        ("softmax", "zeros", 5, 2, (3, 4), 2),
        ("softmax", "valid", 3, 3, (2, 3), 1),
        ("relu", "zeros", 3, 1, (4, 3), 1),
        ("relu", "valid", 5, 2, (2, 2), 1),
        ("sigmoid", "zeros", 1, 4, (2, 2), 1),
        ("sigmoid", "valid", 3, 2, (3, 2), 2),
        ("softplus", "zeros", 7, 2, (2, 3), 1),
        ("softplus", "valid", 5, 1, (3, 3), 1),
    ],
)
def test_matches_loop_oracle(x64, normalizer, border, kernel_size, scale, low, batch):
    q, k, v = random_qkv(0, batch, *low, scale, 3, 5, dtype=np.float64)
    got = sapa_jax.sapa_upsample(q, k, v, kernel_size=kernel_size, scale=scale,
                                 normalizer=normalizer, border=border, impl="xla")
    want = loop_oracle(q, k, v, kernel_size, scale, normalizer, border)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_similarity_tap_order():
    """Tap p = (dy + r) * K + (dx + r): put a distinct key value at every low-res pixel."""
    height, width, kernel_size, scale = 5, 6, 3, 2
    k = np.arange(1, height * width + 1, dtype=np.float32).reshape(1, height, width, 1)
    q = np.ones((1, height * scale, width * scale, 1), np.float32)
    logits = np.asarray(sapa_jax.similarity(q, k, kernel_size=kernel_size, scale=scale))
    r = kernel_size // 2
    for i, j in [(0, 0), (5, 7), (9, 11), (4, 1)]:
        li, lj = i // scale, j // scale
        for p, (dy, dx) in enumerate(itertools.product(range(-r, r + 1), repeat=2)):
            y, x = li + dy, lj + dx
            want = k[0, y, x, 0] if 0 <= y < height and 0 <= x < width else 0.0
            assert logits[0, i, j, p] == want, (i, j, p)


def test_assemble_tap_order():
    """A one-hot weight on tap p must pick v at offset p of the low-res centre."""
    height, width, kernel_size, scale = 4, 4, 5, 2
    v = np.arange(1, height * width + 1, dtype=np.float32).reshape(1, height, width, 1)
    r = kernel_size // 2
    for p, (dy, dx) in enumerate(itertools.product(range(-r, r + 1), repeat=2)):
        w = np.zeros((1, height * scale, width * scale, kernel_size ** 2), np.float32)
        w[..., p] = 1.0
        out = np.asarray(sapa_jax.assemble(w, v, kernel_size=kernel_size, scale=scale))
        i, j = 5, 2  # low-res centre (2, 1)
        y, x = 2 + dy, 1 + dx
        want = v[0, y, x, 0] if 0 <= y < height and 0 <= x < width else 0.0
        assert out[0, i, j, 0] == want, p


def test_normalize_matches_core(x64):
    q, k, v = random_qkv(1, 1, 3, 4, 2, 4, 3, dtype=np.float64)
    for normalizer, border in itertools.product(NORMALIZERS, BORDERS):
        logits = sapa_jax.similarity(q, k, kernel_size=3, scale=2)
        w = sapa_jax.normalize(logits, normalizer=normalizer, border=border,
                               low_res_shape=(3, 4), scale=2)
        out = sapa_jax.assemble(w, v, kernel_size=3, scale=2)
        want = sapa_jax.sapa_upsample(q, k, v, kernel_size=3, scale=2, normalizer=normalizer,
                                      border=border, impl="xla")
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("normalizer,border", list(itertools.product(NORMALIZERS, BORDERS)))
def test_check_grads(x64, normalizer, border):
    q, k, v = random_qkv(2, 1, 2, 3, 2, 3, 2, dtype=np.float64)

    def f(q, k, v):
        return sapa_jax.sapa_upsample(q, k, v, kernel_size=3, scale=2, normalizer=normalizer,
                                      border=border, impl="xla")

    # relu has kinks, so second order is only checked for the smooth normalisers.
    order = 1 if normalizer == "relu" else 2
    check_grads(f, (q, k, v), order=order, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_large_logits_are_finite(normalizer):
    q, k, v = random_qkv(3, 1, 3, 3, 2, 4, 3, magnitude=50.0)  # |logit| ~ 1e4
    f = lambda q, k, v: jnp.sum(sapa_jax.sapa_upsample(q, k, v, kernel_size=3, scale=2,
                                                       normalizer=normalizer, impl="xla") ** 2)
    logits = sapa_jax.similarity(q, k, kernel_size=3, scale=2)
    assert float(jnp.max(jnp.abs(logits))) > 5e3
    value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
    assert np.isfinite(float(value))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_all_zero_relu_window_gives_zero(eps):
    """q = 0 gives every logit 0, relu(0) = 0: the weights are 0, not NaN, even with eps = 0."""
    _, k, v = random_qkv(4, 1, 2, 2, 2, 3, 2)
    q = np.zeros((1, 4, 4, 3), np.float32)
    out, grads = jax.value_and_grad(
        lambda q, k, v: jnp.sum(sapa_jax.sapa_upsample(q, k, v, kernel_size=3, scale=2,
                                                       normalizer="relu", eps=eps, impl="xla")),
        argnums=(0, 1, 2))(q, k, v)
    assert float(out) == 0.0
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


def test_valid_border_has_no_darkening():
    """With border="valid" a constant v is reproduced exactly at the corners too."""
    q, k, _ = random_qkv(5, 1, 3, 3, 2, 4, 1)
    v = np.full((1, 3, 3, 1), 2.5, np.float32)
    valid = sapa_jax.sapa_upsample(q, k, v, kernel_size=5, scale=2, border="valid", impl="xla")
    zeros = sapa_jax.sapa_upsample(q, k, v, kernel_size=5, scale=2, border="zeros", impl="xla")
    np.testing.assert_allclose(np.asarray(valid), 2.5, rtol=1e-6)
    assert float(zeros[0, 0, 0, 0]) < 2.4  # padded taps take weight and carry v = 0


def test_scale_one_kernel_one_is_identity_on_v():
    q, k, v = random_qkv(6, 2, 3, 5, 1, 4, 6)
    out = sapa_jax.sapa_upsample(q, k, v, kernel_size=1, scale=1, impl="xla")
    np.testing.assert_allclose(np.asarray(out), v, rtol=1e-6)


@pytest.mark.parametrize(
    "dtypes,want",
    [
        (("bfloat16",) * 3, "bfloat16"),
        (("float16",) * 3, "float16"),
        (("float32", "bfloat16", "float32"), "float32"),
    ],
)
def test_dtypes(dtypes, want):
    q, k, v = random_qkv(7, 1, 2, 3, 2, 4, 3)
    q, k, v = (jnp.asarray(a, d) for a, d in zip((q, k, v), dtypes))
    out = sapa_jax.sapa_upsample(q, k, v, kernel_size=3, scale=2, impl="xla")
    assert out.dtype == jnp.dtype(want)
    ref = sapa_jax.sapa_upsample(*(a.astype(jnp.float32) for a in (q, k, v)), kernel_size=3,
                                 scale=2, impl="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)


def test_jit_vmap_grad():
    q, k, v = random_qkv(8, 2, 3, 3, 2, 4, 3)
    f = lambda q, k, v: sapa_jax.sapa_upsample(q, k, v, kernel_size=3, scale=2, impl="xla")
    eager = f(q, k, v)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(q, k, v)), np.asarray(eager), rtol=1e-6)
    stacked = [np.stack([a, a[::-1]]) for a in (q, k, v)]
    batched = jax.vmap(f)(*stacked)
    np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(eager), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(f(q[::-1], k[::-1], v[::-1])),
                               rtol=1e-6)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


# --- bad input -----------------------------------------------------------------------------

def _args(**over):
    q, k, v = random_qkv(9, 1, 2, 2, 2, 3, 2)
    args = dict(q=q, k=k, v=v, kernel_size=3, scale=2, normalizer="softmax", border="zeros",
                eps=1e-6, impl="xla")
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,error,words",
    [
        (dict(kernel_size=4), ValueError, ["kernel_size", "odd", "4"]),
        (dict(kernel_size=0), ValueError, ["kernel_size", ">= 1", "0"]),
        (dict(kernel_size=3.0), TypeError, ["kernel_size", "integer", "3.0"]),
        (dict(kernel_size=True), TypeError, ["kernel_size", "integer", "True"]),
        (dict(scale=0), ValueError, ["scale", ">= 1", "0"]),
        (dict(scale="2"), TypeError, ["scale", "integer", "'2'"]),
        (dict(scale=3), ValueError, ["q spatial shape", "(6, 6)", "(4, 4)"]),
        (dict(normalizer="tanh"), ValueError, ["normalizer", "softmax", "'tanh'"]),
        (dict(border="reflect"), ValueError, ["border", "valid", "'reflect'"]),
        (dict(impl="cuda"), ValueError, ["impl", "auto", "'cuda'"]),
        (dict(eps=-1.0), ValueError, ["eps", ">= 0", "-1.0"]),
        (dict(eps="small"), TypeError, ["eps", "real", "'small'"]),
        (dict(q=np.zeros((4, 4, 3), np.float32)), ValueError, ["q", "rank 4", "(4, 4, 3)"]),
        (dict(k=np.zeros((1, 2, 2, 3), np.int32)), TypeError, ["k", "floating", "int32"]),
        (dict(v=[[1.0]]), TypeError, ["v", "array", "list"]),
        (dict(k=np.zeros((1, 2, 2, 5), np.float32)), ValueError, ["q and k", "channels", "3", "5"]),
        (dict(v=np.zeros((2, 2, 2, 2), np.float32)), ValueError, ["k and v", "(1, 2, 2)", "(2, 2, 2)"]),
        (dict(q=np.zeros((2, 4, 4, 3), np.float32)), ValueError, ["batch", "2", "1"]),
    ],
)
def test_bad_input(over, error, words):
    with pytest.raises(error) as info:
        sapa_jax.sapa_upsample(**_args(**over))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_numpy_integers_accepted():
    out = sapa_jax.sapa_upsample(**_args(kernel_size=np.int64(3), scale=np.int32(2)))
    assert out.shape == (1, 4, 4, 2)


def test_similarity_assemble_normalize_checks():
    q, k, v = random_qkv(10, 1, 2, 2, 2, 3, 2)
    with pytest.raises(ValueError, match="w must have kernel_size"):
        sapa_jax.assemble(np.zeros((1, 4, 4, 8), np.float32), v, kernel_size=3, scale=2)
    with pytest.raises(ValueError, match="q and k must have the same number of channels"):
        sapa_jax.similarity(q, k[..., :2], kernel_size=3, scale=2)
    logits = sapa_jax.similarity(q, k, kernel_size=3, scale=2)
    with pytest.raises(ValueError, match="low_res_shape"):
        sapa_jax.normalize(logits, border="valid")
    with pytest.raises(ValueError, match="K\\*K channels"):
        sapa_jax.normalize(logits[..., :8])


def test_ffi_platform_checks():
    with pytest.raises(ValueError, match="platform"):
        sapa_jax.ffi_available("tpu")
    assert isinstance(sapa_jax.ffi_available("gpu"), bool)


def test_env_switch_forces_jnp(monkeypatch):
    monkeypatch.setenv("SAPA_JAX_IMPL", "xla")
    from sapa_jax import core
    assert core.resolve_impl("ffi", np.float32) == "xla"
    monkeypatch.setenv("SAPA_JAX_IMPL", "fast")
    with pytest.raises(ValueError, match="SAPA_JAX_IMPL"):
        core.resolve_impl("auto", np.float32)

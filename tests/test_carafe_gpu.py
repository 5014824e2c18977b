"""The fused CARAFE CUDA kernels (xla_ffi/carafe_cuda.cu) on a GPU, against the jnp path on the
same GPU (float64 on the host for the float32 cases): outputs and the gradients w.r.t. x and the
logits, every dtype, and bitwise reproducibility. Marked `gpu`: skipped where JAX sees no GPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sapa_jax
from sapa_jax import _ffi

pytestmark = pytest.mark.gpu

# (normalizer, K, s, groups, batch, H, W, C)
CASES = [("softmax", 5, 2, 1, 2, 8, 9, 64), ("relu", 3, 3, 2, 1, 5, 4, 33),
         ("softplus", 7, 1, 4, 1, 6, 6, 16), ("none", 1, 4, 1, 1, 3, 5, 8)]


def _value_and_vjp(impl, x, logits, g, opts):
    @jax.jit
    def run(x, logits, g):
        out, vjp = jax.vjp(lambda x, l: sapa_jax.carafe_upsample(x, l, impl=impl, **opts),
                           x, logits)
        return (out, *vjp(g))
    return [np.asarray(a, np.float64) for a in run(x, logits, g)]


def _inputs(case, dtype, seed=0):
    normalizer, K, s, G, B, H, W, C = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, H, W, C))
    logits = 1.5 * rng.standard_normal((B, H * s, W * s, G * K * K))
    g = rng.standard_normal((B, H * s, W * s, C))
    opts = dict(kernel_size=K, scale=s, groups=G, normalizer=normalizer)
    return [jnp.asarray(a, dtype) for a in (x, logits, g)], opts


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2),
                                        (jnp.float16, 2e-3)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_jnp_on_gpu(case, dtype, tol):
    assert _ffi.carafe_built("gpu")
    args, opts = _inputs(case, dtype)
    got = _value_and_vjp("ffi", *args, opts)
    want = _value_and_vjp("xla", *(a.astype(jnp.float32) for a in args), opts)
    for name, a, b in zip(("out", "dx", "dlogits"), got, want):
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
        assert err <= tol, (name, err)


def test_bitwise_reproducible_on_gpu():
    args, opts = _inputs(CASES[0], jnp.float32, seed=3)
    first = _value_and_vjp("ffi", *args, opts)
    for _ in range(3):
        for a, b in zip(first, _value_and_vjp("ffi", *args, opts)):
            assert np.array_equal(a, b)

"""The fused SAPA-D CUDA kernels (xla_ffi/deform_cuda.cu) on a GPU, against the jnp path on the
same GPU (float32 from the same rounded inputs): out and the gradients w.r.t. q, k, v and the
offsets, every dtype, offsets beyond the map (pass B's window clamps), and bitwise
reproducibility. Marked `gpu`: skipped where JAX sees no GPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sapa_jax
from sapa_jax import _ffi
from test_deform import core_inputs

pytestmark = pytest.mark.gpu

# (P, G, E, C/G, s, (B, H, W), offset spread)
CASES = [(9, 4, 32, 64, 2, (2, 8, 9), 1.6), (4, 2, 8, 33, 3, (1, 5, 4), 1.6),
         (1, 1, 16, 16, 1, (1, 6, 6), 1.6), (9, 1, 4, 8, 2, (1, 4, 5), 12.0)]


def _value_and_vjp(impl, arrays, opts):
    @jax.jit
    def run(q, k, v, off, g):
        out, vjp = jax.vjp(lambda *a: sapa_jax.deform_upsample(*a, impl=impl, **opts),
                           q, k, v, off)
        return (out, *vjp(g))
    return [np.asarray(a, np.float64) for a in run(*arrays)]


def _inputs(case, dtype, seed=0):
    P, G, E, Cg, s, (B, H, W), spread = case
    q, k, v, off = core_inputs(seed, B, H, W, s, P, G, E, G * Cg, spread=spread)
    g = np.random.default_rng(seed + 1).standard_normal((B, H * s, W * s, G * Cg))
    return ([jnp.asarray(a, dtype) for a in (q, k, v, off, g)],
            dict(num_points=P, groups=G, scale=s))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2),
                                        (jnp.float16, 2e-3)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_matches_jnp_on_gpu(case, dtype, tol):
    assert _ffi.deform_built("gpu")
    arrays, opts = _inputs(case, dtype)
    got = _value_and_vjp("ffi", arrays, opts)
    want = _value_and_vjp("xla", [a.astype(jnp.float32) for a in arrays], opts)
    for name, a, b in zip(("out", "dq", "dk", "dv", "doffsets"), got, want):
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
        assert err <= tol, (name, err)


def test_auto_picks_the_kernel_on_gpu():
    arrays, opts = _inputs(CASES[1], jnp.float32)
    text = jax.jit(lambda *a: sapa_jax.deform_upsample(*a, **opts)).lower(*arrays[:4]).as_text()
    assert "sapa_deform_forward" in text


def test_bitwise_reproducible_on_gpu():
    arrays, opts = _inputs(CASES[0], jnp.float32, seed=3)
    first = _value_and_vjp("ffi", arrays, opts)
    for _ in range(3):
        for a, b in zip(first, _value_and_vjp("ffi", arrays, opts)):
            assert np.array_equal(a, b)

"""First-order reverse mode of the fused core: today's custom_jvp + transposed tangent wiring
(sapa_jax._autodiff) against the custom_vjp wiring it replaced, side by side in one process.

    python benchmarks/bench_grad_wiring.py [--repeats 30]

Both run the same two kernels; the script also checks that the gradients are bit-identical.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from sapa_jax import _ffi


def custom_vjp_core(opts):
    """The previous wiring: a custom_vjp over the two batch-partitioned kernel calls."""
    forward, backward = _ffi._partitioned_calls(opts)

    @jax.custom_vjp
    def core(q, k, v):
        return forward(q, k, v)[0]

    def fwd(q, k, v):
        out, stats = forward(q, k, v)
        return out, (q, k, v, stats)

    def bwd(residuals, g):
        return backward(*residuals, g)

    core.defvjp(fwd, bwd)
    return core


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    b, h, w, s, d, c, kernel = 2, 32, 32, 2, 32, 64, 5  # the CPU preset of bench_core.py
    q = jnp.asarray(rng.standard_normal((b, s * h, s * w, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, h, w, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)
    opts = _ffi.Options(kernel, s, 0, 0, 1e-6)
    cores = {"custom_vjp (before)": custom_vjp_core(opts),
             "custom_jvp + transpose (now)": functools.partial(_ffi._sapa, opts=opts)}
    grads = {name: jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(jnp.sin(f(q, k, v))),
                                    argnums=(0, 1, 2)))
             for name, f in cores.items()}
    results = {name: [np.asarray(a) for a in g(q, k, v)] for name, g in grads.items()}
    first, second = results.values()
    assert all(np.array_equal(a, b) for a, b in zip(first, second)), "gradients differ"
    times = {name: [] for name in grads}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        for name, g in grads.items():
            start = time.perf_counter()
            jax.block_until_ready(g(q, k, v))
            times[name].append(time.perf_counter() - start)
    base = np.median(times["custom_vjp (before)"])
    for name, t in times.items():
        print(f"{name:30s} median {1e3 * np.median(t):8.2f} ms   ratio {np.median(t) / base:.3f}")


if __name__ == "__main__":
    main()

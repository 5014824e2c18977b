"""The paper's cost columns (its Table 2): parameters, FLOPs of the forward, train-step time.

FLOPs come from XLA's cost analysis of the compiled forward. XLA cannot see inside a custom
call, so the forward is traced with the SAPA core on its jnp formulation (`SAPA_JAX_IMPL=xla`
for the duration of the trace): the count is that of the math, the same whichever back end
runs it. The step time is measured by the training loop (`training.train_loop`).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np


def param_count(params: Any) -> int:
    """Number of scalars in a parameter pytree (arrays or `jax.ShapeDtypeStruct`s)."""
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


@contextlib.contextmanager
def jnp_core() -> Iterator[None]:
    """Trace the SAPA family's cores on their jnp path (custom calls hide their FLOPs)."""
    previous = os.environ.get("SAPA_JAX_IMPL")
    os.environ["SAPA_JAX_IMPL"] = "xla"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["SAPA_JAX_IMPL"]
        else:
            os.environ["SAPA_JAX_IMPL"] = previous


def forward_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of `jax.jit(fn)(*args)` by XLA's cost analysis of the compiled program."""
    with jnp_core():
        compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    flops = float((analysis or {}).get("flops", float("nan")))
    if not flops > 0:
        raise RuntimeError(f"XLA's cost analysis reported no FLOPs ({analysis!r})")
    return flops

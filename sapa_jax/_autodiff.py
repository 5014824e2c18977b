"""Derivatives of every order for the fused SAPA core (docs/design.md section 4).

`differentiable_core(forward, backward, reference)` turns the two fused kernel calls into one
function `(q, k, v) -> out` that supports every JAX transformation:

* `forward(q, k, v) -> (out, stats)` is wrapped in a `custom_jvp`. Its tangent is
  `sapa_tangent`, a primitive linear in the tangents `(dq, dk, dv)`.
* `sapa_tangent`'s transpose rule is the fused backward kernel
  `backward(q, k, v, stats, g) -> (dq, dk, dv)`. So `jax.grad` (linearise, then transpose)
  runs exactly the fused forward and the fused backward, as a `custom_vjp` did.
* Evaluating `sapa_tangent` itself (forward mode: `jvp`, `jacfwd`, `linearize`) runs the jnp
  formulation `jax.jvp(reference)`: there is no fused tangent kernel.
* Higher orders differentiate the rules above: the forward again through the `custom_jvp`,
  the backward and the tangent through the jnp formulation (the backward is a `custom_jvp`
  whose rule is the jvp of `jax.vjp(reference)`). `stats` is a function of `(q, k, v)` that
  only the backward and the tangent read, and both of their rules differentiate through q, k,
  v instead, so `stats` carries a zero tangent.
* `vmap`: `sapa_tangent` folds the mapped axis into the batch (as `batch_partitioned` does for
  the kernels); under sharding it lowers to jnp code that XLA partitions on its own.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


class _Core:
    """The three functions of one option set (hashable by identity: a primitive parameter)."""

    def __init__(self, forward, backward, reference):
        self.forward = forward
        self.backward = backward
        self.reference = reference

    def tangent(self, q, k, v, dq, dk, dv):
        """J(q, k, v) . (dq, dk, dv), in jnp."""
        return jax.jvp(self.reference, (q, k, v), (dq, dk, dv))[1]

    def cotangent(self, q, k, v, g):
        """J(q, k, v)^T . g, in jnp."""
        return jax.vjp(self.reference, q, k, v)[1](g)


def _batch_sharded_like(aval, shape, dtype):
    """An abstract value of `shape` and `dtype` with the batch sharding of `aval` (see
    `_ffi._result`: under explicit mesh axes the type carries the sharding)."""
    spec = aval.sharding.spec
    batch = spec[0] if len(spec) else None
    sharding = jax.sharding.NamedSharding(
        aval.sharding.mesh, jax.sharding.PartitionSpec(batch, *([None] * (len(shape) - 1))))
    return aval.update(shape=tuple(shape), dtype=jnp.dtype(dtype), sharding=sharding,
                       weak_type=False)


# ----------------------------------------------------------------------------- sapa_tangent
# Operands (q, k, v, stats, dq, dk, dv); linear in (dq, dk, dv); result (B, sH, sW, C).

tangent_p = Primitive("sapa_tangent")


def _tangent_jnp(q, k, v, stats, dq, dk, dv, *, core):
    del stats  # the jnp formulation recomputes what it needs
    return core.tangent(q, k, v, dq, dk, dv)


_tangent_jitted = jax.jit(_tangent_jnp, static_argnames="core")
tangent_p.def_impl(lambda *args, core: _tangent_jitted(*args, core=core))
tangent_p.def_abstract_eval(
    lambda q, k, v, stats, dq, dk, dv, *, core: _batch_sharded_like(
        q, q.shape[:-1] + (v.shape[-1],), q.dtype))
mlir.register_lowering(tangent_p, mlir.lower_fun(_tangent_jnp, multiple_results=False))


def _tangent_transpose(ct, q, k, v, stats, dq, dk, dv, *, core):
    """The fused backward kernel: (dq, dk, dv) = J^T ct."""
    for name, value in zip("q k v stats".split(), (q, k, v, stats)):
        if ad.is_undefined_primal(value):
            raise NotImplementedError(f"sapa_tangent is linear in (dq, dk, dv) only, not {name}")
    linear = [ad.is_undefined_primal(t) for t in (dq, dk, dv)]
    if type(ct) is ad.Zero:
        return (None,) * 4 + tuple(None for _ in linear)
    grads = core.backward(q, k, v, stats, ct)
    return (None,) * 4 + tuple(g if is_linear else None for g, is_linear in zip(grads, linear))


def _tangent_jvp(primals, tangents, *, core):
    """Second order: through the jnp formulation (stats' tangent is ignored, see above)."""
    q, k, v, _, dq, dk, dv = primals
    tq, tk, tv, _, tdq, tdk, tdv = (ad.instantiate_zeros(t) for t in tangents)
    return jax.jvp(core.tangent, (q, k, v, dq, dk, dv), (tq, tk, tv, tdq, tdk, tdv))


def _tangent_batch(args, dims, *, core):
    """vmap: fold the mapped axis into the batch axis (axis 0 of every operand)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    folded = []
    for a, d in zip(args, dims):
        a = jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
        folded.append(a.reshape((-1,) + a.shape[2:]))
    out = tangent_p.bind(*folded, core=core)
    return out.reshape((size, -1) + out.shape[1:]), 0


ad.primitive_jvps[tangent_p] = _tangent_jvp
ad.primitive_transposes[tangent_p] = _tangent_transpose
batching.primitive_batchers[tangent_p] = _tangent_batch


# ----------------------------------------------------------------------------- the core

def differentiable_core(forward, backward, reference):
    """`(q, k, v) -> out` on the fused kernels, differentiable to any order (module docstring).

    Args:
      forward: fused `(q, k, v) -> (out, stats)`.
      backward: fused `(q, k, v, stats, g) -> (dq, dk, dv)`, the transpose of the tangent.
      reference: the same operator in jnp, `(q, k, v) -> out`, for forward mode and order >= 2.
    """

    @jax.custom_jvp
    def fused_backward(q, k, v, stats, g):
        return tuple(backward(q, k, v, stats, g))

    @fused_backward.defjvp
    def _fused_backward_jvp(primals, tangents):
        q, k, v, stats, g = primals
        tq, tk, tv, _, tg = tangents
        return (fused_backward(q, k, v, stats, g),
                jax.jvp(core.cotangent, (q, k, v, g), (tq, tk, tv, tg))[1])

    core = _Core(forward, fused_backward, reference)

    @jax.custom_jvp
    def fused_forward(q, k, v):
        return tuple(forward(q, k, v))

    @fused_forward.defjvp
    def _fused_forward_jvp(primals, tangents):
        q, k, v = primals
        out, stats = fused_forward(q, k, v)
        d_out = tangent_p.bind(q, k, v, stats, *tangents, core=core)
        return (out, stats), (d_out, jnp.zeros_like(stats))

    def upsample(q, k, v):
        return fused_forward(q, k, v)[0]

    return upsample

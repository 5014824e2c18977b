"""Batch partitioning and batching for functions that are independent per batch element.

`batch_partitioned(fn)` wraps `fn(*arrays) -> tuple of arrays`, where every argument and result
has the batch on axis 0 and batch elements never interact (true of the SAPA FFI calls), so that:

* under `jit` with batch-sharded inputs each device runs `fn` on its own shard: no all-gather
  (`custom_partitioning` with a Shardy rule; the results keep the batch sharding, also with
  explicit mesh axes);
* every other axis is replicated: a sharded spatial or channel axis is gathered first, which
  is correct, only not free (spatial halo exchange is not implemented);
* a batch that the mesh axis does not divide falls back to running replicated;
* `vmap` folds the mapped axis into the batch (`custom_vmap`), since `custom_partitioning` has
  no batching rule of its own: `fn` itself is never vmapped;
* with Shardy disabled (`jax_use_shardy_partitioner=False`, GSPMD) the same per-shard rule
  runs through `infer_sharding_from_operands`;
* inside `shard_map` it simply runs on the local shard.
"""
from __future__ import annotations

import math
import string

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def reshape_within_batch(a, shape):
    """`a.reshape(shape)` for a reshape that keeps axis 0 (the batch) and splits or merges
    only the axes after it.

    Under explicit mesh axes JAX cannot infer the sharding of such a reshape and asks for it:
    the result keeps the batch sharding of `a`, every other axis replicated (the axes it
    splits or merges must be unsharded already, as in every caller here).
    """
    if tuple(shape[:1]) != tuple(a.shape[:1]):
        raise ValueError(f"reshape_within_batch keeps axis 0: got {a.shape} -> {tuple(shape)}")
    sharding = jax.typeof(a).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or AxisType.Explicit not in tuple(getattr(mesh, "axis_types", ())):
        return jnp.reshape(a, shape)
    batch = sharding.spec[0] if len(sharding.spec) else None
    out = NamedSharding(mesh, PartitionSpec(batch, *([None] * (len(shape) - 1))))
    return jax.lax.reshape(a, tuple(shape), out_sharding=out)


def _sharding_rule(arg_ranks, out_ranks) -> tuple[str, tuple[str, ...]]:
    """Einsum-like Shardy rule: one shared batch factor, every other axis its own factor that
    must stay replicated."""
    names = iter(f"{a}{b}" for a in string.ascii_lowercase for b in string.ascii_lowercase)
    others: list[str] = []

    def operand(rank):
        factors = [next(names) for _ in range(rank - 1)]
        others.extend(factors)
        return " ".join(["batch", *factors])

    rule = (", ".join(operand(r) for r in arg_ranks) + " -> "
            + ", ".join(operand(r) for r in out_ranks))
    return rule, tuple(others)


def _batch_axes(sharding):
    """The mesh axis (or axes) the batch is sharded over, or None."""
    spec = getattr(sharding, "spec", None)
    return spec[0] if spec is not None and len(spec) > 0 else None


def _per_shard_shardings(mesh, arg_shapes, result_shape):
    """(argument shardings, result shardings): batch over the input's batch axes, rest replicated."""
    out_shapes = list(result_shape) if isinstance(result_shape, (tuple, list)) else [result_shape]
    axes = _batch_axes(arg_shapes[0].sharding)
    if axes is not None:
        size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        if any(s.shape[0] % size for s in arg_shapes):
            axes = None  # not divisible: run replicated rather than wrong
    spec = lambda rank: NamedSharding(mesh, PartitionSpec(axes, *([None] * (rank - 1))))
    return ([spec(len(s.shape)) for s in arg_shapes], [spec(len(s.shape)) for s in out_shapes])


def batch_partitioned(fn, arg_ranks, out_ranks):
    """Wrap `fn` (see the module docstring); `arg_ranks`/`out_ranks` are the array ranks."""
    partitioned = custom_partitioning(fn)

    def partition(mesh, arg_shapes, result_shape):
        arg_shardings, out_shardings = _per_shard_shardings(mesh, arg_shapes, result_shape)
        return mesh, fn, tuple(out_shardings), tuple(arg_shardings)

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):  # GSPMD (non-Shardy)
        return tuple(_per_shard_shardings(mesh, arg_shapes, result_shape)[1])

    rule, replicated = _sharding_rule(arg_ranks, out_ranks)
    partitioned.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        propagate_user_sharding=None,
        sharding_rule=rule,
        need_replication_factors=replicated)

    @custom_vmap
    def batched(*args):
        return tuple(partitioned(*args))

    @batched.def_vmap
    def _fold_mapped_axis_into_batch(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                for a, b in zip(args, in_batched)]
        outs = batched(*(a.reshape((-1,) + a.shape[2:]) for a in args))
        outs = tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs)
        return outs, tuple(True for _ in outs)

    return batched

"""The FFI core under jax.sharding: batch-sharded inputs run per shard, with no all-gather.

Runs on the 8 host CPU devices that conftest.py asks XLA for.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import sapa_jax
from conftest import random_qkv

pytestmark = [
    pytest.mark.skipif(not sapa_jax.ffi_available("cpu"), reason="CPU FFI kernel not built"),
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (see conftest.py)"),
]

OPTS = dict(kernel_size=3, scale=2, normalizer="softmax", border="valid", impl="ffi")


def core(q, k, v):
    return sapa_jax.sapa_upsample(q, k, v, **OPTS)


def loss(q, k, v, g):
    return jnp.sum(core(q, k, v) * g)


def inputs(batch=8):
    q, k, v = random_qkv(0, batch, 4, 5, 2, 4, 6)
    g = np.random.default_rng(1).standard_normal((batch, 8, 10, 6)).astype(np.float32)
    return q, k, v, g


def mesh_of(n, axis_type=AxisType.Auto):
    return jax.make_mesh((n,), ("data",), axis_types=(axis_type,), devices=jax.devices()[:n])


def hlo(fn, *args) -> str:
    return fn.lower(*args).compile().as_text()


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_batch_sharded_forward_and_grad(devices):
    q, k, v, g = inputs()
    want_out = core(q, k, v)
    want_grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, g)

    sharding = NamedSharding(mesh_of(devices), P("data"))
    args = [jax.device_put(a, sharding) for a in (q, k, v, g)]
    forward = jax.jit(core)
    gradient = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    out = forward(*args[:3])
    grads = gradient(*args)

    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert out.sharding.is_equivalent_to(sharding, out.ndim)
    for grad in grads:
        assert grad.sharding.is_equivalent_to(sharding, grad.ndim)
    for text in (hlo(forward, *args[:3]), hlo(gradient, *args)):
        assert "all-gather" not in text
        assert "all-to-all" not in text


def test_without_the_rule_the_batch_is_gathered():
    """Guards the test above: a plain ffi_call under jit does gather a batch-sharded input."""
    from sapa_jax import _ffi
    q, k, v, _ = inputs()
    opts = _ffi.Options(3, 2, 0, 1, 1e-6)
    sharding = NamedSharding(mesh_of(4), P("data"))
    plain = jax.jit(lambda q, k, v: _ffi.forward_call(q, k, v, opts)[0])
    args = [jax.device_put(a, sharding) for a in (q, k, v)]
    assert "all-gather" in hlo(plain, *args)


def test_explicit_mesh_axes():
    q, k, v, g = inputs()
    mesh = mesh_of(4, AxisType.Explicit)
    with jax.set_mesh(mesh):
        args = [jax.device_put(a, P("data")) for a in (q, k, v, g)]
        out = jax.jit(core)(*args[:3])
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
        assert jax.typeof(out).sharding.spec[0] == "data"
        assert jax.typeof(grads[1]).sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(out), np.asarray(core(q, k, v)), rtol=1e-6, atol=1e-6)


def test_inside_shard_map():
    q, k, v, g = inputs()
    mesh = mesh_of(8)
    spec = P("data")
    mapped = jax.shard_map(core, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    out = jax.jit(mapped)(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(core(q, k, v)), rtol=1e-6, atol=1e-6)
    mapped_loss = lambda q, k, v, g: jnp.sum(
        jax.shard_map(core, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v) * g)
    grads = jax.jit(jax.grad(mapped_loss, argnums=(0, 1, 2)))(q, k, v, g)
    for got, want in zip(grads, jax.grad(loss, argnums=(0, 1, 2))(q, k, v, g)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_channel_and_spatial_sharding_are_replicated_correctly():
    """Only the batch is partitioned; sharded spatial or channel axes are gathered first."""
    q, k, v, _ = inputs()
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    q = jax.device_put(q, NamedSharding(mesh, P("data", "model")))    # spatial rows
    k = jax.device_put(k, NamedSharding(mesh, P("data", None, None, "model")))  # channels
    v = jax.device_put(v, NamedSharding(mesh, P(None, None, None, "model")))  # channels only
    out = jax.jit(core)(q, k, v)
    want = core(*(np.asarray(a) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_batch_not_divisible_by_the_mesh():
    q, k, v, _ = inputs(batch=6)
    mesh = mesh_of(4)
    # Putting a batch of 6 on 4 devices is refused by JAX itself, with a clear message ...
    with pytest.raises(ValueError, match="divide"):
        jax.device_put(q, NamedSharding(mesh, P("data")))
    # ... and a constraint inside jit runs replicated instead of wrong.
    @jax.jit
    def constrained(q, k, v):
        q, k, v = (jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P())) for a in (q, k, v))
        return core(q, k, v)
    np.testing.assert_allclose(np.asarray(constrained(q, k, v)), np.asarray(core(q, k, v)),
                               rtol=1e-6, atol=1e-6)
    from sapa_jax._partitioning import _per_shard_shardings
    shape = jax.ShapeDtypeStruct((6, 4, 4, 3), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    arg_shardings, out_shardings = _per_shard_shardings(mesh, [shape], [shape])
    assert arg_shardings[0].spec == P(None, None, None, None)
    assert out_shardings[0].spec == P(None, None, None, None)


def test_example_train_step_is_batch_parallel():
    """The example's own jitted train step (SAPA decoder, data parallel): same loss as on one
    device, and no all-gather in the compiled step."""
    from examples.common import training
    from examples.segmentation import data, train

    cfg = train.Config(image_size=16, batch_size=8, steps=10, kernel_size=3, embedding_dim=8)
    images, labels = data.train_batch(0, 0, cfg.batch_size, cfg.image_size)

    def run(devices):
        mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
        exp = train.Experiment("sapa-b", "sapa-b", cfg.kernel_size, cfg.embedding_dim,
                               cfg.normalizer)
        trainer = train.make_trainer(cfg, exp, mesh)
        state = trainer.init(jax.random.PRNGKey(0))
        batch = training.shard_batch(mesh, images, labels)
        compiled = trainer.train_step.lower(state, *batch).compile().as_text()
        _, loss = trainer.train_step(state, *batch)
        return float(loss), compiled

    loss_one, _ = run(1)
    loss_eight, compiled = run(8)
    np.testing.assert_allclose(loss_eight, loss_one, rtol=1e-5)
    assert "all-gather" not in compiled


@pytest.mark.skipif(not hasattr(jax.config, "jax_use_shardy_partitioner"),
                    reason="this JAX has no GSPMD switch")
def test_gspmd_partitioner_fallback():
    """With Shardy off (GSPMD), custom_partitioning takes the result shardings from
    `infer_sharding_from_operands`: the batch still runs per shard, without an all-gather."""
    q, k, v, g = inputs(batch=4)
    sharding = NamedSharding(mesh_of(4), P("data"))
    args = [jax.device_put(a, sharding) for a in (q, k, v, g)]
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
        value, grads = compiled(*args)
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)
    assert "all-gather" not in compiled.as_text()
    want_value, want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, g)
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
    for got, want in zip(grads, want_grads):
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Flax modules on a data mesh
# Every variant x impl x (Auto, Explicit) mesh axes, batch sharded on 2 or 4 devices: eager and
# jit(forward + vjp) run, agree with the unsharded computation, keep the batch sharding and
# compile without an all-gather. The four variants share one program per case (fewer compiles).

VARIANTS = "IBPG"
MODULE_CASES = [("ffi", AxisType.Auto, 2), ("ffi", AxisType.Explicit, 4),
                ("xla", AxisType.Auto, 4), ("xla", AxisType.Explicit, 2)]


def _batch_spec(a):
    """The mesh axis of axis 0 of `a`, from its committed sharding."""
    spec = a.sharding.spec
    return spec[0] if len(spec) else None


def _modules_and_data(impl):
    """One Linen SAPA per variant with random variables, and y, x, a cotangent g."""
    from sapa_jax import linen
    rng = np.random.default_rng(3)
    y = rng.standard_normal((4, 8, 8, 6)).astype(np.float32)
    x = rng.standard_normal((4, 4, 4, 6)).astype(np.float32)
    g = rng.standard_normal((4, 8, 8, 6)).astype(np.float32)
    models, variables = [], []
    for variant in VARIANTS:
        model = linen.SAPA(variant=variant, embedding_dim=4, kernel_size=3, impl=impl)
        shapes = jax.eval_shape(model.init, jax.random.key(0), y, x)
        models.append(model)
        variables.append(jax.tree.map(
            lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), shapes))
    return models, variables, (y, x, g)


def _forward_and_vjp(models):
    """jit of: per variant, (out, gradients of <out, g> w.r.t. variables, y and x)."""
    def run(variables, y, x, g):
        results = []
        for model, v in zip(models, variables):
            out, vjp = jax.vjp(model.apply, v, y, x)
            results.append((out, vjp(g)))
        return results
    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _unsharded():
    """Per variant (out, grads) on one device with impl="xla" (test_modules compares impls)."""
    models, variables, data = _modules_and_data("xla")
    return jax.tree.map(np.asarray, _forward_and_vjp(models)(variables, *data))


@pytest.mark.parametrize("impl,axis_type,devices", MODULE_CASES,
                         ids=[f"{i}-{a.name}-{d}dev" for i, a, d in MODULE_CASES])
def test_modules_with_batch_sharded_inputs(impl, axis_type, devices):
    models, variables, data = _modules_and_data(impl)
    mesh = mesh_of(devices, axis_type)
    with jax.set_mesh(mesh):
        sharded = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in data]
        eager = [model.apply(v, *sharded[:2]) for model, v in zip(models, variables)]
        compiled = _forward_and_vjp(models).lower(variables, *sharded).compile()
        results = compiled(variables, *sharded)

    for variant, eager_out, (out, grads), (want_out, want_grads) in zip(
            VARIANTS, eager, results, _unsharded()):
        for got in (eager_out, out, grads[1], grads[2]):
            assert _batch_spec(got) == "data", variant
        for got in (eager_out, out):
            np.testing.assert_allclose(np.asarray(got), want_out, rtol=1e-5, atol=1e-5,
                                       err_msg=variant)
        for got, want in zip(jax.tree_util.tree_leaves(grads),
                             jax.tree_util.tree_leaves(want_grads)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4,
                                       err_msg=variant)
    text = compiled.as_text()
    assert "all-gather" not in text and "all-to-all" not in text

"""JAX transformations of the fused core with the default impl: forward mode, second order,
and first-order reverse mode that stays on the two fused kernels (docs/design.md section 4)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import sapa_jax
from sapa_jax.core import resolve_impl
from conftest import random_qkv

pytestmark = pytest.mark.skipif(not sapa_jax.ffi_available("cpu"),
                                reason="CPU FFI kernel not built")

# One small shape for everything: each shape and transformation is a compile.
SHAPE = dict(batch=2, height=3, width=3, scale=2, dim=2, channels=2)
# Two normaliser/border pairs: softmax for the agreement tests, sigmoid for check_grads.
CASES = [dict(normalizer="softmax", border="valid"), dict(normalizer="sigmoid", border="zeros")]


def qkv64(seed=0):
    return tuple(jnp.asarray(a) for a in random_qkv(seed, *SHAPE.values(), dtype=np.float64))


def core(impl, **opts):
    return lambda q, k, v: sapa_jax.sapa_upsample(q, k, v, kernel_size=3, scale=2, impl=impl,
                                                  **opts)


def primitives(jaxpr):
    """Every (primitive name, ffi target or None) in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        found.append((eqn.primitive.name, eqn.params.get("target_name")))
        for sub in jaxprs_in_params(eqn.params):
            found.extend(primitives(sub))
    return found


def assert_close(got, want, rtol=1e-9, atol=1e-10, err_msg=""):
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                                   err_msg=err_msg)


def test_default_impl_is_the_kernel(x64):
    assert resolve_impl("auto", jnp.float64) == "ffi"


# ----------------------------------------------------------------------------- the core

def test_core_check_grads_order_2(x64):
    q, k, v = qkv64()
    check_grads(jax.jit(core("auto", **CASES[1])), (q, k, v), order=2, modes=["fwd", "rev"])


def test_core_forward_mode_and_second_order_match_xla(x64):
    opts = CASES[0]
    q, k, v = qkv64()
    tangents = qkv64(seed=1)

    def transforms(impl, q, k, v, tangents):  # one program per impl: one compile
        f = core(impl, **opts)
        scalar = lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
        out, lin = jax.linearize(f, q, k, v)
        return dict(
            jvp=jax.jvp(f, (q, k, v), tangents),
            linearize=(out, lin(*tangents)),
            jacfwd=jax.jacfwd(f, argnums=1)(q, k, v),
            hessian=jax.hessian(scalar, argnums=(0, 2))(q, k, v),
            grad_of_grad=jax.grad(lambda q: jnp.sum(jax.grad(scalar, argnums=(0, 1))(q, k, v)[1]
                                                    ** 2))(q),
            grad_of_jvp=jax.grad(lambda k: jnp.sum(jax.jvp(f, (q, k, v), tangents)[1] ** 2))(k))

    run = jax.jit(transforms, static_argnums=0)
    want = run("xla", q, k, v, tangents)
    got = run("auto", q, k, v, tangents)
    for name in want:
        assert_close(got[name], want[name], err_msg=name)


# ----------------------------------------------------------------------------- first order

def test_first_order_reverse_stays_on_the_fused_kernels(x64):
    """jax.grad runs exactly one sapa_forward and one sapa_backward call and no jnp patch
    path (the reference's pad / dot_general); vjp_order 1 never evaluates the tangent."""
    q, k, v = qkv64()
    loss = lambda q, k, v: jnp.sum(core("auto")(q, k, v) ** 2)
    found = primitives(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)
    targets = sorted(t for _, t in found if t is not None)
    assert targets == ["sapa_backward", "sapa_forward"]
    names = {name for name, _ in found}
    assert not names & {"dot_general", "pad", "concatenate", "sapa_tangent"}, names
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    assert hlo.count('custom_call_target="sapa_forward"') == 1
    assert hlo.count('custom_call_target="sapa_backward"') == 1
    assert "dot(" not in hlo


def test_forward_mode_under_vmap_and_sharding(x64):
    """vmap of jvp folds into the batch; jit(jvp) and jit(hvp) of batch-sharded inputs keep
    the batch sharding and compile without an all-gather."""
    q, k, v = qkv64()
    dq, dk, dv = qkv64(seed=1)
    f, f_xla = core("auto"), core("xla")
    stacked = lambda f: jax.jit(jax.vmap(lambda t: jax.jvp(f, (q, k, v), (t, dk, dv))[1]))(
        jnp.stack([dq, 2 * dq, -dq]))
    assert_close(stacked(f), stacked(f_xla))

    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    sharding = NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, sharding) for a in (q, k, v, dq, dk, dv)]
    jvp = lambda q, k, v, dq, dk, dv: jax.jvp(f, (q, k, v), (dq, dk, dv))
    hvp = lambda q, k, v, dq, dk, dv: jax.jvp(
        jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)),
        (q, k, v), (dq, dk, dv))[1]
    for fn in (jvp, hvp):
        compiled = jax.jit(fn).lower(*args).compile()
        assert "all-gather" not in compiled.as_text()
        got = compiled(*args)
        for leaf in jax.tree_util.tree_leaves(got):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
        assert_close(got, jax.jit(fn)(*(np.asarray(a) for a in args)))


# ----------------------------------------------------------------------------- Flax modules

def _linen(impl, variant):
    from sapa_jax import linen
    model = linen.SAPA(variant=variant, embedding_dim=2, kernel_size=3, impl=impl,
                       param_dtype=jnp.float64)
    return model


def _module_inputs():
    q, k, _ = qkv64(seed=2)
    return q, k  # y (B, 6, 6, 2) high-res, x (B, 3, 3, 2) low-res


def test_linen_check_grads_order_2_and_match_xla(x64):
    y, x = _module_inputs()
    variables = _linen("auto", "B").init(jax.random.key(0), y, x)
    apply = lambda impl: _linen(impl, "B").apply
    check_grads(jax.jit(lambda y, x: apply("auto")(variables, y, x)), (y, x), order=2,
                modes=["fwd", "rev"])

    def transforms(impl, variables, y, x):
        f = apply(impl)
        return (jax.jvp(f, (variables, y, x), (variables, y, -x)),
                jax.hessian(lambda y: jnp.sum(f(variables, y, x) ** 2))(y),
                jax.grad(lambda p: jnp.sum(jax.grad(
                    lambda y: jnp.sum(jnp.sin(f(p, y, x))))(y) ** 2))(variables))

    run = jax.jit(transforms, static_argnums=0)
    assert_close(run("auto", variables, y, x), run("xla", variables, y, x))


def test_nnx_forward_mode_and_second_order_match_xla(x64):
    """The NNX module runs the same functional body as Linen (checked in test_modules), so
    agreement with impl="xla" suffices here; check_grads runs on the core and on Linen."""
    from flax import nnx
    from sapa_jax import nnx as sapa_nnx
    y, x = _module_inputs()
    graphdefs, states = {}, {}
    for impl in ("auto", "xla"):
        module = sapa_nnx.SAPA(2, 2, variant="P", embedding_dim=2, kernel_size=3, impl=impl,
                               param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        graphdefs[impl], states[impl] = nnx.split(module)
    call = lambda impl: (lambda state, y, x: nnx.merge(graphdefs[impl], state)(y, x))

    def transforms(impl, state, y, x):
        f = call(impl)
        return (jax.jvp(lambda y, x: f(state, y, x), (y, x), (-y, x)),
                jax.jacfwd(f, argnums=2)(state, y, x),
                jax.grad(lambda s: jnp.sum(jax.grad(
                    lambda y: jnp.sum(jnp.sin(f(s, y, x))))(y) ** 2))(state))

    run = jax.jit(transforms, static_argnums=0)
    assert_close(nnx.to_pure_dict(nnx.State(dict(r=run("auto", states["auto"], y, x)))),
                 nnx.to_pure_dict(nnx.State(dict(r=run("xla", states["xla"], y, x)))))


# ----------------------------------------------------------------------------- vmap

def test_vmap_folds_into_the_batch_before_the_kernel():
    """vmap never reaches the ffi_call (it has no vmap_method): the batching rules fold the
    mapped axis into the batch, so the kernel sees rank-4 operands; a direct vmap of the raw
    call is refused rather than run with a guessed rule."""
    from sapa_jax import _ffi
    q, k, v = (jnp.asarray(a) for a in random_qkv(0, *SHAPE.values()))
    stacked = [jnp.stack([a, -a, 2 * a]) for a in (q, k, v)]
    f = core("auto")
    loss = lambda q, k, v: jnp.sum(jax.vmap(f)(q, k, v) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*stacked).jaxpr

    def kernel_operand_ranks(jaxpr):
        ranks = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "ffi_call":
                ranks.extend(len(var.aval.shape) for var in eqn.invars)
            for sub in jaxprs_in_params(eqn.params):
                ranks.extend(kernel_operand_ranks(sub))
        return ranks

    assert set(kernel_operand_ranks(jaxpr)) == {4}
    assert_close(jax.vmap(f)(*stacked), jnp.stack([f(*(a[i] for a in stacked))
                                                  for i in range(3)]), rtol=1e-6, atol=1e-6)
    opts = _ffi.Options(3, 2, 0, 0, 1e-6)
    with pytest.raises(Exception, match="vmap"):
        jax.vmap(lambda q, k, v: _ffi.forward_call(q, k, v, opts)[0])(*stacked)

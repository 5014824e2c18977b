"""SAPA-D: the core `deform_upsample`, the Linen/NNX `SAPADeform` modules and weight conversion.

The truth is the independent PyTorch oracle in tests/torch_reference_deform.py (float64). Errors
are max|jax - torch| / max|torch| per compared array, printed on lines starting with "PARITY".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import sapa_jax
from sapa_jax import convert, linen
from sapa_jax import nnx as sapa_nnx
from test_parity_torch import TOL, check, nchw, nhwc, rel_err
from torch_reference_deform import SAPADeformTorch, deform_core_torch, randomize_deform_


def _t(a, grad=False):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


def core_inputs(seed, b, h, w, s, points, groups, dim, channels, spread=1.6):
    """q, k, v and offsets whose samples fall at fractional positions, some off the map, and
    a few exactly on the range boundary (py = -1, px = -1, py = H, px = W)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h * s, w * s, groups * dim))
    k = rng.standard_normal((b, h, w, groups * dim))
    v = rng.standard_normal((b, h, w, channels))
    offsets = spread * rng.standard_normal((b, h * s, w * s, groups * points * 2))
    # output point (0, 0) has parent (0, 0): its first point at py = -1, px = 0.25; the last
    # output point (parent (H-1, W-1)) at py = H - 0.5, px = W (outside: px == W)
    offsets[:, 0, 0, 0:2] = (0.25, -1.0)
    offsets[:, -1, -1, 0:2] = (1.0, 0.5)
    return q, k, v, offsets


# ------------------------------------------------------------------------------ the oracle

def test_torch_samplers_agree():
    """grid_sample and the explicit gather agree to 1e-12 in value and gradient (f64)."""
    q, k, v, off = core_inputs(0, 2, 3, 4, 2, 5, 2, 3, 4, spread=2.0)
    results = {}
    for sampler in ("gather", "grid"):
        tensors = [_t(a, True) for a in (q, k, v, off)]
        out = deform_core_torch(*tensors, 5, 2, 2, sampler=sampler)
        out.backward(_t(np.cos(np.arange(out.numel())).reshape(out.shape)))
        results[sampler] = [out.detach().numpy()] + [t.grad.numpy() for t in tensors]
    names = ["out", "dq", "dk", "dv", "doffsets"]
    errors = {n: rel_err(a, b) for n, a, b in zip(names, results["gather"], results["grid"])}
    check("deform-samplers", errors, 1e-12)
    # the inputs do exercise the map's edges: some samples off the map, some partly on it
    py = np.arange(6)[None, :, None, None, None] // 2 + off.reshape(2, 6, 8, 2, 5, 2)[..., 1]
    assert np.any(py <= -1) and np.any(py >= 3) and np.any((py > -1) & (py < 0))
    assert np.any((py > 2) & (py < 3))


# ------------------------------------------------------------------------------ the core

# (P, G, E, C, s, (B, H, W), dtype)
# (P = 1, s = 1 and float32 are covered by the module cases below)
CORE_CASES = [
    (9, 4, 3, 8, 2, (1, 3, 4), "float64"),
    (4, 2, 2, 6, 3, (2, 2, 3), "float64"),
]


@pytest.mark.parametrize("points,groups,dim,channels,s,shape,dtype", CORE_CASES,
                         ids=[f"P{c[0]}-G{c[1]}-s{c[4]}-{c[6]}" for c in CORE_CASES])
def test_core_parity(points, groups, dim, channels, s, shape, dtype, request):
    if dtype == "float64":
        request.getfixturevalue("x64")
    b, h, w = shape
    q, k, v, off = core_inputs(points + s, b, h, w, s, points, groups, dim, channels)
    cot = np.random.default_rng(1).standard_normal((b, h * s, w * s, channels))
    tensors = [_t(a, True) for a in (q, k, v, off)]
    t_out = deform_core_torch(*tensors, points, groups, s)
    t_out.backward(_t(cot))

    jdtype = jnp.dtype(dtype)

    def loss(q, k, v, off):
        out = sapa_jax.deform_upsample(q, k, v, off, num_points=points, groups=groups,
                                       scale=s, impl="auto")
        return jnp.sum(out * jnp.asarray(cot, out.dtype)), out

    (_, j_out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        *(jnp.asarray(a, jdtype) for a in (q, k, v, off)))
    assert j_out.dtype == jdtype and j_out.shape == (b, h * s, w * s, channels)
    errors = {"out": rel_err(j_out, t_out.detach().numpy())}
    errors.update({f"d{n}": rel_err(g, t.grad.numpy())
                   for n, g, t in zip(("q", "k", "v", "offsets"), grads, tensors)})
    check(f"deform-core-P{points}-G{groups}-s{s}-{dtype}", errors, TOL[dtype])


def test_range_boundary_and_softmax_over_all_points(x64):
    """A sample exactly at py = -1 is 0 with zero gradient (upstream's rule); just inside
    the boundary it is the partial bilinear read. Out-of-range points keep logit 0 and take
    part in the softmax."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 2, 3))
    k = rng.standard_normal((1, 2, 2, 3))
    v = rng.standard_normal((1, 2, 2, 2))
    # output point (0, 0), s = 1: point 0 at the parent, point 1 at (py, px) = (dy, 0.0)
    def run(dy):
        off = np.zeros((1, 2, 2, 4))
        off[0, 0, 0, 3] = dy
        f = lambda v, off: sapa_jax.deform_upsample(
            jnp.asarray(q), jnp.asarray(k), v, off, num_points=2, groups=1, scale=1)
        out, vjp = jax.vjp(f, jnp.asarray(v), jnp.asarray(off))
        return np.asarray(out)[0, 0, 0], np.asarray(vjp(jnp.ones_like(out))[1])[0, 0, 0]

    out, d_off = run(-1.0)
    logit = float(q[0, 0, 0] @ k[0, 0, 0])
    attn = np.exp([logit, 0.0]) / np.sum(np.exp([logit, 0.0]))   # the off-map point counts
    np.testing.assert_allclose(out, attn[0] * v[0, 0, 0], rtol=1e-14)
    assert d_off[3] == 0.0 and d_off[2] == 0.0
    out, d_off = run(-0.75)            # rows -1 (off the map, weight 0.75) and 0 (weight 0.25)
    part = 0.25 * k[0, 0, 0]
    w2 = np.exp([logit, float(q[0, 0, 0] @ part)])
    w2 = w2 / w2.sum()
    np.testing.assert_allclose(out, w2[0] * v[0, 0, 0] + w2[1] * 0.25 * v[0, 0, 0],
                               rtol=1e-13)
    assert d_off[3] != 0.0


def test_nan_follows_ieee():
    """A NaN offset makes exactly its output point's group NaN; a NaN in a pixel that no
    sample reads stays out."""
    q, k, v, off = (a.astype(np.float32) for a in core_inputs(5, 1, 3, 3, 2, 2, 2, 2, 4, 0.3))
    off[0, 1, 2, 1] = np.nan                       # group 0, point 0, dy at output (1, 2)
    out = np.asarray(sapa_jax.deform_upsample(q, k, v, off, num_points=2, groups=2))
    assert np.all(np.isnan(out[0, 1, 2, :2])) and np.all(np.isfinite(out[0, 1, 2, 2:]))
    assert np.isnan(out).sum() == 2
    # all samples within 0.5 px of the parent never read pixel (2, 2) for the parents (0, 0)
    off = np.clip(np.nan_to_num(off), -0.45, 0.45)
    v_nan = v.copy()
    v_nan[0, 2, 2] = np.nan
    out = np.asarray(sapa_jax.deform_upsample(q, k, v_nan, off, num_points=2, groups=2))
    assert np.all(np.isfinite(out[0, :2, :2])) and np.all(np.isnan(out[0, 4:, 4:]))


def test_low_precision_dtypes_and_promotion():
    q, k, v, off = core_inputs(2, 1, 2, 3, 2, 4, 2, 2, 4)
    ref = sapa_jax.deform_upsample(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, off)),
                                   num_points=4, groups=2)
    for dtype in (jnp.bfloat16, jnp.float16):
        got = sapa_jax.deform_upsample(*(jnp.asarray(a, dtype) for a in (q, k, v, off)),
                                       num_points=4, groups=2)
        assert got.dtype == dtype
        # inputs rounded to 8 (bf16) / 11 (f16) bits, computed in f32
        assert rel_err(got, ref) < (0.05 if dtype == jnp.bfloat16 else 0.01)
    mixed = sapa_jax.deform_upsample(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.float32),
                                     jnp.asarray(v, jnp.float32), jnp.asarray(off, jnp.float32),
                                     num_points=4, groups=2)
    assert mixed.dtype == jnp.float32


def test_jit_grad_vmap():
    q, k, v, off = (jnp.asarray(a, jnp.float32)
                    for a in core_inputs(4, 3, 2, 3, 2, 4, 2, 2, 4))
    f = lambda q, k, v, off: sapa_jax.deform_upsample(q, k, v, off, num_points=4, groups=2)
    loss = lambda *a: jnp.sum(f(*a) ** 2)
    # vmap over an extra leading axis == the same examples as one batch, values and gradients
    stacked = [a.reshape(3, 1, *a.shape[1:]) for a in (q, k, v, off)]
    batched = jax.jit(jax.vmap(f))(*stacked)
    np.testing.assert_allclose(batched.reshape(3, *batched.shape[2:]), jax.jit(f)(q, k, v, off),
                               rtol=1e-6, atol=1e-6)
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, off)
    gv = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3))))(*stacked)
    for a, b in zip(g, gv):
        np.testing.assert_allclose(b.reshape(a.shape), a, rtol=1e-5, atol=1e-6)
        assert np.any(np.asarray(a) != 0)


def test_memory_does_not_grow_with_points():
    """No P-expanded copy of v: the compiled forward+backward's temporaries at P = 16 exceed
    those at P = 2 by well under the 14 output-sized arrays a P-expanded copy would add."""
    b, h, w, s, c, groups, dim = 1, 8, 8, 2, 128, 2, 4
    out_bytes = b * h * s * w * s * c * 4
    temps = {}
    for points in (2, 16):
        args = [jnp.zeros(shape) for shape in ((b, h * s, w * s, groups * dim),
                                               (b, h, w, groups * dim), (b, h, w, c),
                                               (b, h * s, w * s, groups * points * 2))]
        loss = lambda *a, p=points: jnp.sum(sapa_jax.deform_upsample(
            *a, num_points=p, groups=groups, scale=s) ** 2)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        temps[points] = analysis.temp_size_in_bytes
    assert temps[16] - temps[2] < 3 * out_bytes, (temps, out_bytes)


def test_core_bad_input(monkeypatch):
    q, k, v, off = (jnp.asarray(a, jnp.float32) for a in core_inputs(0, 1, 2, 2, 2, 2, 2, 2, 4))
    f = sapa_jax.deform_upsample
    with pytest.raises(ValueError, match=r"q and k channels must be divisible by groups=3.*4"):
        f(q, k, v, jnp.zeros((1, 4, 4, 12)), num_points=2, groups=3)
    with pytest.raises(ValueError, match=r"v channels must be divisible by groups=2.*got 5"):
        f(q, k, jnp.zeros((1, 2, 2, 5)), off, num_points=2, groups=2)
    with pytest.raises(ValueError, match=r"offsets must have groups \* num_points \* 2 = 12"):
        f(q, k, v, off, num_points=3, groups=2)
    with pytest.raises(ValueError, match=r"offsets spatial shape must be scale"):
        f(q, k, v, off[:, :2], num_points=2, groups=2)
    with pytest.raises(ValueError, match=r"q spatial shape must be scale"):
        f(q, k, v, off, num_points=2, groups=2, scale=3)
    with pytest.raises(ValueError, match=r"k and v must share"):
        f(q, k, v[:, :1], off, num_points=2, groups=2)
    with pytest.raises(TypeError, match=r"num_points must be an integer, got True"):
        f(q, k, v, off, num_points=True, groups=2)
    with pytest.raises(ValueError, match=r"groups must be >= 1, got 0"):
        f(q, k, v, off, num_points=2, groups=0)
    with pytest.raises(TypeError, match=r"offsets must have a floating dtype"):
        f(q, k, v, off.astype(jnp.int32), num_points=2, groups=2)
    with pytest.raises(ValueError, match=r"impl must be one of"):
        f(q, k, v, off, num_points=2, groups=2, impl="cuda")
    # a platform whose kernel module has no SAPA-D kernel: "ffi" raises, "auto" runs jnp
    monkeypatch.setattr(sapa_jax._ffi, "deform_built", lambda platform: False)
    with pytest.raises(RuntimeError, match=r"impl='ffi'.*SAPA-D fused kernel is not built for"):
        f(q, k, v, off, num_points=2, groups=2, impl="ffi")
    monkeypatch.setenv("SAPA_JAX_IMPL", "ffi")     # forcing the kernel everywhere: same error
    with pytest.raises(RuntimeError, match=r"SAPA-D fused kernel is not built for"):
        f(q, k, v, off, num_points=2, groups=2)
    monkeypatch.setenv("SAPA_JAX_IMPL", "xla")
    assert f(q, k, v, off, num_points=2, groups=2, impl="ffi").shape == (1, 4, 4, 4)
    monkeypatch.delenv("SAPA_JAX_IMPL")
    assert f(q, k, v, off, num_points=2, groups=2).shape == (1, 4, 4, 4)


# ------------------------------------------------------------------------------ modules

# P, G, E, s, (B, H, W), Cy, Cx, use_bias, high_offset, norm, dtype
MODULE_CASES = [
    (9, 4, 3, 2, (1, 3, 4), 6, 8, True, True, False, "float64"),
    (4, 2, 3, 3, (2, 2, 3), 5, 6, False, False, False, "float32"),
    (1, 1, 4, 1, (1, 4, 3), 4, 3, True, True, False, "float64"),
    (4, 4, 2, 2, (1, 3, 3), 32, 64, True, False, True, "float64"),
    (9, 2, 4, 3, (1, 2, 2), 64, 32, True, True, True, "float32"),
]


def _module_id(c):
    return (f"P{c[0]}-G{c[1]}-s{c[3]}-bias{int(c[7])}-high{int(c[8])}-norm{int(c[9])}"
            f"-{c[10]}")


@pytest.mark.parametrize("case", MODULE_CASES, ids=[_module_id(c) for c in MODULE_CASES])
def test_module_parity(case, request):
    points, groups, dim, s, (b, h, w), cy, cx, use_bias, high_offset, norm, dtype = case
    if dtype == "float64":
        request.getfixturevalue("x64")
    opts = dict(num_points=points, groups=groups, embedding_dim=dim, scale=s,
                use_bias=use_bias, high_offset=high_offset, norm=norm)
    torch_model = randomize_deform_(SAPADeformTorch(cy, cx, **opts).double(),
                                    seed=len(_module_id(case)))
    rng = np.random.default_rng(11)
    y = rng.standard_normal((b, h * s, w * s, cy))
    x = rng.standard_normal((b, h, w, cx))
    cot = rng.standard_normal((b, h * s, w * s, cx))
    ty, tx = torch.tensor(nchw(y), requires_grad=True), torch.tensor(nchw(x), requires_grad=True)
    t_out = torch_model(ty, tx)
    t_out.backward(torch.tensor(nchw(cot)))
    t_grads = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}

    jdtype = jnp.dtype(dtype)
    variables = convert.deform_from_torch(torch_model.state_dict(), dtype=jdtype)
    model = linen.SAPADeform(**opts)

    def loss(params, y, x):
        out = model.apply({"params": params}, y, x)
        return jnp.sum(out * jnp.asarray(cot, out.dtype)), out

    (_, j_out), (g_params, g_y, g_x) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        variables["params"], jnp.asarray(y, jdtype), jnp.asarray(x, jdtype))
    assert j_out.dtype == jdtype and j_out.shape == (b, h * s, w * s, cx)
    j_grads = convert.deform_to_torch(g_params)
    assert sorted(j_grads) == sorted(t_grads)
    errors = {"out": rel_err(j_out, nhwc(t_out)), "dy": rel_err(g_y, nhwc(ty.grad)),
              "dx": rel_err(g_x, nhwc(tx.grad))}
    errors.update({f"d[{n}]": rel_err(j_grads[n], t_grads[n]) for n in t_grads})
    check(f"deform-{_module_id(case)}", errors, TOL[dtype])


@pytest.mark.parametrize("points,high_offset", [(4, True), (9, False)])
def test_zero_offsets_give_nearest_upsampling(points, high_offset):
    """Offsets 0: every point samples the parent pixel, all logits are equal, the attention
    is exactly 1/P and out = P * (1/P * x[parent]): nearest upsampling, bit for bit when 1/P
    is exact (P = 4), to rounding otherwise."""
    y = jax.random.normal(jax.random.key(0), (2, 6, 4, 5))
    x = jax.random.normal(jax.random.key(1), (2, 3, 2, 8))
    model = linen.SAPADeform(num_points=points, groups=2, embedding_dim=4, scale=2,
                             high_offset=high_offset)
    params = model.init(jax.random.key(2), y, x)["params"]
    params["offset"] = jax.tree_util.tree_map(jnp.zeros_like, params["offset"])
    params["q"]["bias"] = params["q"]["bias"] + 3.0        # q . k far from 0: still uniform
    params["k"]["kernel"] = params["k"]["kernel"] * 50.0
    out = np.asarray(model.apply({"params": params}, y, x))
    nearest = np.asarray(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    if points == 4:
        np.testing.assert_array_equal(out, nearest)
    else:
        np.testing.assert_allclose(out, nearest, rtol=4e-7, atol=1e-7)


def test_linen_equals_nnx_and_parameter_tree():
    y = jax.random.normal(jax.random.key(0), (1, 4, 6, 32))
    x = jax.random.normal(jax.random.key(1), (1, 2, 3, 64))
    opts = dict(num_points=4, groups=4, embedding_dim=8, scale=2, norm=True)
    module = sapa_nnx.SAPADeform(32, 64, **opts, rngs=nnx.Rngs(0))
    state = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, state)
    assert shapes == {"norm_y": {"scale": (32,), "bias": (32,)},
                      "norm_x": {"scale": (64,), "bias": (64,)},
                      "q": {"kernel": (1, 1, 32, 32), "bias": (32,)},
                      "k": {"kernel": (1, 1, 64, 32), "bias": (32,)},
                      "offset": {"kernel": (1, 1, 64, 4 * 4 * 2 * 4), "bias": (128,)}}
    lin = linen.SAPADeform(**opts)
    lin_params = lin.init(jax.random.key(3), y, x)["params"]
    assert jax.tree_util.tree_map(lambda a: a.shape, lin_params) == shapes
    np.testing.assert_array_equal(np.asarray(lin.apply({"params": state}, y, x)),
                                  np.asarray(module(y, x)))
    # upstream init: conv weights normal(0, 0.02), biases 0, GroupNorm 1 / 0
    kernel = np.asarray(lin_params["offset"]["kernel"])
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
    assert np.all(np.asarray(lin_params["offset"]["bias"]) == 0)
    assert np.all(np.asarray(lin_params["norm_x"]["scale"]) == 1)
    no_bias = linen.SAPADeform(num_points=4, groups=4, embedding_dim=8, use_bias=False,
                               high_offset=False)
    tree = no_bias.init(jax.random.key(0), y, x)["params"]
    assert sorted(tree) == ["k", "offset", "q"] and all(set(g) == {"kernel"}
                                                        for g in tree.values())
    assert tree["offset"]["kernel"].shape == (1, 1, 64, 4 * 4 * 2)


def test_module_bad_input():
    y = jnp.ones((1, 4, 4, 32))
    x = jnp.ones((1, 2, 2, 48))
    with pytest.raises(ValueError, match=r"norm=True.*x channels to be a multiple of 32.*48"):
        linen.SAPADeform(norm=True, groups=4).init(jax.random.key(0), y, x)
    with pytest.raises(ValueError, match=r"norm=True.*dim_y to be a multiple of 32, got dim_y=20"):
        sapa_nnx.SAPADeform(20, 64, norm=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dim_x must be divisible by groups=4.*dim_x=6"):
        sapa_nnx.SAPADeform(8, 6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x channels must be divisible by groups=5"):
        linen.SAPADeform(groups=5).init(jax.random.key(0), y, x)
    with pytest.raises(TypeError, match=r"high_offset must be a bool, got 1"):
        linen.SAPADeform(high_offset=1).init(jax.random.key(0), y, x)
    with pytest.raises(ValueError, match=r"y spatial shape must be scale"):
        linen.SAPADeform(scale=3).init(jax.random.key(0), y, x)
    module = sapa_nnx.SAPADeform(32, 48, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have dim_x=48 channels"):
        module(y, jnp.ones((1, 2, 2, 32)))
    params = linen.SAPADeform(num_points=4).init(jax.random.key(0), y, x)
    with pytest.raises(ValueError, match=r"SAPA-D with .*offset/kernel: got \(1, 1, 48, 128\), "
                                         r"expected \(1, 1, 48, 288\)"):
        linen.SAPADeform(num_points=9).apply(params, y, x)


# ------------------------------------------------------------------------------ weights

def _torch_state(norm=False, use_bias=True, cy=32, cx=64):
    model = randomize_deform_(SAPADeformTorch(cy, cx, num_points=4, groups=2, embedding_dim=4,
                                              norm=norm, use_bias=use_bias))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("norm,use_bias", [(False, True), (True, True), (False, False)])
def test_convert_round_trip(norm, use_bias):
    model, sd = _torch_state(norm, use_bias)
    variables = convert.deform_from_torch(sd)
    params = variables["params"]
    assert sorted(params) == sorted({k.split(".")[0] for k in sd})
    np.testing.assert_array_equal(np.asarray(params["offset"]["kernel"])[0, 0],
                                  sd["offset.weight"].numpy()[:, :, 0, 0].T)
    for source in (variables, params):
        back = convert.deform_to_torch(source)
        assert list(back) == list(sd)                 # upstream's keys, in its order
        for key in sd:
            assert back[key].shape == tuple(sd[key].shape)
            np.testing.assert_array_equal(back[key], sd[key].numpy())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    assert convert.deform_expected_keys(use_bias=use_bias, norm=norm) == list(sd)


def test_convert_rejects_bad_state_dicts():
    _, sd = _torch_state(norm=True)
    with pytest.raises(ValueError, match=r"unexpected keys \['offset.scale'\]"):
        convert.deform_from_torch(dict(sd, **{"offset.scale": sd["offset.bias"]}))
    with pytest.raises(ValueError, match=r"missing keys \['norm_x.bias'\]"):
        convert.deform_from_torch({k: v for k, v in sd.items() if k != "norm_x.bias"})
    with pytest.raises(ValueError, match=r"missing keys \['k.bias'\]"):
        convert.deform_from_torch({k: v for k, v in sd.items() if k != "k.bias"})
    with pytest.raises(ValueError, match=r"unexpected keys \['k.bias', 'offset.bias', "
                                         r"'q.bias'\]"):
        convert.deform_from_torch(sd, use_bias=False)
    with pytest.raises(ValueError, match=r"missing keys \['q.weight'\]"):
        convert.deform_from_torch({k: v for k, v in sd.items() if k != "q.weight"})
    with pytest.raises(ValueError, match=r"1x1 conv weight.*\(8, 32, 3, 3\)"):
        convert.deform_from_torch(dict(sd, **{"q.weight": torch.zeros(8, 32, 3, 3)}))
    with pytest.raises(ValueError, match=r"k and offset inputs"):
        convert.deform_from_torch(dict(sd, **{"offset.weight": torch.zeros(64, 33, 1, 1)}))
    with pytest.raises(TypeError, match=r"state_dict must be a mapping"):
        convert.deform_from_torch([1])
    variables = convert.deform_from_torch(sd)
    with pytest.raises(ValueError, match=r"missing \['norm_x'\]"):
        convert.deform_to_torch({k: v for k, v in variables["params"].items() if k != "norm_x"})
    with pytest.raises(ValueError, match=r"unexpected \['v'\]"):
        convert.deform_to_torch(dict(variables["params"], v={"kernel": jnp.zeros((1, 1))}))


def test_gradients_to_torch_and_nnx_loading():
    torch_model, sd = _torch_state(norm=False)
    opts = dict(num_points=4, groups=2, embedding_dim=4, scale=2)
    module = sapa_nnx.SAPADeform.from_torch(sd, **opts)
    assert (module.dim_y, module.dim_x) == (32, 64)
    back = convert.deform_to_torch(module)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key].numpy())
    y = jax.random.normal(jax.random.key(0), (1, 4, 4, 32))
    x = jax.random.normal(jax.random.key(1), (1, 2, 2, 64))
    lin = linen.SAPADeform(**opts)
    variables = convert.deform_from_torch(sd)
    np.testing.assert_array_equal(np.asarray(module(y, x)),
                                  np.asarray(lin.apply(variables, y, x)))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(lin.apply({"params": p}, y, x) ** 2)))(
        variables["params"])
    as_torch = convert.deform_to_torch(grads)
    assert {k: v.shape for k, v in as_torch.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    np.testing.assert_array_equal(as_torch["offset.weight"][:, :, 0, 0],
                                  np.asarray(grads["offset"]["kernel"])[0, 0].T)
    # a module of other options refuses the weights, naming what differs
    with pytest.raises(ValueError, match=r"offset/kernel: got \(1, 1, 64, 64\), "
                                         r"expected \(1, 1, 64, 144\)"):
        sapa_nnx.SAPADeform.from_torch(sd, **dict(opts, num_points=9))
    with pytest.raises(ValueError, match=r"unexpected keys \['k.bias', 'offset.bias'"):
        sapa_nnx.SAPADeform.from_torch(sd, **opts, use_bias=False)
    with pytest.raises(ValueError, match=r"options \['dim_x'\] are read from the state_dict"):
        sapa_nnx.SAPADeform.from_torch(sd, dim_x=64)
    other = sapa_nnx.SAPADeform(32, 64, **opts, rngs=nnx.Rngs(4))
    convert.load_deform_into_nnx(other, sd)
    np.testing.assert_array_equal(np.asarray(other(y, x)), np.asarray(module(y, x)))
    with pytest.raises(TypeError, match=r"module must be a sapa_jax.nnx.SAPADeform"):
        convert.load_deform_into_nnx(sapa_nnx.SAPA(4, 4, rngs=nnx.Rngs(0)), sd)

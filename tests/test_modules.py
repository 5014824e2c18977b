"""Flax modules: parameter trees, initialisation, jit/vmap/grad, Linen == NNX, dtypes, errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sapa_jax
from sapa_jax import linen, modules
from sapa_jax import nnx as sapa_nnx

# Few shapes on purpose (each one is an XLA compile). Cy != Cx to catch swapped widths.
CY, CX, D, S, K = 6, 5, 4, 2, 3
OPTS = dict(embedding_dim=D, kernel_size=K, scale=S, impl="xla")


def inputs(variant="B", batch=2, dtype=jnp.float32, seed=0):
    cx = CY if variant == "I" else CX
    ky, kx = jax.random.split(jax.random.key(seed))
    y = jax.random.normal(ky, (batch, 4 * S, 5 * S, CY), dtype)
    x = jax.random.normal(kx, (batch, 4, 5, cx), dtype)
    return y, x


def random_params(params, seed=1):
    """O(1) values for every leaf, as tests/torch_reference.randomize_ (LayerNorm scales
    1 + 0.3 N, kernels N / sqrt(fan_in), biases 0.3 N), so kernels are not near-uniform.
    NumPy RNG: no XLA compile per leaf shape. `params` may hold arrays or ShapeDtypeStructs."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        z = rng.standard_normal(leaf.shape)
        value = {"scale": 1 + 0.3 * z, "bias": 0.3 * z}.get(name)
        if value is None:  # kernel (in, out)
            value = z / np.sqrt(leaf.shape[0])
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, params)


def shapes_of(tree):
    return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


# ------------------------------------------------------------------------- parameter trees

def _lin(i, o, bias=True):
    return {"kernel": (i, o), "bias": (o,)} if bias else {"kernel": (i, o)}


def _norms(cy, cx):
    return {"norm_y": {"scale": (cy,), "bias": (cy,)}, "norm_x": {"scale": (cx,), "bias": (cx,)}}


TREES = [
    ("I", {}, {**_norms(CY, CY)}),
    ("I", {"value_proj": True}, {**_norms(CY, CY), "v": _lin(CY, CY)}),
    ("B", {}, {**_norms(CY, CX), "q": _lin(CY, D), "k": _lin(CX, D)}),
    ("B", {"use_bias": False, "out_dim": 7},
     {**_norms(CY, CX), "q": _lin(CY, D, False), "k": _lin(CX, D, False),
      "v": _lin(CX, 7, False)}),
    ("B", {"out_dim": CX}, {**_norms(CY, CX), "q": _lin(CY, D), "k": _lin(CX, D)}),
    ("P", {"value_proj": True},
     {**_norms(CY, CX), "q": _lin(CY + CX, D), "k": _lin(CX, D), "v": _lin(CX, CX)}),
    ("G", {}, {**_norms(CY, CX), "qy": _lin(CY, D), "qx": _lin(CX, D), "gate": _lin(CX, 1),
               "k": _lin(CX, D)}),
]


@pytest.mark.parametrize("variant,extra,expected", TREES,
                         ids=[f"{v}-{sorted(e.items())}" for v, e, _ in TREES])
def test_param_tree(variant, extra, expected):
    y, x = inputs(variant)
    model = linen.SAPA(variant=variant, **OPTS, **extra)
    variables = jax.eval_shape(model.init, jax.random.key(0), y, x)
    assert set(variables) == {"params"}
    assert shapes_of(variables["params"]) == expected
    # NNX state paths mirror the Linen names
    abstract = nnx.eval_shape(lambda: sapa_nnx.SAPA(CY, x.shape[-1], variant=variant, **OPTS,
                                                    **extra, rngs=nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    assert shapes_of(state) == expected


def test_init_statistics():
    wide = 96
    model = sapa_nnx.SAPA(wide, wide, variant="G", embedding_dim=wide, value_proj=True,
                          rngs=nnx.Rngs(3))
    params = model.params_dict()
    for name in ("norm_y", "norm_x"):
        assert np.all(np.asarray(params[name]["scale"]) == 1.0)
        assert np.all(np.asarray(params[name]["bias"]) == 0.0)
    for name in ("qy", "qx", "k", "v"):
        kernel = np.asarray(params[name]["kernel"], np.float64)
        assert kernel.dtype == np.float64 and kernel.size == wide * wide
        assert 0.019 < kernel.std() < 0.021, (name, kernel.std())   # 9216 samples: +-1.5%
        assert abs(kernel.mean()) < 0.001
        assert np.max(np.abs(kernel)) <= 2.0
        assert np.all(np.asarray(params[name]["bias"]) == 0.0)
    # different layers get different draws
    assert not np.allclose(params["qy"]["kernel"], params["qx"]["kernel"])
    # Linen init: same distribution and dtype
    y, x = inputs("B")
    lparams = linen.SAPA(**OPTS).init(jax.random.key(0), y, x)["params"]
    assert lparams["q"]["kernel"].dtype == jnp.float32
    assert np.all(np.asarray(lparams["q"]["bias"]) == 0.0)
    assert 0.0 < np.std(np.asarray(lparams["q"]["kernel"])) < 0.05


def test_trunc_normal_bounds_are_absolute():
    init = modules.trunc_normal_init(std=1.0, lower=-0.5, upper=0.25)
    sample = np.asarray(init(jax.random.key(0), (20000,), jnp.float32))
    assert sample.min() >= -0.5 and sample.max() <= 0.25
    assert sample.min() < -0.45 and sample.max() > 0.2   # the bounds are reached, not std-scaled


# ------------------------------------------------------------------- transformations, NNX

@pytest.mark.parametrize("variant", ["I", "B", "P", "G"])
def test_linen_and_nnx_agree(variant):
    y, x = inputs(variant)
    nmodel = sapa_nnx.SAPA(CY, x.shape[-1], variant=variant, value_proj=variant == "P",
                           rngs=nnx.Rngs(0), **OPTS)
    params = random_params(nnx.to_pure_dict(nnx.state(nmodel, nnx.Param)))
    nnx.replace_by_pure_dict(state := nnx.state(nmodel, nnx.Param), params)
    nnx.update(nmodel, state)
    lmodel = linen.SAPA(variant=variant, value_proj=variant == "P", **OPTS)
    out_linen = lmodel.apply({"params": params}, y, x)
    out_nnx = nmodel(y, x)
    assert out_linen.shape == (2, 4 * S, 5 * S, x.shape[-1])
    np.testing.assert_array_equal(np.asarray(out_linen), np.asarray(out_nnx))
    # and the functional body gives the same again, as projection + core
    config = lmodel.config()
    np.testing.assert_array_equal(np.asarray(modules.sapa_apply(params, y, x, config)),
                                  np.asarray(out_linen))
    q, k, v = modules.project(params, y, x, config)
    d = CY if variant == "I" else D
    assert (q.shape, k.shape, v.shape) == ((2, 4 * S, 5 * S, d), (2, 4, 5, d), x.shape)
    np.testing.assert_array_equal(
        np.asarray(sapa_jax.sapa_upsample(q, k, v, kernel_size=K, scale=S, impl="xla")),
        np.asarray(out_linen))
    assert float(jnp.std(out_linen)) > 0.1


def test_jit_vmap_grad_linen():
    y, x = inputs("G")
    model = linen.SAPA(variant="G", value_proj=True, **OPTS)
    params = random_params(jax.eval_shape(model.init, jax.random.key(0), y, x)["params"])
    apply = lambda p, y, x: model.apply({"params": p}, y, x)
    japply = jax.jit(apply)
    eager = apply(params, y, x)
    np.testing.assert_allclose(japply(params, y, x), eager, rtol=1e-6, atol=1e-6)

    # vmap over an extra leading axis of 3 == three separate calls
    ys = jnp.stack([y, 2 * y, -y])
    xs = jnp.stack([x, x[::-1], 0.5 * x])
    batched = jax.jit(jax.vmap(apply, in_axes=(None, 0, 0)))(params, ys, xs)
    assert batched.shape == (3,) + eager.shape
    for i in range(3):
        np.testing.assert_allclose(batched[i], japply(params, ys[i], xs[i]), rtol=1e-5,
                                   atol=1e-5)

    def loss(p, y, x):
        return jnp.mean(apply(p, y, x) ** 2)

    g_params, g_y, g_x = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, y, x)
    assert shapes_of(g_params) == shapes_of(params)
    for g in jax.tree_util.tree_leaves((g_params, g_y, g_x)):
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0)
    # first-order check of d loss / d y along a random direction
    direction = jax.random.normal(jax.random.key(5), y.shape)
    h = 1e-2
    fd = (jnp.mean(japply(params, y + h * direction, x) ** 2)
          - jnp.mean(japply(params, y - h * direction, x) ** 2)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g_y, direction)), float(fd), rtol=2e-2)


def test_jit_grad_nnx_matches_linen():
    y, x = inputs("B")
    nmodel = sapa_nnx.SAPA(CY, CX, variant="B", rngs=nnx.Rngs(1), **OPTS)
    params = random_params(nnx.to_pure_dict(nnx.state(nmodel, nnx.Param)), seed=4)
    state = nnx.state(nmodel, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(nmodel, state)

    out = nnx.jit(lambda m, y, x: m(y, x))(nmodel, y, x)
    np.testing.assert_allclose(out, nmodel(y, x), rtol=1e-6, atol=1e-6)

    # vmap over an extra leading axis, module shared (not mapped)
    ys, xs = jnp.stack([-y, y]), jnp.stack([x[::-1], x])
    batched = nnx.vmap(lambda m, y, x: m(y, x), in_axes=(None, 0, 0))(nmodel, ys, xs)
    assert batched.shape == (2,) + out.shape
    np.testing.assert_allclose(batched[1], out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[0], nmodel(ys[0], xs[0]), rtol=1e-5, atol=1e-6)

    grads = nnx.grad(lambda m: jnp.mean(m(y, x) ** 2))(nmodel)
    g_nnx = nnx.to_pure_dict(grads)
    lmodel = linen.SAPA(variant="B", **OPTS)
    g_linen = jax.grad(lambda p: jnp.mean(lmodel.apply({"params": p}, y, x) ** 2))(params)
    assert shapes_of(g_nnx) == shapes_of(g_linen)
    for a, b in zip(jax.tree_util.tree_leaves(g_nnx), jax.tree_util.tree_leaves(g_linen)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert np.any(np.asarray(a) != 0)


# ------------------------------------------------------------------------------- dtypes

def test_bfloat16():
    y, x = inputs("B")
    model = linen.SAPA(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **OPTS)
    variables = model.init(jax.random.key(0), y, x)
    assert all(l.dtype == jnp.bfloat16 for l in jax.tree_util.tree_leaves(variables))
    out = model.apply(variables, y.astype(jnp.bfloat16), x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    ref = linen.SAPA(**OPTS).apply(jax.tree_util.tree_map(lambda a: a.astype(jnp.float32),
                                                          variables), y, x)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1  # bf16 ~ 3 digits

    # dtype=bf16 with float32 parameters and inputs still computes/returns bf16 (NNX)
    nmodel = sapa_nnx.SAPA(CY, CX, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **OPTS)
    assert nmodel.q.kernel[...].dtype == jnp.float32
    assert nmodel(y, x).dtype == jnp.bfloat16


def test_dtype_inference():
    y, x = inputs("B")
    model = linen.SAPA(**OPTS)
    variables = model.init(jax.random.key(0), y, x)
    assert model.apply(variables, y, x).dtype == jnp.float32
    # bf16 inputs with float32 params promote to float32, like flax.linen.Dense
    out = model.apply(variables, y.astype(jnp.bfloat16), x.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32


# ------------------------------------------------------------------------------- errors

def _linen(y_shape=(2, 8, 10, CY), x_shape=(2, 4, 5, CX), y_dtype=jnp.float32,
           x_dtype=jnp.float32, **kw):
    opts = {**OPTS, **kw}
    y = jnp.zeros(y_shape, y_dtype)
    x = jnp.zeros(x_shape, x_dtype)
    return lambda: linen.SAPA(**opts).init(jax.random.key(0), y, x)


def _nnx(dim_y=CY, dim_x=CX, **kw):
    opts = {**OPTS, **kw}
    return lambda: sapa_nnx.SAPA(dim_y, dim_x, **opts,
                                 **({} if "rngs" in kw else {"rngs": nnx.Rngs(0)}))


BAD = [
    ("y-rank", _linen(y_shape=(8, 10, CY)), ValueError, r"y must have rank 4.*\(8, 10, 6\)"),
    ("x-int", _linen(x_dtype=jnp.int32), TypeError, r"x must have a floating dtype.*int32"),
    ("y-list", lambda: linen.SAPA(**OPTS).init(jax.random.key(0), [[1.0]], jnp.zeros((1, 1, 1, 1))),
     TypeError, r"y must be a JAX or NumPy array.*list"),
    ("batch", _linen(x_shape=(3, 4, 5, CX)), ValueError, r"same batch size.*2 and 3"),
    ("spatial", _linen(y_shape=(2, 8, 9, CY)), ValueError, r"y spatial shape.*\(8, 10\).*\(8, 9\)"),
    ("I-channels", _linen(variant="I"), ValueError, r"variant 'I'.*6.*5"),
    ("variant", _linen(variant="Z"), ValueError, r"variant must be one of.*'Z'"),
    ("variant-type", _linen(variant=2), TypeError, r"variant must be one of.*2"),
    ("embedding_dim", _linen(embedding_dim=0), ValueError, r"embedding_dim must be >= 1, got 0"),
    ("embedding_dim-float", _linen(embedding_dim=2.5), TypeError,
     r"embedding_dim must be an integer.*2.5"),
    ("embedding_dim-bool", _linen(embedding_dim=True), TypeError,
     r"embedding_dim must be an integer.*True"),
    ("out_dim", _linen(out_dim=0), ValueError, r"out_dim must be >= 1, got 0"),
    ("out_dim-str", _linen(out_dim="8"), TypeError, r"out_dim must be an integer.*'8'"),
    ("kernel_size", _linen(kernel_size=4), ValueError, r"kernel_size must be odd, got 4"),
    ("scale", _linen(scale=0), ValueError, r"scale must be >= 1, got 0"),
    ("normalizer", _linen(normalizer="tanh"), ValueError, r"normalizer must be one of.*'tanh'"),
    ("border", _linen(border="same"), ValueError, r"border must be one of.*'same'"),
    ("value_proj", _linen(value_proj="yes"), TypeError, r"value_proj must be a bool.*'yes'"),
    ("use_bias", _linen(use_bias=1), TypeError, r"use_bias must be a bool.*1"),
    ("eps", _linen(eps=-1.0), ValueError, r"eps must be a finite number >= 0, got -1.0"),
    ("dtype-int", _linen(dtype=jnp.int32), ValueError,
     r"dtype must be a floating dtype, got int32"),
    ("dtype-junk", _linen(dtype="nonsense"), TypeError,
     r"dtype must be a floating dtype.*nonsense"),
    ("param_dtype", _linen(param_dtype=None), TypeError,
     r"param_dtype must be a floating dtype, got None"),
    ("kernel_init", _linen(kernel_init=3), TypeError, r"kernel_init must be callable.*3"),
    ("nnx-dim_y", _nnx(dim_y=0), ValueError, r"dim_y must be >= 1, got 0"),
    ("nnx-dim_x", _nnx(dim_x=3.0), TypeError, r"dim_x must be an integer.*3.0"),
    ("nnx-I", _nnx(variant="I"), ValueError, r"variant 'I'.*dim_y=6.*dim_x=5"),
    ("nnx-rngs", _nnx(rngs=0), TypeError, r"rngs must be an nnx.Rngs, got int"),
    ("nnx-variant", _nnx(variant="b"), ValueError, r"variant must be one of.*'b'"),
]


@pytest.mark.parametrize("make,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bad_call_inputs_nnx():
    y, x = inputs("B")
    model = sapa_nnx.SAPA(CY, CX, rngs=nnx.Rngs(0), **OPTS)
    with pytest.raises(ValueError, match=r"y must have dim_y=6 channels.*\(2, 8, 10, 5\)"):
        model(y[..., :5], x)
    with pytest.raises(ValueError, match=r"x must have dim_x=5 channels.*\(2, 4, 5, 4\)"):
        model(y, x[..., :4])
    with pytest.raises(ValueError, match=r"y spatial shape"):
        model(y[:, :7], x)
    with pytest.raises(TypeError, match=r"y must have a floating dtype, got int32"):
        model(y.astype(jnp.int32), x)


def test_params_of_another_configuration_are_rejected():
    y, x = inputs("B")
    variables = linen.SAPA(**OPTS).init(jax.random.key(0), y, x)
    with pytest.raises(ValueError, match=r"missing \['v/kernel', 'v/bias'\]"):
        linen.SAPA(value_proj=True, **OPTS).apply(variables, y, x)
    with pytest.raises(ValueError, match=r"unexpected \['q/bias'.*wrong shapes|unexpected.*q/bias"):
        linen.SAPA(use_bias=False, **OPTS).apply(variables, y, x)
    with pytest.raises(ValueError, match=r"q/kernel: got \(6, 4\), expected \(6, 8\)"):
        linen.SAPA(**{**OPTS, "embedding_dim": 8}).apply(variables, y, x)
    with pytest.raises(ValueError, match=r"missing \['qy/kernel'"):
        modules.sapa_apply(variables["params"], y, x, modules.SAPAConfig(variant="G"))


def test_core_imports_without_flax_and_wrappers_load_on_use():
    # The functional core must not depend on Flax importing (a JAX upgrade can break a pinned
    # Flax); `sapa_jax.linen` / `sapa_jax.nnx` load on first attribute access.
    import subprocess
    import sys
    script = ("import sys, sapa_jax\n"
              "assert 'flax' not in sys.modules, 'import sapa_jax imported flax'\n"
              "assert {'linen', 'nnx'} <= set(dir(sapa_jax))\n"
              "assert sapa_jax.nnx.SAPA.__module__ == 'sapa_jax.nnx'\n"
              "assert 'flax' in sys.modules\n"
              "try:\n    sapa_jax.no_such_name\nexcept AttributeError as e:\n"
              "    assert 'no_such_name' in str(e)\nelse:\n    raise SystemExit('no error')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

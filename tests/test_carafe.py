"""CARAFE: the core against a float64 loop oracle and torch, the modules against an independent
PyTorch CARAFEPack (tests/torch_reference_carafe.py), conversion, checks and transformations.

Errors are max|jax - torch| / max|torch| per compared array, printed on lines starting with
"PARITY" (run with `-s` to collect them).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import sapa_jax
from sapa_jax import _checks, _ffi, carafe_modules, convert, linen
from sapa_jax import nnx as sapa_nnx
from test_parity_torch import TOL, check, nchw, nhwc, rel_err
from torch_reference_carafe import CARAFEPackTorch, carafe_core_torch, randomize_


run_nnx = nnx.jit(lambda module, x: module(x))


def _t(a, grad=False):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


# ----------------------------------------------------------------------------- float64 oracle

def _normalise_loop(logits, normalizer, eps):
    """One window's weights, written out per normaliser."""
    if normalizer == "softmax":
        e = np.exp(logits - logits.max())
        return e / e.sum()
    if normalizer == "none":
        return logits
    h = {"relu": lambda a: np.maximum(a, 0.0),
         "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a)),
         "softplus": lambda a: np.logaddexp(a, 0.0)}[normalizer](logits)
    total = h.sum() + eps
    return h / total if total > 0 else np.zeros_like(h)


def carafe_loop(x, logits, kernel_size, scale, groups, normalizer="softmax", eps=1e-6):
    """out[n, i', j', c] = sum_{ky, kx} w[n, i', j', g(c)*K*K + ky*K + kx]
    * x[n, i'//s + ky - r, j'//s + kx - r, c], zero outside the map."""
    batch, height, width, channels = x.shape
    r, taps, per_group = kernel_size // 2, kernel_size * kernel_size, channels // groups
    out = np.zeros((batch, height * scale, width * scale, channels))
    for n in range(batch):
        for i2 in range(height * scale):
            for j2 in range(width * scale):
                for g in range(groups):
                    w = _normalise_loop(logits[n, i2, j2, g * taps:(g + 1) * taps],
                                        normalizer, eps)
                    chans = slice(g * per_group, (g + 1) * per_group)
                    for ky in range(kernel_size):
                        for kx in range(kernel_size):
                            i, j = i2 // scale + ky - r, j2 // scale + kx - r
                            if 0 <= i < height and 0 <= j < width:
                                tap = w[ky * kernel_size + kx]
                                out[n, i2, j2, chans] += tap * x[n, i, j, chans]
    return out


def _core_inputs(seed, b, h, w, s, c, groups, ksize):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, c))
    logits = 2.0 * rng.standard_normal((b, h * s, w * s, groups * ksize * ksize))
    # first output row all negative: all-zero windows for relu
    logits[:, 0, :, :] = -np.abs(logits[:, 0, :, :])
    return x, logits


# One case per normaliser in _checks.NORMALIZERS ("none" included when the project has it),
# with K, s, groups and map sizes (smaller than the kernel in some) varied along the list.
_SHAPES = [(3, 2, 2, (1, 3, 4)), (5, 3, 1, (2, 2, 3)), (1, 1, 4, (1, 3, 2)),
           (3, 4, 2, (1, 2, 2)), (5, 2, 4, (1, 3, 3))]
CORE_CASES = [(n,) + _SHAPES[i % len(_SHAPES)] for i, n in enumerate(_checks.NORMALIZERS)]


@pytest.mark.parametrize("normalizer,ksize,s,groups,shape", CORE_CASES,
                         ids=[f"{n}-K{k}-s{s}-G{g}" for n, k, s, g, _ in CORE_CASES])
def test_core_against_loop_oracle_and_torch(normalizer, ksize, s, groups, shape, x64):
    b, h, w = shape
    c = 2 * groups
    x, logits = _core_inputs(1, b, h, w, s, c, groups, ksize)
    eps = 1e-6
    want = carafe_loop(x, logits, ksize, s, groups, normalizer, eps)
    cot = np.random.default_rng(2).standard_normal(want.shape)

    def loss(x, logits):
        out = sapa_jax.carafe_upsample(x, logits, kernel_size=ksize, scale=s, groups=groups,
                                       normalizer=normalizer, eps=eps, impl="xla")
        return jnp.sum(out * cot), out

    (_, out), (gx, gl) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        jnp.asarray(x), jnp.asarray(logits))
    assert out.dtype == jnp.float64 and out.shape == (b, h * s, w * s, c)

    tx, tl = _t(x, True), _t(logits, True)
    t_out = carafe_core_torch(tx, tl, ksize, s, groups, normalizer, eps)
    t_out.backward(_t(cot))
    errors = {"out vs loop": rel_err(out, want), "out vs torch": rel_err(out, t_out.detach()),
              "dx": rel_err(gx, tx.grad), "dlogits": rel_err(gl, tl.grad)}
    check(f"carafe-core-{normalizer}-K{ksize}-s{s}-G{groups}", errors, TOL["float64"])
    if normalizer == "relu":  # all-negative first row: every h is 0, so output exactly 0
        assert np.all(np.asarray(out)[:, 0] == 0.0)


def test_core_sees_tap_order_and_groups(x64):
    """The comparisons above can fail: transposed taps or swapped groups are far off."""
    ksize, s, groups = 3, 2, 2
    x, logits = _core_inputs(4, 1, 3, 3, s, 4, groups, ksize)
    out = np.asarray(sapa_jax.carafe_upsample(jnp.asarray(x), jnp.asarray(logits),
                                              kernel_size=ksize, scale=s, groups=groups))
    swapped = logits.reshape(*logits.shape[:3], groups, ksize, ksize).swapaxes(-1, -2)
    assert rel_err(out, carafe_loop(x, swapped.reshape(logits.shape), ksize, s, groups)) > 1e-2
    flipped = logits.reshape(*logits.shape[:3], groups, -1)[..., ::-1, :]
    assert rel_err(out, carafe_loop(x, flipped.reshape(logits.shape), ksize, s, groups)) > 1e-2
    np.testing.assert_allclose(out, carafe_loop(x, logits, ksize, s, groups), rtol=0,
                               atol=1e-12)


def test_torch_reference_formulations_agree():
    """The two torch reassemblies (unfold, per-tap loop) are the same operator."""
    gen = torch.Generator().manual_seed(0)
    for ksize, s, groups in ((5, 2, 2), (3, 3, 4), (1, 4, 1)):
        x = torch.randn(2, 3, 4, 4 * groups, generator=gen, dtype=torch.float64)
        logits = torch.randn(2, 3 * s, 4 * s, groups * ksize ** 2, generator=gen,
                             dtype=torch.float64)
        a = carafe_core_torch(x, logits, ksize, s, groups, formulation="unfold")
        b = carafe_core_torch(x, logits, ksize, s, groups, formulation="loop")
        assert rel_err(a, b) <= 1e-13


# ----------------------------------------------------------------------------- module parity

# K, s, groups, encoder_kernel, dilation, (B, H, W), C, Cm, dtype. Covers K 1/3/5/7, s 1..4,
# groups 1/2/4, dilation 1/2, encoder kernels 1/3/5, maps smaller than the kernel (and than
# the dilated encoder window), float64 and float32.
MODULE_CASES = [
    (5, 2, 1, 3, 1, (2, 4, 5), 8, 6, "float64"),
    (3, 3, 2, 5, 2, (1, 3, 4), 6, 5, "float32"),
    (1, 4, 4, 3, 1, (1, 3, 2), 8, 4, "float64"),
    (5, 1, 2, 3, 2, (2, 2, 3), 4, 3, "float64"),
    (3, 2, 4, 1, 1, (1, 2, 2), 8, 4, "float32"),
    (5, 3, 1, 3, 2, (1, 3, 3), 3, 4, "float32"),
    (7, 2, 2, 3, 1, (1, 2, 3), 4, 5, "float64"),
]


def _module_id(case):
    k, s, g, ek, d, (b, h, w), c, cm, dtype = case
    return f"K{k}-s{s}-G{g}-enc{ek}d{d}-{b}x{h}x{w}-C{c}-{dtype}"


@pytest.mark.parametrize("case", MODULE_CASES, ids=[_module_id(c) for c in MODULE_CASES])
def test_module_parity(case, request):
    ksize, s, groups, ek, dil, (b, h, w), c, cm, dtype = case
    if dtype == "float64":
        request.getfixturevalue("x64")
    torch_model = randomize_(CARAFEPackTorch(c, s, ksize, groups, ek, dil, cm).double(),
                             seed=len(_module_id(case)))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((b, h, w, c))
    cot = rng.standard_normal((b, h * s, w * s, c))

    tx = torch.tensor(nchw(x), requires_grad=True)
    t_out = torch_model(tx)
    t_out.backward(torch.tensor(nchw(cot)))
    t_grads = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}
    torch_model.formulation = "loop"  # the second formulation gives the same module output
    with torch.no_grad():
        assert rel_err(nhwc(torch_model(tx)), nhwc(t_out)) <= 1e-13

    jdtype = jnp.dtype(dtype)
    variables = convert.carafe_from_torch(torch_model.state_dict(), dtype=jdtype)
    model = linen.CARAFE(scale=s, kernel_size=ksize, groups=groups, encoder_kernel=ek,
                         encoder_dilation=dil, compressed_channels=cm, impl="xla")

    def loss(params, x):
        out = model.apply({"params": params}, x)
        return jnp.sum(out * jnp.asarray(cot, out.dtype)), out

    (_, j_out), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                             has_aux=True))(
        variables["params"], jnp.asarray(x, jdtype))
    assert j_out.dtype == jdtype and j_out.shape == (b, h * s, w * s, c)
    j_grads = convert.carafe_to_torch(g_params)
    assert sorted(j_grads) == sorted(t_grads)
    errors = {"out": rel_err(j_out, nhwc(t_out)), "dx": rel_err(g_x, nhwc(tx.grad))}
    errors.update({f"d[{n}]": rel_err(j_grads[n], t_grads[n]) for n in t_grads})
    check(f"carafe-{_module_id(case)}", errors, TOL[dtype])


def test_linen_equals_nnx_and_init_follows_mmcv():
    c, cm, ksize, s, groups = 64, 64, 3, 2, 2
    lin = linen.CARAFE(scale=s, kernel_size=ksize, groups=groups, compressed_channels=cm)
    x = jax.random.normal(jax.random.key(1), (2, 5, 4, c))
    variables = jax.jit(lin.init)(jax.random.key(0), x)
    params = variables["params"]
    assert jax.tree_util.tree_map(jnp.shape, params) == {
        "channel_compressor": {"kernel": (1, 1, c, cm), "bias": (cm,)},
        "content_encoder": {"kernel": (3, 3, cm, groups * ksize ** 2 * s ** 2),
                            "bias": (groups * ksize ** 2 * s ** 2,)}}
    # mmcv's init: xavier-uniform compressor (bound sqrt(6 / (fan_in + fan_out))), encoder
    # normal(0, 0.001), zero biases
    comp = np.asarray(params["channel_compressor"]["kernel"])
    bound = np.sqrt(6.0 / (c + cm))
    assert np.max(np.abs(comp)) <= bound and np.max(np.abs(comp)) > 0.95 * bound
    assert abs(comp.std() / (bound / np.sqrt(3.0)) - 1.0) < 0.05
    enc = np.asarray(params["content_encoder"]["kernel"])
    assert abs(enc.std() / 1e-3 - 1.0) < 0.05 and abs(enc.mean()) < 1e-4
    for group in params.values():
        assert np.all(np.asarray(group["bias"]) == 0.0)

    nnx_model = sapa_nnx.CARAFE(c, scale=s, kernel_size=ksize, groups=groups,
                                compressed_channels=cm, rngs=nnx.Rngs(0))
    for group, leaves in params.items():
        for leaf, value in leaves.items():
            getattr(getattr(nnx_model, group), leaf).set_value(value)
    np.testing.assert_array_equal(np.asarray(run_nnx(nnx_model, x)),
                                  np.asarray(jax.jit(lin.apply)(variables, x)))
    # the NNX state has the Linen paths
    state = nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param))
    assert jax.tree_util.tree_map(jnp.shape, state) == jax.tree_util.tree_map(jnp.shape, params)


def test_module_options_reach_the_core():
    x = jax.random.normal(jax.random.key(2), (1, 3, 3, 4), jnp.float32)
    base = dict(scale=2, kernel_size=3, compressed_channels=5, impl="xla")
    config = linen.CARAFE(**base).config()
    params = jax.tree_util.tree_map(  # O(1) weights, so the logits are O(1)
        lambda spec: 0.5 * jax.random.normal(jax.random.key(spec.shape[-1]), spec.shape),
        carafe_modules.param_specs(config, 4), is_leaf=lambda a: isinstance(a, tuple))
    logits, _ = jax.jit(carafe_modules.encoder_logits, static_argnums=2)(params, x, config)
    for normalizer in ("sigmoid", "relu"):
        model = linen.CARAFE(**base, normalizer=normalizer, eps=0.5)
        got = jax.jit(model.apply)({"params": params}, x)
        want = jax.jit(lambda x, logits, normalizer=normalizer: sapa_jax.carafe_upsample(
            x, logits, kernel_size=3, scale=2, normalizer=normalizer, eps=0.5))(x, logits)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
        assert got.dtype == jnp.float32 and np.std(np.asarray(got)) > 0.1
    # bf16 compute through dtype=, f32 parameters
    out = jax.eval_shape(linen.CARAFE(**base, dtype=jnp.bfloat16).apply, {"params": params}, x)
    assert out.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- conversion

def _sd(**kw):
    model = randomize_(CARAFEPackTorch(6, 2, 3, 2, 3, 1, 4, **kw), seed=5)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_convert_round_trip_and_nnx_loading():
    model, sd = _sd()
    variables = convert.carafe_from_torch(sd)
    params = variables["params"]
    np.testing.assert_array_equal(np.asarray(params["content_encoder"]["kernel"]),
                                  sd["content_encoder.weight"].numpy().transpose(2, 3, 1, 0))
    for source in (variables, params):
        back = convert.carafe_to_torch(source)
        assert list(back) == list(convert.CARAFE_KEYS)
        for key in sd:
            assert back[key].shape == tuple(sd[key].shape)
            np.testing.assert_array_equal(back[key], sd[key].numpy())
    fresh = CARAFEPackTorch(6, 2, 3, 2, 3, 1, 4)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    assert convert.carafe_module_options(sd) == dict(
        channels=6, compressed_channels=4, encoder_kernel=3, encoder_channels=2 * 9 * 4)

    # NNX: from_torch infers the widths; scale / kernel_size / groups are given
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 6))
    nnx_model = sapa_nnx.CARAFE.from_torch(sd, scale=2, kernel_size=3, groups=2, impl="xla")
    lin = linen.CARAFE(scale=2, kernel_size=3, groups=2, compressed_channels=4, impl="xla")
    got = np.asarray(run_nnx(nnx_model, x))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(lin.apply)(variables, x)))
    for source in (nnx_model, nnx.state(nnx_model, nnx.Param)):
        back = convert.carafe_to_torch(source)
        for key in sd:
            np.testing.assert_array_equal(back[key], sd[key].numpy())
    other = sapa_nnx.CARAFE(6, scale=2, kernel_size=3, groups=2, compressed_channels=4,
                            impl="xla", rngs=nnx.Rngs(3))
    convert.carafe_load_into_nnx(other, sd)
    np.testing.assert_array_equal(np.asarray(run_nnx(other, x)), got)
    # and the numbers agree with torch itself (float32 here)
    with torch.no_grad():
        want = nhwc(model(torch.tensor(nchw(np.asarray(x)))))
    assert rel_err(got, want) <= TOL["float32"]


def test_convert_rejects_bad_state_dicts_and_trees():
    _, sd = _sd()
    with pytest.raises(ValueError, match=r"missing keys \['content_encoder.bias'\]"):
        convert.carafe_from_torch({k: v for k, v in sd.items() if k != "content_encoder.bias"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        convert.carafe_from_torch(dict(sd, **{"extra.weight": sd["content_encoder.bias"]}))
    outer = {f"up.{k}": v for k, v in sd.items()}
    assert convert.carafe_from_torch(outer, prefix="up.")["params"].keys() == {
        "channel_compressor", "content_encoder"}
    with pytest.raises(ValueError, match=r"missing keys \['channel_compressor.weight'"):
        convert.carafe_from_torch(outer)
    bad = dict(sd, **{"content_encoder.weight": torch.zeros(72, 4, 2, 2)})
    with pytest.raises(ValueError, match=r"square, odd kernel.*\(72, 4, 2, 2\)"):
        convert.carafe_from_torch(bad)
    bad = dict(sd, **{"content_encoder.weight": torch.zeros(72, 5, 3, 3)})
    with pytest.raises(ValueError, match=r"compressor's 4 channels"):
        convert.carafe_from_torch(bad)
    bad = dict(sd, **{"channel_compressor.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"channel_compressor.bias'\] must have shape \(4,\)"):
        convert.carafe_from_torch(bad)
    with pytest.raises(TypeError, match=r"state_dict must be a mapping"):
        convert.carafe_from_torch([1])
    # a module of another configuration refuses the weights, naming what differs
    wrong = sapa_nnx.CARAFE(6, scale=2, kernel_size=5, groups=2, compressed_channels=4,
                            rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"CARAFE configuration.*content_encoder/kernel: "
                                         r"got \(3, 3, 4, 72\), expected \(3, 3, 4, 200\)"):
        convert.carafe_load_into_nnx(wrong, sd)
    with pytest.raises(ValueError, match=r"options \['channels'\] are read from the state_dict"):
        sapa_nnx.CARAFE.from_torch(sd, channels=6, scale=2, kernel_size=3, groups=2)
    with pytest.raises(TypeError, match=r"must be a sapa_jax.nnx.CARAFE"):
        convert.carafe_load_into_nnx(object(), sd)
    # to_torch names what is missing or extra
    params = convert.carafe_from_torch(sd)["params"]
    with pytest.raises(ValueError, match=r"missing \['content_encoder'\].*unexpected \['q'\]"):
        convert.carafe_to_torch({"channel_compressor": params["channel_compressor"],
                                 "q": params["content_encoder"]})
    with pytest.raises(ValueError, match=r"missing \['content_encoder/bias'\]"):
        convert.carafe_to_torch(dict(params, content_encoder={
            "kernel": params["content_encoder"]["kernel"]}))


def test_gradient_pytree_to_torch_layout():
    _, sd = _sd()
    variables = convert.carafe_from_torch(sd)
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 6))
    model = linen.CARAFE(scale=2, kernel_size=3, groups=2, compressed_channels=4)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(
        variables["params"])
    as_torch = convert.carafe_to_torch(grads)
    assert {k: v.shape for k, v in as_torch.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    kernel_grad = np.asarray(grads["content_encoder"]["kernel"])
    np.testing.assert_array_equal(as_torch["content_encoder.weight"],
                                  kernel_grad.transpose(3, 2, 0, 1))


# ----------------------------------------------------------------------------- checks

def test_bad_core_input_is_named():
    x = jnp.zeros((1, 3, 4, 4))
    logits = jnp.zeros((1, 6, 8, 2 * 9))
    def call(**kw):  # traced only: the checks run at trace time, nothing is computed
        return jax.eval_shape(lambda x, logits: sapa_jax.carafe_upsample(
            x, logits, **{"kernel_size": 3, "groups": 2, **kw}), kw.pop("x", x),
            kw.pop("logits", logits))
    assert call().shape == (1, 6, 8, 4)
    cases = [
        (dict(x=jnp.zeros((1, 3, 4, 5))), ValueError,
         r"channels of x must be divisible by groups, got 5 channels .* groups=2"),
        (dict(groups=3, logits=jnp.zeros((1, 6, 8, 27)), x=jnp.zeros((1, 3, 4, 4))), ValueError,
         r"divisible by groups, got 4 channels"),
        (dict(logits=jnp.zeros((1, 6, 8, 9))), ValueError,
         r"logits must have groups \* kernel_size\*\*2 = 2 \* 3\*\*2 = 18 channels.* got 9"),
        (dict(logits=jnp.zeros((1, 6, 6, 18))), ValueError,
         r"logits spatial shape must be scale \* x spatial shape = \(6, 8\).*got \(6, 6\)"),
        (dict(logits=jnp.zeros((2, 6, 8, 18))), ValueError, r"same batch size, got 2 and 1"),
        (dict(x=jnp.zeros((3, 4, 4))), ValueError, r"x must have rank 4.*\(3, 4, 4\)"),
        (dict(x=jnp.zeros((1, 3, 4, 4), jnp.int32)), TypeError, r"x must have a floating dtype"),
        (dict(logits=[[0.0]]), TypeError, r"logits must be a JAX or NumPy array, got list"),
        (dict(kernel_size=4), ValueError, r"kernel_size must be odd, got 4"),
        (dict(kernel_size=3.0), TypeError, r"kernel_size must be an integer, got 3.0"),
        (dict(scale=True), TypeError, r"scale must be an integer, got True \(type bool\)"),
        (dict(scale=0), ValueError, r"scale must be >= 1, got 0"),
        (dict(groups=0), ValueError, r"groups must be >= 1, got 0"),
        (dict(normalizer="tanh"), ValueError, r"normalizer must be one of .*got 'tanh'"),
        (dict(eps=-1.0), ValueError, r"eps must be a finite number >= 0, got -1.0"),
        (dict(impl="cuda"), ValueError, r"impl must be one of \['auto', 'xla', 'ffi'\]"),
    ]
    for kw, error, message in cases:
        with pytest.raises(error, match=message):
            call(**kw)
    # NumPy integers are accepted
    assert call(kernel_size=np.int64(3), scale=np.int32(2)).shape == (1, 6, 8, 4)


def test_impl_routing(monkeypatch):
    x = jnp.ones((1, 2, 2, 2))
    logits = jnp.zeros((1, 4, 4, 9))
    xla = np.asarray(sapa_jax.carafe_upsample(x, logits, kernel_size=3, impl="xla"))
    if _ffi.carafe_built("cpu"):
        np.testing.assert_allclose(
            np.asarray(sapa_jax.carafe_upsample(x, logits, kernel_size=3, impl="ffi")), xla,
            rtol=1e-6, atol=1e-6)
    # A module built without the CARAFE targets: "auto" runs jnp, "ffi" says why it cannot.
    monkeypatch.setattr(_ffi, "carafe_built", lambda platform: False)
    with pytest.raises(RuntimeError, match=r"impl='ffi'.*CARAFE \(kernel_size=3\) fused "
                                           r"kernel is not built.*use impl='auto' or 'xla'"):
        sapa_jax.carafe_upsample(x, logits, kernel_size=3, impl="ffi")
    auto = sapa_jax.carafe_upsample(x, logits, kernel_size=3, impl="auto")
    np.testing.assert_array_equal(np.asarray(auto), xla)
    monkeypatch.setenv("SAPA_JAX_IMPL", "ffi")
    with pytest.raises(RuntimeError, match=r"CARAFE \(kernel_size=3\) fused kernel is not "
                                           r"built"):
        sapa_jax.carafe_upsample(x, logits, kernel_size=3)
    monkeypatch.setenv("SAPA_JAX_IMPL", "xla")
    sapa_jax.carafe_upsample(x, logits, kernel_size=3, impl="ffi")  # the switch wins


def test_bad_module_options_and_input():
    x = jnp.zeros((1, 3, 3, 4))
    with pytest.raises(ValueError, match=r"encoder_kernel must be odd, got 2"):
        linen.CARAFE(encoder_kernel=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"encoder_kernel must be odd, got 4"):
        sapa_nnx.CARAFE(4, encoder_kernel=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"encoder_dilation must be >= 1, got 0"):
        sapa_nnx.CARAFE(4, encoder_dilation=0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"compressed_channels must be an integer"):
        linen.CARAFE(compressed_channels=8.0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"channels must be divisible by groups=3, got 4"):
        sapa_nnx.CARAFE(4, groups=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must be divisible by groups=3"):
        linen.CARAFE(groups=3).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"kernel_init must be callable"):
        linen.CARAFE(kernel_init=0.1).init(jax.random.key(0), x)
    model = sapa_nnx.CARAFE(4, kernel_size=3, compressed_channels=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have channels=4 channels.*\(1, 3, 3, 6\)"):
        model(jnp.zeros((1, 3, 3, 6)))
    lin = linen.CARAFE(kernel_size=3, compressed_channels=4)
    variables = {"params": carafe_modules.init_params(jax.random.key(0), lin.config(), 4)}
    with pytest.raises(ValueError, match=r"params do not match the CARAFE configuration.*"
                                         r"content_encoder/kernel: got \(3, 3, 4, 36\), "
                                         r"expected \(3, 3, 4, 100\)"):
        linen.CARAFE(kernel_size=5, compressed_channels=4).apply(variables, x)


# ----------------------------------------------------------------------------- transforms

def test_jit_grad_vmap_and_nan(x64):
    ksize, s, groups = 3, 2, 2
    x, logits = _core_inputs(6, 3, 3, 4, s, 4, groups, ksize)
    fn = jax.jit(lambda x, l: sapa_jax.carafe_upsample(x, l, kernel_size=ksize, scale=s,
                                                       groups=groups))
    out = jax.jit(fn)(jnp.asarray(x), jnp.asarray(logits))
    # vmap over an extra leading axis is the batched call
    stacked = jax.vmap(fn)(jnp.asarray(x)[:, None], jnp.asarray(logits)[:, None])[:, 0]
    np.testing.assert_allclose(np.asarray(stacked), np.asarray(out), rtol=0, atol=1e-13)
    # grad against central differences of the oracle in one direction
    direction = np.random.default_rng(0).standard_normal(logits.shape)
    grad_fn = jax.jit(jax.grad(lambda l: jnp.sum(fn(jnp.asarray(x), l) ** 2)))
    grad = grad_fn(jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(grad_fn(jnp.asarray(logits))), np.asarray(grad))
    h = 1e-6
    f = lambda l: np.sum(carafe_loop(x, l, ksize, s, groups) ** 2)  # noqa: E731
    numeric = (f(logits + h * direction) - f(logits - h * direction)) / (2 * h)
    assert abs(float(jnp.sum(grad * direction)) - numeric) <= 1e-6 * abs(numeric)

    # NaN in x reaches exactly the outputs whose windows hold it, in its channel only
    x_nan = x.copy()
    x_nan[0, 1, 2, 3] = np.nan
    got = np.asarray(fn(jnp.asarray(x_nan), jnp.asarray(logits)))
    rows = np.abs(np.arange(3 * s)[:, None] // s - 1) <= 1
    cols = np.abs(np.arange(4 * s)[None, :] // s - 2) <= 1
    np.testing.assert_array_equal(np.isnan(got[0, ..., 3]), rows & cols)
    assert not np.isnan(got[0, ..., :3]).any() and not np.isnan(got[1:]).any()
    # NaN in one logit poisons that point's group (channels 0, 1 for group 0) only
    l_nan = logits.copy()
    l_nan[1, 2, 3, 4] = np.nan
    got = np.asarray(fn(jnp.asarray(x), jnp.asarray(l_nan)))
    expected = np.zeros(got.shape, bool)
    expected[1, 2, 3, :2] = True
    np.testing.assert_array_equal(np.isnan(got), expected)


def test_low_precision_dtypes():
    x, logits = _core_inputs(8, 1, 3, 3, 2, 4, 2, 3)
    want = carafe_loop(x, logits, 3, 2, 2)
    for dtype, tol in ((jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)):
        out = jax.jit(lambda x, logits: sapa_jax.carafe_upsample(
            x, logits, kernel_size=3, groups=2))(jnp.asarray(x, dtype), jnp.asarray(logits, dtype))
        assert out.dtype == dtype
        # inputs are rounded to dtype first; the computation itself runs in float32
        rounded = carafe_loop(np.asarray(jnp.asarray(x, dtype), np.float64),
                              np.asarray(jnp.asarray(logits, dtype), np.float64), 3, 2, 2)
        assert rel_err(out, rounded) <= tol
        assert rel_err(out, want) <= 5 * tol

"""Parity of sapa_jax with the independent PyTorch oracle in tests/torch_reference.py.

Module level: the torch module gets random O(1) weights, they move to Flax with
`convert.from_torch`, and outputs plus gradients w.r.t. y, x and every parameter are compared
(parameter gradients mapped back to torch names with `convert.to_torch`). The truth is torch in
float64; the JAX side runs in float64 (x64) or float32. Core level: `similarity`, `normalize`,
`assemble` tap by tap and `sapa_upsample` with its gradients, every normalizer and border.

Errors are measured as max|jax - torch| / max|torch| per compared array and printed on lines
starting with "PARITY" (run with `-s` to collect them).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sapa_jax
from sapa_jax import convert, linen
from torch_reference import (SAPATorch, assemble_torch, inside_mask, normalize_torch,
                             randomize_, sapa_core_torch, similarity_torch)

TOL = {"float64": 1e-10, "float32": 1e-5}


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite values"
    scale = max(np.max(np.abs(want)), 1e-30)
    return float(np.max(np.abs(got - want)) / scale)


def check(label: str, errors: dict[str, float], tol: float) -> None:
    worst = max(errors, key=errors.get)
    print(f"PARITY {label} worst={errors[worst]:.3e} ({worst}) tol={tol:.0e}")
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{label}: relative errors above {tol}: {bad}"


def nchw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


# variant, value ("none" | "proj" | "out"), scale, K, (B, H, W), Cy, Cx, d, normalizer,
# border, use_bias, dtype. Pairwise over the axes of the issue; maps smaller than the
# kernel in the K=7 rows. relu runs in float64 only: a window whose relu-logits sum to about
# eps (one tap barely positive, its logit a cancelling dot product) makes h / (sum h + eps)
# so ill-conditioned that torch float32 itself is ~1e-2 off its float64 gradients.
MODULE_CASES = [
    ("I", "none", 2, 5, (1, 4, 5), 6, 6, 0, "softmax", "zeros", True, "float64"),
    ("I", "proj+out", 3, 3, (3, 3, 4), 5, 5, 0, "softmax", "valid", True, "float32"),
    ("B", "none", 1, 7, (1, 2, 3), 6, 5, 4, "softmax", "zeros", False, "float64"),
    ("B", "out", 4, 1, (3, 3, 2), 4, 6, 3, "softmax", "zeros", True, "float64"),
    ("B", "proj", 2, 5, (3, 4, 5), 6, 5, 4, "sigmoid", "valid", True, "float32"),
    ("P", "none", 2, 3, (1, 3, 4), 5, 6, 4, "relu", "valid", True, "float64"),
    ("P", "proj", 3, 7, (1, 2, 2), 4, 5, 3, "softmax", "zeros", True, "float32"),
    ("P", "out", 1, 5, (3, 4, 3), 6, 4, 5, "softplus", "valid", True, "float64"),
    ("G", "none", 4, 3, (3, 2, 3), 5, 4, 4, "softmax", "zeros", False, "float32"),
    ("G", "proj", 2, 7, (1, 3, 3), 6, 5, 4, "softmax", "valid", True, "float64"),
    ("G", "out", 3, 5, (1, 3, 2), 4, 6, 4, "relu", "zeros", True, "float64"),
]


def _case_id(case):
    variant, value, s, k, (b, h, w), *_, dtype = case
    return f"{variant}-{value}-s{s}-K{k}-B{b}-{h}x{w}-{dtype}"


@pytest.mark.parametrize("case", MODULE_CASES, ids=[_case_id(c) for c in MODULE_CASES])
def test_module_parity(case, request):
    (variant, value, s, ksize, (b, h, w), cy, cx, d, normalizer, border, use_bias,
     dtype) = case
    if dtype == "float64":
        request.getfixturevalue("x64")
    out_dim = {"none": None, "proj": None, "out": cx + 2, "proj+out": cx + 2}[value]
    value_proj = value.startswith("proj")
    opts = dict(variant=variant, kernel_size=ksize, scale=s, out_dim=out_dim,
                value_proj=value_proj, use_bias=use_bias, normalizer=normalizer,
                border=border, eps=1e-6)
    if variant != "I":
        opts["embedding_dim"] = d

    torch_model = randomize_(SAPATorch(cy, cx, **opts).double(), seed=len(_case_id(case)))
    rng = np.random.default_rng(7)
    y = rng.standard_normal((b, h * s, w * s, cy))
    x = rng.standard_normal((b, h, w, cx))
    c_out = out_dim or cx
    cot = rng.standard_normal((b, h * s, w * s, c_out))

    # truth: torch in float64
    ty = torch.tensor(nchw(y), requires_grad=True)
    tx = torch.tensor(nchw(x), requires_grad=True)
    t_out = torch_model(ty, tx)
    t_out.backward(torch.tensor(nchw(cot)))
    t_grads = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}

    jdtype = jnp.dtype(dtype)
    variables = convert.from_torch(torch_model.state_dict(), variant=variant, dtype=jdtype)
    model = linen.SAPA(**opts, impl="xla")

    def loss(params, y, x):
        out = model.apply({"params": params}, y, x)
        return jnp.sum(out * jnp.asarray(cot, out.dtype)), out

    (_, j_out), (g_params, g_y, g_x) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        variables["params"], jnp.asarray(y, jdtype), jnp.asarray(x, jdtype))
    assert j_out.dtype == jdtype and j_out.shape == (b, h * s, w * s, c_out)

    j_grads = convert.to_torch(g_params, variant=variant)
    assert sorted(j_grads) == sorted(t_grads)
    errors = {"out": rel_err(j_out, nhwc(t_out)),
              "dy": rel_err(g_y, nhwc(ty.grad)),
              "dx": rel_err(g_x, nhwc(tx.grad))}
    if normalizer == "softmax" and border == "valid" and "k.bias" in t_grads:
        # q . bk shifts every counted logit of a window equally, and softmax over exactly the
        # counted taps ignores that: d[k.bias] is 0 analytically, both sides hold only rounding
        # noise, and a relative error of noise means nothing. Check it is noise, against the
        # scale of d[k.weight] (the same terms times xn).
        scale = np.max(np.abs(t_grads["k.weight"]))
        for side in (j_grads, t_grads):
            assert np.max(np.abs(side.pop("k.bias"))) <= TOL[dtype] * scale
    errors.update({f"d[{name}]": rel_err(j_grads[name], t_grads[name]) for name in t_grads})
    check(_case_id(case), errors, TOL[dtype])


# ------------------------------------------------------------------------------------ core

def _core_inputs(seed, b, h, w, s, d, c):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h * s, w * s, d))
    q[:, 0] = 0.0  # first output row: all logits 0 (uniform softmax, all-zero relu windows)
    k = rng.standard_normal((b, h, w, d))
    v = rng.standard_normal((b, h, w, c))
    return q, k, v


def _t(a, grad=False):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


# (K, s, (B, H, W)): maps smaller than the kernel, non-square, s = 1
TAP_CASES = [(7, 3, (2, 3, 5)), (3, 1, (1, 4, 6)), (5, 2, (1, 5, 3))]


@pytest.mark.parametrize("ksize,s,shape", TAP_CASES,
                         ids=[f"K{k}-s{s}-{b}x{h}x{w}" for k, s, (b, h, w) in TAP_CASES])
def test_similarity_and_assemble_tap_by_tap(ksize, s, shape, x64):
    b, h, w = shape
    q, k, v = _core_inputs(3, b, h, w, s, 4, 3)
    logits = np.asarray(sapa_jax.similarity(jnp.asarray(q), jnp.asarray(k),
                                            kernel_size=ksize, scale=s))
    t_logits = similarity_torch(_t(q), _t(k), ksize, s).numpy()
    rng = np.random.default_rng(11)
    wts = rng.standard_normal(t_logits.shape)
    out = np.asarray(sapa_jax.assemble(jnp.asarray(wts), jnp.asarray(v),
                                       kernel_size=ksize, scale=s))
    t_out = assemble_torch(_t(wts), _t(v), ksize, s).numpy()
    errors = {"similarity": rel_err(logits, t_logits), "assemble": rel_err(out, t_out)}
    check(f"taps-K{ksize}-s{s}", errors, TOL["float64"])

    if ksize > 1:
        # The comparison sees the tap order: the transposed order (dx outer) is far off.
        swapped = logits.reshape(*logits.shape[:3], ksize, ksize).swapaxes(-1, -2)
        assert rel_err(swapped.reshape(logits.shape), t_logits) > 1e-2
        swapped_w = wts.reshape(*wts.shape[:3], ksize, ksize).swapaxes(-1, -2)
        t_swapped = assemble_torch(_t(swapped_w.reshape(wts.shape)), _t(v), ksize, s).numpy()
        assert rel_err(out, t_swapped) > 1e-2


# every normalizer x border, with K, s and shapes varied along the list
CORE_CASES = [
    ("softmax", "zeros", 5, 2, (2, 3, 4)),
    ("softmax", "valid", 3, 3, (1, 4, 3)),
    ("relu", "zeros", 7, 1, (1, 3, 5)),
    ("relu", "valid", 5, 4, (1, 2, 3)),
    ("sigmoid", "zeros", 3, 2, (2, 4, 4)),
    ("sigmoid", "valid", 7, 2, (1, 3, 2)),
    ("softplus", "zeros", 1, 3, (2, 3, 3)),
    ("softplus", "valid", 5, 1, (2, 4, 5)),
]


@pytest.mark.parametrize("normalizer,border,ksize,s,shape", CORE_CASES,
                         ids=[f"{n}-{bd}-K{k}-s{s}" for n, bd, k, s, _ in CORE_CASES])
def test_core_parity(normalizer, border, ksize, s, shape, x64):
    b, h, w = shape
    q, k, v = _core_inputs(5, b, h, w, s, 4, 3)
    eps = 1e-6
    cot = np.random.default_rng(9).standard_normal((b, h * s, w * s, 3))

    # normalize on its own, tap by tap
    t_logits = similarity_torch(_t(q), _t(k), ksize, s)
    inside = inside_mask(h, w, ksize, s)
    t_w = normalize_torch(t_logits, normalizer, border, eps, inside).numpy()
    j_w = sapa_jax.normalize(jnp.asarray(t_logits.numpy()), normalizer=normalizer,
                             border=border, eps=eps, low_res_shape=(h, w), scale=s)

    tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
    t_out = sapa_core_torch(tq, tk, tv, ksize, s, normalizer, border, eps)
    t_out.backward(_t(cot))

    def loss(q, k, v):
        out = sapa_jax.sapa_upsample(q, k, v, kernel_size=ksize, scale=s,
                                     normalizer=normalizer, border=border, eps=eps, impl="xla")
        return jnp.sum(out * cot), out

    (_, j_out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    errors = {"normalize": rel_err(j_w, t_w), "out": rel_err(j_out, t_out.detach().numpy())}
    errors.update({f"d{n}": rel_err(g, t.grad.numpy())
                   for n, g, t in zip("qkv", grads, (tq, tk, tv))})
    check(f"core-{normalizer}-{border}-K{ksize}-s{s}", errors, TOL["float64"])
    if normalizer == "relu":
        # q = 0 in the first output row: every h is 0, so weights and output are exactly 0
        assert np.all(np.asarray(j_out)[:, 0] == 0.0)

"""convert: PyTorch state_dict <-> Flax params (round trip, key checks, NNX loading)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sapa_jax import convert, linen
from sapa_jax import nnx as sapa_nnx
from torch_reference import SAPATorch, randomize_

CY, CX, D = 6, 5, 4


def torch_sd(variant="B", **kw):
    model = randomize_(SAPATorch(CY, CY if variant == "I" else CX, variant=variant,
                                 embedding_dim=D, **kw))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant,kw", [("I", {}), ("B", {}), ("P", {"value_proj": True}),
                                        ("G", {"out_dim": 7}), ("G", {"use_bias": False})])
def test_round_trip(variant, kw):
    sd = torch_sd(variant, **kw)
    variables = convert.from_torch(sd, variant=variant)
    params = variables["params"]
    # rename + transpose
    for key, value in sd.items():
        group, leaf = key.split(".")
        if group.startswith("norm"):
            got = params[group]["scale" if leaf == "weight" else "bias"]
        elif leaf == "weight":
            got = params[group]["kernel"].T
        else:
            got = params[group]["bias"]
        np.testing.assert_array_equal(np.asarray(got), value.numpy())
    for source in (variables, params):
        back = convert.to_torch(source, variant=variant)
        assert sorted(back) == sorted(sd)
        for key in sd:
            assert isinstance(back[key], np.ndarray)
            assert back[key].shape == tuple(sd[key].shape)
            np.testing.assert_array_equal(back[key], sd[key].numpy())
    # the torch module accepts what to_torch gives back
    model = SAPATorch(CY, CY if variant == "I" else CX, variant=variant, embedding_dim=D, **kw)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_options_inferred_from_weights():
    opts = convert.module_options(torch_sd("G", out_dim=7, use_bias=False), variant="G")
    assert opts == dict(dim_y=CY, dim_x=CX, embedding_dim=D, out_dim=7, value_proj=True,
                        use_bias=False)
    opts = convert.module_options(torch_sd("I"), variant="I")
    assert opts == dict(dim_y=CY, dim_x=CY, value_proj=False, use_bias=True)


def test_numpy_input_and_dtype():
    sd = {k: v.numpy().astype(np.float32) for k, v in torch_sd("B", value_proj=True).items()}
    variables = convert.from_torch(sd, variant="B")
    assert variables["params"]["v"]["kernel"].shape == (CX, CX)
    half = convert.from_torch(sd, variant="B", dtype=jnp.bfloat16)
    assert all(l.dtype == jnp.bfloat16 for l in jax.tree_util.tree_leaves(half))
    # torch bfloat16 tensors (NumPy has no bfloat16) come through bit-exactly
    sd_bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}
    from_bf16 = convert.from_torch(sd_bf16, variant="B")
    np.testing.assert_array_equal(
        np.asarray(from_bf16["params"]["q"]["kernel"], np.float32),
        sd_bf16["q.weight"].float().numpy().T)


def test_torch_tensors_with_grad_and_prefix():
    model = randomize_(SAPATorch(CY, CX, variant="P", embedding_dim=D))
    outer = torch.nn.Module()
    outer.up = model
    outer.head = torch.nn.Linear(3, 3)
    sd = outer.state_dict(keep_vars=True)          # tensors with requires_grad
    variables = convert.from_torch(sd, variant="P", prefix="up.")
    np.testing.assert_array_equal(np.asarray(variables["params"]["q"]["kernel"]),
                                  model.q.weight.detach().numpy().T)
    with pytest.raises(ValueError, match=r"unexpected keys \['head.bias', 'head.weight'"):
        convert.from_torch(sd, variant="P")


def test_unknown_and_missing_keys_are_named():
    sd = torch_sd("B")
    extra = dict(sd, **{"q.scale": sd["q.bias"]})
    with pytest.raises(ValueError, match=r"unexpected keys \['q.scale'\]"):
        convert.from_torch(extra, variant="B")
    partial = {k: v for k, v in sd.items() if k != "k.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['k.weight'\]"):
        convert.from_torch(partial, variant="B")
    # a variant mismatch lists both sides
    with pytest.raises(ValueError, match=r"missing keys \['qy.weight'.*"
                                         r"unexpected keys \['q.bias', 'q.weight'\]"):
        convert.from_torch(sd, variant="G")
    # biases on some layers only: the absent ones are missing
    no_k_bias = {k: v for k, v in sd.items() if k != "k.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['k.bias'\]"):
        convert.from_torch(no_k_bias, variant="B")
    # asking for options the weights do not have
    with pytest.raises(ValueError, match=r"missing keys \['v.weight', 'v.bias'\]"):
        convert.from_torch(sd, variant="B", value_proj=True)
    with pytest.raises(ValueError, match=r"unexpected keys \['k.bias', 'q.bias'\]"):
        convert.from_torch(sd, variant="B", use_bias=False)


def test_inconsistent_shapes_and_types():
    sd = torch_sd("B")
    sd["k.weight"] = torch.zeros(D, CX + 1)
    with pytest.raises(ValueError, match=r"k/kernel: got \(6, 4\), expected \(5, 4\)"):
        convert.from_torch(sd, variant="B")
    sd = torch_sd("B")
    sd["q.weight"] = torch.zeros(D * CY)
    with pytest.raises(ValueError, match=r"state_dict\['q.weight'\] must have rank 2"):
        convert.from_torch(sd, variant="B")
    with pytest.raises(TypeError, match=r"state_dict must be a mapping.*list"):
        convert.from_torch([1, 2], variant="B")
    with pytest.raises(TypeError, match=r"state_dict\['q.weight'\] must be a torch tensor"):
        convert.from_torch(dict(torch_sd("B"), **{"q.weight": [[0.0]]}), variant="B")
    with pytest.raises(ValueError, match=r"variant must be one of.*'X'"):
        convert.from_torch(torch_sd("B"), variant="X")


def test_use_bias_false_through_linen():
    sd = torch_sd("B", use_bias=False)
    variables = convert.from_torch(sd, variant="B")
    assert set(variables["params"]["q"]) == {"kernel"}
    assert set(variables["params"]["norm_y"]) == {"scale", "bias"}  # LayerNorms keep theirs
    y = jnp.ones((1, 4, 4, CY)) * jnp.arange(CY)
    x = jnp.ones((1, 2, 2, CX)) * jnp.arange(CX)[::-1]
    model = linen.SAPA(embedding_dim=D, use_bias=False, kernel_size=3, impl="xla")
    assert model.apply(variables, y, x).shape == (1, 4, 4, CX)
    with pytest.raises(ValueError, match=r"missing \['q/bias', 'k/bias'\]"):
        linen.SAPA(embedding_dim=D, kernel_size=3, impl="xla").apply(variables, y, x)
    assert sorted(convert.to_torch(variables, variant="B")) == sorted(sd)


def test_to_torch_rejects_bad_trees():
    variables = convert.from_torch(torch_sd("B"), variant="B")
    with pytest.raises(ValueError, match=r"missing \['gate', 'qx', 'qy'\].*unexpected \['q'\]"):
        convert.to_torch(variables, variant="G")
    broken = {"params": dict(variables["params"], extra={"kernel": jnp.zeros((1, 1))})}
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        convert.to_torch(broken, variant="B")
    with pytest.raises(TypeError, match=r"variables_or_params must be a dict.*int"):
        convert.to_torch(3, variant="B")


def test_load_into_nnx_and_from_torch():
    sd = torch_sd("G", value_proj=True)
    model = sapa_nnx.SAPA.from_torch(sd, variant="G", kernel_size=3, scale=2, impl="xla")
    assert (model.dim_y, model.dim_x, model.config.embedding_dim) == (CY, CX, D)
    back = convert.to_torch(model, variant="G")
    assert sorted(back) == sorted(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key].numpy())
    # nnx.State works too, and so does loading into an existing module
    other = sapa_nnx.SAPA(CY, CX, variant="G", embedding_dim=D, value_proj=True,
                          kernel_size=3, impl="xla", rngs=nnx.Rngs(5))
    convert.load_into_nnx(other, sd)
    back2 = convert.to_torch(nnx.state(other, nnx.Param), variant="G")
    for key in sd:
        np.testing.assert_array_equal(back2[key], sd[key].numpy())
    # same output as Linen with from_torch
    y = jax.random.normal(jax.random.key(0), (1, 4, 6, CY))
    x = jax.random.normal(jax.random.key(1), (1, 2, 3, CX))
    lin = linen.SAPA(variant="G", embedding_dim=D, value_proj=True, kernel_size=3, impl="xla")
    np.testing.assert_array_equal(np.asarray(other(y, x)),
                                  np.asarray(lin.apply(convert.from_torch(sd, variant="G"), y, x)))
    # a module of another configuration refuses the weights, naming what differs
    wrong = sapa_nnx.SAPA(CY, CX, variant="G", embedding_dim=D + 1, value_proj=True,
                          rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"qy/kernel: got \(6, 4\), expected \(6, 5\)"):
        convert.load_into_nnx(wrong, sd)
    no_v = sapa_nnx.SAPA(CY, CX, variant="G", embedding_dim=D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unexpected keys \['v.bias', 'v.weight'\]"):
        convert.load_into_nnx(no_v, sd)
    with pytest.raises(ValueError,
                       match=r"options \['embedding_dim'\] are read from the state_dict"):
        sapa_nnx.SAPA.from_torch(sd, variant="G", embedding_dim=D)


def test_gradient_pytree_to_torch_layout():
    sd = torch_sd("P")
    variables = convert.from_torch(sd, variant="P")
    y = jax.random.normal(jax.random.key(0), (1, 4, 6, CY))
    x = jax.random.normal(jax.random.key(1), (1, 2, 3, CX))
    model = linen.SAPA(variant="P", embedding_dim=D, kernel_size=3, impl="xla")
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, y, x) ** 2))(
        variables["params"])
    as_torch = convert.to_torch(grads, variant="P")
    assert {k: v.shape for k, v in as_torch.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    np.testing.assert_array_equal(as_torch["q.weight"], np.asarray(grads["q"]["kernel"]).T)

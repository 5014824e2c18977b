"""PyTorch state_dict <-> Flax parameters for SAPA.

The official module's state_dict has keys `norm_y.weight`, `norm_y.bias`, `norm_x.*` (LayerNorm)
and `q.*`, `k.*`, `qy.*`, `qx.*`, `gate.*`, `v.*` (Linear, weight (out, in)). The Flax tree uses
the same names with `scale` for LayerNorm weights and `kernel` (in, out) for Linear weights,
so conversion is a rename plus a transpose. torch is not imported here: torch tensors are
recognised by their `detach`/`numpy` methods.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks, modules

# A PyTorch state_dict: parameter names to torch tensors or NumPy arrays.
StateDict = Mapping[str, Any]

__all__ = ["from_torch", "to_torch", "module_options", "load_into_nnx", "expected_keys"]


def _linear_groups(variant: str, value_proj: bool):
    return list(modules.LINEAR_GROUPS[variant]) + (["v"] if value_proj else [])


def expected_keys(*, variant: str, value_proj: bool = False, use_bias: bool = True) -> list[str]:
    """The state_dict keys of the official module with these options."""
    variant = _checks.check_choice("variant", variant, _checks.VARIANTS)
    keys = [f"{g}.{leaf}" for g in modules.NORM_GROUPS for leaf in ("weight", "bias")]
    for g in _linear_groups(variant, value_proj):
        keys.append(f"{g}.weight")
        if use_bias:
            keys.append(f"{g}.bias")
    return keys


def _to_numpy(name: str, value) -> np.ndarray:
    """A torch tensor (any device, requires_grad or not) or array-like -> NumPy array."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: reinterpret bits
            import ml_dtypes
            import torch
            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise TypeError(f"state_dict[{name!r}] must be a torch tensor or an array, "
                        f"got {type(value).__name__}")
    array = np.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"state_dict[{name!r}] must have a floating dtype, got {array.dtype}")
    return array


def _select(state_dict, prefix: str) -> dict:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, "
                        f"got {type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {_checks.describe(prefix)}")
    return {key[len(prefix):]: value for key, value in state_dict.items()
            if isinstance(key, str) and key.startswith(prefix)}


def _infer_flags(keys, variant: str, use_bias, value_proj):
    """use_bias / value_proj from the keys present, unless the caller fixed them."""
    if value_proj is None:
        value_proj = any(k.startswith("v.") for k in keys)
    else:
        value_proj = _checks.check_bool("value_proj", value_proj)
    if use_bias is None:
        linears = _linear_groups(variant, value_proj)
        # Without Linear layers (variant I, no v) use_bias changes nothing: keep the default.
        use_bias = not linears or any(f"{g}.bias" in keys for g in linears)
    else:
        use_bias = _checks.check_bool("use_bias", use_bias)
    return use_bias, value_proj


def _check_exact_keys(keys, expected: list[str], module: str) -> None:
    """ValueError listing the missing and unexpected keys unless `keys` are exactly
    `expected`; `module` says what the state_dict should have come from."""
    missing = [k for k in expected if k not in keys]
    unexpected = sorted(k for k in keys if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise ValueError(f"state_dict does not match {module}: " + "; ".join(parts)
                         + f" (expected exactly {expected})")


def _check_keys(keys, variant, use_bias, value_proj):
    _check_exact_keys(keys, expected_keys(variant=variant, value_proj=value_proj,
                                          use_bias=use_bias),
                      f"a SAPA module with variant={variant!r}, use_bias={use_bias}, "
                      f"value projection={value_proj}")


def _shape(arrays, key, rank):
    value = arrays[key]
    if value.ndim != rank:
        raise ValueError(f"state_dict[{key!r}] must have rank {rank}, "
                         f"got shape {tuple(value.shape)}")
    return value.shape


def module_options(state_dict: StateDict, *, variant: str, prefix: str = "",
                   use_bias: bool | None = None,
                   value_proj: bool | None = None) -> dict[str, Any]:
    """Module options that follow from the weights: dim_y, dim_x, embedding_dim (not for
    variant I), out_dim, value_proj, use_bias. Keys are checked as in `from_torch`."""
    options, _ = _read(state_dict, variant=variant, prefix=prefix, use_bias=use_bias,
                       value_proj=value_proj)
    return options


def _read(state_dict, *, variant, prefix, use_bias, value_proj):
    variant = _checks.check_choice("variant", variant, _checks.VARIANTS)
    selected = _select(state_dict, prefix)
    use_bias, value_proj = _infer_flags(selected, variant, use_bias, value_proj)
    _check_keys(selected, variant, use_bias, value_proj)
    arrays = {key: _to_numpy(prefix + key, value) for key, value in selected.items()}
    (dim_y,) = _shape(arrays, "norm_y.weight", 1)
    (dim_x,) = _shape(arrays, "norm_x.weight", 1)
    options = dict(dim_y=int(dim_y), dim_x=int(dim_x), value_proj=value_proj,
                   use_bias=use_bias)
    if variant != "I":
        options["embedding_dim"] = int(_shape(arrays, "k.weight", 2)[0])
    if value_proj:
        out = int(_shape(arrays, "v.weight", 2)[0])
        options["out_dim"] = None if out == dim_x else out
    return options, arrays


def _to_flax_tree(arrays, norm_groups, weight_to_kernel) -> dict:
    """torch keys `group.leaf` -> `{group: {leaf: array}}`: a norm group's `weight` becomes
    `scale`, any other `weight` becomes `kernel = weight_to_kernel(key, weight)`."""
    params: dict = {}
    for key, value in arrays.items():
        group, leaf = key.split(".", 1)
        if leaf == "weight":
            if group in norm_groups:
                leaf = "scale"
            else:
                leaf, value = "kernel", weight_to_kernel(key, value)
        params.setdefault(group, {})[leaf] = value
    return params


def _linear_kernel(key, value):
    """Linear weight (out, in) -> kernel (in, out)."""
    return np.ascontiguousarray(value.T)


def _conv_kernel(key, value):
    """Conv weight (out, in, kh, kw) -> kernel (kh, kw, in, out)."""
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))


def _to_jax(params, dtype) -> dict:
    """The tree's arrays as jax arrays of `dtype` (None: as stored)."""
    if dtype is not None:
        dtype = _checks.check_dtype("dtype", dtype, allow_none=False)
    return {g: {leaf: jnp.asarray(v, dtype) for leaf, v in group.items()}
            for g, group in params.items()}


def from_torch(state_dict: StateDict, *, variant: str, prefix: str = "",
               use_bias: bool | None = None, value_proj: bool | None = None,
               dtype: Any = None) -> dict[str, dict[str, dict[str, jax.Array]]]:
    """Linen variables `{"params": ...}` from a state_dict of the official PyTorch SAPA module.

    Args:
      state_dict: mapping of keys (`norm_y.weight`, `q.weight`, ...) to torch tensors or
        NumPy arrays.
      variant: "I", "B", "P" or "G" (decides which layers must be there).
      prefix: only keys starting with it are read, with it removed (e.g. "decoder.up1.").
      use_bias, value_proj: None infers them from the keys present (`*.bias` of the Linear
        layers, `v.*`); a bool insists on it.
      dtype: dtype of the returned arrays (default: as stored; float64 needs jax x64 mode).

    Returns:
      `{"params": tree}`, tree with the structure of `modules.param_specs`.

    Raises:
      ValueError: listing the missing and unexpected keys, or inconsistent shapes.
    """
    options, arrays = _read(state_dict, variant=variant, prefix=prefix, use_bias=use_bias,
                            value_proj=value_proj)
    for key in arrays:  # Linear weights (out, in), everything else a vector
        linear = key.endswith(".weight") and key.split(".")[0] not in modules.NORM_GROUPS
        _shape(arrays, key, 2 if linear else 1)
    params = _to_flax_tree(arrays, modules.NORM_GROUPS, _linear_kernel)
    dim_y, dim_x = options.pop("dim_y"), options.pop("dim_x")
    config = modules.SAPAConfig(variant=variant, **options)
    modules.check_params(params, modules.param_specs(config, dim_y, dim_x),
                         context="from_torch: shapes inconsistent with each other; "
                                 + modules.describe(config, dim_y, dim_x))
    return {"params": _to_jax(params, dtype)}


def _as_params_dict(tree):
    """Linen variables, a bare params tree, an NNX SAPA / nnx.State -> nested dict."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        nnx = None
    if nnx is not None:
        if isinstance(tree, nnx.Module):
            if hasattr(tree, "params_dict"):
                return tree.params_dict()
            tree = nnx.state(tree, nnx.Param)
        if isinstance(tree, nnx.State):
            tree = nnx.to_pure_dict(tree)
    if not isinstance(tree, Mapping):
        raise TypeError(f"variables_or_params must be a dict of parameters, "
                        f"got {type(tree).__name__}")
    if set(tree) == {"params"}:
        tree = tree["params"]
    return tree


def _numpy_copy(value) -> np.ndarray:
    # np.asarray of a jax.Array is a read-only view; torch.from_numpy warns on those.
    return np.array(value, copy=True)


def _check_tree(params, *, order, norm_groups, missing_groups, module: str,
                kernel_needs_bias: bool = False) -> None:
    """ValueError listing missing and unexpected groups and leaves of a Flax tree about to be
    written in torch layout: groups must be in `order`, norm groups have `scale` and `bias`,
    the others `kernel` and (required with `kernel_needs_bias`, else optional) `bias`."""
    unexpected = sorted(str(g) for g in params if g not in order)
    missing = list(missing_groups)
    for group in order:
        if group not in params:
            continue
        leaves = params[group]
        if not isinstance(leaves, Mapping):
            raise TypeError(f"params[{group!r}] must be a dict, got {type(leaves).__name__}")
        if group in norm_groups:
            need = ok = ("scale", "bias")
        else:
            ok = ("kernel", "bias")
            need = ok if kernel_needs_bias else ("kernel",)
        missing += [f"{group}/{leaf}" for leaf in need if leaf not in leaves]
        unexpected += [f"{group}/{leaf}" for leaf in leaves if leaf not in ok]
    if missing or unexpected:
        raise ValueError(f"parameters do not match {module}: missing {missing}, "
                         f"unexpected {unexpected}")


def _to_torch_layout(params, order, norm_groups, kernel_to_weight) -> dict[str, np.ndarray]:
    """A checked Flax tree -> torch keys `group.weight` / `group.bias` (NumPy copies): norm
    `scale` is the weight, any other group's weight is `kernel_to_weight(group, kernel)`."""
    out = {}
    for group in order:
        if group not in params:
            continue
        leaves = params[group]
        if group in norm_groups:
            out[f"{group}.weight"] = _numpy_copy(leaves["scale"])
        else:
            out[f"{group}.weight"] = kernel_to_weight(group, _numpy_copy(leaves["kernel"]))
        if "bias" in leaves:
            out[f"{group}.bias"] = _numpy_copy(leaves["bias"])
    return out


def to_torch(variables_or_params: Any, *, variant: str) -> dict[str, np.ndarray]:
    """NumPy arrays in the official PyTorch layout (keys `q.weight` (out, in), ...).

    Accepts Linen variables `{"params": ...}`, the bare params tree, any pytree of the same
    structure (e.g. gradients), an `nnx.SAPA` module or its `nnx.State`. Load the result with
    `module.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()})`. Arrays keep
    their dtype; bfloat16 ones are `ml_dtypes.bfloat16` NumPy arrays, which torch.from_numpy
    does not take (cast them to float32 first).
    """
    variant = _checks.check_choice("variant", variant, _checks.VARIANTS)
    params = _as_params_dict(variables_or_params)
    required = set(modules.NORM_GROUPS) | set(modules.LINEAR_GROUPS[variant])
    order = list(modules.NORM_GROUPS) + list(modules.LINEAR_GROUPS[variant]) + ["v"]
    _check_tree(params, order=order, norm_groups=modules.NORM_GROUPS,
                missing_groups=sorted(g for g in required if g not in params),
                module=f"a SAPA module with variant={variant!r}")

    def linear_weight(group, kernel):
        if kernel.ndim != 2:
            raise ValueError(f"{group}/kernel must have rank 2 (in, out), "
                             f"got shape {kernel.shape}")
        return np.ascontiguousarray(kernel.T)
    return _to_torch_layout(params, order, modules.NORM_GROUPS, linear_weight)


def _copy_into_nnx(module: Any, params, *, context: str, what: str = "SAPA") -> Any:
    """Check `params` against `module.param_specs()`, then copy them into the module's
    `ParamGroup`s in place, cast to the dtype of each parameter; returns the module."""
    modules.check_params(params, module.param_specs(), what=what,
                         context="state_dict vs module: " + context)
    for group, leaves in params.items():
        holder = getattr(module, group)
        for leaf, value in leaves.items():
            variable = getattr(holder, leaf)
            variable.set_value(jnp.asarray(value, variable[...].dtype))
    return module


def load_into_nnx(module: Any, state_dict: StateDict, *, prefix: str = "") -> Any:
    """Copy an official state_dict into an existing `sapa_jax.nnx.SAPA` (in place; returned).

    The keys must be exactly those of the module's configuration and the shapes must match;
    values are cast to the dtype of the module's parameters.
    """
    if not (hasattr(module, "config") and hasattr(module, "params_dict")):
        raise TypeError(f"module must be a sapa_jax.nnx.SAPA, got {type(module).__name__}")
    config = module.config
    variables = from_torch(state_dict, variant=config.variant, prefix=prefix,
                           use_bias=config.use_bias,
                           value_proj=config.projects_value(module.dim_x))
    return _copy_into_nnx(module, variables["params"],
                          context=modules.describe(config, module.dim_y, module.dim_x))


# ----------------------------------------------------------------------------- CARAFE
# mmcv `CARAFEPack` state_dict: `channel_compressor.weight` (Cm, C, 1, 1) and `.bias` (Cm,),
# `content_encoder.weight` (groups*K*K*s*s, Cm, k, k) and `.bias`. The Flax tree has the same
# group names with `kernel` in conv layout (kh, kw, in, out) and `bias`.

__all__ += ["carafe_from_torch", "carafe_to_torch", "carafe_module_options",
            "carafe_load_into_nnx", "CARAFE_KEYS"]

CARAFE_KEYS = ("channel_compressor.weight", "channel_compressor.bias",
               "content_encoder.weight", "content_encoder.bias")


def _carafe_read(state_dict, prefix: str):
    """Checked NumPy arrays of a CARAFEPack state_dict and the widths they imply."""
    selected = _select(state_dict, prefix)
    _check_exact_keys(selected, list(CARAFE_KEYS), "an mmcv CARAFEPack")
    arrays = {key: _to_numpy(prefix + key, value) for key, value in selected.items()}
    mid, channels, kh, kw = _shape(arrays, "channel_compressor.weight", 4)
    if (kh, kw) != (1, 1):
        raise ValueError(f"state_dict['channel_compressor.weight'] must be a 1x1 conv "
                         f"(Cm, C, 1, 1), got shape {(mid, channels, kh, kw)}")
    out, enc_in, ek, ek2 = _shape(arrays, "content_encoder.weight", 4)
    if ek != ek2 or ek % 2 == 0:
        raise ValueError(f"state_dict['content_encoder.weight'] must have a square, odd "
                         f"kernel (E, Cm, k, k), got shape {(out, enc_in, ek, ek2)}")
    if enc_in != mid:
        raise ValueError(f"state_dict['content_encoder.weight'] must take the compressor's "
                         f"{mid} channels as input, got shape {(out, enc_in, ek, ek2)}")
    for key, width in (("channel_compressor.bias", mid), ("content_encoder.bias", out)):
        if tuple(_shape(arrays, key, 1)) != (width,):
            raise ValueError(f"state_dict[{key!r}] must have shape ({width},), "
                             f"got {tuple(arrays[key].shape)}")
    options = dict(channels=int(channels), compressed_channels=int(mid),
                   encoder_kernel=int(ek), encoder_channels=int(out))
    return options, arrays


def carafe_module_options(state_dict, *, prefix: str = "") -> dict:
    """Widths that follow from CARAFEPack weights: channels, compressed_channels,
    encoder_kernel and encoder_channels (= groups*K*K*s*s). Keys are checked as in
    `carafe_from_torch`."""
    options, _ = _carafe_read(state_dict, prefix)
    return options


def carafe_from_torch(state_dict, *, prefix: str = "", dtype=None) -> dict:
    """Linen variables `{"params": ...}` for `sapa_jax.linen.CARAFE` from an mmcv CARAFEPack
    state_dict (torch tensors or NumPy arrays).

    Args:
      state_dict: mapping with exactly the keys `CARAFE_KEYS` (after `prefix`).
      prefix: only keys starting with it are read, with it removed (e.g. "neck.upsample.").
      dtype: dtype of the returned arrays (default: as stored; float64 needs jax x64 mode).

    Raises:
      ValueError: listing the missing and unexpected keys, or on inconsistent shapes.
    """
    _, arrays = _carafe_read(state_dict, prefix)
    return {"params": _to_jax(_to_flax_tree(arrays, (), _conv_kernel), dtype)}


def carafe_to_torch(variables_or_params) -> dict[str, np.ndarray]:
    """NumPy arrays in mmcv CARAFEPack's layout, keyed by `CARAFE_KEYS`.

    Accepts Linen variables, the bare params tree, any pytree of the same structure (e.g.
    gradients), an `nnx.CARAFE` module or its `nnx.State`. Arrays keep their dtype.
    """
    from .carafe_modules import GROUPS

    params = _as_params_dict(variables_or_params)
    _check_tree(params, order=GROUPS, norm_groups=(), kernel_needs_bias=True,
                missing_groups=[g for g in GROUPS if g not in params], module="a CARAFE module")

    def conv_weight(group, kernel):
        if kernel.ndim != 4:
            raise ValueError(f"{group}/kernel must have rank 4 (kh, kw, in, out), "
                             f"got shape {kernel.shape}")
        return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
    return _to_torch_layout(params, GROUPS, (), conv_weight)


def carafe_load_into_nnx(module, state_dict, *, prefix: str = ""):
    """Copy a CARAFEPack state_dict into an existing `sapa_jax.nnx.CARAFE` (in place; returned).

    Shapes must match the module's configuration; values are cast to the dtype of the
    module's parameters.
    """
    from .carafe_modules import CARAFEConfig, describe

    if not (isinstance(getattr(module, "config", None), CARAFEConfig)
            and hasattr(module, "params_dict")):
        raise TypeError(f"module must be a sapa_jax.nnx.CARAFE, got {type(module).__name__}")
    params = carafe_from_torch(state_dict, prefix=prefix)["params"]
    return _copy_into_nnx(module, params, what="CARAFE",
                          context=describe(module.config, module.channels))


# ----------------------------------------------------------------------------- SAPA-D
# Upstream tiny-smart/sapa `SAPADeform`: 1x1 Conv2d `q`, `k`, `offset` (weight (out, in, 1, 1),
# bias (out,)) and, with norm=True, GroupNorm `norm_y`, `norm_x` (weight, bias). The Flax tree
# has the same names with `kernel` in the conv layout (1, 1, in, out) and `scale` for GroupNorm.

from . import deform_modules  # noqa: E402  (appended section: SAPA-D)

__all__ += ["deform_from_torch", "deform_to_torch", "deform_expected_keys", "deform_dims",
            "load_deform_into_nnx"]


def deform_expected_keys(*, use_bias: bool = True, norm: bool = False) -> list[str]:
    """The state_dict keys of upstream `SAPADeform` with these options, in its order."""
    use_bias = _checks.check_bool("use_bias", use_bias)
    norm = _checks.check_bool("norm", norm)
    keys = []
    if norm:
        keys += [f"{g}.{leaf}" for g in deform_modules.NORM_GROUPS for leaf in ("weight", "bias")]
    for g in deform_modules.CONV_GROUPS:
        keys.append(f"{g}.weight")
        if use_bias:
            keys.append(f"{g}.bias")
    return keys


def _deform_read(state_dict, *, prefix, use_bias, norm):
    """Selected NumPy arrays and the (use_bias, norm) they were checked against."""
    selected = _select(state_dict, prefix)
    if use_bias is None:
        use_bias = any(f"{g}.bias" in selected for g in deform_modules.CONV_GROUPS)
    if norm is None:
        norm = any(key.startswith(("norm_y.", "norm_x.")) for key in selected)
    _check_exact_keys(selected, deform_expected_keys(use_bias=use_bias, norm=norm),
                      f"a SAPADeform module with use_bias={use_bias}, norm={norm}")
    arrays = {key: _to_numpy(prefix + key, value) for key, value in selected.items()}
    for key, value in arrays.items():
        group, leaf = key.split(".")
        if leaf == "weight" and group in deform_modules.CONV_GROUPS:
            if value.ndim != 4 or value.shape[2:] != (1, 1):
                raise ValueError(f"state_dict[{key!r}] must be a 1x1 conv weight "
                                 f"(out, in, 1, 1), got shape {tuple(value.shape)}")
        else:
            _shape(arrays, key, 1)
    _deform_check_consistent(arrays)
    return arrays, use_bias, norm


def _deform_check_consistent(arrays) -> None:
    """Widths that must agree between layers: q/k outputs, k/offset inputs, norms, biases."""
    shapes = {key: tuple(value.shape) for key, value in arrays.items()}
    pairs = [("q.weight", 0, "k.weight", 0, "q and k outputs (G * embedding_dim)"),
             ("k.weight", 1, "offset.weight", 1, "k and offset inputs (dim_x)"),
             ("norm_y.weight", 0, "q.weight", 1, "norm_y and q input (dim_y)"),
             ("norm_x.weight", 0, "k.weight", 1, "norm_x and k input (dim_x)"),
             ("norm_y.bias", 0, "norm_y.weight", 0, "norm_y bias and weight"),
             ("norm_x.bias", 0, "norm_x.weight", 0, "norm_x bias and weight")]
    pairs += [(f"{g}.bias", 0, f"{g}.weight", 0, f"{g} bias and weight outputs")
              for g in deform_modules.CONV_GROUPS]
    for key_a, axis_a, key_b, axis_b, what in pairs:
        if key_a in shapes and key_b in shapes and shapes[key_a][axis_a] != shapes[key_b][axis_b]:
            raise ValueError(f"state_dict shapes disagree on {what}: {key_a} {shapes[key_a]} "
                             f"vs {key_b} {shapes[key_b]}")


def deform_dims(state_dict, *, prefix: str = "") -> dict:
    """`dim_y`, `dim_x` of an upstream SAPADeform state_dict (keys checked as in
    `deform_from_torch`)."""
    arrays, _, _ = _deform_read(state_dict, prefix=prefix, use_bias=None, norm=None)
    return dict(dim_y=int(arrays["q.weight"].shape[1]), dim_x=int(arrays["k.weight"].shape[1]))


def deform_from_torch(state_dict, *, prefix: str = "", dtype=None, use_bias=None,
                      norm=None) -> dict:
    """Linen variables `{"params": ...}` from a state_dict of upstream PyTorch `SAPADeform`.

    Args:
      state_dict: mapping of keys (`q.weight`, `offset.bias`, `norm_x.weight`, ...) to torch
        tensors or NumPy arrays; conv weights (out, in, 1, 1).
      prefix: only keys starting with it are read, with it removed.
      dtype: dtype of the returned arrays (default: as stored; float64 needs jax x64 mode).
      use_bias, norm: None accepts what the keys say (all conv biases or none, both norms or
        none); a bool insists on it.

    The module options (num_points, groups, embedding_dim, scale, high_offset) are given to
    the module, not read from the weights; the module checks the shapes against them.

    Raises:
      ValueError: listing the missing and unexpected keys, or inconsistent shapes.
    """
    arrays, _, _ = _deform_read(state_dict, prefix=prefix, use_bias=use_bias, norm=norm)
    params = _to_jax(_to_flax_tree(arrays, deform_modules.NORM_GROUPS, _conv_kernel), dtype)
    order = list(deform_modules.NORM_GROUPS) + list(deform_modules.CONV_GROUPS)
    return {"params": {g: params[g] for g in order if g in params}}


def deform_to_torch(variables_or_params) -> dict[str, np.ndarray]:
    """NumPy arrays with exactly upstream `SAPADeform`'s state_dict keys and shapes.

    Accepts Linen variables `{"params": ...}`, the bare params tree, any pytree of the same
    structure (e.g. gradients), an `nnx.SAPADeform` module or its `nnx.State`. Conv kernels
    (1, 1, in, out) become weights (out, in, 1, 1); GroupNorm `scale` becomes `weight`.
    """
    params = _as_params_dict(variables_or_params)
    norms, convs = deform_modules.NORM_GROUPS, deform_modules.CONV_GROUPS
    missing = [g for g in convs if g not in params]
    if any(g in params for g in norms):  # both norms or none
        missing += [g for g in norms if g not in params]
    _check_tree(params, order=list(norms) + list(convs), norm_groups=norms,
                missing_groups=missing, module="a SAPADeform module")

    def conv1x1_weight(group, kernel):
        if kernel.ndim != 4 or kernel.shape[:2] != (1, 1):
            raise ValueError(f"{group}/kernel must be a 1x1 conv kernel (1, 1, in, out), "
                             f"got shape {kernel.shape}")
        return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
    return _to_torch_layout(params, list(norms) + list(convs), norms, conv1x1_weight)


def load_deform_into_nnx(module, state_dict, *, prefix: str = ""):
    """Copy an upstream SAPADeform state_dict into an existing `sapa_jax.nnx.SAPADeform`
    (in place; returned). Keys must be exactly those of the module's use_bias / norm, shapes
    those of its options; values are cast to the dtype of the module's parameters."""
    config = getattr(module, "config", None)
    if not (isinstance(config, deform_modules.DeformConfig) and hasattr(module, "params_dict")):
        raise TypeError(f"module must be a sapa_jax.nnx.SAPADeform, got {type(module).__name__}")
    params = deform_from_torch(state_dict, prefix=prefix, use_bias=config.use_bias,
                               norm=config.norm)["params"]
    return _copy_into_nnx(module, params,
                          context=deform_modules.describe(config, module.dim_y, module.dim_x))

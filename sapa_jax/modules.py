"""The one functional body behind `sapa_jax.linen.SAPA` and `sapa_jax.nnx.SAPA`.

A SAPA module is a frozen `SAPAConfig` (static options) plus a nested parameter dict::

    {"norm_y": {"scale", "bias"}, "norm_x": {"scale", "bias"},
     "q" | "qy", "qx", "gate": {"kernel", "bias"}, "k": {...}, "v": {...}}

whose names mirror the official PyTorch module (`convert` is a rename plus a transpose).
`param_specs` says which parameters a configuration has, with shapes and initialisers;
`sapa_apply` is the pure forward pass over such a dict (`project`, the LayerNorms and
projections up to q, k, v, then `sapa_jax.sapa_upsample`). Both Flax wrappers only create the
parameters from the specs and call `sapa_apply`, so they compute exactly the same thing.
Nothing here knows about the FFI: the core is reached through `sapa_jax.sapa_upsample`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from ._checks import ArrayIn
from ._partitioning import reshape_within_batch
from .core import sapa_upsample_validated

# An initializer (key, shape, dtype) -> array, and a parameter tree group -> leaf -> array.
Initializer = Callable[..., jax.Array]
Params = Mapping[str, Mapping[str, Any]]

LAYER_NORM_EPS = 1e-5  # the official module's nn.LayerNorm default
NORM_GROUPS = ("norm_y", "norm_x")
# Linear layers per variant, in the order the parameters are created.
LINEAR_GROUPS = {"I": (), "B": ("q", "k"), "P": ("q", "k"), "G": ("qy", "qx", "gate", "k")}


# ----------------------------------------------------------------------------- initialisers

def trunc_normal_init(std: float = 0.02, lower: float = -2.0, upper: float = 2.0) -> Initializer:
    """Initializer: normal(0, std) truncated to [lower, upper] (absolute bounds, not in stds).

    The default (0.02, -2, 2) is the official module's Linear initialisation; with bounds at
    +-100 std the truncation practically never bites, but it is the documented distribution.
    """
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std!r}")
    if not lower < upper:
        raise ValueError(f"lower must be < upper, got lower={lower!r}, upper={upper!r}")

    def init(key, shape, dtype=jnp.float32):
        # Sample in at least float32 so low-precision parameter dtypes get a proper normal.
        sample_dtype = jnp.promote_types(dtype, jnp.float32)
        unit = jax.random.truncated_normal(key, lower / std, upper / std, shape, sample_dtype)
        return (unit * std).astype(dtype)
    return init


def ones_init(key, shape, dtype=jnp.float32):
    """Initializer: ones (the LayerNorm/GroupNorm scales)."""
    del key
    return jnp.ones(shape, dtype)


def zeros_init(key, shape, dtype=jnp.float32):
    """Initializer: zeros (biases)."""
    del key
    return jnp.zeros(shape, dtype)


default_kernel_init = trunc_normal_init()
default_bias_init = zeros_init


# ----------------------------------------------------------------------------- configuration

def store_checked(config: Any, **checked: Any) -> None:
    """Write validated values onto a frozen config dataclass, after checking the fields every
    module family has (`impl`, `dtype`, `param_dtype`) here, last, in that order."""
    checked.update(
        impl=_checks.check_choice("impl", config.impl, _checks.IMPLS),
        dtype=_checks.check_dtype("dtype", config.dtype, allow_none=True),
        param_dtype=_checks.check_dtype("param_dtype", config.param_dtype, allow_none=False),
    )
    for name, value in checked.items():
        object.__setattr__(config, name, value)


def config_from_fields(config_cls: type, source: Any) -> Any:
    """`config_cls` built from the same-named attributes of `source` (a Flax module)."""
    return config_cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(config_cls)})


def check_config(config: Any, config_cls: type) -> None:
    """TypeError unless `config` is a `config_cls`."""
    if not isinstance(config, config_cls):
        raise TypeError(f"config must be a {config_cls.__name__}, got {type(config).__name__}")


def check_inits(**inits: Any) -> None:
    """TypeError naming the first initialiser argument that is not callable."""
    for name, init in inits.items():
        _checks.check_callable(name, init)


@dataclasses.dataclass(frozen=True)
class SAPAConfig:
    """Static options of a SAPA module, validated on construction.

    Attributes:
      variant: "I" (inner product), "B" (bilinear), "P" (plain sum) or "G" (gated).
      embedding_dim: d, the query/key width of B, P, G (unused by I, where d = channels).
      kernel_size: odd window size K >= 1.
      scale: integer upsampling factor s >= 1.
      out_dim: output channels; None keeps the decoder's channels. out_dim != Cx implies a
        value projection.
      value_proj: project the value (v = Wv LayerNorm(x) + bv) instead of using x itself.
      use_bias: whether the Linear layers have biases (the LayerNorms always do).
      normalizer, border, eps, impl: passed to `sapa_jax.sapa_upsample`.
      dtype: computation dtype; None infers it from inputs and parameters (Flax convention).
      param_dtype: dtype of newly initialised parameters.
    """
    variant: str = "B"
    embedding_dim: int = 32
    kernel_size: int = 5
    scale: int = 2
    out_dim: int | None = None
    value_proj: bool = False
    use_bias: bool = True
    normalizer: str = "softmax"
    border: str = "zeros"
    eps: float = 1e-6
    impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        store_checked(
            self,
            variant=_checks.check_choice("variant", self.variant, _checks.VARIANTS),
            embedding_dim=_checks.check_int("embedding_dim", self.embedding_dim, minimum=1),
            kernel_size=_checks.check_int("kernel_size", self.kernel_size, minimum=1, odd=True),
            scale=_checks.check_int("scale", self.scale, minimum=1),
            out_dim=(None if self.out_dim is None
                     else _checks.check_int("out_dim", self.out_dim, minimum=1)),
            value_proj=_checks.check_bool("value_proj", self.value_proj),
            use_bias=_checks.check_bool("use_bias", self.use_bias),
            normalizer=_checks.check_choice("normalizer", self.normalizer, _checks.NORMALIZERS),
            border=_checks.check_choice("border", self.border, _checks.BORDERS),
            eps=_checks.check_eps(self.eps),
        )

    def query_dim(self, dim_y: int, dim_x: int) -> int:
        """Width d of queries and keys."""
        del dim_y
        return dim_x if self.variant == "I" else self.embedding_dim

    def value_dim(self, dim_x: int) -> int:
        """Channels of the output."""
        return dim_x if self.out_dim is None else self.out_dim

    def projects_value(self, dim_x: int) -> bool:
        """Is there a value projection `v` (asked for, or needed to change the channels)?"""
        return self.value_proj or self.value_dim(dim_x) != dim_x


class ParamSpec(NamedTuple):
    """Shape and initialiser `(key, shape, dtype) -> array` of one parameter."""
    shape: tuple[int, ...]
    init: Callable


def check_dim_pair(dim_y: Any, dim_x: Any, names: tuple[str, str]) -> tuple[int, int]:
    """The channel counts of y and x as positive ints (named `names` in errors)."""
    return (_checks.check_int(names[0], dim_y, minimum=1),
            _checks.check_int(names[1], dim_x, minimum=1))


def check_dims(config: SAPAConfig, dim_y: int, dim_x: int, *,
               names: tuple[str, str] = ("dim_y", "dim_x")) -> tuple[int, int]:
    dim_y, dim_x = check_dim_pair(dim_y, dim_x, names)
    if config.variant == "I" and dim_y != dim_x:
        raise ValueError(
            f"variant 'I' (inner product) needs the same number of channels in y and x "
            f"({names[0]} == {names[1]}), got {names[0]}={dim_y} and {names[1]}={dim_x}")
    return dim_y, dim_x


def param_specs(config: SAPAConfig, dim_y: int, dim_x: int, *,
                kernel_init: Callable = default_kernel_init,
                bias_init: Callable = default_bias_init) -> dict[str, dict[str, ParamSpec]]:
    """The parameters of `config` for y with `dim_y` and x with `dim_x` channels.

    Returns a dict group -> leaf -> `ParamSpec`, in creation order. LayerNorms have `scale`
    (ones) and `bias` (zeros); Linear layers a `kernel` of shape (in, out) from `kernel_init`
    and, with `use_bias`, a `bias` of shape (out,) from `bias_init`.
    """
    check_config(config, SAPAConfig)
    dim_y, dim_x = check_dims(config, dim_y, dim_x)
    check_inits(kernel_init=kernel_init, bias_init=bias_init)
    d = config.query_dim(dim_y, dim_x)
    linears = {
        "q": (dim_y + dim_x, d) if config.variant == "P" else (dim_y, d),
        "k": (dim_x, d),
        "qy": (dim_y, d),
        "qx": (dim_x, d),
        "gate": (dim_x, 1),
        "v": (dim_x, config.value_dim(dim_x)),
    }
    specs = {name: norm_spec(dims) for name, dims in (("norm_y", dim_y), ("norm_x", dim_x))}
    names = list(LINEAR_GROUPS[config.variant])
    if config.projects_value(dim_x):
        names.append("v")
    for name in names:
        fan_in, fan_out = linears[name]
        specs[name] = layer_spec((fan_in, fan_out), kernel_init, bias_init, config.use_bias)
    return specs


def norm_spec(channels: int) -> dict[str, ParamSpec]:
    """A normalisation layer's group: `scale` (ones) and `bias` (zeros), both (channels,)."""
    return {"scale": ParamSpec((channels,), ones_init), "bias": ParamSpec((channels,), zeros_init)}


def layer_spec(kernel_shape: tuple[int, ...], kernel_init: Callable, bias_init: Callable,
               use_bias: bool = True) -> dict[str, ParamSpec]:
    """A Linear/conv layer's group: `kernel` (..., out) and, with `use_bias`, `bias` (out,)."""
    group = {"kernel": ParamSpec(tuple(kernel_shape), kernel_init)}
    if use_bias:
        group["bias"] = ParamSpec((kernel_shape[-1],), bias_init)
    return group


def init_group(key: jax.Array, group: Mapping[str, ParamSpec],
               param_dtype: Any) -> dict[str, jax.Array]:
    """Initialise one group of `param_specs` (one key per leaf, split in spec order)."""
    keys = jax.random.split(key, len(group))
    return {leaf: spec.init(k, spec.shape, param_dtype)
            for k, (leaf, spec) in zip(keys, group.items())}


def init_params(key: jax.Array, config: SAPAConfig, dim_y: int, dim_x: int, *,
                kernel_init: Callable = default_kernel_init,
                bias_init: Callable = default_bias_init) -> dict[str, dict[str, jax.Array]]:
    """A freshly initialised parameter dict for `sapa_apply` (functional use, no Flax)."""
    specs = param_specs(config, dim_y, dim_x, kernel_init=kernel_init, bias_init=bias_init)
    return init_tree(key, specs, config.param_dtype)


def init_tree(key: jax.Array, specs: Mapping[str, Mapping[str, ParamSpec]],
              param_dtype: Any) -> dict[str, dict[str, jax.Array]]:
    """Initialise every group of `specs` (one key per group, split in spec order); the
    functional `init_params` of all module families."""
    keys = jax.random.split(key, len(specs))
    return {name: init_group(k, group, param_dtype)
            for k, (name, group) in zip(keys, specs.items())}


def check_params(params: Params, specs: Mapping[str, Mapping[str, ParamSpec]], *,
                 context: str = "", what: str = "SAPA") -> None:
    """Raise a ValueError listing every missing, unexpected or wrongly shaped parameter.

    `what` names the module in the message (the CARAFE and SAPA-D modules reuse this check)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of parameter groups, got {type(params).__name__}")
    missing, unexpected, wrong = [], [], []
    for name in params:
        if name not in specs:
            unexpected.append(str(name))
    for name, group in specs.items():
        if name not in params:
            missing.extend(f"{name}/{leaf}" for leaf in group)
            continue
        got = params[name]
        if not isinstance(got, Mapping):
            raise TypeError(f"params[{name!r}] must be a dict of arrays, got {type(got).__name__}")
        unexpected.extend(f"{name}/{leaf}" for leaf in got if leaf not in group)
        for leaf, spec in group.items():
            if leaf not in got:
                missing.append(f"{name}/{leaf}")
                continue
            value = got[leaf]
            if not (hasattr(value, "shape") and hasattr(value, "dtype")):
                raise TypeError(f"params {name}/{leaf} must be an array, "
                                f"got {type(value).__name__}")
            if not jnp.issubdtype(value.dtype, jnp.floating):
                raise TypeError(f"params {name}/{leaf} must have a floating dtype, "
                                f"got {value.dtype}")
            if tuple(value.shape) != tuple(spec.shape):
                wrong.append(f"{name}/{leaf}: got {tuple(value.shape)}, expected {spec.shape}")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {sorted(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes {wrong}")
        suffix = f" ({context})" if context else ""
        raise ValueError(f"params do not match the {what} configuration{suffix}: "
                         + "; ".join(parts))


def describe(config: SAPAConfig, dim_y: int, dim_x: int) -> str:
    """One line of the options that decide the parameter tree (for error messages)."""
    return (f"variant={config.variant!r}, dim_y={dim_y}, dim_x={dim_x}, "
            f"embedding_dim={config.embedding_dim}, out_dim={config.out_dim}, "
            f"value_proj={config.value_proj}, use_bias={config.use_bias}")


def check_inputs(y: ArrayIn, x: ArrayIn, config: SAPAConfig) -> None:
    """y high-res `(B, s*H, s*W, Cy)` and x low-res `(B, H, W, Cx)`, floating, consistent."""
    _checks.check_array("y", y)
    _checks.check_array("x", x)
    _checks.check_high_low("y", y, "x", x, config.scale)
    if config.variant == "I" and y.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"variant 'I' (inner product) needs y and x with the same number of channels, "
            f"got y with {y.shape[-1]} and x with {x.shape[-1]}")


# ----------------------------------------------------------------------------- forward pass

def _layer_norm(a, group, dtype):
    """LayerNorm over channels with the two-pass variance; statistics in >= float32."""
    stats_dtype = jnp.promote_types(dtype, jnp.float32)
    a = a.astype(stats_dtype)
    mean = jnp.mean(a, axis=-1, keepdims=True)
    centred = a - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    out = centred * jax.lax.rsqrt(var + LAYER_NORM_EPS)
    out = out * group["scale"].astype(stats_dtype) + group["bias"].astype(stats_dtype)
    return out.astype(dtype)


def _dense(a, group, dtype, rows=None):
    """a @ kernel (+ bias), optionally with a slice of the kernel's input rows only."""
    kernel = group["kernel"].astype(dtype)
    if rows is not None:
        kernel = kernel[rows]
    out = jnp.matmul(a.astype(dtype), kernel)
    if "bias" in group and rows is None:
        out = out + group["bias"].astype(dtype)
    return out


def nearest_up(a, scale: int):
    """(B, H, W, C) -> (B, s*H, s*W, C), each pixel repeated s x s."""
    if scale == 1:
        return a
    b, h, w, c = a.shape
    a = jnp.broadcast_to(a[:, :, None, :, None, :], (b, h, scale, w, scale, c))
    return reshape_within_batch(a, (b, h * scale, w * scale, c))


def compute_dtype(y: ArrayIn, x: ArrayIn, params: Params, dtype: Any) -> np.dtype:
    """The computation dtype: `dtype`, or the promoted dtype of inputs and parameters."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.dtype(jnp.result_type(y, x, *jax.tree_util.tree_leaves(params)))


def project(params: Params, y: ArrayIn, x: ArrayIn,
            config: SAPAConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys and values of the SAPA module (everything before the core).

    Args:
      params: nested dict with the structure of `param_specs(config, Cy, Cx)`.
      y: high-res encoder (guidance) feature `(B, s*H, s*W, Cy)`.
      x: low-res decoder feature `(B, H, W, Cx)`.
      config: the static options.

    Returns:
      `(q, k, v)`: q `(B, s*H, s*W, d)`, k `(B, H, W, d)`, v `(B, H, W, C)`, all in the
      computation dtype. `sapa_jax.similarity(q, k)` gives the module's logits.
    """
    validate(params, y, x, config)
    return project_validated(params, y, x, config)


def validate(params: Params, y: ArrayIn, x: ArrayIn, config: SAPAConfig) -> None:
    """Everything `sapa_apply` checks: the config's type, the inputs and the parameter tree.

    The Flax wrappers run these checks themselves (once per call) and then call
    `apply_validated`, which checks nothing.
    """
    check_config(config, SAPAConfig)
    check_inputs(y, x, config)
    dim_y, dim_x = int(y.shape[-1]), int(x.shape[-1])
    check_params(params, param_specs(config, dim_y, dim_x),
                 context=describe(config, dim_y, dim_x))


def project_validated(params: Params, y: ArrayIn, x: ArrayIn,
                      config: SAPAConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`project` on arguments that `validate` accepted (checks nothing)."""
    dim_y = int(y.shape[-1])
    dtype = compute_dtype(y, x, params, config.dtype)
    s = config.scale
    y, x = jnp.asarray(y, dtype), jnp.asarray(x, dtype)
    yn = _layer_norm(y, params["norm_y"], dtype)
    xn = _layer_norm(x, params["norm_x"], dtype)

    variant = config.variant
    if variant == "I":
        q, k = yn, xn
    else:
        k = _dense(xn, params["k"], dtype)
    if variant == "B":
        q = _dense(yn, params["q"], dtype)
    elif variant == "P":
        # W [yn ; up(x)] = W_y yn + up(W_x x): the x half is projected at low resolution,
        # which is exact for nearest upsampling and saves s^2 of its work.
        group = params["q"]
        q = _dense(yn, group, dtype, rows=slice(0, dim_y))
        q = q + nearest_up(_dense(x, group, dtype, rows=slice(dim_y, None)), s)
        if "bias" in group:
            q = q + group["bias"].astype(dtype)
    elif variant == "G":
        gate = jax.nn.sigmoid(_dense(xn, params["gate"], dtype))  # (B, H, W, 1), from xn
        gate = nearest_up(gate, s)
        q_y = _dense(yn, params["qy"], dtype)
        q_x = nearest_up(_dense(x, params["qx"], dtype), s)       # raw x, as the paper
        q = gate * q_y + (1 - gate) * q_x

    v = _dense(xn, params["v"], dtype) if "v" in params else x
    return q, k, v


def sapa_apply(params: Params, y: ArrayIn, x: ArrayIn, config: SAPAConfig) -> jax.Array:
    """The SAPA module's forward pass as a pure function.

    Args:
      params: nested dict with the structure of `param_specs(config, Cy, Cx)`.
      y: high-res encoder (guidance) feature `(B, s*H, s*W, Cy)`.
      x: low-res decoder feature `(B, H, W, Cx)`.
      config: the static options.

    Returns:
      `(B, s*H, s*W, C)` with `C = config.out_dim or Cx`, in the computation dtype.
    """
    validate(params, y, x, config)
    return apply_validated(params, y, x, config)


def apply_validated(params: Params, y: ArrayIn, x: ArrayIn, config: SAPAConfig) -> jax.Array:
    """`sapa_apply` on arguments that `validate` accepted: checks nothing, not even the core's
    options (a `SAPAConfig` validated them when it was made)."""
    q, k, v = project_validated(params, y, x, config)
    out = sapa_upsample_validated(q, k, v, kernel_size=config.kernel_size, scale=config.scale,
                                  normalizer=config.normalizer, border=config.border,
                                  eps=config.eps, impl=config.impl)
    return out.astype(q.dtype)

"""The one functional body behind `sapa_jax.linen.SAPADeform` and `sapa_jax.nnx.SAPADeform`.

SAPA-D (tiny-smart/sapa `SAPADeform`) as a frozen `DeformConfig` plus a parameter dict::

    {"norm_y": {"scale", "bias"}, "norm_x": {...},          (only with norm=True)
     "q": {"kernel", "bias"}, "k": {...}, "offset": {...}}   (1x1 convs, kernel (1, 1, in, out))

named as upstream, so that `convert.deform_from_torch` is a rename plus a transpose. The math::

    yn, xn = GroupNorm32(y), GroupNorm32(x)     (identity with norm=False)
    q = conv1x1(yn) -> G*E,   k = conv1x1(xn) -> G*E
    offsets = pixel_shuffle(conv1x1(xn) -> G*P*2*s^2)   (high_offset=True)
            | nearest_up(conv1x1(xn) -> G*P*2)          (high_offset=False)
    out = sapa_jax.deform_upsample(q, k, x, offsets)    (the value is always the raw x)

Both Flax wrappers create the parameters from `param_specs` and call `deform_apply`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks
from .carafe_modules import pixel_shuffle
from .deform import deform_upsample
from .modules import (ParamSpec, check_config, check_dim_pair, check_inits, check_params,
                      compute_dtype, init_tree, layer_spec, nearest_up, norm_spec, store_checked,
                      zeros_init)

GROUP_NORM_GROUPS = 32   # upstream nn.GroupNorm(32, dim)
GROUP_NORM_EPS = 1e-5    # torch's default
NORM_GROUPS = ("norm_y", "norm_x")
CONV_GROUPS = ("q", "k", "offset")

default_kernel_init = jax.nn.initializers.normal(stddev=0.02)  # upstream nn.init.normal_
default_bias_init = zeros_init


@dataclasses.dataclass(frozen=True)
class DeformConfig:
    """Static options of a SAPA-D module, validated on construction.

    Attributes:
      num_points: P, sampling points per group (upstream `num_point`).
      groups: G, channel groups; each has its own queries, keys, points and attention.
      embedding_dim: E, query/key width per group (q and k have G*E channels).
      scale: integer upsampling factor s >= 1 (upstream `up_factor`).
      use_bias: biases of the q, k and offset convs (upstream `qkv_bias`).
      high_offset: predict offsets per high-res pixel (G*P*2*s^2 channels, pixel shuffle)
        instead of per low-res pixel repeated s x s.
      norm: GroupNorm(32, eps 1e-5) on y and x before the convs (dims multiples of 32).
      impl: passed to `sapa_jax.deform_upsample`.
      dtype: computation dtype; None infers it from inputs and parameters (Flax convention).
      param_dtype: dtype of newly initialised parameters.
    """
    num_points: int = 9
    groups: int = 4
    embedding_dim: int = 32
    scale: int = 2
    use_bias: bool = True
    high_offset: bool = True
    norm: bool = False
    impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        store_checked(
            self,
            num_points=_checks.check_int("num_points", self.num_points, minimum=1),
            groups=_checks.check_int("groups", self.groups, minimum=1),
            embedding_dim=_checks.check_int("embedding_dim", self.embedding_dim, minimum=1),
            scale=_checks.check_int("scale", self.scale, minimum=1),
            use_bias=_checks.check_bool("use_bias", self.use_bias),
            high_offset=_checks.check_bool("high_offset", self.high_offset),
            norm=_checks.check_bool("norm", self.norm),
        )

    @property
    def offset_dim(self) -> int:
        """Output channels of the offset conv."""
        per_pixel = self.groups * self.num_points * 2
        return per_pixel * self.scale ** 2 if self.high_offset else per_pixel


def check_dims(config: DeformConfig, dim_y, dim_x, *, names=("dim_y", "dim_x")):
    """Channel counts of y and x: integers, x divisible by groups, multiples of 32 for norm."""
    dim_y, dim_x = check_dim_pair(dim_y, dim_x, names)
    if dim_x % config.groups:
        raise ValueError(
            f"{names[1]} must be divisible by groups={config.groups} (the value x is split "
            f"into G channel groups), got {names[1]}={dim_x}")
    if config.norm:
        for name, dim in zip(names, (dim_y, dim_x)):
            if dim % GROUP_NORM_GROUPS:
                raise ValueError(
                    f"norm=True (GroupNorm with {GROUP_NORM_GROUPS} groups) needs {name} to be "
                    f"a multiple of {GROUP_NORM_GROUPS}, got {name}={dim}")
    return dim_y, dim_x


def param_specs(config: DeformConfig, dim_y: int, dim_x: int, *,
                kernel_init: Callable = default_kernel_init,
                bias_init: Callable = default_bias_init) -> dict[str, dict[str, ParamSpec]]:
    """The parameters of `config` for y with `dim_y` and x with `dim_x` channels, in creation
    order (upstream's): norm_y, norm_x (with norm), q, k, offset; conv kernels (1, 1, in, out).
    """
    check_config(config, DeformConfig)
    dim_y, dim_x = check_dims(config, dim_y, dim_x)
    check_inits(kernel_init=kernel_init, bias_init=bias_init)
    specs = {}
    if config.norm:
        specs.update(norm_y=norm_spec(dim_y), norm_x=norm_spec(dim_x))
    qk_dim = config.groups * config.embedding_dim
    for name, fan_in, fan_out in (("q", dim_y, qk_dim), ("k", dim_x, qk_dim),
                                  ("offset", dim_x, config.offset_dim)):
        specs[name] = layer_spec((1, 1, fan_in, fan_out), kernel_init, bias_init,
                                 config.use_bias)
    return specs


def init_params(key, config: DeformConfig, dim_y: int, dim_x: int, *,
                kernel_init: Callable = default_kernel_init,
                bias_init: Callable = default_bias_init) -> dict[str, dict[str, jax.Array]]:
    """A freshly initialised parameter dict for `deform_apply` (functional use, no Flax)."""
    specs = param_specs(config, dim_y, dim_x, kernel_init=kernel_init, bias_init=bias_init)
    return init_tree(key, specs, config.param_dtype)


def describe(config: DeformConfig, dim_y: int, dim_x: int) -> str:
    """One line of the options that decide the parameter tree (for error messages)."""
    return (f"SAPA-D with dim_y={dim_y}, dim_x={dim_x}, num_points={config.num_points}, "
            f"groups={config.groups}, embedding_dim={config.embedding_dim}, "
            f"scale={config.scale}, high_offset={config.high_offset}, "
            f"use_bias={config.use_bias}, norm={config.norm}")


def check_inputs(y, x, config: DeformConfig) -> None:
    """y high-res `(B, s*H, s*W, Cy)` and x low-res `(B, H, W, Cx)`, floating, consistent."""
    _checks.check_array("y", y)
    _checks.check_array("x", x)
    _checks.check_high_low("y", y, "x", x, config.scale)
    check_dims(config, y.shape[-1], x.shape[-1], names=("y channels", "x channels"))


# ----------------------------------------------------------------------------- forward pass

def group_norm(a, group, dtype):
    """GroupNorm with 32 groups over (channels of the group, H, W), two-pass variance."""
    stats_dtype = jnp.promote_types(dtype, jnp.float32)
    batch, height, width, channels = a.shape
    grouped = a.astype(stats_dtype).reshape(batch, height, width, GROUP_NORM_GROUPS, -1)
    mean = jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)
    centred = grouped - mean
    var = jnp.mean(jnp.square(centred), axis=(1, 2, 4), keepdims=True)
    out = (centred * jax.lax.rsqrt(var + GROUP_NORM_EPS)).reshape(a.shape)
    out = out * group["scale"].astype(stats_dtype) + group["bias"].astype(stats_dtype)
    return out.astype(dtype)


def conv1x1(a, group, dtype):
    """1x1 convolution with a (1, 1, in, out) kernel (+ bias)."""
    out = jnp.matmul(a.astype(dtype), group["kernel"][0, 0].astype(dtype))
    if "bias" in group:
        out = out + group["bias"].astype(dtype)
    return out


def deform_project(params, y, x, config: DeformConfig):
    """Everything before the core: `(q, k, v, offsets)` in the computation dtype.

    Args:
      params: nested dict with the structure of `param_specs(config, Cy, Cx)`.
      y: high-res encoder (guidance) feature `(B, s*H, s*W, Cy)`.
      x: low-res decoder feature `(B, H, W, Cx)`.
      config: the static options.

    Returns:
      q `(B, sH, sW, G*E)`, k `(B, H, W, G*E)`, v = x `(B, H, W, Cx)`, offsets
      `(B, sH, sW, G*P*2)`.
    """
    check_config(config, DeformConfig)
    check_inputs(y, x, config)
    dim_y, dim_x = int(y.shape[-1]), int(x.shape[-1])
    check_params(params, param_specs(config, dim_y, dim_x),
                 context=describe(config, dim_y, dim_x))
    dtype = compute_dtype(y, x, params, config.dtype)
    y, x = jnp.asarray(y, dtype), jnp.asarray(x, dtype)
    if config.norm:
        yn, xn = group_norm(y, params["norm_y"], dtype), group_norm(x, params["norm_x"], dtype)
    else:
        yn, xn = y, x
    q = conv1x1(yn, params["q"], dtype)
    k = conv1x1(xn, params["k"], dtype)
    offsets = conv1x1(xn, params["offset"], dtype)
    if config.high_offset:
        offsets = pixel_shuffle(offsets, config.scale)
    else:
        offsets = nearest_up(offsets, config.scale)
    return q, k, x, offsets


def deform_apply(params, y, x, config: DeformConfig):
    """The SAPA-D module's forward pass as a pure function.

    Args: as `deform_project`.

    Returns:
      `(B, s*H, s*W, Cx)` in the computation dtype.
    """
    q, k, v, offsets = deform_project(params, y, x, config)
    out = deform_upsample(q, k, v, offsets, num_points=config.num_points, groups=config.groups,
                          scale=config.scale, impl=config.impl)
    return out.astype(q.dtype)

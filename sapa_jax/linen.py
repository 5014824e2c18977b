"""Flax Linen SAPA module: parameters from `modules.param_specs`, forward `modules.sapa_apply`."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import modules
from ._checks import ArrayIn
from .modules import ParamSpec, SAPAConfig, default_bias_init, default_kernel_init

__all__ = ["SAPA"]


def _create_params(module: nn.Module, specs: Mapping[str, Mapping[str, ParamSpec]],
                  param_dtype: Any, *, context: str, what: str) -> dict[str, Any]:
    """The parameter groups of `specs` as `module.param`s (inside an `nn.compact` call).

    Applied with existing parameters, the whole tree is checked first (`modules.check_params`,
    naming the module `what` with `context`): Flax's own check only compares leaf shapes
    pairwise. The wrappers then call their family's body, which checks nothing again.
    """
    if not module.is_initializing() and "params" in module.variables:
        modules.check_params(module.variables["params"], specs, context=context, what=what)
    return {name: module.param(
                name, lambda key, group=group: modules.init_group(key, group, param_dtype))
            for name, group in specs.items()}


class SAPA(nn.Module):
    """SAPA feature upsampling (Similarity-Aware Point Affiliation), Flax Linen.

    Upsamples the low-res decoder feature `x` by `scale` with content-aware kernels built from
    the similarity of the high-res encoder feature `y` (queries) and `x` (keys)::

      yn, xn = LayerNorm(y), LayerNorm(x)
      q, k   = variant-specific projections of yn, xn (and the raw x for "P", "G")
      v      = x, or Wv xn + bv with a value projection
      out    = sapa_jax.sapa_upsample(q, k, v, kernel_size, scale, normalizer, border, eps)

    Example::

      model = SAPA(variant="B", embedding_dim=32, scale=2)
      variables = model.init(jax.random.key(0), y, x)
      out = model.apply(variables, y, x)        # (B, 2H, 2W, Cx)

    Attributes:
      variant: "I" (q = yn, k = xn; needs Cy == Cx), "B" (q = Wq yn + bq, k = Wk xn + bk),
        "P" (q = Wq [yn ; up(x)] + bq) or "G" (gated mix of Wqy yn and Wqx up(x)).
      embedding_dim: width d of queries and keys (unused by "I").
      kernel_size: odd window size K >= 1.
      scale: integer upsampling factor s >= 1.
      out_dim: output channels; None keeps Cx (out_dim != Cx adds a value projection).
      value_proj: use v = Wv LayerNorm(x) + bv instead of x.
      use_bias: whether the Linear layers have biases (the LayerNorms always do).
      normalizer: "softmax", "relu", "sigmoid" or "softplus" (see `sapa_upsample`).
      border: "zeros" or "valid" (see `sapa_upsample`).
      eps: eps of the h / (sum h + eps) normalisers.
      impl: core back end, "auto", "xla" or "ffi".
      dtype: the dtype of the computation (default: infer from inputs and params).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      kernel_init: initializer for the Linear kernels (default: normal(0, 0.02) truncated
        at +-2).
      bias_init: initializer for the Linear biases (default: zeros).
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
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = default_bias_init

    def config(self) -> SAPAConfig:
        """The validated static options of this module (its fields that SAPAConfig has)."""
        return modules.config_from_fields(SAPAConfig, self)

    @nn.compact
    def __call__(self, y: ArrayIn, x: ArrayIn) -> jax.Array:
        """Upsamples `x` guided by `y`.

        Args:
          y: high-res encoder (guidance) feature `(B, s*H, s*W, Cy)`.
          x: low-res decoder feature `(B, H, W, Cx)`.

        Returns:
          The upsampled feature `(B, s*H, s*W, C)`, `C = out_dim or Cx`.
        """
        config = self.config()
        modules.check_inputs(y, x, config)
        dim_y, dim_x = int(y.shape[-1]), int(x.shape[-1])
        specs = modules.param_specs(config, dim_y, dim_x, kernel_init=self.kernel_init,
                                    bias_init=self.bias_init)
        params = _create_params(self, specs, config.param_dtype, what="SAPA",
                               context=modules.describe(config, dim_y, dim_x))
        return modules.apply_validated(params, y, x, config)


# ----------------------------------------------------------------------------- CARAFE

from . import carafe_modules  # noqa: E402  (appended section: the CARAFE wrapper)
from .carafe_modules import CARAFEConfig  # noqa: E402

__all__ += ["CARAFE"]


class CARAFE(nn.Module):
    """CARAFE feature upsampling (Content-Aware ReAssembly of FEatures, mmcv `CARAFEPack`).

    Predicts one K x K kernel per output point and channel group from `x` itself and
    reassembles `x` with it::

      logits = pixel_shuffle(content_encoder(channel_compressor(x)), scale)
      out    = sapa_jax.carafe_upsample(x, logits, kernel_size, scale, groups)

    Example::

      model = CARAFE(scale=2, kernel_size=5)
      variables = model.init(jax.random.key(0), x)
      out = model.apply(variables, x)           # (B, 2H, 2W, C)

    Attributes:
      scale: integer upsampling factor s >= 1.
      kernel_size: odd reassembly window K >= 1.
      groups: channel groups (C must be divisible by it), one kernel each.
      encoder_kernel: odd kernel size of the content encoder conv.
      encoder_dilation: dilation of the content encoder conv.
      compressed_channels: output channels of the 1x1 channel compressor.
      normalizer: "softmax" (mmcv's), or "relu" | "sigmoid" | "softplus" (h / (sum h + eps)).
      eps: eps of the h-normalisers.
      impl: core back end, "auto", "xla" or "ffi" (no fused CARAFE kernel yet: "ffi" raises).
      dtype: the dtype of the computation (default: infer from input and params).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      kernel_init: initializer of the compressor kernel (default: xavier-uniform, as mmcv).
      encoder_init: initializer of the encoder kernel (default: normal(0, 0.001), as mmcv).
      bias_init: initializer of both biases (default: zeros).

    Parameters: `channel_compressor` and `content_encoder`, each with `kernel`
    (kh, kw, in, out) and `bias`.
    """
    scale: int = 2
    kernel_size: int = 5
    groups: int = 1
    encoder_kernel: int = 3
    encoder_dilation: int = 1
    compressed_channels: int = 64
    normalizer: str = "softmax"
    eps: float = 1e-6
    impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = carafe_modules.default_kernel_init
    encoder_init: Callable = carafe_modules.default_encoder_init
    bias_init: Callable = carafe_modules.default_bias_init

    def config(self) -> CARAFEConfig:
        """The validated static options of this module."""
        return modules.config_from_fields(CARAFEConfig, self)

    @nn.compact
    def __call__(self, x):
        """Upsamples `x` `(B, H, W, C)` to `(B, s*H, s*W, C)`."""
        config = self.config()
        carafe_modules.check_input(x, config)
        channels = int(x.shape[-1])
        specs = carafe_modules.param_specs(config, channels, kernel_init=self.kernel_init,
                                           encoder_init=self.encoder_init,
                                           bias_init=self.bias_init)
        params = _create_params(self, specs, config.param_dtype, what="CARAFE",
                               context=carafe_modules.describe(config, channels))
        return carafe_modules.carafe_apply(params, x, config)


# ----------------------------------------------------------------------------- SAPA-D

from . import deform_modules  # noqa: E402  (appended section: SAPA-D)
from .deform_modules import DeformConfig  # noqa: E402

__all__ += ["SAPADeform"]


class SAPADeform(nn.Module):
    """SAPA-D (deformable SAPA, tiny-smart/sapa `SAPADeform`), Flax Linen.

    Upsamples the low-res decoder feature `x` by `scale`: every output point attends, per
    channel group, to `num_points` points sampled bilinearly around its parent pixel at
    offsets predicted from `x`, weighted by the softmax of q . k::

      yn, xn  = GroupNorm(y), GroupNorm(x)     (norm=True; identity otherwise)
      q, k    = conv1x1(yn), conv1x1(xn)       (G * embedding_dim channels each)
      offsets = conv1x1(xn), pixel-shuffled (high_offset) or repeated s x s
      out     = sapa_jax.deform_upsample(q, k, x, offsets)

    Example::

      model = SAPADeform(num_points=9, groups=4, scale=2)
      variables = model.init(jax.random.key(0), y, x)
      out = model.apply(variables, y, x)        # (B, 2H, 2W, Cx)

    Attributes:
      num_points: P sampling points per group.
      groups: G channel groups (Cx must be divisible by G).
      embedding_dim: E, query/key width per group.
      scale: integer upsampling factor s >= 1.
      use_bias: biases of the q, k and offset convs (upstream `qkv_bias`).
      high_offset: offsets per high-res pixel (G*P*2*s^2 channels + pixel shuffle) instead of
        per low-res pixel repeated s x s.
      norm: GroupNorm(32 groups, eps 1e-5) on y and x (channels multiples of 32).
      impl: core back end, "auto", "xla" or "ffi" (see `sapa_jax.deform_upsample`).
      dtype: the dtype of the computation (default: infer from inputs and params).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      kernel_init: initializer for the conv kernels (1, 1, in, out) (default: normal(0, 0.02)).
      bias_init: initializer for the conv biases (default: zeros).
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
    kernel_init: Callable = deform_modules.default_kernel_init
    bias_init: Callable = deform_modules.default_bias_init

    def config(self) -> DeformConfig:
        """The validated static options of this module (its fields that DeformConfig has)."""
        return modules.config_from_fields(DeformConfig, self)

    @nn.compact
    def __call__(self, y, x):
        """Upsamples `x` guided by `y`.

        Args:
          y: high-res encoder (guidance) feature `(B, s*H, s*W, Cy)`.
          x: low-res decoder feature `(B, H, W, Cx)`.

        Returns:
          The upsampled feature `(B, s*H, s*W, Cx)`.
        """
        config = self.config()
        deform_modules.check_inputs(y, x, config)
        dim_y, dim_x = int(y.shape[-1]), int(x.shape[-1])
        specs = deform_modules.param_specs(config, dim_y, dim_x, kernel_init=self.kernel_init,
                                           bias_init=self.bias_init)
        # what="SAPA": the message the SAPA-D module has always given (describe says SAPA-D).
        params = _create_params(self, specs, config.param_dtype, what="SAPA",
                               context=deform_modules.describe(config, dim_y, dim_x))
        return deform_modules.deform_apply(params, y, x, config)

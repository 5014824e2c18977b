"""Flax Linen SAPA module: parameters from `modules.param_specs`, forward `modules.sapa_apply`."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import modules
from ._checks import ArrayIn
from .modules import SAPAConfig, default_bias_init, default_kernel_init

__all__ = ["SAPA"]


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
        return SAPAConfig(**{f.name: getattr(self, f.name)
                             for f in dataclasses.fields(SAPAConfig)})

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
        if not self.is_initializing() and "params" in self.variables:
            # Check the whole tree first: Flax's own check only compares leaf shapes pairwise.
            modules.check_params(self.variables["params"], specs,
                                 context=modules.describe(config, dim_y, dim_x))
        params = {}
        for name, group in specs.items():
            params[name] = self.param(
                name, lambda key, group=group: modules.init_group(key, group, config.param_dtype))
        # Validated above (or created from the specs): the shared body checks nothing again.
        return modules.apply_validated(params, y, x, config)

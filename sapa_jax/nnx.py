"""Flax NNX SAPA module: parameters from `modules.param_specs`, forward pass `modules.sapa_apply`.

The NNX state has the same paths as the Linen parameter tree (`norm_y/scale`, `q/kernel`, ...),
so `nnx.to_pure_dict(nnx.state(module, nnx.Param))` can be used as Linen `params` and back.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from . import modules
from ._checks import ArrayIn
from .modules import ParamSpec, SAPAConfig, default_bias_init, default_kernel_init

__all__ = ["SAPA", "ParamGroup"]


class ParamGroup(nnx.Module):
    """The parameters of one layer (`scale`/`bias` or `kernel`/`bias`) as `nnx.Param`s."""

    def __init__(self, leaves: Mapping[str, Any]) -> None:
        self._leaves = tuple(leaves)
        for leaf, value in leaves.items():
            setattr(self, leaf, nnx.Param(value))

    def arrays(self) -> dict[str, Any]:
        return {leaf: getattr(self, leaf)[...] for leaf in self._leaves}


def _create_groups(module: nnx.Module, specs: Mapping[str, Mapping[str, ParamSpec]],
                   param_dtype: Any, rngs: nnx.Rngs) -> None:
    """Set one `ParamGroup` attribute per group of `specs`, initialised from `rngs.params()`;
    `_params_dict` reads them back. (`rngs` is checked after the specs, so a wrong
    initialiser is reported before a wrong `rngs`.)"""
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    module._groups = tuple(specs)
    for name, group in specs.items():
        setattr(module, name, ParamGroup(modules.init_group(rngs.params(), group, param_dtype)))


def _params_dict(module: nnx.Module) -> dict[str, dict[str, Any]]:
    """The `ParamGroup`s of `module` as the nested dict the functional bodies and Linen use."""
    return {name: getattr(module, name).arrays() for name in module._groups}


def _check_widths(*inputs: tuple[str, Any, str, int]) -> None:
    """ValueError unless each `(name, array, field, width)` has `width` channels (last axis)."""
    for name, array, field, width in inputs:
        if array.shape[-1] != width:
            raise ValueError(f"{name} must have {field}={width} channels (last axis), "
                             f"got shape {tuple(array.shape)}")


def _module_for_weights(cls: type, inferred: Mapping[str, Any], options: dict[str, Any],
                        **fixed: Any) -> Any:
    """`cls(**fixed, **inferred, **options)` for `from_torch`: options read from the weights
    cannot also be passed; the initial values (from `rngs`, default `Rngs(0)`) are overwritten
    by the caller."""
    clashes = sorted(k for k in options if k in inferred)
    if clashes:
        raise ValueError(f"options {clashes} are read from the state_dict and cannot be "
                         f"passed to from_torch (got {clashes})")
    rngs = options.pop("rngs", None) or nnx.Rngs(0)
    return cls(**fixed, **inferred, **options, rngs=rngs)


class SAPA(nnx.Module):
    """SAPA feature upsampling (Similarity-Aware Point Affiliation), Flax NNX.

    Same computation and options as `sapa_jax.linen.SAPA`, with the input widths given up
    front::

      model = SAPA(dim_y=64, dim_x=128, variant="B", scale=2, rngs=nnx.Rngs(0))
      out = model(y, x)      # y (B, 2H, 2W, 64), x (B, H, W, 128) -> (B, 2H, 2W, 128)

    Args:
      dim_y: channels Cy of the high-res encoder feature y.
      dim_x: channels Cx of the low-res decoder feature x.
      variant, embedding_dim, kernel_size, scale, out_dim, value_proj, use_bias, normalizer,
        border, eps, impl, dtype, param_dtype, kernel_init, bias_init: as in
        `sapa_jax.linen.SAPA`.
      rngs: `nnx.Rngs` with a "params" stream (or a default one).

    Parameters are `ParamGroup` submodules named `norm_y`, `norm_x`, `q`, `k`, `qy`, `qx`,
    `gate`, `v` (whichever the variant has), each holding `scale`/`kernel` and `bias`.
    """

    def __init__(self, dim_y: int, dim_x: int, *, variant: str = "B", embedding_dim: int = 32,
                 kernel_size: int = 5, scale: int = 2, out_dim: int | None = None,
                 value_proj: bool = False, use_bias: bool = True, normalizer: str = "softmax",
                 border: str = "zeros", eps: float = 1e-6, impl: str = "auto",
                 dtype: Any = None, param_dtype: Any = jnp.float32,
                 kernel_init: Callable = default_kernel_init,
                 bias_init: Callable = default_bias_init, rngs: nnx.Rngs) -> None:
        self.config = SAPAConfig(
            variant=variant, embedding_dim=embedding_dim, kernel_size=kernel_size, scale=scale,
            out_dim=out_dim, value_proj=value_proj, use_bias=use_bias, normalizer=normalizer,
            border=border, eps=eps, impl=impl, dtype=dtype, param_dtype=param_dtype)
        self.dim_y, self.dim_x = modules.check_dims(self.config, dim_y, dim_x)
        _create_groups(self, modules.param_specs(self.config, self.dim_y, self.dim_x,
                                                 kernel_init=kernel_init, bias_init=bias_init),
                       self.config.param_dtype, rngs)

    def params_dict(self) -> dict[str, dict[str, Any]]:
        """The parameters as the nested dict `modules.sapa_apply` and Linen use."""
        return _params_dict(self)

    def param_specs(self) -> dict[str, dict[str, ParamSpec]]:
        """`modules.param_specs` of this module (shapes; initialisers are the defaults)."""
        return modules.param_specs(self.config, self.dim_y, self.dim_x)

    def __call__(self, y: ArrayIn, x: ArrayIn) -> jax.Array:
        """Upsamples `x` guided by `y`.

        Args:
          y: high-res encoder (guidance) feature `(B, s*H, s*W, dim_y)`.
          x: low-res decoder feature `(B, H, W, dim_x)`.

        Returns:
          The upsampled feature `(B, s*H, s*W, C)`, `C = out_dim or dim_x`.
        """
        modules.check_inputs(y, x, self.config)
        _check_widths(("y", y, "dim_y", self.dim_y), ("x", x, "dim_x", self.dim_x))
        params = self.params_dict()
        # The state can be replaced (nnx.update): check it, once, then run the unchecked body.
        modules.check_params(params, self.param_specs(),
                             context=modules.describe(self.config, self.dim_y, self.dim_x))
        return modules.apply_validated(params, y, x, self.config)

    @classmethod
    def from_torch(cls, state_dict: Mapping[str, Any], *, variant: str, prefix: str = "",
                   **options: Any) -> SAPA:
        """A module holding the weights of an official PyTorch SAPA `state_dict`.

        Widths (dim_y, dim_x, embedding_dim, out_dim), `value_proj` and `use_bias` are read
        from the weights; the other options (kernel_size, scale, normalizer, ...) are passed
        as keywords.
        """
        from . import convert  # convert imports this module's siblings only; avoid a cycle

        inferred = convert.module_options(state_dict, variant=variant, prefix=prefix)
        module = _module_for_weights(cls, inferred, options, variant=variant)
        return convert.load_into_nnx(module, state_dict, prefix=prefix)


# ----------------------------------------------------------------------------- CARAFE

from . import carafe_modules  # noqa: E402  (appended section: the CARAFE wrapper)
from .carafe_modules import CARAFEConfig  # noqa: E402

__all__ += ["CARAFE"]


class CARAFE(nnx.Module):
    """CARAFE feature upsampling (mmcv `CARAFEPack`), Flax NNX.

    Same computation and options as `sapa_jax.linen.CARAFE`, with the input width given up
    front::

      model = CARAFE(64, scale=2, kernel_size=5, rngs=nnx.Rngs(0))
      out = model(x)         # x (B, H, W, 64) -> (B, 2H, 2W, 64)

    Args:
      channels: channels C of the input x (divisible by `groups`).
      scale, kernel_size, groups, encoder_kernel, encoder_dilation, compressed_channels,
        normalizer, eps, impl, dtype, param_dtype, kernel_init, encoder_init, bias_init: as in
        `sapa_jax.linen.CARAFE`.
      rngs: `nnx.Rngs` with a "params" stream (or a default one).

    Parameters are `ParamGroup` submodules `channel_compressor` and `content_encoder`, each
    holding `kernel` (kh, kw, in, out) and `bias`.
    """

    def __init__(self, channels: int, *, scale: int = 2, kernel_size: int = 5, groups: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1,
                 compressed_channels: int = 64, normalizer: str = "softmax", eps: float = 1e-6,
                 impl: str = "auto", dtype: Any = None, param_dtype: Any = jnp.float32,
                 kernel_init: Callable = carafe_modules.default_kernel_init,
                 encoder_init: Callable = carafe_modules.default_encoder_init,
                 bias_init: Callable = carafe_modules.default_bias_init, rngs: nnx.Rngs):
        self.config = CARAFEConfig(
            scale=scale, kernel_size=kernel_size, groups=groups, encoder_kernel=encoder_kernel,
            encoder_dilation=encoder_dilation, compressed_channels=compressed_channels,
            normalizer=normalizer, eps=eps, impl=impl, dtype=dtype, param_dtype=param_dtype)
        self.channels = carafe_modules.check_channels(self.config, channels)
        _create_groups(self, carafe_modules.param_specs(
            self.config, self.channels, kernel_init=kernel_init, encoder_init=encoder_init,
            bias_init=bias_init), self.config.param_dtype, rngs)

    def params_dict(self) -> dict[str, dict[str, Any]]:
        """The parameters as the nested dict `carafe_modules.carafe_apply` and Linen use."""
        return _params_dict(self)

    def param_specs(self):
        """`carafe_modules.param_specs` of this module (shapes; default initialisers)."""
        return carafe_modules.param_specs(self.config, self.channels)

    def __call__(self, x):
        """Upsamples `x` `(B, H, W, channels)` to `(B, s*H, s*W, channels)`."""
        carafe_modules.check_input(x, self.config)
        _check_widths(("x", x, "channels", self.channels))
        return carafe_modules.carafe_apply(self.params_dict(), x, self.config)

    @classmethod
    def from_torch(cls, state_dict, *, prefix: str = "", **options):
        """A module holding the weights of an mmcv `CARAFEPack` `state_dict`.

        `channels`, `compressed_channels` and `encoder_kernel` are read from the weights; pass
        `scale`, `kernel_size`, `groups` (their product groups*K*K*s*s is checked against the
        encoder's output channels), `encoder_dilation` and the other options as keywords.
        """
        from . import convert  # convert imports this module's siblings only; avoid a cycle

        inferred = convert.carafe_module_options(state_dict, prefix=prefix)
        inferred.pop("encoder_channels")
        module = _module_for_weights(cls, inferred, options)
        return convert.carafe_load_into_nnx(module, state_dict, prefix=prefix)


# ----------------------------------------------------------------------------- SAPA-D

from . import deform_modules  # noqa: E402  (appended section: SAPA-D)
from .deform_modules import DeformConfig  # noqa: E402

__all__ += ["SAPADeform"]


class SAPADeform(nnx.Module):
    """SAPA-D (deformable SAPA, tiny-smart/sapa `SAPADeform`), Flax NNX.

    Same computation and options as `sapa_jax.linen.SAPADeform`, with the input widths given
    up front::

      model = SAPADeform(dim_y=64, dim_x=128, num_points=9, groups=4, rngs=nnx.Rngs(0))
      out = model(y, x)      # y (B, 2H, 2W, 64), x (B, H, W, 128) -> (B, 2H, 2W, 128)

    Args:
      dim_y: channels Cy of the high-res encoder feature y.
      dim_x: channels Cx of the low-res decoder feature x (divisible by groups).
      num_points, groups, embedding_dim, scale, use_bias, high_offset, norm, impl, dtype,
        param_dtype, kernel_init, bias_init: as in `sapa_jax.linen.SAPADeform`.
      rngs: `nnx.Rngs` with a "params" stream (or a default one).

    Parameters are `ParamGroup` submodules named `norm_y`, `norm_x` (with norm), `q`, `k`,
    `offset`, holding `scale`/`kernel` and `bias`; the paths equal the Linen tree's.
    """

    def __init__(self, dim_y: int, dim_x: int, *, num_points: int = 9, groups: int = 4,
                 embedding_dim: int = 32, scale: int = 2, use_bias: bool = True,
                 high_offset: bool = True, norm: bool = False, impl: str = "auto",
                 dtype: Any = None, param_dtype: Any = jnp.float32,
                 kernel_init: Callable = deform_modules.default_kernel_init,
                 bias_init: Callable = deform_modules.default_bias_init, rngs: nnx.Rngs):
        self.config = DeformConfig(
            num_points=num_points, groups=groups, embedding_dim=embedding_dim, scale=scale,
            use_bias=use_bias, high_offset=high_offset, norm=norm, impl=impl, dtype=dtype,
            param_dtype=param_dtype)
        self.dim_y, self.dim_x = deform_modules.check_dims(self.config, dim_y, dim_x)
        _create_groups(self, deform_modules.param_specs(
            self.config, self.dim_y, self.dim_x, kernel_init=kernel_init, bias_init=bias_init),
            self.config.param_dtype, rngs)

    def params_dict(self) -> dict[str, dict[str, Any]]:
        """The parameters as the nested dict `deform_modules.deform_apply` and Linen use."""
        return _params_dict(self)

    def param_specs(self):
        """`deform_modules.param_specs` of this module (shapes; default initialisers)."""
        return deform_modules.param_specs(self.config, self.dim_y, self.dim_x)

    def __call__(self, y, x):
        """Upsamples `x` guided by `y`: y `(B, s*H, s*W, dim_y)`, x `(B, H, W, dim_x)` ->
        `(B, s*H, s*W, dim_x)`."""
        deform_modules.check_inputs(y, x, self.config)
        _check_widths(("y", y, "dim_y", self.dim_y), ("x", x, "dim_x", self.dim_x))
        return deform_modules.deform_apply(self.params_dict(), y, x, self.config)

    @classmethod
    def from_torch(cls, state_dict, *, prefix: str = "", **options):
        """A module holding the weights of an upstream PyTorch `SAPADeform` state_dict.

        dim_y and dim_x are read from the weights; every other option (num_points, groups,
        embedding_dim, scale, use_bias, high_offset, norm, ...) is given as a keyword and
        the weights must match it exactly (else ValueError naming the keys or shapes).
        """
        from . import convert  # convert imports this module's siblings only; avoid a cycle

        dims = convert.deform_dims(state_dict, prefix=prefix)
        module = _module_for_weights(cls, dims, options)
        return convert.load_deform_into_nnx(module, state_dict, prefix=prefix)

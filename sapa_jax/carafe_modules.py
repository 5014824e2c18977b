"""The one functional body behind `sapa_jax.linen.CARAFE` and `sapa_jax.nnx.CARAFE`.

CARAFE (mmcv `CARAFEPack`) in NHWC::

    compressed = channel_compressor(x)              1x1 conv, C -> compressed_channels
    encoded    = content_encoder(compressed)        k x k conv (dilation d, "same" padding),
                                                    -> groups * K*K * s*s channels
    logits     = pixel_shuffle(encoded, s)          (B, sH, sW, groups * K*K)
    out        = sapa_jax.carafe_upsample(x, logits, K, s, groups)   softmax per group + reassembly

A module is a frozen `CARAFEConfig` plus the parameter dict
`{"channel_compressor": {"kernel", "bias"}, "content_encoder": {"kernel", "bias"}}`, kernels in
Flax's conv layout (kh, kw, in, out). Both Flax wrappers create the parameters from
`param_specs` and call `carafe_apply`. Nothing here knows about the FFI.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks
from .carafe import carafe_upsample
from .modules import (ParamSpec, check_config, check_inits, check_params, init_tree,
                      layer_spec, store_checked, zeros_init)
from .modules import compute_dtype as _compute_dtype

GROUPS = ("channel_compressor", "content_encoder")  # creation order, mmcv's names

# mmcv's init_weights: every conv xavier-uniform (gain 1), biases 0, then the content
# encoder's weight redrawn from normal(0, 0.001). xavier_uniform on (kh, kw, in, out) uses
# fan_in = kh*kw*in and fan_out = kh*kw*out, as torch does on (out, in, kh, kw).
default_kernel_init = jax.nn.initializers.xavier_uniform()
default_encoder_init = jax.nn.initializers.normal(stddev=1e-3)
default_bias_init = zeros_init


@dataclasses.dataclass(frozen=True)
class CARAFEConfig:
    """Static options of a CARAFE module, validated on construction.

    Attributes:
      scale: integer upsampling factor s >= 1 (mmcv `scale_factor`).
      kernel_size: odd reassembly window K >= 1 (mmcv `up_kernel`).
      groups: channel groups sharing one kernel each (mmcv `up_group`).
      encoder_kernel: odd kernel size of the content encoder (an even one would shrink the map).
      encoder_dilation: dilation of the content encoder.
      compressed_channels: output channels of the channel compressor.
      normalizer, eps, impl: passed to `sapa_jax.carafe_upsample` (softmax is mmcv's).
      dtype: computation dtype; None infers it from the input and parameters.
      param_dtype: dtype of newly initialised parameters.
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

    def __post_init__(self):
        store_checked(
            self,
            scale=_checks.check_int("scale", self.scale, minimum=1),
            kernel_size=_checks.check_int("kernel_size", self.kernel_size, minimum=1, odd=True),
            groups=_checks.check_int("groups", self.groups, minimum=1),
            encoder_kernel=_checks.check_int("encoder_kernel", self.encoder_kernel, minimum=1,
                                             odd=True),
            encoder_dilation=_checks.check_int("encoder_dilation", self.encoder_dilation,
                                               minimum=1),
            compressed_channels=_checks.check_int("compressed_channels",
                                                  self.compressed_channels, minimum=1),
            normalizer=_checks.check_choice("normalizer", self.normalizer, _checks.NORMALIZERS),
            eps=_checks.check_eps(self.eps),
        )

    @property
    def encoder_channels(self) -> int:
        """Output channels of the content encoder: groups * K*K * s*s."""
        return self.groups * self.kernel_size ** 2 * self.scale ** 2

    @property
    def encoder_padding(self) -> int:
        """mmcv's int((k - 1) * dilation / 2): "same" for an odd encoder kernel."""
        return (self.encoder_kernel - 1) * self.encoder_dilation // 2


def check_channels(config: CARAFEConfig, channels, *, name: str = "channels") -> int:
    channels = _checks.check_int(name, channels, minimum=1)
    if channels % config.groups != 0:
        raise ValueError(f"{name} must be divisible by groups={config.groups}, got {channels}")
    return channels


def param_specs(config: CARAFEConfig, channels: int, *,
                kernel_init: Callable = default_kernel_init,
                encoder_init: Callable = default_encoder_init,
                bias_init: Callable = default_bias_init) -> dict[str, dict[str, ParamSpec]]:
    """The parameters of `config` for an input with `channels` channels, in creation order.

    `channel_compressor`: kernel (1, 1, C, Cm) from `kernel_init`, bias (Cm,);
    `content_encoder`: kernel (k, k, Cm, groups*K*K*s*s) from `encoder_init`, bias; biases
    from `bias_init`.
    """
    check_config(config, CARAFEConfig)
    channels = check_channels(config, channels)
    check_inits(kernel_init=kernel_init, encoder_init=encoder_init, bias_init=bias_init)
    mid, k, out = config.compressed_channels, config.encoder_kernel, config.encoder_channels
    return {"channel_compressor": layer_spec((1, 1, channels, mid), kernel_init, bias_init),
            "content_encoder": layer_spec((k, k, mid, out), encoder_init, bias_init)}


def init_params(key, config: CARAFEConfig, channels: int, **inits) -> dict[str, dict]:
    """A freshly initialised parameter dict for `carafe_apply` (functional use, no Flax)."""
    return init_tree(key, param_specs(config, channels, **inits), config.param_dtype)


def describe(config: CARAFEConfig, channels: int) -> str:
    """The options that decide the parameter tree (for error messages)."""
    return (f"CARAFE with channels={channels}, compressed_channels={config.compressed_channels}, "
            f"encoder_kernel={config.encoder_kernel}, groups={config.groups}, "
            f"kernel_size={config.kernel_size}, scale={config.scale}")


def check_input(x, config: CARAFEConfig) -> None:
    """x `(B, H, W, C)`, floating, C divisible by groups."""
    _checks.check_array("x", x)
    if x.shape[-1] % config.groups != 0:
        raise ValueError(f"the channels of x must be divisible by groups={config.groups}, "
                         f"got x with shape {tuple(x.shape)}")


def pixel_shuffle(a, scale: int):
    """(B, H, W, C*s*s) -> (B, s*H, s*W, C): channel c*s*s + i*s + j goes to (h*s + i, w*s + j, c).

    torch's `F.pixel_shuffle` in NHWC.
    """
    if scale == 1:
        return a
    batch, height, width, channels = a.shape
    out = channels // (scale * scale)
    a = a.reshape(batch, height, width, out, scale, scale)
    a = a.transpose(0, 1, 4, 2, 5, 3)                   # (B, H, i, W, j, C)
    return a.reshape(batch, height * scale, width * scale, out)


def _conv(a, group, dtype, *, padding: int = 0, dilation: int = 1):
    """NHWC conv with a (kh, kw, in, out) kernel, stride 1, symmetric zero padding, + bias."""
    out = jax.lax.conv_general_dilated(
        a, group["kernel"].astype(dtype), window_strides=(1, 1),
        padding=((padding, padding), (padding, padding)), rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + group["bias"].astype(dtype)


def compute_dtype(x, params, dtype):
    """`dtype`, or the promoted dtype of the input and the parameters."""
    return _compute_dtype(x, x, params, dtype)  # one input: it stands in for both


def encoder_logits(params, x, config: CARAFEConfig):
    """The kernel logits `(B, s*H, s*W, groups*K*K)` that `carafe_upsample` normalises.

    Args:
      params: nested dict with the structure of `param_specs(config, C)`.
      x: low-res feature `(B, H, W, C)`.
      config: the static options.

    Returns:
      `(logits, x)`, both in the computation dtype.
    """
    check_config(config, CARAFEConfig)
    check_input(x, config)
    channels = int(x.shape[-1])
    check_params(params, param_specs(config, channels), context=describe(config, channels),
                 what="CARAFE")
    dtype = compute_dtype(x, params, config.dtype)
    x = jnp.asarray(x, dtype)
    compressed = _conv(x, params["channel_compressor"], dtype)
    encoded = _conv(compressed, params["content_encoder"], dtype,
                    padding=config.encoder_padding, dilation=config.encoder_dilation)
    return pixel_shuffle(encoded, config.scale), x


def carafe_apply(params, x, config: CARAFEConfig):
    """The CARAFE module's forward pass as a pure function.

    Args: as `encoder_logits`.

    Returns:
      `(B, s*H, s*W, C)` in the computation dtype.
    """
    logits, x = encoder_logits(params, x, config)
    out = carafe_upsample(x, logits, kernel_size=config.kernel_size, scale=config.scale,
                          groups=config.groups, normalizer=config.normalizer, eps=config.eps,
                          impl=config.impl)
    return out.astype(x.dtype)

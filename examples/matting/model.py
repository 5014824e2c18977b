"""A small matting network in the style of the paper's baseline (A2U / IndexNet matting).

Input: the image and the trimap, one-hot, concatenated (B, S, S, 3 + 3); output: alpha
(B, S, S) in [0, 1]. Encoder: conv blocks at 1, 1/2 and 1/4 resolution (their outputs are the
skips), each followed by a 2x2 max-pool, and a bottleneck at 1/8. Decoder: three stages back
to full resolution, each

    x = upsample(x, guide)              the chosen upsampler (examples.common.upsamplers)
    x = conv_block(x + lateral(skip))   lateral = 1x1 conv of the skip, for every upsampler

so laterals and concatenations are identical for every upsampler and only `upsample`
changes. Every stage, the last (1/2 -> 1) included, has an encoder feature at its output
resolution, so every stage uses the chosen upsampler and the network never needs a fixed
fallback one. The guided upsamplers (SAPA) take that feature as guidance: SAPA-B/P/G the raw
skip, SAPA-I (no projections, needs equal widths) the lateral, which every network has.
A 3x3 conv block and a 1x1 conv give the alpha logit; a sigmoid makes it an alpha.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from examples.common import upsamplers as ups
from examples.common.layers import ConvBlock

from . import data

INPUT_CHANNELS = 3 + 3  # RGB + one-hot trimap


def network_input(images, trimaps):
    """(B, S, S, 3) float images and (B, S, S) int trimaps -> (B, S, S, 6) network input."""
    onehot = jax.nn.one_hot(trimaps, 3, dtype=images.dtype)
    return jnp.concatenate([images, onehot], axis=-1)


def clamp_to_trimap(alpha, trimaps):
    """Alpha with the trimap's known regions set to 0 (background) and 1 (foreground), as the
    Composition-1k evaluation does before scoring."""
    alpha = jnp.where(trimaps == data.TRIMAP_FG, 1.0, alpha)
    return jnp.where(trimaps == data.TRIMAP_BG, 0.0, alpha)


class Matter(nn.Module):
    """Alpha (B, S, S) in [0, 1] for inputs (B, S, S, 6) from `network_input`; S % 8 == 0.

    Attributes:
      upsampler: a name of `examples.common.upsamplers.UPSAMPLERS`, used at every decoder stage.
      widths: encoder widths at 1, 1/2, 1/4 and the 1/8 bottleneck.
      decoder_width: channels of every decoder stage.
      kernel_size, embedding_dim: the upsampler's K and query/key width (CARAFE, SAPA).
    """
    upsampler: str
    widths: Sequence[int] = (16, 32, 48, 64)
    decoder_width: int = 32
    kernel_size: int = 5
    embedding_dim: int = 32

    @nn.compact
    def __call__(self, inputs):
        if inputs.shape[1] % 8 or inputs.shape[2] % 8:
            raise ValueError(f"image height and width must be multiples of 8 (three 2x "
                             f"down-samplings), got {inputs.shape[1:3]}")
        x, skips = inputs, []
        for i, features in enumerate(self.widths[:-1]):
            x = ConvBlock(features, name=f"enc{i}")(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = ConvBlock(self.widths[-1], name="bottleneck")(x)
        x = nn.Conv(self.decoder_width, (1, 1), name="reduce")(x)
        for i in reversed(range(len(skips))):
            lateral = nn.Conv(self.decoder_width, (1, 1), name=f"lateral{i}")(skips[i])
            guide = lateral if ups.guide_same_width(self.upsampler) else skips[i]
            x = ups.Upsampler(self.upsampler, scale=2, kernel_size=self.kernel_size,
                              embedding_dim=self.embedding_dim, name=f"up{i}")(x, guide)
            x = ConvBlock(self.decoder_width, depth=1, name=f"dec{i}")(x + lateral)
        x = ConvBlock(self.decoder_width // 2, depth=1, name="refine")(x)
        logit = nn.Conv(1, (1, 1), name="head")(x)[..., 0]
        return jax.nn.sigmoid(logit)

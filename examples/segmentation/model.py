"""A small encoder-decoder segmentation network (NHWC) whose decoder upsampler is a choice.

Encoder: conv stages at 1, 1/2 and 1/4 resolution (their outputs are the skips) and a
bottleneck at 1/8. Decoder: three 2x upsamplings back to full resolution, all with the chosen
upsampler:

    nearest, bilinear         fixed kernels
    sapa-i, sapa-b, sapa-p, sapa-g
                              `sapa_jax.linen.SAPA` of that variant, guided by the encoder
                              feature at the output resolution (y = skip, x = decoder feature)

The first two stages (1/8 -> 1/4 -> 1/2) are FPN-like: the upsampled feature plus a 1x1
lateral projection of the skip, refined by a 3x3 conv. The last stage (1/2 -> 1) adds no skip
and is followed only by the 1x1 classifier, as in decoders that predict at reduced resolution
and upsample: how sharp the full-resolution boundaries are is then the upsampler's doing.
SAPA can use the full-resolution encoder feature there as guidance; nearest and bilinear
cannot. SAPA-I has no projections and needs Cy == Cx, so it is guided by a 1x1 projection of
the skip to the decoder width; the other variants take the raw skip.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sapa_jax.linen import SAPA
from sapa_jax.modules import nearest_up

UPSAMPLERS = ("nearest", "bilinear", "sapa-i", "sapa-b", "sapa-p", "sapa-g")


def parse_upsampler(name: str) -> str:
    """Canonical (lower-case) upsampler name; ValueError naming the choices otherwise."""
    if not isinstance(name, str) or name.strip().lower() not in UPSAMPLERS:
        raise ValueError(f"upsampler must be one of {list(UPSAMPLERS)}, got {name!r}")
    return name.strip().lower()


def bilinear2x(x):
    """2x bilinear upsampling of (B, H, W, C), half-pixel centres, edges clamped.

    Equals `jax.image.resize(x, ..., "bilinear")` (PyTorch's align_corners=False) for a factor
    of 2, where every output pixel mixes two inputs per axis with weights 3/4 and 1/4; written
    out because the generic resize is several times slower to differentiate on CPU.
    """
    for axis in (1, 2):
        n = x.shape[axis]
        prev = jnp.take(x, jnp.maximum(jnp.arange(n) - 1, 0), axis=axis)
        nxt = jnp.take(x, jnp.minimum(jnp.arange(n) + 1, n - 1), axis=axis)
        even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
        x = jnp.stack([even, odd], axis=axis + 1)
        x = x.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 2:])
    return x


class ConvBlock(nn.Module):
    """`depth` x (3x3 conv -> GroupNorm -> ReLU). GroupNorm: no batch statistics to carry."""
    features: int
    depth: int = 2

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
            x = nn.GroupNorm(num_groups=min(8, self.features))(x)
            x = nn.relu(x)
        return x


class Upsample2x(nn.Module):
    """Doubles the resolution of the decoder feature `x` with the chosen upsampler."""
    method: str
    kernel_size: int = 5
    embedding_dim: int = 32

    @nn.compact
    def __call__(self, x, skip, lateral):
        if self.method == "nearest":
            return nearest_up(x, 2)
        if self.method == "bilinear":
            return bilinear2x(x)
        variant = self.method[-1].upper()
        guide = lateral if variant == "I" else skip
        # Inputs kept for the kernel-map figure (figures.py); free unless asked for.
        self.sow("intermediates", "y", guide)
        self.sow("intermediates", "x", x)
        return SAPA(variant=variant, embedding_dim=self.embedding_dim,
                    kernel_size=self.kernel_size, scale=2, name="sapa")(guide, x)


class Segmenter(nn.Module):
    """Returns per-pixel class logits (B, S, S, num_classes) for images (B, S, S, 3); S % 8 == 0."""
    upsampler: str
    num_classes: int
    widths: Sequence[int] = (16, 32, 48, 64)
    decoder_width: int = 32
    kernel_size: int = 5
    embedding_dim: int = 32

    @nn.compact
    def __call__(self, images):
        if images.shape[1] % 8 or images.shape[2] % 8:
            raise ValueError(f"image height and width must be multiples of 8 (three 2x "
                             f"down-samplings), got {images.shape[1:3]}")
        x, skips = images, []
        for i, features in enumerate(self.widths[:-1]):
            x = ConvBlock(features, depth=1 if i == 0 else 2, name=f"enc{i}")(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = ConvBlock(self.widths[-1], name="bottleneck")(x)
        x = nn.Conv(self.decoder_width, (1, 1), name="reduce")(x)
        for i in reversed(range(len(skips))):
            fuse = i > 0  # the last stage is the upsampler alone (see the module docstring)
            lateral = None
            if fuse or self.upsampler == "sapa-i":
                lateral = nn.Conv(self.decoder_width, (1, 1), name=f"lateral{i}")(skips[i])
            x = Upsample2x(self.upsampler, self.kernel_size, self.embedding_dim,
                           name=f"up{i}")(x, skips[i], lateral)
            if fuse:
                x = ConvBlock(self.decoder_width, depth=1, name=f"dec{i}")(x + lateral)
        return nn.Conv(self.num_classes, (1, 1), name="head")(x)

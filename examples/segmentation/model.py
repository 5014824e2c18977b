"""Segmentation networks (NHWC) whose upsampling stages are the only thing that changes.

The paper's protocol: "we only modify the upsampling stages". Every decoder below builds the
same layers (names, shapes) for every upsampler, and the upsampler modules are the only
parameters that differ (tests/test_examples.py checks this). A guided upsampler (SAPA) takes
the encoder feature at the target resolution as its guidance; SAPA-I, which needs guidance of
the decoder width, takes the lateral/projection of that feature that every upsampler's network
has anyway.

Encoder: `ConvBlock` stages, the first at full resolution, each next one after a 2x2 max-pool.

Decoders (`--decoder`):

    fpn            (default; FPN as in Faster R-CNN / MaskFormer) stages 1, 1/2, 1/4, 1/8:
                   x = reduce(f3); for i = 2, 1, 0: x = conv(up(x) + lateral_i(f_i)).
                   Laterals at every stage, the full-resolution one included. 3 upsamplers.
    segformer      (SegFormer's all-MLP head, the paper's Table 2) stages 1/2 ... 1/16 (after a
                   full-resolution stem): each projected to the decoder width, brought to the
                   head resolution 1/2 by repeated 2x upsampling (3 + 2 + 1 = 6 upsamplers),
                   concatenated, fused, classified at 1/2; the logits reach full resolution by
                   the same bilinear resize for every upsampler.
    upsampler-only the network of the first version of this example: as `fpn` but the last
                   stage (1/2 -> 1) has no lateral and no conv, only the upsampler and the
                   classifier. CAVEAT: nearest/bilinear then get no high-resolution
                   information at all there while SAPA gets the encoder feature as guidance
                   (and SAPA-I a full-resolution lateral that only it has): it measures how
                   much of the skip connection an upsampler can replace, not the paper's
                   comparison.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from examples.common.layers import ConvBlock
from examples.common.upsamplers import Upsampler, bilinear, guide_same_width

DECODERS = ("fpn", "segformer", "upsampler-only")
# Encoder widths per stage (full resolution first) of each decoder.
ENCODER_WIDTHS = {"fpn": (16, 32, 48, 64), "upsampler-only": (16, 32, 48, 64),
                  "segformer": (16, 32, 48, 64, 64)}


def parse_decoder(name: str) -> str:
    """Canonical decoder name; ValueError naming the choices otherwise."""
    if not isinstance(name, str) or name.strip().lower() not in DECODERS:
        raise ValueError(f"decoder must be one of {list(DECODERS)}, got {name!r}")
    return name.strip().lower()


def size_multiple(decoder: str) -> int:
    """Image sizes must be multiples of this (one halving per encoder stage after the first)."""
    return 2 ** (len(ENCODER_WIDTHS[decoder]) - 1)


def is_upsampler_param(path: Sequence[str]) -> bool:
    """Whether a parameter path (top-level module name first) belongs to an upsampler."""
    return str(path[0]).startswith("up")


class Segmenter(nn.Module):
    """Per-pixel class logits (B, S, S, num_classes) for images (B, S, S, 3).

    S must be a multiple of `size_multiple(decoder)`. Attributes: the decoder, the upsampler
    name (examples.common.upsamplers) and its options, the decoder width.
    """
    decoder: str
    upsampler: str
    num_classes: int
    decoder_width: int = 32
    kernel_size: int = 5
    embedding_dim: int = 32
    normalizer: str = "softmax"
    border: str = "zeros"

    @property
    def figure_stage(self) -> str:
        """The upsampler module whose output has the highest resolution (for the figures)."""
        return "up2_1" if self.decoder == "segformer" else "up0"

    def _up(self, name):
        return Upsampler(self.upsampler, 2, self.kernel_size, self.embedding_dim,
                         self.normalizer, self.border, name=name)

    def _encode(self, images):
        multiple = size_multiple(self.decoder)
        if images.shape[1] % multiple or images.shape[2] % multiple:
            raise ValueError(f"image height and width must be multiples of {multiple} for the "
                             f"{self.decoder} decoder, got {images.shape[1:3]}")
        x, feats = images, []
        for i, features in enumerate(ENCODER_WIDTHS[self.decoder]):
            if i:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = ConvBlock(features, depth=1 if i == 0 else 2, name=f"enc{i}")(x)
            feats.append(x)
        return feats

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        decoder = parse_decoder(self.decoder)
        feats = self._encode(images)
        width = self.decoder_width
        if decoder == "segformer":
            return self._segformer(images, feats)
        x = nn.Conv(width, (1, 1), name="reduce")(feats[-1])
        for i in reversed(range(len(feats) - 1)):
            last_bare = decoder == "upsampler-only" and i == 0
            lateral = None
            if not last_bare or guide_same_width(self.upsampler):
                lateral = nn.Conv(width, (1, 1), name=f"lateral{i}")(feats[i])
            guide = lateral if guide_same_width(self.upsampler) else feats[i]
            x = self._up(f"up{i}")(x, guide)
            if not last_bare:
                x = ConvBlock(width, depth=1, name=f"dec{i}")(x + lateral)
        return nn.Conv(self.num_classes, (1, 1), name="head")(x)

    def _segformer(self, images, feats):
        """Stages 1..4 (1/2 .. 1/16) -> head at 1/2 (stage 1's resolution)."""
        width = self.decoder_width
        proj = {j: nn.Conv(width, (1, 1), name=f"proj{j}")(feats[j])
                for j in range(1, len(feats))}
        gathered = []
        for j in range(1, len(feats)):
            x = proj[j]
            for level in range(j - 1, 0, -1):  # from stage j's resolution down to stage 1's
                guide = proj[level] if guide_same_width(self.upsampler) else feats[level]
                # up{j}_{level}: stage j's path, output at stage `level`'s resolution
                x = self._up(f"up{j}_{level}")(x, guide)
            gathered.append(x)
        x = nn.Conv(width, (1, 1), use_bias=False, name="fuse")(jnp.concatenate(gathered, -1))
        x = nn.relu(nn.GroupNorm(num_groups=min(8, width), name="fuse_norm")(x))
        logits = nn.Conv(self.num_classes, (1, 1), name="head")(x)
        return bilinear(logits, images.shape[1] // logits.shape[1])

"""Synthetic segmentation scenes where boundary detail matters, generated on the fly in NumPy.

Every image is a textured, noisy background (smooth colour noise + oriented stripes + pixel
noise) with objects of four foreground classes painted over it in a random order:

    0 background   1 disc   2 polygon (convex, 3-6 sides)   3 line (1-2.5 px thick)   4 ring

Lines and rings are only one or two pixels wide, so a decoder that blurs or shifts boundaries
loses them. Object colours scatter around a per-class base colour and the background shares
their range, so colour alone does not decide the class near an edge. The stripes add texture
edges that are *not* label boundaries.

Everything is vectorised over the batch (one small loop over object slots), and deterministic:
the training batch of step t for seed s is a function of (s, t) alone, so a resumed run sees the
same data as an uninterrupted one; the validation set comes from a separate seed stream.
"""
from __future__ import annotations

import numpy as np

from examples.common.noise import smooth_noise

CLASS_NAMES = ("background", "disc", "polygon", "line", "ring")
NUM_CLASSES = len(CLASS_NAMES)
DISC, POLYGON, LINE, RING = 1, 2, 3, 4

# Base RGB colour per foreground class; objects jitter around it.
_BASE_COLOURS = np.array([[0.85, 0.30, 0.25], [0.30, 0.75, 0.35], [0.25, 0.40, 0.90],
                          [0.90, 0.80, 0.25]], np.float32)
# Object slots painted in this order (shuffled per batch); each slot is present with p = 0.75.
_SLOTS = (DISC, POLYGON, RING, LINE, LINE, DISC, POLYGON, RING, LINE)
_TRAIN_STREAM, _VAL_STREAM = 0, 1  # second seed word: keeps train and validation streams apart


def _background(rng, batch, size, yy, xx):
    colour = 0.5 + 0.3 * smooth_noise(rng, batch, size, 4, 3)
    colour += 0.12 * smooth_noise(rng, batch, size, 9, 3)
    # Oriented stripes: texture edges that carry no label boundary.
    theta = rng.uniform(0, np.pi, (batch, 1, 1))
    period = rng.uniform(3.0, 8.0, (batch, 1, 1)) * max(1.0, size / 64)
    phase = rng.uniform(0, 2 * np.pi, (batch, 1, 1))
    stripes = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
    amplitude = rng.uniform(0.0, 0.15, (batch, 1, 1, 1))
    return colour + amplitude * stripes[..., None]


def _disc(rng, batch, size, yy, xx):
    cy, cx = (rng.uniform(0.1, 0.9, (2, batch, 1, 1)) * size)
    radius = rng.uniform(0.06, 0.16, (batch, 1, 1)) * size
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def _ring(rng, batch, size, yy, xx):
    cy, cx = (rng.uniform(0.15, 0.85, (2, batch, 1, 1)) * size)
    outer = rng.uniform(0.10, 0.24, (batch, 1, 1)) * size
    thick = rng.uniform(1.0, 2.5, (batch, 1, 1)) * max(1.0, size / 64)
    dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return (dist <= outer) & (dist >= outer - thick)


def _line(rng, batch, size, yy, xx):
    """Segment of random direction; pixels within half the thickness of it."""
    y0, x0 = rng.uniform(0.05, 0.95, (2, batch, 1, 1)) * size
    angle = rng.uniform(0, 2 * np.pi, (batch, 1, 1))
    length = rng.uniform(0.3, 0.8, (batch, 1, 1)) * size
    dy, dx = np.sin(angle), np.cos(angle)
    thick = rng.uniform(1.0, 2.5, (batch, 1, 1)) * max(1.0, size / 64)
    t = np.clip((yy - y0) * dy + (xx - x0) * dx, 0.0, length)
    return (yy - y0 - t * dy) ** 2 + (xx - x0 - t * dx) ** 2 <= (thick / 2) ** 2


def _polygon(rng, batch, size, yy, xx):
    """Convex polygon: vertices on a circle in angular order; inside = left of every edge."""
    sides = int(rng.integers(3, 7))
    cy, cx = (rng.uniform(0.15, 0.85, (2, batch, 1)) * size)
    radius = rng.uniform(0.08, 0.2, (batch, 1)) * size
    angles = np.sort(rng.uniform(0, 2 * np.pi, (batch, sides)), axis=1)
    vy, vx = cy + radius * np.sin(angles), cx + radius * np.cos(angles)
    ey, ex = np.roll(vy, -1, axis=1) - vy, np.roll(vx, -1, axis=1) - vx
    # cross(edge, point - vertex) >= 0 for all edges; shapes (B, V, S, S)
    cross = (ex[..., None, None] * (yy[:, None] - vy[..., None, None])
             - ey[..., None, None] * (xx[:, None] - vx[..., None, None]))
    return np.all(cross >= 0, axis=1)


_PAINTERS = {DISC: _disc, POLYGON: _polygon, LINE: _line, RING: _ring}


def make_batch(rng: np.random.Generator, batch: int, size: int):
    """`batch` scenes of `size` x `size`: images float32 (B, S, S, 3), labels int32 (B, S, S)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)[:, None] + 0.5  # pixel centres
    image = _background(rng, batch, size, yy, xx)
    labels = np.zeros((batch, size, size), np.int32)
    for cls in rng.permutation(np.array(_SLOTS)):
        mask = _PAINTERS[int(cls)](rng, batch, size, yy, xx)
        mask &= rng.random((batch, 1, 1)) < 0.75
        colour = _BASE_COLOURS[cls - 1] + rng.normal(0, 0.12, (batch, 1, 1, 3))
        texture = 0.06 * smooth_noise(rng, batch, size, 6, 1)
        image = np.where(mask[..., None], colour + texture, image)
        labels[mask] = cls
    image += rng.normal(0, 0.08, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


def train_batch(seed: int, step: int, batch: int, size: int):
    """The training batch of `step` for run `seed` (a pure function of its arguments)."""
    return make_batch(np.random.default_rng([seed, _TRAIN_STREAM, step]), batch, size)


def validation_set(seed: int, count: int, size: int):
    """A fixed validation set from a stream disjoint from every training stream."""
    return make_batch(np.random.default_rng([seed, _VAL_STREAM]), count, size)

"""Smooth random fields for the examples' synthetic images (both data generators use them)."""
from __future__ import annotations

import numpy as np


def smooth_noise(rng, batch, size, cells, channels):
    """(B, S, S, C) noise in [-1, 1], bilinearly interpolated from a random (cells x cells) grid
    drawn from `rng`."""
    grid = rng.uniform(-1.0, 1.0, (batch, cells, cells, channels)).astype(np.float32)
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size * (cells - 1)
    i0 = np.minimum(pos.astype(np.int64), cells - 2)
    f = (pos - i0)[:, None]
    rows = grid[:, i0] * (1 - f)[None, :, :, None] + grid[:, i0 + 1] * f[None, :, :, None]
    f = f[:, 0][None, None, :, None]
    return rows[:, :, i0] * (1 - f) + rows[:, :, i0 + 1] * f

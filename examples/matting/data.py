"""Synthetic matting data generated on the fly in NumPy: alpha mattes where details decide.

One sample = (image, trimap, alpha) with `image = alpha * F + (1 - alpha) * B` plus a little
pixel noise. Every matte has

* a body: a star-shaped blob r(theta) = r0 (1 + sum_k a_k cos(k theta + phi_k)), its edge hard
  (anti-aliased only) or soft (a linear ramp up to 3 px wide);
* holes (small discs cut out of the body) and a semi-transparent patch (opacity 0.3-0.8);
* hair-like strands: curved polylines 0.5-2 px wide growing out of the body's edge, opacity
  0.6-1, so their pixels are mostly partial coverage.

Alpha is anti-aliased by supersampling: every shape is evaluated at `SUPERSAMPLE**2` points
per pixel and averaged (box filter). The foreground F and the background B are both textured
mixtures of one per-sample palette of colours, so colour alone does not separate them near an
edge. The trimap (the network's second input, as matting practice uses) marks as unknown
every pixel within a band of the matte's partial pixels (`0 < alpha < 1`); the rest is
foreground (alpha = 1) or background (alpha = 0). Evaluation is over the unknown region.

Deterministic: the training batch of step t for seed s is a pure function of (s, t, batch,
size), so a resumed run sees the data of an uninterrupted one; validation comes from a
separate stream. Everything is vectorised over the batch (loops only over shape slots).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from examples.common.noise import smooth_noise

SUPERSAMPLE = 4  # coverage samples per pixel and axis
PALETTE = 4  # colours shared by foreground and background of one sample
TRIMAP_BG, TRIMAP_UNKNOWN, TRIMAP_FG = 0, 1, 2
_TRAIN_STREAM, _VAL_STREAM = 0, 1  # second seed word: keeps train and validation apart
_STRANDS, _STRAND_SEGMENTS, _HOLES = 8, 6, 3
_RENDER_CHUNK = 8  # mattes per call of the jitted renderer


def _palette_texture(rng, palette, size, cells, stripes: bool, favoured):
    """(B, S, S, 3) texture: a per-pixel softmax mixture of the palette's colours, the
    `favoured` ones (indices) more often than the others."""
    batch = palette.shape[0]
    logits = 3.0 * smooth_noise(rng, batch, size, cells, PALETTE)
    logits[..., list(favoured)] += 2.0
    if stripes:  # oriented stripes: texture edges that are not matte edges
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        theta = rng.uniform(0, np.pi, (batch, 1, 1))
        period = rng.uniform(3.0, 8.0, (batch, 1, 1)) * max(1.0, size / 48)
        wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
        which = rng.integers(0, PALETTE, batch)
        logits[np.arange(batch), ..., which] += 2.5 * wave
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhwk,bkc->bhwc", weights, palette)


def _draw_matte_params(rng, batch: int, size: int) -> dict:
    """Random shape parameters of `batch` mattes (small float32 arrays; the RNG lives here)."""
    u = lambda lo, hi, *shape: rng.uniform(lo, hi, (batch, *shape)).astype(np.float32)
    p = {"centre": u(0.38, 0.62, 2) * size, "r0": u(0.2, 0.32) * size,
         "amp": u(0.0, 0.12, 4), "phase": u(0, 2 * np.pi, 4)}
    # Soft edge: a linear ramp of this width (px); 0 = hard, anti-aliased by supersampling.
    p["soft"] = np.where(rng.random(batch) < 0.5, 0.0, u(0.5, 3.0)).astype(np.float32)
    scale = max(1.0, size / 48)
    p["hole_angle"], p["hole_dist"] = u(0, 2 * np.pi, _HOLES), u(0.0, 0.55, _HOLES)
    p["hole_radius"] = u(0.6, 2.5, _HOLES) * scale
    p["hole_on"] = (rng.random((batch, _HOLES)) < 0.6).astype(np.float32)
    p["patch_angle"], p["patch_dist"] = u(0, 2 * np.pi), u(0.3, 0.9)
    p["patch_axes"], p["patch_tilt"] = u(0.2, 0.4, 2), u(0, np.pi)
    p["patch_opacity"] = u(0.3, 0.8)
    p["patch_on"] = (rng.random(batch) < 0.7).astype(np.float32)
    p["strand_root"], p["strand_turn"] = u(0, 2 * np.pi, _STRANDS), u(-0.5, 0.5, _STRANDS)
    p["strand_length"] = u(0.2, 0.45, _STRANDS) * size
    p["strand_bend"] = u(-1.2, 1.2, _STRANDS)
    p["strand_width"], p["strand_opacity"] = u(0.5, 2.0, _STRANDS), u(0.6, 1.0, _STRANDS)
    p["strand_on"] = (rng.random((batch, _STRANDS)) < 0.8).astype(np.float32)
    return p


def _radius(p, theta):
    """The body's edge radius r(theta); theta (B, ...) broadcast against the harmonics."""
    k = jnp.arange(2, 6, dtype=jnp.float32)
    extra = (p["amp"][:, None] * jnp.cos(k * theta[..., None] + p["phase"][:, None])).sum(-1)
    return p["r0"][:, None] * (1 + extra)


@functools.partial(jax.jit, static_argnums=1)
def _render_matte(p: dict, size: int):
    """Supersampled coverage of body, holes, translucent patch and strands, box-filtered to
    (B, S, S). Jitted: XLA fuses the per-point arithmetic (in NumPy, with its temporaries, it
    was ~50x slower)."""
    n = size * SUPERSAMPLE
    grid = (jnp.arange(n, dtype=jnp.float32) + 0.5) / SUPERSAMPLE  # pixel i spans [i, i + 1)
    batch = p["r0"].shape[0]
    ys, xs = grid[None, :, None], grid[None, None, :]
    cy, cx = p["centre"][:, 0, None, None], p["centre"][:, 1, None, None]
    r0 = p["r0"][:, None, None]
    # Body: star-shaped blob, hard or soft edge.
    dy, dx = ys - cy, xs - cx
    inside = _radius(p, jnp.arctan2(dy, dx).reshape(batch, -1)).reshape(batch, n, n)
    inside = inside - jnp.sqrt(dy ** 2 + dx ** 2)
    soft = p["soft"][:, None, None]
    body = jnp.where(soft > 0, jnp.clip(inside / jnp.maximum(soft, 1e-6) + 0.5, 0, 1),
                     (inside > 0).astype(jnp.float32))
    # Holes: discs near the centre cut out of the body.
    for h in range(_HOLES):
        angle, dist = p["hole_angle"][:, h, None, None], p["hole_dist"][:, h, None, None] * r0
        hy, hx = cy + dist * jnp.sin(angle), cx + dist * jnp.cos(angle)
        disc = (ys - hy) ** 2 + (xs - hx) ** 2 <= p["hole_radius"][:, h, None, None] ** 2
        body = body * (1 - disc * p["hole_on"][:, h, None, None])
    # Translucent patch: an ellipse with a soft rim whose opacity is 0.3-0.8.
    angle, dist = p["patch_angle"][:, None, None], p["patch_dist"][:, None, None] * r0
    qy, qx = ys - (cy + dist * jnp.sin(angle)), xs - (cx + dist * jnp.cos(angle))
    tilt = p["patch_tilt"][:, None, None]
    a, b = p["patch_axes"][:, 0, None, None] * r0, p["patch_axes"][:, 1, None, None] * r0
    u = (qx * jnp.cos(tilt) + qy * jnp.sin(tilt)) / a
    v = (-qx * jnp.sin(tilt) + qy * jnp.cos(tilt)) / b
    rim = jnp.clip((1 - jnp.sqrt(u ** 2 + v ** 2)) * 4, 0, 1)
    patch = 1 - (1 - p["patch_opacity"][:, None, None]) * rim * p["patch_on"][:, None, None]
    body = body * patch
    # Strands: polylines leaving the body slightly inside its edge and bending outwards; a
    # point is covered when its distance to the polyline is <= width / 2.
    t = jnp.linspace(0.0, 1.0, _STRAND_SEGMENTS + 1, dtype=jnp.float32)
    strand_keys = ("strand_root", "strand_turn", "strand_length", "strand_bend",
                   "strand_width", "strand_opacity", "strand_on")

    def add_strand(hair, q):  # a scan over the strands keeps the program (and compile) small
        root = q["strand_root"]
        edge = _radius(p, root[:, None])[:, 0]
        step = q["strand_length"][:, None] / _STRAND_SEGMENTS
        heading = (root + q["strand_turn"])[:, None] + q["strand_bend"][:, None] * t
        y0 = p["centre"][:, 0] + 0.85 * edge * jnp.sin(root)
        x0 = p["centre"][:, 1] + 0.85 * edge * jnp.cos(root)
        py = jnp.concatenate([y0[:, None], y0[:, None]
                              + jnp.cumsum(step * jnp.sin(heading[:, :-1]), 1)], 1)
        px = jnp.concatenate([x0[:, None], x0[:, None]
                              + jnp.cumsum(step * jnp.cos(heading[:, :-1]), 1)], 1)
        d2 = jnp.full((batch, n, n), jnp.inf, jnp.float32)
        for k in range(_STRAND_SEGMENTS):
            ay, ax = py[:, k, None, None], px[:, k, None, None]
            ey, ex = py[:, k + 1, None, None] - ay, px[:, k + 1, None, None] - ax
            qy, qx = ys - ay, xs - ax
            w = jnp.clip((qy * ey + qx * ex) / (ey ** 2 + ex ** 2 + 1e-9), 0, 1)
            d2 = jnp.minimum(d2, (qy - w * ey) ** 2 + (qx - w * ex) ** 2)
        cover = d2 <= (q["strand_width"][:, None, None] / 2) ** 2
        cover = cover * (q["strand_on"] * q["strand_opacity"])[:, None, None]
        return 1 - (1 - hair) * (1 - cover), None  # "over": strands may cross

    per_strand = {key: jnp.moveaxis(p[key], 1, 0) for key in strand_keys}
    hair, _ = jax.lax.scan(add_strand, jnp.zeros((batch, n, n), jnp.float32), per_strand)
    alpha = 1 - (1 - body) * (1 - hair)
    alpha = alpha.reshape(batch, size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(2, 4))
    return jnp.clip(alpha, 0.0, 1.0)


def make_alpha(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
    """`batch` anti-aliased mattes (B, S, S) float32 in [0, 1]."""
    params = _draw_matte_params(rng, batch, size)
    # Rendered in chunks of a fixed size (the last padded by repetition): one compilation per
    # image size, whatever the batch or validation-set size.
    pad = -batch % _RENDER_CHUNK
    params = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in params.items()}
    chunks = [_render_matte({k: v[i:i + _RENDER_CHUNK] for k, v in params.items()}, size)
              for i in range(0, batch + pad, _RENDER_CHUNK)]
    return np.concatenate([np.asarray(c) for c in chunks])[:batch]


def _dilate(mask, radius: np.ndarray):
    """Per-image binary dilation of (B, S, S) by a (2r+1)^2 square, r (B,) in pixels: r
    rounds of 3 x 3 dilation, each applied to the images whose radius is not yet reached."""
    out = mask.copy()
    size = mask.shape[1]
    for k in range(1, int(radius.max(initial=0)) + 1):
        padded = np.pad(out, ((0, 0), (1, 1), (1, 1)))
        grown = np.zeros_like(out)
        for dy in range(3):
            for dx in range(3):
                grown |= padded[:, dy:dy + size, dx:dx + size]
        out = np.where((radius >= k)[:, None, None], grown, out)
    return out


def make_trimap(alpha: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Trimap (B, S, S) int32: TRIMAP_UNKNOWN within `radius` px (Chebyshev, per image) of a
    partial pixel (0 < alpha < 1), else TRIMAP_FG where alpha == 1 and TRIMAP_BG where 0."""
    unknown = _dilate((alpha > 0) & (alpha < 1), np.asarray(radius, np.int64))
    trimap = np.where(alpha >= 1, TRIMAP_FG, TRIMAP_BG).astype(np.int32)
    trimap[unknown] = TRIMAP_UNKNOWN
    return trimap


def make_batch(rng: np.random.Generator, batch: int, size: int):
    """`batch` samples of `size` x `size`: image (B, S, S, 3) float32 in [0, 1], trimap
    (B, S, S) int32 (TRIMAP_BG / UNKNOWN / FG), alpha (B, S, S) float32 in [0, 1]."""
    alpha = make_alpha(rng, batch, size)
    palette = rng.uniform(0.05, 0.95, (batch, PALETTE, 3)).astype(np.float32)
    # Foreground and background mix the same colours (the background's jittered), each
    # favouring two of them; the background has stripes of its own.
    fg = _palette_texture(rng, palette, size, 5, stripes=False, favoured=(0, 1))
    bg = _palette_texture(rng, np.clip(palette + rng.normal(0, 0.05, palette.shape), 0, 1),
                          size, 4, stripes=True, favoured=(2, 3))
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    image += rng.normal(0, 0.02, image.shape)
    # Unknown band: 1-2 px around the partial pixels at 32 x 32, proportionally wider above.
    band = max(1, round(size / 32))
    trimap = make_trimap(alpha, rng.integers(band, 2 * band + 1, batch))
    return np.clip(image, 0, 1).astype(np.float32), trimap, alpha


def train_batch(seed: int, step: int, batch: int, size: int):
    """The training batch of `step` for run `seed` (a pure function of its arguments)."""
    return make_batch(np.random.default_rng([seed, _TRAIN_STREAM, step]), batch, size)


def validation_set(seed: int, count: int, size: int):
    """A fixed validation set from a stream disjoint from every training stream."""
    return make_batch(np.random.default_rng([seed, _VAL_STREAM]), count, size)

"""SAPA-D core: `deform_upsample`, SAPA with P learned sampling points per group.

The deformable SAPA of the authors' extension (tiny-smart/sapa `SAPADeform`; docs/design.md
section 6). Every output point l' = (i', j') with parent pixel (i' // s, j' // s) reads, per
channel group g, P points at `parent + offset` (low-res pixel units, pixel centres at
integers), bilinearly; its weights are the softmax over the P points of q[l'] . k(point)::

    py = i' // s + dy,  px = j' // s + dx          (offset channel (g*P + p)*2 + d, d=0: dx)
    sample(f, py, px) = bilinear f at (py, px) if -1 < py < H and -1 < px < W, else 0
                        (corners outside the map count 0: grid_sample, align_corners=False)
    logit[g, p] = sum_e q[l', g*E + e] * sample(k[.., g*E + e], py, px)      (no 1/sqrt(E))
    attn[g, :]  = softmax over the P points (an out-of-range point has logit 0 and counts)
    out[l', c]  = sum_p attn[g(c), p] * sample(v[.., c], py, px),   g(c) = c // (C / G)

`impl="xla"` runs the jnp formulation below; `impl="auto"` picks the fused kernel when one is
built for the platform and dtype, else jnp; `impl="ffi"` demands the kernel. The fused kernel
exists for the CPU (f32, f64, bf16, f16) and CUDA (f32, bf16, f16; docs/design.md section 6,
checked through the CUDA emulator, not yet on a GPU). The kernel path is reverse-mode differentiable (`grad`, `vjp`);
forward mode (`jvp`) needs `impl="xla"`.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from . import _checks, _ffi, core, reference

__all__ = ["deform_upsample", "check_deform_args"]


# ----------------------------------------------------------------------------- arguments

def check_deform_args(q, k, v, offsets, *, num_points, groups, scale, impl) -> dict:
    """Validate the arguments of `deform_upsample`; returns the normalised static options."""
    num_points = _checks.check_int("num_points", num_points, minimum=1)
    groups = _checks.check_int("groups", groups, minimum=1)
    scale = _checks.check_int("scale", scale, minimum=1)
    impl = _checks.check_choice("impl", impl, _checks.IMPLS)
    _checks.check_query_key(q, k, scale)
    if q.shape[-1] % groups:
        raise ValueError(
            f"q and k channels must be divisible by groups={groups} (G * embedding_dim), "
            f"got {q.shape[-1]}")
    _checks.check_array("v", v)
    _checks.check_same_low("k", k, "v", v)
    if v.shape[-1] % groups:
        raise ValueError(
            f"v channels must be divisible by groups={groups} (each group weights C / G "
            f"channels), got {v.shape[-1]}")
    _checks.check_array("offsets", offsets)
    _checks.check_high_low("offsets", offsets, "k", k, scale)
    expected = groups * num_points * 2
    if offsets.shape[-1] != expected:
        raise ValueError(
            f"offsets must have groups * num_points * 2 = {expected} channels "
            f"(groups={groups}, num_points={num_points}; (dx, dy) per point), "
            f"got {offsets.shape[-1]}")
    return dict(num_points=num_points, groups=groups, scale=scale, impl=impl)


def deform_upsample(q, k, v, offsets, *, num_points: int = 9, groups: int = 4, scale: int = 2,
                    impl: str = "auto"):
    """SAPA-D core: upsample `v` by attention over P learned sampling points per group.

    Args:
      q: high-res queries `(B, s*H, s*W, G*E)`; channel g*E + e belongs to group g.
      k: low-res keys `(B, H, W, G*E)`.
      v: low-res values `(B, H, W, C)`, `C % G == 0`; channel c belongs to group c // (C / G).
      offsets: `(B, s*H, s*W, G*P*2)` in low-res pixels from the parent pixel; channel
        (g*P + p)*2 + 0 is dx (columns), (g*P + p)*2 + 1 is dy (rows).
      num_points: P >= 1 sampling points per group.
      groups: G >= 1.
      scale: integer upsampling factor s >= 1.
      impl: "auto" | "xla" | "ffi" (see the module docstring).

    Returns:
      `(B, s*H, s*W, C)` in the promoted dtype of q, k, v, offsets (computed in at least
      float32).
    """
    opts = check_deform_args(q, k, v, offsets, num_points=num_points, groups=groups,
                             scale=scale, impl=impl)
    impl = opts.pop("impl")
    compute, out_dtype = _checks.compute_dtype(q, k, v, offsets)
    if resolve_impl(impl, out_dtype, q, k, v, offsets) == "ffi":
        return _ffi.deform_upsample(q, k, v, offsets, **opts)
    q, k, v, offsets = (jnp.asarray(a, compute) for a in (q, k, v, offsets))
    return _deform_reference_jit(q, k, v, offsets, **opts).astype(out_dtype)


def resolve_impl(impl: str, dtype, *arrays) -> str:
    """"xla" or "ffi" for one SAPA-D call: `core.resolve_impl`, with "xla" on a platform whose
    kernel module has no SAPA-D kernel (there impl="ffi" raises a RuntimeError)."""
    return core.resolve_impl(impl, dtype, *arrays, operator="SAPA-D",
                             kernel_built=_ffi.deform_built)


# ----------------------------------------------------------------------------- jnp path

def sample_positions(offsets, *, num_points: int, groups: int, scale: int):
    """(py, px), each (B, sH, sW, G, P): parent pixel + offset, in low-res pixel units."""
    batch, out_h, out_w, _ = offsets.shape
    pairs = offsets.reshape(batch, out_h, out_w, groups, num_points, 2)
    rows = (jnp.arange(out_h) // scale).astype(offsets.dtype)[:, None, None, None]
    cols = (jnp.arange(out_w) // scale).astype(offsets.dtype)[None, :, None, None]
    return rows + pairs[..., 1], cols + pairs[..., 0]


def corner_table(feat, groups: int):
    """(B, H, W, C) -> (B, (H+1)*(W+1)*G, 4*Cg): the 2 x 2 corners of every bilinear cell.

    Row `((y0 + 1) * (W + 1) + x0 + 1) * G + g` holds, for the cell whose top-left corner is
    (y0, x0), y0 in -1..H-1 and x0 in -1..W-1, group g's channels at the corners (y0, x0),
    (y0, x0+1), (y0+1, x0), (y0+1, x0+1); corners off the map are 0. One gather of a row reads
    a whole sample (4x fewer, 4x longer slices than a gather per corner).
    """
    batch, height, width, channels = feat.shape
    padded = jnp.pad(feat, ((0, 0), (1, 1), (1, 1), (0, 0)))
    corners = jnp.stack([padded[:, a:a + height + 1, b:b + width + 1]
                         for a in (0, 1) for b in (0, 1)], axis=3)   # (B, H+1, W+1, 4, C)
    corners = corners.reshape(batch, height + 1, width + 1, 4, groups, channels // groups)
    corners = corners.transpose(0, 1, 2, 4, 3, 5)                    # (B, H+1, W+1, G, 4, Cg)
    return corners.reshape(batch, (height + 1) * (width + 1) * groups, 4 * (channels // groups))


def bilinear_cells(py, px, height: int, width: int):
    """The bilinear cell of every sample position (py, px) on an H x W map.

    Returns `(cell, weights, read)`: the `corner_table` cell index (int32, shape of py), the
    four corner weights (shape + (4,), corner order as in `corner_table`) and whether the
    sample is read at all. A sample outside `-1 < py < H`, `-1 < px < W` is not read: it is
    exactly 0 with zero gradient (the boundary itself included, as upstream). Weights are
    differentiable inside the cell [floor, floor + 1] (floor is held constant). A NaN position
    reads nothing but has NaN weights (NaN out, and no NaN scattered into k or v); +-Inf ones
    are outside.
    """
    outside = (py <= -1) | (py >= height) | (px <= -1) | (px >= width)  # NaN: not outside
    read = ~(outside | jnp.isnan(py) | jnp.isnan(px))
    # Out-of-range positions are replaced before any arithmetic, so that neither the value nor
    # the gradient of the discarded branch can be Inf or NaN ("double where").
    py = jnp.where(outside, 0, py)
    px = jnp.where(outside, 0, px)
    y0 = jax.lax.stop_gradient(jnp.floor(py))
    x0 = jax.lax.stop_gradient(jnp.floor(px))
    ly, lx = py - y0, px - x0
    weights = jnp.stack([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx], axis=-1)
    weights = jnp.where(outside[..., None], 0, weights)
    # Clamp in floating point before the cast (a NaN position only needs some valid index).
    y0i = jnp.clip(y0, -1, height - 1).astype(jnp.int32)
    x0i = jnp.clip(x0, -1, width - 1).astype(jnp.int32)
    return (y0i + 1) * (width + 1) + (x0i + 1), weights, read


def _sample(table, cells, groups: int):
    """Bilinear samples `(B, N*G, Cg)` from a `corner_table` for cells of shape (B, N, G)."""
    cell, weights, read = cells
    batch, cg = table.shape[0], table.shape[-1] // 4
    rows = (cell * groups + jnp.arange(groups, dtype=jnp.int32)).reshape(batch, -1)
    # vmap, not an explicit batch index: the gather then has a batch dimension, which XLA's
    # partitioner keeps local when the batch is sharded.
    corners = jax.vmap(lambda t, r: t[r])(table, rows).reshape(*cell.shape, 4, cg)
    corners = jnp.where(read[..., None, None], corners, 0)
    return jnp.sum(weights[..., None] * corners, axis=-2).reshape(batch, -1, cg)


def deform_reference(q, k, v, offsets, *, num_points: int, groups: int, scale: int):
    """The jnp SAPA-D core on validated arrays of one floating dtype (see `deform_upsample`).

    A `lax.scan` over the sampling points with a `jax.checkpoint`ed body: neither the forward
    nor the saved residuals hold a P-expanded copy of k or v (the backward recomputes one
    point's samples at a time), and the program size does not grow with P. k and v are read
    through their `corner_table`s (4x the low-res map).
    """
    batch, out_h, out_w, qk_dim = q.shape
    height, width, channels = v.shape[1:]
    py, px = sample_positions(offsets, num_points=num_points, groups=groups, scale=scale)
    points_first = lambda a: jnp.moveaxis(a, -1, 0)                       # (P, B, sH, sW, G)
    py, px = points_first(py), points_first(px)
    queries = q.reshape(batch, out_h * out_w * groups, qk_dim // groups)
    keys, values = corner_table(k, groups), corner_table(v, groups)

    @jax.checkpoint
    def logit(carry, position):
        cells = bilinear_cells(*position, height, width)
        return carry, jnp.sum(queries * _sample(keys, cells, groups), axis=-1)

    @jax.checkpoint
    def accumulate(out, point):
        weight, py_p, px_p = point
        cells = bilinear_cells(py_p, px_p, height, width)
        return out + weight[..., None] * _sample(values, cells, groups), None

    _, logits = jax.lax.scan(logit, None, (py, px))                       # (P, B, N*G)
    attn = reference.normalize(jnp.moveaxis(logits, 0, -1), normalizer="softmax", eps=0.0)
    attn = jnp.moveaxis(attn, -1, 0)
    out = jnp.zeros((batch, out_h * out_w * groups, channels // groups), v.dtype)
    out, _ = jax.lax.scan(accumulate, out, (attn, py, px))
    return out.reshape(batch, out_h, out_w, channels)


# Compiled once per shape and options: called eagerly, the scans would otherwise be traced and
# compiled again on every call (their bodies are new closures each time). Inlined under jit.
_deform_reference_jit = jax.jit(deform_reference, static_argnames=("num_points", "groups", "scale"))

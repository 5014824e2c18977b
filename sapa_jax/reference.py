"""Pure-jnp SAPA core: the portable fallback (`impl="xla"`) and the reference for the kernels.

Patch based: the low-res map is zero-padded by r = K // 2 and the K*K shifted views are stacked
(`low_res_patches`), so the whole computation is a few einsums with no Python loop over pixels.
It materialises (B, H, W, K*K, C) patches; the fused FFI kernels exist to avoid exactly that.
All functions take validated NHWC arrays in the compute dtype (see `sapa_jax.core`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes in the reference


def tap_offsets(kernel_size: int):
    """(dy, dx) of every tap, dy outer and dx inner: tap p = (dy + r) * K + (dx + r)."""
    r = kernel_size // 2
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]


@functools.lru_cache(maxsize=64)
def inside_taps(height: int, width: int, kernel_size: int) -> np.ndarray:
    """Boolean (H, W, K*K): is tap p of low-res point (i, j) inside the map?"""
    rows = np.arange(height)[:, None, None]
    cols = np.arange(width)[None, :, None]
    dy, dx = (np.array(o)[None, None, :] for o in zip(*tap_offsets(kernel_size)))
    mask = (rows + dy >= 0) & (rows + dy < height) & (cols + dx >= 0) & (cols + dx < width)
    mask.setflags(write=False)
    return mask


def low_res_patches(x, kernel_size: int):
    """(B, H, W, C) -> (B, H, W, K*K, C): the K x K neighbourhood of every pixel, zeros outside."""
    r = kernel_size // 2
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    views = [padded[:, r + dy:r + dy + height, r + dx:r + dx + width, :]
             for dy, dx in tap_offsets(kernel_size)]
    return jnp.stack(views, axis=3)


def similarity(q, k, *, kernel_size: int, scale: int):
    """Logits (B, sH, sW, K*K): q[l'] . k[l + p], 0 where l + p is outside the map."""
    batch, out_h, out_w, dim = q.shape
    height, width = k.shape[1:3]
    q6 = q.reshape(batch, height, scale, width, scale, dim)
    logits = jnp.einsum("bhiwjd,bhwpd->bhiwjp", q6, low_res_patches(k, kernel_size),
                        precision=_HIGHEST)
    return logits.reshape(batch, out_h, out_w, kernel_size * kernel_size)


def assemble(w, v, *, kernel_size: int, scale: int):
    """Output (B, sH, sW, C): sum_p w[l', p] * v[l + p], v = 0 outside the map."""
    batch, out_h, out_w, taps = w.shape
    height, width, channels = v.shape[1:]
    w6 = w.reshape(batch, height, scale, width, scale, taps)
    out = jnp.einsum("bhiwjp,bhwpc->bhiwjc", w6, low_res_patches(v, kernel_size),
                     precision=_HIGHEST)
    return out.reshape(batch, out_h, out_w, channels)


def counted_taps(height: int, width: int, kernel_size: int, scale: int, border: str):
    """Boolean (sH, sW, K*K) of the taps that take part in the normalisation, or None (all)."""
    if border == "zeros":
        return None
    mask = inside_taps(height, width, kernel_size)
    return np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)


_H_FUNCTIONS = {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "softplus": jax.nn.softplus}


def normalize(logits, *, normalizer: str, eps: float, counted=None):
    """Kernel weights from logits over the last axis; `counted` masks taps out (border "valid").

    softmax; h / (sum h + eps) with h in relu | sigmoid | softplus; or "none", the logits
    themselves (uncounted taps 0). A window whose h are all 0 gives weights 0, never NaN; a
    NaN or infinite sum passes through (IEEE: NaN in, NaN out).
    """
    if normalizer == "none":
        return logits if counted is None else jnp.where(counted, logits, 0.0)
    if normalizer == "softmax":
        if counted is not None:
            logits = jnp.where(counted, logits, -jnp.inf)
        shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        e = jnp.exp(logits - shift)
        return e / jnp.sum(e, axis=-1, keepdims=True)
    h = _H_FUNCTIONS[normalizer](logits)
    if counted is not None:
        h = jnp.where(counted, h, 0.0)
    denom = jnp.sum(h, axis=-1, keepdims=True) + eps
    # h >= 0 and eps >= 0: the sum is 0 only for an all-zero window (then 0 / 1); a test for
    # `denom > 0` would also swallow a NaN sum.
    return h / jnp.where(denom == 0, 1.0, denom)


def sapa_upsample(q, k, v, *, kernel_size: int, scale: int, normalizer: str, border: str,
                  eps: float):
    """similarity -> normalize -> assemble, in the dtype of the inputs."""
    height, width = k.shape[1:3]
    logits = similarity(q, k, kernel_size=kernel_size, scale=scale)
    counted = counted_taps(height, width, kernel_size, scale, border)
    w = normalize(logits, normalizer=normalizer, eps=eps, counted=counted)
    return assemble(w, v, kernel_size=kernel_size, scale=scale)

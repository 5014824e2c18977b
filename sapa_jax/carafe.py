"""CARAFE core (Content-Aware ReAssembly of FEatures, Wang et al., ICCV 2019) on SAPA's pieces.

CARAFE predicts the K x K upsampling kernels from the decoder feature itself (see
`sapa_jax.carafe_modules`); what is left for the core is SAPA's normalise + assemble, done per
channel group::

    w[l', g, :] = normalise(logits[l', g*K*K : (g+1)*K*K])          one kernel per group g
    out[l', c]  = sum_p w[l', g(c), p] * x[l + p, c],   g(c) = c // (C / groups)

with l = l' // s, taps p row-major (dy outer, dx inner) as in SAPA, x = 0 outside the map and
no renormalisation at the border (mmcv's semantics). docs/design.md section 5.

`impl` routes like `sapa_jax.sapa_upsample`: "xla" is the jnp path below, "ffi" the fused
kernel (`sapa_jax._ffi.carafe_upsample`: normalise + reassemble in one pass, a deterministic
backward without atomics), "auto" the kernel where its module registers the CARAFE targets
and handles the dtype, else the jnp path.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from . import _checks, _ffi, reference
from ._checks import ArrayIn
from .core import resolve_impl


def check_carafe_args(x, logits, *, kernel_size, scale, groups, normalizer, eps, impl) -> dict:
    """Validate the arguments of `carafe_upsample`; returns the normalised static options."""
    kernel_size = _checks.check_int("kernel_size", kernel_size, minimum=1, odd=True)
    scale = _checks.check_int("scale", scale, minimum=1)
    groups = _checks.check_int("groups", groups, minimum=1)
    normalizer = _checks.check_choice("normalizer", normalizer, _checks.NORMALIZERS)
    eps = _checks.check_eps(eps)
    impl = _checks.check_choice("impl", impl, _checks.IMPLS)
    _checks.check_array("x", x)
    _checks.check_array("logits", logits)
    channels = x.shape[-1]
    if channels % groups != 0:
        raise ValueError(
            f"the channels of x must be divisible by groups, got {channels} channels "
            f"(x shape {tuple(x.shape)}) and groups={groups}")
    taps = groups * kernel_size * kernel_size
    if logits.shape[-1] != taps:
        raise ValueError(
            f"logits must have groups * kernel_size**2 = {groups} * {kernel_size}**2 = {taps} "
            f"channels (one per group and tap), got {logits.shape[-1]} "
            f"(logits shape {tuple(logits.shape)})")
    _checks.check_high_low("logits", logits, "x", x, scale)
    return dict(kernel_size=kernel_size, scale=scale, groups=groups, normalizer=normalizer,
                eps=eps, impl=impl)


# ----------------------------------------------------------------------------- back end choice

def resolve_carafe_impl(impl: str, kernel_size: int, dtype, *arrays: ArrayIn) -> str:
    """"xla" or "ffi" for this call: `core.resolve_impl` (the switch, the messages and the
    fallback warning), with "xla" where the platform's module has no CARAFE kernel for this
    call (an old build, or a kernel_size above the back end's limit: CUDA takes K <= 11);
    there impl="ffi" raises a RuntimeError that says so."""
    def kernel_built(platform: str) -> bool:
        limit = _ffi.CARAFE_MAX_KERNEL_SIZE.get(platform)
        return _ffi.carafe_built(platform) and (limit is None or kernel_size <= limit)

    return resolve_impl(impl, dtype, *arrays, operator=f"CARAFE (kernel_size={kernel_size})",
                        kernel_built=kernel_built)


# ----------------------------------------------------------------------------- jnp reference

def reference_carafe(x, logits, *, kernel_size: int, scale: int, groups: int,
                     normalizer: str, eps: float):
    """The jnp CARAFE core on validated arrays in the compute dtype.

    Normalises each group's K*K logits with `reference.normalize` and reassembles with
    `reference.assemble` (SAPA's assembly), the groups folded into the batch axis. Like
    SAPA's reference it materialises the (B, H, W, K*K, C) patches of x.
    """
    batch, out_h, out_w, _ = logits.shape
    height, width, channels = x.shape[1:]
    taps = kernel_size * kernel_size
    w = reference.normalize(logits.reshape(batch, out_h, out_w, groups, taps),
                            normalizer=normalizer, eps=eps)
    if groups == 1:
        return reference.assemble(w[..., 0, :], x, kernel_size=kernel_size, scale=scale)
    # (B, sH, sW, G, K*K) -> (G*B, sH, sW, K*K); (B, H, W, G*Cg) -> (G*B, H, W, Cg)
    per_group = channels // groups
    w = jnp.moveaxis(w, 3, 0).reshape(groups * batch, out_h, out_w, taps)
    v = jnp.moveaxis(x.reshape(batch, height, width, groups, per_group), 3, 0)
    v = v.reshape(groups * batch, height, width, per_group)
    out = reference.assemble(w, v, kernel_size=kernel_size, scale=scale)
    out = jnp.moveaxis(out.reshape(groups, batch, out_h, out_w, per_group), 0, 3)
    return out.reshape(batch, out_h, out_w, channels)


# ----------------------------------------------------------------------------- public core

def carafe_upsample(x: ArrayIn, logits: ArrayIn, *, kernel_size: int = 5, scale: int = 2, groups: int = 1,
                    normalizer: str = "softmax", eps: float = 1e-6,
                    impl: str = "auto") -> jax.Array:
    """CARAFE core: reassemble `x` with per-group kernels normalised from `logits`.

    Args:
      x: low-res feature `(B, H, W, C)`, `C` divisible by `groups`.
      logits: high-res kernel logits `(B, s*H, s*W, groups*K*K)`, already pixel-shuffled
        (channel `g*K*K + p` is tap p of group g); normalised per group inside.
      kernel_size: odd reassembly window K >= 1.
      scale: integer upsampling factor s >= 1.
      groups: channel groups G >= 1; channel c uses the kernel of group c // (C / G).
      normalizer: "softmax" (default, mmcv's), or "relu" | "sigmoid" | "softplus" for
        h / (sum h + eps), as in `sapa_jax.sapa_upsample`.
      eps: the eps of the h-normalisers (unused by softmax).
      impl: "auto" | "xla" | "ffi", as in `sapa_jax.sapa_upsample`.

    Returns:
      `(B, s*H, s*W, C)` in the promoted dtype of x and logits (computed in at least float32).
    """
    opts = check_carafe_args(x, logits, kernel_size=kernel_size, scale=scale, groups=groups,
                             normalizer=normalizer, eps=eps, impl=impl)
    impl = opts.pop("impl")
    compute, out_dtype = _checks.compute_dtype(x, logits)
    if resolve_carafe_impl(impl, opts["kernel_size"], out_dtype, x, logits) == "ffi":
        return _ffi.carafe_upsample(x, logits, **opts)
    x, logits = jnp.asarray(x, compute), jnp.asarray(logits, compute)
    return reference_carafe(x, logits, **opts).astype(out_dtype)


__all__ = ["carafe_upsample", "check_carafe_args", "reference_carafe", "resolve_carafe_impl"]

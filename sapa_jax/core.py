"""Public functional core: `sapa_upsample`, `similarity`, `assemble`, and the backend choice.

`impl="xla"` runs the patch-based jnp reference; `impl="ffi"` the fused C++/CUDA kernels;
`impl="auto"` the kernel when it can run on the platform the computation runs on (built, and on
GPU a new enough driver and a visible device) and handles the dtype, else the jnp path, with one
`FallbackWarning` per platform when a kernel is missing or cannot run there. Set
`SAPA_JAX_IMPL=xla` in the environment to force the jnp path everywhere (a switch for debugging
and for comparing back ends in a whole model).
"""
from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp

from . import _checks, _ffi, reference
from ._checks import ArrayIn


class FallbackWarning(RuntimeWarning):
    """`impl="auto"` runs the pure-jnp path because the fused kernel cannot run here."""


FfiStatus = _ffi.FfiStatus
_warned_fallback: set[str] = set()


def ffi_available(platform: str = "cpu") -> bool:
    """Can the fused FFI kernel run on `platform` ("cpu" or "gpu")?

    True when its module was built and registered and, for "gpu", the CUDA driver supports the
    CUDA version the module was built with and a GPU is visible to the driver and to JAX.
    `ffi_status()` tells "built" from "usable" and says why a kernel cannot run.
    """
    platform = _checks.check_choice("platform", platform, ("cpu", "gpu", "cuda"))
    return _ffi.available("gpu" if platform == "cuda" else platform)


def ffi_status() -> dict[str, FfiStatus]:
    """`{"cpu": FfiStatus(built, usable, reason), "gpu": ...}` for the fused kernels.

    `built`: the compiled module imported and its targets are registered with XLA. `usable`: it
    can also run here (what `ffi_available` returns). `reason`: why not, with the fix ("" when
    usable). The GPU probe (driver and runtime versions, device count) runs once, on first use.
    """
    return {platform: _ffi.status(platform) for platform in _ffi.PLATFORMS}


def _warn_fallback(platform: str, reason: str) -> None:
    """One warning per platform: the silent 10x slower path is what users must not miss."""
    if platform in _warned_fallback or platform not in _ffi.PLATFORMS:
        return
    _warned_fallback.add(platform)
    warnings.warn(
        f"sapa_jax: impl='auto' runs the pure-jnp path on {platform!r}, about 10x slower than "
        f"the fused kernel, which cannot run there: {reason}. Pass impl='xla' (or set "
        f"SAPA_JAX_IMPL=xla) to choose the jnp path explicitly.", FallbackWarning, stacklevel=5)


def _current_platform(*arrays: ArrayIn) -> str:
    """Platform of concrete arrays; under tracing, JAX's default backend."""
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            try:
                return next(iter(x.devices())).platform
            except Exception:  # deleted or otherwise unusual arrays: fall back below
                break
    return jax.default_backend()


def _forced_impl(impl: str) -> str:
    """`impl`, unless the environment switch SAPA_JAX_IMPL overrides it."""
    forced = os.environ.get("SAPA_JAX_IMPL", "").strip().lower()
    return _checks.check_choice("SAPA_JAX_IMPL", forced, _checks.IMPLS) if forced else impl


def resolve_impl(impl: str, dtype: jnp.dtype, *arrays: ArrayIn, operator: str = "SAPA",
                 kernel_built=None) -> str:
    """"xla" or "ffi" for this call (see the module docstring).

    `kernel_built(platform) -> bool`, for an operator whose kernels exist on some platforms
    only: where it answers False, "auto" runs jnp (silently: there is no kernel to miss) and
    "ffi" raises a RuntimeError naming `operator`.
    """
    impl = _forced_impl(impl)
    if impl == "xla":
        return "xla"
    platform = _current_platform(*arrays)
    status = _ffi.status(platform)
    if status.usable and kernel_built is not None and not kernel_built(platform):
        if impl == "ffi":
            raise RuntimeError(
                f"impl='ffi' was asked for, but the {operator} fused kernel is not built for "
                f"platform {platform!r}; use impl='auto' or 'xla'")
        return "xla"
    supported = _ffi.supports_dtype(platform, dtype)
    if impl == "ffi":
        if not status.usable:
            raise RuntimeError(
                f"impl='ffi' was asked for, but the {operator} FFI kernel cannot run on platform "
                f"{platform!r} ({status.reason}); use impl='auto' or 'xla'")
        if not supported:
            raise ValueError(
                f"impl='ffi' on {platform!r} does not support dtype {jnp.dtype(dtype).name}; "
                f"expected one of {_ffi.supported_dtypes(platform)}")
        return "ffi"
    if not status.usable:
        _warn_fallback(platform, status.reason)
        return "xla"
    return "ffi" if supported else "xla"


def sapa_upsample(q: ArrayIn, k: ArrayIn, v: ArrayIn, *, kernel_size: int = 5, scale: int = 2,
                  normalizer: str = "softmax", border: str = "zeros", eps: float = 1e-6,
                  impl: str = "auto") -> jax.Array:
    """SAPA core: upsample `v` with kernels from the similarity of `q` and `k`.

    Args:
      q: high-res queries `(B, s*H, s*W, d)`.
      k: low-res keys `(B, H, W, d)`.
      v: low-res values `(B, H, W, C)`.
      kernel_size: odd window size K >= 1.
      scale: integer upsampling factor s >= 1.
      normalizer: "softmax" (default); "relu" | "sigmoid" | "softplus" for h / (sum h + eps);
        or "none", the logits themselves as the weights (the paper's Table 6 "None" row).
      border: "zeros" (out-of-map taps have logit 0 and count in the normalisation, as the
        official kernels) or "valid" (they are left out of it).
      eps: the eps of the h-normalisers (unused by softmax and none).
      impl: "auto" | "xla" | "ffi" (see module docstring).

    Returns:
      `(B, s*H, s*W, C)` in the promoted dtype of q, k, v (computed in at least float32).
    """
    opts = _checks.check_core_args(q, k, v, kernel_size=kernel_size, scale=scale,
                                   normalizer=normalizer, border=border, eps=eps, impl=impl)
    return sapa_upsample_validated(q, k, v, **opts)


def sapa_upsample_validated(q: ArrayIn, k: ArrayIn, v: ArrayIn, *, kernel_size: int, scale: int,
                            normalizer: str, border: str, eps: float, impl: str) -> jax.Array:
    """`sapa_upsample` on arguments already validated (by `_checks.check_core_args`, or a
    `SAPAConfig` and inputs of consistent shapes): checks nothing, so callers validate once."""
    opts = dict(kernel_size=kernel_size, scale=scale, normalizer=normalizer, border=border,
                eps=eps)
    compute, out_dtype = _checks.compute_dtype(q, k, v)
    if resolve_impl(impl, out_dtype, q, k, v) == "ffi":
        return _ffi.sapa_upsample(q, k, v, **opts)
    q, k, v = (jnp.asarray(a, compute) for a in (q, k, v))
    return reference.sapa_upsample(q, k, v, **opts).astype(out_dtype)


def similarity(q: ArrayIn, k: ArrayIn, *, kernel_size: int = 5, scale: int = 2) -> jax.Array:
    """Logits `(B, s*H, s*W, K*K)` of every output point against its K x K low-res window.

    Tap p = (dy + r) * K + (dx + r) for offsets dy, dx in -r..r; logits of out-of-map taps are 0.
    """
    kernel_size = _checks.check_int("kernel_size", kernel_size, minimum=1, odd=True)
    scale = _checks.check_int("scale", scale, minimum=1)
    _checks.check_query_key(q, k, scale)
    compute, out_dtype = _checks.compute_dtype(q, k)
    q, k = jnp.asarray(q, compute), jnp.asarray(k, compute)
    return reference.similarity(q, k, kernel_size=kernel_size, scale=scale).astype(out_dtype)


def assemble(w: ArrayIn, v: ArrayIn, *, kernel_size: int = 5, scale: int = 2) -> jax.Array:
    """Output `(B, s*H, s*W, C)` = sum over taps of `w[l', p] * v[l + p]` (v = 0 outside)."""
    kernel_size = _checks.check_int("kernel_size", kernel_size, minimum=1, odd=True)
    scale = _checks.check_int("scale", scale, minimum=1)
    _checks.check_array("w", w)
    _checks.check_array("v", v)
    taps = kernel_size * kernel_size
    if w.shape[-1] != taps:
        raise ValueError(
            f"w must have kernel_size**2 = {taps} channels (one per tap), got {w.shape[-1]}")
    _checks.check_high_low("w", w, "v", v, scale)
    compute, out_dtype = _checks.compute_dtype(w, v)
    w, v = jnp.asarray(w, compute), jnp.asarray(v, compute)
    return reference.assemble(w, v, kernel_size=kernel_size, scale=scale).astype(out_dtype)


def normalize(logits: ArrayIn, *, normalizer: str = "softmax", border: str = "zeros",
              eps: float = 1e-6, low_res_shape: tuple[int, int] | None = None,
              scale: int = 2) -> jax.Array:
    """Kernel weights `(B, s*H, s*W, K*K)` from `similarity` logits.

    `low_res_shape=(H, W)` is needed for border="valid" (to know which taps are outside).
    """
    normalizer = _checks.check_choice("normalizer", normalizer, _checks.NORMALIZERS)
    border = _checks.check_choice("border", border, _checks.BORDERS)
    eps = _checks.check_eps(eps)
    scale = _checks.check_int("scale", scale, minimum=1)
    _checks.check_array("logits", logits)
    taps = logits.shape[-1]
    kernel_size = int(round(taps ** 0.5))
    if kernel_size * kernel_size != taps or kernel_size % 2 == 0:
        raise ValueError(f"logits must have K*K channels for an odd K, got {taps}")
    counted = None
    if border == "valid":
        if low_res_shape is None:
            raise ValueError("low_res_shape=(H, W) is required for border='valid', got None")
        height, width = (int(n) for n in low_res_shape)
        if logits.shape[1:3] != (height * scale, width * scale):
            raise ValueError(
                f"logits spatial shape must be scale * low_res_shape = "
                f"{(height * scale, width * scale)}, got {tuple(logits.shape[1:3])}")
        counted = reference.counted_taps(height, width, kernel_size, scale, border)
    compute, out_dtype = _checks.compute_dtype(logits)
    w = reference.normalize(jnp.asarray(logits, compute), normalizer=normalizer, eps=eps,
                            counted=counted)
    return w.astype(out_dtype)

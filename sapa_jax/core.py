"""Public functional core: `sapa_upsample`, `similarity`, `assemble`, and the backend choice.

`impl="xla"` runs the patch-based jnp reference; `impl="ffi"` the fused C++/CUDA kernels;
`impl="auto"` the kernel when it is built for the platform the computation runs on and handles
the dtype, else the jnp path. Set `SAPA_JAX_IMPL=xla` in the environment to force the jnp path
everywhere (a switch for debugging and for comparing back ends in a whole model).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from . import _checks, _ffi, reference


def ffi_available(platform: str = "cpu") -> bool:
    """Is the fused FFI kernel built and registered for `platform` ("cpu" or "gpu")?"""
    platform = _checks.check_choice("platform", platform, ("cpu", "gpu", "cuda"))
    return _ffi.available("gpu" if platform == "cuda" else platform)


def _current_platform(*arrays) -> str:
    """Platform of concrete arrays; under tracing, JAX's default backend."""
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            try:
                return next(iter(x.devices())).platform
            except Exception:  # deleted or otherwise unusual arrays: fall back below
                break
    return jax.default_backend()


def resolve_impl(impl: str, dtype, *arrays) -> str:
    """"xla" or "ffi" for this call (see the module docstring)."""
    forced = os.environ.get("SAPA_JAX_IMPL", "").strip().lower()
    if forced:
        impl = _checks.check_choice("SAPA_JAX_IMPL", forced, _checks.IMPLS)
    if impl == "xla":
        return "xla"
    platform = _current_platform(*arrays)
    supported = _ffi.available(platform) and _ffi.supports_dtype(platform, dtype)
    if impl == "ffi":
        if not _ffi.available(platform):
            raise RuntimeError(
                f"impl='ffi' was asked for, but the SAPA FFI kernel is not built for platform "
                f"{platform!r} ({_ffi.unavailable_reason(platform)}); use impl='auto' or 'xla'")
        if not supported:
            raise ValueError(
                f"impl='ffi' on {platform!r} does not support dtype {jnp.dtype(dtype).name}; "
                f"expected one of {_ffi.supported_dtypes(platform)}")
        return "ffi"
    return "ffi" if supported else "xla"


def sapa_upsample(q, k, v, *, kernel_size: int = 5, scale: int = 2, normalizer: str = "softmax",
                  border: str = "zeros", eps: float = 1e-6, impl: str = "auto"):
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
    impl = opts.pop("impl")
    compute, out_dtype = _checks.compute_dtype(q, k, v)
    if resolve_impl(impl, out_dtype, q, k, v) == "ffi":
        return _ffi.sapa_upsample(q, k, v, **opts)
    q, k, v = (jnp.asarray(a, compute) for a in (q, k, v))
    return reference.sapa_upsample(q, k, v, **opts).astype(out_dtype)


def similarity(q, k, *, kernel_size: int = 5, scale: int = 2):
    """Logits `(B, s*H, s*W, K*K)` of every output point against its K x K low-res window.

    Tap p = (dy + r) * K + (dx + r) for offsets dy, dx in -r..r; logits of out-of-map taps are 0.
    """
    kernel_size = _checks.check_int("kernel_size", kernel_size, minimum=1, odd=True)
    scale = _checks.check_int("scale", scale, minimum=1)
    _checks.check_query_key(q, k, scale)
    compute, out_dtype = _checks.compute_dtype(q, k)
    q, k = jnp.asarray(q, compute), jnp.asarray(k, compute)
    return reference.similarity(q, k, kernel_size=kernel_size, scale=scale).astype(out_dtype)


def assemble(w, v, *, kernel_size: int = 5, scale: int = 2):
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


def normalize(logits, *, normalizer: str = "softmax", border: str = "zeros",
              eps: float = 1e-6, low_res_shape=None, scale: int = 2):
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

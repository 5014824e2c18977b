"""Argument checks shared by the core, the FFI glue and the Flax modules.

Every error names the argument, the value it got and what was expected: `TypeError` for a
wrong type, `ValueError` for a wrong value (DESIGN.md section 1).
"""
from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

NORMALIZERS = ("softmax", "relu", "sigmoid", "softplus", "none")
BORDERS = ("zeros", "valid")
IMPLS = ("auto", "xla", "ffi")
VARIANTS = ("I", "B", "P", "G")


def _describe(value) -> str:
    return f"{value!r} (type {type(value).__name__})"


def check_int(name: str, value, *, minimum: int, odd: bool = False) -> int:
    """A Python/NumPy integer (not bool) >= minimum, odd when asked."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name} must be odd, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)}, got {_describe(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_eps(eps) -> float:
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {_describe(eps)}")
    eps = float(eps)
    if not (eps >= 0.0) or not np.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return eps


def check_array(name: str, x, rank: int = 4):
    """A floating-point array (anything with shape and dtype, tracers included) of `rank`."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{name} must be a JAX or NumPy array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.ndim != rank:
        raise ValueError(
            f"{name} must have rank {rank} (batch, height, width, channels), "
            f"got shape {tuple(x.shape)}")
    return x


def check_high_low(high_name: str, high, low_name: str, low, scale: int) -> None:
    """`high` is (B, s*H, s*W, .) for `low` (B, H, W, .)."""
    if high.shape[0] != low.shape[0]:
        raise ValueError(
            f"{high_name} and {low_name} must have the same batch size, "
            f"got {high.shape[0]} and {low.shape[0]}")
    expected = (low.shape[1] * scale, low.shape[2] * scale)
    if tuple(high.shape[1:3]) != expected:
        raise ValueError(
            f"{high_name} spatial shape must be scale * {low_name} spatial shape = {expected} "
            f"(scale={scale}, {low_name} shape {tuple(low.shape)}), got {tuple(high.shape[1:3])}")


def check_same_low(name_a: str, a, name_b: str, b) -> None:
    if tuple(a.shape[:3]) != tuple(b.shape[:3]):
        raise ValueError(
            f"{name_a} and {name_b} must share (batch, height, width), "
            f"got {tuple(a.shape[:3])} and {tuple(b.shape[:3])}")


def check_query_key(q, k, scale: int) -> None:
    """q (B, s*H, s*W, d) and k (B, H, W, d): arrays of rank 4 with matching shapes."""
    check_array("q", q)
    check_array("k", k)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same number of channels, got {q.shape[-1]} and {k.shape[-1]}")
    check_high_low("q", q, "k", k, scale)


def check_core_args(q, k, v, *, kernel_size, scale, normalizer, border, eps, impl):
    """Validate the arguments of `sapa_upsample`; returns the normalised static options."""
    kernel_size = check_int("kernel_size", kernel_size, minimum=1, odd=True)
    scale = check_int("scale", scale, minimum=1)
    normalizer = check_choice("normalizer", normalizer, NORMALIZERS)
    border = check_choice("border", border, BORDERS)
    eps = check_eps(eps)
    impl = check_choice("impl", impl, IMPLS)
    check_query_key(q, k, scale)
    check_array("v", v)
    check_same_low("k", k, "v", v)
    return dict(kernel_size=kernel_size, scale=scale, normalizer=normalizer, border=border,
                eps=eps, impl=impl)


def compute_dtype(*arrays):
    """The dtype the jnp path computes in: the inputs' promoted dtype, at least float32."""
    dtype = jnp.result_type(*arrays)
    return jnp.promote_types(dtype, jnp.float32), dtype

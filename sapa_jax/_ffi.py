"""FFI glue: loads the compiled kernel modules, registers their handlers with XLA, and wraps
the fused forward/backward in `jax.ffi.ffi_call` + `jax.custom_vjp`.

Knows nothing of Flax. Targets are registered once, at import of `sapa_jax`.
"""
from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# platform as JAX names it -> (extension module, XLA platform name for registration)
_MODULES = {"cpu": ("_sapa_cpu", "cpu"), "gpu": ("_sapa_cuda", "CUDA")}
_SUPPORTED_DTYPES = {"cpu": ("float32", "float64", "bfloat16", "float16"),
                     "gpu": ("float32", "bfloat16", "float16")}
_registered: dict[str, bool] = {}
_reasons: dict[str, str] = {}


def _register(platform: str) -> None:
    module_name, xla_platform = _MODULES[platform]
    try:
        module = importlib.import_module(f"sapa_jax.{module_name}")
    except ImportError as err:
        _registered[platform] = False
        _reasons[platform] = f"extension sapa_jax.{module_name} not importable: {err}"
        return
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform=xla_platform)
    _registered[platform] = True


for _platform in _MODULES:
    _register(_platform)


def available(platform: str) -> bool:
    return _registered.get(platform, False)


def unavailable_reason(platform: str) -> str:
    return _reasons.get(platform, "unknown platform")


def supported_dtypes(platform: str):
    return _SUPPORTED_DTYPES.get(platform, ())


def supports_dtype(platform: str, dtype) -> bool:
    return np.dtype(dtype).name in supported_dtypes(platform)


# Attribute codes of sapa_common.h (sapa::Normalizer, sapa::Border).
_NORMALIZER_CODES = {"softmax": 0, "relu": 1, "sigmoid": 2, "softplus": 3}
_BORDER_CODES = {"zeros": 0, "valid": 1}


class Options(NamedTuple):
    """Static options of one kernel call (hashable: a `nondiff_argnums` of the custom_vjp)."""
    kernel_size: int
    scale: int
    normalizer: int
    border: int
    eps: float

    def attributes(self):
        # XLA matches attribute types exactly: int64 and float32, as the handlers bind them.
        return dict(kernel_size=np.int64(self.kernel_size), scale=np.int64(self.scale),
                    normalizer=np.int64(self.normalizer), border=np.int64(self.border),
                    eps=np.float32(self.eps))


def _acc_dtype(dtype):
    """Accumulation type of the kernels: float64 for float64 inputs, else float32."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def forward_call(q, k, v, opts: Options):
    """One "sapa_forward" call: (out, stats). `broadcast_all` makes vmap add leading dims,
    which the kernel folds into its batch."""
    points = q.shape[:-1]
    results = (jax.ShapeDtypeStruct(points + (v.shape[-1],), q.dtype),
               jax.ShapeDtypeStruct(points + (2,), _acc_dtype(q.dtype)))
    call = jax.ffi.ffi_call("sapa_forward", results, vmap_method="broadcast_all")
    return call(q, k, v, **opts.attributes())


def backward_call(q, k, v, stats, g, opts: Options):
    """One "sapa_backward" call: (dq, dk, dv); the two per-tap scratch outputs are dropped."""
    points = q.shape[:-1]
    taps = opts.kernel_size * opts.kernel_size
    scratch = jax.ShapeDtypeStruct(points + (taps,), _acc_dtype(q.dtype))
    results = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct(v.shape, v.dtype), scratch, scratch)
    call = jax.ffi.ffi_call("sapa_backward", results, vmap_method="broadcast_all")
    dq, dk, dv, _, _ = call(q, k, v, stats, g, **opts.attributes())
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sapa(q, k, v, opts: Options):
    return forward_call(q, k, v, opts)[0]


def _sapa_fwd(q, k, v, opts: Options):
    out, stats = forward_call(q, k, v, opts)
    return out, (q, k, v, stats)


def _sapa_bwd(opts: Options, residuals, g):
    q, k, v, stats = residuals
    return backward_call(q, k, v, stats, g, opts)


_sapa.defvjp(_sapa_fwd, _sapa_bwd)


def sapa_upsample(q, k, v, *, kernel_size, scale, normalizer, border, eps):
    """Fused SAPA core on validated inputs (see `sapa_jax.core.sapa_upsample`).

    q, k, v are cast to their common dtype, which is also the dtype of the result.
    """
    dtype = jnp.result_type(q, k, v)
    q, k, v = (jnp.asarray(a, dtype) for a in (q, k, v))
    opts = Options(int(kernel_size), int(scale), _NORMALIZER_CODES[normalizer],
                   _BORDER_CODES[border], float(eps))
    return _sapa(q, k, v, opts)

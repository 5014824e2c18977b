"""FFI glue: loads the compiled kernel modules, registers their handlers with XLA, and wraps
the fused forward/backward in `jax.ffi.ffi_call` + `jax.custom_vjp`.

Knows nothing of Flax. Targets are registered once, at import of `sapa_jax`.
"""
from __future__ import annotations

import importlib

import jax
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


def sapa_upsample(q, k, v, *, kernel_size, scale, normalizer, border, eps):
    raise NotImplementedError("the fused SAPA kernels are not wired in yet")

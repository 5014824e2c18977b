"""FFI glue: loads the compiled kernel modules, registers their handlers with XLA, and wraps
the fused forward/backward in `jax.ffi.ffi_call` + `jax.custom_vjp`.

Each of the two calls is batch-partitioned (`_partitioning.batch_partitioned`): under `jit` with
a batch-sharded mesh every device runs the kernel on its own shard, and `vmap` folds into the
batch. The calls are plain per-shard functions, so `shard_map` users can call `sapa_upsample`
inside their mapped function directly.

Knows nothing of Flax. Targets are registered once, at import of `sapa_jax`.
"""
from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._partitioning import batch_partitioned

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
_NORMALIZER_CODES = {"softmax": 0, "relu": 1, "sigmoid": 2, "softplus": 3, "none": 4}
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


def _result(shape, dtype, like):
    """Result type of a kernel call, derived from the type of the input `like`.

    Types carry more than shape and dtype: under explicit mesh axes the sharding (the result
    takes the batch sharding of the input; the kernels never mix batch elements), and inside
    `shard_map` the manual axes a value varies over. Deriving the result from the input's own
    aval keeps both, whatever the JAX version calls them.
    """
    aval = jax.typeof(like)
    mesh, spec = aval.sharding.mesh, aval.sharding.spec
    batch = spec[0] if len(spec) else None
    sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(batch, *([None] * (len(shape) - 1))))
    return aval.update(shape=tuple(shape), dtype=jnp.dtype(dtype), sharding=sharding,
                       weak_type=False)


def forward_call(q, k, v, opts: Options):
    """One "sapa_forward" call: (out, stats). `broadcast_all` makes vmap add leading dims,
    which the kernel folds into its batch."""
    points = q.shape[:-1]
    results = (_result(points + (v.shape[-1],), q.dtype, q),
               _result(points + (2,), _acc_dtype(q.dtype), q))
    call = jax.ffi.ffi_call("sapa_forward", results, vmap_method="broadcast_all")
    return call(q, k, v, **opts.attributes())


def backward_call(q, k, v, stats, g, opts: Options):
    """One "sapa_backward" call: (dq, dk, dv); the two per-tap scratch outputs are dropped."""
    points = q.shape[:-1]
    taps = opts.kernel_size * opts.kernel_size
    scratch = _result(points + (taps,), _acc_dtype(q.dtype), q)
    results = (_result(q.shape, q.dtype, q), _result(k.shape, k.dtype, q),
               _result(v.shape, v.dtype, q), scratch, scratch)
    call = jax.ffi.ffi_call("sapa_backward", results, vmap_method="broadcast_all")
    dq, dk, dv, _, _ = call(q, k, v, stats, g, **opts.attributes())
    return dq, dk, dv


@functools.lru_cache(maxsize=None)
def _partitioned_calls(opts: Options):
    """The forward and backward calls for `opts`, batch-partitioned and vmappable."""
    # Closures with plain positional signatures: custom_partitioning binds arguments by name.
    forward = batch_partitioned(lambda q, k, v: forward_call(q, k, v, opts),
                                arg_ranks=(4, 4, 4), out_ranks=(4, 4))
    backward = batch_partitioned(lambda q, k, v, stats, g: backward_call(q, k, v, stats, g, opts),
                                 arg_ranks=(4, 4, 4, 4, 4), out_ranks=(4, 4, 4))
    return forward, backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sapa(q, k, v, opts: Options):
    return _partitioned_calls(opts)[0](q, k, v)[0]


def _sapa_fwd(q, k, v, opts: Options):
    out, stats = _partitioned_calls(opts)[0](q, k, v)
    return out, (q, k, v, stats)


def _sapa_bwd(opts: Options, residuals, g):
    q, k, v, stats = residuals
    return _partitioned_calls(opts)[1](q, k, v, stats, g)


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

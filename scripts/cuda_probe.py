"""Runs every path of the CUDA kernels once on small shapes, for compute-sanitizer.

    compute-sanitizer --tool racecheck python scripts/cuda_probe.py

Forward and backward through `impl="ffi"` on the GPU: the tiled kernels with their preferred
tile, with a 2 x 2 tile cap (several tiles per image, tile edges) and with no channels; the
simple kernels with more taps than a warp has lanes; f32 and bf16. The paths are chosen through
the CUDA module's test-only planner API (`set_planner`), so one process covers them all. Exits
non-zero if a result is not finite. Used by scripts/gpu_check.sh.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import sapa_jax

# name: (planner settings, B, H, W, scale, d, C, K, normalizer, border)
PROBES = {
    "tiled": ({}, 2, 9, 10, 2, 40, 70, 5, "softmax", "zeros"),
    "tiled-cap2": ({"tile_cap": 2}, 2, 5, 6, 2, 40, 70, 3, "relu", "valid"),
    "tiled-no-channels": ({}, 1, 3, 4, 2, 0, 0, 3, "softplus", "zeros"),
    "simple-49-taps": ({"force_simple": True}, 1, 3, 4, 2, 40, 37, 7, "sigmoid", "valid"),
}


def run(name, dtype):
    settings, B, H, W, s, d, C, K, normalizer, border = PROBES[name]
    import sapa_jax._sapa_cuda as cuda_module
    cuda_module.set_planner(**settings)
    rng = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(rng.standard_normal(shape), dtype)
                  for shape in ((B, H * s, W * s, d), (B, H, W, d), (B, H, W, C),
                                (B, H * s, W * s, C)))

    def core(q, k, v):
        return sapa_jax.sapa_upsample(q, k, v, kernel_size=K, scale=s, normalizer=normalizer,
                                      border=border, impl="ffi")

    out, vjp = jax.vjp(core, q, k, v)
    results = (out, *vjp(g))
    finite = all(bool(jnp.isfinite(a.astype(jnp.float32)).all()) for a in results)
    print(f"{name:18s} {jnp.dtype(dtype).name:8s} {'ok' if finite else 'NOT FINITE'}", flush=True)
    return finite


def main():
    if jax.default_backend() != "gpu" or not sapa_jax.ffi_available("gpu"):
        sys.exit(f"needs a GPU and the CUDA module (backend {jax.default_backend()}, "
                 f"ffi_available('gpu') = {sapa_jax.ffi_available('gpu')})")
    ok = [run(name, dtype) for dtype in (jnp.float32, jnp.bfloat16) for name in PROBES]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()

"""Speed and memory of the family's upsamplers side by side: bilinear, CARAFE, SAPA-B (and more).

Whole modules (their projections / encoders included), jit-compiled, x `(B, H, W, C)` -> `(B, sH,
sW, C)`; SAPA also gets the high-res guidance y `(B, sH, sW, C)`. Times forward and
forward+backward (gradients w.r.t. every parameter and the inputs) as medians of repeated runs
after warm-up, in one process so the ratios are measured side by side, and peak memory from
XLA's buffer assignment.

    python benchmarks/bench_family.py                        # CPU preset, f32
    python benchmarks/bench_family.py --preset gpu --rows carafe sapa-b

A new upsampler is one more entry in `ROWS`: a builder `(key, x, y, K, s) -> (params, fn)`
with `fn(params, x, y) -> out`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import median_seconds, peak_bytes  # noqa: E402

import sapa_jax  # noqa: E402
from sapa_jax import _ffi, linen  # noqa: E402

PRESETS = {  # (batch, H, W, scale, C, K): low-res H x W -> (sH, sW)
    "cpu": (2, 32, 32, 2, 64, 5),
    "gpu": (8, 64, 64, 2, 256, 5),
}
SAPA_EMBEDDING_DIM = 32
CARAFE_COMPRESSED = 64  # mmcv's default


def bilinear(key, x, y, kernel_size, scale):
    del key, y, kernel_size
    b, h, w, c = x.shape

    def fn(params, x, y):
        del params, y
        return jax.image.resize(x, (b, h * scale, w * scale, c), "bilinear")
    return {}, fn


def carafe(impl):
    def build(key, x, y, kernel_size, scale):
        del y
        model = linen.CARAFE(scale=scale, kernel_size=kernel_size,
                             compressed_channels=CARAFE_COMPRESSED, impl=impl)
        params = model.init(key, x)["params"]
        return params, lambda params, x, y: model.apply({"params": params}, x)
    return build


def carafe_core(impl):
    """The CARAFE core alone (no compressor or encoder): logits are the first K*K channels of
    y, so the backward computes dlogits as well as dx."""
    def build(key, x, y, kernel_size, scale):
        del key
        taps = kernel_size * kernel_size

        def fn(params, x, y):
            del params
            return sapa_jax.carafe_upsample(x, y[..., :taps], kernel_size=kernel_size,
                                            scale=scale, impl=impl)
        return {}, fn
    return build


def sapa_b(impl):
    def build(key, x, y, kernel_size, scale):
        model = linen.SAPA(variant="B", embedding_dim=SAPA_EMBEDDING_DIM,
                           kernel_size=kernel_size, scale=scale, impl=impl)
        params = model.init(key, y, x)["params"]
        return params, lambda params, x, y: model.apply({"params": params}, y, x)
    return build


ROWS = {
    "bilinear": bilinear,
    "carafe": carafe("auto"),          # the fused CARAFE kernel where built, else jnp
    "carafe (jnp)": carafe("xla"),
    "carafe core": carafe_core("auto"),
    "carafe core (jnp)": carafe_core("xla"),
    "sapa-b": sapa_b("auto"),          # the fused kernel where built, else jnp
    "sapa-b (jnp)": sapa_b("xla"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="shape preset (default: gpu on a GPU backend, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    preset = args.preset or ("gpu" if backend == "gpu" else "cpu")
    batch, height, width, scale, channels, kernel_size = PRESETS[preset]
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (batch, height, width, channels), dtype)
    y = jax.random.normal(keys[1], (batch, height * scale, width * scale, channels), dtype)
    g = jax.random.normal(keys[2], (batch, height * scale, width * scale, channels), dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}, "
          f"fused SAPA kernel: {sapa_jax.ffi_available(backend)}, fused CARAFE kernel: "
          f"{sapa_jax.ffi_available(backend) and _ffi.has_carafe_kernel(backend)}")
    print(f"shape: B={batch}, {height}x{width} -> {height * scale}x{width * scale}, C={channels}, "
          f"K={kernel_size}, dtype={dtype.name}, median of {args.repeats}")

    rows = {}
    for name in args.rows:
        params, fn = ROWS[name](keys[3], x, y, kernel_size, scale)
        params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
        forward = jax.jit(fn)

        def forward_backward(params, x, y, g, fn=fn):
            out, vjp = jax.vjp(fn, params, x, y)
            return out, vjp(g)
        forward_backward = jax.jit(forward_backward)
        rows[name] = {
            "params": sum(a.size for a in jax.tree_util.tree_leaves(params)),
            "forward": median_seconds(forward, (params, x, y), args.repeats),
            "forward+backward": median_seconds(forward_backward, (params, x, y, g),
                                               args.repeats),
            "peak_bytes_forward+backward": peak_bytes(forward_backward, (params, x, y, g)),
        }

    base = rows.get("carafe")
    ratios = f"{'fwd / carafe':>14}{'f+b / carafe':>14}" if base else ""
    print(f"\n{'upsampler':<18}{'params':>9}{'forward ms':>12}{'fwd+bwd ms':>12}"
          f"{'peak fwd+bwd MiB':>18}{ratios}")
    for name, row in rows.items():
        peak = row["peak_bytes_forward+backward"]
        line = (f"{name:<18}{row['params']:>9}{row['forward'] * 1e3:>12.3f}"
                f"{row['forward+backward'] * 1e3:>12.3f}"
                f"{(f'{peak / 2**20:.1f}' if peak else '-'):>18}")
        if base:
            line += (f"{row['forward'] / base['forward']:>14.2f}"
                     f"{row['forward+backward'] / base['forward+backward']:>14.2f}")
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"device": device.device_kind, "dtype": dtype.name,
                                         "preset": preset, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Speed and memory of the SAPA-D core beside the SAPA-B and CARAFE cores at the same shapes.

Each core runs on its fused kernel ("ffi", where one is built for the platform) and on its jnp
path ("xla"). Same method as bench_core.py (its timing and XLA memory accounting are reused):
jit-compiled forward and forward+backward, median of repeated runs, peak = arguments + outputs
+ temporaries of each compiled program (a custom call's internal buffers are not counted).
SAPA-D reads P points x 4 corners per group where SAPA reads K*K window taps, so P = 9 sits
between K = 3 (9 taps) and K = 5 (25 taps) in work; CARAFE (G = 1) reads K*K taps of x only.

    python benchmarks/bench_deform.py                  # CPU preset, f32
    python benchmarks/bench_deform.py --preset gpu
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp

import sapa_jax
from bench_core import median_seconds, peak_bytes

PRESETS = {  # (batch, H, W, scale, C, groups, E, P, K of the SAPA row)
    "cpu": (2, 32, 32, 2, 64, 4, 8, 9, 5),
    "gpu": (8, 64, 64, 2, 256, 4, 32, 9, 5),
}


def programs(fn):
    def forward_backward(*args):
        out, vjp = jax.vjp(fn, *args[:-1])
        return out, vjp(args[-1])
    return jax.jit(fn), jax.jit(forward_backward)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    preset = args.preset or ("gpu" if backend == "gpu" else "cpu")
    batch, height, width, s, channels, groups, dim, points, ksize = PRESETS[preset]
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 6)
    high, low = (batch, height * s, width * s), (batch, height, width)
    q = jax.random.normal(keys[0], (*high, groups * dim), dtype)
    k = jax.random.normal(keys[1], (*low, groups * dim), dtype)
    v = jax.random.normal(keys[2], (*low, channels), dtype)
    offsets = 1.5 * jax.random.normal(keys[3], (*high, groups * points * 2), dtype)
    g = jax.random.normal(keys[4], (*high, channels), dtype)
    print(f"device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}")
    print(f"shape: B={batch}, {height}x{width} -> {height * s}x{width * s}, C={channels}, "
          f"SAPA-D G={groups} E={dim} P={points}; SAPA d={groups * dim} K={ksize}; "
          f"dtype={dtype.name}, median of {args.repeats}")

    carafe_logits = jax.random.normal(keys[5], (*high, ksize * ksize), dtype)
    cases = {}
    for impl, label in (("ffi", "fused"), ("xla", "jnp")):
        cases[f"SAPA-D ({label})"] = (
            lambda q, k, v, o, impl=impl: sapa_jax.deform_upsample(
                q, k, v, o, num_points=points, groups=groups, scale=s, impl=impl),
            (q, k, v, offsets))
        cases[f"SAPA-B K={ksize} ({label})"] = (
            lambda q, k, v, impl=impl: sapa_jax.sapa_upsample(q, k, v, kernel_size=ksize,
                                                              scale=s, impl=impl),
            (q, k, v))
        cases[f"CARAFE K={ksize} ({label})"] = (
            lambda x, w, impl=impl: sapa_jax.carafe_upsample(x, w, kernel_size=ksize, scale=s,
                                                             impl=impl),
            (v, carafe_logits))
    rows = {}
    for name, (fn, inputs) in cases.items():
        try:
            jax.block_until_ready(fn(*inputs))
        except RuntimeError as err:  # no fused kernel for this core on this platform
            print(f"{name}: skipped ({str(err).split(';')[0]})")
            continue
        forward, forward_backward = programs(fn)
        rows[name] = {
            "forward": median_seconds(forward, inputs, args.repeats),
            "forward+backward": median_seconds(forward_backward, (*inputs, g), args.repeats),
            "peak_bytes_forward": peak_bytes(forward, inputs),
            "peak_bytes_forward+backward": peak_bytes(forward_backward, (*inputs, g)),
        }
    print(f"\n{'core':<24}{'forward ms':>12}{'fwd+bwd ms':>12}{'peak fwd MiB':>14}"
          f"{'peak fwd+bwd MiB':>18}")
    mib = lambda b: f"{b / 2**20:.1f}" if b else "-"
    for name, row in rows.items():
        print(f"{name:<24}{row['forward'] * 1e3:>12.3f}{row['forward+backward'] * 1e3:>12.3f}"
              f"{mib(row['peak_bytes_forward']):>14}{mib(row['peak_bytes_forward+backward']):>18}")
    if args.json:
        args.json.write_text(json.dumps({"preset": preset, "dtype": dtype.name, "rows": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

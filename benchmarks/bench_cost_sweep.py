"""How the fused CPU kernel's cost grows: one parameter at a time around the CPU preset.

Sweeps K (3, 5, 7, 9), s (2, 4), C (16 ... 512), the low-res resolution (32 ... 256) and the
batch, forward and forward+backward (impl="ffi", float32), each point the median of a few
jit-compiled runs, each beside an XLA f32 matmul (1024^3) measured right before it: on a shared
machine the fraction of that neighbouring matmul is what means something. Nominal flops are
2 K^2 P (d + C) forward (P = output points) and 3x that forward+backward, as in
bench_cpu_roofline.py. Draws docs/cost_sweep.png: time against nominal flops with the matmul
line (time the same flops would take at matmul's rate), and per swept parameter the fraction
of matmul reached.

    python benchmarks/bench_cost_sweep.py                      # 31 repeats, minutes on 2 cores
    python benchmarks/bench_cost_sweep.py --repeats 5 --json sweep.json   # a quick look

With 5 repeats one noisy VM gave 11-38% of matmul for the same preset point from sweep to sweep;
31 on a quiet AVX-512 machine kept it within 26.5-28.5% (forward) across the sweeps.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bench_core import make_programs, median_seconds
from bench_cpu_roofline import PRESET, matmul_gflops

SWEEPS = {  # the preset's value of each parameter is in its list
    "kernel_size": [3, 5, 7, 9],
    "scale": [2, 4],
    "channels": [16, 64, 128, 256, 512],
    "resolution": [32, 64, 128, 256],
    "batch": [1, 2, 4, 8],
}


def measure(point, repeats, rng):
    """(forward flops, forward seconds, fwd+bwd seconds) of one configuration."""
    batch, res, scale, dim, channels, kernel_size = (point[n] for n in (
        "batch", "resolution", "scale", "dim", "channels", "kernel_size"))
    out = res * scale
    shapes = [(batch, out, out, dim), (batch, res, res, dim), (batch, res, res, channels),
              (batch, out, out, channels)]
    q, k, v, g = (jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    q, k = q * dim ** -0.25, k * dim ** -0.25
    fwd, fwd_bwd = make_programs("ffi", kernel_size, scale)
    flops = 2.0 * kernel_size ** 2 * batch * out * out * (dim + channels)
    return (flops, median_seconds(fwd, (q, k, v), repeats, warmup=1),
            median_seconds(fwd_bwd, (q, k, v, g), repeats, warmup=1))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax = axes[0, 0]
    for mode, marker in (("forward", "o"), ("fwd_bwd", "s")):
        flops = np.array([r["flops"] * (3 if mode == "fwd_bwd" else 1) for r in rows])
        secs = np.array([r[mode + "_s"] for r in rows])
        ax.loglog(flops, secs * 1e3, marker, label=f"ffi {mode.replace('_', '+')}", alpha=0.7)
    matmul = float(np.median([r["matmul_gflops"] for r in rows]))
    span = np.geomspace(min(r["flops"] for r in rows), 3 * max(r["flops"] for r in rows), 50)
    ax.loglog(span, span / (matmul * 1e9) * 1e3, "k--", label=f"matmul rate (median {matmul:.0f} GFLOP/s)")
    ax.loglog(span, span / (0.35 * matmul * 1e9) * 1e3, "k:", label="35% of matmul")
    ax.set_xlabel("nominal flops")
    ax.set_ylabel("ms")
    ax.set_title("time against nominal flops (all sweeps)")
    ax.legend(fontsize=8)
    for ax, name in zip(axes.flat[1:], SWEEPS):
        sel = sorted((r for r in rows if r["sweep"] == name), key=lambda r: r[name])
        x = [r[name] for r in sel]
        for mode, marker in (("forward", "o-"), ("fwd_bwd", "s-")):
            mult = 3 if mode == "fwd_bwd" else 1
            frac = [100 * mult * r["flops"] / r[mode + "_s"] / 1e9 / r["matmul_gflops"]
                    for r in sel]
            ax.plot(x, frac, marker, label=mode.replace("_", "+"))
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(name + (" (low-res H = W)" if name == "resolution" else ""))
        ax.set_ylabel("% of the neighbouring matmul's GFLOP/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"sweep over {name}")
        ax.legend(fontsize=8)
    batch, height, _, scale, dim, channels, kernel_size = PRESET
    fig.suptitle(f"SAPA fused CPU kernel (float32), one parameter at a time around B={batch}, "
                 f"{height}x{height}->{height * scale}x{height * scale}, d={dim}, C={channels}, "
                 f"K={kernel_size}; each point against a matmul measured beside it")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--png", type=str,
                        default=str(Path(__file__).resolve().parents[1] / "docs" / "cost_sweep.png"))
    args = parser.parse_args(argv)

    batch, height, _, scale, dim, channels, kernel_size = PRESET
    preset = dict(batch=batch, resolution=height, scale=scale, dim=dim, channels=channels,
                  kernel_size=kernel_size)
    rng = np.random.default_rng(0)
    rows = []
    for name, values in SWEEPS.items():
        for value in values:
            point = {**preset, name: value}
            matmul = matmul_gflops(1024, args.repeats)
            flops, t_fwd, t_both = measure(point, args.repeats, rng)
            rows.append(dict(point, sweep=name, flops=flops, forward_s=t_fwd, fwd_bwd_s=t_both,
                             matmul_gflops=matmul))
            print(f"{name:12s} {value:4d}: forward {t_fwd * 1e3:8.2f} ms "
                  f"({100 * flops / t_fwd / 1e9 / matmul:5.1f}% of matmul), fwd+bwd "
                  f"{t_both * 1e3:8.2f} ms ({100 * 3 * flops / t_both / 1e9 / matmul:5.1f}%), "
                  f"matmul {matmul:.0f} GFLOP/s",
                  flush=True)
    plot(rows, args.png)
    print(f"wrote {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

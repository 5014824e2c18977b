"""Speed and memory of the SAPA core: fused FFI kernel vs the jnp path (and PyTorch if present).

Times forward and forward+backward (median of repeated runs after warm-up, jit-compiled), reports
peak memory from XLA's buffer assignment of each compiled program (arguments + outputs + temps),
and on GPU the achieved forward bandwidth against the HBM line (docs/design.md §3).

    python benchmarks/bench_core.py                    # CPU preset, f32
    python benchmarks/bench_core.py --preset gpu --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import sapa_jax

PRESETS = {  # (batch, H, W, scale, d, C, K): low-res H x W -> (sH, sW)
    "cpu": (2, 32, 32, 2, 32, 64, 5),
    "gpu": (8, 64, 64, 2, 32, 256, 5),
}
# HBM bandwidth in GB/s by device kind substring (vendor figures).
BANDWIDTH_LINES = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def median_seconds(fn, args, repeats: int, warmup: int = 2, clock=time.perf_counter) -> float:
    """Median over `repeats` calls; `clock=time.process_time` counts this process's CPU time
    (all its threads), which other work on a shared machine disturbs less than wall time."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = clock()
        jax.block_until_ready(fn(*args))
        times.append(clock() - start)
    return statistics.median(times)


def peak_bytes(fn, args) -> int | None:
    """Arguments + outputs + temporaries of the compiled program (XLA's own accounting)."""
    analysis = fn.lower(*args).compile().memory_analysis()
    if analysis is None:
        return None
    return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def make_programs(impl: str, kernel_size: int, scale: int):
    def forward(q, k, v):
        return sapa_jax.sapa_upsample(q, k, v, kernel_size=kernel_size, scale=scale, impl=impl)

    def forward_backward(q, k, v, g):
        out, vjp = jax.vjp(forward, q, k, v)
        return out, vjp(g)

    return jax.jit(forward), jax.jit(forward_backward)


def torch_row(arrays, kernel_size, scale, repeats, device):
    """The PyTorch reference of the test suite (unfold based), timed the same way."""
    try:
        import torch
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from torch_reference import sapa_core_torch
    except ImportError:
        return None
    dev = torch.device(device)
    q, k, v, g = (torch.tensor(np.asarray(a, np.float32), device=dev) for a in arrays)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            return sapa_core_torch(q, k, v, kernel_size, scale)

    def forward_backward():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = sapa_core_torch(qq, kk, vv, kernel_size, scale)
        out.backward(g)
        return qq.grad

    row = {}
    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        for _ in range(2):
            fn(); sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter(); fn(); sync()
            times.append(time.perf_counter() - start)
        row[name] = statistics.median(times)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="shape preset (default: gpu on a GPU backend, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    preset = args.preset or ("gpu" if backend == "gpu" else "cpu")
    batch, height, width, scale, dim, channels, kernel_size = PRESETS[preset]
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (batch, height * scale, width * scale, dim), dtype)
    k = jax.random.normal(keys[1], (batch, height, width, dim), dtype)
    v = jax.random.normal(keys[2], (batch, height, width, channels), dtype)
    g = jax.random.normal(keys[3], (batch, height * scale, width * scale, channels), dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}")
    print(f"shape: B={batch}, {height}x{width} -> {height * scale}x{width * scale}, d={dim}, "
          f"C={channels}, K={kernel_size}, dtype={dtype.name}, median of {args.repeats}")

    moved = sum(a.size * a.dtype.itemsize for a in (q, k, v)) + g.size * g.dtype.itemsize
    line = next((bw for name, bw in BANDWIDTH_LINES.items() if name in device.device_kind), None)
    impls = ["xla"] + (["ffi"] if sapa_jax.ffi_available(backend) else [])
    rows = {}
    for impl in impls:
        forward, forward_backward = make_programs(impl, kernel_size, scale)
        rows[impl] = {
            "forward": median_seconds(forward, (q, k, v), args.repeats),
            "forward+backward": median_seconds(forward_backward, (q, k, v, g), args.repeats),
            "peak_bytes_forward": peak_bytes(forward, (q, k, v)),
            "peak_bytes_forward+backward": peak_bytes(forward_backward, (q, k, v, g)),
        }
    if not args.no_torch:
        torch_device = "cuda" if backend == "gpu" else "cpu"
        row = torch_row((q, k, v, g), kernel_size, scale, args.repeats, torch_device)
        if row is not None:
            rows["torch (f32)"] = row

    print(f"\n{'impl':<12}{'forward ms':>12}{'fwd+bwd ms':>12}{'peak fwd MiB':>14}"
          f"{'peak fwd+bwd MiB':>18}{'fwd GB/s':>10}")
    for impl, row in rows.items():
        mib = lambda b: f"{b / 2**20:.1f}" if b else "-"
        gbs = moved / row["forward"] / 1e9
        print(f"{impl:<12}{row['forward'] * 1e3:>12.3f}{row['forward+backward'] * 1e3:>12.3f}"
              f"{mib(row.get('peak_bytes_forward')):>14}"
              f"{mib(row.get('peak_bytes_forward+backward')):>18}{gbs:>10.1f}")
    if "ffi" in rows:
        fast, slow = rows["ffi"], rows["xla"]
        print(f"\nffi vs xla: forward {slow['forward'] / fast['forward']:.2f}x faster, "
              f"forward+backward {slow['forward+backward'] / fast['forward+backward']:.2f}x faster, "
              f"peak memory fwd+bwd {fast['peak_bytes_forward+backward'] / slow['peak_bytes_forward+backward']:.3f}x")
        if backend == "gpu" and line:
            gbs = moved / fast["forward"] / 1e9
            print(f"fused forward: {gbs:.0f} GB/s = {100 * gbs / line:.0f}% of the {line:.0f} GB/s "
                  f"HBM line of {device.device_kind}")
    if args.json:
        args.json.write_text(json.dumps({"device": device.device_kind, "dtype": dtype.name,
                                         "preset": preset, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

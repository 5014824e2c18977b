"""The fused CPU kernel against the machine: GFLOP/s as a fraction of XLA's own f32 matmul.

Measured side by side in one process (so a busy or shared machine affects both alike):
  matmul     XLA f32 (M x M) @ (M x M), 2 M^3 flops: the machine's practical dense peak
  forward    impl="ffi" at the preset, nominal flops 2 K^2 P (d + C), P = output points
  fwd+bwd    jit(vjp), nominal 3x the forward's flops
for f32 and bf16 inputs at the SIMD level chosen at load, f32 at every other level the machine
has (--levels), f32 on one worker against two (the 2-core scaling, calls interleaved), and the
interleaved ffi-vs-xla ratio: forward+backward calls of both impls alternate, as when a model
mixes them, and the ratio of their median times is reported.

--cpu-time adds the same fractions in CPU time per call (time.process_time, every thread of
the process) with the kernel on one worker: flops per CPU-second of the kernel against flops
per CPU-second of the matmul. On a machine shared with other work that measure moves much
less than wall time (a descheduled thread costs no CPU time); it is not a substitute for it.

    python benchmarks/bench_cpu_roofline.py                 # CPU preset (issue 10's targets)
    python benchmarks/bench_cpu_roofline.py --repeats 50 --levels --cpu-time --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sapa_jax
from sapa_jax import _sapa_cpu
from bench_core import make_programs, median_seconds  # one timing rule for both scripts

PRESET = (2, 32, 32, 2, 32, 64, 5)  # batch, H, W, s, d, C, K (the CPU preset)


def matmul_gflops(size, repeats):
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    return 2.0 * size ** 3 / median_seconds(f, (a, a), repeats) / 1e9


def cpu_seconds(fn, args, repeats):
    """Median CPU time of the process per call (all its threads)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.process_time() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--levels", action="store_true",
                        help="also f32 at every other SIMD level this machine has")
    parser.add_argument("--cpu-time", action="store_true",
                        help="also the fractions in CPU time, the kernel on one worker")
    args = parser.parse_args(argv)

    batch, height, width, scale, dim, channels, kernel_size = PRESET
    points = batch * height * scale * width * scale
    forward_flops = 2.0 * kernel_size ** 2 * points * (dim + channels)
    rng = np.random.default_rng(0)
    shapes = [(batch, height * scale, width * scale, dim), (batch, height, width, dim),
              (batch, height, width, channels), (batch, height * scale, width * scale, channels)]
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    base[0] *= dim ** -0.25
    base[1] *= dim ** -0.25

    print(f"devices: {jax.devices()}  preset B={batch} {height}x{width}->{height * scale}x"
          f"{width * scale} d={dim} C={channels} K={kernel_size}")
    matmul = matmul_gflops(args.matmul_size, args.repeats)
    print(f"XLA f32 matmul {args.matmul_size}^3: {matmul:.1f} GFLOP/s")
    best = _sapa_cpu.simd_level()
    print(f"SIMD level chosen at load: {best} (available: {_sapa_cpu.simd_levels()})")
    rows = {"matmul_gflops": matmul, "preset": PRESET, "simd_level": best}
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v, g = (jnp.asarray(a, dtype) for a in base)
        fwd, fwd_bwd = make_programs("ffi", kernel_size, scale)
        t_fwd = median_seconds(fwd, (q, k, v), args.repeats)
        t_both = median_seconds(fwd_bwd, (q, k, v, g), args.repeats)
        gf_fwd, gf_both = forward_flops / t_fwd / 1e9, 3 * forward_flops / t_both / 1e9
        name = jnp.dtype(dtype).name
        print(f"ffi {name:8s} forward {t_fwd * 1e3:7.2f} ms {gf_fwd:6.1f} GFLOP/s "
              f"({100 * gf_fwd / matmul:4.1f}% of matmul)   fwd+bwd {t_both * 1e3:7.2f} ms "
              f"{gf_both:6.1f} GFLOP/s ({100 * gf_both / matmul:4.1f}% of matmul)")
        rows[name] = dict(forward_ms=t_fwd * 1e3, forward_gflops=gf_fwd,
                          forward_fraction=gf_fwd / matmul, fwd_bwd_ms=t_both * 1e3,
                          fwd_bwd_gflops=gf_both, fwd_bwd_fraction=gf_both / matmul)

    q, k, v, g = (jnp.asarray(a) for a in base)
    fwd, fwd_bwd = make_programs("ffi", kernel_size, scale)
    # Scaling: f32 on one worker and on two, the calls interleaved (so load affects both alike).
    by_workers = {1: ([], []), 2: ([], [])}
    jax.block_until_ready((fwd(q, k, v), fwd_bwd(q, k, v, g)))
    for _ in range(args.repeats):
        for workers, (t_f, t_b) in by_workers.items():
            _sapa_cpu.set_max_workers(workers)
            try:
                t_f.append(median_seconds(fwd, (q, k, v), 1, warmup=0))
                t_b.append(median_seconds(fwd_bwd, (q, k, v, g), 1, warmup=0))
            finally:
                _sapa_cpu.set_max_workers(0)
    scaling = {}
    for workers, (t_f, t_b) in by_workers.items():
        gf_fwd = forward_flops / statistics.median(t_f) / 1e9
        gf_both = 3 * forward_flops / statistics.median(t_b) / 1e9
        scaling[workers] = (gf_fwd, gf_both)
        rows[f"float32_{workers}_workers"] = dict(forward_gflops=gf_fwd, fwd_bwd_gflops=gf_both)
    print("ffi float32 by workers: " + "   ".join(
        f"{w} worker{'s' * (w > 1)}: forward {f:6.1f} GFLOP/s, fwd+bwd {b:6.1f} GFLOP/s"
        for w, (f, b) in scaling.items()) + f"   (2 vs 1: forward "
        f"{scaling[2][0] / scaling[1][0]:.2f}x, fwd+bwd {scaling[2][1] / scaling[1][1]:.2f}x)")
    if args.levels:
        for level in _sapa_cpu.simd_levels():
            if level == best:
                continue
            _sapa_cpu.set_simd_level(level)
            try:
                t_fwd = median_seconds(fwd, (q, k, v), args.repeats)
                t_both = median_seconds(fwd_bwd, (q, k, v, g), args.repeats)
            finally:
                _sapa_cpu.set_simd_level("auto")
            gf_fwd, gf_both = forward_flops / t_fwd / 1e9, 3 * forward_flops / t_both / 1e9
            print(f"ffi float32 at {level:8s} forward {gf_fwd:6.1f} GFLOP/s "
                  f"({100 * gf_fwd / matmul:4.1f}%)   fwd+bwd {gf_both:6.1f} GFLOP/s "
                  f"({100 * gf_both / matmul:4.1f}%)")
            rows[f"float32_{level}"] = dict(forward_fraction=gf_fwd / matmul,
                                            fwd_bwd_fraction=gf_both / matmul)
    if args.cpu_time:
        size = args.matmul_size
        a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
        matmul_cpu = 2.0 * size ** 3 / cpu_seconds(jax.jit(lambda a, b: a @ b), (a, a),
                                                   args.repeats) / 1e9
        _sapa_cpu.set_max_workers(1)
        try:
            c_fwd = forward_flops / cpu_seconds(fwd, (q, k, v), args.repeats) / 1e9
            c_both = 3 * forward_flops / cpu_seconds(fwd_bwd, (q, k, v, g), args.repeats) / 1e9
        finally:
            _sapa_cpu.set_max_workers(0)
        print(f"CPU time: matmul {matmul_cpu:.1f} GFLOP/CPU-s; ffi float32 (one worker) forward "
              f"{c_fwd:.1f} ({100 * c_fwd / matmul_cpu:4.1f}%), fwd+bwd {c_both:.1f} "
              f"({100 * c_both / matmul_cpu:4.1f}%)")
        rows["cpu_time"] = dict(matmul_gflops=matmul_cpu, forward_fraction=c_fwd / matmul_cpu,
                                fwd_bwd_fraction=c_both / matmul_cpu)

    # Interleaved: ffi and xla forward+backward alternate call by call.
    programs = {impl: make_programs(impl, kernel_size, scale)[1] for impl in ("ffi", "xla")}
    times = {"ffi": [], "xla": []}
    for fn in programs.values():
        jax.block_until_ready(fn(q, k, v, g))
    for _ in range(args.repeats):
        for impl, fn in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v, g))
            times[impl].append(time.perf_counter() - start)
    ratio = statistics.median(times["xla"]) / statistics.median(times["ffi"])
    print(f"interleaved fwd+bwd f32: ffi {statistics.median(times['ffi']) * 1e3:.2f} ms, "
          f"xla {statistics.median(times['xla']) * 1e3:.2f} ms: ffi is {ratio:.2f}x faster")
    rows["interleaved_xla_over_ffi"] = ratio
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

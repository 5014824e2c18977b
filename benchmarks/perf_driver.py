"""A small driver for `perf stat` / `perf record` of the fused SAPA CPU kernel at the CPU preset.

Compiles and warms up first, then runs `--calls` calls of the forward (or forward+backward) on
`--workers` workers (0: the pool's size), and, under perf's --control, counts only those calls:

    mkfifo /tmp/ctl /tmp/ack
    perf stat -D -1 --control fifo:/tmp/ctl,/tmp/ack -e task-clock,context-switches,page-faults \
        python benchmarks/perf_driver.py --mode fwd --workers 1 --control /tmp/ctl,/tmp/ack

Without --control it just runs (for perf record of the whole process, or a plain timing).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from sapa_jax import _sapa_cpu
from bench_cpu_roofline import PRESET
from bench_core import make_programs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("fwd", "both"), default="fwd")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--control", type=str, default=None, help="ctl,ack fifos of perf")
    args = parser.parse_args(argv)
    batch, height, width, scale, dim, channels, kernel_size = PRESET
    rng = np.random.default_rng(0)
    shapes = [(batch, height * scale, width * scale, dim), (batch, height, width, dim),
              (batch, height, width, channels), (batch, height * scale, width * scale, channels)]
    q, k, v, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
    fwd, fwd_bwd = make_programs("ffi", kernel_size, scale)
    fn, call_args = (fwd, (q, k, v)) if args.mode == "fwd" else (fwd_bwd, (q, k, v, g))
    _sapa_cpu.set_max_workers(args.workers)
    for _ in range(20):
        jax.block_until_ready(fn(*call_args))
    ctl = ack = None
    if args.control:
        ctl_path, ack_path = args.control.split(",")
        ctl, ack = open(ctl_path, "w"), open(ack_path, "r")
        ctl.write("enable\n")
        ctl.flush()
        ack.readline()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.calls):
        jax.block_until_ready(fn(*call_args))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if ctl:
        ctl.write("disable\n")
        ctl.flush()
        ack.readline()
    points = batch * height * scale * width * scale
    flops = 2.0 * kernel_size ** 2 * points * (dim + channels) * (1 if args.mode == "fwd" else 3)
    print(f"{args.mode} workers={args.workers}: {wall / args.calls * 1e3:.3f} ms wall/call, "
          f"{cpu / args.calls * 1e3:.3f} ms CPU/call, {flops / (wall / args.calls) / 1e9:.1f} "
          f"GFLOP/s wall, {flops / (cpu / args.calls) / 1e9:.1f} GFLOP/CPU-s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The CUDA kernels (xla_ffi/sapa_cuda.cu, xla_ffi/cuda/), run on the CPU and checked against the
jnp reference.

There is no GPU on the development machine nor in CI, so nvcc only proves that the CUDA source
compiles. This test runs the *same source* on the CPU: tests/cuda_emulator/transform.py rewrites
the two constructs a header cannot emulate (the `extern __shared__` declaration and the
`kernel<T><<<...>>>(...)` launches), and g++ compiles the result against shim headers
(tests/cuda_emulator/include/) that provide blocks, threads, `__syncthreads`, `__syncwarp`,
`__shfl_xor_sync`, dynamic shared memory, the bf16/f16 types and the runtime calls the planner
makes. The entry points of xla_ffi/cuda/entry.h (validation, tile planner, launches, kernels) are
called through a small pybind11 module, and the outputs and dq/dk/dv are compared with the float64
`sapa_upsample(..., impl="xla")`.

What it catches: index and halo arithmetic, tiling and tile edges, the grid-stride loops,
channel chunking and tails, normaliser and border logic, bf16/f16 conversion, f32 accuracy,
reads of shared memory that was never staged (it is NaN-filled before every block), writes
past the end of dynamic shared memory (a NaN guard), reads and writes outside the global buffers
(every buffer sits between NaN guards that must come back untouched), barriers a warp does not
agree on (reported as a deadlock), launches that exceed the shared memory they opted in to, the
error path of malformed calls, and, through UBSan, misaligned vector loads and stores (which x86
would tolerate and a GPU would not), out-of-range indices into fixed-size arrays and int overflow
in the index arithmetic.

Races: the emulator can run the threads of every barrier interval, and the blocks of a grid, in
order, reversed or shuffled. Race-free kernels give bitwise-equal results under every schedule,
and the tests require that. They also drop each barrier of the source in turn and require some
schedule to notice, so every barrier is shown to be needed and the check is shown to see a
missing one.

What it does NOT catch: races whose outcome happens to be the same either way, memory
coalescing, bank conflicts, register pressure, the real shared-memory and occupancy limits of a
given GPU beyond the H100 numbers the shim reports, fast-math intrinsics differences, and speed.
The tests marked `gpu` in test_gpu.py remain the only check on real hardware.

The emulator is built once per session into a temporary directory (g++ -O1, a few seconds).
The test is skipped when g++ or pybind11 is missing, and FAILS when the transform no longer
matches the CUDA source, so a changed .cu can never be tested stale.
"""
from __future__ import annotations

import functools

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sapa_jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cuda_emulator import build as emu_build  # noqa: E402
import kernel_cases  # noqa: E402
from kernel_cases import Case  # noqa: E402

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # jax depends on ml_dtypes, so this is only a safety net
    BF16 = None

NORMALIZERS = sapa_jax._checks.NORMALIZERS
BORDERS = ("zeros", "valid")
# Max abs error over max |reference|. f32: the kernels accumulate in f32 in a different order
# than the float64 reference (measured <= 8.6e-6). bf16/f16: one rounding of every stored
# value (inputs are rounded identically for both sides), 2^-9 and 2^-12 relative.
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3, BF16: 1e-2}
RESULT_NAMES = ("out", "stats", "dq", "dk", "dv", "w_scratch", "dlogit_scratch")
GUARD = 1024


@pytest.fixture
def emu(emu_module, capfd):
    """The emulator with its default schedule and every barrier in place; fails on UBSan."""
    yield from kernel_cases.emulator_in_default_state(emu_module, capfd, "CUDA")


@pytest.fixture
def env(emu_module):
    """The emulator with the planner settings cleared; the test sets the ones it needs
    (set_knobs), and they are cleared again after it."""
    set_knobs(emu_module, {})
    yield emu_module
    set_knobs(emu_module, {})


def set_knobs(env, knobs):
    """Exactly these planner settings (keyword arguments of the module's set_planner, the API
    the CUDA module has for tests: force_simple, tile_cap)."""
    env.set_planner(**knobs)


def guarded(shape, dtype, fill=None):
    """A C-contiguous array of `shape` that sits inside a larger buffer, with a NaN guard as large
    as the array itself (at least GUARD elements) on each side. The kernels must not write the
    guards (checked by `guards_intact`), and a read of them poisons the result with NaN."""
    n = int(np.prod(shape))
    pad = max(GUARD, n)
    base = np.full(n + 2 * pad, np.nan, dtype)
    view = base[pad:pad + n].reshape(shape)
    if fill is not None:
        view[...] = fill
    return view


def guards_intact(view):
    base = view.base
    pad = (base.size - view.size) // 2
    fresh = np.full(pad, np.nan, base.dtype).view(np.uint8)
    return all(np.array_equal(part.view(np.uint8), fresh) for part in (base[:pad], base[-pad:]))


def run_emulated(emu, q, k, v, g, K, s, normalizer, border, eps):
    """Forward then backward through the emulated FFI handlers, every buffer guarded and the
    outputs NaN-filled; returns out, stats, dq, dk, dv, w_scratch, dlogit_scratch."""
    lead, oH, oW = q.shape[:-3], q.shape[-3], q.shape[-2]
    T, C = K * K, v.shape[-1]
    q, k, v, g = (guarded(a.shape, a.dtype, a) for a in (q, k, v, g))
    out = guarded(lead + (oH, oW, C), q.dtype)
    stats = guarded(lead + (oH, oW, 2), np.float32)
    codes = emu.contract()  # the attribute codes as the CUDA module defines them
    attrs = (K, s, codes["normalizers"][normalizer], codes["borders"][border], float(eps))
    assert emu.forward(q, k, v, out, stats, *attrs) == ""
    dq, dk, dv = (guarded(a.shape, a.dtype) for a in (q, k, v))
    w_scratch = guarded(lead + (oH, oW, T), np.float32)
    dlogit_scratch = guarded(lead + (oH, oW, T), np.float32)
    results = (out, stats, dq, dk, dv, w_scratch, dlogit_scratch)
    assert emu.backward(q, k, v, stats, g, dq, dk, dv, w_scratch, dlogit_scratch, *attrs) == ""
    for name, a in zip(RESULT_NAMES, results):
        assert guards_intact(a), f"{name}: a kernel wrote outside the buffer"
    return results


def reference(q, k, v, g, K, s, normalizer, border, eps):
    """float64 jnp out, dq, dk, dv; leading dims flattened into one batch axis."""
    flat = [jnp.asarray(a.reshape((-1,) + a.shape[-3:]).astype(np.float64)) for a in (q, k, v, g)]
    return [np.asarray(a) for a in _reference_fn(K, s, normalizer, border, eps)(*flat)]


@functools.lru_cache(maxsize=None)
def _reference_fn(K, s, normalizer, border, eps):
    """One jitted function per option set, so that the cases of one shape compile once (a
    compile beats op-by-op dispatch of the K*K patch ops by seconds per case)."""

    @jax.jit
    def out_and_grads(q, k, v, g):
        fn = lambda q, k, v: sapa_jax.sapa_upsample(  # noqa: E731
            q, k, v, kernel_size=K, scale=s, normalizer=normalizer, border=border, eps=eps,
            impl="xla")
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))

    return out_and_grads


# (case, planner settings, path); path = expected plan:
# "tiled", "simple", or an int: the tile cap, checked through the grid of the launches.
CASES = {
    "softmax-zeros-s2-K3": (Case((1,), 5, 6, 2, 8, 16, 3, "softmax", "zeros"), {}, "tiled"),
    "softmax-valid-K7-map-smaller-than-kernel":
        (Case((1,), 3, 2, 2, 40, 13, 7, "softmax", "valid"), {}, "tiled"),
    "relu-zeros-s1-rank5": (Case((2, 1), 6, 5, 1, 5, 3, 3, "relu", "zeros"), {}, "tiled"),
    "sigmoid-valid-s3-K5-C65": (Case((1,), 3, 4, 3, 7, 65, 5, "sigmoid", "valid"), {}, "tiled"),
    "softmax-valid-s4-K1": (Case((1,), 3, 4, 4, 3, 13, 1, "softmax", "valid"), {}, "tiled"),
    # K = 1 with an h-normaliser: w = h / (h + eps) is 1 - O(eps), so dlogit = h' eps dw / (h +
    # eps)^2 is all cancellation unless computed in docs/design.md §2's cancellation-free form (the
    # kernels once used h' (dw_p - sum_j w_j dw_j) / (S + eps) and lost ~3 digits here).
    "softplus-zeros-s4-K1": (Case((1,), 3, 4, 4, 3, 13, 1, "softplus", "zeros"), {}, "tiled"),
    "relu-zeros-s2-K1-simple":
        (Case((1,), 3, 4, 2, 3, 13, 1, "relu", "zeros"), {"force_simple": True}, "simple"),
    "relu-valid-K9-eps0-f16":
        (Case((1,), 2, 2, 2, 4, 6, 9, "relu", "valid", np.float16, 0.0), {}, "tiled"),
    "softmax-zeros-K5-bf16":
        (Case((1,), 4, 5, 2, 33, 40, 5, "softmax", "zeros", BF16), {}, "tiled"),
    # 320 output points > the 256 that 32 blocks of 8 warps cover: the grid-stride loop wraps.
    "sigmoid-zeros-forced-simple":
        (Case((1,), 10, 8, 2, 7, 13, 5, "sigmoid", "zeros"), {"force_simple": True}, "simple"),
    "softplus-valid-tile-cap-2":
        (Case((1,), 5, 7, 2, 9, 20, 3, "softplus", "valid"), {"tile_cap": 2}, 2),
    "none-zeros-s2-K5": (Case((1,), 4, 5, 2, 6, 40, 5, "none", "zeros"), {}, "tiled"),
    "none-valid-s3-K3-simple":
        (Case((1,), 3, 4, 3, 5, 9, 3, "none", "valid"), {"force_simple": True}, "simple"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(emu, env, x64, case):
    case, knobs, path = case
    if case.dtype is None:
        pytest.skip("ml_dtypes not available")
    set_knobs(env, knobs)
    q, k, v, g = case.random_inputs(0)
    lead, H, W, K, s = case.lead, case.H, case.W, case.K, case.s

    emu.take_launches()
    got = run_emulated(emu, q, k, v, g, K, s, case.normalizer, case.border, case.eps)
    launches = emu.take_launches()  # forward, backward pass 1, backward pass 2
    assert len(launches) == 3, launches
    if path == "simple":
        assert all(smem == 0 for _, _, smem in launches), launches
    else:  # tiled: every launch uses shared memory; a cap bounds the tile, so the grid grows
        assert all(smem > 0 for _, _, smem in launches), launches
        if isinstance(path, int):
            n = int(np.prod(lead))
            tiles = n * -(-H // path) * -(-W // path)
            assert all(grid == tiles for grid, _, _ in launches), (tiles, launches)

    out, stats, dq, dk, dv = got[:5]
    assert np.isfinite(stats).all()
    want = reference(q, k, v, g, K, s, case.normalizer, case.border, case.eps)
    # non-finite values would be unwritten or NaN shared memory
    kernel_cases.assert_close((out, dq, dk, dv), want, TOL[np.dtype(case.dtype)],
                              "emulated " + case.label())


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("simple", [False, True], ids=["tiled", "simple"])
def test_all_zero_relu_window_gives_exact_zeros(emu, env, border, simple):
    # q > 0 and k < 0: every inside logit is negative, outside ones are 0, so relu gives h = 0
    # everywhere; with eps = 0 the weights must be 0 (not NaN) and so must everything after.
    set_knobs(env, {"force_simple": simple})
    H, W, s, d, C, K = 4, 5, 2, 6, 7, 3
    rng = np.random.default_rng(1)
    q = (np.abs(rng.standard_normal((1, H * s, W * s, d))) + 0.1).astype(np.float32)
    k = (-np.abs(rng.standard_normal((1, H, W, d))) - 0.1).astype(np.float32)
    v = rng.standard_normal((1, H, W, C)).astype(np.float32)
    g = rng.standard_normal((1, H * s, W * s, C)).astype(np.float32)
    results = run_emulated(emu, q, k, v, g, K, s, "relu", border, 0.0)
    out, stats, dq, dk, dv = results[:5]
    # stats of an all-zero window: 1 / (S + eps) = 0, and the flag that makes dh = dw (as jnp's
    # safe denominator 1 does; sapa_common.h)
    assert np.all(stats[..., 0] == 0) and np.all(stats[..., 1] == 1), stats
    for name, a in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv)):
        assert np.all(a == 0), f"{name} is not exactly zero: max |{name}| = {np.nanmax(np.abs(a))}"


@pytest.mark.parametrize("case", kernel_cases.BAD_FORWARD_CALLS.values(),
                         ids=kernel_cases.BAD_FORWARD_CALLS.keys())
def test_malformed_calls_return_the_shared_errors(emu, env, case):
    # The same messages as the CPU handler's (test_ffi.py), from sapa_validate.h.
    shapes, attrs, message = case
    q, k, v = (np.zeros(s, np.float32) for s in shapes)
    out = np.zeros(q.shape[:-1] + v.shape[-1:], np.float32)
    stats = np.zeros(q.shape[:-1] + (2,), np.float32)
    emu.take_launches()
    assert emu.forward(q, k, v, out, stats, *attrs) == message
    assert emu.take_launches() == [], "a malformed call launched a kernel"


def test_malformed_calls_return_errors(emu, env):
    f32 = np.float32
    q, k, v = np.zeros((1, 4, 4, 3), f32), np.zeros((1, 2, 2, 3), f32), np.zeros((1, 2, 2, 5), f32)
    out, stats = np.zeros((1, 4, 4, 5), f32), np.zeros((1, 4, 4, 2), f32)
    eps = 1e-6
    emu.take_launches()
    bad_forward = {
        kernel_cases.MIXED_DTYPE_MESSAGE: (q, k.astype(np.float16), v, out, stats, 3, 2, 0, 0,
                                           eps),
        "sapa_forward: out must have shape (1, 4, 4, 5), got (1, 4, 4, 4)":
            (q, k, v, np.zeros((1, 4, 4, 4), f32), stats, 3, 2, 0, 0, eps),
        "sapa_forward: q must have element type float32, bfloat16 or float16, got float64":
            (q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
             out.astype(np.float64), stats, 3, 2, 0, 0, eps),
    }
    for expected, args in bad_forward.items():
        assert emu.forward(*args) == expected
    w = np.zeros((1, 4, 4, 9), f32)
    err = emu.backward(q, k, v, stats.astype(np.float64), out, q.copy(), k.copy(), v.copy(), w,
                       w.copy(), 3, 2, 0, 0, eps)
    assert err == "sapa_backward: stats must have element type float32, got float64"
    assert emu.take_launches() == [], "a malformed call launched a kernel"
    assert emu.forward(q, k, v, out, stats, 3, 2, 0, 0, eps) == ""  # still usable afterwards


# ------------------------------------------------------------------------------------- races
# The emulator runs the fibers of every barrier interval, and the blocks of every grid, in a
# chosen order (emu_core.h). Without a race the order cannot matter: each output element is
# written by one thread and summed in a fixed order, so the results must be bitwise equal.
SCHEDULES = {"reversed": (1, 0), "shuffled-1": (2, 1), "shuffled-2": (2, 2)}

# Shapes that reach every barrier of the kernels: several tiles per image with two key chunks
# and two value chunks (tiled), a full 8 x 8 tile with one key chunk and its edge tiles, no
# channels at all (no chunk loop runs), and the simple kernels with more taps than a warp has
# lanes.
PROBES = {
    "tiled-cap2-2-key-chunks": (Case((2,), 5, 6, 2, 40, 70, 3, "softmax", "zeros"),
                                {"tile_cap": 2}),
    "tiled-full-tile-1-key-chunk": (Case((1,), 9, 9, 2, 12, 20, 3, "relu", "valid"), {}),
    "tiled-no-channels": (Case((1,), 3, 4, 2, 0, 0, 3, "softplus", "zeros"), {}),
    "simple-49-taps": (Case((1,), 3, 4, 2, 40, 37, 7, "sigmoid", "valid"),
                       {"force_simple": True}),
}


def run_probe(emu, env, probe):
    case, knobs = probe
    set_knobs(env, knobs)
    q, k, v, g = case.random_inputs(3)
    return [a.copy() for a in run_emulated(emu, q, k, v, g, case.K, case.s, case.normalizer,
                                           case.border, case.eps)]


def differing(a_list, b_list):
    """Names of the results that are not bitwise equal."""
    return [name for name, a, b in zip(RESULT_NAMES, a_list, b_list)
            if not np.array_equal(a.view(np.uint8), b.view(np.uint8))]


@pytest.mark.parametrize("probe", PROBES, ids=PROBES.keys())
def test_results_do_not_depend_on_schedule(emu, env, probe):
    baseline = run_probe(emu, env, PROBES[probe])
    for a in baseline[:5]:
        assert np.isfinite(a).all()
    for schedule, (mode, seed) in SCHEDULES.items():
        emu.set_schedule(mode, seed)
        changed = differing(baseline, run_probe(emu, env, PROBES[probe]))
        assert not changed, f"{schedule} schedule changed {changed}: a race in the kernels"


def test_every_barrier_is_needed(emu, env):
    # Drop each barrier of the CUDA source in turn: some probe under some schedule must then
    # give different results. That shows the barrier is needed, and that the schedules above
    # would see a race where that barrier is missing (a barrier that can be dropped unnoticed is
    # either redundant or guards something no probe reaches; both deserve a look).
    # The generic kernels, so generation 1; the v2 kernels' barriers: test_cuda_v2_emulated.py.
    previous = emu.set_kernel_generation(1)
    baselines = {probe: run_probe(emu, env, PROBES[probe]) for probe in PROBES}  # in order
    unnoticed = []
    for site in (s for s in emu.barrier_sites if not s.file.startswith("cuda/v2_")):
        emu.drop_barrier(site.index)
        noticed = False
        for probe in PROBES:
            for mode, seed in [(0, 0), *SCHEDULES.values()]:
                emu.set_schedule(mode, seed)
                if differing(baselines[probe], run_probe(emu, env, PROBES[probe])):
                    noticed = True
                    break
            if noticed:
                break
        if not noticed:
            unnoticed.append(str(site))
    emu.drop_barrier(-1)
    emu.set_kernel_generation(previous)
    assert not unnoticed, "dropping these went unnoticed:\n" + "\n".join(unnoticed)


def test_sanitizer_reports_reach_the_tests(emu_module):
    # The `emu` fixture fails a test on UBSan reports; this shows that such reports exist and look
    # as it expects. A stats buffer 4 bytes off its float2 alignment (XLA never hands one over)
    # makes the forward kernel store misaligned. Run in a child process: UBSan reports each
    # source location only once per process, and this one must stay fresh for the other tests.
    script = f"""
import importlib.util, numpy as np
spec = importlib.util.spec_from_file_location("sapa_cuda_emu", {emu_module.__file__!r})
emu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(emu)
q, k, v = np.ones((1, 4, 4, 3), np.float32), np.ones((1, 2, 2, 3), np.float32), np.ones((1, 2, 2, 5), np.float32)
out = np.zeros((1, 4, 4, 5), np.float32)
stats = np.zeros(4 * 4 * 2 + 1, np.float32)[1:].reshape(1, 4, 4, 2)
print(repr(emu.forward(q, k, v, out, stats, 3, 2, 0, 0, np.float32(1e-6))))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = [l for l in proc.stderr.splitlines() if emu_build.UBSAN_REPORT in l]
    assert reports and "misaligned" in reports[0], proc.stderr[-2000:]


# ------------------------------------------------------------------------------ tile planner
# Shared-memory limits of real GPUs (CUDA programming guide: opt-in maximum per block, total per
# multiprocessor) and their multiprocessor counts. The emulated launches above all use H100
# limits; the planner must also choose well, and legally, elsewhere.
DEVICES = {
    "A100 (sm_80)": (166912, 167936, 108),
    "A10 (sm_86)": (101376, 102400, 72),
    "L4 (sm_89)": (101376, 102400, 58),
    "H100 (sm_90)": (232448, 233472, 132),
}
# n, H, W, s, K, d, C: the benchmark presets and the paper's range (s = 2, K <= 7), which must
# get the fast path everywhere; then large windows at scale 4, which only have to be legal
# (backward pass 2 stages every output point of its halo: (TH + K - 1)(TW + K - 1) s^2 rows of
# 32 channels; it gets fewer than 3 blocks per multiprocessor from K = 9, s = 2 on 100 KB GPUs,
# K = 7, s = 3 on an A100, K = 9, s = 3 on an H100, and the simple kernel from K = 7, s = 4 on
# 100 KB GPUs and K = 9, s = 4 on an A100), and a window no tile can hold.
SHAPES = {
    "gpu-preset": (8, 64, 64, 2, 5, 32, 256),
    "cpu-preset": (2, 32, 32, 2, 5, 32, 64),
    "K7-s2": (2, 24, 40, 2, 7, 64, 512),
    "K3-s2-narrow": (1, 3, 200, 2, 3, 16, 8),
    "K9-s4": (2, 24, 40, 4, 9, 64, 512),
    "K31-s8": (1, 40, 40, 8, 31, 32, 32),
}
TYPICAL = ("gpu-preset", "cpu-preset", "K7-s2", "K3-s2-narrow")
KERNELS = ("forward", "backward pass 1", "backward pass 2")


@pytest.mark.parametrize("device", DEVICES, ids=DEVICES.keys())
def test_tile_planner_respects_device_limits(emu, env, device):
    optin, per_sm, sms = DEVICES[device]
    for shape_name, (n, H, W, s, K, d, C) in SHAPES.items():
        for kernel, kernel_name in enumerate(KERNELS):
            tiled, TH, TW, smem, blocks = emu.plan(kernel, n, H, W, s, K, d, C, optin, per_sm,
                                                   sms)
            where = f"{kernel_name}, {shape_name} on {device}"
            if shape_name in TYPICAL:
                # The fast path, with room for the 3 blocks per multiprocessor that the kernels'
                # __launch_bounds__ are compiled for.
                assert tiled, f"{where}: fell back to the simple kernel"
                assert smem <= per_sm // 3, f"{where}: {smem} B shared leaves < 3 blocks per SM"
            if tiled:
                assert 0 < smem <= optin, f"{where}: {smem} B shared, the block limit is {optin}"
                assert 1 <= TH <= H and 1 <= TW <= W, (where, TH, TW)
                assert blocks == n * -(-H // TH) * -(-W // TW), (where, blocks)
    # A 31 x 31 window at scale 8 holds 61504 weights per low-res centre: no tile fits.
    assert not emu.plan(0, 1, 40, 40, 8, 31, 32, 32, optin, per_sm, sms)[0]


# ----------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("normalizer", sapa_jax._checks.NORMALIZERS)
@pytest.mark.parametrize("border", BORDERS)
def test_nonfinite_inputs_propagate_as_in_jnp(emu, env, x64, normalizer, border):
    # kernel_cases.py: the same cases as the CPU kernel's test, tiled and simple kernels.
    K, s = kernel_cases.NONFINITE_KERNEL_SIZE, kernel_cases.NONFINITE_SHAPE[3]
    for case in kernel_cases.nonfinite_cases():
        q, k, v, g = kernel_cases.nonfinite_inputs(case)
        want = reference(q, k, v, g, K, s, normalizer, border, 1e-6)
        for knobs in ({}, {"force_simple": True}):
            set_knobs(env, knobs)
            out, _, dq, dk, dv = run_emulated(emu, q, k, v, g, K, s, normalizer, border, 1e-6)[:5]
            kernel_cases.assert_same_nan(
                (out, dq, dk, dv), want,
                f"{normalizer}/{border} {knobs}, {case[0]}{list(case[1])} = {case[2]}")


# --------------------------------------------------------------- the shared logit gradient
# sapa_common.h's point_logit_gradients, the one formula of both back ends, against an exact
# evaluation (float64 for the float kernels, x87 long double for the double ones) of
# docs/design.md §2's gradient from the same logits x, dw and the weights and stats as the
# kernels computed them, for every normaliser, both borders and K = 1..9. Per tap p, with u the
# unit roundoff, eta the smallest subnormal, n = K*K, G_p = sum_j w_j (dw_p - dw_j) and
# Q_p = sum_j w_j |dw_p - dw_j|:
#   softmax        dlogit_p = w_p G_p,   |err| <= kappa u w_p Q_p + 4 eta (1 + Q_p)
#   h / (S + eps)  dlogit_p = h'(x_p) dh_p,  dh_p = inv (eps inv dw_p + G_p)  (inv = stat 0),
#                  |err| <= kappa u |h'(x_p)| D_p + 4 eta (1 + D_p),
#                  D_p = inv (eps inv |dw_p| + Q_p)
#                  (an all-zero window: dh_p = dw_p, D_p = |dw_p|)
#   none, uncounted taps, relu at x_p <= 0: exact
# with kappa = (n + 4) (6 + 2 W / w_max), W / w_max (<= n) the point's total over its largest
# weight: the worst case of the analysis in sapa_common.h (the pivot's terms (n + 2)(1 + 2 W /
# w_max) u, h' and the products a few u). The cancellation-prone inputs are where the naive
# dw_p - sum_j w_j dw_j loses everything: K = 1 (w = 1 - O(eps)), a large common dw with a small
# spread, one dominant tap (also: sigmoid' far out in its tail), eps far below S, eps = 0.
LOGIT_GRAD_NORMALIZERS = ("softmax", "relu", "sigmoid", "softplus", "none")
LOGIT_GRAD_REGIMES = ("generic", "common-dw", "dominant-tap", "eps-far-below-sum", "eps-0",
                      "eps-large")
LONG = np.longdouble


def kappa(taps, weight_ratio):
    return (taps + 4) * (6 + 2 * weight_ratio)


def logit_grad_inputs(rng, regime, points, taps, dtype):
    """(logits, dw, inside, eps) for one input regime."""
    x = rng.standard_normal((points, taps)) * 2
    dw = rng.standard_normal((points, taps))
    eps = 1e-6
    if regime == "common-dw":  # a large common part, a spread 1e-6 of it
        dw = 1e3 + 1e-3 * dw
    elif regime == "dominant-tap":  # one tap takes (nearly) all the weight
        x[:, taps // 2] += 30
    elif regime == "eps-far-below-sum":
        x = np.abs(x) * 50
    elif regime == "eps-0":
        eps = 0.0
    elif regime == "eps-large":
        eps = 0.5
    inside = rng.random((points, taps)) < 0.7
    inside[:, taps // 2] = True  # the centre tap is always in the map
    return x.astype(dtype), dw.astype(dtype), inside, eps


def h_grad(normalizer, x):
    if normalizer == "relu":
        return (x > 0).astype(x.dtype)
    if normalizer == "sigmoid":  # sig (1 - sig) would cancel in the tail, even in float64
        e = np.exp(-np.abs(x))
        return e / (1 + e) ** 2
    return 1 / (1 + np.exp(-x))  # softplus


def exact_logit_gradients(normalizer, border, eps, x, w, dw, stats, inside, wide):
    """The exact dlogit (in `wide`) from the kernels' w and stats, and the error bound."""
    x, w, dw, stats = (a.astype(wide) for a in (x, w, dw, stats))
    counted = inside if border == "valid" else np.ones_like(inside)
    dtype_info = np.finfo(np.float32 if wide == np.float64 else np.float64)
    u, eta = dtype_info.eps / 2, dtype_info.smallest_subnormal
    if normalizer == "none":
        return np.where(counted, dw, 0), np.zeros_like(dw)
    diff = dw[:, :, None] - dw[:, None, :]  # [point, p, j] = dw_p - dw_j
    spread = np.einsum("ij,ipj->ip", w, diff)
    size = np.einsum("ij,ipj->ip", w, np.abs(diff))
    top = w.max(axis=1, keepdims=True)
    ratio = np.where(top > 0, w.sum(axis=1, keepdims=True) / np.where(top > 0, top, 1), 1)
    kap = kappa(x.shape[1], ratio)
    if normalizer == "softmax":
        grad, bound = w * spread, kap * u * w * size + 4 * eta * (1 + size)
    else:
        inv, all_zero = stats[:, :1], stats[:, 1:] != 0
        dh = np.where(all_zero, dw, inv * (wide(eps) * inv * dw + spread))
        dh_size = np.where(all_zero, np.abs(dw), inv * (wide(eps) * inv * np.abs(dw) + size))
        slope = h_grad(normalizer, x)
        grad = slope * dh if normalizer != "relu" else np.where(x > 0, dh, 0)
        bound = kap * u * np.abs(slope) * dh_size + 4 * eta * (1 + dh_size)
        bound = np.where((normalizer == "relu") & (x <= 0), 0, bound)
    return np.where(counted, grad, 0), np.where(counted, bound, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_logit_gradient_error_bound(emu_module, dtype):
    if dtype == np.float64 and np.finfo(LONG).eps > 2.0 ** -60:
        pytest.skip("no extended long double for the float64 reference on this platform")
    wide = np.float64 if dtype == np.float32 else LONG
    shared = (emu_module.logit_gradients_f32 if dtype == np.float32
              else emu_module.logit_gradients_f64)
    codes = emu_module.contract()
    rng = np.random.default_rng(11)
    used = {}  # the largest error / bound per normaliser
    for K in range(1, 10):
        for normalizer in LOGIT_GRAD_NORMALIZERS:
            for border in BORDERS:
                for regime in LOGIT_GRAD_REGIMES:
                    x, dw, inside, eps = logit_grad_inputs(rng, regime, 24, K * K, dtype)
                    eps = float(dtype(eps))  # the eps the kernels of this type compute with
                    stats, w, got = shared(codes["normalizers"][normalizer],
                                           codes["borders"][border], eps, x, dw, inside)
                    want, bound = exact_logit_gradients(normalizer, border, eps, x, w, dw, stats,
                                                        inside, wide)
                    err = np.abs(got.astype(wide) - want)
                    where = f"K={K} {normalizer}/{border} {regime}"
                    worst = np.unravel_index(np.argmax(err - bound), err.shape)
                    assert np.all(err <= bound), (
                        f"{where}: error {float(err[worst]):.3e} > bound {float(bound[worst]):.3e}"
                        f" at {worst}: got {got[worst]}, want {float(want[worst])}")
                    ratio = float(np.max(np.where(bound > 0, err / np.where(bound > 0, bound, 1),
                                                  0)))
                    used[normalizer] = max(used.get(normalizer, 0.0), ratio)
    print(f"\nlogit gradient, {np.dtype(dtype).name}: max error / bound: " +
          ", ".join(f"{k} {v:.2e}" for k, v in used.items()))
    assert used["none"] == 0.0  # exact


def test_logit_gradient_bound_rejects_the_naive_form(emu_module):
    # The bound above can fail: the form the kernels once used, h'(x_p) inv (dw_p - sum_j w_j
    # dw_j) in float32, breaks it by orders of magnitude where w = 1 - O(eps) (K = 1).
    rng = np.random.default_rng(5)
    x, dw, inside, eps = logit_grad_inputs(rng, "generic", 24, 1, np.float32)
    codes = emu_module.contract()
    stats, w, _ = emu_module.logit_gradients_f32(codes["normalizers"]["softplus"], 0, eps, x, dw,
                                                 inside)
    slope = (1 / (1 + np.exp(-x))).astype(np.float32)
    naive = slope * stats[:, :1] * (dw - (w * dw).sum(axis=1, keepdims=True))
    want, bound = exact_logit_gradients("softplus", "zeros", float(np.float32(eps)), x, w, dw,
                                        stats, inside, np.float64)
    assert np.max(np.abs(naive - want) / bound) > 100


@pytest.mark.parametrize("case", kernel_cases.BAD_BACKWARD_CALLS.values(),
                         ids=kernel_cases.BAD_BACKWARD_CALLS.keys())
def test_malformed_backward_calls_give_the_cpu_handlers_text(emu, env, x64, case):
    # One text on both back ends (sapa_validate.h): the CUDA handler through the emulator, the CPU
    # handler through XLA and the compiled module.
    (stats_shape, stats_dtype), (g_shape, g_dtype), attrs, message = case
    q, k, v = (np.zeros(s, np.float32) for s in (kernel_cases.Q, kernel_cases.K3,
                                                   kernel_cases.V5))
    stats, g = np.zeros(stats_shape, stats_dtype), np.zeros(g_shape, g_dtype)
    taps = attrs[0] * attrs[0]
    scratch = [np.zeros(q.shape[:-1] + (taps,), np.float32) for _ in range(2)]
    emu.take_launches()
    got = emu.backward(q, k, v, stats, g, q.copy(), k.copy(), v.copy(), *scratch, *attrs)
    assert got == message
    assert emu.take_launches() == [], "a malformed call launched a kernel"
    if not sapa_jax.ffi_available("cpu"):
        pytest.skip("the CPU module is not built")
    from sapa_jax import _ffi
    with pytest.raises(Exception) as err:
        jax.block_until_ready(_ffi.backward_call(q, k, v, stats, g, _ffi.Options(*attrs)))
    assert message in str(err.value)

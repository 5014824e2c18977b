"""The CARAFE CUDA kernels of xla_ffi/carafe_cuda.cu, run on the CPU through the CUDA emulator
(tests/cuda_emulator, see test_cuda_emulated.py for what it does and does not catch) and checked
against the float64 jnp path: values, guards around every buffer, schedules (bitwise equal in
order, reversed and shuffled), every warp barrier shown to be needed, the error path of bad
calls, non-finite values as in jnp, and UBSan.
"""
from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sapa_jax
from sapa_jax.reference import normalize as reference_normalize

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_cuda_emulated import BF16, TOL, guarded, guards_intact  # noqa: E402
import kernel_cases  # noqa: E402


@pytest.fixture
def emu(carafe_emu_module, capfd):
    """The emulator with its default schedule and every barrier in place; fails on UBSan."""
    yield from kernel_cases.emulator_in_default_state(carafe_emu_module, capfd, "CARAFE")


def inputs(seed, lead, H, W, s, G, K, C, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (H, W, C))
    logits = 1.5 * rng.standard_normal(lead + (H * s, W * s, G * K * K))
    g = rng.standard_normal(lead + (H * s, W * s, C))
    return [a.astype(dtype) for a in (x, logits, g)]


def run_emulated(emu, x, logits, g, K, s, G, normalizer, eps=1e-6):
    """Forward then backward through the emulated handlers, every buffer guarded and the outputs
    NaN-filled; returns out, stats, dx, dlogits, w_scratch."""
    lead, oH, oW = logits.shape[:-3], logits.shape[-3], logits.shape[-2]
    x, logits, g = (guarded(a.shape, a.dtype, a) for a in (x, logits, g))
    out = guarded(lead + (oH, oW, x.shape[-1]), x.dtype)
    stats = guarded(lead + (oH, oW, 2 * G), np.float32)
    attrs = (K, s, G, emu.contract()["normalizers"][normalizer], float(eps))
    assert emu.forward(x, logits, out, stats, *attrs) == ""
    dx, dlogits = guarded(x.shape, x.dtype), guarded(logits.shape, logits.dtype)
    w_scratch = guarded(logits.shape, np.float32)
    assert emu.backward(x, logits, stats, g, dx, dlogits, w_scratch, *attrs) == ""
    results = (out, stats, dx, dlogits, w_scratch)
    for name, a in zip(("out", "stats", "dx", "dlogits", "w_scratch"), results):
        assert guards_intact(a), f"{name}: a kernel wrote outside the buffer"
    return [np.array(a) for a in results]


def reference(x, logits, g, K, s, G, normalizer, eps=1e-6):
    """float64 jnp out, dx, dlogits, and the normalised weights; leading dims flattened."""
    flat = [jnp.asarray(a.reshape((-1,) + a.shape[-3:]).astype(np.float64))
            for a in (x, logits, g)]
    return [np.asarray(a) for a in _reference_fn(K, s, G, normalizer, eps)(*flat)]


@functools.lru_cache(maxsize=None)
def _reference_fn(K, s, G, normalizer, eps):
    """One jitted function per option set: repeated shapes compile once."""

    @jax.jit
    def run(x, logits, g):
        fn = lambda x, l: sapa_jax.carafe_upsample(  # noqa: E731
            x, l, kernel_size=K, scale=s, groups=G, normalizer=normalizer, eps=eps, impl="xla")
        out, vjp = jax.vjp(fn, x, logits)
        w = reference_normalize(logits.reshape(logits.shape[:-1] + (G, K * K)),
                                normalizer=normalizer, eps=eps)
        return (out, *vjp(g), w.reshape(logits.shape))

    return run


def rel(a, b):
    a, b = np.asarray(a, np.float64).reshape(np.shape(b)), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# lead, H, W, s, G, K, C, normalizer, dtype
CASES = {
    "softmax-K5-s2-G1": ((1,), 4, 5, 2, 1, 5, 9, "softmax", np.float32),
    "softmax-K3-s3-G2-rank5": ((2, 1), 3, 3, 3, 2, 3, 6, "softmax", np.float32),
    "relu-K7-map-smaller-G4": ((1,), 2, 3, 2, 4, 7, 8, "relu", np.float32),
    "sigmoid-K1-s4": ((1,), 3, 2, 4, 1, 1, 5, "sigmoid", np.float32),
    "softplus-K9-G2-two-taps-per-lane": ((1,), 3, 3, 1, 2, 9, 4, "softplus", np.float32),
    "none-K3-s2-G2": ((1,), 3, 4, 2, 2, 3, 4, "none", np.float32),
    # 320 output points > the 256 that 32 blocks of 8 warps cover: the grid-stride loops wrap.
    "softmax-K3-grid-wraps-bf16": ((1,), 10, 8, 2, 1, 3, 33, "softmax", BF16),
    "softplus-K5-f16": ((1,), 3, 4, 2, 2, 5, 6, "softplus", np.float16),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_jnp(emu, x64, case):
    lead, H, W, s, G, K, C, normalizer, dtype = case
    if dtype is None:
        pytest.skip("ml_dtypes missing")
    x, logits, g = inputs(0, lead, H, W, s, G, K, C, dtype)
    out, _, dx, dlogits, w_scratch = run_emulated(emu, x, logits, g, K, s, G, normalizer)
    want_out, want_dx, want_dl, want_w = reference(x, logits, g, K, s, G, normalizer)
    tol = TOL[np.dtype(dtype)]
    for name, a, b in (("out", out, want_out), ("dx", dx, want_dx), ("dlogits", dlogits, want_dl),
                       ("w_scratch", w_scratch, want_w)):
        assert a.dtype == (np.float32 if name == "w_scratch" else np.dtype(dtype)), name
        assert rel(a, b) <= (1e-5 if name == "w_scratch" else tol), (name, rel(a, b))


def test_schedules_give_bitwise_equal_results_and_every_barrier_is_needed(emu):
    x, logits, g = inputs(3, (1,), 3, 4, 2, 2, 3, 8, np.float32)
    args = (x, logits, g, 3, 2, 2, "softmax")
    runs = kernel_cases.under_every_schedule(emu, run_emulated, *args)
    for other in runs[1:]:
        assert kernel_cases.bitwise_equal(runs[0], other), (
            "the result depends on the thread or block order")
    assert emu.barrier_sites, "no barrier found in carafe_cuda.cu"
    for site in emu.barrier_sites:
        emu.drop_barrier(site.index)
        try:
            dropped = kernel_cases.under_every_schedule(emu, run_emulated, *args)
        finally:
            emu.drop_barrier(-1)
        assert any(not kernel_cases.bitwise_equal(runs[0], r) for r in dropped), (
            f"dropping {site} changes nothing under any schedule: not needed, or not seen")


@pytest.mark.parametrize("args, message", [
    (((1, 2, 2, 4), (1, 4, 4, 8), 3, 2, 1), "carafe_forward: logits must have shape "
                                            "(1, 4, 4, 9), got (1, 4, 4, 8)"),
    (((1, 2, 2, 4), (1, 4, 4, 18), 3, 2, 3), "carafe_forward: the channels of x must be "
                                             "divisible by groups, got 4 channels and groups=3"),
    (((1, 2, 2, 4), (1, 4, 4, 16), 4, 2, 1), "carafe_forward: kernel_size must be a positive "
                                             "odd integer, got 4"),
    (((1, 2, 2, 4), (1, 4, 4, 169), 13, 2, 1), "carafe_forward: kernel_size must be <= 11 for "
                                               "the CUDA kernel, got 13"),
])
def test_bad_calls_return_the_cpu_messages(emu, args, message):
    (xs, ls, K, s, G) = args
    x, logits = np.ones(xs, np.float32), np.ones(ls, np.float32)
    out = np.zeros(ls[:-1] + (xs[-1],), np.float32)
    stats = np.zeros(ls[:-1] + (2 * G,), np.float32)
    assert emu.forward(x, logits, out, stats, K, s, G, 0, 1e-6) == message


NONFINITE_PLACES = {"x": [(0, 0, 0, 1), (0, 1, 2, 3)], "logits": [(0, 0, 1, 4), (0, 3, 4, 11)]}


@pytest.mark.parametrize("normalizer", ["softmax", "relu", "sigmoid", "none"])
def test_nonfinite_inputs_propagate_as_in_jnp(emu, x64, normalizer):
    for name, places in NONFINITE_PLACES.items():
        for index in places:
            for value in (np.nan, np.inf):
                x, logits, g = inputs(7, (1,), 3, 4, 2, 2, 3, 4, np.float32)
                {"x": x, "logits": logits}[name][index] = value
                out, _, dx, dlogits, _ = run_emulated(emu, x, logits, g, 3, 2, 2, normalizer)
                want = reference(x, logits, g, 3, 2, 2, normalizer)[:3]
                kernel_cases.assert_same_nan((out, dx, dlogits), want,
                                             f"{normalizer}, {name}{list(index)} = {value}",
                                             names=("out", "dx", "dlogits"))

"""The SAPA-D CUDA kernels of xla_ffi/deform_cuda.cu, run on the CPU through the CUDA emulator
(tests/cuda_emulator, see test_cuda_emulated.py for what it does and does not catch) and checked
against the float64 jnp path: out and the four gradients (samples off the map, at integer
positions and on the range boundary, offsets beyond the map so that pass B's window clamps),
guards around every buffer, schedules (bitwise equal in order, reversed and shuffled), every
barrier shown to be needed, bad calls with the CPU handler's messages, non-finite values as in
jnp, and UBSan.
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
from sapa_jax import _ffi

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_cuda_emulated import BF16, TOL, guarded, guards_intact  # noqa: E402
from test_deform import core_inputs  # noqa: E402
import kernel_cases  # noqa: E402

NAMES = ("out", "dq", "dk", "dv", "doffsets")


@pytest.fixture
def emu(deform_emu_module, capfd):
    """The emulator with its default schedule and every barrier in place; fails on UBSan."""
    yield from kernel_cases.emulator_in_default_state(deform_emu_module, capfd, "SAPA-D")


# (P, G, E, C/G, s, (B, H, W), offset spread)
CASES = {
    "P9-G4-s2": (9, 4, 3, 2, 2, (1, 3, 4), 1.6),
    "P4-G2-s3-B2": (4, 2, 5, 3, 3, (2, 2, 3), 1.6),
    "P1-G1-s1": (1, 1, 4, 3, 1, (1, 4, 3), 1.6),
    # more than 32 channels: the lanes wrap over E and C/G
    "P4-G2-wide-channels": (4, 2, 35, 33, 2, (1, 2, 3), 1.6),
    # |offset| up to ~4x the map: R_b > H, W, so pass B's window is the whole map
    "P4-G1-window-clamps": (4, 1, 4, 3, 2, (1, 3, 3), 6.0),
    # 324 output points > the 256 warps of the emulator's grid: the grid-stride loops wrap
    "P1-G1-s3-grid-wraps": (1, 1, 2, 2, 3, (1, 6, 6), 1.6),
}


def case_inputs(case, dtype, seed=0):
    """q, k, v, offsets, g; one point of group 0 sits on integer positions (when P > 1), output
    point (0, 0) on the boundary py = -1 and the last one at px = W (core_inputs)."""
    P, G, E, Cg, s, (B, H, W), spread = case
    q, k, v, off = core_inputs(seed + P, B, H, W, s, P, G, E, G * Cg, spread=spread)
    if P > 1:
        off[..., 2:4] = np.round(off[..., 2:4])
    g = np.random.default_rng(seed + 1).standard_normal((B, H * s, W * s, G * Cg))
    return [a.astype(dtype) for a in (q, k, v, off, g)]


def run_emulated(emu, q, k, v, off, g, P, G, s):
    """Forward then backward through the emulated handlers, every buffer guarded and the outputs
    NaN-filled; returns out, dq, dk, dv, doffsets."""
    q, k, v, off, g = (guarded(a.shape, a.dtype, a) for a in (q, k, v, off, g))
    out = guarded(q.shape[:-1] + (v.shape[-1],), q.dtype)
    assert emu.forward(q, k, v, off, out, P, G, s) == ""
    grads = [guarded(a.shape, a.dtype) for a in (q, k, v, off)]
    assert emu.backward(q, k, v, off, g, *grads, P, G, s) == ""
    results = (out, *grads)
    for name, a in zip(NAMES, results):
        assert guards_intact(a), f"{name}: a kernel wrote outside the buffer"
    return [np.array(a) for a in results]


@functools.lru_cache(maxsize=None)
def _reference_fn(P, G, s):
    @jax.jit
    def run(q, k, v, off, g):
        fn = lambda *a: sapa_jax.deform_upsample(  # noqa: E731
            *a, num_points=P, groups=G, scale=s, impl="xla")
        out, vjp = jax.vjp(fn, q, k, v, off)
        return (out, *vjp(g))
    return run


def reference(arrays, P, G, s, dtype=np.float64):
    """jnp out, dq, dk, dv, doffsets (float64 unless told) from the same rounded inputs."""
    return [np.asarray(a) for a in
            _reference_fn(P, G, s)(*(jnp.asarray(a.astype(dtype)) for a in arrays))]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# every shape in f32, the 16-bit types on two of them (test time)
MATRIX = ([(name, np.float32) for name in CASES]
          + [(name, dtype) for name in ("P9-G4-s2", "P4-G2-s3-B2") for dtype in (BF16, np.float16)])


@pytest.mark.parametrize("name, dtype", MATRIX,
                         ids=[f"{n}-{np.dtype(d).name if d else 'bf16'}" for n, d in MATRIX])
def test_matches_jnp(emu, x64, name, dtype):
    if dtype is None:
        pytest.skip("ml_dtypes missing")
    case = CASES[name]
    P, G, s = case[0], case[1], case[4]
    arrays = case_inputs(case, dtype)
    got = run_emulated(emu, *arrays, P, G, s)
    want = reference(arrays, P, G, s)
    for what, a, b in zip(NAMES, got, want):
        assert a.dtype == np.dtype(dtype), what
        assert rel(a, b) <= TOL[np.dtype(dtype)], (what, rel(a, b))
    assert np.any(got[3] != 0) and np.any(got[4] != 0)
    assert P == 1 or np.any(got[2] != 0)  # one point: attn = 1, dlogit = 0, dk = 0


def test_boundary_and_integer_positions(emu, x64):
    """py = -1 exactly: not read, zero gradient; integer positions take the cell to the lower
    right, as jnp; just above -1 reads row 0."""
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((1, 2, 2, 3)), rng.standard_normal((1, 2, 2, 3))
    v, g = rng.standard_normal((1, 2, 2, 2)), rng.standard_normal((1, 2, 2, 2))
    for dy, dx in ((-1.0, 0.0), (0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0 + 2.0 ** -20, 0.5)):
        off = np.zeros((1, 2, 2, 4))
        off[0, 0, 0, 2:4] = (dx, dy)
        arrays = [a.astype(np.float32) for a in (q, k, v, off, g)]
        got = run_emulated(emu, *arrays, 2, 1, 1)
        want = reference(arrays, 2, 1, 1)
        for what, a, b in zip(NAMES, got, want):
            assert rel(a, b) <= TOL[np.dtype(np.float32)], (dy, dx, what, rel(a, b))
        if dy == -1.0 or dx == -1.0:
            assert got[4][0, 0, 0, 2] == 0.0 and got[4][0, 0, 0, 3] == 0.0
        else:
            assert np.any(got[4][0, 0, 0, 2:4] != 0.0)


def test_schedules_give_bitwise_equal_results_and_every_barrier_is_needed(emu):
    case = (4, 2, 3, 2, 2, (2, 2, 3), 1.6)
    args = (*case_inputs(case, np.float32, seed=4), 4, 2, 2)
    runs = kernel_cases.under_every_schedule(emu, run_emulated, *args)
    for other in runs[1:]:
        assert kernel_cases.bitwise_equal(runs[0], other), (
            "the result depends on the thread or block order")
    assert len(emu.barrier_sites) == 4, emu.barrier_sites
    for site in emu.barrier_sites:
        emu.drop_barrier(site.index)
        try:
            dropped = kernel_cases.under_every_schedule(emu, run_emulated, *args)
        finally:
            emu.drop_barrier(-1)
        assert any(not kernel_cases.bitwise_equal(runs[0], r) for r in dropped), (
            f"dropping {site} changes nothing under any schedule: not needed, or not seen")


def test_window_radius_is_exact_for_any_offsets(emu, x64):
    """Pass B's window from R_b = ceil(max |finite offset|) per batch element: one batch element
    with small offsets beside one whose offsets reach across the map, and non-finite offsets
    that must not widen (or break) the window."""
    case = (4, 2, 3, 2, 2, (2, 4, 4), 0.4)
    q, k, v, off, g = case_inputs(case, np.float32, seed=9)
    off[1] *= 8.0                      # batch element 1: R_b ~ 8 > the map
    off[1, 2, 2, 0] = 1e30             # finite but far: R_b capped at the map
    off[0, 1, 2, 5] = np.inf           # batch element 0: a narrow window despite non-finite
    off[0, 3, 1, 8] = np.nan           # offsets (outside, or NaN: they read nothing)
    assert np.max(np.abs(off[0][np.isfinite(off[0])])) < 3.0
    got = run_emulated(emu, q, k, v, off, g, 4, 2, 2)
    want = reference((q, k, v, off, g), 4, 2, 2)
    kernel_cases.assert_same_nan(got, want, "mixed offsets", names=NAMES)


def _bad_calls():
    q, k, v = np.ones((1, 4, 4, 4)), np.ones((1, 2, 2, 4)), np.ones((1, 2, 2, 6))
    off = np.ones((1, 4, 4, 8))
    f32 = lambda *a: [np.asarray(x, np.float32) for x in a]  # noqa: E731
    return [
        (f32(q, k, v, off[..., :6]), (2, 2, 2),
         "sapa_deform_forward: offsets must have shape (1, 4, 4, 8), got (1, 4, 4, 6)"),
        (f32(q, k, v[:, :1], off), (2, 2, 2),
         "sapa_deform_forward: v must have shape (1, 2, 2, 6), got (1, 1, 2, 6)"),
        (f32(q, k, np.ones((1, 2, 2, 5)), off), (2, 2, 2),
         "sapa_deform_forward: v channels must be divisible by groups=2, got 5"),
        (f32(q, k, v, off), (2, 2, 3),
         "sapa_deform_forward: q must have shape (1, 6, 6, 4), got (1, 4, 4, 4)"),
        (f32(q, k, v, off), (0, 2, 2), "sapa_deform_forward: num_points must be in 1..65536, "
                                       "got 0"),
        (f32(q, k, v, off)[:2] + [v.astype(np.float16), off.astype(np.float32)], (2, 2, 2),
         "sapa_deform_forward: v must have element type float32, got float16"),
    ]


@pytest.mark.parametrize("index", range(6))
def test_bad_calls_return_the_cpu_messages(emu, index):
    """The pinned message through the emulated CUDA handler, and the CPU handler's message for
    the same call contains it (deform_validate.h, one set of checks)."""
    arrays, (P, G, s), message = _bad_calls()[index]
    out = np.zeros(arrays[0].shape[:-1] + (arrays[2].shape[-1],), np.float32)
    assert emu.forward(*arrays, out, P, G, s) == message
    if _ffi.deform_built("cpu"):
        with pytest.raises(Exception) as err:
            jax.block_until_ready(_ffi.deform_forward_call(
                *(jnp.asarray(a) for a in arrays), _ffi.DeformOptions(P, G, s)))
        assert message in str(err.value), str(err.value)


def test_bad_backward_call_and_unsupported_dtype(emu):
    q, k, v = np.ones((1, 4, 4, 4)), np.ones((1, 2, 2, 4)), np.ones((1, 2, 2, 6))
    off = np.ones((1, 4, 4, 8))
    a32 = [a.astype(np.float32) for a in (q, k, v, off)]
    grads = [np.zeros_like(a) for a in a32]
    assert emu.backward(*a32, a32[2], *grads, 2, 2, 2) == (
        "sapa_deform_backward: g must have shape (1, 4, 4, 6), got (1, 2, 2, 6)")
    a64 = [a.astype(np.float64) for a in (q, k, v, off)]
    assert emu.forward(*a64, np.zeros((1, 4, 4, 6)), 2, 2, 2) == (
        "sapa_deform_forward: q must have element type float32, bfloat16 or float16, got "
        "float64")


NONFINITE = [("q", (0, 1, 2, 0)), ("k", (0, 0, 0, 1)), ("k", (0, 1, 2, 3)), ("v", (0, 0, 0, 1)),
             ("v", (0, 2, 1, 0)), ("offsets", (0, 1, 2, 1)), ("offsets", (0, 0, 0, 4)),
             ("g", (0, 3, 2, 1))]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_inputs_propagate_as_in_jnp(emu, value):
    """One non-finite entry at a time: the NaN masks of out and of the four gradients equal the
    float32 jnp path's; elsewhere the values agree."""
    case = (2, 2, 2, 2, 2, (1, 3, 3), 1.6)
    base = case_inputs(case, np.float32, seed=5)
    base[3] = np.clip(base[3], -0.7, 0.7)  # most pixels read only near their parents
    names = ("q", "k", "v", "offsets", "g")
    for name, index in NONFINITE:
        arrays = [a.copy() for a in base]
        arrays[names.index(name)][index] = value
        got = run_emulated(emu, *arrays, 2, 2, 2)
        want = reference(arrays, 2, 2, 2, dtype=np.float32)
        kernel_cases.assert_same_nan(got, want, f"{name}{list(index)}={value}", names=NAMES)

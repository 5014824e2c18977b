"""The second-generation CUDA kernels (xla_ffi/cuda/v2_*.cuh) run on the CPU emulator.

test_cuda_emulated.py says what the emulator checks and what it cannot. This file runs the v2
paths (compile-time K in {3, 5, 7} and s in {1, 2, 4}, zero-padded halos, unrolled taps, the
strip gather of backward pass 2, backward pass 1 with q and g in registers, the staging
of v2_stage.cuh, asynchronous copies from f32) against the float64 jnp reference, and checks that

- the module's kernel-generation switch (`set_kernel_generation`) really changes the kernels
  that run where v2 applies (their shared memory differs) and nothing where it does not;
- generation 1 and 2 agree to rounding on the same inputs;
- results are bitwise independent of thread and block order (no races);
- every barrier of the v2 kernels, and the wait for the f32 staging's asynchronous copies, is
  needed (dropping it is noticed under some schedule);
- NaN and Inf propagate as in jnp; UBSan stays silent (the `emu` fixture).

The matrix is small on purpose (each case is one XLA compile of the reference): it covers every
K and s specialisation, all normalisers, both borders, the three dtypes, channel tails (d and C
not multiples of 32 / 64), edge tiles, an odd last tile row (the strip's discarded second point)
and single-row tiles.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kernel_cases  # noqa: E402
from kernel_cases import Case  # noqa: E402
import test_cuda_emulated as base  # noqa: E402
from test_cuda_emulated import emu, env  # noqa: E402,F401  (fixtures; emu_module: conftest)

BF16 = base.BF16
F16 = np.float16


@pytest.fixture
def gen(env):
    """The emulator with generation 2 selected, and the default restored after the test."""
    previous = env.set_kernel_generation(2)
    yield env
    env.set_kernel_generation(previous)


def launches(emu, generation, q, k, v, g, K, s, normalizer, border, eps):
    emu.set_kernel_generation(generation)
    emu.take_launches()
    results = base.run_emulated(emu, q, k, v, g, K, s, normalizer, border, eps)
    return results, emu.take_launches()


# (the problem, the planner settings)
CASES = {
    "K3-s2-softmax-zeros-f32": (Case((1,), 5, 6, 2, 8, 16, 3, "softmax", "zeros"), {}),
    "K5-s2-softmax-valid-d36-C70": (Case((1,), 7, 5, 2, 36, 70, 5, "softmax", "valid"), {}),
    "K7-s1-relu-zeros-edge-tiles": (Case((2,), 9, 10, 1, 12, 9, 7, "relu", "zeros"), {}),
    "K3-s4-sigmoid-valid-cap3": (Case((1,), 5, 4, 4, 4, 13, 3, "sigmoid", "valid"),
                                 {"tile_cap": 3}),
    "K5-s1-softplus-zeros-cap1": (Case((1,), 4, 5, 1, 8, 33, 5, "softplus", "zeros"),
                                  {"tile_cap": 1}),
    "K7-s2-none-valid-map-smaller": (Case((1,), 3, 4, 2, 8, 6, 7, "none", "valid"), {}),
    "K5-s2-softmax-zeros-bf16": (Case((1,), 4, 5, 2, 32, 40, 5, "softmax", "zeros", BF16), {}),
    "K3-s4-relu-valid-eps0-f16": (Case((1,), 3, 3, 4, 8, 6, 3, "relu", "valid", F16, 0.0), {}),
    # d % 4 != 0: the forward stays generic (q rows are not vector-aligned), pass 2 is v2
    "K3-s2-sigmoid-zeros-d5": (Case((1,), 4, 6, 2, 5, 11, 3, "sigmoid", "zeros"), {}),
    # d % 4 == C % 4 == 0: backward pass 1 is v2 too (q and g rows as vectors). With K3-s2 and
    # the bf16 K5-s2 above, every (K, s) specialisation of it; key and value chunk tails.
    "P1-K3-s1-softmax-valid-d36-C36": (Case((1,), 6, 7, 1, 36, 36, 3, "softmax", "valid"), {}),
    "P1-K5-s4-relu-zeros-f16": (Case((1,), 3, 4, 4, 8, 12, 5, "relu", "zeros", F16), {}),
    "P1-K7-s4-sigmoid-valid-map-smaller": (Case((1,), 3, 3, 4, 4, 8, 7, "sigmoid", "valid"), {}),
    "P1-K7-s1-softplus-zeros-cap2-C68": (Case((2,), 5, 5, 1, 12, 68, 7, "softplus", "zeros"),
                                         {"tile_cap": 2}),
    "P1-K5-s1-none-valid": (Case((1,), 5, 6, 1, 8, 16, 5, "none", "valid"), {}),
    "P1-K7-s2-relu-valid-eps0": (Case((1,), 4, 5, 2, 8, 12, 7, "relu", "valid", np.float32, 0.0),
                                 {}),
    "P1-K3-s4-softmax-zeros": (Case((1,), 3, 4, 4, 16, 8, 3, "softmax", "zeros"), {}),
    "P1-K5-s2-sigmoid-valid-cap3": (Case((1,), 7, 5, 2, 12, 20, 5, "sigmoid", "valid"),
                                    {"tile_cap": 3}),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_v2_matches_reference_and_generation_1(emu, gen, x64, case):
    case, knobs = case
    if case.dtype is None:
        pytest.skip("ml_dtypes not available")
    base.set_knobs(gen, knobs)
    q, k, v, g = case.random_inputs(0)
    d, K, s, normalizer, border, eps, dtype = (case.d, case.K, case.s, case.normalizer,
                                               case.border, case.eps, case.dtype)
    got1, launched1 = launches(emu, 1, q, k, v, g, K, s, normalizer, border, eps)
    got2, launched2 = launches(emu, 2, q, k, v, g, K, s, normalizer, border, eps)
    # forward, pass 1, pass 2; the v2 kernels plan other shared memory than generation 1
    assert len(launched1) == len(launched2) == 3, (launched1, launched2)
    forward_v2 = d % 4 == 0
    points_v2 = forward_v2 and case.C % 4 == 0
    assert (launched1[0] != launched2[0]) == forward_v2, (launched1, launched2)
    assert (launched1[1] != launched2[1]) == points_v2, (launched1, launched2)
    assert launched1[2] != launched2[2], (launched1, launched2)

    want = base.reference(q, k, v, g, K, s, normalizer, border, eps)
    tol = base.TOL[np.dtype(dtype)]
    for name, a1, a2, b in zip(("out", "dq", "dk", "dv"), got1[:1] + got1[2:5],
                               got2[:1] + got2[2:5], want):
        a2 = a2.reshape(b.shape).astype(np.float64)
        assert np.isfinite(a2).all(), f"{name}: non-finite values (unwritten or NaN shared memory)"
        scale = max(np.abs(b).max(), 1e-30)
        err = np.abs(a2 - b).max() / scale
        assert err <= tol, f"{name}: relative error {err:.2e} (generation 2)"
        gap = np.abs(a2 - a1.reshape(b.shape).astype(np.float64)).max() / scale
        assert gap <= 2 * tol, f"{name}: generations 1 and 2 differ by {gap:.2e}"
    # The stats and the pass-1 scratch differ by the logits' rounding only: v2 sums each q.k
    # (and g.v) in one FMA chain, the generic kernel in four.
    for i in (1, 5, 6):
        a1, a2 = (x.astype(np.float64) for x in (got1[i], got2[i]))
        gap = np.abs(a2 - a1).max() / max(np.abs(a1).max(), 1e-30)
        assert gap <= 2 * tol, f"{base.RESULT_NAMES[i]}: generations differ by {gap:.2e}"


def test_generation_switch_checks_its_argument(emu_module):
    previous = emu_module.set_kernel_generation(2)
    try:
        for bad in (0, 3, -1):
            with pytest.raises(ValueError, match=rf"generation must be 1 or 2, got {bad}"):
                emu_module.set_kernel_generation(bad)
        assert emu_module.set_kernel_generation(1) == 2
        assert emu_module.set_kernel_generation(2) == 1
    finally:
        emu_module.set_kernel_generation(previous)


def test_unspecialised_shapes_keep_the_generic_kernels(emu, gen):
    # K = 9 and s = 3 have no v2 specialisation: generation 2 launches what generation 1 does.
    for K, s in ((9, 2), (3, 3)):
        q, k, v, g = Case((1,), 3, 4, s, 8, 8, K, "softmax", "zeros").random_inputs(1)
        _, launched1 = launches(emu, 1, q, k, v, g, K, s, "softmax", "zeros", 1e-6)
        _, launched2 = launches(emu, 2, q, k, v, g, K, s, "softmax", "zeros", 1e-6)
        assert launched1 == launched2, (K, s, launched1, launched2)


POINTS_V2 = 5  # the planner's Kernel::kBackwardPointsV2 (cuda/plan.h)


def test_points_v2_plans_fit_and_fill_the_block(emu):
    # backward_points_v2 keeps q and g in registers and stages nothing per point, so its tiles
    # leave room for the planner's 3 blocks per multiprocessor (kTiledBlocksPerSm) on every device
    # at the typical shapes, and at the GPU preset one tile holds an output point per thread
    # (256), where the generic pass 1 leaves half of the threads idle in its per-point phases.
    for device, (optin, per_sm, sms) in base.DEVICES.items():
        for shape in base.TYPICAL:
            n, H, W, s, K, d, C = base.SHAPES[shape]
            tiled, TH, TW, smem, blocks = emu.plan(POINTS_V2, n, H, W, s, K, d, C, optin,
                                                   per_sm, sms)
            assert tiled and 0 < smem <= per_sm // 3, (device, shape, smem)
            assert blocks == n * -(-H // TH) * -(-W // TW), (device, shape, blocks)
    optin, per_sm, sms = base.DEVICES["H100 (sm_90)"]
    n, H, W, s, K, d, C = base.SHAPES["gpu-preset"]
    _, TH, TW, smem, _ = emu.plan(POINTS_V2, n, H, W, s, K, d, C, optin, per_sm, sms)
    assert TH * TW * s * s >= 256, (TH, TW, smem)


# Probes that reach every v2 barrier: two key chunks and two value chunks over several tiles,
# one chunk on a full tile, and no channels at all.
# (C = 68: a multiple of 4, so backward pass 1 is v2 as well, with three 32-channel chunks.)
PROBES = {
    "v2-cap2-2-key-chunks": (Case((2,), 5, 6, 2, 40, 68, 3, "softmax", "zeros"),
                             {"tile_cap": 2}),
    "v2-full-tile-1-key-chunk": (Case((1,), 9, 9, 2, 12, 20, 5, "relu", "valid"), {}),
    "v2-no-channels": (Case((1,), 3, 4, 2, 0, 0, 3, "softplus", "zeros"), {}),
}


def v2_barriers(emu_module):
    return [site for site in emu_module.barrier_sites if "v2_" in site.file]


@pytest.mark.parametrize("probe", PROBES, ids=PROBES.keys())
def test_v2_results_do_not_depend_on_schedule(emu, gen, probe):
    baseline = base.run_probe(emu, gen, PROBES[probe])
    for a in baseline[:5]:
        assert np.isfinite(a).all()
    for schedule, (mode, seed) in base.SCHEDULES.items():
        emu.set_schedule(mode, seed)
        changed = base.differing(baseline, base.run_probe(emu, gen, PROBES[probe]))
        assert not changed, f"{schedule} schedule changed {changed}: a race in the v2 kernels"


def test_every_v2_barrier_is_needed(emu, gen):
    sites = v2_barriers(emu)
    assert sites, "no barrier of xla_ffi/cuda/v2_*.cuh is numbered by the emulator"
    # the f32 staging's cp.async wait is numbered with the barriers: dropping it must show too
    assert any(site.call.startswith("__pipeline_wait_prior(") for site in sites), sites
    baselines = {p: base.run_probe(emu, gen, PROBES[p]) for p in PROBES}
    unnoticed = []
    for site in sites:
        emu.drop_barrier(site.index)
        noticed = any(
            base.differing(baselines[p], (emu.set_schedule(mode, seed),
                                          base.run_probe(emu, gen, PROBES[p]))[1])
            for p in PROBES for mode, seed in [(0, 0), *base.SCHEDULES.values()])
        if not noticed:
            unnoticed.append(str(site))
    emu.drop_barrier(-1)
    assert not unnoticed, "dropping these went unnoticed:\n" + "\n".join(unnoticed)


def test_emulated_async_copies_arrive_only_when_waited_for(emu_module):
    """The emulator's model of cp.async (include/cuda_pipeline_primitives.h), which the f32
    staging relies on: a copy's bytes arrive at the wait for its group, never earlier, and
    misuse is a launch error."""
    src = np.arange(64, dtype=np.float32)
    error, out = emu_module.async_copy_probe(0)  # both groups waited for
    assert error == "" and np.array_equal(out, src)
    error, out = emu_module.async_copy_probe(1)  # read before the wait: NaN, not the data
    assert error == "" and np.isnan(out).all()
    error, out = emu_module.async_copy_probe(2)  # never committed: the wait does not cover them
    assert error == "" and np.isnan(out).all()
    error, out = emu_module.async_copy_probe(3)  # wait_prior(1): the newest group still pending
    assert error == "" and np.array_equal(out[:32], src[:32]) and np.isnan(out[32:]).all()
    error, _ = emu_module.async_copy_probe(4)
    assert "aligned" in error, error
    error, _ = emu_module.async_copy_probe(5)
    assert "destination outside dynamic shared memory" in error, error


@pytest.mark.parametrize("border", base.BORDERS)
def test_v2_nonfinite_inputs_propagate_as_in_jnp(emu, gen, x64, border):
    K, s = kernel_cases.NONFINITE_KERNEL_SIZE, kernel_cases.NONFINITE_SHAPE[3]
    for normalizer in ("softmax", "sigmoid"):
        for case in kernel_cases.nonfinite_cases():
            q, k, v, g = kernel_cases.nonfinite_inputs(case)
            # d = 3 -> 4 with a zero channel, so the v2 forward (4-element q rows) runs too
            q, k = (np.concatenate([a, np.zeros_like(a[..., :1])], -1) for a in (q, k))
            want = base.reference(q, k, v, g, K, s, normalizer, border, 1e-6)
            out, _, dq, dk, dv = base.run_emulated(emu, q, k, v, g, K, s, normalizer, border,
                                                   1e-6)[:5]
            kernel_cases.assert_same_nan(
                (out, dq, dk, dv), want, f"v2 {normalizer}/{border}, {case[0]}{list(case[1])}")

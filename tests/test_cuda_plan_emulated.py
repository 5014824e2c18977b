"""The v2 planner's cost model and channel split, and the CUDA handlers' host side, on the CPU
emulator (tests/cuda_emulator; test_cuda_emulated.py says what it checks and what it cannot).

- The cost model (xla_ffi/cuda/plan.h cost_plan, v2_plan.h's block model): its waves and
  resident blocks follow from the plan; no tile or split the test forces models faster than the
  plan it chose; grids short of a wave get split or smaller tiles, large grids no split; every
  plan for every (K, s) specialisation on four GPUs' limits is legal.
- The channel split changes no bit: forward and backward results with the cost model's split on
  a 132-SM device, and with forced splits, equal the unsplit run bitwise (f32 and bf16).
- Host side (xla_ffi/cuda/runtime.h): the device comes from XLA's stream (never cudaGetDevice),
  its limits are queried once per device, and the shared-memory opt-in is set once per device
  and kernel however many calls follow; the same for the CARAFE handlers' grid.

Emulated devices (emu_core.h): 0 has one multiprocessor, 1 has an H100's 132; both have H100
shared-memory limits.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from kernel_cases import Case  # noqa: E402
import test_cuda_emulated as base  # noqa: E402
from test_cuda_emulated import emu, env  # noqa: E402,F401  (fixtures; emu_module: conftest)
from test_carafe_cuda_emulated import inputs  # noqa: E402
from test_carafe_cuda_emulated import run_emulated as run_carafe  # noqa: E402

FORWARD_V2, GATHER_V2 = 3, 4  # plan.h's Kernel numbers
H100 = (232448, 233472, 132)
EMULATED = {0: (232448, 233472, 1), 1: H100}  # the emulated devices' limits (emu_core.h)
DEVICES = dict(base.DEVICES)
SPECIALISED = [(K, s) for K in (3, 5, 7) for s in (1, 2, 4)]


@pytest.fixture
def planner(env):
    """The emulator on device 0 with default planner settings, restored after the test."""
    env.set_device(0)
    yield env
    env.set_device(0)
    env.set_planner()


def plan(emu, kernel, shape, device=H100):
    n, H, W, s, K, d, C = shape
    return emu.plan_details(kernel, n, H, W, s, K, d, C, *device)


def chunks(kernel, d, C):
    return -(-C // 64) if kernel == FORWARD_V2 else -(-d // 32) + -(-C // 32)


# ------------------------------------------------------------------------------- cost model
@pytest.mark.parametrize("kernel", (FORWARD_V2, GATHER_V2), ids=("forward_v2", "gather_v2"))
def test_plan_waves_and_residency_follow_from_the_plan(planner, kernel):
    optin, per_sm_bytes, sms = H100
    for shape in ((8, 64, 64, 2, 5, 32, 256), (1, 120, 120, 2, 5, 32, 256),
                  (8, 64, 64, 4, 5, 32, 256), (8, 64, 64, 2, 3, 32, 256)):
        n, H, W, s, K, d, C = shape
        p = plan(planner, kernel, shape)
        assert p["tiled"], shape
        tiles = n * -(-H // p["TH"]) * -(-W // p["TW"])
        assert p["blocks"] == tiles * p["splits"], (shape, p)
        # registers allow 3 blocks (__launch_bounds__), shared memory maybe fewer
        assert p["per_sm"] == min(3, per_sm_bytes // (p["shared_bytes"] + 1024)), (shape, p)
        assert p["waves"] == pytest.approx(p["blocks"] / (sms * p["per_sm"]), rel=1e-12)
        assert p["shared_bytes"] <= optin and 1 <= p["splits"] <= chunks(kernel, d, C)
        r = K // 2
        if kernel == FORWARD_V2 and p["splits"] == 1:  # halo pixels per tile pixel
            halo = (p["TH"] + 2 * r) * (p["TW"] + 2 * r) / (p["TH"] * p["TW"])
            assert p["halo_ratio"] == pytest.approx(halo, rel=1e-12), (shape, p)
        assert p["halo_ratio"] > 1 and p["model_us"] > 0, (shape, p)


@pytest.mark.parametrize("kernel", (FORWARD_V2, GATHER_V2), ids=("forward_v2", "gather_v2"))
def test_plan_is_the_fastest_the_model_knows(planner, kernel):
    # Whatever tile cap or split a test forces, the model's time is no better than the plan's
    # (a split must beat the best unsplit plan by 10% to be taken).
    for shape in ((8, 64, 64, 2, 5, 32, 256), (1, 120, 120, 2, 5, 32, 256)):
        chosen = plan(planner, kernel, shape)
        unsplit_best = None
        for splits in range(1, min(8, chunks(kernel, shape[5], shape[6])) + 1):
            for cap in (1, 2, 4, 8, 16, 1 << 20):
                planner.set_planner(tile_cap=cap, channel_split=splits)
                other = plan(planner, kernel, shape)
                assert other["splits"] == splits, (shape, other)
                margin = 1.0 if splits == 1 or chosen["splits"] > 1 else 0.9
                assert chosen["model_us"] <= other["model_us"] / margin * (1 + 1e-12), (
                    shape, chosen, other)
                if splits == 1:
                    unsplit_best = min(unsplit_best or other["model_us"], other["model_us"])
        if chosen["splits"] > 1:
            assert chosen["model_us"] < 0.9 * unsplit_best, (shape, chosen, unsplit_best)
        planner.set_planner()


def test_plans_fill_the_device(planner):
    # The generic planner gave the authors' shape 225 forward blocks (0.57 waves) and K = 3
    # 0.65 waves; the cost model fills at least one wave there, by smaller tiles or a split.
    for shape in ((1, 120, 120, 2, 5, 32, 256), (8, 64, 64, 2, 3, 32, 256)):
        for kernel in (FORWARD_V2, GATHER_V2):
            p = plan(planner, kernel, shape)
            assert p["waves"] >= 1, (shape, kernel, p)
    # At s = 4 the generic pass 2 had 1 x 2 tiles with a halo 15x the tile; v2 does better.
    p = plan(planner, GATHER_V2, (8, 64, 64, 4, 5, 32, 256))
    assert p["TH"] * p["TW"] >= 4 and p["halo_ratio"] < 8, p
    # A grid of many waves has no reason to split: every split only adds staging.
    for kernel in (FORWARD_V2, GATHER_V2):
        assert plan(planner, kernel, (64, 64, 64, 2, 5, 32, 256))["splits"] == 1
    # A tiny grid on 132 SMs splits its channels; on one SM the same grid is a full wave.
    tiny = (1, 8, 8, 2, 5, 32, 256)
    assert plan(planner, FORWARD_V2, tiny)["splits"] > 1
    assert plan(planner, GATHER_V2, tiny)["splits"] > 1


@pytest.mark.parametrize("device", DEVICES, ids=DEVICES.keys())
def test_every_v2_plan_is_legal(planner, device):
    # Every specialisation, on shapes from one pixel to the presets, channel tails included:
    # tiled where one centre fits at all, within the block's shared memory, at least one
    # resident block, a split of at most one block per channel chunk. The planner is dtype-blind
    # (shared memory holds floats).
    optin, per_sm_bytes, sms = DEVICES[device]
    for K, s in SPECIALISED:
        for n, H, W, d, C in ((1, 1, 1, 4, 1), (2, 7, 5, 36, 70), (8, 64, 64, 32, 256),
                              (1, 3, 200, 16, 8)):
            for kernel in (FORWARD_V2, GATHER_V2):
                p = plan(planner, kernel, (n, H, W, s, K, d, C), DEVICES[device])
                where = (device, K, s, n, H, W, d, C, kernel, p)
                if not p["tiled"]:  # only where not even one centre fits (K = 7, s = 4 pass 2
                    # on 100 KB GPUs): the generic kernels run there
                    planner.set_planner(tile_cap=1)
                    assert not plan(planner, kernel, (n, H, W, s, K, d, C),
                                    DEVICES[device])["tiled"], where
                    planner.set_planner()
                    assert (K, s, kernel) == (7, 4, GATHER_V2) and optin < 200000, where
                    continue
                assert 0 < p["shared_bytes"] <= optin, where
                assert p["per_sm"] >= 1 and p["shared_bytes"] + 1024 <= per_sm_bytes, where
                assert 1 <= p["TH"] <= H and 1 <= p["TW"] <= W, where
                assert 1 <= p["splits"] <= max(1, chunks(kernel, d, C)), where


# ------------------------------------------------------------------- split changes no bit
SPLIT_CASES = {
    # d = 40: two key chunks; C = 200: four value chunks (forward), 2 + 7 chunks (pass 2)
    "K5-s2-softmax-f32": Case((1,), 6, 6, 2, 40, 200, 5, "softmax", "zeros"),
    "K3-s4-sigmoid-valid-bf16": Case((1,), 4, 3, 4, 8, 130, 3, "sigmoid", "valid", base.BF16),
}


@pytest.mark.parametrize("case", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_channel_split_is_bitwise_neutral(emu, planner, case):
    if case.dtype is None:
        pytest.skip("ml_dtypes not available")
    q, k, v, g = case.random_inputs(4)

    def run(device, **knobs):
        planner.set_device(device)
        planner.set_planner(**knobs)
        emu.take_launches()
        results = [a.copy() for a in base.run_emulated(
            emu, q, k, v, g, case.K, case.s, case.normalizer, case.border, case.eps)]
        return results, emu.take_launches()

    unsplit, _ = run(1, channel_split=1)
    for a in unsplit[:5]:
        assert np.isfinite(a).all()
    # the cost model's own split on 132 SMs (a short grid), then forced splits, uneven ones too
    for device, knobs in ((1, {}), (0, {"channel_split": 2}), (0, {"channel_split": 3}),
                          (0, {"channel_split": 8})):
        got, split_launches = run(device, **knobs)
        # forward and pass 2 ran split, as planned (pass 1 is no v2 kernel)
        shape = (1, case.H, case.W, case.s, case.K, case.d, case.C)
        for i, kernel in ((0, FORWARD_V2), (2, GATHER_V2)):
            p = plan(planner, kernel, shape, EMULATED[device])
            assert p["splits"] > 1, (device, knobs, p)
            assert split_launches[i] == (p["blocks"], 256, p["shared_bytes"]), (p, split_launches)
        changed = base.differing(unsplit, got)
        assert not changed, f"device {device}, {knobs}: the split changed {changed}"


# ---------------------------------------------------------------------------- host side
def test_device_comes_from_the_stream_and_opt_ins_are_set_once(emu, planner):
    # 8 x 8 centres at K = 5, s = 2: pass 2's v2 tile needs more than the 48 KiB default.
    case = Case((1,), 8, 8, 2, 32, 64, 5, "softmax", "zeros")
    q, k, v, g = case.random_inputs(5)

    def run():
        emu.take_launches()
        base.run_emulated(emu, q, k, v, g, case.K, case.s, case.normalizer, case.border,
                          case.eps)
        return emu.take_launches(with_device=True)

    for device, limits in EMULATED.items():
        planner.set_device(device)
        emu.runtime_calls(reset=True)
        opt_ins_before = sum(n for _, n in emu.opt_in_calls())
        launched = [run() for _ in range(4)]
        calls = emu.runtime_calls()
        assert calls["cudaGetDevice"] == 0, calls  # the device is the stream's
        assert calls["cudaStreamGetDevice"] >= 8, calls  # asked on every call
        assert all(l[3] == device for ls in launched for l in ls), launched
        assert all(ls == launched[0] for ls in launched), launched
        assert any(l[2] > 48 * 1024 for l in launched[0]), launched[0]
        # limits once per device over the session: at most the first call's three queries
        assert calls["cudaDeviceGetAttribute"] <= 3, calls
        opt_ins = emu.opt_in_calls()
        assert all(n == 1 for _, n in opt_ins), opt_ins  # once per (device, kernel)
        assert any(dev == device for dev, _ in opt_ins), opt_ins
        assert sum(n for _, n in opt_ins) - opt_ins_before <= 3, opt_ins  # first call only
        # The stream's device decides the plans: the v2 grids are the planner's for its limits.
        shape = (1, case.H, case.W, case.s, case.K, case.d, case.C)
        assert launched[0][0][:3] == (plan(emu, FORWARD_V2, shape, limits)["blocks"], 256,
                                      plan(emu, FORWARD_V2, shape, limits)["shared_bytes"])
        assert launched[0][2][:3] == (plan(emu, GATHER_V2, shape, limits)["blocks"], 256,
                                      plan(emu, GATHER_V2, shape, limits)["shared_bytes"])
    assert plan(emu, FORWARD_V2, shape, EMULATED[0]) != plan(emu, FORWARD_V2, shape)


def test_a_stream_of_another_device_is_refused_not_mixed(emu, planner):
    # The limits and opt-ins are those of the stream's device; a launch on a stream that is not
    # the current device's fails as on a GPU, and the handler reports it instead of crashing.
    case = Case((1,), 3, 4, 2, 8, 8, 3, "softmax", "zeros")
    q, k, v, g = case.random_inputs(6)
    planner.set_device(0, stream_device=1)
    out = np.zeros((1, 6, 8, 8), np.float32)
    stats = np.zeros((1, 6, 8, 2), np.float32)
    codes = emu.contract()
    msg = emu.forward(q, k, v, out, stats, 3, 2, codes["normalizers"]["softmax"],
                      codes["borders"]["zeros"], 1e-6)
    assert "launch failed" in msg and "stream of device 1" in msg, msg
    # the legacy default stream (nullptr) belongs to the current device
    planner.set_device(1, stream_device=-2)
    emu.take_launches()
    assert emu.forward(q, k, v, out, stats, 3, 2, codes["normalizers"]["softmax"],
                       codes["borders"]["zeros"], 1e-6) == ""
    assert all(l[3] == 1 for l in emu.take_launches(with_device=True))


def test_carafe_grid_comes_from_the_stream_device(carafe_emu_module):
    carafe = carafe_emu_module
    K, s, G = 3, 2, 1
    x, logits, g = inputs(0, (1,), 12, 12, s, G, K, 4, np.float32)
    grids = {}
    try:
        for device in (0, 1, 0, 1):
            carafe.set_device(device)
            carafe.runtime_calls(reset=True)
            carafe.take_launches()
            run_carafe(carafe, x, logits, g, K, s, G, "softmax")
            launched = carafe.take_launches(with_device=True)
            calls = carafe.runtime_calls()
            assert calls["cudaGetDevice"] == 0, calls
            assert all(l[3] == device for l in launched), launched
            if device in grids:  # limits were queried on the first call on this device only
                assert calls["cudaDeviceGetAttribute"] == 0, calls
                assert launched == grids[device]
            grids[device] = launched
    finally:
        carafe.set_device(0)
    # 576 points on 8 warps a block: 72 blocks, capped at 32 per SM; dx: 576 elements, 3 blocks
    assert [l[0] for l in grids[0]] == [32, 32, 3], grids
    assert [l[0] for l in grids[1]] == [72, 72, 3], grids

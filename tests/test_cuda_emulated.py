"""The CUDA kernels of xla_ffi/sapa_cuda.cu, run on the CPU and checked against the jnp reference.

There is no GPU on the development machine nor in CI, so nvcc only proves that the CUDA source
compiles. This test runs the *same source* on the CPU: tests/cuda_emulator/transform.py rewrites
the two constructs a header cannot emulate (the `extern __shared__` declaration and the
`kernel<T><<<...>>>(...)` launches), and g++ compiles the result against shim headers
(tests/cuda_emulator/include/) that provide blocks, threads, `__syncthreads`, `__syncwarp`,
`__shfl_xor_sync`, dynamic shared memory, the bf16/f16 types and the runtime calls the planner
makes. The FFI implementation functions (validation, tile planner, launches, kernels) are called
through a small pybind11 module, and the outputs and dq/dk/dv are compared with the float64
`sapa_upsample(..., impl="xla")`.

What it catches: index and halo arithmetic, tiling and tile edges, the grid-stride loops,
channel chunking and tails, normaliser and border logic, bf16/f16 conversion, f32 accuracy,
reads of shared memory that was never staged (it is NaN-filled before every block), writes
past the end of dynamic shared memory (a NaN guard), barriers a warp does not agree on
(reported as a deadlock), launches that exceed the shared memory they opted in to, and the
error path of malformed calls.

What it does NOT catch: data races inside a barrier interval (the threads of a block are fibers
that run one at a time, in order, so a missing `__syncthreads` between a write and another
thread's read can go unnoticed), misaligned vector loads (x86 tolerates them), memory
coalescing, bank conflicts, register pressure, the real shared-memory and occupancy limits of a
given GPU beyond the H100 numbers the shim reports, fast-math intrinsics differences, and speed.
The tests marked `gpu` in test_gpu.py remain the only check on real hardware.

The emulator is built once per session into a temporary directory (g++ -O1, a few seconds).
The test is skipped when g++ or pybind11 is missing, and FAILS when the transform no longer
matches the CUDA source, so a changed .cu can never be tested stale.
"""
from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sapa_jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cuda_emulator import build as emu_build  # noqa: E402

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # jax depends on ml_dtypes, so this is only a safety net
    BF16 = None

NORMALIZERS = ("softmax", "relu", "sigmoid", "softplus")
BORDERS = ("zeros", "valid")
# Max abs error over max |reference|. f32: the kernels accumulate in f32 in a different order
# than the float64 reference (measured <= 8.6e-6). bf16/f16: one rounding of every stored
# value (inputs are rounded identically for both sides), 2^-9 and 2^-12 relative.
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3, BF16: 1e-2}
ENV_KNOBS = ("SAPA_CUDA_FORCE_SIMPLE", "SAPA_CUDA_TILE_CAP")


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    try:
        return emu_build.build(tmp_path_factory.mktemp("cuda_emulator"))
    except emu_build.ToolMissing as e:
        pytest.skip(f"cannot build the CUDA emulator: {e}")
    except emu_build.BuildFailed as e:
        pytest.fail(str(e), pytrace=False)
    except emu_build.TransformMismatch as e:
        pytest.fail(f"xla_ffi/sapa_cuda.cu no longer matches tests/cuda_emulator/transform.py: {e}",
                    pytrace=False)


@pytest.fixture
def env(monkeypatch):
    """Planner knobs cleared; the test sets the ones it needs."""
    for name in ENV_KNOBS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def run_emulated(emu, q, k, v, g, K, s, normalizer, border, eps):
    """Forward then backward through the emulated FFI handlers; NaN-filled outputs."""
    lead, oH, oW = q.shape[:-3], q.shape[-3], q.shape[-2]
    T, C = K * K, v.shape[-1]
    out = np.full(lead + (oH, oW, C), np.nan, q.dtype)
    stats = np.full(lead + (oH, oW, 2), np.nan, np.float32)
    attrs = (K, s, NORMALIZERS.index(normalizer), BORDERS.index(border), np.float32(eps))
    assert emu.forward(q, k, v, out, stats, *attrs) == ""
    dq, dk, dv = (np.full(a.shape, np.nan, a.dtype) for a in (q, k, v))
    w_scratch = np.full(lead + (oH, oW, T), np.nan, np.float32)
    dlogit_scratch = w_scratch.copy()
    assert emu.backward(q, k, v, stats, g, dq, dk, dv, w_scratch, dlogit_scratch, *attrs) == ""
    return out, stats, dq, dk, dv


def reference(q, k, v, g, K, s, normalizer, border, eps):
    """float64 jnp out, dq, dk, dv; leading dims flattened into one batch axis."""
    flat = [jnp.asarray(a.reshape((-1,) + a.shape[-3:]).astype(np.float64)) for a in (q, k, v, g)]

    @jax.jit  # one compile beats op-by-op dispatch of the K*K patch ops by seconds per case
    def out_and_grads(q, k, v, g):
        fn = lambda q, k, v: sapa_jax.sapa_upsample(  # noqa: E731
            q, k, v, kernel_size=K, scale=s, normalizer=normalizer, border=border, eps=eps,
            impl="xla")
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))

    return [np.asarray(a) for a in out_and_grads(*flat)]


# lead, H, W, s, d, C, K, normalizer, border, eps, dtype, env, path; path = expected plan:
# "tiled", "simple", or an int: the tile cap, checked through the grid of the launches.
CASES = {
    "softmax-zeros-s2-K3": ((1,), 5, 6, 2, 8, 16, 3, "softmax", "zeros", 1e-6, np.float32, {},
                            "tiled"),
    "softmax-valid-K7-map-smaller-than-kernel": ((1,), 3, 2, 2, 40, 13, 7, "softmax", "valid",
                                                 1e-6, np.float32, {}, "tiled"),
    "relu-zeros-s1-rank5": ((2, 1), 6, 5, 1, 5, 3, 3, "relu", "zeros", 1e-6, np.float32, {},
                            "tiled"),
    "sigmoid-valid-s3-K5-C65": ((1,), 3, 4, 3, 7, 65, 5, "sigmoid", "valid", 1e-6, np.float32,
                                {}, "tiled"),
    "softmax-valid-s4-K1": ((1,), 3, 4, 4, 3, 13, 1, "softmax", "valid", 1e-6, np.float32, {},
                            "tiled"),
    # K = 1 with an h-normaliser: w = h / (h + eps) is 1 - O(eps), so dlogit = h' eps dw / (h +
    # eps)^2 is all cancellation unless computed in DESIGN.md's cancellation-free form (the
    # kernels once used h' (dw_p - sum_j w_j dw_j) / (S + eps) and lost ~3 digits here).
    "softplus-zeros-s4-K1": ((1,), 3, 4, 4, 3, 13, 1, "softplus", "zeros", 1e-6, np.float32, {},
                             "tiled"),
    "relu-zeros-s2-K1-simple": ((1,), 3, 4, 2, 3, 13, 1, "relu", "zeros", 1e-6, np.float32,
                                {"SAPA_CUDA_FORCE_SIMPLE": "1"}, "simple"),
    "relu-valid-K9-eps0-f16": ((1,), 2, 2, 2, 4, 6, 9, "relu", "valid", 0.0, np.float16, {},
                               "tiled"),
    "softmax-zeros-K5-bf16": ((1,), 4, 5, 2, 33, 40, 5, "softmax", "zeros", 1e-6, BF16, {},
                              "tiled"),
    # 320 output points > the 256 that 32 blocks of 8 warps cover: the grid-stride loop wraps.
    "sigmoid-zeros-forced-simple": ((1,), 10, 8, 2, 7, 13, 5, "sigmoid", "zeros", 1e-6,
                                    np.float32, {"SAPA_CUDA_FORCE_SIMPLE": "1"}, "simple"),
    "softplus-valid-tile-cap-2": ((1,), 5, 7, 2, 9, 20, 3, "softplus", "valid", 1e-6, np.float32,
                                  {"SAPA_CUDA_TILE_CAP": "2"}, 2),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(emu, env, x64, case):
    lead, H, W, s, d, C, K, normalizer, border, eps, dtype, knobs, path = case
    if dtype is None:
        pytest.skip("ml_dtypes not available")
    for name, value in knobs.items():
        env.setenv(name, value)
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal(lead + shape).astype(dtype)
                  for shape in ((H * s, W * s, d), (H, W, d), (H, W, C), (H * s, W * s, C)))

    emu.take_launches()
    got = run_emulated(emu, q, k, v, g, K, s, normalizer, border, eps)
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

    out, stats, dq, dk, dv = got
    assert np.isfinite(stats).all()
    want = reference(q, k, v, g, K, s, normalizer, border, eps)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        a = a.reshape(b.shape).astype(np.float64)
        assert np.isfinite(a).all(), f"{name}: non-finite values (unwritten or NaN shared memory)"
        err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
        assert err <= TOL[np.dtype(dtype)], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("simple", [False, True], ids=["tiled", "simple"])
def test_all_zero_relu_window_gives_exact_zeros(emu, env, border, simple):
    # q > 0 and k < 0: every inside logit is negative, outside ones are 0, so relu gives h = 0
    # everywhere; with eps = 0 the weights must be 0 (not NaN) and so must everything after.
    if simple:
        env.setenv("SAPA_CUDA_FORCE_SIMPLE", "1")
    H, W, s, d, C, K = 4, 5, 2, 6, 7, 3
    rng = np.random.default_rng(1)
    q = (np.abs(rng.standard_normal((1, H * s, W * s, d))) + 0.1).astype(np.float32)
    k = (-np.abs(rng.standard_normal((1, H, W, d))) - 0.1).astype(np.float32)
    v = rng.standard_normal((1, H, W, C)).astype(np.float32)
    g = rng.standard_normal((1, H * s, W * s, C)).astype(np.float32)
    for name, a in zip(("out", "stats", "dq", "dk", "dv"),
                       run_emulated(emu, q, k, v, g, K, s, "relu", border, 0.0)):
        assert np.all(a == 0), f"{name} is not exactly zero: max |{name}| = {np.nanmax(np.abs(a))}"


def test_malformed_calls_return_errors(emu, env):
    f32 = np.float32
    q, k, v = np.zeros((1, 4, 4, 3), f32), np.zeros((1, 2, 2, 3), f32), np.zeros((1, 2, 2, 5), f32)
    out, stats = np.zeros((1, 4, 4, 5), f32), np.zeros((1, 4, 4, 2), f32)
    eps = np.float32(1e-6)
    emu.take_launches()
    bad_forward = {
        "kernel_size must be a positive odd": (q, k, v, out, stats, 4, 2, 0, 0, eps),
        "q has shape": (q, k, v, out, stats, 3, 3, 0, 0, eps),  # scale disagrees with q
        "normalizer code": (q, k, v, out, stats, 3, 2, 7, 0, eps),
        "v has shape": (q, k, np.zeros((1, 2, 3, 5), f32), out, stats, 3, 2, 0, 0, eps),
        "out has shape": (q, k, v, np.zeros((1, 4, 4, 4), f32), stats, 3, 2, 0, 0, eps),
        "float64 is not supported": (q.astype(np.float64), k.astype(np.float64),
                                     v.astype(np.float64), out.astype(np.float64), stats,
                                     3, 2, 0, 0, eps),
    }
    for expected, args in bad_forward.items():
        assert expected in emu.forward(*args)
    w = np.zeros((1, 4, 4, 9), f32)
    err = emu.backward(q, k, v, stats.astype(np.float64), out, q.copy(), k.copy(), v.copy(), w,
                       w.copy(), 3, 2, 0, 0, eps)
    assert "stats has element type float64" in err
    assert emu.take_launches() == [], "a malformed call launched a kernel"
    assert emu.forward(q, k, v, out, stats, 3, 2, 0, 0, eps) == ""  # still usable afterwards

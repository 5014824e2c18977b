"""The fused CUDA kernels (xla_ffi/sapa_cuda.cu, xla_ffi/cuda/) on a GPU.

Truth is the patch-based jnp core (`impl="xla"`, HIGHEST precision) on the same GPU, and, where
torch with CUDA is importable, the independent PyTorch oracle of tests/torch_reference.py. Every
comparison covers the output and the gradients w.r.t. q, k and v (`jax.vjp` with a random
cotangent). Errors are max|ffi - ref| / max|ref| per array (kernel_cases.assert_close).

The CUDA module has a test-only planner API, `sapa_jax._sapa_cuda.set_planner(force_simple,
tile_cap)`: force_simple selects the simple (no shared memory) kernels, tile_cap=n caps the tile
at n x n low-res centres; both are used here to cover every code path on small shapes.
SAPA_CUDA_FORCE_SIMPLE=1 in the environment makes this file run every test on the simple kernels
(scripts/gpu_check.sh; read here in Python, the compiled module reads no environment).

All tests are marked `gpu` and skipped (tests/conftest.py) when JAX sees no GPU.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kernel_cases
import sapa_jax
from conftest import random_qkv

pytestmark = pytest.mark.gpu


def _planner(force_simple=False, tile_cap=1 << 20):
    import sapa_jax._sapa_cuda as cuda_module  # only built where nvcc was found
    cuda_module.set_planner(force_simple=force_simple, tile_cap=tile_cap)


@pytest.fixture(autouse=True)
def _planner_settings():
    """Default planner (or the simple kernels throughout, see the module docstring) around
    every test, whatever a test set."""
    default = dict(force_simple=os.environ.get("SAPA_CUDA_FORCE_SIMPLE", "") == "1")
    if sapa_jax.ffi_available("gpu"):
        _planner(**default)
    yield
    if sapa_jax.ffi_available("gpu"):
        _planner(**default)

F32, BF16, F16 = np.float32, ml_dtypes.bfloat16, np.float16
# Normalised max error allowed per dtype: f32 is tight (both sides accumulate in f32); the 16-bit
# types differ by the final rounding of the output and gradients (bf16 ulp 2^-8, f16 ulp 2^-11).
TOL = {np.dtype(F32): 5e-5, np.dtype(BF16): 2e-2, np.dtype(F16): 4e-3}


def _gpu():
    return jax.devices("gpu")[0]


def _put(*arrays):
    return [jax.device_put(a, _gpu()) for a in arrays]


def _inputs(batch, height, width, scale, dim, channels, dtype, seed=0, magnitude=1.0):
    q, k, v = random_qkv(seed, batch, height, width, scale, dim, channels, np.float32, magnitude)
    g = np.random.default_rng(seed + 1).standard_normal(
        (batch, height * scale, width * scale, channels)).astype(np.float32)
    return _put(*(a.astype(dtype) for a in (q, k, v, g)))


def _out_and_grads(q, k, v, g, impl, **opts):
    def core(q, k, v):
        return sapa_jax.sapa_upsample(q, k, v, impl=impl, **opts)

    out, vjp = jax.vjp(core, q, k, v)
    return (out, *vjp(g))


def _compare(case: kernel_cases.Case, seed=0, magnitude=1.0):
    q, k, v, g = _inputs(case.lead[0], case.H, case.W, case.s, case.d, case.C, case.dtype, seed,
                         magnitude)
    got = _out_and_grads(q, k, v, g, "ffi", **case.options)
    want = _out_and_grads(q, k, v, g, "xla", **case.options)
    for a in got:
        assert a.dtype == np.dtype(case.dtype)
        assert next(iter(a.devices())).platform == "gpu"
    kernel_cases.assert_close(got, want, TOL[np.dtype(case.dtype)], "GPU " + case.label())
    return got


def _case(batch, height, width, scale, dim, channels, kernel_size, normalizer, border,
          dtype=F32):
    return kernel_cases.Case((batch,), height, width, scale, dim, channels, kernel_size,
                             normalizer, border, dtype)


# Pairwise coverage: every normalizer with both borders, scales 1-4, K 1/3/5/7/9, maps smaller
# than the kernel, batch 1 and 5, channel counts that are not multiples of 4/8/32 (and d, C over
# one 32/64-channel chunk), all three dtypes.
CASES = [
    # batch, H, W, s, d, C, K, normalizer, border, dtype
    _case(1, 8, 8, 2, 16, 32, 5, "softmax", "zeros", F32),
    _case(5, 7, 9, 2, 32, 64, 5, "softmax", "valid", F32),
    _case(2, 6, 5, 1, 5, 3, 3, "relu", "zeros", F32),
    _case(1, 5, 7, 3, 7, 37, 5, "sigmoid", "valid", F32),
    _case(2, 5, 4, 4, 3, 65, 3, "softplus", "zeros", F32),
    _case(1, 3, 2, 2, 40, 13, 7, "softmax", "valid", F32),
    _case(1, 2, 3, 2, 4, 6, 9, "relu", "valid", F32),
    _case(3, 9, 10, 2, 16, 130, 1, "softmax", "zeros", F32),
    _case(1, 11, 13, 2, 9, 70, 9, "sigmoid", "zeros", F32),
    _case(1, 17, 18, 2, 32, 100, 3, "softplus", "valid", F32),
    _case(2, 12, 10, 2, 33, 96, 5, "softmax", "zeros", BF16),
    _case(1, 6, 7, 3, 8, 24, 3, "relu", "valid", F16),
    _case(5, 4, 6, 4, 12, 20, 7, "softplus", "valid", BF16),
    _case(1, 10, 12, 1, 24, 48, 5, "sigmoid", "zeros", F16),
    _case(1, 8, 8, 2, 16, 32, 5, "none", "zeros", F32),   # the logits are the weights
    _case(2, 5, 7, 3, 7, 37, 3, "none", "valid", BF16),
]


@pytest.mark.gpu
def test_cuda_module_is_registered():
    assert sapa_jax.ffi_available("gpu"), "a GPU is visible but the CUDA FFI module is not built"


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label().replace(" ", "-"))
def test_ffi_matches_jnp(case):
    _compare(case)


@pytest.mark.gpu
@pytest.mark.parametrize("normalizer", ["softmax", "softplus"])
def test_large_logits(normalizer):
    # |logit| up to ~100: the max-subtracted softmax and the overflow-free softplus must hold.
    _compare(_case(2, 9, 8, 2, 16, 24, 5, normalizer, "valid"), magnitude=3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("border", ["zeros", "valid"])
@pytest.mark.parametrize("force_simple", ["0", "1"])
def test_all_zero_relu_windows_give_zeros(monkeypatch, border, force_simple):
    # q > 0 and k < 0: every inside logit is negative, every outside one 0, so relu gives h = 0
    # for the whole window; with eps = 0 the weights, output and gradients must be 0, not NaN.
    _planner(force_simple=force_simple == "1")
    rng = np.random.default_rng(3)
    q = np.abs(rng.standard_normal((2, 8, 10, 6))).astype(F32) + 0.1
    k = -np.abs(rng.standard_normal((2, 4, 5, 6))).astype(F32) - 0.1
    v = rng.standard_normal((2, 4, 5, 7)).astype(F32)
    g = rng.standard_normal((2, 8, 10, 7)).astype(F32)
    q, k, v, g = _put(q, k, v, g)
    got = _out_and_grads(q, k, v, g, "ffi", kernel_size=3, scale=2, normalizer="relu",
                         border=border, eps=0.0)
    for name, a in zip(("out", "dq", "dk", "dv"), got):
        a = np.asarray(a)
        assert np.all(a == 0), f"{name} is not all zero (NaN: {np.isnan(a).any()})"


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5], CASES[10], CASES[12]],
                         ids=["softmax-valid", "sigmoid-s3", "small-map", "bf16", "s4-bf16"])
def test_simple_kernels_match(monkeypatch, case):
    """The fallback kernels (chosen automatically for huge K or s) on ordinary shapes."""
    _planner(force_simple=True)
    _compare(case)


@pytest.mark.gpu
@pytest.mark.parametrize("cap", ["1", "3"])
def test_small_tiles_match(monkeypatch, cap):
    """Many partial tiles and halos clipped on every side."""
    _planner(tile_cap=int(cap))
    _compare(_case(2, 13, 11, 2, 20, 70, 5, "softmax", "zeros"))
    _compare(_case(1, 10, 9, 3, 9, 33, 7, "sigmoid", "valid"))


@pytest.mark.gpu
@pytest.mark.parametrize("normalizer", ["softmax", "relu"])
def test_kernel_too_large_for_shared_memory_falls_back(normalizer):
    # K = 61, s = 4: even one centre's K*K*16 weights exceed any GPU's shared memory per block,
    # so the planner must pick the simple kernels. With border "valid" every window of a 2 x 3
    # map covers the whole map for any K >= 5, so the jnp core at K = 5 is the reference (at
    # K = 61 its 3721 stacked patches take minutes to compile).
    q, k, v, g = _inputs(1, 2, 3, 4, 3, 5, F32, seed=17)
    opts = dict(scale=4, normalizer=normalizer, border="valid", eps=1e-6)
    got = _out_and_grads(q, k, v, g, "ffi", kernel_size=61, **opts)
    want = _out_and_grads(q, k, v, g, "xla", kernel_size=5, **opts)
    kernel_cases.assert_close(got, want, TOL[np.dtype(F32)], f"GPU K=61 {normalizer}")


@pytest.mark.gpu
def test_backward_is_deterministic():
    q, k, v, g = _inputs(2, 24, 20, 2, 32, 96, F32, seed=7)
    opts = dict(kernel_size=5, scale=2, normalizer="softmax", border="zeros", eps=1e-6)
    grads = jax.jit(lambda q, k, v, g: _out_and_grads(q, k, v, g, "ffi", **opts))
    first = [np.asarray(a) for a in grads(q, k, v, g)]
    for _ in range(3):
        again = [np.asarray(a) for a in grads(q, k, v, g)]
        for a, b in zip(first, again):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.gpu
def test_large_shape():
    # The benchmark shape of docs/design.md §3: out is 8 x 128 x 128 x 256.
    got = _compare(_case(8, 64, 64, 2, 32, 256, 5, "softmax", "zeros"), seed=11)
    assert got[0].shape == (8, 128, 128, 256)


@pytest.mark.gpu
def test_jit_runs_the_custom_call():
    q, k, v, _ = _inputs(2, 8, 6, 2, 16, 24, F32)
    opts = dict(kernel_size=5, scale=2, normalizer="sigmoid", border="valid", eps=1e-6)

    def ffi(q, k, v):
        return sapa_jax.sapa_upsample(q, k, v, impl="ffi", **opts)

    hlo = jax.jit(ffi).lower(q, k, v).as_text()
    assert "sapa_forward" in hlo
    grad_hlo = jax.jit(jax.grad(lambda q, k, v: ffi(q, k, v).sum(), argnums=(0, 1, 2))).lower(
        q, k, v).as_text()
    assert "sapa_backward" in grad_hlo
    got = jax.jit(ffi)(q, k, v)
    want = sapa_jax.sapa_upsample(q, k, v, impl="xla", **opts)
    assert kernel_cases.relative_error(got, want) <= TOL[np.dtype(F32)]


@pytest.mark.gpu
@pytest.mark.parametrize("in_axes", [(0, 0, 0), (0, None, 0), (None, 0, None)])
def test_vmap(in_axes):
    # vmap over an extra leading axis: the kernel sees rank-5 buffers and folds the leading dims.
    rng = np.random.default_rng(5)
    shapes = {"q": (3, 2, 10, 12, 8), "k": (3, 2, 5, 6, 8), "v": (3, 2, 5, 6, 19)}
    arrays = []
    for name, axis in zip("qkv", in_axes):
        shape = shapes[name] if axis == 0 else shapes[name][1:]
        arrays.append(rng.standard_normal(shape).astype(F32))
    q, k, v = _put(*arrays)
    g = _put(rng.standard_normal((3, 2, 10, 12, 19)).astype(F32))[0]
    opts = dict(kernel_size=3, scale=2, normalizer="softmax", border="zeros", eps=1e-6)

    def batched(impl):
        fn = jax.vmap(lambda q, k, v: sapa_jax.sapa_upsample(q, k, v, impl=impl, **opts),
                      in_axes=in_axes)
        out, vjp = jax.vjp(jax.jit(fn), q, k, v)
        return (out, *vjp(g))

    kernel_cases.assert_close(batched("ffi"), batched("xla"), TOL[np.dtype(F32)],
                              f"GPU vmap {in_axes}")


@pytest.mark.gpu
def test_bad_calls_return_errors_not_crashes():
    """The handlers validate shapes and attributes and report an error to XLA instead of aborting."""
    q, k, v, _ = _inputs(1, 4, 4, 2, 8, 6, F32)
    attrs = dict(kernel_size=np.int64(3), scale=np.int64(2), normalizer=np.int64(0),
                 border=np.int64(0), eps=np.float64(1e-6))

    def forward(stats_shape, **changes):
        results = (jax.ShapeDtypeStruct((1, 8, 8, 6), jnp.float32),
                   jax.ShapeDtypeStruct(stats_shape, jnp.float32))
        call = jax.ffi.ffi_call("sapa_forward", results)
        return jax.block_until_ready(call(q, k, v, **{**attrs, **changes}))

    with pytest.raises(Exception, match="stats"):
        forward((1, 8, 8, 3))
    with pytest.raises(Exception, match="kernel_size"):
        forward((1, 8, 8, 2), kernel_size=np.int64(4))
    with pytest.raises(Exception, match="scale|shape"):
        forward((1, 8, 8, 2), scale=np.int64(3))
    # The process and the device are still fine afterwards.
    out, stats = forward((1, 8, 8, 2))
    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(stats)))


@pytest.mark.gpu
@pytest.mark.parametrize("normalizer,border,scale,kernel_size", [
    ("softmax", "zeros", 2, 5), ("softmax", "valid", 3, 3), ("relu", "zeros", 2, 7),
    ("sigmoid", "valid", 1, 5), ("softplus", "zeros", 4, 3)])
def test_parity_with_torch_on_gpu(normalizer, border, scale, kernel_size):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    from torch_reference import sapa_core_torch

    batch, height, width, dim, channels = 2, 7, 6, 12, 21
    q, k, v, g = _inputs(batch, height, width, scale, dim, channels, F32, seed=13)
    opts = dict(kernel_size=kernel_size, scale=scale, normalizer=normalizer, border=border,
                eps=1e-6)
    got = _out_and_grads(q, k, v, g, "ffi", **opts)

    def cuda64(a):
        return torch.tensor(np.asarray(a, np.float64), device="cuda", requires_grad=True)

    tq, tk, tv = (cuda64(a) for a in (q, k, v))
    out = sapa_core_torch(tq, tk, tv, kernel_size, scale, normalizer, border, 1e-6)
    out.backward(torch.tensor(np.asarray(g, np.float64), device="cuda"))
    want = [t.detach().cpu().numpy() for t in (out, tq.grad, tk.grad, tv.grad)]
    kernel_cases.assert_close(got, want, TOL[np.dtype(F32)],
                              f"GPU torch {normalizer}/{border} s={scale} K={kernel_size}")


@pytest.mark.gpu
@pytest.mark.parametrize("normalizer", sapa_jax._checks.NORMALIZERS)
@pytest.mark.parametrize("border", ["zeros", "valid"])
@pytest.mark.parametrize("force_simple", [False, True], ids=["tiled", "simple"])
def test_nonfinite_inputs_propagate_as_in_jnp(normalizer, border, force_simple):
    # kernel_cases.py: NaN and +-Inf in q, k, v; the isnan masks must equal impl="xla"'s.
    _planner(force_simple=force_simple)
    opts = dict(kernel_size=kernel_cases.NONFINITE_KERNEL_SIZE,
                scale=kernel_cases.NONFINITE_SHAPE[3], normalizer=normalizer, border=border,
                eps=1e-6)
    run = {impl: jax.jit(lambda q, k, v, g, impl=impl: _out_and_grads(q, k, v, g, impl, **opts))
           for impl in ("ffi", "xla")}
    for case in kernel_cases.nonfinite_cases():
        args = _put(*kernel_cases.nonfinite_inputs(case))
        got, want = ([np.asarray(a) for a in run[impl](*args)] for impl in ("ffi", "xla"))
        kernel_cases.assert_same_nan(got, want, f"{normalizer}/{border}, {case}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", kernel_cases.BAD_FORWARD_CALLS.values(),
                         ids=kernel_cases.BAD_FORWARD_CALLS.keys())
def test_bad_calls_give_the_shared_messages(case):
    from sapa_jax import _ffi
    shapes, attrs, message = case
    q, k, v = _put(*(np.ones(s, np.float32) for s in shapes))
    with pytest.raises(Exception) as err:
        jax.block_until_ready(_ffi.forward_call(q, k, v, _ffi.Options(*attrs)))
    assert message in str(err.value)

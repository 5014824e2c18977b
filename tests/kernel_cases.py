"""Cases and comparisons shared by the kernel tests (test_ffi, test_cuda_emulated, test_gpu)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

RESULT_NAMES = ("out", "dq", "dk", "dv")


class Case(NamedTuple):
    """One kernel problem: q (*lead, s H, s W, d), k (*lead, H, W, d), v (*lead, H, W, C)."""
    lead: tuple
    H: int
    W: int
    s: int
    d: int
    C: int
    K: int
    normalizer: str
    border: str
    dtype: Any = np.float32
    eps: float = 1e-6

    @property
    def options(self) -> dict:
        """The keyword arguments of sapa_upsample."""
        return dict(kernel_size=self.K, scale=self.s, normalizer=self.normalizer,
                    border=self.border, eps=self.eps)

    def label(self) -> str:
        return (f"lead={self.lead} {self.H}x{self.W} s={self.s} d={self.d} C={self.C} "
                f"K={self.K} {self.normalizer}/{self.border} {np.dtype(self.dtype).name}")

    def random_inputs(self, seed=0, dtype=None):
        """Standard-normal q, k, v and the cotangent g (NumPy, `dtype` or the case's)."""
        rng = np.random.default_rng(seed)
        shapes = ((self.H * self.s, self.W * self.s, self.d), (self.H, self.W, self.d),
                  (self.H, self.W, self.C), (self.H * self.s, self.W * self.s, self.C))
        return [rng.standard_normal(self.lead + shape).astype(dtype or self.dtype)
                for shape in shapes]


def relative_error(got, want) -> float:
    """max |got - want| / max |want|; got must be finite and of want's size."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.size == want.size, (got.shape, want.shape)
    assert np.isfinite(got).all(), "non-finite values from the kernel"
    return float(np.max(np.abs(got.reshape(want.shape) - want), initial=0.0)
                 / max(np.max(np.abs(want), initial=0.0), 1e-30))


def assert_close(got, want, tol, label="", names=RESULT_NAMES):
    """relative_error of each result (out, dq, dk, dv) within tol; prints them."""
    errors = {name: relative_error(a, b) for name, a, b in zip(names, got, want)}
    print(f"{label} " + " ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"{label}: errors above {tol}: {bad}"

# ----------------------------------------------------------------------- non-finite values
# docs/design.md §2: a NaN or an infinity in q, k or v makes exactly the output points and
# gradient entries NaN that the jnp formulation makes NaN, on every back end. One non-finite
# entry goes into one tensor at a time, near the map's corner (so that out-of-map taps are
# involved) and in the middle.
NONFINITE_SHAPE = (1, 3, 4, 2, 3, 4)  # batch, H, W, s, d, C  (K = 3)
NONFINITE_KERNEL_SIZE = 3
NONFINITE_PLACES = {"q": [(0, 0, 1, 2), (0, 3, 4, 0)], "k": [(0, 0, 0, 1), (0, 1, 2, 0)],
                    "v": [(0, 0, 3, 3), (0, 1, 1, 0)]}


def nonfinite_cases():
    """(tensor name, index, value): every tensor, place and kind of non-finite value."""
    return [(name, index, value) for name, places in NONFINITE_PLACES.items()
            for index in places for value in (np.nan, np.inf, -np.inf)]


def nonfinite_inputs(case, seed=7):
    """q, k, v, g (float32 NumPy) with the case's entry set; g is finite."""
    name, index, value = case
    batch, height, width, scale, dim, channels = NONFINITE_SHAPE
    rng = np.random.default_rng(seed)
    args = {"q": rng.standard_normal((batch, height * scale, width * scale, dim)),
            "k": rng.standard_normal((batch, height, width, dim)),
            "v": rng.standard_normal((batch, height, width, channels))}
    g = rng.standard_normal((batch, height * scale, width * scale, channels))
    args[name][index] = value
    return [a.astype(np.float32) for a in (args["q"], args["k"], args["v"], g)]


def assert_same_nan(got, want, where, names=("out", "dq", "dk", "dv")):
    """Equal isnan masks; where both are not NaN the values agree (infinities by sign)."""
    for name, a, b in zip(names, got, want):
        a, b = np.asarray(a, np.float64).reshape(np.shape(b)), np.asarray(b, np.float64)
        bad = np.argwhere(np.isnan(a) != np.isnan(b))
        assert bad.size == 0, (f"{where}: {name} NaN mask differs at {len(bad)} entries, e.g. "
                               f"{tuple(bad[0])}: got {a[tuple(bad[0])]}, want {b[tuple(bad[0])]}")
        both = ~np.isnan(a)
        np.testing.assert_allclose(a[both], b[both], rtol=1e-4, atol=1e-4,
                                   err_msg=f"{where}: {name}")


# ------------------------------------------------------------------------------- bad calls
# Malformed forward calls and the exact message both back ends give (sapa_validate.h): the CPU
# handler through XLA (tests/test_ffi.py), the CUDA one through the emulator
# (tests/test_cuda_emulated.py). (q, k, v shapes, attributes (K, s, normalizer, border, eps),
# message); q, k, v are float32, out and stats are shaped from q and v.
Q, K3, V5 = (1, 4, 4, 3), (1, 2, 2, 3), (1, 2, 2, 5)
GOOD = (3, 2, 0, 0, 1e-6)
BAD_FORWARD_CALLS = {
    "v-shape": ((Q, K3, (1, 3, 2, 5)), GOOD,
                "sapa_forward: v must have shape (1, 2, 2, 5), got (1, 3, 2, 5)"),
    "k-channels": ((Q, (1, 2, 2, 4), V5), GOOD,
                   "sapa_forward: q must have shape (1, 4, 4, 4), got (1, 4, 4, 3)"),
    "scale-vs-q": ((Q, K3, V5), (3, 3, 0, 0, 1e-6),
                   "sapa_forward: q must have shape (1, 6, 6, 3), got (1, 4, 4, 3)"),
    "batch": (((2, 4, 4, 3), K3, V5), GOOD,
              "sapa_forward: k must have shape (2, 2, 2, 3), got (1, 2, 2, 3)"),
    "rank": (((4, 4, 3), (2, 2, 3), (2, 2, 5)), GOOD,
             "sapa_forward: q must have rank >= 4 (..., height, width, channels), "
             "got shape (4, 4, 3)"),
    "kernel-even": ((Q, K3, V5), (4, 2, 0, 0, 1e-6),
                    "sapa_forward: kernel_size must be a positive odd integer, got 4"),
    "kernel-huge": ((Q, K3, V5), (4097, 2, 0, 0, 1e-6),
                    "sapa_forward: kernel_size must be <= 4095, got 4097"),
    "scale-huge": ((Q, K3, V5), (3, 46341, 0, 0, 1e-6),
                   "sapa_forward: scale must be <= 46340, got 46341"),
    "normalizer": ((Q, K3, V5), (3, 2, 7, 0, 1e-6),
                   "sapa_forward: normalizer code must be 0..4, got 7"),
    "border": ((Q, K3, V5), (3, 2, 0, 2, 1e-6),
               "sapa_forward: border code must be 0 (zeros) or 1 (valid), got 2"),
    "eps": ((Q, K3, V5), (3, 2, 0, 0, -1.0), "sapa_forward: eps must be >= 0, got -1.000000"),
}
# A key of another dtype than q.
MIXED_DTYPE_MESSAGE = "sapa_forward: k must have element type float32, got float16"

# Malformed backward calls (q, k, v as in the forward cases above, out-shaped g): the stats or g
# that break it, the attributes, and the message both back ends give.
STATS_OK, G_OK = ((1, 4, 4, 2), np.float32), ((1, 4, 4, 5), np.float32)
BAD_BACKWARD_CALLS = {
    "stats-shape": (((1, 4, 4, 1), np.float32), G_OK, GOOD,
                    "sapa_backward: stats must have shape (1, 4, 4, 2), got (1, 4, 4, 1)"),
    "stats-dtype": (((1, 4, 4, 2), np.float64), G_OK, GOOD,
                    "sapa_backward: stats must have element type float32, got float64"),
    "g-shape": (STATS_OK, ((1, 4, 3, 5), np.float32), GOOD,
                "sapa_backward: g must have shape (1, 4, 4, 5), got (1, 4, 3, 5)"),
    "kernel-even": (STATS_OK, G_OK, (4, 2, 0, 0, 1e-6),
                    "sapa_backward: kernel_size must be a positive odd integer, got 4"),
}


def value_and_vjp(f, args, cot_dtype=None, seed=1):
    """f(*args) and its vjp for a random cotangent, drawn in float64 and rounded to `cot_dtype`
    (default: the output's dtype) so that two calls can share its values. Jitted: one compile
    per case instead of one per primitive."""
    out_shape = jax.eval_shape(f, *args)
    cot = np.random.default_rng(seed).standard_normal(out_shape.shape)
    cot = cot.astype(cot_dtype or out_shape.dtype).astype(out_shape.dtype)

    @jax.jit
    def run(args, cot):
        out, vjp = jax.vjp(f, *args)
        return (out, *vjp(cot))

    return run(tuple(args), cot)


# Block and thread orders of the CUDA emulator (emu_core.h set_schedule): in order, reversed,
# and two shuffles.
EMULATOR_SCHEDULES = ((0, 0), (1, 0), (2, 1), (2, 2))


def under_every_schedule(emu, run, *args):
    """`run(emu, *args)` once per emulator schedule (then back to in order): the results."""
    results = []
    for mode, seed in EMULATOR_SCHEDULES:
        emu.set_schedule(mode, seed)
        results.append(run(emu, *args))
    emu.set_schedule(0)
    return results


def bitwise_equal(a, b) -> bool:
    """Every array of result tuple `a` has the bits of the one of `b`."""
    return all(np.array_equal(u.view(np.uint8), v.view(np.uint8)) for u, v in zip(a, b))


def emulator_in_default_state(module, capfd, what: str):
    """Fixture body for an emulator module: the default schedule and every barrier in place,
    restored afterwards; the test fails on any UBSan report (misaligned access, index out of
    range, int overflow) that `what`'s kernels wrote meanwhile."""
    from cuda_emulator import build as emu_build
    module.set_schedule(0)
    module.drop_barrier(-1)
    yield module
    module.set_schedule(0)
    module.drop_barrier(-1)
    reports = [l for l in capfd.readouterr().err.splitlines() if emu_build.UBSAN_REPORT in l]
    assert not reports, f"UBSan in the emulated {what} kernels:\n" + "\n".join(reports[:10])

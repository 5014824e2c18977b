"""Cases and comparisons shared by the kernel tests (test_ffi, test_cuda_emulated, test_gpu)."""
from __future__ import annotations

import numpy as np

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

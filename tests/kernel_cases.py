"""Cases and comparisons shared by the kernel tests (test_ffi, test_cuda_emulated, test_gpu)."""
from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------- non-finite values
# DESIGN.md section 1: a NaN or an infinity in q, k or v makes exactly the output points and
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

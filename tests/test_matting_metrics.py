"""The Composition-1k errors of examples/matting/metrics.py on small hand-made cases whose
values are worked out by hand (in the comments) and asserted exactly or to 1e-12."""
from __future__ import annotations

import math

import numpy as np
import pytest

from examples.matting import metrics


def _all(shape):
    return np.ones(shape, bool)


# ----------------------------------------------------------------------------- SAD and MSE

def test_sad_and_mse_count_only_the_unknown_region():
    pred = np.array([[0.5, 1.0], [0.0, 0.25]])
    gt = np.array([[0.0, 1.0], [1.0, 0.75]])
    unknown = np.array([[True, True], [False, True]])  # the error of 1 at (1, 0) is excluded
    assert metrics.sad(pred, gt, unknown) == 1.0  # 0.5 + 0 + 0.5
    assert metrics.mse(pred, gt, unknown) == pytest.approx(0.5 / 3, abs=1e-15)  # (.25+0+.25)/3


def test_sad_and_mse_per_image_and_empty_region():
    pred = np.stack([np.full((3, 3), 0.2), np.full((3, 3), 0.2)])
    gt = np.zeros((2, 3, 3))
    unknown = np.zeros((2, 3, 3), bool)
    unknown[0, :2, :] = True  # 6 pixels in image 0, none in image 1
    np.testing.assert_allclose(metrics.sad(pred, gt, unknown), [1.2, 0.0], atol=1e-12)
    np.testing.assert_allclose(metrics.mse(pred, gt, unknown), [0.04, 0.0], atol=1e-12)


# ----------------------------------------------------------------------------- Gradient

def test_gradient_kernel_shape_and_normalisation():
    hx = metrics.gaussian_gradient_kernel(1.4)
    # half-size ceil(1.4 * sqrt(-2 ln(sqrt(2 pi) * 1.4 * 0.01))) = ceil(3.624) = 4
    assert hx.shape == (9, 9)
    assert (hx ** 2).sum() == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_allclose(hx, -hx[:, ::-1], atol=1e-16)  # odd along x (derivative)
    np.testing.assert_allclose(hx, hx[::-1, :], atol=1e-16)  # even along y (smoothing)
    assert hx[4, 4] == 0 and hx[4, 3] > 0  # g'(-1) > 0: the kernel's positive side is -x


def test_gradient_magnitude_of_a_ramp_is_the_closed_form():
    # f(y, x) = a x. Away from the left/right borders (>= 4 px) the convolution is exact:
    # (hx * f)(x) = sum_ij hx[i, j] a (x - j) = a sum_i g(i) sum_j j^2 g(j) / (sigma^2 N),
    # N = sqrt(sum g^2 sum g'^2) the kernel's L2 norm; f is constant along y, so gy = 0.
    sigma, a = 1.4, 0.05
    u = np.arange(-4, 5)
    g = np.exp(-u ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
    dg = -u * g / sigma ** 2
    norm = math.sqrt((g ** 2).sum() * (dg ** 2).sum())
    slope = a * g.sum() * (u ** 2 * g).sum() / (sigma ** 2 * norm)
    ramp = a * np.tile(np.arange(20.0), (20, 1))
    magnitude = metrics.gradient_magnitude(ramp, sigma)
    np.testing.assert_allclose(magnitude[:, 4:16], slope, rtol=1e-12)
    # 9.684 a: the kernel has unit L2 norm, not unit gain (the standard code's choice).
    assert slope == pytest.approx(0.4842, abs=1e-4)
    # Error against a flat ground truth over a 12 x 12 interior block: 144 * slope^2.
    unknown = np.zeros((20, 20), bool)
    unknown[4:16, 4:16] = True
    got = metrics.gradient_error(ramp, np.zeros((20, 20)), unknown)
    assert got == pytest.approx(144 * slope ** 2, rel=1e-12)


def test_gradient_error_ignores_constant_offsets_and_is_per_image():
    pred = np.full((2, 6, 6), 0.7)
    gt = np.full((2, 6, 6), 0.2)
    pred[1, :, 3:] = 1.0  # a vertical edge in image 1 only
    got = metrics.gradient_error(pred, gt, _all(pred.shape))
    assert got[0] == pytest.approx(0.0, abs=1e-24)  # flat: both gradients 0, SAD is not
    assert got[1] > 0
    # Per image means no bleeding across the batch axis: image 1 alone gives the same value.
    assert got[1] == pytest.approx(metrics.gradient_error(pred[1], gt[1], _all((6, 6))),
                                   rel=1e-12)


# ----------------------------------------------------------------------------- Connectivity

def test_connectivity_is_zero_for_identical_mattes():
    alpha = np.random.default_rng(0).random((8, 8))
    assert metrics.connectivity_error(alpha, alpha, _all((8, 8))) == 0.0


def test_connectivity_penalises_a_detached_blob():
    # gt has a 0.6 blob at x = 4 that is not connected to the opaque part (x = 0, 1); pred
    # misses it. Omega = {x = 0, 1} at every threshold, so x = 2..4 get level 0 at t = 0.1 and
    # x = 0, 1 keep level 1. At x = 4: pred d = 0 -> phi 1; gt d = 0.6 >= 0.15 -> phi 0.4.
    pred = np.array([[1.0, 1.0, 0.0, 0.0, 0.0]])
    gt = np.array([[1.0, 1.0, 0.0, 0.0, 0.6]])
    assert metrics.connectivity_error(pred, gt, _all(pred.shape)) == pytest.approx(0.6, abs=1e-12)


def test_connectivity_level_is_the_last_connected_threshold():
    # x = 2 stays connected while min(pred, gt) = 0.3 >= t, i.e. up to t = 0.3; it leaves
    # Omega at t = 0.4, so its level is 0.3. pred d = 0 -> phi 1; gt d = 0.3 -> phi 0.7.
    pred = np.array([[1.0, 1.0, 0.3, 0.0, 0.0]])
    gt = np.array([[1.0, 1.0, 0.6, 0.0, 0.0]])
    unknown = np.array([[False, False, True, False, False]])
    assert metrics.connectivity_error(pred, gt, unknown) == pytest.approx(0.3, abs=1e-12)


def test_connectivity_is_4_connected_and_breaks_ties_column_major():
    # Two diagonal pixels are two components (4-connectivity) of equal size up to t = 0.9.
    # Column-major order meets (1, 0) first, so Omega = {(1, 0)} and (0, 1) gets level 0:
    # pred d = 1 -> phi 0, gt d = 0.95 -> phi 0.05: error 0.05. (Row-major tie-breaking or
    # 8-connectivity would give level 0.9 at (0, 1), phi 1 for both, error 0.)
    pred = np.array([[0.0, 1.0], [1.0, 0.0]])
    gt = np.array([[0.0, 0.95], [1.0, 0.0]])
    assert metrics.connectivity_error(pred, gt, _all((2, 2))) == pytest.approx(0.05, abs=1e-12)


def test_largest_component():
    mask = np.array([[1, 1, 0, 1],
                     [0, 0, 0, 1],
                     [1, 0, 1, 1]], bool)
    expected = np.array([[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(metrics.largest_component(mask), expected)
    assert not metrics.largest_component(np.zeros((3, 3), bool)).any()


def test_connectivity_batched_and_scaled():
    pred = np.array([[[1.0, 1.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 0.3, 0.0, 0.0]]])
    gt = np.array([[[1.0, 1.0, 0.0, 0.0, 0.6]], [[1.0, 1.0, 0.6, 0.0, 0.0]]])
    errors = metrics.matting_errors(pred, gt, _all(pred.shape), scale=1000)
    np.testing.assert_allclose(errors["conn"], [0.6e-3, 0.3e-3], atol=1e-15)
    np.testing.assert_allclose(errors["sad"], [0.6e-3, 0.3e-3], atol=1e-15)
    np.testing.assert_allclose(errors["mse"], [0.36 / 5, 0.09 / 5], atol=1e-15)  # not scaled


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("fn", [metrics.sad, metrics.mse, metrics.gradient_error,
                                metrics.connectivity_error])
def test_bad_input(fn):
    a = np.zeros((4, 4))
    with pytest.raises(TypeError, match="pred must be a floating alpha matte, got dtype int64"):
        fn(np.zeros((4, 4), np.int64), a, _all((4, 4)))
    with pytest.raises(TypeError, match="unknown must be a boolean mask"):
        fn(a, a, np.ones((4, 4)))
    with pytest.raises(ValueError, match=r"share one shape.*\(4, 4\), \(4, 5\)"):
        fn(a, np.zeros((4, 5)), _all((4, 4)))


def test_connectivity_step_must_divide_one():
    a = np.zeros((3, 3))
    with pytest.raises(ValueError, match="step must divide 1.*0.3"):
        metrics.connectivity_error(a, a, _all((3, 3)), step=0.3)

"""Metrics of the segmentation example against cases computed by hand.

Conventions under test (examples/segmentation/metrics.py): confusion rows = ground truth,
columns = prediction; IoU = TP / (TP + FP + FN) pooled over all pixels; a class absent from
both prediction and ground truth is NaN and left out of the mean; the boundary band of width w
holds the pixels with a different label within Chebyshev distance w; boundary IoU is the IoU
over the ground truth's band only.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from examples.segmentation import metrics

# gt: left two columns class 0, right three class 1. pred: the boundary moved one column right.
GT_EDGE = np.array([[0, 0, 1, 1, 1]] * 5)
PRED_EDGE = np.array([[0, 0, 0, 1, 1]] * 5)


def test_confusion_matrix_rows_are_ground_truth():
    gt = np.array([[0, 0, 1], [0, 1, 1]])
    pred = np.array([[0, 1, 1], [0, 0, 1]])
    cm = metrics.confusion_matrix(pred, gt, 3)
    # gt 0 -> pred 0 twice, pred 1 once; gt 1 -> pred 0 once, pred 1 twice; class 2 unused.
    np.testing.assert_array_equal(cm, [[2, 1, 0], [1, 2, 0], [0, 0, 0]])
    masked = metrics.confusion_matrix(pred, gt, 3, mask=np.array([[1, 1, 0], [0, 0, 0]], bool))
    np.testing.assert_array_equal(masked, [[1, 1, 0], [0, 0, 0], [0, 0, 0]])


def test_iou_and_miou_by_hand():
    gt = np.array([[0, 0, 1], [0, 1, 1]])
    pred = np.array([[0, 1, 1], [0, 0, 1]])
    cm = metrics.confusion_matrix(pred, gt, 3)
    iou = metrics.iou_per_class(cm)
    # class 0: TP 2, union {gt 3} + {pred 3} - 2 = 4; class 1 likewise; class 2 absent -> NaN.
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(0.5)
    assert math.isnan(iou[2])
    assert metrics.mean_iou(cm) == pytest.approx(0.5)


def test_class_only_in_prediction_counts_as_zero():
    gt = np.zeros((2, 2), int)
    pred = np.array([[0, 2], [0, 0]])
    iou = metrics.iou_per_class(metrics.confusion_matrix(pred, gt, 3))
    assert iou[0] == pytest.approx(3 / 4)
    assert math.isnan(iou[1])  # in neither: ignored
    assert iou[2] == 0.0  # predicted but absent from gt: a false positive, IoU 0
    assert metrics.mean_iou(metrics.confusion_matrix(pred, gt, 3)) == pytest.approx(0.375)


def test_mean_iou_is_nan_when_nothing_is_defined():
    assert math.isnan(metrics.mean_iou(np.zeros((3, 3), int)))


def test_boundary_band_straight_edge():
    band1 = metrics.boundary_band(GT_EDGE, 1)
    expected1 = np.zeros((5, 5), bool)
    expected1[:, 1:3] = True  # the columns on either side of the edge
    np.testing.assert_array_equal(band1, expected1)
    band2 = metrics.boundary_band(GT_EDGE, 2)
    expected2 = np.zeros((5, 5), bool)
    expected2[:, 0:4] = True  # column 4 is 2 away from column 2, the first class-1 column
    np.testing.assert_array_equal(band2, expected2)


def test_boundary_band_is_chebyshev_and_clipped_at_the_border():
    dot = np.zeros((5, 5), int)
    dot[2, 2] = 1
    expected = np.zeros((5, 5), bool)
    expected[1:4, 1:4] = True  # diagonal neighbours count (Chebyshev distance 1)
    np.testing.assert_array_equal(metrics.boundary_band(dot, 1), expected)
    assert metrics.boundary_band(dot, 2).all()
    corner = np.zeros((4, 4), int)
    corner[0, 0] = 3
    expected = np.zeros((4, 4), bool)
    expected[:2, :2] = True
    np.testing.assert_array_equal(metrics.boundary_band(corner, 1), expected)


def test_boundary_band_never_crosses_images_of_a_batch():
    batch = np.stack([np.zeros((4, 4), int), np.ones((4, 4), int)])
    assert not metrics.boundary_band(batch, 1).any()


def test_boundary_band_matches_its_definition_on_random_maps():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (2, 7, 9))
    labels[0, :, :4] = 0  # a uniform area, so not every pixel is on a boundary
    for width in (1, 2):
        band = metrics.boundary_band(labels, width)
        for b, i, j in np.ndindex(labels.shape):
            window = labels[b, max(0, i - width):i + width + 1, max(0, j - width):j + width + 1]
            assert band[b, i, j] == np.any(window != labels[b, i, j]), (b, i, j, width)
        assert band.any() and not band.all()


def test_boundary_iou_by_hand():
    # Full map: class 0 gt 10 px, pred 15 px, TP 10 -> 2/3; class 1 gt 15, pred 10 -> 2/3.
    scores = metrics.segmentation_scores(PRED_EDGE, GT_EDGE, 3, width=1)
    assert scores["miou"] == pytest.approx(2 / 3)
    # Band w=1 = columns 1 and 2. gt: col 1 -> 0, col 2 -> 1; pred: both 0.
    # class 0: TP 5, union 10 -> 0.5; class 1: TP 0, union 5 -> 0; class 2 ignored.
    assert scores["boundary_iou_per_class"][:2] == pytest.approx([0.5, 0.0])
    assert scores["boundary_iou_per_class"][2] is None
    assert scores["boundary_iou"] == pytest.approx(0.25)
    assert scores["pixel_accuracy"] == pytest.approx(20 / 25)
    # w=2 (columns 0-3): class 0 gt 10, pred 15 (cols 0-2), TP 10 -> 2/3;
    # class 1 gt 10 (cols 2-3), pred 5 (col 3), TP 5 -> 1/2.
    wide = metrics.segmentation_scores(PRED_EDGE, GT_EDGE, 3, width=2)
    assert wide["boundary_iou"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_perfect_prediction_scores_one():
    scores = metrics.segmentation_scores(GT_EDGE, GT_EDGE, 2, width=1)
    assert scores["miou"] == 1.0 and scores["boundary_iou"] == 1.0


@pytest.mark.parametrize("pred, gt, error", [
    (np.zeros((2, 2), int), np.zeros((2, 3), int), ValueError),
    (np.zeros((2, 2)), np.zeros((2, 2), int), TypeError),
    (np.full((2, 2), 3), np.zeros((2, 2), int), ValueError),
    (np.full((2, 2), -1), np.zeros((2, 2), int), ValueError),
])
def test_bad_label_maps_are_rejected(pred, gt, error):
    with pytest.raises(error):
        metrics.confusion_matrix(pred, gt, 3)


@pytest.mark.parametrize("width", [0, -1, 1.5, True])
def test_bad_band_width_is_rejected(width):
    with pytest.raises(ValueError, match="width"):
        metrics.boundary_band(GT_EDGE, width)

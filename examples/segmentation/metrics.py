"""Segmentation metrics in NumPy: confusion matrix, IoU, mIoU, boundary band, boundary IoU.

Conventions (used throughout the example and tested in tests/test_metrics.py):

* Label maps are integer arrays of the same shape, values in 0..C-1 (any leading batch axes).
* IoU of class c over a set of pixels = TP / (TP + FP + FN) counted over *all* pixels of the set
  pooled together (a dataset-level IoU, not an average of per-image IoUs).
* A class absent from both the prediction and the ground truth of the pixel set (TP + FP + FN
  = 0) has an undefined IoU: it is reported as NaN and left out of the mean. mIoU is the mean
  over the remaining classes (NaN if none remain).
* Boundary band of width w (w >= 1) of a label map: the pixels p for which some pixel q of the
  same image with Chebyshev distance max(|dy|, |dx|) <= w from p has a different label. In other
  words, the (2w + 1) x (2w + 1) window centred on p (clipped at the image border) contains more
  than one label. For w = 1 these are the pixels that touch another label through one of their
  8 neighbours, on both sides of every boundary; a band of width w is at most 2w pixels across
  on each edge.
* Boundary IoU (width w): the per-class IoU above, restricted to the ground truth's boundary band
  (the prediction is scored only on those pixels), with the same NaN convention; boundary mIoU is
  its mean over classes. It measures what the mIoU hides: how well a model places boundaries and
  keeps thin structures, which make up a small share of all pixels.
"""
from __future__ import annotations

import numpy as np


def _check_pair(pred, gt, num_classes):
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    for name, a in (("pred", pred), ("gt", gt)):
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must be an integer label map, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), "
                             f"got range [{a.min()}, {a.max()}]")
    return pred, gt


def confusion_matrix(pred, gt, num_classes: int, mask=None) -> np.ndarray:
    """(C, C) int64 counts, rows = ground truth, columns = prediction, over pixels where `mask`."""
    pred, gt = _check_pair(pred, gt, num_classes)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != gt.shape:
            raise ValueError(f"mask must have the label maps' shape {gt.shape}, got {mask.shape}")
        pred, gt = pred[mask], gt[mask]
    index = gt.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(confusion) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from pred and gt."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(confusion) -> float:
    """Mean of the defined per-class IoUs (NaN if no class is defined)."""
    iou = iou_per_class(confusion)
    return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def _sliding(reduce, a, width, axis):
    """`reduce` (np.minimum / np.maximum) over a window of 2*width + 1 along `axis`, edge-padded."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (width, width)
    padded = np.pad(a, pad, mode="edge")
    n = a.shape[axis]
    return reduce.reduce([np.take(padded, np.arange(d, d + n), axis=axis)
                          for d in range(2 * width + 1)])


def boundary_band(labels, width: int) -> np.ndarray:
    """Boolean mask of the pixels within Chebyshev distance `width` of a different label.

    `labels` is (..., H, W); each image is treated on its own (windows never cross images).
    Computed as "max != min over the (2w+1)^2 window" with separable sliding max/min filters;
    edge padding repeats border labels, so it adds no new label (= clipping the window).
    """
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    labels = np.asarray(labels)
    if labels.ndim < 2:
        raise ValueError(f"labels must have shape (..., H, W), got {labels.shape}")
    lo = hi = labels
    for axis in (labels.ndim - 2, labels.ndim - 1):
        lo = _sliding(np.minimum, lo, width, axis)
        hi = _sliding(np.maximum, hi, width, axis)
    return lo != hi


def boundary_confusion(pred, gt, num_classes: int, width: int) -> np.ndarray:
    """Confusion matrix over the ground truth's boundary band of `width`."""
    return confusion_matrix(pred, gt, num_classes, mask=boundary_band(gt, width))


def segmentation_scores(pred, gt, num_classes: int, width: int) -> dict:
    """mIoU, boundary mIoU (band `width`), pixel accuracy and per-class IoUs of a label set."""
    full = confusion_matrix(pred, gt, num_classes)
    band = boundary_confusion(pred, gt, num_classes, width)
    return {
        "miou": mean_iou(full),
        "boundary_iou": mean_iou(band),
        "pixel_accuracy": float(np.trace(full) / max(full.sum(), 1)),
        "iou_per_class": [None if np.isnan(v) else float(v) for v in iou_per_class(full)],
        "boundary_iou_per_class": [None if np.isnan(v) else float(v)
                                   for v in iou_per_class(band)],
    }

"""Figure: predicted alpha and its error map per upsampler, on the same validation images.

Drawn with matplotlib's object API (`Figure`, Agg renderer): no pyplot, no GUI backend, no
global figure state.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from . import data, metrics

SHOWN_IMAGES = 3  # validation images in the figure
TRIMAP_CMAP = ListedColormap(["#000000", "#808080", "#ffffff"])
ERROR_MAX = 0.5  # |pred - gt| colour scale: 0 .. 0.5 (larger errors saturate)


def prediction_figure(val, predictions: dict, path: Path) -> Path:
    """Two rows per image: the alphas (input, trimap, ground truth, then one per upsampler)
    and under each prediction its error |pred - gt| on the unknown region, titled with that
    image's SAD and Grad."""
    images, trimaps, alpha = val
    names = list(predictions)
    count = min(SHOWN_IMAGES, *(len(p) for p in predictions.values()))
    cols = 3 + len(names)
    fig = Figure(figsize=(1.7 * cols, 3.5 * count + 0.4), layout="constrained")
    axes = fig.subplots(2 * count, cols, squeeze=False)
    error_image = None
    for i in range(count):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        unknown = trimaps[i] == data.TRIMAP_UNKNOWN
        top[0].imshow(images[i], interpolation="nearest")
        top[0].set_title("input", fontsize=8)
        top[1].imshow(trimaps[i], cmap=TRIMAP_CMAP, vmin=0, vmax=2, interpolation="nearest")
        top[1].set_title("trimap", fontsize=8)
        top[2].imshow(alpha[i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        top[2].set_title("ground truth", fontsize=8)
        # Under the inputs: the ground truth's partial pixels, where details live.
        bottom[2].imshow((alpha[i] > 0) & (alpha[i] < 1), cmap="gray", interpolation="nearest")
        bottom[2].set_title("0 < alpha < 1", fontsize=8)
        for ax in bottom[:2]:
            ax.axis("off")
        for j, name in enumerate(names):
            pred = np.asarray(predictions[name][i], np.float64)
            errs = metrics.matting_errors(pred[None], alpha[i][None].astype(np.float64),
                                          unknown[None])
            top[3 + j].imshow(pred, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            top[3 + j].set_title(f"{name}\nSAD {errs['sad'][0]:.1f} Grad {errs['grad'][0]:.1f}",
                                 fontsize=8)
            error_image = bottom[3 + j].imshow(np.abs(pred - alpha[i]) * unknown, cmap="magma",
                                               vmin=0, vmax=ERROR_MAX, interpolation="nearest")
            bottom[3 + j].set_title(f"|error|, {name}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if error_image is not None:
        fig.colorbar(error_image, ax=axes[1::2, -1].tolist(), fraction=0.05, shrink=0.8)
    fig.suptitle("validation alpha mattes per upsampler (error on the trimap's unknown region)",
                 fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

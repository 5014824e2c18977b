"""Figures: predictions side by side, and SAPA kernel maps + upsampled features.

Drawn with matplotlib's object API (`Figure`, saved through the Agg renderer): no pyplot, no
GUI backend, no global figure state, so it works headless and in threads.

The kernel maps recompute the queries and keys of the last SAPA stage (1/2 -> full resolution)
with `sapa_jax.modules.project` (the module's own body up to q, k, v), then take the K*K weights from `sapa_jax.similarity` + `sapa_jax.normalize`. As a check, the
weights are assembled with `sapa_jax.assemble` and compared with the module's own output; the
largest absolute difference is returned (and printed on the figure).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import sapa_jax
from sapa_jax import modules as sapa_modules
from sapa_jax.linen import SAPA

from . import data, metrics
from .model import bilinear2x

SHOWN_IMAGES = 4  # validation images in the prediction figure
LABEL_CMAP = ListedColormap(["#2b2b2b", "#e6553a", "#4cbb4a", "#3d7fe0", "#f2c94c"])
SCALE = 2  # every decoder stage doubles the resolution


def _labels(ax, labels):
    ax.imshow(labels, cmap=LABEL_CMAP, vmin=-0.5, vmax=data.NUM_CLASSES - 0.5,
              interpolation="nearest")


def _draw_boundaries(ax, labels, color="white"):
    """Draw the pixel edges between different labels (exact, unlike contours of class ids)."""
    rows, cols = np.nonzero(labels[:, 1:] != labels[:, :-1])  # vertical edges
    segments = [((c + 0.5, r - 0.5), (c + 0.5, r + 0.5)) for r, c in zip(rows, cols)]
    rows, cols = np.nonzero(labels[1:, :] != labels[:-1, :])  # horizontal edges
    segments += [((c - 0.5, r + 0.5), (c + 0.5, r + 0.5)) for r, c in zip(rows, cols)]
    ax.add_collection(LineCollection(segments, colors=color, linewidths=1.0))


def prediction_figure(val, predictions: dict, path: Path, band_width: int = 2) -> Path:
    """Rows: validation images; columns: input, ground truth, one prediction per upsampler.

    Each prediction's title gives its boundary IoU on that image (band `band_width`).
    """
    images, labels = val
    names = list(predictions)
    rows = min(SHOWN_IMAGES, *(len(p) for p in predictions.values()))
    cols = 2 + len(names)
    fig = Figure(figsize=(1.9 * cols, 1.9 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(images[i], interpolation="nearest")
        _labels(axes[i, 1], labels[i])
        for j, name in enumerate(names):
            pred = predictions[name][i]
            band = metrics.boundary_confusion(pred, labels[i], data.NUM_CLASSES, band_width)
            _labels(axes[i, 2 + j], pred)
            axes[i, 2 + j].set_title(f"{name}\nbIoU {100 * metrics.mean_iou(band):.1f}",
                                     fontsize=8)
        axes[i, 0].set_title("input", fontsize=8)
        axes[i, 1].set_title("ground truth", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("validation predictions ("
                 + ", ".join(f"{c}={n}" for c, n in enumerate(data.CLASS_NAMES)) + ")",
                 fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


@functools.partial(jax.jit, static_argnums=0)
def last_stage_kernels(net, params, image):
    """Kernel weights of the last SAPA stage for one image (S, S, 3), and what they come from.

    Returns a dict of arrays: w (S, S, K*K), x (S/2, S/2, D) the low-res decoder feature, y the
    guidance, sapa (S, S, D) the module's output, check = max |assemble(w, x) - sapa|.
    Jitted (net static): running the whole network op by op is slow on a CPU.
    """
    _, state = net.apply({"params": params}, image[None], capture_intermediates=True,
                         mutable=["intermediates"])
    stage = state["intermediates"]["up0"]
    y, x = stage["y"][0], stage["x"][0]
    module_out = stage["sapa"]["__call__"][0]
    # The same SAPA module as the stage (model.Upsample2x); `project` gives its q, k, v.
    config = SAPA(variant=net.upsampler[-1].upper(), embedding_dim=net.embedding_dim,
                  kernel_size=net.kernel_size, scale=SCALE).config()
    q, k, v = sapa_modules.project(params["up0"]["sapa"], y, x, config)
    w = sapa_jax.normalize(sapa_jax.similarity(q, k, kernel_size=config.kernel_size, scale=SCALE))
    out = sapa_jax.assemble(w, v, kernel_size=config.kernel_size, scale=SCALE)
    return {"w": w[0], "x": x[0], "y": y[0], "sapa": module_out[0],
            "check": jnp.max(jnp.abs(out - module_out))}


def boundary_points(labels, kernel_size: int, count: int):
    """Up to `count` full-res points on ground-truth boundaries (band width 1) whose low-res
    window lies inside the map, one per foreground class first (so thin classes show up)."""
    r = kernel_size // 2
    size = labels.shape[0]
    low = np.arange(size) // SCALE
    inside = (low >= r) & (low < size // SCALE - r)
    candidates = metrics.boundary_band(labels, 1) & inside[:, None] & inside[None, :]
    chosen = []
    for cls in list(range(1, data.NUM_CLASSES)) + [0]:
        pts = np.argwhere(candidates & (labels == cls))
        if len(pts):
            chosen.append(tuple(pts[len(pts) // 2]))
        if len(chosen) == count:
            break
    return chosen


def _pick_image(labels):
    """Index of the validation image with the most foreground classes on its boundaries."""
    band = metrics.boundary_band(labels, 1)
    counts = [len(np.unique(lab[b])) for lab, b in zip(labels, band)]
    return int(np.argmax(counts))


def kernel_figure(net, params, val, path: Path, n_points: int = 4, n_channels: int = 3) -> float:
    """The paper's visualisation for the last SAPA stage of a trained network.

    Top rows, one per output point near a ground-truth boundary: the input with the point and
    its K x K low-res window; the ground-truth crop under the window; the normalised kernel
    weights over that window (same extent, boundaries drawn in white). Bottom rows, one per
    decoder channel: the low-res input x, bilinear(x) and SAPA(y, x). Returns the check error.
    """
    images, labels = val
    idx = _pick_image(labels)
    image, label = images[idx], labels[idx]
    got = {k: np.asarray(v) for k, v in last_stage_kernels(net, params, image).items()}
    kernel_size = net.kernel_size
    r, span = kernel_size // 2, SCALE * kernel_size
    points = boundary_points(label, kernel_size, n_points)
    bilinear = np.asarray(bilinear2x(got["x"][None])[0])
    # Channels that vary most across the image say the most about boundaries.
    channels = np.argsort(got["sapa"].reshape(-1, got["sapa"].shape[-1]).std(0))[::-1][:n_channels]

    rows = len(points) + len(channels)
    fig = Figure(figsize=(7.5, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, 3, squeeze=False)
    for row, (i, j) in enumerate(points):
        top, left = SCALE * (i // SCALE - r), SCALE * (j // SCALE - r)
        ax = axes[row, 0]
        ax.imshow(image, interpolation="nearest")
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), span, span, fill=False, color="w"))
        ax.plot(j, i, "c+", ms=8, mew=2)
        ax.set_title(f"input, point ({i}, {j})", fontsize=8)
        crop = label[top:top + span, left:left + span]
        _labels(axes[row, 1], crop)
        axes[row, 1].plot(j - left, i - top, "c+", ms=10, mew=2)
        axes[row, 1].set_title(f"ground truth (class {label[i, j]})", fontsize=8)
        ax = axes[row, 2]
        weights = got["w"][i, j].reshape(kernel_size, kernel_size)
        # Each weight covers its low-res pixel, i.e. SCALE x SCALE pixels of the crop.
        shown = ax.imshow(weights, cmap="magma", vmin=0, interpolation="nearest",
                          extent=(-0.5, span - 0.5, span - 0.5, -0.5))
        _draw_boundaries(ax, crop)
        ax.plot(j - left, i - top, "c+", ms=10, mew=2)
        ax.set_title(f"SAPA kernel ({kernel_size}x{kernel_size})", fontsize=8)
        fig.colorbar(shown, ax=ax, fraction=0.046)
    for n, c in enumerate(channels):
        row = len(points) + n
        panels = (("decoder x (low-res)", got["x"]), ("bilinear(x)", bilinear),
                  ("SAPA(y, x)", got["sapa"]))
        lo = min(float(p[..., c].min()) for _, p in panels)
        hi = max(float(p[..., c].max()) for _, p in panels)
        for col, (title, feat) in enumerate(panels):
            axes[row, col].imshow(feat[..., c], cmap="viridis", vmin=lo, vmax=hi,
                                  interpolation="nearest")
            axes[row, col].set_title(f"{title}, channel {c}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{net.upsampler}: last decoder stage (check |assemble - module| = "
                 f"{float(got['check']):.1e})", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return float(got["check"])

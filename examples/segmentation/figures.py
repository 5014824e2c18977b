"""Figures: predictions side by side; the paper's Fig. 2 (feature and kernel maps); SAPA kernels.

Drawn with matplotlib's object API (`Figure`, saved through the Agg renderer): no pyplot, no
GUI backend, no global figure state, so it works headless and in threads.

Kernel maps: for the highest-resolution upsampling stage of each trained network
(`Segmenter.figure_stage`), the weight every output point gives to one tap of its K x K
low-res window, over the whole map. For SAPA the weights are recomputed from the stage's
inputs with `sapa_jax.modules.project` (the module's own body up to q, k, v),
`sapa_jax.similarity` and `sapa_jax.normalize`; as a check they are assembled with
`sapa_jax.assemble` and compared with the module's output (the largest absolute difference is
returned and printed). For CARAFE they are the module's own encoder logits
(`sapa_jax.carafe_modules.encoder_logits`) normalised with `sapa_jax.normalize`, checked the
same way. For bilinear they are its fixed weights (`bilinear_weights`), the same assembly
reproducing `bilinear2x`.
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
from examples.common.upsamplers import SAPA_VARIANTS, bilinear2x
from sapa_jax import carafe_modules
from sapa_jax import modules as sapa_modules
from sapa_jax.linen import CARAFE, SAPA

from . import data, metrics

SHOWN_IMAGES = 4  # validation images in the prediction figure
LABEL_CMAP = ListedColormap(["#2b2b2b", "#e6553a", "#4cbb4a", "#3d7fe0", "#f2c94c"])
SCALE = 2  # every decoder stage doubles the resolution
FIG2_UPSAMPLERS = ("bilinear", "carafe", *SAPA_VARIANTS)  # the columns of Fig. 2 with kernels


def _labels(ax, labels):
    ax.imshow(labels, cmap=LABEL_CMAP, vmin=-0.5, vmax=data.NUM_CLASSES - 0.5,
              interpolation="nearest")


def _draw_boundaries(ax, labels, color="white", scale=1.0):
    """Draw the pixel edges between different labels (exact, unlike contours of class ids)."""
    rows, cols = np.nonzero(labels[:, 1:] != labels[:, :-1])  # vertical edges
    segments = [((c + 0.5, r - 0.5), (c + 0.5, r + 0.5)) for r, c in zip(rows, cols)]
    rows, cols = np.nonzero(labels[1:, :] != labels[:-1, :])  # horizontal edges
    segments += [((c - 0.5, r + 0.5), (c + 0.5, r + 0.5)) for r, c in zip(rows, cols)]
    segments = [((scale * (a + 0.5) - 0.5, scale * (b + 0.5) - 0.5),
                 (scale * (c + 0.5) - 0.5, scale * (d + 0.5) - 0.5))
                for (a, b), (c, d) in segments]
    ax.add_collection(LineCollection(segments, colors=color, linewidths=0.6))


def _clean(axes):
    for ax in np.ravel(axes):
        ax.set_xticks([])
        ax.set_yticks([])


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
    _clean(axes)
    fig.suptitle("validation predictions ("
                 + ", ".join(f"{c}={n}" for c, n in enumerate(data.CLASS_NAMES)) + ")",
                 fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def bilinear_weights(out_size: int, kernel_size: int) -> np.ndarray:
    """(S, S, K*K) weights of `bilinear2x` as a K x K window over the low-res map (S = 2n).

    Per axis, output i' with parent i'//2 takes 3/4 of the parent and 1/4 of the neighbour on
    its side; at the map edge the neighbour is clamped onto the parent.
    """
    r, n = kernel_size // 2, out_size // SCALE
    w1 = np.zeros((out_size, kernel_size))
    for i in range(out_size):
        parent, side = i // SCALE, -1 if i % SCALE == 0 else 1
        w1[i, r] += 0.75
        w1[i, r + side if 0 <= parent + side < n else r] += 0.25
    return np.einsum("ip,jq->ijpq", w1, w1).reshape(out_size, out_size, -1)


@functools.partial(jax.jit, static_argnums=0)
def stage_maps(net, params, image):
    """The figure stage of `net` for one image (S, S, 3): its input x, guidance y, output, and
    for SAPA the kernel weights w (S', S', K*K) and check = max |assemble(w, x) - output|."""
    _, state = net.apply({"params": params}, image[None], capture_intermediates=True,
                         mutable=["intermediates"])
    stage = state["intermediates"][net.figure_stage]
    got = {"x": stage["x"][0][0], "out": stage["__call__"][0][0]}
    if net.upsampler in SAPA_VARIANTS:
        y = stage["y"][0]
        config = SAPA(variant=net.upsampler[-1].upper(), embedding_dim=net.embedding_dim,
                      kernel_size=net.kernel_size, scale=SCALE,
                      normalizer=net.normalizer, border=net.border).config()
        q, k, v = sapa_modules.project(params[net.figure_stage]["sapa"], y, stage["x"][0],
                                       config)
        w = sapa_jax.normalize(sapa_jax.similarity(q, k, kernel_size=config.kernel_size,
                                                   scale=SCALE), normalizer=config.normalizer,
                               border=config.border, low_res_shape=k.shape[1:3], scale=SCALE)
        out = sapa_jax.assemble(w, v, kernel_size=config.kernel_size, scale=SCALE)
        got.update(w=w[0], y=y[0], check=jnp.max(jnp.abs(out[0] - got["out"])))
    elif net.upsampler == "carafe":
        # CARAFE predicts its kernels from x alone: the module's logits, normalised per output
        # point over the K*K taps (one group), with no border renormalisation (mmcv's).
        carafe = params[net.figure_stage]["carafe"]
        config = CARAFE(scale=SCALE, kernel_size=net.kernel_size,
                        compressed_channels=carafe["channel_compressor"]["kernel"].shape[-1]
                        ).config()
        logits, x = carafe_modules.encoder_logits(carafe, stage["x"][0], config)
        w = sapa_jax.normalize(logits, normalizer=config.normalizer, eps=config.eps)
        out = sapa_jax.assemble(w, x, kernel_size=config.kernel_size, scale=SCALE)
        got.update(w=w[0], check=jnp.max(jnp.abs(out[0] - got["out"])))
    return got


def boundary_points(labels, kernel_size: int, count: int):
    """Up to `count` output points on ground-truth boundaries (band width 1) whose low-res
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


def _stage_labels(label, size):
    """The ground truth at the stage's resolution (nearest, for drawing boundaries)."""
    step = label.shape[0] // size
    return label[step // 2::step, step // 2::step]


def fig2(trained: dict, val, path: Path) -> tuple[Path, dict]:
    """The paper's Fig. 2 in miniature, one validation image, one column per upsampler
    (bilinear, CARAFE, SAPA...): top, the upsampled feature (its most varying channel);
    bottom, the weight of the window's centre tap over the whole map (ground-truth boundaries
    in white). Content-agnostic bilinear gives a fixed pattern; CARAFE's kernels come from the
    decoder feature alone, SAPA's from the encoder feature as well.

    Returns the path and, per CARAFE / SAPA column, the check error of its rebuilt kernels."""
    images, labels = val
    idx = _pick_image(labels)
    names = [n for n in trained if n in FIG2_UPSAMPLERS]
    checks = {}
    fig = Figure(figsize=(2.2 * (len(names) + 1), 4.6), layout="constrained")
    axes = fig.subplots(2, len(names) + 1, squeeze=False)
    axes[0, 0].imshow(images[idx], interpolation="nearest")
    axes[0, 0].set_title("input", fontsize=8)
    _labels(axes[1, 0], labels[idx])
    axes[1, 0].set_title("ground truth", fontsize=8)
    for col, name in enumerate(names, start=1):
        net, params, _ = trained[name]
        got = {k: np.asarray(v) for k, v in stage_maps(net, params, images[idx]).items()}
        out = got["out"]
        size = out.shape[0]
        channel = int(np.argmax(out.reshape(-1, out.shape[-1]).std(0)))
        axes[0, col].imshow(out[..., channel], cmap="viridis", interpolation="nearest")
        axes[0, col].set_title(f"{name}: feature (ch {channel})", fontsize=8)
        centre = net.kernel_size ** 2 // 2
        if "w" in got:
            weights = got["w"][..., centre]
            checks[name] = float(got["check"])
        else:
            weights = bilinear_weights(size, net.kernel_size)[..., centre]
        ax = axes[1, col]
        shown = ax.imshow(weights, cmap="magma", vmin=0, interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.046)
        _draw_boundaries(ax, _stage_labels(labels[idx], size))
        ax.set_title(f"{name}: centre-tap weight", fontsize=8)
    _clean(axes)
    fig.suptitle(f"last upsampling stage ({size}x{size}): upsampled features and kernel maps",
                 fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path, checks


def kernel_figure(net, params, val, path: Path, n_points: int = 4, n_channels: int = 3) -> float:
    """SAPA's kernels at boundary points of the figure stage of a trained network.

    Top rows, one per output point near a ground-truth boundary: the input with the point and
    its K x K low-res window; the ground-truth crop under the window; the normalised kernel
    weights over that window (same extent, boundaries drawn in white). Bottom rows, one per
    channel: the low-res input x, bilinear(x) and SAPA(y, x). Returns the check error.
    """
    images, labels = val
    idx = _pick_image(labels)
    image = images[idx]
    got = {k: np.asarray(v) for k, v in stage_maps(net, params, image).items()}
    size = got["out"].shape[0]
    label = _stage_labels(labels[idx], size)
    shown_image = image[::image.shape[0] // size, ::image.shape[0] // size]
    kernel_size = net.kernel_size
    r, span = kernel_size // 2, SCALE * kernel_size
    points = boundary_points(label, kernel_size, n_points)
    bilinear = np.asarray(bilinear2x(got["x"][None])[0])
    # Channels that vary most across the image say the most about boundaries.
    channels = np.argsort(got["out"].reshape(-1, got["out"].shape[-1]).std(0))[::-1][:n_channels]

    rows = len(points) + len(channels)
    fig = Figure(figsize=(7.5, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, 3, squeeze=False)
    for row, (i, j) in enumerate(points):
        top, left = SCALE * (i // SCALE - r), SCALE * (j // SCALE - r)
        ax = axes[row, 0]
        ax.imshow(shown_image, interpolation="nearest")
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
                  ("SAPA(y, x)", got["out"]))
        lo = min(float(p[..., c].min()) for _, p in panels)
        hi = max(float(p[..., c].max()) for _, p in panels)
        for col, (title, feat) in enumerate(panels):
            axes[row, col].imshow(feat[..., c], cmap="viridis", vmin=lo, vmax=hi,
                                  interpolation="nearest")
            axes[row, col].set_title(f"{title}, channel {c}", fontsize=8)
    _clean(axes)
    fig.suptitle(f"{net.upsampler}: stage {net.figure_stage} (check |assemble - module| = "
                 f"{float(got['check']):.1e})", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return float(got["check"])


def all_figures(trained: dict, val, fig_dir: Path, seed: int, band_width: int,
                runs: list) -> list[Path]:
    """Every figure of a finished experiment; trained[label] = (net, params, predictions).

    Records the kernel check of each SAPA and CARAFE network (the largest of its figures')
    in its run record (`kernel_check_max_abs_err`).
    """
    paths = []
    preds = {label: pred[:SHOWN_IMAGES] for label, (_, _, pred) in trained.items()}
    paths.append(prediction_figure(val, preds, fig_dir / f"predictions_seed{seed}.png",
                                   band_width))
    checks = {}
    if any(n in FIG2_UPSAMPLERS for n in trained):
        path, checks = fig2(trained, val, fig_dir / f"feature_kernel_maps_seed{seed}.png")
        paths.append(path)
    for label, (net, params, _) in trained.items():
        if label in SAPA_VARIANTS:
            path = fig_dir / f"kernels_{label}_seed{seed}.png"
            checks[label] = max(checks.get(label, 0.0), kernel_figure(net, params, val, path))
            paths.append(path)
    for r in runs:
        if r["label"] in checks and r["seed"] == seed:
            r["kernel_check_max_abs_err"] = checks[r["label"]]
    return paths

"""The four Composition-1k matting errors (Rhemann et al., CVPR 2009), in NumPy.

All four are computed over the trimap's unknown region only, per image, for alpha mattes in
[0, 1] (the standard evaluation code reads 8-bit mattes and divides by 255 first):

* SAD  = sum over unknown pixels of |pred - gt|.
* MSE  = mean over unknown pixels of (pred - gt)^2 (0 when the region is empty).
* Grad = sum over unknown pixels of (|grad pred| - |grad gt|)^2, where |grad a| is the
  magnitude of the Gaussian-derivative gradient of a with sigma = 1.4: the kernel
  hx[i, j] = g(i) g'(j) (g the normal density, g' its derivative, i, j = -h..h with
  h = ceil(sigma sqrt(-2 ln(sqrt(2 pi) sigma 0.01))) = 4 for sigma 1.4), scaled to unit L2
  norm, hy = hx transposed; both applied as 2-D convolutions with replicated borders.
* Conn = sum over unknown pixels of |phi(pred) - phi(gt)|, the connectivity error: for
  thresholds t_i = i * step (i = 1 .. 1/step), Omega_i is the largest 4-connected component
  of {pred >= t_i and gt >= t_i}; each pixel's level l is t_(i-1) for the first i at which it
  is outside Omega_i (1 if never); d = alpha - l and phi = 1 - d * [d >= 0.15]. Among
  components of equal size the first in column-major order wins, as MATLAB's bwconncomp + max
  order them.

The published Composition-1k tables divide SAD, Grad and Conn by 1000 (and MSE is a plain
mean). Our images have ~1000x fewer pixels than Composition-1k's, so the example reports the
sums undivided; `matting_errors(..., scale=1000)` gives the published convention.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

GRADIENT_SIGMA = 1.4
CONNECTIVITY_STEP = 0.1
_CONNECTED_4 = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])


def _check(pred, gt, unknown):
    """float64 copies of pred and gt and a boolean unknown mask, all (H, W) or (B, H, W)."""
    pred, gt, unknown = np.asarray(pred), np.asarray(gt), np.asarray(unknown)
    for name, a in (("pred", pred), ("gt", gt)):
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{name} must be a floating alpha matte, got dtype {a.dtype}")
    if unknown.dtype != bool:
        raise TypeError(f"unknown must be a boolean mask, got dtype {unknown.dtype}")
    if not (pred.shape == gt.shape == unknown.shape) or pred.ndim not in (2, 3):
        raise ValueError(f"pred, gt and unknown must share one shape (H, W) or (B, H, W), got "
                         f"{pred.shape}, {gt.shape} and {unknown.shape}")
    return pred.astype(np.float64), gt.astype(np.float64), unknown


def sad(pred, gt, unknown) -> np.ndarray:
    """Sum of absolute differences over the unknown region, per image."""
    pred, gt, unknown = _check(pred, gt, unknown)
    return (np.abs(pred - gt) * unknown).sum(axis=(-2, -1))


def mse(pred, gt, unknown) -> np.ndarray:
    """Mean squared error over the unknown region, per image (0 for an empty region)."""
    pred, gt, unknown = _check(pred, gt, unknown)
    count = unknown.sum(axis=(-2, -1))
    return ((pred - gt) ** 2 * unknown).sum(axis=(-2, -1)) / np.maximum(count, 1)


def gaussian_gradient_kernel(sigma: float = GRADIENT_SIGMA) -> np.ndarray:
    """The x-derivative kernel hx (rows: Gaussian, columns: its derivative), unit L2 norm."""
    half = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * 1e-2)))
    u = np.arange(-half, half + 1, dtype=np.float64)
    gauss = np.exp(-u ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
    dgauss = -u * gauss / sigma ** 2
    hx = np.outer(gauss, dgauss)
    return hx / np.sqrt((hx ** 2).sum())


def gradient_magnitude(alpha, sigma: float = GRADIENT_SIGMA) -> np.ndarray:
    """|grad alpha| of (H, W) or (B, H, W) with the Gaussian-derivative kernels."""
    alpha = np.asarray(alpha, np.float64)
    hx = gaussian_gradient_kernel(sigma)
    if alpha.ndim == 3:  # one image at a time: no filtering across the batch axis
        hx = hx[None]
    gx = ndimage.convolve(alpha, hx, mode="nearest")
    gy = ndimage.convolve(alpha, np.swapaxes(hx, -1, -2), mode="nearest")
    return np.sqrt(gx ** 2 + gy ** 2)


def gradient_error(pred, gt, unknown, sigma: float = GRADIENT_SIGMA) -> np.ndarray:
    """Sum over the unknown region of the squared difference of gradient magnitudes."""
    pred, gt, unknown = _check(pred, gt, unknown)
    diff = gradient_magnitude(pred, sigma) - gradient_magnitude(gt, sigma)
    return (diff ** 2 * unknown).sum(axis=(-2, -1))


def largest_component(mask) -> np.ndarray:
    """The largest 4-connected component of a 2-D boolean mask (empty mask -> empty).

    Ties go to the component met first in column-major order (labelling the transpose, whose
    row-major scan is the original's column-major one), as in the MATLAB evaluation code.
    """
    labels, count = ndimage.label(np.asarray(mask).T, structure=_CONNECTED_4)
    if count == 0:
        return np.zeros(np.shape(mask), bool)
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == 1 + int(np.argmax(sizes))).T


def _connectivity_phi(pred, gt, step):
    """phi(pred), phi(gt) of one (H, W) pair; see the module docstring."""
    levels = np.full(pred.shape, -1.0)
    count = int(round(1 / step))
    for i in range(1, count + 1):
        # i / count, not i * step: 3 * 0.1 != 0.3 in floating point, 3 / 10 == 0.3.
        omega = largest_component((pred >= i / count) & (gt >= i / count))
        levels[(levels == -1) & ~omega] = (i - 1) / count
    levels[levels == -1] = 1.0
    phis = []
    for alpha in (pred, gt):
        d = alpha - levels
        phis.append(1 - d * (d >= 0.15))
    return phis


def connectivity_error(pred, gt, unknown, step: float = CONNECTIVITY_STEP) -> np.ndarray:
    """Sum over the unknown region of |phi(pred) - phi(gt)|, per image."""
    pred, gt, unknown = _check(pred, gt, unknown)
    if not (0 < step <= 1) or abs(1 / step - round(1 / step)) > 1e-9:
        raise ValueError(f"step must divide 1 (e.g. 0.1), got {step!r}")
    batched = pred.ndim == 3
    if not batched:
        pred, gt, unknown = pred[None], gt[None], unknown[None]
    out = []
    for p, g, u in zip(pred, gt, unknown):
        phi_p, phi_g = _connectivity_phi(p, g, step)
        out.append((np.abs(phi_p - phi_g) * u).sum())
    out = np.array(out)
    return out if batched else out[0]


def matting_errors(pred, gt, unknown, scale: float = 1.0) -> dict:
    """Per-image SAD, MSE, Grad and Conn (arrays of shape (B,)); SAD, Grad and Conn divided
    by `scale` (1000 in the published Composition-1k tables)."""
    return {"sad": sad(pred, gt, unknown) / scale, "mse": mse(pred, gt, unknown),
            "grad": gradient_error(pred, gt, unknown) / scale,
            "conn": connectivity_error(pred, gt, unknown) / scale}

"""An independent PyTorch implementation of SAPA, the oracle of the parity tests.

Written from the operator's definition (docs/design.md §1), not from the JAX code: windows
come from `F.unfold` (channel-major, then kernel rows, then kernel columns, so tap
p = (dy + r) * K + (dx + r)), the border mask from unfolding a map of ones, the P and G queries
from the literal high-res concatenation / mix. The module follows the official one: NCHW at
the boundary, channels-last inside, LayerNorm/Linear layers named norm_y, norm_x, q, k, qy, qx,
gate, v so that `state_dict()` has the official keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _windows(a: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W, K*K, C), zeros outside the map."""
    batch, height, width, channels = a.shape
    cols = F.unfold(a.permute(0, 3, 1, 2), kernel_size=kernel_size, padding=kernel_size // 2)
    cols = cols.view(batch, channels, kernel_size * kernel_size, height, width)
    return cols.permute(0, 3, 4, 2, 1)


def _up(a: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest upsampling of dims 1 and 2 of a channels-last tensor."""
    return a.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def inside_mask(height: int, width: int, kernel_size: int, scale: int, dtype=torch.float64,
                device=None):
    """(sH, sW, K*K): 1 where the tap of the output point's window is inside the map."""
    ones = torch.ones(1, height, width, 1, dtype=dtype, device=device)
    return _up(_windows(ones, kernel_size), scale)[0, ..., 0]


def similarity_torch(q, k, kernel_size: int, scale: int):
    """Logits (B, sH, sW, K*K) = q[l'] . k[l + p]; 0 for taps outside the map."""
    windows = _up(_windows(k, kernel_size), scale)          # (B, sH, sW, K*K, d)
    return (windows * q.unsqueeze(3)).sum(-1)


def assemble_torch(w, v, kernel_size: int, scale: int):
    """(B, sH, sW, C) = sum_p w[l', p] v[l + p]; v = 0 outside the map."""
    windows = _up(_windows(v, kernel_size), scale)          # (B, sH, sW, K*K, C)
    return (windows * w.unsqueeze(-1)).sum(3)


def _softplus(x):
    # torch's F.softplus switches to x above a threshold; logaddexp is exact everywhere.
    return torch.logaddexp(x, torch.zeros_like(x))


_H = {"relu": torch.relu, "sigmoid": torch.sigmoid, "softplus": _softplus}


def normalize_torch(logits, normalizer: str, border: str, eps: float, inside=None):
    """Weights over the tap axis; `inside` (sH, sW, K*K) is needed for border 'valid'."""
    valid = border == "valid"
    if valid and inside is None:
        raise ValueError("border='valid' needs the inside mask")
    if normalizer == "softmax":
        if valid:
            logits = logits.masked_fill(inside == 0, float("-inf"))
        return torch.softmax(logits, dim=-1)
    h = _H[normalizer](logits)
    if valid:
        h = h * inside
    total = h.sum(-1, keepdim=True) + eps
    # all-zero windows (possible with relu and eps = 0) give weights 0, not NaN
    return h / torch.where(total > 0, total, torch.ones_like(total))


def sapa_core_torch(q, k, v, kernel_size: int, scale: int, normalizer: str = "softmax",
                    border: str = "zeros", eps: float = 1e-6):
    """The SAPA core, NHWC in and out: q (B, sH, sW, d), k (B, H, W, d), v (B, H, W, C)."""
    height, width = k.shape[1:3]
    logits = similarity_torch(q, k, kernel_size, scale)
    inside = inside_mask(height, width, kernel_size, scale, logits.dtype, logits.device)
    w = normalize_torch(logits, normalizer, border, eps, inside)
    return assemble_torch(w, v, kernel_size, scale)


class SAPATorch(nn.Module):
    """SAPA module with the official semantics; y (B, Cy, sH, sW), x (B, Cx, H, W), NCHW."""

    def __init__(self, dim_y: int, dim_x: int, variant: str = "B", embedding_dim: int = 32,
                 kernel_size: int = 5, scale: int = 2, out_dim=None, value_proj: bool = False,
                 use_bias: bool = True, normalizer: str = "softmax", border: str = "zeros",
                 eps: float = 1e-6):
        super().__init__()
        if variant not in ("I", "B", "P", "G"):
            raise ValueError(f"unknown variant {variant!r}")
        if variant == "I" and dim_y != dim_x:
            raise ValueError("variant I needs dim_y == dim_x")
        self.variant, self.kernel_size, self.scale = variant, kernel_size, scale
        self.normalizer, self.border, self.eps = normalizer, border, eps
        d = embedding_dim
        self.norm_y = nn.LayerNorm(dim_y)      # eps 1e-5, biased (two-pass) variance
        self.norm_x = nn.LayerNorm(dim_x)
        if variant in ("B", "P"):
            self.q = nn.Linear(dim_y + (dim_x if variant == "P" else 0), d, bias=use_bias)
        if variant == "G":
            self.qy = nn.Linear(dim_y, d, bias=use_bias)
            self.qx = nn.Linear(dim_x, d, bias=use_bias)
            self.gate = nn.Linear(dim_x, 1, bias=use_bias)
        if variant != "I":
            self.k = nn.Linear(dim_x, d, bias=use_bias)
        out = dim_x if out_dim is None else out_dim
        self.v = nn.Linear(dim_x, out, bias=use_bias) if (value_proj or out != dim_x) else None
        self.reset_parameters()

    def reset_parameters(self):
        """Official initialisation: Linear weights N(0, 0.02) cut at +-2, biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, y, x):
        y = y.permute(0, 2, 3, 1)
        x = x.permute(0, 2, 3, 1)
        s = self.scale
        yn, xn = self.norm_y(y), self.norm_x(x)
        if self.variant == "I":
            q, k = yn, xn
        else:
            k = self.k(xn)
        if self.variant == "B":
            q = self.q(yn)
        elif self.variant == "P":
            q = self.q(torch.cat([yn, _up(x, s)], dim=-1))
        elif self.variant == "G":
            g = _up(torch.sigmoid(self.gate(xn)), s)
            q = g * self.qy(yn) + (1 - g) * self.qx(_up(x, s))
        v = x if self.v is None else self.v(xn)
        out = sapa_core_torch(q, k, v, self.kernel_size, s, self.normalizer, self.border,
                              self.eps)
        return out.permute(0, 3, 1, 2)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0):
    """O(1) random weights (not the 0.02 init, whose nearly uniform kernels hide mistakes).

    Linear weights N(0, 1/fan_in) keep queries and keys O(1), so the logits spread over a few
    units: kernels are clearly non-uniform without being one-hot.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            fan_in = m.weight.shape[1]
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
        elif isinstance(m, nn.LayerNorm):
            m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return module

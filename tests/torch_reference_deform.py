"""An independent PyTorch implementation of SAPA-D, the oracle of tests/test_deform.py.

Written from the operator's definition (issue 13, docs/design.md section 6), not from the JAX
code. Two samplers of the same bilinear read, meant to agree to rounding:

* `sample_grid`: `F.grid_sample(align_corners=False, padding_mode="zeros")` with the low-res
  pixel position mapped to normalised coordinates, `x_n = (2 px + 1) / W - 1`;
* `sample_gather`: the four corners indexed explicitly, corners outside the map weighted 0.

Both then apply the range rule of the upstream kernels: a sample counts only if
`-1 < py < H` and `-1 < px < W` (exactly on the boundary it is 0 with zero gradient). The module
follows upstream `SAPADeform`: NCHW at the boundary, 1x1 convs `q`, `k`, `offset`, GroupNorms
`norm_y`, `norm_x` (norm=True), so that `state_dict()` has upstream's keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def positions(offsets, num_points: int, groups: int, scale: int):
    """(py, px), (B, sH, sW, G, P): parent pixel + (dy, dx); offsets NHWC, d = 0 is dx."""
    batch, out_h, out_w, _ = offsets.shape
    pairs = offsets.reshape(batch, out_h, out_w, groups, num_points, 2)
    rows = torch.div(torch.arange(out_h), scale, rounding_mode="floor").to(offsets.dtype)
    cols = torch.div(torch.arange(out_w), scale, rounding_mode="floor").to(offsets.dtype)
    py = rows.view(1, out_h, 1, 1, 1) + pairs[..., 1]
    px = cols.view(1, 1, out_w, 1, 1) + pairs[..., 0]
    return py, px


def in_range(py, px, height: int, width: int):
    return (py > -1) & (py < height) & (px > -1) & (px < width)


def sample_gather(feat, py, px):
    """feat (B, H, W, G, Cg), positions (B, sH, sW, G, P) -> samples (B, sH, sW, G, P, Cg)."""
    batch, height, width, groups, _ = feat.shape
    y0, x0 = torch.floor(py).detach(), torch.floor(px).detach()
    ly, lx = py - y0, px - x0
    b_idx = torch.arange(batch).view(batch, 1, 1, 1, 1)
    g_idx = torch.arange(groups).view(1, 1, 1, groups, 1)
    total = 0
    for a, wy in ((0, 1 - ly), (1, ly)):
        for b, wx in ((0, 1 - lx), (1, lx)):
            yi, xi = (y0 + a).long(), (x0 + b).long()
            on_map = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
            corner = feat[b_idx, yi.clamp(0, height - 1), xi.clamp(0, width - 1), g_idx]
            total = total + (wy * wx * on_map)[..., None] * corner
    return torch.where(in_range(py, px, height, width)[..., None], total,
                       torch.zeros_like(total))


def sample_grid(feat, py, px):
    """As `sample_gather`, through `F.grid_sample` (one call per group)."""
    batch, height, width, groups, cg = feat.shape
    _, out_h, out_w, _, points = py.shape
    out = []
    for g in range(groups):
        grid = torch.stack([(2 * px[..., g, :] + 1) / width - 1,
                            (2 * py[..., g, :] + 1) / height - 1], dim=-1)
        grid = grid.reshape(batch, out_h, out_w * points, 2)
        plane = feat[..., g, :].permute(0, 3, 1, 2)                        # (B, Cg, H, W)
        got = F.grid_sample(plane, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)                           # (B, Cg, sH, sW*P)
        out.append(got.reshape(batch, cg, out_h, out_w, points).permute(0, 2, 3, 4, 1))
    samples = torch.stack(out, dim=3)                                      # (B, sH, sW, G, P, Cg)
    return torch.where(in_range(py, px, height, width)[..., None], samples,
                       torch.zeros_like(samples))


SAMPLERS = {"gather": sample_gather, "grid": sample_grid}


def deform_attention_torch(q, k, offsets, num_points: int, groups: int, scale: int,
                           sampler: str = "gather"):
    """Softmax weights (B, sH, sW, G, P) of q against the sampled keys (no 1/sqrt(E))."""
    batch, out_h, out_w, qk_dim = q.shape
    height, width = k.shape[1:3]
    dim = qk_dim // groups
    py, px = positions(offsets, num_points, groups, scale)
    keys = SAMPLERS[sampler](k.reshape(batch, height, width, groups, dim), py, px)
    logits = (keys * q.reshape(batch, out_h, out_w, groups, 1, dim)).sum(-1)
    return torch.softmax(logits, dim=-1)


def deform_core_torch(q, k, v, offsets, num_points: int, groups: int, scale: int,
                      sampler: str = "gather"):
    """SAPA-D core, NHWC: q (B, sH, sW, G*E), k (B, H, W, G*E), v (B, H, W, C),
    offsets (B, sH, sW, G*P*2) -> (B, sH, sW, C)."""
    batch, height, width, channels = v.shape
    attn = deform_attention_torch(q, k, offsets, num_points, groups, scale, sampler)
    py, px = positions(offsets, num_points, groups, scale)
    values = SAMPLERS[sampler](v.reshape(batch, height, width, groups, channels // groups),
                               py, px)
    out = (attn[..., None] * values).sum(-2)                                # (B, sH, sW, G, Cg)
    return out.reshape(*out.shape[:3], channels)


class SAPADeformTorch(nn.Module):
    """SAPA-D with upstream's semantics and names; y (B, Cy, sH, sW), x (B, Cx, H, W), NCHW."""

    def __init__(self, dim_y: int, dim_x: int, num_points: int = 9, groups: int = 4,
                 embedding_dim: int = 32, scale: int = 2, use_bias: bool = True,
                 high_offset: bool = True, norm: bool = False, sampler: str = "gather"):
        super().__init__()
        self.num_points, self.groups, self.scale = num_points, groups, scale
        self.high_offset, self.norm, self.sampler = high_offset, norm, sampler
        if norm:
            self.norm_y = nn.GroupNorm(32, dim_y)
            self.norm_x = nn.GroupNorm(32, dim_x)
        qk_dim = groups * embedding_dim
        offset_dim = groups * num_points * 2 * (scale ** 2 if high_offset else 1)
        self.q = nn.Conv2d(dim_y, qk_dim, kernel_size=1, bias=use_bias)
        self.k = nn.Conv2d(dim_x, qk_dim, kernel_size=1, bias=use_bias)
        self.offset = nn.Conv2d(dim_x, offset_dim, kernel_size=1, bias=use_bias)

    def forward(self, y, x):
        yn, xn = (self.norm_y(y), self.norm_x(x)) if self.norm else (y, x)
        q, k = self.q(yn), self.k(xn)
        offsets = self.offset(xn)
        if self.high_offset:
            offsets = F.pixel_shuffle(offsets, self.scale)
        else:
            offsets = F.interpolate(offsets, scale_factor=self.scale, mode="nearest")
        nhwc = [a.permute(0, 2, 3, 1) for a in (q, k, x, offsets)]
        out = deform_core_torch(*nhwc, self.num_points, self.groups, self.scale, self.sampler)
        return out.permute(0, 3, 1, 2)


@torch.no_grad()
def randomize_deform_(module: nn.Module, seed: int = 0, offset_std: float = 1.5):
    """O(1) random weights: conv weights N(0, 1/fan_in) (offset conv `offset_std` times
    larger, so that samples land at fractional positions and some off the map), biases
    0.5 N(0, 1), GroupNorm weight 1 + 0.3 N, bias 0.3 N."""
    gen = torch.Generator().manual_seed(seed)
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            std = (offset_std if name == "offset" else 1.0) / math.sqrt(m.weight.shape[1])
            m.weight.copy_(std * torch.randn(m.weight.shape, generator=gen))
            if m.bias is not None:
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
        elif isinstance(m, nn.GroupNorm):
            m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return module

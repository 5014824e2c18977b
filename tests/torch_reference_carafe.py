"""An independent PyTorch implementation of mmcv's CARAFEPack, the oracle of the CARAFE tests.

Written from the operator's definition (issue 12, docs/design.md section 5), not from the JAX
code, NCHW as mmcv. The reassembly exists in two formulations that the tests hold against each
other:

* `reassemble_unfold`: `F.unfold` windows of x (channel-major, then kernel rows, then kernel
  columns), repeated s x s to the high-res grid, weighted by each group's kernel;
* `reassemble_loop`: one zero-padded shifted copy of x per tap (ky, kx), nearest-upsampled by
  `F.interpolate`, times that tap's weight broadcast over the group's channels.

The module has mmcv's layer names (`channel_compressor`, `content_encoder`), so `state_dict()`
has CARAFEPack's keys, and mmcv's initialisation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch_reference import normalize_torch


def reassemble_unfold(x, masks, kernel_size: int, groups: int, scale: int):
    """x (B, C, H, W), masks (B, G*K*K, sH, sW) normalised -> (B, C, sH, sW)."""
    batch, channels, height, width = x.shape
    taps = kernel_size * kernel_size
    cols = F.unfold(x, kernel_size=kernel_size, padding=kernel_size // 2)
    cols = cols.view(batch, groups, channels // groups, taps, height, width)
    cols = cols.repeat_interleave(scale, dim=4).repeat_interleave(scale, dim=5)
    w = masks.view(batch, groups, 1, taps, height * scale, width * scale)
    return (cols * w).sum(dim=3).reshape(batch, channels, height * scale, width * scale)


def reassemble_loop(x, masks, kernel_size: int, groups: int, scale: int):
    """The same as `reassemble_unfold`, accumulated tap by tap."""
    batch, channels, height, width = x.shape
    r = kernel_size // 2
    padded = F.pad(x, (r, r, r, r))
    per_tap = masks.view(batch, groups, kernel_size * kernel_size, height * scale,
                         width * scale)
    out = torch.zeros(batch, channels, height * scale, width * scale, dtype=x.dtype)
    for ky in range(kernel_size):
        for kx in range(kernel_size):
            shifted = padded[:, :, ky:ky + height, kx:kx + width]
            shifted = F.interpolate(shifted, scale_factor=scale, mode="nearest")
            weight = per_tap[:, :, ky * kernel_size + kx]           # (B, G, sH, sW)
            out = out + weight.repeat_interleave(channels // groups, dim=1) * shifted
    return out


REASSEMBLE = {"unfold": reassemble_unfold, "loop": reassemble_loop}


def normalize_groups(logits, groups: int, normalizer: str = "softmax", eps: float = 1e-6):
    """logits (B, G*K*K, sH, sW) -> weights of the same shape, normalised over each group's taps."""
    batch, channels, height, width = logits.shape
    grouped = logits.view(batch, groups, channels // groups, height, width)
    if normalizer == "softmax":
        w = torch.softmax(grouped, dim=2)
    elif normalizer == "none":  # the logits are the weights
        w = grouped
    else:  # the h / (sum h + eps) normalisers of the SAPA reference, tap axis last
        w = normalize_torch(grouped.movedim(2, -1), normalizer, "zeros", eps).movedim(-1, 2)
    return w.reshape(batch, channels, height, width)


def carafe_core_torch(x, logits, kernel_size: int, scale: int, groups: int,
                      normalizer: str = "softmax", eps: float = 1e-6, formulation="unfold"):
    """The CARAFE core NHWC in and out: x (B, H, W, C), logits (B, sH, sW, G*K*K)."""
    w = normalize_groups(logits.permute(0, 3, 1, 2), groups, normalizer, eps)
    out = REASSEMBLE[formulation](x.permute(0, 3, 1, 2), w, kernel_size, groups, scale)
    return out.permute(0, 2, 3, 1)


class CARAFEPackTorch(nn.Module):
    """CARAFEPack semantics: x (B, C, H, W) -> (B, C, sH, sW)."""

    def __init__(self, channels: int, scale_factor: int, up_kernel: int = 5, up_group: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1,
                 compressed_channels: int = 64, formulation: str = "unfold"):
        super().__init__()
        self.scale_factor, self.up_kernel, self.up_group = scale_factor, up_kernel, up_group
        self.formulation = formulation
        self.channel_compressor = nn.Conv2d(channels, compressed_channels, 1)
        self.content_encoder = nn.Conv2d(
            compressed_channels, up_group * up_kernel ** 2 * scale_factor ** 2, encoder_kernel,
            padding=int((encoder_kernel - 1) * encoder_dilation / 2), dilation=encoder_dilation)
        self.reset_parameters()

    def reset_parameters(self):
        """mmcv: xavier-uniform convs with zero biases, then encoder weight ~ normal(0, 0.001)."""
        for m in (self.channel_compressor, self.content_encoder):
            nn.init.xavier_uniform_(m.weight, gain=1.0)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.content_encoder.weight, 0.0, 0.001)

    def forward(self, x):
        masks = self.content_encoder(self.channel_compressor(x))
        masks = F.pixel_shuffle(masks, self.scale_factor)
        masks = normalize_groups(masks, self.up_group)
        return REASSEMBLE[self.formulation](x, masks, self.up_kernel, self.up_group,
                                            self.scale_factor)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0):
    """O(1) random weights: conv weights N(0, 1/fan_in), biases N(0, 0.25).

    The encoder's logits then spread over a few units, so the kernels are clearly non-uniform
    (mmcv's 0.001 init gives nearly uniform kernels, which would hide tap-order mistakes).
    """
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in))
            m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
    return module

"""Network building blocks shared by the examples (the parts that are not upsamplers)."""
from __future__ import annotations

import flax.linen as nn


class ConvBlock(nn.Module):
    """`depth` x (3x3 conv -> GroupNorm -> ReLU). GroupNorm: no batch statistics to carry."""
    features: int
    depth: int = 2

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
            x = nn.GroupNorm(num_groups=min(8, self.features))(x)
            x = nn.relu(x)
        return x

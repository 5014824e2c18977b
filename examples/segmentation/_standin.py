"""TEMPORARY stand-in for sapa_jax.linen.SAPA (DESIGN.md section 1); removed once linen.py lands."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import sapa_jax

_init = nn.initializers.truncated_normal(0.02)


def _up(x, s):
    return jnp.repeat(jnp.repeat(x, s, axis=1), s, axis=2)


class SAPA(nn.Module):
    variant: str = "B"
    embedding_dim: int = 32
    kernel_size: int = 5
    scale: int = 2

    @nn.compact
    def __call__(self, y, x):
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)
        dense = lambda name: nn.Dense(self.embedding_dim, kernel_init=_init, name=name)
        yn, xn = ln("norm_y")(y), ln("norm_x")(x)
        if self.variant == "I":
            q, k = yn, xn
        else:
            k = dense("k")(xn)
            if self.variant == "B":
                q = dense("q")(yn)
            elif self.variant == "P":
                q = dense("q")(jnp.concatenate([yn, _up(x, self.scale)], -1))
            else:
                g = _up(jax.nn.sigmoid(nn.Dense(1, kernel_init=_init, name="gate")(xn)), self.scale)
                q = g * dense("qy")(yn) + (1 - g) * dense("qx")(_up(x, self.scale))
        return sapa_jax.sapa_upsample(q, k, x, kernel_size=self.kernel_size, scale=self.scale)

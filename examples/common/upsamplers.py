"""The upsampler registry: one name per upsampler, one Flax module with one call convention.

    up = Upsampler("sapa-b", scale=2)            # or make_upsampler("sapa-b")
    out = up.apply(variables, x, guide)          # x (B, H, W, C) -> (B, 2H, 2W, C)

`guide` is the encoder feature at the output resolution, `(B, sH, sW, Cy)`; only the guided
upsamplers (`needs_guide`) read it, the others accept and ignore it, so a decoder passes the
same tensors whatever the upsampler. SAPA-I has no projections and needs `Cy == C`
(`guide_same_width`): a decoder hands it a projection of the encoder feature to the decoder
width that exists for every upsampler (a lateral), not a parameter of its own.

    nearest    each pixel repeated s x s                                  no parameters
    bilinear   half-pixel bilinear (PyTorch align_corners=False)          no parameters
    deconv     transposed conv, kernel 2s, stride s, C -> C, initialised
               as bilinear per channel (FCN's choice): a learned baseline that starts where
               bilinear is and may learn anything a 2s x 2s transposed conv can
    carafe     sapa_jax.linen.CARAFE (K = kernel_size, encoder 3x3, compressor min(64, C))
    sapa-i/b/p/g  sapa_jax.linen.SAPA of that variant (K, embedding_dim, normalizer)
    sapa-d     sapa_jax.linen.SAPADeform (deformable SAPA; embedding_dim)

`carafe` and `sapa-d` exist only in builds of sapa_jax that have those modules; elsewhere
`parse_upsampler` raises a ValueError saying so (`available`, `unavailable_reason`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sapa_jax import linen as sapa_linen
from sapa_jax.modules import nearest_up

UPSAMPLERS = ("nearest", "bilinear", "deconv", "carafe", "sapa-i", "sapa-b", "sapa-p",
              "sapa-g", "sapa-d")
SAPA_VARIANTS = ("sapa-i", "sapa-b", "sapa-p", "sapa-g")
_GUIDED = SAPA_VARIANTS + ("sapa-d",)
_MODULE_OF = {"carafe": "CARAFE", "sapa-d": "SAPADeform"}  # sapa_jax.linen names


def unavailable_reason(name: str) -> str | None:
    """Why `name` cannot run in this build of sapa_jax, or None if it can."""
    module = _MODULE_OF.get(name)
    if module is not None and not hasattr(sapa_linen, module):
        return (f"upsampler {name!r} is not available in this build: sapa_jax.linen.{module} "
                f"does not exist in the installed sapa_jax")
    return None


def available(include_unavailable: bool = False) -> tuple[str, ...]:
    """The registry's names, by default only those this build can run."""
    return tuple(n for n in UPSAMPLERS if include_unavailable or unavailable_reason(n) is None)


def parse_upsampler(name: str) -> str:
    """Canonical (lower-case) name; ValueError for an unknown or unavailable upsampler."""
    if not isinstance(name, str) or name.strip().lower() not in UPSAMPLERS:
        raise ValueError(f"upsampler must be one of {list(UPSAMPLERS)}, got {name!r}")
    name = name.strip().lower()
    reason = unavailable_reason(name)
    if reason:
        raise ValueError(reason)
    return name


def needs_guide(name: str) -> bool:
    """Whether the upsampler reads the high-res guidance feature."""
    return name in _GUIDED


def guide_same_width(name: str) -> bool:
    """Whether the guidance must have the decoder feature's channel count (SAPA-I)."""
    return name == "sapa-i"


def bilinear2x(x: jax.Array) -> jax.Array:
    """2x bilinear upsampling of (B, H, W, C), half-pixel centres, edges clamped.

    Equals `jax.image.resize(x, ..., "bilinear")` (PyTorch's align_corners=False) for a factor
    of 2, where every output pixel mixes two inputs per axis with weights 3/4 and 1/4; written
    out because the generic resize is several times slower to differentiate on CPU.
    """
    for axis in (1, 2):
        n = x.shape[axis]
        prev = jnp.take(x, jnp.maximum(jnp.arange(n) - 1, 0), axis=axis)
        nxt = jnp.take(x, jnp.minimum(jnp.arange(n) + 1, n - 1), axis=axis)
        even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
        x = jnp.stack([even, odd], axis=axis + 1)
        x = x.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 2:])
    return x


def bilinear(x: jax.Array, scale: int) -> jax.Array:
    """Bilinear upsampling by an integer `scale` (half-pixel centres)."""
    if scale == 2:
        return bilinear2x(x)
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, scale * h, scale * w, c), "bilinear")


def bilinear_deconv_init(scale: int):
    """Initialiser of a (2s, 2s, C, C) transposed-conv kernel: bilinear per channel."""
    def init(key, shape, dtype=jnp.float32):
        del key
        kh, kw, cin, cout = shape
        centre = (np.arange(kh) + 0.5) / scale - 1.0  # tap positions in input pixels
        taps = np.maximum(0.0, 1.0 - np.abs(centre))
        kernel = np.zeros(shape, np.float32)
        kernel[:, :, np.arange(min(cin, cout)), np.arange(min(cin, cout))] = \
            np.outer(taps, taps)[:, :, None]
        return jnp.asarray(kernel, dtype)
    return init


class Upsampler(nn.Module):
    """Upsamples `x` by `scale` with the upsampler `method` (see the module docstring).

    Attributes:
      method: a name from `UPSAMPLERS`.
      scale: integer factor (2 in the examples).
      kernel_size: K of CARAFE and SAPA.
      embedding_dim: query/key width of SAPA B/P/G and SAPA-D.
      normalizer: SAPA's kernel normaliser ("softmax", "relu", "sigmoid", "softplus", "none"
        where the installed core has it).
      border: SAPA's border mode, "zeros" (parity with the official kernels) or "valid".
    """
    method: str
    scale: int = 2
    kernel_size: int = 5
    embedding_dim: int = 32
    normalizer: str = "softmax"
    border: str = "zeros"

    @nn.compact
    def __call__(self, x: jax.Array, guide: jax.Array | None = None) -> jax.Array:
        """x `(B, H, W, C)`, guide `(B, sH, sW, Cy)` or None -> `(B, sH, sW, C)`."""
        method = parse_upsampler(self.method)
        # Inputs kept for the figures (feature and kernel maps); free unless asked for.
        self.sow("intermediates", "x", x)
        if guide is not None:
            self.sow("intermediates", "y", guide)
        if method == "nearest":
            return nearest_up(x, self.scale)
        if method == "bilinear":
            return bilinear(x, self.scale)
        channels = x.shape[-1]
        if method == "deconv":
            # Padding s // 2 on each side of the dilated input makes output pixel i' take its
            # taps from inputs at (i' + 0.5) / s - 0.5 +- 1, as bilinear does (borders aside).
            pad = 2 * self.scale - 1 - self.scale // 2
            return nn.ConvTranspose(channels, (2 * self.scale, 2 * self.scale),
                                    strides=(self.scale, self.scale),
                                    padding=((pad, pad), (pad, pad)),
                                    kernel_init=bilinear_deconv_init(self.scale),
                                    name="deconv")(x)
        if method == "carafe":
            return sapa_linen.CARAFE(scale=self.scale, kernel_size=self.kernel_size,
                                     compressed_channels=min(64, channels), name="carafe")(x)
        if guide is None:
            raise ValueError(f"upsampler {method!r} needs the guidance feature `guide`, got None")
        if method == "sapa-d":
            return sapa_linen.SAPADeform(embedding_dim=self.embedding_dim, scale=self.scale,
                                         name="sapa_d")(guide, x)
        return sapa_linen.SAPA(variant=method[-1].upper(), embedding_dim=self.embedding_dim,
                               kernel_size=self.kernel_size, scale=self.scale,
                               normalizer=self.normalizer, border=self.border,
                               name="sapa")(guide, x)


def make_upsampler(name: str, **options) -> Upsampler:
    """`Upsampler(parse_upsampler(name), **options)`: fails early for an unavailable name."""
    return Upsampler(parse_upsampler(name), **options)

"""sapa-jax: SAPA (Similarity-Aware Point Affiliation) feature upsampling for JAX and Flax.

Functional core (NHWC):  `sapa_upsample`, `similarity`, `normalize`, `assemble`.
Flax modules:            `sapa_jax.linen.SAPA`, `sapa_jax.nnx.SAPA`.
PyTorch weights:         `sapa_jax.convert.from_torch` / `to_torch`.
"""
from .core import assemble, ffi_available, normalize, sapa_upsample, similarity

from . import convert, linen, modules, nnx  # Flax modules and PyTorch conversion

__version__ = "0.1.0"

__all__ = ["sapa_upsample", "similarity", "normalize", "assemble", "ffi_available"]
__all__ += ["linen", "nnx", "convert", "modules"]

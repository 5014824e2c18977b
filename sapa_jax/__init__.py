"""sapa-jax: SAPA (Similarity-Aware Point Affiliation) feature upsampling for JAX and Flax.

Functional core (NHWC):  `sapa_upsample`, `similarity`, `normalize`, `assemble`.
Kernel availability:     `ffi_available(platform)` (usable here), `ffi_status()` (built / usable /
                         why not).
CARAFE, SAPA-D cores:    `carafe_upsample`, `deform_upsample`.
Flax modules:            `sapa_jax.linen.SAPA`, `CARAFE`, `SAPADeform` (and `sapa_jax.nnx.*`).
PyTorch weights:         `sapa_jax.convert.from_torch` / `to_torch`.
jax.export:              `sapa_jax.export_checks()`.
"""
import importlib

from .core import (FallbackWarning, assemble, ffi_available, ffi_status, normalize,
                   sapa_upsample, similarity)
from .carafe import carafe_upsample  # CARAFE core (docs/design.md section 5)
from .deform import deform_upsample  # SAPA-D core (docs/design.md section 6)
from ._export import export_checks

from . import convert, modules  # PyTorch conversion and the module math; no Flax needed

__version__ = "0.1.0"

__all__ = ["sapa_upsample", "similarity", "normalize", "assemble", "ffi_available", "ffi_status",
           "FallbackWarning"]
__all__ += ["export_checks", "carafe_upsample", "deform_upsample"]
__all__ += ["linen", "nnx", "convert", "modules"]

# The Flax wrappers load on first use (`sapa_jax.linen`, `sapa_jax.nnx`), so the functional core
# imports, and works, even where the installed Flax does not import with the installed JAX.
_LAZY = ("linen", "nnx")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

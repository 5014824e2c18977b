"""`export_checks`: what `jax.export` needs to serialise code that calls the fused kernels."""
from __future__ import annotations

import jax

from . import _ffi


def export_checks() -> list[jax.export.DisabledSafetyCheck]:
    """The safety checks to disable when exporting code that runs the fused SAPA kernels.

    `jax.export` refuses custom calls whose targets have no compatibility guarantee; the SAPA
    kernels are such targets. Pass this list as
    `jax.export.export(fn, disabled_checks=sapa_jax.export_checks())`. The serialised module
    then calls the targets by name ("sapa_forward", "sapa_backward"): the process that
    deserialises and runs it must `import sapa_jax` first (importing registers the targets),
    with a build of sapa-jax whose kernels take the same operands and attributes.

    Returns one `DisabledSafetyCheck.custom_call` per target that this installation
    registers (none when no kernel is built: the jnp path needs no exemption).
    """
    return [jax.export.DisabledSafetyCheck.custom_call(name) for name in _ffi.registered_targets()]

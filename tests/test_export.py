"""jax.export of code that runs the fused kernels: export -> serialize -> deserialize -> call in a
fresh process, forward and vjp_order=1, against the direct result."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sapa_jax
from conftest import random_qkv

pytestmark = pytest.mark.skipif(not sapa_jax.ffi_available("cpu"),
                                reason="CPU FFI kernel not built")

OPTS = dict(kernel_size=3, scale=2, normalizer="softmax", border="valid")


def upsample(q, k, v):
    return sapa_jax.sapa_upsample(q, k, v, **OPTS)  # default impl: the kernel on CPU


def _specs(*arrays):
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]


def test_export_checks_lists_the_kernel_targets():
    checks = sapa_jax.export_checks()
    assert all(isinstance(c, jax.export.DisabledSafetyCheck) for c in checks)
    assert {"sapa_forward", "sapa_backward"} <= {c.is_custom_call() for c in checks}


def test_export_without_the_checks_is_refused():
    q, k, v = random_qkv(0, 1, 3, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="custom calls"):
        jax.export.export(jax.jit(upsample))(*_specs(q, k, v))


# Runs in a fresh interpreter: first without sapa_jax (the targets are unknown there), then
# after importing it.
_FRESH_PROCESS = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from jax import export

    data = np.load(sys.argv[1])
    with open(sys.argv[2], "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    assert "sapa_forward" in exported.mlir_module()
    args = [data[n] for n in "qkv"]
    try:
        exported.call(*args)
    except Exception as err:  # the target is not registered in this process yet
        assert "sapa_forward" in str(err), err
    else:
        raise AssertionError("the call ran without sapa_jax's targets registered")

    import sapa_jax  # registers the FFI targets
    np.testing.assert_allclose(np.asarray(exported.call(*args)), data["out"], rtol=0, atol=0)
    grads = exported.vjp().call(*args, data["g"])
    for name, got in zip("qkv", grads):
        np.testing.assert_allclose(np.asarray(got), data["d" + name], rtol=0, atol=0)
    print("fresh process ok")
""")


def test_serialized_export_runs_in_a_fresh_process(tmp_path):
    q, k, v = random_qkv(0, 2, 3, 4, 2, 3, 5)
    g = np.random.default_rng(1).standard_normal((2, 6, 8, 5)).astype(np.float32)
    exported = jax.export.export(jax.jit(upsample), disabled_checks=sapa_jax.export_checks())(
        *_specs(q, k, v))
    (tmp_path / "sapa.bin").write_bytes(exported.serialize(vjp_order=1))
    out, vjp = jax.vjp(upsample, q, k, v)
    dq, dk, dv = vjp(jnp.asarray(g))
    np.savez(tmp_path / "data.npz", q=q, k=k, v=v, g=g, out=out, dq=dq, dk=dk, dv=dv)

    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(tmp_path / "data.npz"),
         str(tmp_path / "sapa.bin")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fresh process ok" in result.stdout

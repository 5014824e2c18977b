"""Install and availability: "built" vs "usable" kernels, the fallback warning, what the install
scripts say they build, and the packaging facts (license, py.typed, dependencies)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest

import sapa_jax
from sapa_jax import _ffi, core

ROOT = Path(__file__).resolve().parents[1]

# cuda_probe() results: CUDA encodes versions as 1000 * major + 10 * minor.
PROBE_OK = dict(driver_version=13000, runtime_version=13000, device_count=1, error="")
PROBE_NO_DRIVER = dict(driver_version=0, runtime_version=13000, device_count=0,
                       error="CUDA driver version is insufficient for CUDA runtime version")
PROBE_OLD_DRIVER = dict(driver_version=12040, runtime_version=13000, device_count=0,
                        error="CUDA driver version is insufficient for CUDA runtime version")
PROBE_NO_DEVICE = dict(driver_version=13000, runtime_version=13000, device_count=0,
                       error="no CUDA-capable device is detected")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend the CUDA module is built, with the probe result and JAX GPU count given."""
    def install(probe, jax_gpus=1):
        monkeypatch.setitem(_ffi._modules, "gpu", object())
        # The CUDA module's contract: the CPU one's codes, the CUDA dtypes (no float64).
        contract = dict(_ffi._contracts["cpu"], dtypes=("float32", "bfloat16", "float16"))
        monkeypatch.setitem(_ffi._contracts, "gpu", contract)
        monkeypatch.delitem(_ffi._build_errors, "gpu", raising=False)
        monkeypatch.setattr(_ffi, "_usability", {})
        monkeypatch.setattr(_ffi, "_probe_cuda", lambda: dict(probe))
        monkeypatch.setattr(_ffi, "_jax_gpu_count", lambda: jax_gpus)
        monkeypatch.setattr(core, "_warned_fallback", set())
    monkeypatch.delenv("SAPA_JAX_IMPL", raising=False)
    return install


@pytest.mark.parametrize("probe,jax_gpus,reason", [
    (PROBE_NO_DRIVER, 0, "no CUDA driver"),
    (PROBE_OLD_DRIVER, 1, "built with CUDA 13.0, but the driver supports CUDA up to 12.4"),
    (PROBE_NO_DEVICE, 0, "no CUDA-capable device"),
    (dict(PROBE_OK, device_count=0), 0, "no CUDA device visible"),
    (PROBE_OK, 0, "JAX sees no GPU"),
])
def test_gpu_built_but_not_usable(fake_cuda, probe, jax_gpus, reason):
    fake_cuda(probe, jax_gpus)
    assert not sapa_jax.ffi_available("gpu")
    status = sapa_jax.ffi_status()["gpu"]
    assert status.built and not status.usable
    assert reason in status.reason


def test_gpu_usable_when_driver_and_device_are_there(fake_cuda):
    fake_cuda(PROBE_OK)
    assert sapa_jax.ffi_available("gpu") and sapa_jax.ffi_available("cuda")
    assert sapa_jax.ffi_status()["gpu"] == (True, True, "")
    # A driver of a newer minor (or major) version than the runtime is fine.
    fake_cuda(dict(PROBE_OK, driver_version=13010, runtime_version=13000))
    assert sapa_jax.ffi_available("gpu")


def test_gpu_probe_runs_once(fake_cuda, monkeypatch):
    fake_cuda(PROBE_OK)
    calls = []
    monkeypatch.setattr(_ffi, "_probe_cuda", lambda: calls.append(1) or dict(PROBE_OK))
    for _ in range(3):
        sapa_jax.ffi_available("gpu")
    assert len(calls) == 1


def test_auto_falls_back_with_one_warning_when_the_cuda_kernel_cannot_run(fake_cuda, monkeypatch):
    """A module built with a newer CUDA than the driver: auto runs jnp and says so, once."""
    fake_cuda(PROBE_OLD_DRIVER)
    monkeypatch.setattr(core, "_current_platform", lambda *arrays: "gpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert core.resolve_impl("auto", np.float32) == "xla"
        assert core.resolve_impl("auto", np.float32) == "xla"
    fallback = [w for w in caught if issubclass(w.category, sapa_jax.FallbackWarning)]
    assert len(fallback) == 1
    message = str(fallback[0].message)
    assert "'gpu'" in message and "driver supports CUDA up to 12.4" in message
    assert "impl='xla'" in message
    with pytest.raises(RuntimeError, match="cannot run on platform 'gpu'.*driver supports"):
        core.resolve_impl("ffi", np.float32)
    # Explicitly asking for jnp is silent.
    monkeypatch.setattr(core, "_warned_fallback", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert core.resolve_impl("xla", np.float32) == "xla"


def test_auto_on_a_gpu_without_the_cuda_module_says_why(monkeypatch):
    """JAX runs on a GPU but the install found no nvcc: jnp, with one warning naming the fix."""
    monkeypatch.delenv("SAPA_JAX_IMPL", raising=False)
    monkeypatch.delitem(_ffi._modules, "gpu", raising=False)
    monkeypatch.setitem(_ffi._build_errors, "gpu", "extension sapa_jax._sapa_cuda not importable")
    monkeypatch.setattr(core, "_current_platform", lambda *arrays: "gpu")
    monkeypatch.setattr(core, "_warned_fallback", set())
    assert sapa_jax.ffi_status()["gpu"][:2] == (False, False)
    with pytest.warns(sapa_jax.FallbackWarning, match="nvcc"):
        assert core.resolve_impl("auto", np.float32) == "xla"


def test_auto_picks_the_cuda_kernel_when_usable(fake_cuda, monkeypatch):
    fake_cuda(PROBE_OK)
    monkeypatch.setattr(core, "_current_platform", lambda *arrays: "gpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert core.resolve_impl("auto", np.float32) == "ffi"
        assert core.resolve_impl("auto", np.float64) == "xla"  # dtype not supported: no warning


def test_no_warning_on_platforms_without_a_kernel(monkeypatch):
    monkeypatch.delenv("SAPA_JAX_IMPL", raising=False)
    monkeypatch.setattr(core, "_current_platform", lambda *arrays: "tpu")
    monkeypatch.setattr(core, "_warned_fallback", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert core.resolve_impl("auto", np.float32) == "xla"


def test_real_cuda_probe():
    """The compiled probe answers on any machine, with or without a driver or a GPU."""
    if "gpu" not in _ffi._modules:
        pytest.skip("CUDA module not built")
    probe = _ffi._modules["gpu"].cuda_probe()
    assert set(probe) == {"driver_version", "runtime_version", "device_count", "error"}
    assert probe["runtime_version"] >= 11000
    status = _ffi.status("gpu")
    assert status.usable == (not _ffi.cuda_unusable_reason(probe, _ffi._jax_gpu_count()))
    if not _ffi._jax_gpu_count():
        assert not sapa_jax.ffi_available("gpu")


@pytest.mark.gpu
def test_cuda_kernel_usable_on_a_gpu_machine():
    probe = _ffi._modules["gpu"].cuda_probe()
    assert probe["device_count"] >= 1 and probe["driver_version"] // 1000 >= probe[
        "runtime_version"] // 1000, probe
    assert sapa_jax.ffi_status()["gpu"] == (True, True, "")


# ---------------------------------------------------------------------- source-tree shadowing

def test_source_tree_hint_names_cause_and_fix(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'sapa-jax'\n")
    (tmp_path / "xla_ffi").mkdir()
    (tmp_path / "sapa_jax").mkdir()
    hint = _ffi.source_tree_hint(tmp_path / "sapa_jax")
    assert "source tree" in hint and "run from another directory" in hint
    assert f"pip install --no-build-isolation -e {tmp_path}" in hint
    elsewhere = _ffi.source_tree_hint(tmp_path / "site-packages" / "sapa_jax")
    assert "source tree" not in elsewhere and "reinstall" in elsewhere


def test_missing_cpu_module_warns_once_from_a_source_tree(tmp_path):
    """The clone's root after a plain `pip install .`: sapa_jax/ without compiled modules."""
    shutil.copytree(ROOT / "sapa_jax", tmp_path / "sapa_jax",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "xla_ffi").mkdir()
    script = "\n".join([
        # An editable install of this checkout would redirect `import sapa_jax` to it: drop its
        # finder so the current directory's copy is imported, as after a plain `pip install .`.
        "import sys",
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]",
        "import warnings; warnings.simplefilter('always')",
        "import numpy as np, sapa_jax",
        "assert sapa_jax.__file__.startswith(sys.argv[1]), sapa_jax.__file__",
        "assert not sapa_jax.ffi_available('cpu')",
        "q, k, v = np.ones((1, 4, 4, 2), np.float32), np.ones((1, 2, 2, 2), np.float32), "
        "np.ones((1, 2, 2, 3), np.float32)",
        "for _ in range(2): sapa_jax.sapa_upsample(q, k, v, kernel_size=3)",
    ])
    env = {key: value for key, value in os.environ.items() if key != "SAPA_JAX_IMPL"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("FallbackWarning") == 1, result.stderr
    assert "source tree" in result.stderr and "pip install --no-build-isolation -e" in result.stderr
    assert "it shadows the sapa-jax installed in" in result.stderr  # this checkout's own install


# ---------------------------------------------------------------------- what the scripts build

def _build_info(tmp_path, env_extra, nvcc=True, cwd=None):
    bin_dir = tmp_path / ("bin-nvcc" if nvcc else "bin-none")
    bin_dir.mkdir(exist_ok=True)
    if nvcc:
        fake = bin_dir / "nvcc"
        fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
        fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), **env_extra}
    return subprocess.run(["bash", str(ROOT / "scripts" / "build_info.sh")], env=env,
                          capture_output=True, text=True, timeout=30, cwd=cwd or tmp_path)


def test_build_info_with_nvcc(tmp_path):
    out = _build_info(tmp_path, {}).stdout
    assert "CUDA module: yes" in out and "release 13.0" in out
    assert "80-real 86-real 89-real 90" in out and "SAPA_CUDA=OFF" in out
    one = _build_info(tmp_path, {"SAPA_CUDA_ARCHITECTURES": "90"}).stdout
    assert "CUDA module: yes" in one and "architectures: 90" in one
    # A reused build folder keeps the architectures of the earlier build: say so.
    cache = tmp_path / "clone" / "build" / "cp311-cp311-linux_x86_64" / "CMakeCache.txt"
    cache.parent.mkdir(parents=True)
    cache.write_text("CMAKE_CUDA_ARCHITECTURES:UNINITIALIZED=86\n")
    kept = _build_info(tmp_path, {}, cwd=tmp_path / "clone").stdout
    assert "architectures: 86 (kept from an earlier build" in kept


def test_build_info_without_cuda(tmp_path):
    off = _build_info(tmp_path, {"SAPA_CUDA": "OFF"}).stdout
    assert "CUDA module: no (SAPA_CUDA=OFF)" in off
    absent = _build_info(tmp_path, {}, nvcc=False)
    assert "CUDA module: no (nvcc not found" in absent.stdout
    required = _build_info(tmp_path, {"SAPA_CUDA": "ON"}, nvcc=False)
    assert required.returncode != 0 and "SAPA_CUDA=ON" in required.stderr


# ----------------------------------------------------------------------------- packaging

def test_license_matches_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_optax_is_an_examples_dependency_only():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in reqs}
    assert "optax" not in names(meta["dependencies"])
    assert "optax" in names(meta["optional-dependencies"]["examples"])
    library = "\n".join(p.read_text() for p in (ROOT / "sapa_jax").glob("*.py"))
    assert "import optax" not in library


def test_typed_marker_is_packaged():
    assert (ROOT / "sapa_jax" / "py.typed").is_file()
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]
    assert "sapa_jax" in build["wheel"]["packages"]

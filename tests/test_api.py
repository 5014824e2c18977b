"""The public API as a user meets it: the README's Python snippets run as written, options are
validated once per call, the three option lists agree, and the public functions are annotated."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as flax_nnx

import sapa_jax
from sapa_jax import _checks, convert, core, linen, modules, nnx
from torch_reference import SAPATorch
from torch_reference_carafe import CARAFEPackTorch
from torch_reference_deform import SAPADeformTorch

ROOT = Path(__file__).resolve().parents[1]
# `name = ...  # (2, 64, 64, 64)`: the README promises this shape for `name`.
SHAPE_COMMENT = re.compile(r"^(\w+) = .*#\s*\((\d+(?:, \d+)*)\)")


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_snippets_run_as_written():
    blocks = readme_python_blocks()
    assert len(blocks) >= 4
    # The README's conversion snippets start from "your" torch modules: the test's stand-ins are
    # the independent PyTorch implementations of the official SAPA, mmcv CARAFEPack and SAPADeform.
    namespace = {"torch_module": SAPATorch(32, 64, variant="B", embedding_dim=32),
                 "carafe_pack": CARAFEPackTorch(64, 2),
                 "deform_module": SAPADeformTorch(32, 64)}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
        promised = {}
        for line in block.splitlines():
            match = SHAPE_COMMENT.match(line.strip())
            if match:
                promised[match.group(1)] = tuple(int(n) for n in match.group(2).split(", "))
        for name, shape in promised.items():
            assert tuple(namespace[name].shape) == shape, (name, block)


def test_readme_functional_snippet_defines_its_inputs():
    functional = [b for b in readme_python_blocks() if "sapa_upsample(q, k, v" in b]
    assert functional
    namespace: dict = {}
    exec(compile(functional[0], "README.md", "exec"), namespace)  # runs alone, no q, k, v given
    assert namespace["out"].shape == (2, 64, 64, 64)


# ----------------------------------------------------------------------------- validate once

def _count(monkeypatch, owner, name, counts):
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)


@pytest.fixture
def counts(monkeypatch):
    monkeypatch.delenv("SAPA_JAX_IMPL", raising=False)
    seen: dict[str, int] = {}
    for owner, name in ((modules, "check_inputs"), (modules, "check_params"),
                        (_checks, "check_core_args"), (_checks, "check_choice"),
                        (_checks, "check_eps")):
        _count(monkeypatch, owner, name, seen)
    return seen


def _inputs():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((1, 8, 8, 6)).astype(np.float32)
    x = rng.standard_normal((1, 4, 4, 6)).astype(np.float32)
    return y, x


def test_linen_apply_validates_once(counts):
    y, x = _inputs()
    module = linen.SAPA(variant="P", embedding_dim=8, kernel_size=3)
    variables = module.init(jax.random.key(0), y, x)
    counts.clear()
    module.apply(variables, y, x)
    # The module's options once (SAPAConfig: variant, normalizer, border, impl, eps), the
    # inputs once, the parameter tree once, and the core does not re-check the options.
    assert counts == {"check_inputs": 1, "check_params": 1, "check_choice": 4, "check_eps": 1}


def test_nnx_call_validates_once(counts):
    y, x = _inputs()
    module = nnx.SAPA(6, 6, variant="P", embedding_dim=8, kernel_size=3, rngs=flax_nnx.Rngs(0))
    counts.clear()
    module(y, x)
    assert counts == {"check_inputs": 1, "check_params": 1}  # options checked at construction


def test_functional_apply_validates_once(counts):
    y, x = _inputs()
    config = modules.SAPAConfig(variant="P", embedding_dim=8, kernel_size=3)
    params = modules.init_params(jax.random.key(0), config, 6, 6)
    counts.clear()
    modules.sapa_apply(params, y, x, config)
    assert counts == {"check_inputs": 1, "check_params": 1}


def test_core_validates_once(counts):
    q = np.ones((1, 4, 4, 2), np.float32)
    k, v = np.ones((1, 2, 2, 2), np.float32), np.ones((1, 2, 2, 3), np.float32)
    sapa_jax.sapa_upsample(q, k, v, kernel_size=3)
    assert counts == {"check_core_args": 1, "check_choice": 3, "check_eps": 1}


def test_validated_paths_still_reject_bad_input():
    y, x = _inputs()
    module = linen.SAPA(variant="P", embedding_dim=8, kernel_size=3)
    variables = module.init(jax.random.key(0), y, x)
    with pytest.raises(ValueError, match="spatial shape"):
        module.apply(variables, y[:, :6], x)
    bad = jax.tree_util.tree_map(lambda a: a, variables)
    bad["params"]["k"]["kernel"] = jnp.zeros((6, 7))
    with pytest.raises(ValueError, match="wrong shapes"):
        module.apply(bad, y, x)


# ----------------------------------------------------------------------------- one set of options

def test_module_options_agree():
    """SAPAConfig, linen.SAPA and nnx.SAPA offer the same options, defaults and types."""
    config_fields = {f.name: f for f in dataclasses.fields(modules.SAPAConfig)}
    linen_fields = {f.name: f for f in dataclasses.fields(linen.SAPA)
                    if f.name not in ("parent", "name")}
    nnx_params = {name: p for name, p in inspect.signature(nnx.SAPA.__init__).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "rngs"}
    initialisers = {"kernel_init": modules.default_kernel_init,
                    "bias_init": modules.default_bias_init}
    assert list(linen_fields) == list(config_fields) + list(initialisers)
    assert list(nnx_params) == list(linen_fields)
    for name, field in config_fields.items():
        assert linen_fields[name].default == field.default, name
        assert nnx_params[name].default == field.default, name
        assert str(linen_fields[name].type) == str(field.type), name
        assert str(nnx_params[name].annotation) == str(field.type), name
    for name, default in initialisers.items():
        assert linen_fields[name].default is default and nnx_params[name].default is default
    # Every option is documented in the Linen docstring (NNX refers to it).
    for name in linen_fields:
        assert re.search(rf"^\s+{name}:", linen.SAPA.__doc__, flags=re.M), name


# ----------------------------------------------------------------------------- code hygiene

def test_no_private_helpers_used_across_modules():
    """Checks used by several modules live in _checks under public names."""
    package = ROOT / "sapa_jax"
    siblings = {p.stem for p in package.glob("*.py")}
    offences = []
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in siblings and node.value.id != path.stem
                    and node.attr.startswith("_")):
                offences.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                offences += [f"{path.name}:{node.lineno} from .{node.module} import {a.name}"
                             for a in node.names if a.name.startswith("_") and node.module]
    assert not offences, offences


PUBLIC = ["sapa_jax.sapa_upsample", "sapa_jax.similarity", "sapa_jax.normalize",
          "sapa_jax.assemble", "sapa_jax.ffi_available", "sapa_jax.ffi_status",
          "modules.sapa_apply", "modules.project", "modules.param_specs", "modules.init_params",
          "modules.check_params", "convert.from_torch", "convert.to_torch",
          "convert.module_options", "convert.load_into_nnx", "convert.expected_keys",
          "linen.SAPA.__call__", "nnx.SAPA.__init__", "nnx.SAPA.__call__", "nnx.SAPA.from_torch"]
OWNERS = {"sapa_jax": sapa_jax, "modules": modules, "convert": convert, "linen": linen,
          "nnx": nnx}


@pytest.mark.parametrize("qualname", PUBLIC)
def test_public_api_is_annotated(qualname):
    owner, *path = qualname.split(".")
    function = OWNERS[owner]
    for part in path:
        function = getattr(function, part)
    hints = typing.get_type_hints(function)
    parameters = [name for name, p in inspect.signature(function).parameters.items()
                  if name not in ("self", "cls") and p.kind not in (p.VAR_KEYWORD,)]
    missing = [name for name in parameters if name not in hints]
    assert not missing, missing
    assert "return" in hints
    assert (ROOT / "sapa_jax" / "py.typed").is_file()

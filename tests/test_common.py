"""examples/common: statistics, cost columns, upsampler registry, safe output folders."""
from __future__ import annotations

import csv
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.common import cost, outputs, report, stats, upsamplers

# ----------------------------------------------------------------------------- statistics


def test_mean_std_is_sample_std_and_undefined_for_one_value():
    mean, std = stats.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))  # ddof = 1
    assert stats.mean_std([0.7]) == (0.7, None)
    with pytest.raises(ValueError, match="at least one"):
        stats.mean_std([])


def test_t_interval_on_known_data():
    # d = 1..5: mean 3, s = sqrt(2.5), t_{0.975, 4} = 2.7764451, half = t * s / sqrt(5).
    mean, (low, high) = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == 3.0
    assert low == pytest.approx(3.0 - half, abs=1e-9) and high == pytest.approx(3.0 + half, abs=1e-9)
    # Two values: t_{0.975, 1} = 12.7062047; d = (0, 2): mean 1, s = sqrt 2, half = t * 1.
    _, (low, high) = stats.t_interval([0.0, 2.0])
    assert low == pytest.approx(1 - 12.706204736174698) and high == pytest.approx(1 + 12.706204736174698)
    assert stats.t_interval([4.0]) == (4.0, None)


def test_paired_difference_pairs_by_seed():
    base = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.55}
    # A constant +0.02 per seed: zero spread of the differences, so a zero-width interval,
    # although the unpaired spread of either side is large.
    better = {s: v + 0.02 for s, v in base.items()}
    diff = stats.paired_difference(better, base)
    assert diff["n"] == 4 and diff["mean"] == pytest.approx(0.02)
    assert diff["ci95"] == pytest.approx([0.02, 0.02])
    assert stats.verdict(diff) == "better"
    # Only the common seeds count; one common seed -> no interval.
    one = stats.paired_difference({0: 0.4, 9: 0.9}, base)
    assert one == {"mean": pytest.approx(-0.1), "ci95": None, "n": 1}
    assert stats.verdict(one) == "n/a"
    assert stats.paired_difference({7: 0.1}, base) is None
    tie = stats.paired_difference({0: 0.51, 1: 0.59, 2: 0.71, 3: 0.54}, base)
    assert stats.verdict(tie) == "tie"


def test_formatting_says_na_for_one_seed():
    assert stats.format_mean_std(0.7961, 0.0063) == "79.61 ± 0.63"
    assert stats.format_mean_std(0.7961, None) == "79.61 ± n/a"
    assert stats.format_difference({"mean": 0.0123, "ci95": [0.001, 0.0236]}) == \
        "+1.23 [+0.10, +2.36]"
    assert stats.format_difference({"mean": -0.01, "ci95": None}) == "-1.00 [n/a]"


def _runs():
    runs = []
    for seed, (b, s) in enumerate([(0.60, 0.62), (0.64, 0.65), (0.58, 0.61)]):
        runs.append({"label": "bilinear", "seed": seed, "final": {"miou": b}, "step_ms": 10.0})
        runs.append({"label": "sapa-b", "seed": seed, "final": {"miou": s}, "step_ms": 14.0})
    runs.append({"label": "nearest", "seed": 0, "final": {"miou": 0.5}, "step_ms": 9.0})
    return runs


def test_summary_rows_and_files(tmp_path):
    costs = {"bilinear": {"params": 100, "flops": 1e6}, "sapa-b": {"params": 150, "flops": 3e6},
             "nearest": {"params": 100, "flops": 9e5}}
    rows = report.summarise(_runs(), ["nearest", "bilinear", "sapa-b"], ["miou"], costs)
    by = {r["upsampler"]: r for r in rows}
    assert "miou_diff_vs_bilinear" not in by["bilinear"]
    assert by["bilinear"]["params_added"] == 0 and by["sapa-b"]["params_added"] == 50
    assert by["sapa-b"]["flops_added"] == 2e6 and by["sapa-b"]["step_ms"] == 14.0
    diff = by["sapa-b"]["miou_diff_vs_bilinear"]
    expected_mean, expected_ci = stats.t_interval([0.02, 0.01, 0.03])
    assert diff["mean"] == pytest.approx(expected_mean) and diff["ci95"] == pytest.approx(expected_ci)
    assert by["nearest"]["miou_std"] is None and by["nearest"]["miou_diff_vs_bilinear"]["ci95"] is None
    paths = report.write_results(tmp_path, {"config": {"decoder": "fpn"}}, rows)
    doc = json.loads(paths["json"].read_text())
    assert doc["config"]["decoder"] == "fpn" and len(doc["summary"]) == 3
    with paths["csv"].open() as f:
        table = {r["upsampler"]: r for r in csv.DictReader(f)}
    assert table["nearest"]["miou_std"] == "n/a"
    assert float(table["sapa-b"]["miou_diff_vs_bilinear_ci95_low"]) == pytest.approx(expected_ci[0])
    text = report.format_table(rows, {"miou": "mIoU"})
    assert "n/a" in text and "+50" in text
    md = report.markdown_table(rows, {"miou": "mIoU"}).splitlines()
    assert len(md) == 2 + 3 and md[0].startswith("| upsampler | seeds | mIoU (%)")
    # sapa-b: +2, +1, +3 points: with 3 seeds the t interval [-0.48, +4.48] still holds 0.
    assert "+2.00 [-0.48, +4.48] tie" in md[-1] and "+50" in md[-1]


# ----------------------------------------------------------------------------- cost columns


def test_param_count_of_a_known_module():
    params = nn.Dense(7).init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    assert cost.param_count(params) == 5 * 7 + 7
    conv = nn.Conv(4, (3, 3)).init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))["params"]
    assert cost.param_count(conv) == 3 * 3 * 2 * 4 + 4


def test_forward_flops_positive_and_ordered():
    x = jnp.ones((1, 8, 8, 16))
    small = cost.forward_flops(lambda a: a @ jnp.ones((16, 16)), x)
    large = cost.forward_flops(lambda a: a @ jnp.ones((16, 64)), x)
    assert small > 0 and large > 3 * small
    # A guided SAPA stage costs more than bilinear (the FFI kernel's FLOPs are counted too).
    y = jnp.ones((1, 16, 16, 8))
    flops = {}
    for name in ("bilinear", "sapa-b"):
        up = upsamplers.make_upsampler(name)
        variables = up.init(jax.random.key(0), x, y)
        flops[name] = cost.forward_flops(lambda v, a, b: up.apply(v, a, b), variables, x, y)
    assert 0 < flops["bilinear"] < flops["sapa-b"]


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_unavailable_upsamplers():
    assert upsamplers.parse_upsampler(" SAPA-B ") == "sapa-b"
    with pytest.raises(ValueError, match="upsampler must be one of"):
        upsamplers.parse_upsampler("pixelshuffle")
    for name, module in (("carafe", "CARAFE"), ("sapa-d", "SAPADeform")):
        if upsamplers.unavailable_reason(name):
            with pytest.raises(ValueError, match=f"not available in this build.*{module}"):
                upsamplers.parse_upsampler(name)
            assert name not in upsamplers.available()
        else:
            assert upsamplers.parse_upsampler(name) == name
    assert set(upsamplers.available()) >= {"nearest", "bilinear", "deconv", "sapa-i"}


@pytest.mark.parametrize("name", ["nearest", "bilinear", "deconv", "sapa-i", "sapa-g"])
def test_every_upsampler_doubles_the_resolution(name):
    x = jax.random.normal(jax.random.key(1), (2, 4, 6, 8))
    y = jax.random.normal(jax.random.key(2), (2, 8, 12, 8))
    up = upsamplers.make_upsampler(name, kernel_size=3)
    variables = up.init(jax.random.key(0), x, y)
    assert up.apply(variables, x, y).shape == (2, 8, 12, 8)
    has_params = bool(jax.tree_util.tree_leaves(variables.get("params", {})))
    assert has_params == (name not in ("nearest", "bilinear"))


def test_deconv_starts_as_bilinear_away_from_the_border():
    x = jax.random.normal(jax.random.key(3), (1, 6, 6, 4))
    up = upsamplers.make_upsampler("deconv")
    variables = up.init(jax.random.key(0), x)
    got = up.apply(variables, x)
    expected = upsamplers.bilinear2x(x)
    # Bilinear clamps at the border, the transposed conv sees zeros there: compare the inside.
    np.testing.assert_allclose(got[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-5)
    assert cost.param_count(variables["params"]) == 4 * 4 * 4 * 4 + 4


def test_guided_upsampler_without_guide_fails_clearly():
    up = upsamplers.make_upsampler("sapa-b")
    with pytest.raises(ValueError, match="needs the guidance feature"):
        up.init(jax.random.key(0), jnp.ones((1, 4, 4, 8)))


# ----------------------------------------------------------------------------- output folders


def test_prepare_output_refuses_reuse_without_a_flag(tmp_path):
    out = tmp_path / "run"
    assert outputs.prepare_output(out) == out.resolve()
    assert outputs.prepare_output(out) == out.resolve()  # only the marker in it: still empty
    (out / "results.json").write_text("{}")
    with pytest.raises(outputs.OutputExistsError, match="--resume.*--overwrite"):
        outputs.prepare_output(out)
    outputs.prepare_output(out, resume=True)
    assert (out / "results.json").exists()  # resume keeps the earlier run
    outputs.prepare_output(out, overwrite=True)
    assert [p.name for p in out.iterdir()] == [outputs.MARKER]
    with pytest.raises(ValueError, match="exclude each other"):
        outputs.prepare_output(out, overwrite=True, resume=True)


def test_overwrite_never_deletes_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(outputs.OutputExistsError, match="refusing to delete"):
        outputs.prepare_output(tmp_path, overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_schedule_works_for_a_one_step_run():
    from examples.common import training
    tx = training.warmup_cosine_adamw(1e-3, 1, 0.0)
    assert tx.init({"w": jnp.zeros(3)}) is not None

"""The matting example: data, network fairness, loss, and the CLI end to end at a tiny size
(16 x 16 images, batch 4, 2 steps): results, figures, refusal to reuse an output folder,
Ctrl-C and resume. Compilation dominates on a CPU, so the CLI runs are few and overlap."""
from __future__ import annotations

import csv
import functools
import json
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import example_runs
from examples.matting import data, model, train

_launch = functools.partial(example_runs.launch, "matting")
_finish = example_runs.finish
TINY = ["--image-size", "16", "--batch-size", "4", "--val-size", "4", "--log-every", "1"]


# ----------------------------------------------------------------------------- data

def test_data_is_deterministic_and_streams_differ():
    a = data.train_batch(3, 7, 4, 32)
    b = data.train_batch(3, 7, 4, 32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], data.train_batch(3, 8, 4, 32)[2])  # next step
    assert not np.array_equal(a[2], data.train_batch(4, 7, 4, 32)[2])  # other seed
    assert not np.array_equal(a[2], data.validation_set(3, 4, 32)[2])  # validation stream
    image, trimap, alpha = a
    assert image.shape == (4, 32, 32, 3) and image.dtype == np.float32
    assert trimap.shape == (4, 32, 32) and trimap.dtype == np.int32
    assert alpha.shape == (4, 32, 32) and alpha.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 1 and 0 <= alpha.min() and alpha.max() <= 1


def test_mattes_have_partial_pixels_and_a_consistent_trimap():
    image, trimap, alpha = data.validation_set(0, 16, 32)
    partial = (alpha > 0) & (alpha < 1)
    assert 0.1 < partial.mean() < 0.5  # soft edges, strands, translucent patches
    # Supersampled coverage: hard edges give multiples of 1/16, strands' opacity others.
    assert len(np.unique(alpha[partial])) > 100
    assert (trimap[partial] == data.TRIMAP_UNKNOWN).all()
    assert (alpha[trimap == data.TRIMAP_FG] == 1).all()
    assert (alpha[trimap == data.TRIMAP_BG] == 0).all()
    assert (trimap == data.TRIMAP_FG).any() and (trimap == data.TRIMAP_BG).any()
    # Textured background: the image varies inside the known background.
    assert image[trimap == data.TRIMAP_BG].std(axis=0).min() > 0.05


def test_trimap_band_is_a_chebyshev_dilation_of_the_partial_pixels():
    alpha = np.zeros((2, 7, 7), np.float32)
    alpha[:, 3, 3] = 0.5
    alpha[:, 0, 0] = 1.0
    trimap = data.make_trimap(alpha, np.array([1, 2]))
    for img, radius in ((0, 1), (1, 2)):
        expected = np.zeros((7, 7), bool)
        expected[3 - radius:4 + radius, 3 - radius:4 + radius] = True
        np.testing.assert_array_equal(trimap[img] == data.TRIMAP_UNKNOWN, expected)
        assert trimap[img, 0, 0] == data.TRIMAP_FG and trimap[img, 6, 6] == data.TRIMAP_BG


# ----------------------------------------------------------------------------- network

def _shapes(upsampler, size=16):
    net = model.Matter(upsampler)
    inputs = jnp.zeros((1, size, size, model.INPUT_CHANNELS))
    params = jax.eval_shape(net.init, jax.random.key(0), inputs)["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): leaf.shape for path, leaf in flat}


def test_only_the_upsampling_stages_differ_between_upsamplers():
    reference = None
    for upsampler in ("nearest", "bilinear", "deconv", "sapa-i", "sapa-b", "sapa-g"):
        shapes = _shapes(upsampler)
        rest = {k: v for k, v in shapes.items() if not k.startswith("['up")}
        reference = reference or rest
        assert rest == reference, upsampler
        stages = {k.split("]")[0] for k in shapes if k.startswith("['up")}
        if upsampler in ("nearest", "bilinear"):
            assert not stages
        else:  # every decoder stage, the last (full resolution) included
            assert stages == {"['up0'", "['up1'", "['up2'"}, (upsampler, stages)


def test_network_input_output_and_trimap_clamp():
    image, trimap, _ = data.validation_set(0, 2, 16)
    inputs = model.network_input(jnp.asarray(image), jnp.asarray(trimap))
    assert inputs.shape == (2, 16, 16, 6)
    np.testing.assert_array_equal(inputs[..., :3], image)
    np.testing.assert_array_equal(inputs[..., 3:].sum(-1), 1)  # one-hot trimap
    np.testing.assert_array_equal(np.argmax(inputs[..., 3:], -1), trimap)
    net = model.Matter("sapa-b")
    variables = jax.eval_shape(net.init, jax.random.key(0), inputs)
    out = jax.eval_shape(net.apply, variables, inputs)
    assert out.shape == (2, 16, 16) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="multiples of 8.*\\(12, 12\\)"):
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 12, 12, 6)))
    alpha = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    clamped = np.asarray(model.clamp_to_trimap(alpha, trimap))
    assert (clamped[trimap == data.TRIMAP_FG] == 1).all()
    assert (clamped[trimap == data.TRIMAP_BG] == 0).all()
    unknown = trimap == data.TRIMAP_UNKNOWN
    np.testing.assert_array_equal(clamped[unknown], alpha[unknown])


def test_unknown_l1_counts_only_unknown_pixels():
    pred = jnp.array([[0.5, 1.0, 0.0]])
    alpha = jnp.array([[0.0, 0.0, 1.0]])
    trimap = jnp.array([[data.TRIMAP_UNKNOWN, data.TRIMAP_FG, data.TRIMAP_UNKNOWN]])
    assert float(train.unknown_l1(pred, alpha, trimap)) == pytest.approx(0.75)  # (0.5 + 1) / 2
    known = jnp.full((1, 3), data.TRIMAP_BG)
    assert float(train.unknown_l1(pred, alpha, known)) == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "20"], "multiple of 8"),
    (["--upsamplers", "bilinear,lanczos"], "upsampler must be one of"),
    (["--seeds", "0,0"], "must not repeat"),
    (["--kernel-size", "4"], "odd"),
    (["--overwrite", "--resume"], "exclude each other"),
])
def test_bad_command_lines_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """tiny:  bilinear + sapa-b, seeds 0 and 1, 2 steps, figures.
    stop:  nearest, SIGINT once its step-2 checkpoint exists; then --resume for 1 more step,
           and a plain rerun into the same folder (refused)."""
    root = tmp_path_factory.mktemp("matting")
    tiny = _launch(TINY + ["--upsamplers", "bilinear,sapa-b", "--seeds", "0,1", "--steps", "2",
                           "--eval-every", "1", "--out", str(root / "tiny")], root / "tiny")
    stop_args = TINY + ["--upsamplers", "nearest", "--seeds", "0", "--eval-every", "2",
                        "--no-figures", "--out", str(root / "stop")]
    stop = _launch(stop_args + ["--steps", "100000"], root / "stop")
    first = root / "stop" / "checkpoints" / "nearest_seed0" / "2"
    deadline = time.monotonic() + 200
    while not first.is_dir() and stop.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if stop.poll() is None:
        stop.send_signal(signal.SIGINT)
    result = {"root": root, "stop": _finish(stop, root / "stop", timeout=120)}
    doc = root / "stop" / "results.json"
    result["stop_doc"] = json.loads(doc.read_text()) if doc.exists() else None
    result["refused"] = _finish(_launch(stop_args + ["--steps", "1"], root / "refused"),
                                root / "refused", timeout=120)
    if result["stop_doc"]:
        stopped = result["stop_doc"]["runs"][0]["step"]
        resume = _launch(stop_args + ["--steps", str(stopped + 1), "--resume"], root / "resume")
        result["resume"] = _finish(resume, root / "resume")
    result["tiny"] = _finish(tiny, root / "tiny")
    return result


def _ok(run):
    assert run["rc"] == 0, run["stderr"][-3000:]
    assert "Traceback" not in run["stderr"]


def test_tiny_run_writes_results(runs):
    _ok(runs["tiny"])
    out = runs["root"] / "tiny"
    assert "vs bilinear [95% CI]" in runs["tiny"]["stdout"]  # the printed table
    doc = json.loads((out / "results.json").read_text())
    assert doc["interrupted"] is False and doc["config"]["image_size"] == 16
    rows = {r["upsampler"]: r for r in doc["summary"]}
    assert list(rows) == ["bilinear", "sapa-b"]
    for row in rows.values():
        assert row["seeds"] == 2
        for m in ("sad", "mse", "grad", "conn"):
            assert row[f"{m}_mean"] > 0 and row[f"{m}_std"] >= 0
        assert row["mse_mean"] < 1 and row["step_ms"] > 0 and row["flops"] > 0
    assert rows["bilinear"]["params_added"] == 0 and rows["bilinear"]["flops_added"] == 0
    assert rows["sapa-b"]["params_added"] > 0 and rows["sapa-b"]["flops_added"] > 0
    for m in ("sad", "mse", "grad", "conn"):
        diff = rows["sapa-b"][f"{m}_diff_vs_bilinear"]
        low, high = diff["ci95"]
        assert low <= diff["mean"] <= high
        # The paired mean is the difference of the two rows' means.
        assert diff["mean"] == pytest.approx(rows["sapa-b"][f"{m}_mean"]
                                             - rows["bilinear"][f"{m}_mean"], abs=1e-9)
    for run in doc["runs"]:
        assert run["step"] == 2 and [h["step"] for h in run["history"]] == [1, 2]
        assert run["final"]["sad"] == pytest.approx(run["history"][-1]["sad"])
    with (out / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["upsampler"] for r in csv_rows] == ["bilinear", "sapa-b"]
    for col in ("sad_mean", "sad_std", "mse_mean", "grad_mean", "conn_mean",
                "sad_diff_vs_bilinear", "conn_diff_vs_bilinear_ci95_low"):
        assert col in csv_rows[0], col
    with (out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4


def test_tiny_run_writes_figures(runs):
    _ok(runs["tiny"])
    figures = runs["root"] / "tiny" / "figures"
    assert {p.name for p in figures.glob("*.png")} == {"alpha_seed0.png", "alpha_seed1.png"}
    image = np.asarray(Image.open(figures / "alpha_seed0.png").convert("RGB"), np.float32)
    assert image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 10


def test_ctrl_c_checkpoints_and_resume_continues(runs):
    stop = runs["stop"]
    assert stop["rc"] == train.training.EXIT_INTERRUPTED, stop["stderr"][-3000:]
    assert "Traceback" not in stop["stderr"] and "--resume" in stop["stderr"]
    doc = runs["stop_doc"]
    assert doc["interrupted"] is True
    stopped = doc["runs"][0]["step"]
    assert 2 <= stopped < 100000
    _ok(runs["resume"])
    run = json.loads((runs["root"] / "stop" / "results.json").read_text())["runs"][0]
    assert run["start_step"] == stopped and run["step"] == stopped + 1


def test_rerun_into_a_used_folder_is_refused(runs):
    refused = runs["refused"]
    assert refused["rc"] == 2, refused["stderr"][-3000:]
    assert "--overwrite" in refused["stderr"] and "--resume" in refused["stderr"]
    assert "Traceback" not in refused["stderr"]

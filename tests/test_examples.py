"""The segmentation example: its pieces (decoders, the fairness of the protocol, ablation
settings, the bilinear kernel map), then the CLI end to end at a tiny size (16x16 images,
batch 4, a few steps) through every path: both decoders, training, validation, the summary
with paired CIs and cost columns, checkpoints, figures, Ctrl-C, resume, a refused rerun and 4
devices. Compilation dominates the time of those runs on a CPU, so they are as
few as possible and overlap (see the `runs` fixture).
"""
from __future__ import annotations

import csv
import functools
import json
import signal
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import example_runs
import sapa_jax
from examples.common import training
from examples.common import upsamplers as ups
from examples.segmentation import data, figures, metrics, model, train

_launch = functools.partial(example_runs.launch, "segmentation")
_finish = example_runs.finish
TINY = ["--image-size", "16", "--batch-size", "4", "--val-size", "4", "--seeds", "0",
        "--log-every", "1"]
UPSAMPLERS = ("bilinear", "deconv", "sapa-i", "sapa-b")


# ----------------------------------------------------------------------------- pieces

def test_data_is_deterministic_and_splits_differ():
    a = data.train_batch(3, 7, 4, 32)
    b = data.train_batch(3, 7, 4, 32)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], data.train_batch(3, 8, 4, 32)[1])  # next step
    assert not np.array_equal(a[1], data.train_batch(4, 7, 4, 32)[1])  # other seed
    val = data.validation_set(3, 4, 32)
    assert not np.array_equal(a[1], val[1])
    assert a[0].shape == (4, 32, 32, 3) and a[0].dtype == np.float32
    assert a[1].shape == (4, 32, 32) and a[1].dtype == np.int32
    assert 0.0 <= a[0].min() and a[0].max() <= 1.0


def test_scenes_have_every_class_and_thin_structures():
    images, labels = data.validation_set(0, 16, 64)
    counts = np.bincount(labels.ravel(), minlength=data.NUM_CLASSES)
    assert (counts > 0).all(), counts
    assert counts[0] / counts.sum() > 0.5  # mostly background
    band = metrics.boundary_band(labels, 1)
    # Lines are at most 2.5 px thick: (almost) every line pixel touches another label.
    assert band[labels == data.LINE].mean() > 0.9
    assert band[labels == data.DISC].mean() < 0.8  # discs have an interior
    # Textured backgrounds: the image varies inside the background, not only at edges.
    assert images[labels == 0].std(axis=0).min() > 0.05


def test_bilinear2x_matches_jax_image_resize():
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3))
    expected = jax.image.resize(x, (2, 10, 14, 3), "bilinear")
    np.testing.assert_allclose(ups.bilinear2x(x), expected, atol=1e-6)


def test_bilinear_kernel_map_reassembles_bilinear():
    """The figure's bilinear weights are bilinear2x written as SAPA's K x K window."""
    x = jax.random.normal(jax.random.key(1), (1, 6, 6, 3))
    for kernel_size in (3, 5):
        w = figures.bilinear_weights(12, kernel_size)[None]
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
        out = sapa_jax.assemble(jnp.asarray(w, jnp.float32), x, kernel_size=kernel_size, scale=2)
        np.testing.assert_allclose(out, ups.bilinear2x(x), atol=1e-5)


def test_fig2_draws_the_kernel_maps_of_carafe_beside_bilinear(tmp_path):
    """Fig. 2 with CARAFE: its kernels, rebuilt from the module's logits, are normalised,
    content-dependent and reproduce the module's output; the check reaches the run records.
    (SAPA's columns and checks are covered by the tiny CLI run below.)"""
    images, labels = data.validation_set(0, 2, 16)
    trained = {}
    for name in ("bilinear", "carafe"):
        net = model.Segmenter("fpn", name, data.NUM_CLASSES)
        params = net.init(training.init_key(0), jnp.asarray(images))["params"]
        if name == "carafe":
            # mmcv's init (std 1e-3) gives near-uniform kernels; a trained-like spread instead.
            enc = params["up0"]["carafe"]["content_encoder"]
            params["up0"]["carafe"]["content_encoder"] = {**enc, "kernel": 300 * enc["kernel"]}
        trained[name] = (net, params, np.zeros_like(labels))
    got = figures.stage_maps(trained["carafe"][0], trained["carafe"][1], images[0])
    w = np.asarray(got["w"])
    assert w.shape == (16, 16, 25)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert w[..., 12].std() > 1e-2  # one tap's weight varies over the map
    assert float(got["check"]) < 1e-5
    runs = [{"label": n, "seed": 0} for n in trained]
    paths = figures.all_figures(trained, (images, labels), tmp_path, 0, 2, runs)
    assert tmp_path / "feature_kernel_maps_seed0.png" in paths
    _png_is_nontrivial(tmp_path / "feature_kernel_maps_seed0.png")
    by = {r["label"]: r for r in runs}
    assert "kernel_check_max_abs_err" not in by["bilinear"]
    assert by["carafe"]["kernel_check_max_abs_err"] < 1e-4


def test_parse_decoder():
    assert model.parse_decoder(" FPN ") == "fpn"
    with pytest.raises(ValueError, match="segformer"):
        model.parse_decoder("unet")


def _param_shapes(decoder, upsampler, size=16):
    net = model.Segmenter(decoder, upsampler, data.NUM_CLASSES)
    params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    flat = flax.traverse_util.flatten_dict(params)
    return {path: leaf.shape for path, leaf in flat.items()}


@pytest.mark.parametrize("decoder", ["fpn", "segformer"])
def test_only_the_upsampling_stages_differ(decoder):
    """The paper's protocol: every upsampler's network has the same non-upsampler parameters
    (names and shapes); the upsampler modules are all that changes."""
    reference = None
    for upsampler in ups.available():
        shapes = _param_shapes(decoder, upsampler)
        rest = {p: s for p, s in shapes.items() if not model.is_upsampler_param(p)}
        if reference is None:
            reference = rest
        assert rest == reference, upsampler
        own = {p[0] for p in shapes if model.is_upsampler_param(p)}
        stages = 3 if decoder == "fpn" else 6  # segformer: 3 + 2 + 1 upsamplers
        assert len(own) == (0 if upsampler in ("nearest", "bilinear") else stages), upsampler
    # Laterals at every stage, the full-resolution one included (fpn); 4 projections (segformer).
    names = {p[0] for p in reference}
    if decoder == "fpn":
        assert {"lateral0", "lateral1", "lateral2", "dec0"} <= names
    else:
        assert {"proj1", "proj2", "proj3", "proj4", "fuse"} <= names


def test_upsampler_only_keeps_its_caveat():
    """The first version's network: no lateral at full resolution, except SAPA-I's guide."""
    assert "lateral0" not in {p[0] for p in _param_shapes("upsampler-only", "bilinear")}
    assert "lateral0" in {p[0] for p in _param_shapes("upsampler-only", "sapa-i")}


@pytest.mark.parametrize("decoder", ["segformer", "upsampler-only"])
def test_decoders_forward(decoder):
    net = model.Segmenter(decoder, "sapa-b", data.NUM_CLASSES)
    images = jnp.asarray(data.validation_set(0, 2, 16)[0])
    variables = net.init(training.init_key(0), images)  # rbg: no threefry compiles
    logits = net.apply(variables, images)
    assert logits.shape == (2, 16, 16, data.NUM_CLASSES) and bool(jnp.isfinite(logits).all())
    with pytest.raises(ValueError, match="multiples of"):
        net.init(training.init_key(0), jnp.zeros((1, 24, 24, 3)) if decoder == "segformer"
                 else jnp.zeros((1, 12, 12, 3)))


def test_ablation_settings():
    cfg = train.Config(ablation=True)
    exps, skipped = train.experiments(cfg)
    labels = [e.label for e in exps]
    assert labels[0] == "bilinear" and len(labels) == len(set(labels))
    assert {"sapa-i", "sapa-b", "sapa-p", "sapa-g", "sapa-b K=3", "sapa-b K=7", "sapa-b d=16",
            "sapa-b d=128", "sapa-b norm=relu", "sapa-b norm=softplus"} <= set(labels)
    base = next(e for e in exps if e.label == "sapa-b")
    assert set(base.groups) == {"similarity", "normaliser", "kernel size", "embedding dim"}
    none = "sapa-b norm=none"
    assert (none in labels) != any(s["label"] == none for s in skipped)


def test_batch_size_must_divide_over_devices():
    training.check_batch_size(8, 4)
    with pytest.raises(ValueError, match="divisible by the number of devices \\(4\\).*got 6"):
        training.check_batch_size(6, 4)


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "20"], "multiple of 8"),
    (["--decoder", "segformer", "--image-size", "24"], "multiple of 16"),
    (["--upsamplers", "nearest,pixelshuffle"], "upsampler must be one of"),
    (["--seeds", "0,0"], "must not repeat"),
    (["--kernel-size", "4"], "odd"),
    (["--steps", "0"], ">= 1"),
    (["--normalizer", "tanh"], "--normalizer must be one of"),
    (["--resume", "--overwrite"], "exclude each other"),
])
def test_bad_command_lines_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_args_defaults_and_val_rounding():
    cfg = train.parse_args(["--batch-size", "8", "--val-size", "20"])
    assert cfg.upsamplers == tuple(u for u in ups.available() if u != "sapa-d")
    assert cfg.decoder == "fpn"
    assert cfg.val_size == 24  # rounded up to whole batches
    assert cfg.out.is_absolute()


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """CLI runs in subprocesses, overlapped (compilation is single-threaded, so two processes
    use both cores):

    tiny:      1 device, fpn, bilinear + deconv + SAPA-I/B, seeds 0 and 1, 2 steps, figures.
    segformer: 1 device, the segformer decoder, nearest + SAPA-G, 1 step, no figures.
    four:      4 devices, sapa-b, stopped with SIGINT once its step-2 checkpoint is on disk.
    resume:    1 device, --resume of `four` for two more steps.
    again:     tiny's command once more: refused, the earlier run left as it was.
    """
    root = tmp_path_factory.mktemp("segmentation")
    tiny_args = TINY + ["--upsamplers", ",".join(UPSAMPLERS), "--seeds", "0,1", "--steps", "2",
                        "--eval-every", "1", "--out", str(root / "tiny")]
    tiny = _launch(tiny_args, root / "tiny")
    four_args = TINY + ["--upsamplers", "sapa-b", "--steps", "100000", "--eval-every", "2",
                        "--no-figures", "--out", str(root / "four")]
    four = _launch(four_args, root / "four", devices=4)
    first_checkpoint = root / "four" / "checkpoints" / "sapa-b_seed0" / "2"
    deadline = time.monotonic() + 400
    while not first_checkpoint.is_dir() and four.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if four.poll() is None:
        four.send_signal(signal.SIGINT)
    result = {"root": root, "four": _finish(four, root / "four", timeout=200)}
    # Checkpoint steps as the interrupted run left them: the resume below writes into the same
    # folder, and max_to_keep=2 then drops older steps.
    ckpt = root / "four" / "checkpoints" / "sapa-b_seed0"
    result["four_checkpoints"] = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    interrupted = root / "four" / "results.json"
    result["four_doc"] = json.loads(interrupted.read_text()) if interrupted.exists() else None
    segformer_args = TINY + ["--decoder", "segformer", "--upsamplers", "nearest,sapa-g",
                             "--steps", "1", "--no-figures", "--out", str(root / "segformer")]
    segformer = _launch(segformer_args, root / "segformer")
    if result["four_doc"]:
        stopped = result["four_doc"]["runs"][0]["step"]
        resume_args = TINY + ["--upsamplers", "sapa-b", "--steps", str(stopped + 2),
                              "--eval-every", "2", "--no-figures", "--resume",
                              "--out", str(root / "four")]
        resume = _launch(resume_args, root / "resume")
        result["resume"] = _finish(resume, root / "resume", timeout=400)
    result["tiny"] = _finish(tiny, root / "tiny", timeout=600)
    result["segformer"] = _finish(segformer, root / "segformer", timeout=400)
    first = (root / "tiny" / "results.json").read_bytes() if result["tiny"]["rc"] == 0 else None
    result["again"] = _finish(_launch(tiny_args, root / "again"), root / "again")
    result["again_unchanged"] = first is not None and \
        (root / "tiny" / "results.json").read_bytes() == first
    return result


def _ok(run):
    assert run["rc"] == 0, run["stderr"][-3000:]
    assert "Traceback" not in run["stderr"]


def _png_is_nontrivial(path: Path):
    image = np.asarray(Image.open(path).convert("RGB"), np.float32)
    assert image.shape[0] > 200 and image.shape[1] > 200, image.shape
    assert image.std() > 10, f"{path} looks blank"


def test_tiny_run_writes_results(runs):
    _ok(runs["tiny"])
    out = runs["root"] / "tiny"
    assert f"Results: {out / 'results.json'}" in runs["tiny"]["stdout"]
    assert "boundary IoU, w=2" in runs["tiny"]["stdout"]  # the printed table
    doc = json.loads((out / "results.json").read_text())
    assert doc["devices"] == 1 and doc["interrupted"] is False
    assert doc["config"]["decoder"] == "fpn"
    assert [row["upsampler"] for row in doc["summary"]] == list(UPSAMPLERS)
    assert len(doc["runs"]) == 2 * len(UPSAMPLERS)
    for run in doc["runs"]:
        assert run["step"] == 2 and run["start_step"] == 0
        assert [h["step"] for h in run["history"]] == [1, 2]  # --eval-every 1
        for key in ("miou", "boundary_iou", "pixel_accuracy"):
            assert 0.0 <= run["final"][key] <= 1.0
        assert run["final"]["miou"] == pytest.approx(run["history"][-1]["miou"])
        assert (Path(run["checkpoint"]) / "2").is_dir()
        assert run["step_ms"] > 0
        if run["upsampler"].startswith("sapa") and run["seed"] == 0:
            # Kernels rebuilt from the parameters reproduce the module's output.
            assert run["kernel_check_max_abs_err"] < 1e-4
    by = {row["upsampler"]: row for row in doc["summary"]}
    for name, row in by.items():
        for key in ("miou_mean", "miou_std", "boundary_iou_mean", "boundary_iou_std",
                    "params_added", "flops_added", "step_ms"):
            assert row[key] is not None, (name, key)
        diffs = [k for k in row if k.endswith("_diff_vs_bilinear")]
        if name == "bilinear":
            assert not diffs and row["params_added"] == 0 and row["flops_added"] == 0
        else:
            assert sorted(diffs) == ["boundary_iou_diff_vs_bilinear", "miou_diff_vs_bilinear"]
            for k in diffs:
                low, high = row[k]["ci95"]
                assert low <= row[k]["mean"] <= high
    # The cost columns: learned upsamplers add parameters, and SAPA adds FLOPs.
    assert by["deconv"]["params_added"] > by["sapa-b"]["params_added"] > by["sapa-i"]["params_added"] > 0
    assert by["sapa-b"]["flops_added"] > 0 and by["sapa-i"]["flops_added"] > 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["upsampler"] for r in rows] == list(UPSAMPLERS)
    for r in rows:
        assert 0.0 <= float(r["miou_mean"]) <= 1.0 and float(r["miou_std"]) >= 0.0
        assert 0.0 <= float(r["boundary_iou_mean"]) <= 1.0
        assert float(r["step_ms"]) > 0
        if r["upsampler"] != "bilinear":
            assert float(r["miou_diff_vs_bilinear_ci95_low"]) <= float(r["miou_diff_vs_bilinear"])
    with (out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2 * len(UPSAMPLERS)


def test_tiny_run_writes_figures(runs):
    _ok(runs["tiny"])
    figures = runs["root"] / "tiny" / "figures"
    expected = {"predictions_seed0.png", "feature_kernel_maps_seed0.png"} | {
        f"kernels_{u}_seed0.png" for u in UPSAMPLERS if u.startswith("sapa")}
    assert {p.name for p in figures.glob("*.png")} == expected
    for name in expected:
        _png_is_nontrivial(figures / name)
    # One column per upsampler plus input and ground truth: wider than it is tall.
    width, height = Image.open(figures / "predictions_seed0.png").size
    assert width > height


def test_segformer_decoder_runs(runs):
    _ok(runs["segformer"])
    doc = json.loads((runs["root"] / "segformer" / "results.json").read_text())
    assert doc["config"]["decoder"] == "segformer"
    assert [r["upsampler"] for r in doc["summary"]] == ["nearest", "sapa-g"]
    nearest, sapa = doc["summary"]
    assert sapa["params"] > nearest["params"] and doc["figures"] == []
    # No bilinear in this run: nothing to add to or pair with, said so rather than guessed.
    assert sapa["params_added"] is None and sapa["miou_diff_vs_bilinear"] is None
    assert "± n/a" in runs["segformer"]["stdout"]  # one seed: no spread, no interval


def test_rerun_into_the_same_folder_is_refused(runs):
    again = runs["again"]
    assert again["rc"] == 2, again["stderr"][-3000:]
    assert "already holds an earlier run" in again["stderr"]
    assert "--overwrite" in again["stderr"] and "--resume" in again["stderr"]
    assert "Traceback" not in again["stderr"]
    assert runs["again_unchanged"]  # the earlier results are untouched


def test_ctrl_c_on_4_devices_saves_and_exits_cleanly(runs):
    four = runs["four"]
    assert four["rc"] == train.EXIT_INTERRUPTED, four["stderr"][-3000:]
    assert "Traceback" not in four["stderr"]
    assert "--resume" in four["stderr"]
    assert "4 cpu device(s)" in four["stdout"]
    doc = runs["four_doc"]
    assert doc["devices"] == 4 and doc["interrupted"] is True
    stopped = doc["runs"][0]["step"]
    assert 2 <= stopped < 100000
    assert [h["step"] for h in doc["runs"][0]["history"]][0] == 2
    assert stopped in runs["four_checkpoints"]  # Ctrl-C saved the step it stopped at


def test_resume_continues_the_step_counter(runs):
    assert runs["four_doc"] is not None, "the interrupted run wrote no results"
    _ok(runs["resume"])
    stopped = runs["four_doc"]["runs"][0]["step"]
    doc = json.loads((runs["root"] / "four" / "results.json").read_text())
    run = doc["runs"][0]
    assert doc["devices"] == 1  # restored from a 4-device checkpoint onto 1 device
    assert run["start_step"] == stopped and run["step"] == stopped + 2
    steps = [h["step"] for h in run["history"]]
    assert steps[0] == 2 and steps[-1] == stopped + 2  # history carried over the restart
    assert (runs["root"] / "four" / "checkpoints" / "sapa-b_seed0" / str(stopped + 2)).is_dir()


def test_batch_not_divisible_by_devices_fails_clearly(tmp_path):
    proc = _launch(["--batch-size", "6", "--steps", "1", "--out", str(tmp_path / "out")],
                   tmp_path / "bad", devices=4)
    result = _finish(proc, tmp_path / "bad", timeout=120)
    assert result["rc"] == 2
    assert "divisible by the number of devices (4)" in result["stderr"]
    assert "Traceback" not in result["stderr"]

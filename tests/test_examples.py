"""The segmentation example: its pieces, then the CLI end to end at a tiny size (16x16 images,
batch 4, a few steps) through every path: training, validation, checkpoints, figures, Ctrl-C,
resume and 4 devices. Compilation dominates the time of those runs on a CPU, so they are as
few as possible and overlap (see the `runs` fixture).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from examples.segmentation import data, metrics, model, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "16", "--batch-size", "4", "--val-size", "4", "--seeds", "0",
        "--log-every", "1"]
UPSAMPLERS = ("nearest", "sapa-i", "sapa-b", "sapa-p", "sapa-g")


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
    np.testing.assert_allclose(model.bilinear2x(x), expected, atol=1e-6)


def test_parse_upsampler():
    assert model.parse_upsampler(" SAPA-B ") == "sapa-b"
    with pytest.raises(ValueError, match="sapa-g"):
        model.parse_upsampler("carafe")


def test_batch_size_must_divide_over_devices():
    train.check_batch_size(8, 4)
    with pytest.raises(ValueError, match="divisible by the number of devices \\(4\\).*got 6"):
        train.check_batch_size(6, 4)


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "20"], "multiple of 8"),
    (["--upsamplers", "nearest,carafe"], "upsampler must be one of"),
    (["--seeds", "0,0"], "must not repeat"),
    (["--kernel-size", "4"], "odd"),
    (["--steps", "0"], ">= 1"),
])
def test_bad_command_lines_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_args_defaults_and_val_rounding():
    cfg = train.parse_args(["--batch-size", "8", "--val-size", "20"])
    assert cfg.upsamplers == model.UPSAMPLERS
    assert cfg.val_size == 24  # rounded up to whole batches
    assert cfg.out.is_absolute()


# ----------------------------------------------------------------------------- end to end

def _launch(args, devices: int, log: Path) -> subprocess.Popen:
    """`python -m examples.segmentation ARGS` on `devices` fake CPU devices, output to `log`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        return subprocess.Popen([sys.executable, "-m", "examples.segmentation", *args],
                                cwd=REPO, env=env, stdout=out, stderr=err)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> dict:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"rc": proc.returncode, "stdout": log.with_suffix(".out").read_text(),
            "stderr": log.with_suffix(".err").read_text()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three CLI runs in subprocesses, overlapped (compilation is single-threaded, so two
    processes use both cores):

    tiny:   1 device, nearest + every SAPA variant, 2 steps, figures.
    four:   4 devices, sapa-b, stopped with SIGINT once its step-2 checkpoint is on disk.
    resume: 1 device, --resume of `four` for two more steps.
    """
    root = tmp_path_factory.mktemp("segmentation")
    tiny_args = TINY + ["--upsamplers", ",".join(UPSAMPLERS), "--steps", "2",
                        "--eval-every", "1", "--out", str(root / "tiny")]
    tiny = _launch(tiny_args, 1, root / "tiny")
    four_args = TINY + ["--upsamplers", "sapa-b", "--steps", "100000", "--eval-every", "2",
                        "--no-figures", "--out", str(root / "four")]
    four = _launch(four_args, 4, root / "four")
    first_checkpoint = root / "four" / "checkpoints" / "sapa-b_seed0" / "2"
    deadline = time.monotonic() + 200
    while not first_checkpoint.is_dir() and four.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if four.poll() is None:
        four.send_signal(signal.SIGINT)
    result = {"root": root, "four": _finish(four, root / "four", timeout=120)}
    # Checkpoint steps as the interrupted run left them: the resume below writes into the same
    # folder, and max_to_keep=2 then drops older steps.
    ckpt = root / "four" / "checkpoints" / "sapa-b_seed0"
    result["four_checkpoints"] = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    interrupted = root / "four" / "results.json"
    result["four_doc"] = json.loads(interrupted.read_text()) if interrupted.exists() else None
    if result["four_doc"]:
        stopped = result["four_doc"]["runs"][0]["step"]
        resume_args = TINY + ["--upsamplers", "sapa-b", "--steps", str(stopped + 2),
                              "--eval-every", "2", "--no-figures", "--resume",
                              "--out", str(root / "four")]
        resume = _launch(resume_args, 1, root / "resume")
        result["resume"] = _finish(resume, root / "resume")
    result["tiny"] = _finish(tiny, root / "tiny")
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
    assert [row["upsampler"] for row in doc["summary"]] == list(UPSAMPLERS)
    assert len(doc["runs"]) == len(UPSAMPLERS)
    for run in doc["runs"]:
        assert run["step"] == 2 and run["start_step"] == 0
        assert [h["step"] for h in run["history"]] == [1, 2]  # --eval-every 1
        for key in ("miou", "boundary_iou", "pixel_accuracy"):
            assert 0.0 <= run["final"][key] <= 1.0
        assert run["final"]["miou"] == pytest.approx(run["history"][-1]["miou"])
        assert (Path(run["checkpoint"]) / "2").is_dir()
        if run["upsampler"].startswith("sapa"):
            # Kernels rebuilt from the parameters reproduce the module's output.
            assert run["kernel_check_max_abs_err"] < 1e-4
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["upsampler"] for r in rows] == list(UPSAMPLERS)
    for r in rows:
        assert 0.0 <= float(r["miou_mean"]) <= 1.0 and float(r["miou_std"]) == 0.0
        assert 0.0 <= float(r["boundary_iou_mean"]) <= 1.0
    with (out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(UPSAMPLERS)


def test_tiny_run_writes_figures(runs):
    _ok(runs["tiny"])
    figures = runs["root"] / "tiny" / "figures"
    expected = {"predictions_seed0.png"} | {f"kernels_{u}_seed0.png" for u in UPSAMPLERS
                                            if u.startswith("sapa")}
    assert {p.name for p in figures.glob("*.png")} == expected
    for name in expected:
        _png_is_nontrivial(figures / name)
    # One column per upsampler plus input and ground truth: wider than it is tall.
    width, height = Image.open(figures / "predictions_seed0.png").size
    assert width > 1.5 * height


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
    proc = _launch(["--batch-size", "6", "--steps", "1", "--out", str(tmp_path)], 4,
                   tmp_path / "bad")
    result = _finish(proc, tmp_path / "bad", timeout=120)
    assert result["rc"] == 2
    assert "divisible by the number of devices (4)" in result["stderr"]
    assert "Traceback" not in result["stderr"]

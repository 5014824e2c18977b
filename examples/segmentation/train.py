"""Train and evaluate the segmentation network once per (upsampler, seed); write table + figures.

Data parallel over all local devices: a 1-D `Mesh` named "data", the batch sharded along it,
parameters and optimiser state replicated; `jax.jit` inserts the gradient all-reduce. Fake
several CPU devices with `XLA_FLAGS=--xla_force_host_platform_device_count=4`. (One process;
several hosts would also need each process to feed only its own slice of the batch.)

Each run checkpoints (orbax) to <out>/checkpoints/<upsampler>_seed<seed>/ at every validation
and at the end; `--resume` continues every run from its latest checkpoint (a finished run is
only re-evaluated). Ctrl-C saves a checkpoint at the current step and exits with status 130;
a second Ctrl-C stops at once.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

import sapa_jax

from . import data, figures, metrics, model

VAL_SEED = 2022  # the validation set is the same for every run, so runs compare on equal terms
EXIT_INTERRUPTED = 130  # the shell's convention for "stopped by SIGINT"


@dataclasses.dataclass(frozen=True)
class Config:
    upsamplers: tuple[str, ...] = model.UPSAMPLERS
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 400
    batch_size: int = 8
    image_size: int = 32
    val_size: int = 64
    eval_every: int = 100
    log_every: int = 10
    lr: float = 3e-3
    weight_decay: float = 1e-4
    band_width: int = 2
    kernel_size: int = 5
    embedding_dim: int = 32
    out: Path = Path("outputs/segmentation")
    resume: bool = False
    figures: bool = True


# ----------------------------------------------------------------------------- command line

def _comma_list(kind, text):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    try:
        return tuple(kind(t) for t in items)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m examples.segmentation",
        description="Train a small encoder-decoder segmenter on synthetic scenes (thin lines, "
                    "rings, discs, polygons on textured backgrounds) once per decoder "
                    "upsampler and seed, and compare mIoU and boundary IoU. The defaults finish "
                    "in about five minutes on a 2-core CPU; raise --steps, --image-size and "
                    "--seeds on a GPU.",
        epilog="Writes <out>/results.json, results.csv (mean ± std per upsampler), runs.csv "
               "(per seed), figures/*.png and checkpoints/. Several CPU devices: "
               "XLA_FLAGS=--xla_force_host_platform_device_count=4. To reuse compilations "
               "between invocations set JAX_COMPILATION_CACHE_DIR.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--upsamplers", type=functools.partial(_comma_list, model.parse_upsampler),
                   default=d.upsamplers, help="comma-separated subset of "
                   + ",".join(model.UPSAMPLERS))
    p.add_argument("--seeds", type=functools.partial(_comma_list, int), default=d.seeds,
                   help="comma-separated seeds (model init and training data); mean and std "
                        "are taken over them")
    p.add_argument("--steps", type=_positive, default=d.steps, help="training steps per run")
    p.add_argument("--batch-size", type=_positive, default=d.batch_size,
                   help="global batch size; must be divisible by the number of devices")
    p.add_argument("--image-size", type=_positive, default=d.image_size,
                   help="image height and width, a multiple of 8")
    p.add_argument("--val-size", type=_positive, default=d.val_size,
                   help="validation images (rounded up to a multiple of --batch-size)")
    p.add_argument("--eval-every", type=_positive, default=d.eval_every,
                   help="validate and checkpoint every this many steps (and at the end)")
    p.add_argument("--log-every", type=_positive, default=d.log_every,
                   help="refresh loss and throughput on the progress bar every this many steps")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--band-width", type=_positive, default=d.band_width,
                   help="boundary IoU band: pixels within w pixels (Chebyshev) of another "
                        "ground-truth label")
    p.add_argument("--kernel-size", type=_positive, default=d.kernel_size,
                   help="SAPA window size K (odd)")
    p.add_argument("--embedding-dim", type=_positive, default=d.embedding_dim,
                   help="SAPA query/key width (variants B, P, G)")
    p.add_argument("--out", type=Path, default=d.out, help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue each run from its latest checkpoint in --out")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=d.figures,
                   help="draw the PNG figures")
    return p


def check_batch_size(batch_size: int, device_count: int) -> None:
    """The batch axis is split evenly over the devices of the mesh."""
    if batch_size % device_count:
        raise ValueError(
            f"--batch-size must be divisible by the number of devices ({device_count}) to "
            f"shard the batch evenly, got {batch_size}; use e.g. "
            f"{max(device_count, batch_size // device_count * device_count)}")


def parse_args(argv=None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image_size % 8:
        parser.error(f"--image-size must be a multiple of 8 (the network halves it three "
                     f"times), got {args.image_size}")
    if args.kernel_size % 2 == 0:
        parser.error(f"--kernel-size must be odd, got {args.kernel_size}")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.upsamplers)) != len(args.upsamplers):
        parser.error("--seeds and --upsamplers must not repeat an entry")
    try:
        check_batch_size(args.batch_size, jax.local_device_count())
    except ValueError as err:
        parser.error(str(err))
    val_size = math.ceil(args.val_size / args.batch_size) * args.batch_size
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return Config(**{**values, "val_size": val_size, "out": args.out.resolve()})


# ----------------------------------------------------------------------------- training

@dataclasses.dataclass
class Trainer:
    """Jitted init / train / predict functions of one upsampler (shared by all its seeds)."""
    net: model.Segmenter
    init: callable
    train_step: callable
    predict: callable


def make_trainer(cfg: Config, upsampler: str, mesh: Mesh) -> Trainer:
    net = model.Segmenter(upsampler, data.NUM_CLASSES, kernel_size=cfg.kernel_size,
                       embedding_dim=cfg.embedding_dim)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup_steps=max(1, cfg.steps // 20), decay_steps=cfg.steps,
        end_value=cfg.lr * 0.01)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec("data"))

    @functools.partial(jax.jit, out_shardings=replicated)
    def init(key):
        dummy = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
        params = net.init(key, dummy)["params"]
        return train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)

    # Donating the state lets XLA update parameters in place.
    @functools.partial(jax.jit, in_shardings=(replicated, batch, batch),
                       out_shardings=(replicated, replicated), donate_argnums=0)
    def train_step(state, images, labels):
        def loss_fn(params):
            logits = net.apply({"params": params}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    @functools.partial(jax.jit, in_shardings=(replicated, batch), out_shardings=batch)
    def predict(params, images):
        return jnp.argmax(net.apply({"params": params}, images), axis=-1).astype(jnp.int32)

    return Trainer(net, init, train_step, predict)


class StopFlag:
    """SIGINT handler for the duration of a `with` block: the first Ctrl-C asks the training
    loop to checkpoint and stop at the next step boundary; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._installed, self._previous = False, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("\nCtrl-C: saving a checkpoint and stopping (press again to abort now)")

    def __enter__(self):
        # Signal handlers can only be set from the main thread; elsewhere Ctrl-C stays default.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


def shard_batch(mesh: Mesh, *arrays):
    """Host NumPy arrays -> global arrays split along the batch axis over the mesh."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return tuple(jax.device_put(a, sharding) for a in arrays)


def predict_all(trainer: Trainer, params, mesh: Mesh, images, batch_size: int) -> np.ndarray:
    chunks = []
    for start in range(0, len(images), batch_size):
        (chunk,) = shard_batch(mesh, images[start:start + batch_size])
        chunks.append(trainer.predict(params, chunk))
    return np.concatenate([np.asarray(c) for c in chunks])


def evaluate(trainer, params, mesh, val, cfg: Config) -> tuple[dict, np.ndarray]:
    images, labels = val
    pred = predict_all(trainer, params, mesh, images, cfg.batch_size)
    return metrics.segmentation_scores(pred, labels, data.NUM_CLASSES, cfg.band_width), pred


def run_name(upsampler: str, seed: int) -> str:
    return f"{upsampler}_seed{seed}"


def train_run(cfg: Config, trainer: Trainer, upsampler: str, seed: int, mesh: Mesh, val,
              stop: StopFlag):
    """Train (or resume) one run; returns (record, state), `record["interrupted"]` if stopped."""
    ckpt_dir = cfg.out / "checkpoints" / run_name(upsampler, seed)
    if not cfg.resume and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a fresh run must not pick up an older run's steps
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True))
    # "rbg": partitionable threefry makes XLA spend seconds compiling the initialisers on CPU.
    key = jax.random.key(seed, impl="rbg")
    history, start = [], 0
    if cfg.resume and manager.latest_step() is not None:
        start = manager.latest_step()
        abstract = trainer.init.eval_shape(key)  # shapes, dtypes and shardings to restore into
        try:
            restored = manager.restore(start, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
        except (ValueError, KeyError) as err:
            raise SystemExit(
                f"error: the checkpoint at step {start} in {ckpt_dir} does not fit this "
                f"configuration (was it written with other --kernel-size/--embedding-dim?); "
                f"drop --resume or choose another --out. ({type(err).__name__}: {err})"
            ) from None
        state, history = restored.state, list(restored.history)
    else:
        state = trainer.init(key)

    def save(step):
        if manager.latest_step() != step:
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)))

    step, interrupted = start, False
    bar = tqdm(total=cfg.steps, initial=start, desc=f"{upsampler:>8} seed {seed}", unit="step",
               dynamic_ncols=True)
    clock = time.perf_counter
    first_step_seconds = None  # the first step of this process includes compilation
    timed_seconds, timed_steps = 0.0, 0
    t_window, n_window = clock(), 0
    try:
        while step < cfg.steps:
            if stop.requested:
                interrupted = True
                break
            images, labels = shard_batch(mesh, *data.train_batch(seed, step, cfg.batch_size,
                                                                 cfg.image_size))
            state, loss = trainer.train_step(state, images, labels)
            step += 1
            n_window += 1
            bar.update(1)
            evaluate_now = step % cfg.eval_every == 0 or step == cfg.steps
            if (first_step_seconds is None or evaluate_now or step % cfg.log_every == 0):
                loss_value = float(loss)  # waits for the step: throughput measured, not queued
                now = clock()
                if first_step_seconds is None:
                    first_step_seconds = now - t_window
                else:
                    timed_seconds += now - t_window
                    timed_steps += n_window
                    bar.set_postfix(loss=f"{loss_value:.3f}",
                                    img_s=f"{n_window * cfg.batch_size / (now - t_window):.1f}")
                t_window, n_window = now, 0
            if evaluate_now:
                scores, _ = evaluate(trainer, state.params, mesh, val, cfg)
                history.append({"step": step, "loss": loss_value, "miou": scores["miou"],
                                "boundary_iou": scores["boundary_iou"]})
                bar.write(f"  {upsampler} seed {seed} step {step}: loss {loss_value:.4f}  "
                          f"mIoU {scores['miou']:.4f}  boundary IoU {scores['boundary_iou']:.4f}")
                save(step)
                t_window = clock()  # validation is not training time
        if step > start:
            save(step)
    finally:  # on a second Ctrl-C the state may be mid-step (donated): keep older checkpoints
        bar.close()
        manager.wait_until_finished()
        manager.close()
    record = {"upsampler": upsampler, "seed": seed, "start_step": start, "step": step,
              "interrupted": interrupted, "history": history, "checkpoint": str(ckpt_dir),
              "first_step_seconds": None if first_step_seconds is None
              else round(first_step_seconds, 2),
              "images_per_second": round(timed_steps * cfg.batch_size / timed_seconds, 1)
              if timed_steps else None}
    return record, state


# ----------------------------------------------------------------------------- reporting

def _mean_std(values):
    values = np.asarray(values, np.float64)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def summarise(runs: list[dict], upsamplers) -> list[dict]:
    """One row per upsampler: mean and sample std (ddof=1; 0 for one seed) over seeds."""
    rows = []
    for ups in upsamplers:
        done = [r for r in runs if r["upsampler"] == ups and "final" in r]
        if not done:
            continue
        miou = _mean_std([r["final"]["miou"] for r in done])
        biou = _mean_std([r["final"]["boundary_iou"] for r in done])
        rows.append({"upsampler": ups, "seeds": len(done),
                     "miou_mean": miou[0], "miou_std": miou[1],
                     "boundary_iou_mean": biou[0], "boundary_iou_std": biou[1]})
    return rows


def format_table(rows, band_width: int) -> str:
    """Plain-text table of `summarise` rows, in percent: mean ± std over seeds."""
    head = (f"{'upsampler':<10} {'seeds':>5}  {'mIoU (%)':>15}  "
            f"{f'boundary IoU, w={band_width} (%)':>26}")
    lines = [head, "-" * len(head)]
    for r in rows:
        miou = f"{100 * r['miou_mean']:.2f} ± {100 * r['miou_std']:.2f}"
        biou = f"{100 * r['boundary_iou_mean']:.2f} ± {100 * r['boundary_iou_std']:.2f}"
        lines.append(f"{r['upsampler']:<10} {r['seeds']:>5}  {miou:>15}  {biou:>26}")
    return "\n".join(lines)


def write_results(cfg: Config, runs, rows, extra: dict) -> dict:
    cfg.out.mkdir(parents=True, exist_ok=True)
    paths = {"json": cfg.out / "results.json", "csv": cfg.out / "results.csv",
             "runs_csv": cfg.out / "runs.csv"}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    doc = {"config": config, **extra, "summary": rows, "runs": runs}
    paths["json"].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["upsampler"])
        writer.writeheader()
        writer.writerows(rows)
    with paths["runs_csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["upsampler", "seed", "step", "miou", "boundary_iou", "pixel_accuracy",
                         "images_per_second"])
        for r in runs:
            if "final" in r:
                writer.writerow([r["upsampler"], r["seed"], r["step"], r["final"]["miou"],
                                 r["final"]["boundary_iou"], r["final"]["pixel_accuracy"],
                                 r["images_per_second"]])
    return paths


# ----------------------------------------------------------------------------- main

def run(cfg: Config, stop: StopFlag | None = None) -> dict:
    """All runs of `cfg`; returns the results document (also written to `cfg.out`)."""
    stop = stop or StopFlag()
    devices = jax.local_devices()
    check_batch_size(cfg.batch_size, len(devices))
    mesh = Mesh(np.array(devices), ("data",))
    val = data.validation_set(VAL_SEED, cfg.val_size, cfg.image_size)
    fig_dir = cfg.out / "figures"
    runs, predictions, figure_paths, interrupted = [], {}, [], False
    started = time.perf_counter()
    for upsampler in cfg.upsamplers:
        trainer = make_trainer(cfg, upsampler, mesh)
        for seed in cfg.seeds:
            if stop.requested:
                interrupted = True
                break
            record, state = train_run(cfg, trainer, upsampler, seed, mesh, val, stop)
            runs.append(record)
            if record["interrupted"]:
                interrupted = True
                break
            scores, pred = evaluate(trainer, state.params, mesh, val, cfg)
            record["final"] = scores
            predictions.setdefault(seed, {})[upsampler] = pred[:figures.SHOWN_IMAGES]
            if cfg.figures and upsampler.startswith("sapa") and seed == cfg.seeds[0]:
                path = fig_dir / f"kernels_{run_name(upsampler, seed)}.png"
                record["kernel_check_max_abs_err"] = figures.kernel_figure(
                    trainer.net, state.params, val, path)
                figure_paths.append(path)
        if interrupted:
            break
    if cfg.figures:
        for seed, preds in predictions.items():
            path = fig_dir / f"predictions_seed{seed}.png"
            figures.prediction_figure(val, preds, path, cfg.band_width)
            figure_paths.append(path)
    rows = summarise(runs, cfg.upsamplers)
    extra = {"devices": len(devices), "platform": devices[0].platform,
             "sapa_core": sapa_jax.core.resolve_impl("auto", jnp.float32),
             "interrupted": interrupted, "wall_seconds": round(time.perf_counter() - started, 1),
             "figures": [str(p) for p in figure_paths]}
    paths = write_results(cfg, runs, rows, extra)
    extra["paths"] = {k: str(v) for k, v in paths.items()}
    return {"summary": rows, "runs": runs, **extra}


def main(argv=None) -> int:
    cfg = parse_args(argv)
    devices = jax.local_devices()
    print(f"{len(devices)} {devices[0].platform} device(s); SAPA core: "
          f"{sapa_jax.core.resolve_impl('auto', jnp.float32)}; "
          f"{len(cfg.upsamplers)} upsampler(s) x {len(cfg.seeds)} seed(s), {cfg.steps} steps, "
          f"batch {cfg.batch_size}, {cfg.image_size}x{cfg.image_size}; output: {cfg.out}")
    try:
        with StopFlag() as stop:
            result = run(cfg, stop)
    except KeyboardInterrupt:
        print("\nAborted (second Ctrl-C); checkpoints written so far are kept. "
              "Rerun with --resume to continue.", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result["summary"]:
        print()
        print(format_table(result["summary"], cfg.band_width))
    print(f"\nResults: {result['paths']['json']}\n         {result['paths']['csv']}"
          f"\n         {result['paths']['runs_csv']}")
    if result["figures"]:
        print(f"Figures: {cfg.out / 'figures'} ({len(result['figures'])} PNG files)")
    print(f"Wall time: {result['wall_seconds']:.0f} s")
    if result["interrupted"]:
        print("Interrupted: checkpoints saved; rerun the same command with --resume to continue.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0

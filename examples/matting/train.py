"""Train and evaluate the matting network once per (upsampler, seed); write table + figures.

The protocol of the paper (docs/design.md §3b): the same network, laterals, data, seeds and
training budget for every upsampler; only the decoder's upsampling stages change. Training:
AdamW with warm-up and cosine decay, L1 loss on alpha over the trimap's unknown region (the
alpha-prediction loss of Deep Image Matting), a data-parallel `jax.jit` step
(examples.common.training). Evaluation: SAD, MSE, Grad and Conn (examples/matting/metrics.py)
over the unknown region of a fixed validation set, after the known regions are set from the
trimap; mean per run, then mean ± std over seeds and the paired difference to bilinear with a
Student-t 95% CI (examples.common.stats). Lower is better for all four errors.

Output folder (examples.common.outputs): a non-empty --out is refused unless --resume
(continue every run from its checkpoint) or --overwrite (start afresh). Ctrl-C checkpoints and
exits with status 130; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from examples.common import cli, cost, outputs, report, stats, training
from examples.common import upsamplers as ups

from . import data, figures, metrics, model

VAL_SEED = 2022  # the validation set is the same for every run: runs compare on equal terms
METRICS = {"sad": "SAD", "mse": "MSE", "grad": "Grad", "conn": "Conn"}
# Shown in the printed table as value x scale (MSE is ~1e-3, the others sums over pixels).
TABLE_SCALE = {"sad": 1.0, "mse": 1e3, "grad": 1.0, "conn": 1.0}
DEFAULT_UPSAMPLERS = ("nearest", "bilinear", "deconv", "carafe", "sapa-i", "sapa-b", "sapa-g")


@dataclasses.dataclass(frozen=True)
class Config:
    upsamplers: tuple[str, ...] = tuple(u for u in DEFAULT_UPSAMPLERS
                                        if ups.unavailable_reason(u) is None)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 300
    batch_size: int = 8
    image_size: int = 32
    val_size: int = 48
    eval_every: int = 100
    log_every: int = 10
    lr: float = 3e-3
    weight_decay: float = 1e-4
    kernel_size: int = 5
    embedding_dim: int = 32
    out: Path = Path("outputs/matting")
    overwrite: bool = False
    resume: bool = False
    figures: bool = True


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m examples.matting",
        description="Train a small A2U/IndexNet-style matting network (image + trimap -> "
                    "alpha) on synthetic mattes with soft edges, hair-like strands, holes and "
                    "translucent patches, once per decoder upsampler and seed, and compare the "
                    "Composition-1k errors SAD, MSE, Grad and Conn over the unknown region "
                    "(lower is better), with paired 95% CIs against bilinear. The defaults "
                    "take a few minutes on a 2-core CPU.",
        epilog="Writes <out>/results.json, results.csv (one row per upsampler), runs.csv "
               "(per seed), figures/*.png and checkpoints/. To reuse compilations between "
               "invocations set JAX_COMPILATION_CACHE_DIR.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_run_arguments(p, upsamplers=d.upsamplers, seeds=d.seeds, steps=d.steps,
                          batch_size=d.batch_size, image_size=d.image_size,
                          val_size=d.val_size, eval_every=d.eval_every,
                          log_every=d.log_every, out=d.out)
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--kernel-size", type=cli.positive, default=d.kernel_size,
                   help="CARAFE / SAPA window size K (odd)")
    p.add_argument("--embedding-dim", type=cli.positive, default=d.embedding_dim,
                   help="SAPA query/key width (variants B, P, G)")
    return p


def parse_args(argv=None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image_size % 8:
        parser.error(f"--image-size must be a multiple of 8 (the network halves it three "
                     f"times), got {args.image_size}")
    if args.kernel_size % 2 == 0:
        parser.error(f"--kernel-size must be odd, got {args.kernel_size}")
    if args.overwrite and args.resume:
        parser.error("--overwrite and --resume exclude each other: --overwrite deletes the "
                     "checkpoints that --resume would continue from")
    cli.check_unique(parser, seeds=args.seeds, upsamplers=args.upsamplers)
    try:
        training.check_batch_size(args.batch_size, jax.local_device_count())
    except ValueError as err:
        parser.error(str(err))
    val_size = math.ceil(args.val_size / args.batch_size) * args.batch_size
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return Config(**{**values, "val_size": val_size, "out": args.out.resolve()})


# ----------------------------------------------------------------------------- one upsampler

def unknown_l1(pred, alpha, trimaps):
    """Mean |pred - alpha| over the unknown pixels of the batch (0 if there are none)."""
    unknown = (trimaps == data.TRIMAP_UNKNOWN).astype(pred.dtype)
    return jnp.sum(jnp.abs(pred - alpha) * unknown) / jnp.maximum(jnp.sum(unknown), 1.0)


@dataclasses.dataclass
class Trainer:
    """Jitted functions of one upsampler's network (shared by all its seeds)."""
    net: model.Matter
    init: callable
    train_step: callable
    predict: callable


def make_trainer(cfg: Config, upsampler: str, mesh) -> Trainer:
    net = model.Matter(upsampler, kernel_size=cfg.kernel_size, embedding_dim=cfg.embedding_dim)
    dummy = jnp.zeros((1, cfg.image_size, cfg.image_size, model.INPUT_CHANNELS), jnp.float32)

    def init_params(key):
        return net.init(key, dummy)["params"]

    def loss(params, images, trimaps, alpha):
        pred = net.apply({"params": params}, model.network_input(images, trimaps))
        return unknown_l1(pred, alpha, trimaps)

    tx = training.warmup_cosine_adamw(cfg.lr, cfg.steps, cfg.weight_decay)
    init, train_step = training.jit_train_functions(init_params, loss, tx, mesh, net.apply)
    batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())

    @functools.partial(jax.jit, in_shardings=(replicated, batch, batch), out_shardings=batch)
    def predict(params, images, trimaps):
        pred = net.apply({"params": params}, model.network_input(images, trimaps))
        return model.clamp_to_trimap(pred, trimaps)

    return Trainer(net, init, train_step, predict)


def predict_all(trainer: Trainer, params, mesh, val, batch_size: int) -> np.ndarray:
    images, trimaps, _ = val
    chunks = []
    for start in range(0, len(images), batch_size):
        chunk = training.shard_batch(mesh, images[start:start + batch_size],
                                     trimaps[start:start + batch_size])
        chunks.append(trainer.predict(params, *chunk))
    return np.concatenate([np.asarray(c) for c in chunks])


def scores(pred: np.ndarray, val) -> dict:
    """Mean over the validation images of each error (the per-run number)."""
    _, trimaps, alpha = val
    errors = metrics.matting_errors(pred, alpha, trimaps == data.TRIMAP_UNKNOWN)
    return {k: float(np.mean(v)) for k, v in errors.items()}


def costs(trainer: Trainer, params, cfg: Config) -> dict:
    """Parameters and forward FLOPs (XLA's cost analysis) for one image of the run's size."""
    dummy = jnp.zeros((1, cfg.image_size, cfg.image_size, model.INPUT_CHANNELS), jnp.float32)
    flops = cost.forward_flops(lambda p, x: trainer.net.apply({"params": p}, x), params, dummy)
    return {"params": cost.param_count(params), "flops": flops}


# ----------------------------------------------------------------------------- reporting

def format_table(rows) -> str:
    """Plain-text table: mean ± std over seeds, paired difference to bilinear [95% CI]."""
    cols = [("upsampler", 9), ("seeds", 5)]
    for key, title in METRICS.items():
        unit = " x1e3" if TABLE_SCALE[key] != 1 else ""
        cols += [(f"{title}{unit}", 13), (f"vs bilinear [95% CI]", 24)]
    cols += [("params +", 9), ("MFLOPs +", 9), ("step ms", 8)]
    fmt = lambda cells: "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                                  for i, (c, (_, w)) in enumerate(zip(cells, cols)))
    lines = [fmt([t for t, _ in cols])]
    lines.append("-" * len(lines[0]))
    for r in rows:
        cells = [r["upsampler"], str(r["seeds"])]
        for key in METRICS:
            scale = TABLE_SCALE[key]
            cells.append(stats.format_mean_std(r[f"{key}_mean"], r[f"{key}_std"], scale=scale))
            diff = r.get(f"{key}_diff_vs_{report.BASELINE}")
            cells.append(stats.format_difference(diff, scale=scale) or "-")
        cells.append("n/a" if r.get("params_added") is None else f"{r['params_added']:+d}")
        cells.append("n/a" if r.get("flops_added") is None else f"{r['flops_added'] / 1e6:+.2f}")
        cells.append("n/a" if r.get("step_ms") is None else f"{r['step_ms']:.1f}")
        lines.append(fmt(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def run(cfg: Config, stop: training.StopFlag | None = None) -> dict:
    """All runs of `cfg`; returns the results document (also written to `cfg.out`)."""
    stop = stop or training.StopFlag()
    out = outputs.prepare_output(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)
    mesh = training.make_mesh()
    training.check_batch_size(cfg.batch_size, mesh.size)
    val = data.validation_set(VAL_SEED, cfg.val_size, cfg.image_size)
    loop = training.LoopConfig(cfg.steps, cfg.eval_every, cfg.log_every, cfg.batch_size,
                               cfg.resume)
    runs, run_costs, predictions, interrupted = [], {}, {}, False
    started = time.perf_counter()
    trainers = {}  # one per upsampler, compiled once and shared by its seeds
    # Seed-major order: a run stopped early still holds complete, paired sets of seeds.
    for seed in cfg.seeds:
        for upsampler in cfg.upsamplers:
            if stop.requested:
                interrupted = True
                break
            if upsampler not in trainers:
                trainers[upsampler] = make_trainer(cfg, upsampler, mesh)
            trainer = trainers[upsampler]
            record, state = training.train_loop(
                upsampler, seed, loop, init=trainer.init, train_step=trainer.train_step,
                batch=functools.partial(data.train_batch, seed, batch=cfg.batch_size,
                                        size=cfg.image_size),
                evaluate=lambda params: scores(predict_all(trainer, params, mesh, val,
                                                           cfg.batch_size), val),
                mesh=mesh, ckpt_dir=out / "checkpoints" / f"{upsampler}_seed{seed}", stop=stop,
                mismatch_hint=" (was it written with other --image-size, --kernel-size or "
                              "--embedding-dim?)")
            record["label"] = upsampler
            runs.append(record)
            if record["interrupted"]:
                interrupted = True
                break
            pred = predict_all(trainer, state.params, mesh, val, cfg.batch_size)
            record["final"] = scores(pred, val)
            predictions.setdefault(seed, {})[upsampler] = pred[:figures.SHOWN_IMAGES]
            if upsampler not in run_costs:
                run_costs[upsampler] = costs(trainer, state.params, cfg)
        if interrupted:
            break
    figure_paths = []
    if cfg.figures:
        for seed, preds in predictions.items():
            path = out / "figures" / f"alpha_seed{seed}.png"
            figure_paths.append(figures.prediction_figure(val, preds, path))
    rows = report.summarise(runs, cfg.upsamplers, list(METRICS), costs=run_costs)
    return report.write_all(
        out, cfg, runs, rows, interrupted=interrupted, started=started,
        figure_paths=figure_paths, run_metrics=list(METRICS),
        metrics="mean over validation images of SAD, MSE, Grad, Conn over the trimap's "
                "unknown region (sums not divided by 1000); lower is better")


def main(argv=None) -> int:
    cfg = parse_args(argv)
    return cli.run_main(
        cfg, run, f"{len(cfg.upsamplers)} upsampler(s) x {len(cfg.seeds)} seed(s), "
                  f"{cfg.steps} steps, batch {cfg.batch_size}, {cfg.image_size}x{cfg.image_size}",
        format_table)

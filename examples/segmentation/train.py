"""Train and evaluate the segmenter once per (upsampler, seed); write the table and figures.

The protocol (docs/design.md §7): one decoder (`--decoder`), the same network, data, seeds and
training budget for every upsampler; only the upsampling stages change. Seed s fixes both the
initialisation (`examples.common.training.init_key`) and the training batches (`data.py`) of
its run, for every upsampler alike; the validation set is the same for all runs. The report is
mean ± sample std over seeds and the paired difference to bilinear with a Student-t 95% CI, and
the cost columns (parameters and FLOPs added over bilinear, train-step time).

`--ablation` runs the paper's Table 6 in miniature on the chosen decoder instead of the
`--upsamplers` list: similarity (SAPA-I/B/P/G), normaliser, kernel size and embedding width,
each varied from the default SAPA-B (softmax, K=5, d=32), with bilinear as the baseline.

Data parallel over all local devices (a 1-D mesh "data"; fake several CPU devices with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`). Checkpoints (orbax) go to
<out>/checkpoints/<label>_seed<seed>/; `--resume` continues every run from its latest one;
Ctrl-C checkpoints and exits with status 130. An existing non-empty --out is refused unless
--resume or --overwrite is given (examples/common/outputs.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sapa_jax
from examples.common import cost, report, training
from examples.common import upsamplers as ups
from examples.common.cli import add_run_arguments, check_unique, positive, run_main
from examples.common.outputs import prepare_output

from . import data, figures, metrics, model

VAL_SEED = 2022  # the validation set is the same for every run, so runs compare on equal terms
EXIT_INTERRUPTED = training.EXIT_INTERRUPTED
METRICS = ("miou", "boundary_iou")
RUN_METRICS = (*METRICS, "pixel_accuracy")  # the columns of runs.csv
# Every upsampler this build of sapa_jax has, but SAPA-D: about 10x bilinear's step time on a
# CPU even with its fused kernel, which would more than double the demo's time. Ask for it
# with --upsamplers ...,sapa-d.
DEFAULT_UPSAMPLERS = tuple(u for u in ups.available() if u != "sapa-d")
ABLATION_BASE = {"upsampler": "sapa-b", "normalizer": "softmax", "kernel_size": 5,
                 "embedding_dim": 32}
ABLATION = {"similarity": ("upsampler", ("sapa-i", "sapa-b", "sapa-p", "sapa-g")),
            "normaliser": ("normalizer", ("none", "softmax", "relu", "sigmoid", "softplus")),
            "kernel size": ("kernel_size", (3, 5, 7)),
            "embedding dim": ("embedding_dim", (16, 32, 64, 128))}


@dataclasses.dataclass(frozen=True)
class Config:
    decoder: str = "fpn"
    upsamplers: tuple[str, ...] = DEFAULT_UPSAMPLERS
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 300
    batch_size: int = 8
    image_size: int = 32
    val_size: int = 64
    eval_every: int = 100
    log_every: int = 10
    lr: float = 3e-3
    upsampler_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    band_width: int = 2
    kernel_size: int = 5
    embedding_dim: int = 32
    normalizer: str = "softmax"
    border: str = "zeros"
    ablation: bool = False
    out: Path = Path("outputs/segmentation")
    resume: bool = False
    overwrite: bool = False
    figures: bool = True


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One network configuration, trained once per seed: a row of the table."""
    label: str
    upsampler: str
    kernel_size: int
    embedding_dim: int
    normalizer: str
    groups: tuple[str, ...] = ()  # ablation groups the row belongs to


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m examples.segmentation",
        description="Train a small segmenter on synthetic scenes (thin lines, rings, discs, "
                    "polygons on textured backgrounds) once per upsampler and seed - the same "
                    "network, data and seeds for every upsampler, only the upsampling stages "
                    "change - and compare mIoU and boundary IoU (mean ± std, paired difference "
                    "to bilinear with a t-based 95%% CI) and the cost columns. The defaults "
                    "are a small configuration (about five minutes on a 2-core CPU).",
        epilog="Writes <out>/results.json, results.csv (one row per upsampler), runs.csv (per "
               "seed), figures/*.png and checkpoints/. Several CPU devices: "
               "XLA_FLAGS=--xla_force_host_platform_device_count=4.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--decoder", type=model.parse_decoder, default=d.decoder,
                   help="decoder: " + ", ".join(model.DECODERS) + " (see model.py; "
                        "upsampler-only is the first version's network, with its caveat)")
    add_run_arguments(p, upsamplers=d.upsamplers, seeds=d.seeds, steps=d.steps,
                      batch_size=d.batch_size, image_size=d.image_size, val_size=d.val_size,
                      eval_every=d.eval_every, log_every=d.log_every, out=d.out)
    p.add_argument("--ablation", action="store_true",
                   help="run the Table-6 ablation (similarity, normaliser, K, embedding dim; "
                        "from SAPA-B) with bilinear as baseline, instead of --upsamplers")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--upsampler-lr-scale", type=float, default=d.upsampler_lr_scale,
                   help="learning rate of the upsamplers' own parameters (any learned "
                        "upsampler alike) relative to --lr")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--band-width", type=positive, default=d.band_width,
                   help="boundary IoU band: pixels within w pixels (Chebyshev) of another "
                        "ground-truth label")
    p.add_argument("--kernel-size", type=positive, default=d.kernel_size,
                   help="K of SAPA and CARAFE (odd)")
    p.add_argument("--embedding-dim", type=positive, default=d.embedding_dim,
                   help="SAPA query/key width (variants B, P, G and SAPA-D)")
    p.add_argument("--normalizer", default=d.normalizer,
                   help="SAPA's kernel normaliser: softmax, relu, sigmoid, softplus (none where "
                        "the installed core has it)")
    p.add_argument("--border", choices=("zeros", "valid"), default=d.border,
                   help="SAPA's border mode: zeros (out-of-map taps take part with logit 0 and "
                        "value 0, as the official kernels) or valid (they are left out)")
    return p


def parse_args(argv=None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    multiple = model.size_multiple(args.decoder)
    if args.image_size % multiple:
        parser.error(f"--image-size must be a multiple of {multiple} for the {args.decoder} "
                     f"decoder, got {args.image_size}")
    if args.kernel_size % 2 == 0:
        parser.error(f"--kernel-size must be odd, got {args.kernel_size}")
    if args.normalizer not in normalizers_available():
        parser.error(f"--normalizer must be one of {list(normalizers_available())}, got "
                     f"{args.normalizer!r}")
    if args.upsampler_lr_scale <= 0:
        parser.error(f"--upsampler-lr-scale must be > 0, got {args.upsampler_lr_scale}")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    check_unique(parser, seeds=args.seeds, upsamplers=args.upsamplers)
    try:
        training.check_batch_size(args.batch_size, jax.local_device_count())
    except ValueError as err:
        parser.error(str(err))
    val_size = math.ceil(args.val_size / args.batch_size) * args.batch_size
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return Config(**{**values, "val_size": val_size, "out": args.out.resolve()})


def normalizers_available() -> tuple[str, ...]:
    """SAPA normalisers of the installed core ("none" arrives with a later sapa_jax)."""
    return tuple(sapa_jax._checks.NORMALIZERS)


def experiments(cfg: Config) -> tuple[list[Experiment], list[dict]]:
    """The rows to train, and the ablation rows skipped because this build lacks them."""
    if not cfg.ablation:
        return [Experiment(u, u, cfg.kernel_size, cfg.embedding_dim, cfg.normalizer)
                for u in cfg.upsamplers], []
    rows = {"bilinear": Experiment("bilinear", "bilinear", 5, 32, "softmax", ("baseline",))}
    skipped = []
    for group, (field, values) in ABLATION.items():
        for value in values:
            setting = {**ABLATION_BASE, field: value}
            label = setting["upsampler"] + "".join(
                f" {short}={setting[key]}" for key, short in
                (("normalizer", "norm"), ("kernel_size", "K"), ("embedding_dim", "d"))
                if setting[key] != ABLATION_BASE[key])
            if setting["normalizer"] not in normalizers_available():
                skipped.append({"label": label, "group": group,
                                "reason": f"normalizer {setting['normalizer']!r} is not in "
                                          f"this build's sapa_jax"})
                continue
            if label in rows:
                rows[label] = dataclasses.replace(rows[label], groups=rows[label].groups + (group,))
            else:
                rows[label] = Experiment(label, setting["upsampler"], setting["kernel_size"],
                                         setting["embedding_dim"], setting["normalizer"], (group,))
    return list(rows.values()), skipped


# ----------------------------------------------------------------------------- training

@dataclasses.dataclass
class Trainer:
    """Jitted init / train / predict functions of one experiment (shared by all its seeds)."""
    net: model.Segmenter
    init: callable
    train_step: callable
    predict: callable


def make_net(cfg: Config, exp: Experiment) -> model.Segmenter:
    return model.Segmenter(cfg.decoder, exp.upsampler, data.NUM_CLASSES,
                           kernel_size=exp.kernel_size, embedding_dim=exp.embedding_dim,
                           normalizer=exp.normalizer, border=cfg.border)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """AdamW with warm-up + cosine; the upsamplers' parameters at `upsampler_lr_scale` x lr."""
    def make(scale):
        return training.warmup_cosine_adamw(cfg.lr * scale, cfg.steps, cfg.weight_decay)
    if cfg.upsampler_lr_scale == 1.0:
        return make(1.0)

    def labels(params):
        return {name: jax.tree_util.tree_map(
            lambda _: "upsampler" if model.is_upsampler_param([name]) else "rest", sub)
            for name, sub in params.items()}
    return optax.multi_transform({"upsampler": make(cfg.upsampler_lr_scale), "rest": make(1.0)},
                                 labels)


def make_trainer(cfg: Config, exp: Experiment, mesh) -> Trainer:
    net = make_net(cfg, exp)
    dummy = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)

    def loss(params, images, labels):
        logits = net.apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    init, train_step = training.jit_train_functions(
        lambda key: net.init(key, dummy)["params"], loss, make_optimizer(cfg), mesh,
        apply_fn=net.apply)

    @jax.jit
    def predict(params, images):
        return jnp.argmax(net.apply({"params": params}, images), axis=-1).astype(jnp.int32)

    return Trainer(net, init, train_step, predict)


def costs_of(trainer: Trainer, cfg: Config) -> dict:
    """Parameters and the FLOPs of a one-image forward (XLA cost analysis)."""
    params = jax.eval_shape(trainer.init, training.init_key(0)).params
    image = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return {"params": cost.param_count(params),
            "flops": cost.forward_flops(lambda p, x: trainer.net.apply({"params": p}, x),
                                        params, image)}


def predict_all(trainer: Trainer, params, mesh, images, batch_size: int) -> np.ndarray:
    chunks = []
    for start in range(0, len(images), batch_size):
        (chunk,) = training.shard_batch(mesh, images[start:start + batch_size])
        chunks.append(trainer.predict(params, chunk))
    return np.concatenate([np.asarray(c) for c in chunks])


def evaluate(trainer, params, mesh, val, cfg: Config) -> tuple[dict, np.ndarray]:
    images, labels = val
    pred = predict_all(trainer, params, mesh, images, cfg.batch_size)
    return metrics.segmentation_scores(pred, labels, data.NUM_CLASSES, cfg.band_width), pred


def run_name(label: str, seed: int) -> str:
    return f"{label.replace(' ', '_').replace('=', '')}_seed{seed}"


def train_run(cfg: Config, trainer: Trainer, exp: Experiment, seed: int, mesh, val,
              stop: training.StopFlag):
    """Train (or resume) one run; returns (record, state)."""
    loop = training.LoopConfig(cfg.steps, cfg.eval_every, cfg.log_every, cfg.batch_size,
                               cfg.resume)

    def scores(params):
        s, _ = evaluate(trainer, params, mesh, val, cfg)
        return {m: s[m] for m in METRICS}

    record, state = training.train_loop(
        exp.label, seed, loop, init=trainer.init, train_step=trainer.train_step,
        batch=lambda step: data.train_batch(seed, step, cfg.batch_size, cfg.image_size),
        evaluate=scores, mesh=mesh, ckpt_dir=cfg.out / "checkpoints" / run_name(exp.label, seed),
        stop=stop, mismatch_hint=" (was it written with another --decoder, --kernel-size or "
                                 "--embedding-dim?)")
    return {"label": exp.label, "upsampler": exp.upsampler, **record}, state


# ----------------------------------------------------------------------------- reporting

def table_metrics(cfg: Config) -> dict:
    return {"miou": "mIoU", "boundary_iou": f"boundary IoU, w={cfg.band_width}"}


# ----------------------------------------------------------------------------- main

def run(cfg: Config, stop: training.StopFlag | None = None) -> dict:
    """All runs of `cfg`; returns the results document (also written to `cfg.out`)."""
    stop = stop or training.StopFlag()
    out = prepare_output(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)
    devices = jax.local_devices()
    training.check_batch_size(cfg.batch_size, len(devices))
    mesh = training.make_mesh()
    val = data.validation_set(VAL_SEED, cfg.val_size, cfg.image_size)
    exps, skipped = experiments(cfg)
    for s in skipped:
        print(f"skipped {s['label']!r} ({s['group']}): {s['reason']}", file=sys.stderr)
    runs, costs, trained, interrupted = [], {}, {}, False
    started = time.perf_counter()
    for exp in exps:
        trainer = make_trainer(cfg, exp, mesh)
        costs[exp.label] = costs_of(trainer, cfg)
        for seed in cfg.seeds:
            if stop.requested:
                interrupted = True
                break
            record, state = train_run(cfg, trainer, exp, seed, mesh, val, stop)
            runs.append(record)
            if record["interrupted"]:
                interrupted = True
                break
            record["final"], pred = evaluate(trainer, state.params, mesh, val, cfg)
            if seed == cfg.seeds[0]:
                trained[exp.label] = (trainer.net, state.params, pred)
        if interrupted:
            break
    figure_paths = []
    if cfg.figures and trained and not interrupted:
        figure_paths = figures.all_figures(trained, val, out / "figures", cfg.seeds[0],
                                           cfg.band_width, runs)
    labels = [e.label for e in exps]
    extra = {e.label: {"ablation": list(e.groups)} for e in exps} if cfg.ablation else None
    rows = report.summarise(runs, labels, METRICS, costs, extra=extra)
    return report.write_all(
        out, cfg, runs, rows, interrupted=interrupted, started=started,
        figure_paths=figure_paths, run_metrics=RUN_METRICS,
        run_timings=("step_ms", "images_per_second"),
        flops_note="FLOPs of a one-image forward at --image-size, XLA cost analysis of the "
                   "jnp formulation",
        ci_method="Student-t 95% interval of the per-seed paired difference", skipped=skipped)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    exps, _ = experiments(cfg)

    def table(rows: list[dict]) -> str:
        return (report.format_table(rows, table_metrics(cfg)) + "\n(mean ± sample std over "
                "seeds, n/a for one seed; difference to bilinear paired by seed with a "
                "Student-t 95% CI; params/FLOPs added over bilinear)")

    return run_main(
        cfg, run, f"decoder {cfg.decoder}; {len(exps)} "
                  f"{'ablation setting' if cfg.ablation else 'upsampler'}(s) x "
                  f"{len(cfg.seeds)} seed(s), {cfg.steps} steps, batch {cfg.batch_size}, "
                  f"{cfg.image_size}x{cfg.image_size}", table)

"""argparse helpers and the command-line arguments every example shares."""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import sapa_jax

from . import outputs, training
from . import upsamplers as ups


def comma_list(kind: Callable[[str], Any], text: str) -> tuple:
    """`"a,b,c"` -> `(kind("a"), kind("b"), kind("c"))`; argparse error on an empty list."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    try:
        return tuple(kind(t) for t in items)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add_run_arguments(p: argparse.ArgumentParser, *, upsamplers: Sequence[str],
                      seeds: Sequence[int], steps: int, batch_size: int, image_size: int,
                      val_size: int, eval_every: int, log_every: int, out: Path) -> None:
    """The arguments of every example, with that example's defaults:

    --upsamplers --seeds --steps --batch-size --image-size --val-size --eval-every --log-every
    --out --overwrite --resume --no-figures (sets `figures`).
    """
    p.add_argument("--upsamplers", type=functools.partial(comma_list, ups.parse_upsampler),
                   default=tuple(upsamplers),
                   help="comma-separated subset of " + ",".join(ups.UPSAMPLERS))
    p.add_argument("--seeds", type=functools.partial(comma_list, int), default=tuple(seeds),
                   help="comma-separated seeds; seed s fixes the initialisation and the "
                        "training data of its run, the same for every upsampler")
    p.add_argument("--steps", type=positive, default=steps, help="training steps per run")
    p.add_argument("--batch-size", type=positive, default=batch_size,
                   help="global batch size; must be divisible by the number of devices")
    p.add_argument("--image-size", type=positive, default=image_size,
                   help="image height and width")
    p.add_argument("--val-size", type=positive, default=val_size,
                   help="validation images (rounded up to a multiple of --batch-size)")
    p.add_argument("--eval-every", type=positive, default=eval_every,
                   help="validate and checkpoint every this many steps (and at the end)")
    p.add_argument("--log-every", type=positive, default=log_every,
                   help="refresh loss and throughput on the progress bar every this many steps")
    p.add_argument("--out", type=Path, default=out, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run's output folder (--out) and start afresh")
    p.add_argument("--resume", action="store_true",
                   help="continue each run from its latest checkpoint in --out")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="skip the PNG figures")


def check_unique(parser: argparse.ArgumentParser, **lists: Sequence) -> None:
    """parser.error if one of the named lists repeats an entry."""
    for name, values in lists.items():
        if len(set(values)) != len(values):
            parser.error(f"--{name.replace('_', '-')} must not repeat an entry, got "
                         f"{','.join(map(str, values))}")


def run_main(cfg: Any, run: Callable[[Any, Any], dict], describe: str,
             table: Callable[[list[dict]], str]) -> int:
    """The `main` of an example: print what will run, `run(cfg, stop)` under a StopFlag, then
    the summary table, the output paths and the wall time.

    describe follows the device / SAPA-core header (e.g. "3 upsampler(s) x 2 seed(s), ...");
    table(rows) formats the summary rows. Returns the exit status: 0, 2 when the output folder
    exists (without --overwrite / --resume), training.EXIT_INTERRUPTED after Ctrl-C.
    """
    devices = jax.local_devices()
    print(f"{len(devices)} {devices[0].platform} device(s); SAPA core: "
          f"{sapa_jax.core.resolve_impl('auto', jnp.float32)}; {describe}; output: {cfg.out}")
    try:
        with training.StopFlag() as stop:
            result = run(cfg, stop)
    except outputs.OutputExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nAborted (second Ctrl-C); checkpoints written so far are kept. "
              "Rerun with --resume to continue.", file=sys.stderr)
        return training.EXIT_INTERRUPTED
    if result["summary"]:
        print()
        print(table(result["summary"]))
    print(f"\nResults: {result['paths']['json']}\n         {result['paths']['csv']}"
          f"\n         {result['paths']['runs_csv']}")
    if result["figures"]:
        print(f"Figures: {cfg.out / 'figures'} ({len(result['figures'])} PNG files)")
    print(f"Wall time: {result['wall_seconds']:.0f} s")
    if result["interrupted"]:
        print("Interrupted: checkpoints saved; rerun the same command with --resume to continue.",
              file=sys.stderr)
        return training.EXIT_INTERRUPTED
    return 0

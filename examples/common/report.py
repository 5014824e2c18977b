"""Summary rows per upsampler, results.json / results.csv, and the printed table.

A *run* is a dict with at least `label` (the upsampler, or an ablation setting), `seed` and,
once finished, `final` (metric name -> value) and `step_ms`. `summarise` turns the runs into
one row per label:

    upsampler, seeds, <m>_mean, <m>_std            for every metric m (std None for one seed)
    params, params_added, flops, flops_added       from `costs` (added = minus the baseline's)
    step_ms                                        mean train-step time over the seeds
    <m>_diff_vs_<baseline>                         {"mean", "ci95": [low, high]}, paired by seed
                                                   (every row but the baseline's)

In results.csv a difference becomes three columns, `<m>_diff_vs_<baseline>` (the mean),
`..._ci95_low` and `..._ci95_high`; undefined values are written "n/a".
"""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sapa_jax

from . import stats

BASELINE = "bilinear"


def summarise(runs: Sequence[dict], labels: Sequence[str], metrics: Sequence[str],
              costs: Mapping[str, dict] | None = None, baseline: str = BASELINE,
              extra: Mapping[str, dict] | None = None) -> list[dict]:
    """One row per label with finished runs (see the module docstring).

    costs[label] may hold `params`, `flops`; extra[label] is merged into the row first (e.g.
    the upsampler name and the ablation setting of a label).
    """
    costs, extra = costs or {}, extra or {}
    finished = {lab: {r["seed"]: r for r in runs if r["label"] == lab and "final" in r}
                for lab in labels}
    base = finished.get(baseline, {})
    rows = []
    for lab in labels:
        done = finished[lab]
        if not done:
            continue
        row = {"upsampler": lab, **extra.get(lab, {}), "seeds": len(done)}
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = stats.mean_std([r["final"][m]
                                                                 for r in done.values()])
        cost = costs.get(lab, {})
        for col in ("params", "flops"):
            value = cost.get(col)
            row[col] = value
            ref = costs.get(baseline, {}).get(col)
            row[f"{col}_added"] = None if value is None or ref is None else value - ref
        times = [r["step_ms"] for r in done.values() if r.get("step_ms") is not None]
        row["step_ms"] = float(np.mean(times)) if times else None
        if lab != baseline:
            for m in metrics:
                diff = stats.paired_difference({s: r["final"][m] for s, r in done.items()},
                                               {s: r["final"][m] for s, r in base.items()})
                row[f"{m}_diff_vs_{baseline}"] = (None if diff is None else
                                                  {"mean": diff["mean"], "ci95": diff["ci95"]})
        rows.append(row)
    return rows


def _flat(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            ci = value.get("ci95") or [None, None]
            out[key], out[f"{key}_ci95_low"], out[f"{key}_ci95_high"] = value["mean"], *ci
        else:
            out[key] = value
    return {k: "n/a" if v is None else v for k, v in out.items()}


def write_results(out: Path, doc: dict, rows: Sequence[dict]) -> dict[str, Path]:
    """`doc` (with `summary` = rows) to out/results.json, the rows to out/results.csv."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv"}
    paths["json"].write_text(json.dumps({**doc, "summary": list(rows)}, indent=2,
                                        allow_nan=False) + "\n")
    flat = [_flat(r) for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r)) or ["upsampler"]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(flat)
    return paths


def format_table(rows: Sequence[dict], metrics: Mapping[str, str],
                 baseline: str = BASELINE) -> str:
    """Plain-text table in percent: mean ± std, paired difference [95% CI], costs.

    metrics maps metric keys to column titles.
    """
    head = [("upsampler", 14), ("seeds", 5)]
    for title in metrics.values():
        head += [(f"{title} (%)", 16), (f"vs {baseline} [95% CI]", 24)]
    head += [("params +", 9), ("MFLOPs +", 9), ("step ms", 8)]
    lines = ["  ".join(f"{t:>{w}}" if i else f"{t:<{w}}" for i, (t, w) in enumerate(head))]
    lines.append("-" * len(lines[0]))
    for r in rows:
        cells = [r["upsampler"], str(r["seeds"])]
        for m in metrics:
            cells.append(stats.format_mean_std(r[f"{m}_mean"], r[f"{m}_std"]))
            cells.append(stats.format_difference(r.get(f"{m}_diff_vs_{baseline}")) or "-")
        cells.append("n/a" if r.get("params_added") is None else f"{r['params_added']:+d}")
        cells.append("n/a" if r.get("flops_added") is None else f"{r['flops_added'] / 1e6:+.1f}")
        cells.append("n/a" if r.get("step_ms") is None else f"{r['step_ms']:.1f}")
        lines.append("  ".join(f"{c:>{w}}" if i else f"{c:<{w}}"
                               for i, (c, (_, w)) in enumerate(zip(cells, head))))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], metrics: Mapping[str, str],
                   baseline: str = BASELINE) -> str:
    """The rows as a Markdown table (percent; difference to the baseline with its 95% CI and
    the verdict: better / worse when the CI excludes 0, tie otherwise)."""
    head = ["upsampler", "seeds"]
    for title in metrics.values():
        head += [f"{title} (%)", f"Δ vs {baseline} [95% CI]"]
    head += ["params added", "MFLOPs added", "step (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["upsampler"], str(r["seeds"])]
        for m in metrics:
            cells.append(stats.format_mean_std(r[f"{m}_mean"], r[f"{m}_std"]))
            diff = r.get(f"{m}_diff_vs_{baseline}")
            cells.append(f"{stats.format_difference(diff)} {stats.verdict(diff)}" if diff
                         else "-")
        cells.append("n/a" if r.get("params_added") is None else f"{r['params_added']:+,d}")
        cells.append("n/a" if r.get("flops_added") is None else f"{r['flops_added'] / 1e6:+.1f}")
        cells.append("n/a" if r.get("step_ms") is None else f"{r['step_ms']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_runs_csv(path: Path, runs: Sequence[dict], metrics: Sequence[str],
                   timings: Sequence[str] = ("step_ms",)) -> None:
    """One row per finished run: label, seed, step, its final metrics and its timings."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["upsampler", "seed", "step", *metrics, *timings])
        for r in runs:
            if "final" in r:
                writer.writerow([r["label"], r["seed"], r["step"],
                                 *(r["final"][m] for m in metrics), *(r[t] for t in timings)])


def write_all(out: Path, cfg: Any, runs: Sequence[dict], rows: Sequence[dict], *,
              interrupted: bool, started: float, figure_paths: Sequence[Path],
              run_metrics: Sequence[str], run_timings: Sequence[str] = ("step_ms",),
              **notes: Any) -> dict:
    """The results document of an example's `run`, written to out/results.json, results.csv
    and runs.csv; returns it with `summary` (= rows) and `paths` (name -> str path).

    cfg is the example's Config dataclass (paths written as strings); `started` is the
    time.perf_counter() value when training began; `notes` (e.g. what the metrics mean) go
    into the document after `wall_seconds`.
    """
    devices = jax.local_devices()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    doc = {"config": config, "devices": len(devices), "platform": devices[0].platform,
           "sapa_core": sapa_jax.core.resolve_impl("auto", jnp.float32),
           "interrupted": interrupted, "wall_seconds": round(time.perf_counter() - started, 1),
           **notes, "figures": [str(p) for p in figure_paths], "runs": list(runs)}
    paths = write_results(out, doc, rows)
    paths["runs_csv"] = out / "runs.csv"
    write_runs_csv(paths["runs_csv"], runs, run_metrics, run_timings)
    return {**doc, "summary": list(rows), "paths": {k: str(v) for k, v in paths.items()}}

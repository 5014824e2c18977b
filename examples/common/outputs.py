"""Safe output folders: a rerun never silently mixes with, or deletes, an earlier run.

The rule (`prepare_output`):

* a missing or empty folder is created and marked as an example run (a `.example-run` file);
* `resume=True` keeps the folder as it is (the runs continue from their checkpoints; results
  and figures are rewritten at the end);
* `overwrite=True` deletes the folder and starts afresh, but only if it carries the marker, so
  a mistyped `--out` cannot wipe an unrelated directory;
* anything else (a non-empty folder, neither flag) raises `OutputExistsError` naming the
  folder and the three ways out (--resume, --overwrite, another --out).
"""
from __future__ import annotations

import shutil
from pathlib import Path

MARKER = ".example-run"


class OutputExistsError(ValueError):
    """The output folder holds an earlier run and neither --resume nor --overwrite was given."""


def prepare_output(out: Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Makes `out` ready for a run (see the module docstring); returns it as an absolute path."""
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: --overwrite deletes the "
                         "checkpoints that --resume would continue from")
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a folder")
    contents = [p for p in out.iterdir() if p.name != MARKER] if out.is_dir() else []
    if contents and not resume:
        if not overwrite:
            raise OutputExistsError(
                f"--out {out} already holds an earlier run ({len(contents)} entries, e.g. "
                f"{sorted(p.name for p in contents)[:3]}); pass --resume to continue it, "
                f"--overwrite to delete it and start afresh, or choose another --out")
        if not (out / MARKER).exists():
            raise OutputExistsError(
                f"--out {out} is not empty and was not written by an example (no {MARKER} "
                f"file): refusing to delete it even with --overwrite; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    return out

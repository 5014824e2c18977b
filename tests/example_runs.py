"""Run an example's CLI (`python -m examples.<name>`) in a subprocess on fake CPU devices, as the
example tests do; stdout and stderr go to files next to `log`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(example: str, args, log: Path, devices: int = 1) -> subprocess.Popen:
    """Starts `python -m examples.<example> ARGS` on `devices` fake CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        return subprocess.Popen([sys.executable, "-m", f"examples.{example}", *args],
                                cwd=REPO, env=env, stdout=out, stderr=err)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> dict:
    """Waits for `proc` (killed after `timeout` s): its return code and captured output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"rc": proc.returncode, "stdout": log.with_suffix(".out").read_text(),
            "stderr": log.with_suffix(".err").read_text()}

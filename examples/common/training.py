"""Data-parallel jit training: the train step, the loop, checkpoints, Ctrl-C, seeds.

* `make_mesh`, `shard_batch`: a 1-D mesh named "data" over all local devices; batches are split
  along it, parameters and optimiser state replicated (`jax.jit` inserts the all-reduce).
* `jit_train_functions(init_params, loss, tx, mesh)`: jitted `init(key) -> TrainState` and
  `train_step(state, *batch) -> (state, loss)` (the state donated: updated in place).
* `train_loop(...)`: one run. Checkpoints (orbax) at every validation and at the end; `resume`
  continues from the latest (a finished run is only re-evaluated); the first Ctrl-C
  (`StopFlag`) checkpoints at the step boundary and stops, a second one aborts at once. Its
  record holds the history, the step time `step_ms` (mean over timed steps: compilation, the
  first step and validation excluded) and throughput.
* Seeds: `init_key(seed)` is the initialisation stream of run `seed`; the examples' data
  modules draw the training batch of step t from `(seed, t)` alone, so every upsampler of a
  seed sees the same initial key and the same batches, and a resumed run the same data.
"""
from __future__ import annotations

import dataclasses
import functools
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

EXIT_INTERRUPTED = 130  # the shell's convention for "stopped by SIGINT"


def init_key(seed: int) -> jax.Array:
    """The initialisation key of run `seed`.

    "rbg": partitionable threefry makes XLA spend seconds compiling initialisers on CPU.
    """
    return jax.random.key(seed, impl="rbg")


def make_mesh() -> Mesh:
    """1-D mesh "data" over all local devices."""
    return Mesh(np.array(jax.local_devices()), ("data",))


def check_batch_size(batch_size: int, device_count: int) -> None:
    """The batch axis is split evenly over the devices of the mesh."""
    if batch_size % device_count:
        raise ValueError(
            f"--batch-size must be divisible by the number of devices ({device_count}) to "
            f"shard the batch evenly, got {batch_size}; use e.g. "
            f"{max(device_count, batch_size // device_count * device_count)}")


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Host NumPy arrays -> global arrays split along the batch axis over the mesh."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return tuple(jax.device_put(a, sharding) for a in arrays)


def warmup_cosine_adamw(lr: float, steps: int, weight_decay: float) -> optax.GradientTransformation:
    """AdamW, linear warm-up over 5% of the steps, cosine decay to 1% of `lr`."""
    warmup = max(1, steps // 20)
    # decay_steps counts the warm-up too; at least one decay step (a 1-step smoke run).
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1), end_value=lr * 0.01)
    return optax.adamw(schedule, weight_decay=weight_decay)


def jit_train_functions(init_params: Callable[[jax.Array], Any],
                        loss: Callable[..., jax.Array], tx: optax.GradientTransformation,
                        mesh: Mesh, apply_fn: Callable | None = None):
    """Jitted `(init, train_step)`.

    init_params(key) -> params; loss(params, *batch) -> scalar. `init(key)` returns a
    replicated `TrainState`; `train_step(state, *batch)` (batch sharded along "data") returns
    `(state, loss)`.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    @functools.partial(jax.jit, out_shardings=replicated)
    def init(key):
        return train_state.TrainState.create(apply_fn=apply_fn, params=init_params(key), tx=tx)

    @jax.jit
    def _step(state, *batch):
        value, grads = jax.value_and_grad(loss)(state.params, *batch)
        return state.apply_gradients(grads=grads), value

    # Donating the state lets XLA update parameters in place.
    step = jax.jit(_step, out_shardings=(replicated, replicated), donate_argnums=0)
    return init, step


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


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The schedule of one run: steps, validation/checkpoint cadence, progress-bar refresh."""
    steps: int
    eval_every: int
    log_every: int
    batch_size: int
    resume: bool = False


def train_loop(name: str, seed: int, loop: LoopConfig, *, init: Callable, train_step: Callable,
               batch: Callable[[int], Sequence[np.ndarray]],
               evaluate: Callable[[Any], dict], mesh: Mesh, ckpt_dir: Path,
               stop: StopFlag, mismatch_hint: str = "") -> tuple[dict, Any]:
    """Trains (or resumes) one run; returns `(record, state)`.

    batch(step) gives the host arrays of that step; evaluate(params) a dict of scalar scores
    (logged into `history` with the step and loss). `record["interrupted"]` when stopped.
    """
    manager = ocp.CheckpointManager(Path(ckpt_dir), options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True))
    key = init_key(seed)
    history, start = [], 0
    if loop.resume and manager.latest_step() is not None:
        start = manager.latest_step()
        abstract = init.eval_shape(key)  # shapes, dtypes and shardings to restore into
        try:
            restored = manager.restore(start, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
        except (ValueError, KeyError) as err:
            raise SystemExit(
                f"error: the checkpoint at step {start} in {ckpt_dir} does not fit this "
                f"configuration{mismatch_hint}; drop --resume or choose another --out. "
                f"({type(err).__name__}: {err})") from None
        state, history = restored.state, list(restored.history)
    else:
        state = init(key)

    def save(step):
        if manager.latest_step() != step:
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)))

    step, interrupted, loss_value = start, False, float("nan")
    bar = tqdm(total=loop.steps, initial=start, desc=f"{name} seed {seed}", unit="step",
               dynamic_ncols=True)
    clock = time.perf_counter
    first_step_seconds = None  # the first step of this process includes compilation
    timed_seconds, timed_steps = 0.0, 0
    t_window, n_window = clock(), 0
    try:
        while step < loop.steps:
            if stop.requested:
                interrupted = True
                break
            state, loss = train_step(state, *shard_batch(mesh, *batch(step)))
            step += 1
            n_window += 1
            bar.update(1)
            evaluate_now = step % loop.eval_every == 0 or step == loop.steps
            if first_step_seconds is None or evaluate_now or step % loop.log_every == 0:
                loss_value = float(loss)  # waits for the step: throughput measured, not queued
                now = clock()
                if first_step_seconds is None:
                    first_step_seconds = now - t_window
                else:
                    timed_seconds += now - t_window
                    timed_steps += n_window
                    bar.set_postfix(loss=f"{loss_value:.3f}",
                                    img_s=f"{n_window * loop.batch_size / (now - t_window):.1f}")
                t_window, n_window = now, 0
            if evaluate_now:
                scores = evaluate(state.params)
                history.append({"step": step, "loss": loss_value, **scores})
                bar.write(f"  {name} seed {seed} step {step}: loss {loss_value:.4f}  " + "  ".join(
                    f"{k} {v:.4f}" for k, v in scores.items()))
                save(step)
                t_window = clock()  # validation is not training time
        if step > start:
            save(step)
    finally:  # on a second Ctrl-C the state may be mid-step (donated): keep older checkpoints
        bar.close()
        manager.wait_until_finished()
        manager.close()
    record = {"seed": seed, "start_step": start, "step": step, "interrupted": interrupted,
              "history": history, "checkpoint": str(ckpt_dir),
              "first_step_seconds": None if first_step_seconds is None
              else round(first_step_seconds, 2),
              "step_ms": round(1000 * timed_seconds / timed_steps, 3) if timed_steps else None,
              "images_per_second": round(timed_steps * loop.batch_size / timed_seconds, 1)
              if timed_steps else None}
    return record, state

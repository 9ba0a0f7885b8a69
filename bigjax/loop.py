"""The training loop's own pieces (bigjax/train.py runs the loop): the NaN policy, when
something every N steps is due, and the host side of a finished step (finiteness, throughput,
logging)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from bigjax import metrics, models, privacy
from bigjax.config import TrainConfig
from bigjax.errors import RunFailed
from bigjax.program import Program
from bigjax.rundir import RunDir

MAX_ROLLBACKS = 5


class NonFiniteError(RunFailed, RuntimeError):
    """Training produced a non-finite loss or gradient under nan_policy='error'."""


def every(step: int, n: int) -> bool:
    """Whether something done every `n` steps (0: never) is due at `step`."""
    return bool(n) and step % n == 0


def eval_missed(run: RunDir, step: int, cfg: TrainConfig) -> bool:
    """Whether `step` was due an eval that the run's metrics do not hold: a stop during that
    eval left it unfinished, and the run saved and stopped. Process 0 (the file's one writer)
    reads the file; every process gets its answer, since all must run the same eval."""
    if not (step == cfg.num_steps or every(step, cfg.eval.every_steps)):
        return False
    found = metrics.last_logged(run.writers.path, "eval_loss", step)
    missed = found is None or found[0] != step
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        missed = bool(multihost_utils.broadcast_one_to_all(np.int32(missed)))
    return missed


def nan_verdict(policy: str, bad_step: int, latest: Mapping[str, float], rollbacks: int) -> None:
    """The NaN policy on a non-finite step (nan_policy 'skip' dropped it on device): 'error'
    raises NonFiniteError, and so does 'rollback' past MAX_ROLLBACKS; otherwise the caller
    rolls back to the last checkpoint and skips the step's batch."""
    where = (
        f"at step {bad_step} (loss {latest.get('loss')}, grad_norm {latest.get('grad_norm')}, "
        f"param_norm {latest.get('param_norm')})"
    )
    if policy == "error":
        raise NonFiniteError(
            f"non-finite loss or gradient {where} (the check covers the updated parameters "
            "and, at saves, the optimizer moments); nothing of it was saved. Lower optim.lr, "
            "keep optim.clip_norm on, or set nan_policy=skip or rollback."
        )
    if rollbacks > MAX_ROLLBACKS:
        raise NonFiniteError(f"gave up after {MAX_ROLLBACKS} rollbacks; last {where}.")


@dataclasses.dataclass
class Window:
    """Throughput accounting between two logged steps."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: float = 0.0
    data_wait: float = 0.0
    dispatch: float = 0.0  # host time inside the steps' calls (the whole step, if run inline)


@dataclasses.dataclass
class StepLog:
    """Host side of finished steps: finiteness, the throughput window, the logged rows.

    The device runs one step ahead: a step's metrics are fetched when the next step has been
    dispatched, so `finish` is called one step late (and the window starts at that fetch)."""

    cfg: TrainConfig
    writers: metrics.Writers
    flops_per_step: float
    peak_flops: float
    accounting: Any  # privacy accounting, or None
    warn: bool  # this process prints warnings
    window: Window = dataclasses.field(default_factory=Window)
    compile_s: float | None = None
    skipped_steps: int = 0
    peak_doubted: bool = False  # an MFU over 100 % was measured: the peak is wrong
    last: dict[str, Any] = dataclasses.field(default_factory=dict)  # the last logged row
    latest: dict[str, float] = dataclasses.field(default_factory=dict)  # the last finished

    @classmethod
    def resumed(cls, prog: Program, run: RunDir, peak_flops: float, start: int) -> StepLog:
        """The log of a run (re)started at `start`, its skipped steps counted over every
        launch (the rows after `start` were dropped when the run directory was opened)."""
        cfg = prog.cfg
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        flops_per_token = models.FLOPS_PER_TOKEN[cfg.model.family](cfg.model, cfg.data.seq_len)
        log = cls(cfg, run.writers, flops_per_token * tokens_per_step, peak_flops,
                  prog.resources.accounting, warn=run.writer)  # fmt: skip
        skipped = metrics.last_logged(run.writers.path, "skipped_steps", start)
        log.skipped_steps = skipped[1] if skipped else 0
        return log

    def possible_mfu(self, step_time: float) -> float | None:
        """MFU of a step of `step_time`, or None once one came out above 100 %: no device
        beats its peak, so that peak is wrong (warned once) and no MFU is logged from it."""
        mfu = self.flops_per_step / step_time / self.peak_flops
        if mfu > 1.0 and not self.peak_doubted:
            self.peak_doubted = True
            if self.warn:
                print(_impossible_mfu_warning(mfu, self.peak_flops), flush=True)
        return None if self.peak_doubted else mfu

    def finish(
        self, done_step: int, device_metrics: dict[str, jax.Array], dispatch_s: float = 0.0
    ) -> bool:
        """Fetches, checks and (every log_every steps) logs one step; returns whether the step
        was finite. `dispatch_s`: host time the step's call took."""
        cfg = self.cfg
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        # The device finished this step now and already runs the next: the next window
        # starts here, not after the logging below (which would shorten it, MFU > 100 %).
        fetched = time.perf_counter()
        self.latest.update(host, step=done_step)
        finite = bool(host.pop("finite"))
        if not finite and cfg.nan_policy == "skip" and self.warn:
            print(
                f"warning: step {done_step} skipped: non-finite loss, gradient or updated "
                f"parameters (loss {host['loss']}, grad_norm {host['grad_norm']}, "
                f"param_norm {host['param_norm']}); the update was dropped.",
                flush=True,
            )
        self.skipped_steps += not finite and cfg.nan_policy == "skip"
        window = self.window
        window.steps += 1
        window.tokens += host.pop("tokens")
        window.dispatch += dispatch_s
        first = self.compile_s is None
        if first:  # includes compilation: logged, but kept out of the throughput window
            self.compile_s = fetched - window.start
        if not (every(done_step, cfg.metrics.log_every) or done_step == cfg.num_steps or first):
            return finite
        # A step the backend ran inside its call (inline, not dispatched) had finished before
        # the previous step's metrics were fetched: at a save, where two fetches follow each
        # other, the fetch times then bound none of its work. The calls' own time does.
        elapsed = max(fetched - window.start, window.dispatch)
        step_time = elapsed / window.steps
        row = {
            "step": done_step,
            **host,
            "tokens_per_sec": None if first else window.tokens / elapsed,
            "step_time": None if first else step_time,
            "mfu": None if first else self.possible_mfu(step_time),
            "eta_s": None if first else step_time * (cfg.num_steps - done_step),
            "compile_s": self.compile_s,
            # host time blocked on the input pipeline, per step and as a share
            "data_wait_s": window.data_wait / window.steps,
            "data_wait_frac": None if first else window.data_wait / elapsed,
            "skipped_steps": self.skipped_steps,
        }
        if self.accounting is not None:  # the privacy spent so far (dp-accounting, RDP)
            row["dp_epsilon"] = privacy.epsilon(self.accounting, done_step)
            row["dp_noise_multiplier"] = self.accounting.noise_multiplier
        self.writers.write(row, metrics.progress_line(row, cfg.num_steps))
        self.last = row
        self.window = Window(start=fetched)
        return finite


def _impossible_mfu_warning(mfu: float, peak: float) -> str:
    return (
        f"warning: measured MFU {mfu:.0%} is impossible, so the peak it divides by is wrong: "
        f"{peak:.3g} FLOP/s (on CPU measured at start, by a matmul that other processes may "
        "have slowed). MFU is logged as null from here; set metrics.peak_flops to the "
        "devices' real peak."
    )

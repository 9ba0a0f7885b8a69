"""The pieces of the training loop that are not the loop: evaluation, stop signals, the host
side of a finished step (finiteness, throughput, logging), the run summary."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

import bigjax
from bigjax import (
    checkpoint,
    choices,
    distributed,
    loading,
    lora,
    metrics,
    models,
    privacy,
    progress,
    runlock,
)
from bigjax.config import ConfigError, TrainConfig, advice
from bigjax.data import pipeline
from bigjax.errors import RunFailed
from bigjax.program import Program

MAX_ROLLBACKS = 5


class NonFiniteError(RunFailed, RuntimeError):
    """Training produced a non-finite loss or gradient under nan_policy='error'."""


def run_eval(prog: Program, params: Any, bar: progress.Bar | None = None) -> dict[str, float]:
    """Loss and perplexity over the first `eval.num_batches` batches of the held-out split,
    read in a fixed order so every eval of every run sees the same tokens; `bar` counts the
    batches (`bigjax eval`; a training run's evals print one line instead)."""
    cfg = prog.cfg
    it = pipeline.for_config(
        cfg.data,
        split="validation",
        seed=0,
        rows=prog.local_rows(),
        shuffle=False,
        workers=0,
        image_shape=(cfg.model.image_size, cfg.model.channels),
    )
    nll, weight, adv = 0.0, 0.0, 0.0
    confusion = np.zeros((0, 0))  # [true class, predicted class], summed over batches
    for local in pipeline.take(it, cfg.eval.num_batches):
        out = jax.device_get(prog.eval_step(params, prog.to_global(local)))
        nll, weight = nll + float(out["nll_sum"]), weight + float(out["weight_sum"])
        if "confusion" in out:
            confusion = out["confusion"] + (confusion if confusion.size else 0.0)
        adv = adv + float(out.get("adv_nll_sum", 0.0))
        if bar is not None:
            bar.advance()
    getattr(it, "close", lambda: None)()
    loss = nll / max(weight, 1.0)
    row = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    if cfg.robust.eval_attack != "none":  # the loss under the embedding-space attack
        row["eval_adv_loss"] = adv / max(weight, 1.0)
    if cfg.data.task in ("classify", "images"):  # accuracy, macro precision / recall / F1
        row.update(choices.classification_metrics(confusion))
    return row


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, str]]:
    """SIGTERM (preemption), SIGINT (Ctrl-C) and SIGHUP (the terminal hung up: a closed
    laptop lid, a dropped SSH session) ask the loop to save and stop after the step in flight,
    instead of killing it. A second Ctrl-C interrupts at once. Repeated SIGTERMs do not:
    schedulers resend preemption notices, and PR_SET_PDEATHSIG fires once per reparenting as a
    dying parent's threads exit, and aborting the checkpoint save they asked for would lose the
    work they meant to keep. Once a stop was asked the process is on its way out, so SIGTERM
    and SIGHUP stay ignored after the loop: a resent notice can no longer kill it between the
    final save and exit.

    SIGHUP: libtpu sets it to be ignored when it starts (in C, which Python's own record of
    the handler does not see), so a hangup went unnoticed until the next write to the dead
    terminal killed the run. Taking it over restores what a terminal user expects, unless the
    process started with it ignored (`nohup`): then the user asked for that, and it stays."""
    asked: dict[str, str] = {}
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return
    signals = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signals.append(signal.SIGHUP)

    def handle(signum: int, frame: Any) -> None:
        if asked and signum == signal.SIGINT:
            asked["now"] = "yes"  # for `interrupt_if_asked`, should this raise be swallowed
            raise KeyboardInterrupt
        if signum == signal.SIGHUP:
            detach_terminal()
        asked.setdefault("signal", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield asked
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if asked and s != signal.SIGINT else handler)


def interrupt_if_asked(asked: dict[str, str]) -> None:
    """Raises the second Ctrl-C's KeyboardInterrupt again if it was lost. A signal handler's
    exception is raised wherever the main thread is, and where that is a callback run by the
    interpreter (jax's garbage-collection hook, a weakref finaliser), Python prints "Exception
    ignored" and goes on: the run then saved and exited 0 as if asked once (seen in the
    second-Ctrl-C test, about 1 run in 20). The loop calls this before each step and save."""
    if "now" in asked:
        raise KeyboardInterrupt


def detach_terminal() -> None:
    """Points the standard streams that are a terminal at /dev/null: after a hangup, every
    write to the terminal fails (EIO), from Python and from native code alike. Redirected
    streams (a log file, a pipe) are left as they are."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            with contextlib.suppress(OSError):
                if os.isatty(fd):
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)


@dataclasses.dataclass
class Window:
    """Throughput accounting between two logged steps."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: float = 0.0
    data_wait: float = 0.0
    dispatch: float = 0.0  # host time inside the steps' calls (the whole step, if run inline)


def write_summary(workdir: Path, summary: dict[str, Any], wall_s: float) -> None:
    """`summary.json`: where the run stands, for sweeps and `bigjax report`. Wall time adds up
    over resumes (a run killed with SIGKILL loses that attempt's time)."""
    path = workdir / "summary.json"
    try:
        before = json.loads(path.read_text()).get("wall_s", 0.0) if path.exists() else 0.0
    except ValueError:  # damaged: this launch's time is what is known
        before = 0.0
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(metrics.json_text({**summary, "wall_s": before + wall_s}, indent=2) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a file
    except OSError as e:
        raise metrics.unwritable(path, e) from e


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
        if done_step % cfg.metrics.log_every and done_step != cfg.num_steps and not first:
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


def run_summary(
    cfg: TrainConfig, workdir: Path, step: int, skipped_steps: int, num_params: int
) -> dict[str, Any]:
    """What summary.json says of the run at `step`. Its final eval comes from metrics.jsonl,
    which holds every launch's rows, so a relaunch that trains nothing (the run was complete,
    or a sweep retried a finished trial) keeps the eval of the launch that made it."""
    evaluated = metrics.last_logged(workdir / "metrics.jsonl", "eval_loss", step)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_token = models.FLOPS_PER_TOKEN[cfg.model.family](cfg.model, cfg.data.seq_len)
    return {
        "step": step,
        "num_steps": cfg.num_steps,
        "complete": step >= cfg.num_steps,
        "eval_loss": evaluated[1] if evaluated and evaluated[0] == step else None,
        "num_params": num_params,
        "tokens": step * tokens_per_step,
        "flops": step * tokens_per_step * flops_per_token,
        "skipped_steps": skipped_steps,
    }


def _impossible_mfu_warning(mfu: float, peak: float) -> str:
    return (
        f"warning: measured MFU {mfu:.0%} is impossible, so the peak it divides by is wrong: "
        f"{peak:.3g} FLOP/s (on CPU measured at start, by a matmul that other processes may "
        "have slowed). MFU is logged as null from here; set metrics.peak_flops to the "
        "devices' real peak."
    )


def keep_only_the_error(workdir: Path) -> Callable[..., bool]:
    """An exit callback (ExitStack.push) for a run started in an empty workdir: if it fails
    before its first checkpoint, what it wrote (config, metrics, TensorBoard events, empty
    checkpoint directories) is removed and error.log says what happened, so a failed launch
    leaves no half-run behind to mistake for a real one."""

    def on_exit(kind: type | None, error: BaseException | None, tb: Any) -> bool:
        steps = workdir / "checkpoints"
        if error is None or (steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir())):
            return False
        # Best effort: a directory that became read-only keeps what it holds, and the error
        # that ended the run is what the user sees, not one of cleaning up after it.
        with contextlib.suppress(OSError):
            for path in workdir.iterdir():
                if path.name == runlock.LOCK_NAME:
                    continue  # still held: released (emptied) right after this
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            text = "".join(traceback.format_exception(kind, error, tb))
            (workdir / "error.log").write_text(f"bigjax: error: {error}\n\n{text}")
        return False  # the error goes on to the caller

    return on_exit


def open_workdir(workdir: Path) -> bool:
    """Creates the run directory if needed; returns whether it is new (or empty). What cannot
    be a run directory is a one-line ConfigError."""
    if workdir.is_symlink() and not workdir.exists():
        raise ConfigError(
            f"--workdir {workdir}: a symbolic link to {os.readlink(workdir)}, which does not "
            "exist; create that directory, or give another --workdir."
        )
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir}: exists and is not a directory.")
    try:
        fresh = not workdir.exists() or not any(workdir.iterdir())
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: cannot create or list it ({e.strerror}).") from e
    return fresh


def restore_or_init(
    cfg: TrainConfig,
    prog: Program,
    manager: Any,
    target: Any,
    data_iter: Any,
    layout: dict[str, list[int]],
    config: Mapping[str, Any],
) -> tuple[Any, str]:
    """The state to start from, and where it came from: the run's newest loadable checkpoint
    (resume), else `checkpoint.init_from`, else a fresh initialisation."""
    state = checkpoint.restore(manager, target, data_iter, layout, config=config)
    if state is not None:
        return state, f"resuming from step {int(state.step)}"
    if cfg.checkpoint.init_from:
        state, source_step = loading.init_from(
            cfg.checkpoint.init_from,
            cfg.checkpoint.init_mode,
            target,
            data_iter,
            layout,
            prog.init(),
        )
        what = (
            f"its whole state: continuing at step {source_step}"
            if cfg.checkpoint.init_mode == "full"
            else "its parameters, a fresh optimizer from step 0"
        )
        source = cfg.checkpoint.init_from
        return state, f"initialised from {source} at its step {source_step} ({what})"
    return prog.init(), "fresh start"


def start_banner(prog: Program, num_params: int, origin: str) -> str:
    """The line a run starts with: the model's size (and what of it trains), the mesh and
    devices, where the state came from; then a warning per questionable setting."""
    cfg, mesh = prog.cfg, prog.mesh
    trainable = lora.count_trainable(prog.abstract.params, lora.trainable_fn(cfg.finetune))
    share = f" ({trainable:,} trainable)" if trainable != num_params else ""
    devices = jax.devices()
    return (
        f"bigjax {bigjax.__version__}: {num_params:,} parameters{share}, mesh "
        f"{dict(mesh.shape)} over {len(devices)} {devices[0].platform} devices "
        f"({distributed.describe()}); {origin}"
        + "".join(f"\nwarning: {line}" for line in advice(cfg))
    )


def report_done(
    cfg: TrainConfig,
    workdir: Path,
    summary: dict[str, Any],
    wall_s: float,
    last_eval: dict[str, float],
    stop: dict[str, str],
    start: int,
) -> None:
    """summary.json, loss.png and the closing lines of a run."""
    write_summary(workdir, summary, wall_s)
    metrics_path = workdir / "metrics.jsonl"
    if cfg.metrics.plot and metrics_path.exists():
        metrics.plot_loss(metrics_path, workdir / "loss.png", log_scale=cfg.metrics.plot_log_scale)
    status = f"eval loss {last_eval['eval_loss']:.4f}" if last_eval else "no eval"
    if stop:
        status = f"stopped by {stop['signal']}"
    elif start == cfg.num_steps:
        status = "already complete"
    print(
        f"done: step {summary['step']}, {status}.\n"
        f"  metrics:     {metrics_path}\n"
        f"  plot:        {workdir / 'loss.png'}\n"
        f"  tensorboard: {workdir / 'tensorboard'}\n"
        f"  checkpoints: {workdir / 'checkpoints'}",
        flush=True,
    )


class Evaluator:
    """Eval loss (and, with eval.choices, multiple-choice accuracy) at a step, logged.
    The scorer is compiled once, on the first call."""

    def __init__(self, prog: Program, writers: metrics.Writers, tokenizer: Any):
        cfg = prog.cfg
        self.prog, self.writers, self.tokenizer = prog, writers, tokenizer
        self.items = (
            choices.items_for(cfg.eval.choices, cfg.data.eval_fraction, cfg.eval.choice_items)
            if cfg.eval.choices
            else []
        )
        self.scorer = choices.make_scorer(prog.graphdef, cfg.finetune.lora_scale)
        self.harness = Harness(prog, tokenizer) if cfg.eval.harness_tasks else None

    def __call__(self, at_step: int, params: Any) -> dict[str, float]:
        row = {"step": at_step, **run_eval(self.prog, params)}
        text = f"eval @ {at_step}: loss {row['eval_loss']:.4f}"
        if "f1" in row:  # a classifier: perplexity would mean nothing
            text += f", accuracy {row['accuracy']:.1%}, macro F1 {row['f1']:.3f}"
        else:
            text += f", ppl {row['eval_ppl']:.2f}"
        if self.items:
            start = time.perf_counter()
            seq_len = self.prog.cfg.data.seq_len
            row.update(
                choices.score_items(self.scorer, params, self.tokenizer, self.items, seq_len)
            )
            row["mc_eval_s"] = time.perf_counter() - start
            text += f", multiple choice {row['mc_accuracy']:.1%}"
        if self.harness is not None:
            scores = self.harness(params)
            row.update(scores)
            text += f", {len(scores) - 1} benchmark numbers"
        self.writers.write(row, text)
        return row


class Harness:
    """eval.harness_tasks at each eval: lm-evaluation-harness on the current parameters, as
    `harness/TASK/METRIC` numbers. The tasks are indexed and the programs compiled once, on
    the first eval; later evals hand the model new parameters of the same shapes."""

    def __init__(self, prog: Program, tokenizer: Any):
        import importlib.util

        from bigjax import harness

        e = prog.cfg.eval
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("eval.harness_tasks needs lm-evaluation-harness: "
                              "pip install 'bigjax[harness]'.")  # fmt: skip
        self.prog, self.tokenizer = prog, tokenizer
        self.tasks = [t for t in e.harness_tasks.split(",") if t]
        self.manager = harness.task_manager(self.tasks, e.harness_include_path)
        self.lm: Any = None

    def __call__(self, params: Any) -> dict[str, float]:
        from bigjax import harness

        cfg = self.prog.cfg
        merged = lora.merged(params, cfg.finetune.lora_scale)
        if self.lm is None:
            self.lm = harness.make_lm(self.prog.graphdef, merged, self.tokenizer,
                                      cfg.data.seq_len, rules=cfg.mesh.rules,
                                      mesh=self.prog.mesh)  # fmt: skip
        self.lm.set_params(merged)
        start = time.perf_counter()
        results = harness.evaluate(
            self.lm, self.tasks, include_path=cfg.eval.harness_include_path,
            limit=cfg.eval.harness_limit or None, manager=self.manager,
        )  # fmt: skip
        scores = {f"harness/{k}": v for k, v in harness.headline(results).items()}
        return {**scores, "harness_eval_s": time.perf_counter() - start}

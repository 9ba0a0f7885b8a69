"""The run directory as one launch sees it: created and locked by the writer process, cleaned
if the launch fails before its first checkpoint, config.json and the config history, the
banner at the start, summary.json, loss.png and the closing lines at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

import bigjax
from bigjax import checkpoint, distributed, history, loading, metrics, models, runlock
from bigjax.config import ConfigError, TrainConfig, advice, to_dict
from bigjax.program import Program

# summary.json: counts, the final eval loss (None before one), whether the run is complete
Summary = dict[str, int | float | bool | None]


@dataclasses.dataclass
class RunDir:
    """The run directory as this launch sees it: held under a lock by the one writer
    process, its config (as checked against the checkpoints'), the metric writers, the
    banner at the start and the summary at the end."""

    workdir: Path
    cfg: TrainConfig
    config: dict[str, Any]  # to_dict(cfg): written to config.json and into every checkpoint
    writer: bool  # this process writes (process 0)
    writers: metrics.Writers | Any = None  # opened by `begin`
    num_params: int = 0

    @classmethod
    def open(cls, workdir: Path, cfg: TrainConfig, cleanup: contextlib.ExitStack) -> RunDir:
        """Creates and locks the directory (the writer process; the kernel frees the lock
        however the run ends); a run failing before its first checkpoint leaves error.log."""
        writer = jax.process_index() == 0
        if writer:
            fresh = open_workdir(workdir)
            lock = runlock.acquire(workdir)
            cleanup.callback(lock.release)
            if fresh:
                cleanup.push(keep_only_the_error(workdir))
            if lock.previous:
                print(
                    f"warning: {workdir} was last trained by {runlock.describe(lock.previous)}, "
                    "which ended without releasing it (killed or crashed); taking it over.",
                    flush=True,
                )
        return cls(workdir, cfg, to_dict(cfg), writer)

    def begin(
        self, prog: Program, saves: checkpoint.Checkpointer, start: int, origin: str
    ) -> dict[str, Any]:
        """Opens the writers (dropping rows after `start`), writes config.json and the
        config history, prints the banner; returns the metadata every checkpoint carries."""
        resumed = origin.startswith("resuming")
        saved_config = loading.saved_config(saves.manager, start) if resumed else None
        self.num_params = prog.num_params
        m = self.cfg.metrics
        self.writers = metrics.Writers(
            self.workdir,
            enabled=self.writer,
            tensorboard=m.tensorboard,
            wandb_project=m.wandb_project,
            config=self.config,
        )
        if self.writer:
            (self.workdir / "config.json").write_text(
                json.dumps(self.config, indent=2) + "\n", encoding="utf-8"
            )
            self.writers.truncate_after(start)
            print(start_banner(prog, self.num_params, origin), flush=True)
            history.record(self.workdir, start, self.config, saved_config)  # shows what changed
        return {
            "bigjax_version": bigjax.__version__,
            "config": self.config,
            "mesh": dict(prog.mesh.shape),
            "num_params": self.num_params,
            "params": prog.layout,
            # the stacked layers' order in memory, when not the model's (interleaved stages)
            **(
                {"layer_order": prog.layer_order}
                if prog.layer_order != sorted(prog.layer_order)
                else {}
            ),  # fmt: skip
        }

    def end(
        self,
        final_step: int,
        skipped_steps: int,
        wall_s: float,
        last_eval: dict[str, float],
        stop: dict[str, str],
        start: int,
    ) -> None:
        """summary.json, loss.png and the closing lines (the writer process)."""
        if not self.writer:
            return
        cfg, workdir = self.cfg, self.workdir
        summary = run_summary(cfg, workdir, final_step, skipped_steps, self.num_params)
        write_summary(workdir, summary, wall_s)
        metrics_path = workdir / "metrics.jsonl"
        if cfg.metrics.plot and metrics_path.exists():
            metrics.plot_loss(metrics_path, workdir / "loss.png",
                              log_scale=cfg.metrics.plot_log_scale)  # fmt: skip
        status = f"eval loss {last_eval['eval_loss']:.4f}" if last_eval else "no eval"
        if stop:
            status = f"stopped by {stop['signal']}"
        elif start == cfg.num_steps:
            status = "already complete"
        print(
            f"done: step {final_step}, {status}.\n"
            f"  metrics:     {metrics_path}\n"
            f"  plot:        {workdir / 'loss.png'}\n"
            f"  tensorboard: {workdir / 'tensorboard'}\n"
            f"  checkpoints: {workdir / 'checkpoints'}",
            flush=True,
        )


def start_banner(prog: Program, num_params: int, origin: str) -> str:
    """The line a run starts with: the model's size (and what of it trains), the mesh and
    devices, where the state came from; then a warning per questionable setting."""
    cfg, mesh = prog.cfg, prog.mesh
    trainable = prog.num_trainable
    share = f" ({trainable:,} trainable)" if trainable != num_params else ""
    devices = jax.devices()
    return (
        f"bigjax {bigjax.__version__}: {num_params:,} parameters{share}, mesh "
        f"{dict(mesh.shape)} over {len(devices)} {devices[0].platform} devices "
        f"({distributed.describe()}); {origin}"
        + "".join(f"\nwarning: {line}" for line in advice(cfg))
    )


def write_summary(workdir: Path, summary: Summary, wall_s: float) -> None:
    """`summary.json`: where the run stands, for sweeps and `bigjax report`. Wall time adds up
    over resumes (a run killed with SIGKILL loses that attempt's time)."""
    path = workdir / "summary.json"
    try:
        before = (
            json.loads(path.read_text(encoding="utf-8")).get("wall_s", 0.0)
            if path.exists()
            else 0.0
        )
    except ValueError:  # damaged: this launch's time is what is known
        before = 0.0
    tmp = path.with_suffix(".tmp")
    try:
        text = metrics.json_text({**summary, "wall_s": before + wall_s}, indent=2) + "\n"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # atomic: a reader never sees half a file
    except OSError as e:
        raise metrics.unwritable(path, e) from e


def run_summary(
    cfg: TrainConfig, workdir: Path, step: int, skipped_steps: int, num_params: int
) -> Summary:
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
            (workdir / "error.log").write_text(
                f"bigjax: error: {error}\n\n{text}", encoding="utf-8", errors="backslashreplace"
            )
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
    checkpoint.check_path(workdir)  # a name Orbax cannot use: refused before it is made
    try:
        fresh = not workdir.exists() or not any(workdir.iterdir())
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: cannot create or list it ({e.strerror}).") from e
    return fresh

"""`bigjax sweep`: trials as `bigjax train` processes, coordinated through an Optuna study.

The study is the source of truth, in SQLite inside the sweep directory or in a shared database
(PostgreSQL) that workers on several machines join. The process that creates the study
enqueues every trial once (grid and random points, or empty TPE slots with their seeds);
workers pop waiting trials atomically, so no trial runs twice and none is lost, whatever the
number of workers. Each trial is a `bigjax train` subprocess in its own run directory, named
by the hash of its resolved config: a retried or resumed trial continues from its checkpoint.

Failure handling:
  - a trial that exits with an error is recorded as FAIL with the end of its log, not retried;
  - a trial whose sweep process died (kill -9, a lost machine) stops sending heartbeats; any
    live worker marks it failed and re-enqueues it, and it resumes from its last checkpoint.
    It is retried as long as its attempts save new checkpoints (a sweep may be preempted any
    number of times); after a few attempts in a row that saved none (a trial that takes its
    machine down with it) it fails for good, with the reason (`database.retry_stale`);
  - Ctrl-C / SIGTERM stops the running trials (they checkpoint) and re-enqueues them: rerun
    the same command to continue.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from bigjax import progress, runlock
from bigjax.config import ConfigError, load_config, to_dict
from bigjax.sweep import devices
from bigjax.sweep.database import (
    claim_lock,
    database_errors,
    experimental_ok,
    make_storage,
    shown_url,
    sqlite_file,
)
from bigjax.sweep.results import objective_value, read_evals, saved_step
from bigjax.sweep.spec import Grid, Sweep, suggest_point

ERROR_TAIL_LINES = 20
MAX_HEARTBEAT_S = 86400  # a worker dead for 3 of them has its trial retried


@dataclasses.dataclass(frozen=True)
class Options:
    directory: Path
    storage: str  # database URL
    workers: int = 1
    join_only: bool = False  # --worker: join an existing study, never create one
    heartbeat_s: float = 10.0  # a trial silent for 3 heartbeats is taken as dead
    wait_s: float = 600.0  # --worker: how long to wait for the study to appear

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"sweep: --workers must be at least 1, got {self.workers}.")
        # nan fails both comparisons; past a day, 3 x it overflowed Optuna's int grace period
        if not 0 < self.heartbeat_s <= MAX_HEARTBEAT_S:
            raise ConfigError(
                f"sweep: --heartbeat must be a number of seconds above 0, at most "
                f"{MAX_HEARTBEAT_S} (a day), got {self.heartbeat_s}."
            )
        if self.storage.startswith("sqlite") and sqlite_file(self.storage) is None:
            raise ConfigError(
                f"sweep: --storage {self.storage} is an in-memory SQLite database: it would "
                "vanish with this process (a rerun could not continue the sweep, no worker "
                "could join it); give sqlite:///PATH."
            )


def config_hash(cfg: Any) -> str:
    """12 hex digits of the resolved config: equal configs share a run directory."""
    text = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cli_overrides(overrides: Mapping[str, Any]) -> list[str]:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (list, tuple)):
            return ",".join(map(str, v))
        return repr(v) if isinstance(v, float) else str(v)

    return [f"--config.{k}={fmt(v)}" for k, v in overrides.items()]


def check_values(spec: Sweep) -> None:
    """Loads the config with each value of each axis (the others at their first; a range at
    both ends): an unknown key or a value of the wrong type is refused in one line before the
    study starts, not once per trial. What fails only in combination fails its trials."""
    axes = {k: p.values if isinstance(p, Grid) else (p.low, p.high) for k, p in spec.space.items()}
    axes.update({"variant": tuple(spec.variants)} if spec.variants else {})
    first = {k: values[0] for k, values in axes.items()}
    for point in [first] + [{**first, k: v} for k, vs in axes.items() for v in vs[1:]]:
        try:
            load_config(spec.config, cli_overrides(spec.overrides_for(point)))
        except ConfigError as e:
            raise ConfigError(f"sweep spec: the trial {point}: {e}") from None


def spec_fingerprint(spec: Sweep) -> str:
    text = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _sampler(spec: Sweep) -> optuna.samplers.BaseSampler:
    if spec.algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=spec.sampler_seed)
    return optuna.samplers.RandomSampler(seed=spec.sampler_seed)  # points are enqueued


def _pruner(spec: Sweep) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        # Compare only after 2 trials finished and from each trial's second report on.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(spec: Sweep, storage: optuna.storages.BaseStorage, opts: Options) -> optuna.Study:
    """Creates the study and enqueues its trials (exactly once: creation is atomic in the
    database), or joins an existing one made from the same spec."""
    sampler, pruner = _sampler(spec), _pruner(spec)
    study = None
    if not opts.join_only:
        with contextlib.suppress(optuna.exceptions.DuplicatedStudyError):
            study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner,
                                        study_name=spec.name, direction=spec.direction)  # fmt: skip
            points = spec.points()
            # One transaction a trial (~4 ms in SQLite): a bar where that takes seconds
            many = len(points) > 500
            bar = progress.Bar("sweep: enqueue", len(points), "trials") if many else None
            for point in points:  # None: a TPE trial (the sampler picks its point at its start)
                study.enqueue_trial(point)  # type: ignore[arg-type]
                if bar is not None:
                    bar.advance()
            if bar is not None:
                bar.close()
            study.set_user_attr("spec", spec_fingerprint(spec))
            study.set_user_attr("enqueued", len(points))
            return study
    # Wait for the study and its trials; while its creator is still enqueueing them (10^4 grid
    # points take ~40 s) wait on as long as they grow, and give up `stall_s` after the last.
    stall_s = opts.wait_s if opts.join_only else 60.0
    deadline, filled = time.monotonic() + stall_s, -1
    while True:
        with contextlib.suppress(KeyError):
            study = optuna.load_study(
                study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner
            )
            if "enqueued" in study.user_attrs:
                break
            if (count := len(study.get_trials(deepcopy=False))) > filled:
                filled, deadline = count, time.monotonic() + stall_s
        if time.monotonic() > deadline:
            what = "has no study" if study is None else (
                f"holds a study never filled (its {filled} trials stopped growing {stall_s:g} "
                "s ago)")  # fmt: skip
            raise ConfigError(
                f"sweep: {shown_url(opts.storage)} {what} named {spec.name!r}. Start the sweep "
                "without --worker first (if its creator died while enqueueing, delete the study: "
                f"optuna delete-study --study-name {spec.name} --storage URL)."
            )
        time.sleep(1.0)
    if study.user_attrs.get("spec") != spec_fingerprint(spec):
        raise ConfigError(
            f"sweep: the study {spec.name!r} in {shown_url(opts.storage)} was made from a "
            "different spec. Give the changed spec a new name, or use a new --dir / --storage."
        )
    return study


def _die_with_parent(cores: list[int] | None):
    """preexec_fn: SIGTERM the trial when its worker dies (it then saves a checkpoint), and
    pin it to its CPU cores."""

    def setup() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if cores:
            os.sched_setaffinity(0, cores)

    return setup


class Worker:
    """Runs trials of one study in this process, `opts.workers` at a time."""

    def __init__(
        self, spec: Sweep, study: optuna.Study, storage: optuna.storages.RDBStorage, opts: Options
    ):
        """`storage`: the database `study` was opened on (its claims and heartbeats go
        straight to it; Optuna's Study exposes no storage of its own)."""
        self.spec, self.study, self.storage, self.opts = spec, study, storage, opts
        self.study_id = self.storage.get_study_id_from_name(spec.name)
        self.stop = threading.Event()
        self.mine: set[int] = set()  # numbers of the trials running in this process
        self.ids: dict[int, int] = {}  # trial number -> the storage's trial id
        self.lock = threading.Lock()
        self.pop_lock = threading.Lock()
        self.log_lock = threading.Lock()
        self.errors: list[BaseException] = []  # a worker thread's crash fails the command

    def log(self, text: str) -> None:
        with self.log_lock:
            print(f"sweep {self.spec.name}: {text}", flush=True)

    @contextlib.contextmanager
    def claiming(self) -> Iterator[bool]:
        """Serialises claims. PostgreSQL/MySQL lock the trial's row (SELECT ... FOR UPDATE),
        so one claim wins; SQLite has no row locks, and two connections can both move the
        same trial from WAITING to RUNNING. There, claims take a lock file next to the
        database (every worker of an SQLite study is on this machine). Yields False, having
        claimed nothing, if the sweep is asked to stop while it waits for that lock."""
        with self.pop_lock:
            db = sqlite_file(self.opts.storage)
            if db is None:
                yield True
                return
            with claim_lock(db, self.stop, self.log) as held:
                yield held

    def pop(self) -> optuna.Trial | None:
        """Claims one waiting trial: only one worker anywhere gets it."""
        with self.claiming() as held:
            # listed through the study (its cache then knows the trial `optuna.Trial` reads)
            states = (TrialState.WAITING,)
            for frozen in self.study.get_trials(deepcopy=False, states=states) if held else ():
                trial_id = self.trial_id(frozen.number)
                if self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    with self.lock:
                        self.mine.add(frozen.number)
                    return optuna.Trial(self.study, trial_id)
        return None

    def trial_id(self, number: int) -> int:
        """The storage's id of this study's trial `number` (what its calls take); ids never
        change, so each is asked for once."""
        with self.lock:
            known = self.ids.get(number)
        if known is None:
            known = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
            with self.lock:
                self.ids[number] = known
        return known

    def others_running(self) -> bool:
        running = self.storage.get_all_trials(
            self.study_id, deepcopy=False, states=(TrialState.RUNNING,)
        )
        with self.lock:
            return any(t.number not in self.mine for t in running)

    def loop(self, slot: int) -> None:
        try:
            self._loop(slot)
        except BaseException as e:  # a bug here: stop everything, report it from run()
            self.errors.append(e)
            self.stop.set()

    def _loop(self, slot: int) -> None:
        env, cores = devices.trial_env(slot, self.opts.workers)
        while not self.stop.is_set():
            trial = self.pop()
            if trial is not None:
                try:
                    self.run_trial(trial, env, cores)
                except BaseException as e:
                    with contextlib.suppress(Exception):  # recorded, not left RUNNING
                        trial.set_user_attr("error", f"sweep worker crashed: {e!r}")
                        self.study.tell(trial, state=TrialState.FAIL)
                    raise
                finally:
                    with self.lock:
                        self.mine.discard(trial.number)
                continue
            # Nothing waiting: a trial of a dead worker may come back (re-enqueued once its
            # heartbeat is stale); wait for the others' trials to finish or fail.
            self.fail_stale()
            if not self.others_running() and not self._waiting():
                return
            self.stop.wait(self.opts.heartbeat_s)

    def fail_stale(self) -> None:
        """Fails the trials whose heartbeat went stale, each retried once (`retry_stale`).
        Claimed, as a pop is: on SQLite two workers could both fail one stale trial and each
        enqueue a retry of it (found by killing a 2-worker sweep: one point ran twice)."""
        with self.claiming() as held, experimental_ok():
            if held:
                optuna.storages.fail_stale_trials(self.study)

    def _waiting(self) -> bool:
        return bool(
            self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.WAITING,))
        )

    def run_trial(self, trial: optuna.Trial, env: dict[str, str], cores: list[int] | None) -> None:
        point = suggest_point(self.spec, trial)
        overrides = self.spec.overrides_for(point)
        try:
            cfg = load_config(self.spec.config, cli_overrides(overrides))
        except ConfigError as e:
            trial.set_user_attr("error", str(e))
            self.study.tell(trial, state=TrialState.FAIL)
            self.log(f"trial {trial.number} {point}: bad config: {e}")
            return
        run_dir = self.opts.directory / "runs" / config_hash(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("run_dir", str(run_dir))
        (run_dir / "trial.json").write_text(
            json.dumps(
                {"sweep": self.spec.name, "trial": trial.number, "point": point,
                 "overrides": overrides, "baseline": self.spec.baseline},
                indent=2, default=str,
            ) + "\n", encoding="utf-8",
        )  # fmt: skip
        trial.set_user_attr("start_step", saved_step(run_dir))  # a retry must get past it
        self.log(f"trial {trial.number} {point} -> {run_dir}")
        command = [sys.executable, "-m", "bigjax.cli", "train", "--config", self.spec.config]
        command += ["--workdir", str(run_dir), *cli_overrides(overrides)]
        while True:
            # A previous attempt's trainer may still run (its worker stalled past the
            # heartbeat grace and the trial was retried): never start a second one beside it.
            if not self.wait_for_unlocked(trial, run_dir):
                outcome, rc = "interrupted", 0
                break
            with open(run_dir / "train.log", "ab") as out:  # its descriptor, for the trainer
                proc = subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **env},
                    # Its own process group: a terminal's Ctrl-C reaches the sweep only, which
                    # then stops each trial with one SIGTERM (a second signal would abort the
                    # trial's checkpoint save).
                    start_new_session=True,
                    preexec_fn=_die_with_parent(cores),  # noqa: PLW1509 (no threads in child)
                )
                outcome = self.watch(trial, proc, run_dir)
            rc = proc.returncode
            if not (rc == 2 and runlock.is_locked(run_dir)):  # lost a race for the lock
                break
        self.finish(trial, point, rc, outcome, run_dir)

    def wait_for_unlocked(self, trial: optuna.Trial, run_dir: Path) -> bool:
        """Waits (heartbeating) until no trainer holds `run_dir`; False if asked to stop."""
        said = False
        while runlock.is_locked(run_dir):
            if not said:
                holder = runlock.describe(runlock.holder(run_dir))
                self.log(f"trial {trial.number}: waiting for the trainer of an earlier attempt "
                         f"({holder}) to exit")  # fmt: skip
                said = True
            if self.storage.get_heartbeat_interval() is not None:
                self.storage.record_heartbeat(self.trial_id(trial.number))
            if self.stop.wait(min(self.opts.heartbeat_s, 1.0)):
                return False
        return True

    def still_ours(self, trial: optuna.Trial) -> bool:
        """False once another worker failed this trial as stale (this worker stalled, e.g.
        Ctrl-Z or a paused VM, past the heartbeat grace) and enqueued its retry."""
        return self.storage.get_trial(self.trial_id(trial.number)).state == TrialState.RUNNING

    def watch(self, trial: optuna.Trial, proc: subprocess.Popen, run_dir: Path) -> str:
        """Heartbeats, intermediate eval losses for the pruner, stop requests, until the
        trial process exits. Returns 'done', 'pruned' or 'interrupted'."""
        reported: set[int] = set()
        outcome = "done"
        beat = self.storage.get_heartbeat_interval() is not None
        while proc.poll() is None:
            if outcome != "taken over" and not self.still_ours(trial):
                outcome = "taken over"
                proc.terminate()  # it saves a checkpoint; the retry resumes from it
                continue
            if beat and outcome != "taken over":
                self.storage.record_heartbeat(self.trial_id(trial.number))
            for step, loss in read_evals(run_dir) if outcome != "taken over" else ():
                if step not in reported and math.isfinite(loss):
                    trial.report(loss, step)
                    reported.add(step)
                    if outcome == "done" and trial.should_prune():
                        outcome = "pruned"
                        proc.terminate()  # the trial saves a checkpoint and exits
            if self.stop.is_set() and outcome == "done":
                outcome = "interrupted"
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        return outcome

    def finish(
        self, trial: optuna.Trial, point: dict, rc: int, outcome: str, run_dir: Path
    ) -> None:
        if outcome == "taken over" or not self.still_ours(trial):
            # Recorded as failed by another worker, which retries it from the checkpoint:
            # reporting now would be a second result for one trial.
            self.log(f"trial {trial.number}: this worker stalled and another took the trial "
                     "over; its retry continues from the checkpoint")  # fmt: skip
            return
        if outcome == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
            self.log(f"trial {trial.number} pruned")
            return
        if outcome == "interrupted":
            trial.set_user_attr("interrupted", True)
            self.study.enqueue_trial(point)  # continues from its checkpoint on the next run
            self.study.tell(trial, state=TrialState.FAIL)
            self.log(f"trial {trial.number} interrupted: re-enqueued")
            return
        value = objective_value(run_dir, self.spec.objective) if rc == 0 else None
        if value is None or not math.isfinite(value):
            lines = (
                (run_dir / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()
            )
            error = "\n".join(lines[-ERROR_TAIL_LINES:])
            reason = f"exit code {rc}" if rc else "no final eval loss"
            trial.set_user_attr("error", f"{reason}\n{error}")
            self.study.tell(trial, state=TrialState.FAIL)
            self.log(f"trial {trial.number} failed ({reason}); see {run_dir / 'train.log'}")
            return
        self.study.tell(trial, value)
        self.log(f"trial {trial.number} {self.spec.objective} {value:.4f}")


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    def handle(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run(spec: Sweep, opts: Options) -> optuna.Study:
    """Runs the sweep until no trial is left (or a signal stops it); returns the study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:  # an uneven device split is a usage error: say so before anything starts
        devices.trial_env(0, opts.workers)
    except ValueError as e:
        raise ConfigError(f"sweep: {e}") from None
    check_values(spec)
    from bigjax.checkpoint import check_path  # imports jax: only once a sweep starts

    check_path(opts.directory / "trial" / "checkpoints")  # every trial's run is in there
    opts.directory.mkdir(parents=True, exist_ok=True)
    storage = make_storage(opts.storage, opts.heartbeat_s)
    with database_errors(opts.storage):  # a damaged file may open, and fail when read
        study = open_study(spec, storage, opts)
    worker = Worker(spec, study, storage, opts)
    threads = [
        threading.Thread(target=worker.loop, args=(slot,), name=f"slot{slot}", daemon=True)
        for slot in range(opts.workers)
    ]
    with _stop_on_signals(worker.stop):
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # join with a timeout, so signals reach the handler
                t.join(timeout=0.5)
    if worker.errors:
        with database_errors(opts.storage):
            raise worker.errors[0]
    return study

"""The study's database: opened with heartbeats, and the retry of a trial whose worker died.

A running trial's worker records a heartbeat every `--heartbeat` seconds; a trial silent for
three is failed by whichever live worker looks next (Optuna's `fail_stale_trials`), which calls
`retry_stale` on it once.
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from bigjax.sweep.results import saved_step

MAX_RETRIES = 2  # re-runs of a trial whose worker died with no new checkpoint, before it fails


@contextlib.contextmanager
def experimental_ok() -> Iterator[None]:
    """Heartbeats and their retry callback are marked experimental (since Optuna 2.8/2.9);
    bigjax relies on them on purpose and tests them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def make_storage(url: str, heartbeat_s: float, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Opens the study database, creating Optuna's tables if needed. Workers that start
    together on a fresh database race to create the tables (PostgreSQL: a duplicate
    `CREATE TYPE`); the losers retry, and then find them."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            with experimental_ok():
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=max(1, int(heartbeat_s)),
                    grace_period=max(3, int(3 * heartbeat_s)),
                    heartbeat_stale_trial_callback=retry_stale,
                )
        except sqlalchemy.exc.DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())  # jitter: the racers do not collide again
    raise AssertionError("unreachable")


def retry_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's callback for a trial whose worker died (failed when its heartbeat went stale):
    enqueues its retry, which resumes from the trial's checkpoint, unless MAX_RETRIES attempts
    in a row saved no new checkpoint; then records why it was given up, as a failed trial
    whose `error` the summary and the exit code report (no silent hole in the sweep)."""
    run_dir = trial.user_attrs.get("run_dir")
    step = saved_step(Path(run_dir)) if run_dir else -1
    progressed = step > trial.user_attrs.get("start_step", -1)  # -1 if it died before starting
    stalled = 0 if progressed else trial.system_attrs.get("stalled_attempts", 0) + 1
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    attrs = {**trial.system_attrs, "failed_trial": trial.number, "retry_history": history,
             "stalled_attempts": stalled}  # fmt: skip
    user_attrs = {**trial.user_attrs, "start_step": step}  # what the retry must get past
    if stalled <= MAX_RETRIES:
        state = TrialState.WAITING
    else:
        state = TrialState.FAIL
        user_attrs["error"] = (
            f"bigjax: error: its sweep worker died {stalled} times in a row without the trial "
            f"saving a checkpoint past step {step}; not retried again"
        )
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=user_attrs,
            system_attrs=attrs,
        )
    )

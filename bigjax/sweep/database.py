"""The study's database: opened with heartbeats, and the retry of a trial whose worker died.

A running trial's worker records a heartbeat every `--heartbeat` seconds; a trial silent for
three is failed by whichever live worker looks next (Optuna's `fail_stale_trials`), which calls
`retry_stale` on it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.exceptions import StorageInternalError
from optuna.trial import FrozenTrial, TrialState

from bigjax.errors import UsageError, disk_full
from bigjax.sweep.results import saved_step

CLAIM_NOTICE_S = 5.0  # a wait for the claim lock this long is said (it takes milliseconds)
SQLITE_WAIT_S = 60  # how long an SQLite write waits for another process's lock
MAX_RETRIES = 2  # re-runs of a trial whose worker died with no new checkpoint, before it fails


@contextlib.contextmanager
def experimental_ok() -> Iterator[None]:
    """Heartbeats and their retry callback are marked experimental (since Optuna 2.8/2.9);
    bigjax relies on them on purpose and tests them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


_URLS = "sqlite:///PATH or postgresql://USER@HOST/DB"
_DRIVER = "Failed to import DB access module"  # Optuna's words for a driver not installed


class StudyDatabaseError(UsageError):
    """`--storage` names a database the sweep cannot open or read: a URL that is none, a
    database kind without its driver, a server that refuses, a file that is no database."""


def shown_url(url: str) -> str:
    """The database URL as errors show it: its password, if any, as `***`."""
    with contextlib.suppress(sqlalchemy.exc.ArgumentError):
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    return url


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite database URL; None for another kind, or an in-memory one."""
    with contextlib.suppress(sqlalchemy.exc.ArgumentError):
        parsed = sqlalchemy.engine.make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            return Path(parsed.database)
    return None


@contextlib.contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Raises what goes wrong with the study database `url` (opening it, or reading it later:
    a damaged file may open) as one line that names it and the fix; SQLAlchemy's errors come
    with a page of traceback. A full disk passes through: the command line words that for
    every command."""
    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, StorageInternalError) as e:
        if disk_full(e) or (isinstance(e, ImportError) and _DRIVER not in str(e)):
            raise  # an ImportError of bigjax's own is a bug: its traceback
        why = _why(e, sqlite=url.startswith("sqlite"))
        raise StudyDatabaseError(f"sweep: the study database {shown_url(url)} {why}") from e


def _why(e: BaseException, sqlite: bool) -> str:
    if isinstance(e, sqlalchemy.exc.NoSuchModuleError):  # before ArgumentError: a subclass
        return f"is of a kind SQLAlchemy does not know; give --storage {_URLS}."
    if isinstance(e, sqlalchemy.exc.ArgumentError):
        return f"is not a database URL; give --storage {_URLS}."
    if isinstance(e, ImportError):  # Optuna's, raised from the driver's ModuleNotFoundError
        module = getattr(e.__cause__ or e.__context__, "name", None) or "?"
        return (
            f"needs a Python driver that is not installed (no module {module!r}): install "
            f"it, or give --storage {_URLS}."
        )
    if isinstance(e, StorageInternalError):  # Optuna's wrapper of a failed commit
        e = e.__cause__ or e
    first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [""])[0]
    if "file is not a database" in first or "malformed" in first:  # SQLite's words
        return (
            f"is damaged or not an SQLite file ({first}): restore it, or move it away to "
            "start the sweep over (finished trials keep their run directories)."
        )
    if sqlite and "database is locked" in first:
        return (
            f"is locked: another process kept its write lock past the wait ({SQLITE_WAIT_S} s, "
            "or the URL's ?timeout=); a sweep stopped with Ctrl-Z or on a paused machine keeps "
            "it until it continues. Resume or end that process, then rerun."
        )
    check = "that its directory exists and is writable" if sqlite else "that its server is up"
    return f"failed: {first}. Check the URL and {check}."


def make_storage(url: str, heartbeat_s: float, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Opens the study database, creating Optuna's tables if needed. Workers that start
    together on a fresh database race to create the tables (PostgreSQL: a duplicate
    `CREATE TYPE`); the losers retry, and then find them. Errors: as `database_errors`
    words them."""
    with database_errors(url):
        return _make_storage(url, heartbeat_s, attempts)


def _make_storage(url: str, heartbeat_s: float, attempts: int) -> optuna.storages.RDBStorage:
    engine_kwargs = _sqlite_wait(url) if url.startswith("sqlite") else {}
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
        except sqlalchemy.exc.DBAPIError as e:
            if attempt == attempts - 1 or not _may_pass(e, sqlite=url.startswith("sqlite")):
                raise
            time.sleep(0.5 + random.random())  # jitter: the racers do not collide again
    raise AssertionError("unreachable")


def _sqlite_wait(url: str) -> dict[str, Any]:
    """SQLite waits SQLITE_WAIT_S for a lock (Python's default is 5 s), unless the URL says how
    long (sqlite:///PATH?timeout=S); a timeout that is no number of seconds is refused here
    (sqlite3 raised a bare ValueError from deep in SQLAlchemy)."""
    given = sqlalchemy.engine.make_url(url).query.get("timeout")
    if given is None:
        return {"connect_args": {"timeout": SQLITE_WAIT_S}}
    with contextlib.suppress(TypeError, ValueError):
        if 0 <= float(given) < math.inf:  # type: ignore[arg-type]  # a tuple: given twice
            return {}
    raise StudyDatabaseError(
        f"sweep: the study database {shown_url(url)} has timeout={given!r}: give one number "
        f"of seconds >= 0 (how long a write waits for another process's lock; "
        f"{SQLITE_WAIT_S} if left out)."
    )


def _may_pass(e: sqlalchemy.exc.DBAPIError, sqlite: bool) -> bool:
    """Whether opening again may succeed: a lost race to create the tables (a duplicate), or
    a server not up yet; not a local file that is no database, or cannot be created."""
    duplicate = isinstance(e, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.ProgrammingError)
    return duplicate or "already exists" in str(e) or not sqlite


@contextlib.contextmanager
def claim_lock(db: Path, stop: threading.Event, log: Callable[[str], None]) -> Iterator[bool]:
    """Holds the lock file beside the SQLite study `db` that serialises claims. Another worker
    holds it for milliseconds; one stopped (Ctrl-Z, a paused machine) while it holds it keeps
    every worker waiting until it continues or ends, so a wait past CLAIM_NOTICE_S is said
    once, and a stop asked meanwhile (`stop` set) yields False, with nothing held."""
    path = db.with_name(db.name + ".lock")
    with open(path, "wb") as f:  # a lock: never written
        started, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited >= CLAIM_NOTICE_S and not said:
                    log(f"waiting for the study's claim lock {path}: another worker has held "
                        f"it for {waited:.0f} s (one stopped with Ctrl-Z or on a paused "
                        "machine keeps it until it continues or ends)")  # fmt: skip
                    said = True
                if stop.wait(0.1):
                    yield False
                    return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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

"""`bigjax sweep` for real: trials are `bigjax train` processes, the study is SQLite (or a real
PostgreSQL server, started by .ci/run), and the sweep process is killed and rerun."""

import fcntl
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
from conftest import FAST_COMPILE
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "lm_tiny.py")
# Trials of a few steps on one CPU device: each is a real training run (~10 s, mostly start-up).
QUICK = {
    "data.batch_size": 8,
    "data.seq_len": 64,
    "eval.num_batches": 1,
    "metrics.log_every": 1,
    "metrics.tensorboard": False,
    "metrics.plot": False,
    "optim.warmup_steps": 0,
}


def write_spec(path: Path, body: str) -> Path:
    path.write_text(
        "from bigjax.sweep import Grid, LogUniform, Sweep, ablation\n"
        f"TINY = {TINY!r}\nQUICK = {QUICK!r}\n\n" + textwrap.dedent(body)
    )
    return path


def sweep_env() -> dict:
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}  # 1 device per trial
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def sweep(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bigjax.cli", "sweep", *args],
        capture_output=True,
        text=True,
        env=sweep_env(),
        timeout=timeout,
        cwd=ROOT,
    )


def load(directory: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{directory / 'study.db'}")


@pytest.mark.slow
def test_grid_sweep_records_results_failures_and_resumes_without_rerunning(tmp_path):
    spec = write_spec(
        tmp_path / "sweep.py",
        """
        def get_sweep():
            return Sweep(
                name="grid",
                config=TINY,
                overrides={**QUICK, "num_steps": 4, "eval.every_steps": 2},
                space={"optim.lr": Grid((3e-3, 1e-2)), "data.path": Grid(("", "/no/such/dataset"))},
            )
        """,
    )
    out = tmp_path / "sweep"
    result = sweep(str(spec), "--workers", "2", "--dir", str(out))
    # Failed trials make the sweep fail, naming each and why.
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 trial(s) failed" in result.stderr and "/no/such/dataset" in result.stderr
    assert "bigjax report" in result.stdout  # two trials completed: there is a report
    study = load(out, "grid")
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(trials) == 4 and len(complete) == 2 and len(failed) == 2
    assert {t.params["optim.lr"] for t in complete} == {3e-3, 1e-2}
    assert all(t.params["data.path"] == "" for t in complete)
    for t in failed:  # the error is kept, readable
        assert "/no/such/dataset" in t.user_attrs["error"]
    for t in complete:  # the objective is the run's final eval loss
        summary = json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())
        assert summary["complete"] and summary["step"] == 4
        assert t.value == pytest.approx(summary["eval_loss"])
    assert len({t.user_attrs["run_dir"] for t in complete}) == 2  # one directory per config

    def mtimes() -> dict:
        return {p: p.stat().st_mtime for p in out.glob("runs/*/*") if p.is_file()}

    before = mtimes()
    again = sweep(str(spec), "--workers", "2", "--dir", str(out))
    assert again.returncode == 1 and "2 trial(s) failed" in again.stderr, again.stdout
    assert len(load(out, "grid").get_trials()) == 4  # nothing re-run, failures not retried
    assert mtimes() == before
    assert "fail 2" in again.stdout and "complete 2" in again.stdout

    report = subprocess.run(
        [sys.executable, "-m", "bigjax.cli", "report", str(out)],
        capture_output=True, text=True, env=sweep_env(), cwd=ROOT,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert (out / "report" / "objective_vs_optim_lr.png").exists()


@pytest.mark.slow
def test_median_pruner_stops_a_hopeless_trial(tmp_path):
    spec = write_spec(
        tmp_path / "sweep.py",
        """
        def get_sweep():
            return Sweep(
                name="prune",
                config=TINY,
                # 60 steps: the worker polls once a second, and a pruned trial must still be
                # running then (8 steps once took less than a poll).
                overrides={**QUICK, "num_steps": 60, "eval.every_steps": 2},
                # two good learning rates finish first, then one that cannot learn in 60 steps
                space={"optim.lr": Grid((1e-2, 5e-3, 1e-7))},
                pruner="median",
            )
        """,
    )
    out = tmp_path / "sweep"
    result = sweep(str(spec), "--workers", "1", "--dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = {t.params["optim.lr"]: t for t in load(out, "prune").get_trials()}
    assert trials[1e-2].state == TrialState.COMPLETE and trials[5e-3].state == TrialState.COMPLETE
    hopeless = trials[1e-7]
    assert hopeless.state == TrialState.PRUNED
    summary = json.loads((Path(hopeless.user_attrs["run_dir"]) / "summary.json").read_text())
    assert summary["step"] < 60  # it was stopped (and saved a checkpoint on its way out)


# A trial that must still be running when the test signals it: steps of 2 x 32 tokens
# (~10 ms each here, a fifth of QUICK's) and a checkpoint every 50 steps (a save costs ~10
# steps): the signal comes ~0.5 s after the first checkpoint, and `steps` leaves seconds more.
LONG_SPEC = """
def get_sweep():
    return Sweep(
        name={name!r},
        config=TINY,
        overrides={{**QUICK, "num_steps": {steps}, "eval.every_steps": {steps},
                   "data.batch_size": 2, "data.seq_len": 32, "checkpoint.every_steps": 50}},
        space={{"optim.lr": Grid((3e-3,))}},
    )
"""


def newest_step(out: Path) -> int:
    steps = [int(p.name) for p in out.glob("runs/*/checkpoints/*") if p.name.isdigit()]
    return max(steps, default=-1)


def start_until_checkpoint(spec: Path, out: Path, *extra: str, past: int = -1) -> subprocess.Popen:
    """Starts a one-trial sweep and returns once its trial has saved a checkpoint after step
    `past`."""
    args = [sys.executable, "-m", "bigjax.cli", "sweep", str(spec), "--dir", str(out), *extra]
    proc = subprocess.Popen(
        args, env=sweep_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while newest_step(out) <= past:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.5)
    return proc


def stall(proc: subprocess.Popen, db: Path) -> None:
    """Stops a sweep process as Ctrl-Z or a paused VM would (SIGSTOP), at a moment it holds
    no lock on its SQLite study: stopped inside a write, it keeps every other worker from the
    database until it continues (their one-line error: test_sweep_spec.py)."""
    for _ in range(100):
        proc.send_signal(signal.SIGSTOP)
        probe = sqlite3.connect(db, timeout=0.5, isolation_level=None)
        try:
            probe.execute("BEGIN EXCLUSIVE")  # fails while it reads or writes the database
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.2)
        finally:
            probe.close()
    raise AssertionError("the sweep held its study database's lock at every try")


@pytest.mark.slow
def test_killed_sweep_continues_and_the_trial_resumes_from_its_checkpoint(tmp_path):
    from bigjax.sweep.database import MAX_RETRIES

    spec = tmp_path / "sweep.py"
    write_spec(spec, LONG_SPEC.format(name="kill", steps=600))
    out = tmp_path / "sweep"
    # Killed more often than a trial that saves nothing is retried (a preempted machine): each
    # attempt saved a new checkpoint, so none of the deaths counts against the trial.
    kills, step = MAX_RETRIES + 1, -1
    for kill in range(1, kills + 1):
        proc = start_until_checkpoint(spec, out, "--heartbeat", "1", past=step)
        proc.send_signal(signal.SIGKILL)  # no clean-up at all: heartbeats stop
        proc.wait()
        # The trial process notices its parent died (SIGTERM), saves and exits on its own.
        (run_dir,) = out.glob("runs/*")
        deadline = time.monotonic() + 120
        while (run_dir / "train.log").read_text().count("done: step") < kill:
            assert time.monotonic() < deadline, (run_dir / "train.log").read_text()
            time.sleep(0.5)
        step = newest_step(out)  # its save on SIGTERM included: the next attempt goes past it

    result = sweep(str(spec), "--dir", str(out), "--heartbeat", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(out, "kill").get_trials()
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE"] + ["FAIL"] * kills  # each dead worker's attempt, a retry
    log = (run_dir / "train.log").read_text()
    assert log.count("fresh start") == 1 and "resuming from step" in log
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 600


def test_a_trial_is_retried_while_it_progresses_and_given_up_with_the_reason(tmp_path):
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from bigjax.sweep import database, results

    study = optuna.create_study()
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    first = create_trial(
        state=TrialState.FAIL,  # as fail_stale_trials hands it over: its worker died
        params={"optim.lr": 1e-3},
        distributions={"optim.lr": FloatDistribution(1e-4, 1e-2)},
        user_attrs={"run_dir": str(tmp_path / "run"), "start_step": -1},
    )
    attempt = first
    # Each attempt's worker dies; between deaths the trial saves these checkpoints (none, or
    # one Orbax is still writing, is no progress).
    saved = [None, "50", "100", "150.orbax-checkpoint-tmp-7", None, None]
    for name in saved:
        if name:
            (checkpoints / name).mkdir()
        database.retry_stale(study, attempt)
        attempt = study.trials[-1]
    states = [t.state for t in study.trials]
    # deaths without a new checkpoint in a row: 1, 0, 0, 1, 2, 3; the third is given up
    assert states == [TrialState.WAITING] * 5 + [TrialState.FAIL]
    assert [t.system_attrs["stalled_attempts"] for t in study.trials] == [1, 0, 0, 1, 2, 3]
    assert study.trials[-1].params == {"optim.lr": 1e-3}  # the same point throughout
    (line,) = results.failures(study)  # listed: the command exits 1 naming it
    assert "died 3 times in a row without the trial saving a checkpoint past step 100" in line


@pytest.mark.slow
def test_a_stale_trial_is_retried_once_however_many_workers_fail_it(tmp_path):
    # Found by killing a 2-worker SQLite sweep at random moments: both worker threads failed
    # the same stale trial (SQLite has no row locks) and each enqueued a retry: one point ran
    # twice, and its retries ran out twice as fast.
    import threading

    from bigjax.sweep import database, runner
    from bigjax.sweep.spec import Grid, Sweep

    url = f"sqlite:///{tmp_path / 'study.db'}"
    points = tuple(1e-3 * (i + 1) for i in range(8))
    spec = Sweep(name="stale", config=TINY, space={"optim.lr": Grid(points)})
    opts = runner.Options(directory=tmp_path, storage=url, workers=2, heartbeat_s=1.0)
    workers = []
    for _ in range(8):  # as 8 processes: a database connection each
        storage = database.make_storage(url, opts.heartbeat_s)
        workers.append(runner.Worker(spec, runner.open_study(spec, storage, opts), storage, opts))
    for _ in points:
        trial = workers[0].pop()
        workers[0].storage.record_heartbeat(trial._trial_id)
    time.sleep(4.5)  # past the grace of 3 s (SQLite keeps whole seconds): all are stale
    start = threading.Barrier(len(workers))

    def fail(worker):
        start.wait()
        worker.fail_stale()

    threads = [threading.Thread(target=fail, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trials = load(tmp_path, "stale").get_trials()
    waiting = [t.params or t.system_attrs["fixed_params"] for t in trials
               if t.state == TrialState.WAITING]  # fmt: skip
    assert len(trials) == 2 * len(points)  # the failed attempts, one retry each
    assert sorted(p["optim.lr"] for p in waiting) == list(points)


needs_postgres = pytest.mark.skipif(
    not os.environ.get("BIGJAX_TEST_POSTGRES_URL") and os.environ.get("CI") != "true",
    reason="needs a PostgreSQL server: set BIGJAX_TEST_POSTGRES_URL (.ci/run starts one)",
)


def postgres_url() -> str:
    url = os.environ.get("BIGJAX_TEST_POSTGRES_URL")
    assert url, "CI must provide BIGJAX_TEST_POSTGRES_URL (a PostgreSQL server .ci/run starts)"
    return url


@needs_postgres
def test_workers_racing_to_create_the_tables_all_start():
    # Found in CI: workers starting together on a fresh database race to create Optuna's
    # tables and the losers died (duplicate CREATE TYPE). Without the retry, 12 of 16 such
    # starts failed here.
    import psycopg

    url = postgres_url()
    fresh = f"race{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {fresh}")
    try:
        fresh_url = url.rsplit("/", 1)[0] + "/" + fresh
        code = f"from bigjax.sweep.database import make_storage; make_storage({fresh_url!r}, 10)"
        procs = [
            subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errors
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {fresh} WITH (FORCE)")


@needs_postgres
def test_three_workers_share_a_postgres_study(tmp_path):
    url = postgres_url()
    name = f"pg{os.getpid()}{int(time.time())}"
    spec = write_spec(
        tmp_path / "sweep.py",
        f"""
        def get_sweep():
            return Sweep(
                name={name!r},
                config=TINY,
                overrides={{**QUICK, "num_steps": 2, "eval.every_steps": 2}},
                space={{"optim.lr": Grid((1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3))}},
            )
        """,
    )
    out = tmp_path / "sweep"  # a shared directory, as on NFS/GCS-fuse
    args = [sys.executable, "-m", "bigjax.cli", "sweep", str(spec), "--dir", str(out),
            "--storage", url]  # fmt: skip
    # all three start at once: one creates the study, the others join it
    procs = [
        subprocess.Popen(args + (["--worker"] if i else []), env=sweep_env(), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(3)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.params["optim.lr"] for t in trials) == [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3]
    # every trial ran in exactly one worker, once
    started = [line for o in outputs for line in o.splitlines() if " -> " in line]
    assert len(started) == 6, outputs
    for run_dir in {t.user_attrs["run_dir"] for t in trials}:
        assert (Path(run_dir) / "train.log").read_text().count("fresh start") == 1
    optuna.delete_study(study_name=name, storage=url)


@pytest.mark.slow
def test_ctrl_c_stops_trials_cleanly_and_requeues_them(tmp_path):
    spec = tmp_path / "sweep.py"
    write_spec(spec, LONG_SPEC.format(name="stop", steps=600))
    out = tmp_path / "sweep"
    proc = start_until_checkpoint(spec, out)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "interrupted: re-enqueued" in output
    trials = load(out, "stop").get_trials()
    assert sorted(t.state.name for t in trials) == ["FAIL", "WAITING"]
    (run_dir,) = out.glob("runs/*")
    assert "stopped by SIGTERM" in (run_dir / "train.log").read_text()  # saved on its way out

    result = sweep(str(spec), "--dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    states = sorted(t.state.name for t in load(out, "stop").get_trials())
    assert states == ["COMPLETE", "FAIL"]
    assert "resuming from step" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_stalled_worker_never_runs_two_trainers_and_wakes_without_crashing(tmp_path):
    # Worker A's process is stopped (Ctrl-Z, a paused VM) past the heartbeat grace while its
    # trainer (its own session) keeps running; worker B fails A's attempt as stale and takes
    # the retry. B must wait for A's trainer to release the run directory; A, resumed, must
    # stop its trainer and leave the result to B, without crashing or reporting twice.
    spec = tmp_path / "sweep.py"
    write_spec(spec, LONG_SPEC.format(name="stall", steps=1500))
    out = tmp_path / "sweep"
    a = start_until_checkpoint(spec, out, "--heartbeat", "1")
    (run_dir,) = out.glob("runs/*")
    stall(a, out / "study.db")
    try:
        args = [sys.executable, "-m", "bigjax.cli", "sweep", str(spec), "--dir", str(out)]
        b = subprocess.Popen(
            [*args, "--heartbeat", "1"], env=sweep_env(), cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        seen = ""
        while "waiting for the trainer of an earlier attempt" not in seen:
            assert time.monotonic() < deadline and b.poll() is None, seen
            seen += b.stdout.readline()
        assert (run_dir / "train.log").read_text().count("bigjax ") == 1  # one trainer so far
    finally:
        a.send_signal(signal.SIGCONT)
    a_out, _ = a.communicate(timeout=600)
    b_out, _ = b.communicate(timeout=600)
    assert a.returncode == 0, a_out[-3000:]
    assert "another took the trial over" in a_out and "Cannot tell" not in a_out
    assert b.returncode == 0, b_out[-3000:]
    states = sorted(t.state.name for t in load(out, "stall").get_trials())
    assert states == ["COMPLETE", "FAIL"]  # A's attempt (failed as stale), B's retry
    log = (run_dir / "train.log").read_text()
    assert log.count("fresh start") == 1 and "resuming from step" in log
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 1500


@pytest.mark.slow
def test_a_trial_that_completes_while_its_worker_is_stalled_keeps_its_result(tmp_path):
    # Worker A stalls past the heartbeat grace; its trainer (its own session) finishes the
    # trial meanwhile. Worker B fails A's attempt as stale and runs the retry, whose trainer
    # finds the run complete: the retry must record the run's result, not "no final eval".
    spec = tmp_path / "sweep.py"
    write_spec(spec, LONG_SPEC.format(name="done", steps=120))
    out = tmp_path / "sweep"
    a = start_until_checkpoint(spec, out, "--heartbeat", "1")
    (run_dir,) = out.glob("runs/*")
    stall(a, out / "study.db")
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "summary.json").exists():  # A's trainer completes on its own
            assert time.monotonic() < deadline
            time.sleep(0.5)
        b = sweep(str(spec), "--dir", str(out), "--heartbeat", "1")
    finally:
        a.send_signal(signal.SIGCONT)
    a_out, _ = a.communicate(timeout=600)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    assert a.returncode == 0 and "another took the trial over" in a_out, a_out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    trials = load(out, "done").get_trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "FAIL"]  # stale A, retry B
    (done,) = [t for t in trials if t.state == TrialState.COMPLETE]
    assert done.value == summary["eval_loss"] and summary["complete"]
    assert "already complete" in (run_dir / "train.log").read_text()  # B's retry ran train


@pytest.mark.slow
def test_a_claim_lock_kept_by_a_stopped_worker_is_said_and_waited_for(tmp_path):
    # A worker stopped (Ctrl-Z) inside a claim keeps the SQLite study's claim lock: the others
    # waited on it in silence, and Ctrl-C could not stop them. Now the wait is said, it ends
    # when the lock is let go, and a stop asked meanwhile ends the sweep at once.
    spec = write_spec(
        tmp_path / "sweep.py",
        """
        def get_sweep():
            return Sweep(name="claim", config=TINY, overrides={**QUICK, "num_steps": 2},
                         space={"optim.lr": Grid((1e-3,))})
        """,
    )
    out = tmp_path / "sweep"
    out.mkdir()
    args = [sys.executable, "-m", "bigjax.cli", "sweep", str(spec), "--dir", str(out)]
    procs: list[subprocess.Popen] = []

    def start_waiting() -> tuple[subprocess.Popen, list[str]]:
        proc = subprocess.Popen(
            args, env=sweep_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        procs.append(proc)
        lines: list[str] = []  # read by a thread: a silent wait must fail the test, not hang it
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 120
        while "waiting for the study's claim lock" not in "".join(lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        assert "held it for 5 s" in "".join(lines) and "stopped with Ctrl-Z" in "".join(lines)
        return proc, lines

    try:
        with open(out / "study.db.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # what a worker stopped inside a claim holds
            stopped, said = start_waiting()
            stopped.send_signal(signal.SIGINT)
            assert stopped.wait(timeout=60) == 0 and not list(out.glob("runs/*")), said
            proc, said = start_waiting()
            assert not list(out.glob("runs/*"))  # no trial taken without the lock
            fcntl.flock(lock, fcntl.LOCK_UN)
            assert proc.wait(timeout=600) == 0, said
    finally:
        for p in procs:
            p.kill()
    assert [t.state.name for t in load(out, "claim").get_trials()] == ["COMPLETE"]


@pytest.mark.slow
def test_a_sweep_whose_every_trial_fails_exits_1_and_suggests_no_report(tmp_path):
    spec = write_spec(
        tmp_path / "sweep.py",
        """
        def get_sweep():
            return Sweep(name="doomed", config=TINY, overrides=QUICK,
                         space={"data.path": Grid(("/no/such/dataset",))})
        """,
    )
    result = sweep(str(spec), "--dir", str(tmp_path / "sweep"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 trial(s) failed" in result.stderr and "/no/such/dataset" in result.stderr
    assert "train.log" in result.stderr  # where to read the whole story
    assert "bigjax report" not in result.stdout  # it would only fail: nothing completed


def test_failures_are_the_failed_trials_no_retry_completed():
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from bigjax.sweep import results

    study = optuna.create_study()
    lr = {"optim.lr": FloatDistribution(1e-4, 1e-2)}

    def add(value, state, **attrs):
        study.add_trial(create_trial(params={"optim.lr": value}, distributions=lr, state=state,
                                     value=1.0 if state == TrialState.COMPLETE else None,
                                     user_attrs=attrs))  # fmt: skip

    add(1e-3, TrialState.FAIL, error="exit code 1\nbigjax: error: boom", run_dir="/r/a")
    add(2e-3, TrialState.FAIL, error="exit code 1\nbigjax: error: retried")
    add(2e-3, TrialState.COMPLETE)  # its retry completed: not a failure any more
    add(3e-3, TrialState.FAIL, interrupted=True)  # re-enqueued, not failed
    (line,) = results.failures(study)
    assert line == "trial 0 {'optim.lr': 0.001}: bigjax: error: boom (log: /r/a/train.log)"
    assert "FAIL trial 0" in results.summary(study) and "complete 1" in results.summary(study)


def test_a_non_finite_eval_is_not_reported_and_not_the_best(tmp_path):
    # A trial whose eval overflowed at step 10 (bigjax writes a non-finite number as null)
    # and recovered: reading it used to raise TypeError in the worker thread, ending the sweep
    from bigjax.sweep import results

    rows = [{"step": 10, "eval_loss": None}, {"step": 20, "eval_loss": 3.5},
            {"step": 30, "eval_loss": 3.0}, {"step": 40, "eval_loss": 3.25}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"complete": True, "eval_loss": 3.25}))
    evals = results.read_evals(tmp_path)
    assert [s for s, _ in evals] == [10, 20, 30, 40] and math.isnan(evals[0][1])
    assert results.objective_value(tmp_path, "best_eval_loss") == 3.0
    assert results.objective_value(tmp_path, "eval_loss") == 3.25
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "eval_loss": null}\n')
    assert results.objective_value(tmp_path, "best_eval_loss") is None  # no finite eval

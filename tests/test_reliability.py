"""Never lose a run: kills, preemption, other meshes, corrupt checkpoints, NaNs, init-from."""

import hashlib
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config, xla_flags
from helpers import train_cmd

from bigjax.checkpoint import CheckpointError
from bigjax.metrics import read_jsonl
from bigjax.train import NonFiniteError, train

ROOT = Path(__file__).resolve().parents[1]
# A small run: tiny model, seq 64, every step logged. The data do not depend on the number of
# Grain workers (docs/data.md), so runs with and without one are compared bitwise; the tests
# about worker processes add one (WORKER), the rest save its start-up (~2 CPU-s a run).
WORKER = "--config.data.num_workers=1"
ARGS = [
    "--config.data.seq_len=64",
    "--config.metrics.log_every=1",
    "--config.optim.warmup_steps=2",
    "--config.metrics.tensorboard=false",
    "--config.metrics.plot=false",
    "--config.eval.num_batches=1",
]


def _cmd(workdir: Path, *extra: str) -> list[str]:
    return train_cmd(workdir, *ARGS, *extra)


def _env(devices: int = 8) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": xla_flags(devices)}


def _run(workdir: Path, *extra: str, devices: int = 8, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(workdir, *extra),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(devices),
        timeout=600,
        **kw,
    )


def _start(workdir: Path, *extra: str) -> subprocess.Popen:
    """`bigjax train` in the background, its output readable as text."""
    return subprocess.Popen(_cmd(workdir, *extra), cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _losses(workdir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]


def _wait_for_step(workdir: Path, proc: subprocess.Popen, step: int, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = workdir / "metrics.jsonl"
        if path.exists() and any(s >= step for s, _ in _losses(workdir)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never logged")


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended while we looked
            continue
    return out


def _params_hash(workdir: Path, step: int) -> str:
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(workdir.absolute() / "checkpoints" / str(step) / "state")
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree["params"]):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("runs") / "full"
    r = _run(workdir, "--config.num_steps=12", "--config.checkpoint.every_steps=3")
    assert r.returncode == 0, r.stderr[-2000:]
    return workdir


@pytest.mark.slow
def test_sigkill_at_any_step_then_relaunch_is_bitwise_identical(uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(workdir, "--config.num_steps=12", "--config.checkpoint.every_steps=3", WORKER),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_step(workdir, proc, 7)  # past the step-6 checkpoint, before the step-9 one
    workers = _children(proc.pid)
    assert workers  # the Grain worker process
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (workdir / "checkpoints").is_dir()
    # the workers notice their trainer is gone and exit (they poll once a second)
    deadline = time.time() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "orphaned workers"
    r = _run(workdir, "--config.num_steps=12", "--config.checkpoint.every_steps=3", WORKER)
    assert r.returncode == 0 and "resuming from step" in r.stdout, r.stderr[-2000:]
    assert _losses(workdir) == _losses(uninterrupted)  # every step once, bitwise equal
    assert _params_hash(workdir, 12) == _params_hash(uninterrupted, 12)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(uninterrupted, tmp_path):
    workdir = tmp_path / "preempted"
    proc = _start(workdir, "--config.num_steps=12", "--config.checkpoint.every_steps=100")
    _wait_for_step(workdir, proc, 4)
    # SIGTERM keeps coming until the process exits, as from a scheduler that repeats its
    # notice or PR_SET_PDEATHSIG firing per thread of a dying parent: none may abort the save.
    deadline = time.monotonic() + 60  # bounded: the step in flight plus one save
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err[-2000:]
    assert "received SIGTERM: saving step" in out
    stopped = int(out.split("received SIGTERM: saving step ")[1].split()[0])
    assert stopped < 12 and (workdir / "checkpoints" / str(stopped)).is_dir()
    r = _run(workdir, "--config.num_steps=12", "--config.checkpoint.every_steps=100")
    assert r.returncode == 0 and f"resuming from step {stopped}" in r.stdout
    assert _losses(workdir) == _losses(uninterrupted)


@pytest.mark.slow
def test_a_stop_during_an_eval_leaves_it_and_the_relaunch_evaluates_that_step(tmp_path):
    # A preemption notice gives ~30 s, and an eval of benchmarks can take minutes: a stop that
    # waited for the eval lost the steps since the last checkpoint to the kill that followed.
    # The eval (100 batches, ~2 s here) is left at its next batch, the step saved, and the
    # relaunch evaluates that step first: the metrics equal an uninterrupted run's, eval rows
    # and their order included.
    slow_eval = ("--config.num_steps=6", "--config.eval.every_steps=3",
                 "--config.eval.num_batches=100",
                 "--config.checkpoint.every_steps=100")  # fmt: skip
    whole = tmp_path / "whole"
    assert _run(whole, *slow_eval).returncode == 0
    workdir = tmp_path / "stopped"
    proc = _start(workdir, *slow_eval)
    _wait_for_step(workdir, proc, 3)  # the eval of step 3 starts once its row is written
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "received SIGTERM during the eval of step 3: left unfinished." in out, out
    assert "saving step 3 and stopping" in out
    assert not any("eval_loss" in r for r in read_jsonl(workdir / "metrics.jsonl"))
    # stopped again in the relaunch's catch-up eval: it trains no step past the one it owes
    proc = _start(workdir, *slow_eval)
    banner = proc.stdout.readline()  # printed once restored, before the catch-up eval
    assert "resuming from step 3" in banner, banner + proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "received SIGTERM during the eval of step 3: left unfinished." in out, out
    assert max(s for s, _ in _losses(workdir)) == 3
    r = _run(workdir, *slow_eval)
    assert r.returncode == 0 and "resuming from step 3" in r.stdout, r.stderr[-2000:]
    assert r.stdout.index("eval @ 3") < r.stdout.index("step 4/6")

    def rows(run):
        return [
            (x["step"], x.get("loss"), x.get("eval_loss"))
            for x in read_jsonl(run / "metrics.jsonl")
        ]

    assert rows(workdir) == rows(whole)  # bitwise: the same batches, in the same order


def _boundary_rows(step_dir: Path) -> int:
    """Rows of a saved data state that stopped exactly at a document boundary (no document
    half-packed): the state whose JSON form Grain misread, dropping a document on resume."""
    rows = {}
    for f in (step_dir / "data").glob("process_*.json"):
        rows.update(json.loads(f.read_text())["rows"])
    return sum(r["remainder_slices"]["tokens"] == [-1, -1] for r in rows.values())


@pytest.mark.slow
def test_resume_from_step_1_and_from_a_mid_run_step_is_bitwise(uninterrupted, tmp_path):
    # Step 1: SIGTERM during the first compile saves step 1 (every row's state is then at a
    # document boundary); the relaunch must continue the same data order.
    first = tmp_path / "first"
    proc = _start(first, "--config.num_steps=12", "--config.checkpoint.every_steps=3")
    assert proc.stdout is not None
    banner = proc.stdout.readline()  # printed inside the signal handlers, before compiling
    assert banner.startswith("bigjax "), banner + proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "saving step 1 and stopping" in out, err[-2000:]
    assert _boundary_rows(first / "checkpoints" / "1") > 0
    # The relaunch saves every step from there (saving changes nothing: the losses are those
    # of the run that saved every third), so its mid-run steps are resume points too.
    every = ("--config.num_steps=12", "--config.checkpoint.every_steps=1",
             "--config.checkpoint.keep=12")  # fmt: skip
    r = _run(first, *every)
    assert r.returncode == 0 and "resuming from step 1" in r.stdout, r.stderr[-2000:]
    assert _losses(first) == _losses(uninterrupted)
    assert _params_hash(first, 12) == _params_hash(uninterrupted, 12)

    # A mid-run step whose state has a row at a document boundary.
    boundary = [k for k in range(2, 12) if _boundary_rows(first / "checkpoints" / str(k))]
    assert boundary, "no saved step stopped a row at a document boundary"
    step = boundary[len(boundary) // 2]
    resumed = tmp_path / "resumed"
    shutil.copytree(first / "checkpoints" / str(step), resumed / "checkpoints" / str(step))
    r = _run(resumed, "--config.num_steps=12", "--config.checkpoint.every_steps=3")
    assert r.returncode == 0 and f"resuming from step {step}" in r.stdout, r.stderr[-2000:]
    assert _losses(resumed) == [x for x in _losses(uninterrupted) if x[0] > step]
    assert _params_hash(resumed, 12) == _params_hash(uninterrupted, 12)


def _on_a_terminal(command: list[str]) -> tuple[subprocess.Popen, Callable[[], None]]:
    """Starts `command` on a new pseudo-terminal, as its controlling terminal (as a shell in
    an SSH session runs it); returns the process and a function that hangs the terminal up
    (closes its master side, as a dropped connection does)."""
    master, slave = os.openpty()
    # In the new session, make the terminal on stdin the controlling one, then run `command`
    # with SIGHUP at its default, as a login shell has it: pytest itself may run under nohup
    # (SIGHUP ignored, inherited), and bigjax keeps an ignored SIGHUP ignored, as it should.
    take_tty = (
        "import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "signal.signal(signal.SIGHUP, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    )
    proc = subprocess.Popen([sys.executable, "-c", take_tty, *command], stdin=slave,
                            stdout=slave, stderr=slave, cwd=ROOT, env=_env(),
                            start_new_session=True)  # fmt: skip
    os.close(slave)
    stop = threading.Event()

    def drain() -> None:  # a terminal shows what it is sent: unread, a full buffer blocks
        while not stop.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    os.read(master, 1 << 16)
                except OSError:
                    return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()

    def hang_up() -> None:
        stop.set()
        reader.join()
        os.close(master)

    return proc, hang_up


@pytest.mark.slow
def test_a_terminal_hangup_saves_and_the_run_resumes_bitwise(uninterrupted, tmp_path):
    # libtpu ignores SIGHUP from its start-up on; the run then died at its next write to the
    # dead terminal, losing every step since the last checkpoint. A hangup is now a stop
    # request like SIGTERM; the Grain worker (same process group) leaves it to the trainer.
    workdir = tmp_path / "hungup"
    args = ["--config.num_steps=12", "--config.checkpoint.every_steps=100", WORKER]
    proc, hang_up = _on_a_terminal(_cmd(workdir, *args))
    _wait_for_step(workdir, proc, 2)
    hang_up()
    assert proc.wait(timeout=300) == 0
    stopped = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert 2 <= stopped < 12  # saved where it stopped, not at a periodic checkpoint
    r = _run(workdir, *args)
    assert r.returncode == 0 and f"resuming from step {stopped}" in r.stdout, r.stderr[-2000:]
    assert _losses(workdir) == _losses(uninterrupted)


@pytest.mark.slow
def test_a_closed_stdout_does_not_end_the_run(tmp_path):
    # `bigjax train ... | head -1`: the reader leaves after one line; every later write to
    # stdout fails (EPIPE). The run must train to its end anyway.
    proc = _start(tmp_path, "--config.num_steps=2")
    assert proc.stdout is not None and proc.stdout.readline().startswith("bigjax ")
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert json.loads((tmp_path / "summary.json").read_text())["complete"]
    # Started with no stdin, stdout or stderr at all (`<&- >&- 2>&-`): descriptors 0-2 get
    # /dev/null, else the next files opened would take their numbers and logs meant for
    # "stderr" would land in them (here a dataset's files, which must stay valid).
    doc = Path(json.__file__).parent / "decoder.py"  # real text: passes the quality filters
    command = [sys.executable, "-m", "bigjax.cli", "prepare", "--input", str(doc),
               "--output", str(tmp_path / "ds"), "--workers", "1"]  # fmt: skip
    script = f"exec {shlex.join(command)} <&- >&- 2>&-"
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=_env(), timeout=600)
    assert r.returncode == 0
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["documents_out"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("mesh, devices", [("2,2,2", 8), ("1,4,1", 4), ("2,1,2", 4)])
def test_resume_on_another_mesh(uninterrupted, tmp_path, mesh, devices):
    workdir = tmp_path / "moved"
    shutil.copytree(uninterrupted / "checkpoints" / "9", workdir / "checkpoints" / "9")
    r = _run(
        workdir,
        "--config.num_steps=12",
        "--config.checkpoint.every_steps=3",
        f"--config.mesh.shape={mesh}",
        devices=devices,
    )
    assert r.returncode == 0 and "resuming from step 9" in r.stdout, r.stderr[-2000:]
    got, ref = dict(_losses(workdir)), dict(_losses(uninterrupted))
    assert sorted(got) == [10, 11, 12]
    # Same data, restored state resharded: only reduction order differs (f32, 1e-5 relative).
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=1e-5)


def _train_with_checkpoints(workdir: Path, steps: int, **groups):
    cfg = tiny_config(num_steps=steps, checkpoint={"every_steps": 4, "keep": 3}, **groups)
    return train(cfg, workdir)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    _train_with_checkpoints(tmp_path, 8)
    # a save killed mid-write: Orbax's uncommitted temporary directory is never listed
    shutil.copytree(
        tmp_path / "checkpoints" / "8", tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1234"
    )
    # the newest committed checkpoint is garbled: truncate every array file in it
    for f in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name.lower():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"checkpoints/8 is unreadable"):
        _train_with_checkpoints(tmp_path, 10)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r][-6:] == [5, 6, 7, 8, 9, 10]  # from step 4


@pytest.mark.slow
def test_unreadable_checkpoints_never_become_a_fresh_start(tmp_path):
    _train_with_checkpoints(tmp_path, 4)
    for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="refusing to start from scratch"):
        with pytest.warns(UserWarning):
            _train_with_checkpoints(tmp_path, 8)


@pytest.mark.slow
def test_another_model_shape_lists_the_mismatches(tmp_path):
    _train_with_checkpoints(tmp_path, 4)
    with pytest.raises(
        CheckpointError,
        match=r"(?s)another model shape.*mlp/down_FD: "
        r"checkpoint \[2, 384, 128\] vs model \[2, 256, 128\]",
    ):
        _train_with_checkpoints(tmp_path, 8, model={"d_ff": 256})


@pytest.mark.slow
def test_another_batch_size_cannot_continue_the_data_order(tmp_path):
    _train_with_checkpoints(tmp_path, 4)
    with pytest.raises(
        CheckpointError, match=r"checkpoints/4: .*data.batch_size=16, this run has 8"
    ):
        _train_with_checkpoints(tmp_path, 8, data={"batch_size": 8})


@pytest.mark.slow
def test_failed_async_save_is_a_clear_error(tmp_path):
    # A 256 KiB file-size limit makes every checkpoint write fail as a full disk would
    # (SIGXFSZ ignored, so writes fail with EFBIG instead of killing the process).
    args = _cmd(tmp_path, "--config.num_steps=6", "--config.checkpoint.every_steps=2")
    script = f'trap "" XFSZ; ulimit -f 256; exec {shlex.join(args)}'
    r = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "bigjax: error: saving a checkpoint" in r.stderr and "disk space" in r.stderr
    assert not (tmp_path / "checkpoints").exists()  # no checkpoint: only error.log is left
    assert "saving a checkpoint" in (tmp_path / "error.log").read_text()


DIVERGE = {"name": "sgd", "lr": 1e4, "clip_norm": 0.0, "warmup_steps": 0, "schedule": "constant"}


@pytest.mark.slow
def test_nan_policy_error_names_the_step(tmp_path):
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient at step \d+"):
        train(tiny_config(num_steps=12, optim=DIVERGE), tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["error.log"]


@pytest.mark.slow
def test_nan_policy_skip_drops_updates_and_counts_them(tmp_path):
    last = train(tiny_config(num_steps=8, optim=DIVERGE, nan_policy="skip"), tmp_path)
    assert last["skipped_steps"] > 0
    assert "eval_loss" in last  # a skipped last step is still evaluated (its update dropped)
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(tmp_path.absolute() / "checkpoints" / "8" / "state")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree["params"]))


@pytest.mark.slow
def test_nan_policy_rollback_restores_and_skips_then_gives_up(tmp_path, capsys):
    cfg = tiny_config(
        num_steps=12, optim=DIVERGE, nan_policy="rollback", checkpoint={"every_steps": 1}
    )
    with pytest.raises(NonFiniteError, match="gave up after 5 rollbacks"):
        train(cfg, tmp_path)  # this lr diverges on every batch: rollbacks cannot save it
    out = capsys.readouterr().out
    assert out.count("rolled back to step") == 5
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps))  # replayed steps are logged once


def test_each_rollback_at_a_step_skips_one_more_batch(tmp_path, capsys):
    # lr 1e30 overflows the parameters in step 1's update while its loss (the init's, on
    # that step's batch) stays finite: step 1 fails on every batch. Each rollback must drop
    # the batch that failed last, so the six tries see six batches (the init's losses on
    # them differ in the 3rd decimal); dropping only the first one, tries 2-6 all replayed
    # batch 2 (losses 6.6066, then 6.6139 five times) and the rollbacks were wasted.
    cfg = tiny_config(num_steps=2, optim={**DIVERGE, "lr": 1e30}, nan_policy="rollback",
                      checkpoint={"every_steps": 100})  # fmt: skip
    with pytest.raises(NonFiniteError, match="gave up after 5 rollbacks; last at step 1"):
        train(cfg, tmp_path)
    firsts = [line.split("| loss ")[1].split()[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith("step 1/2 ")]  # fmt: skip
    assert len(firsts) == 6 and len(set(firsts)) == 6, firsts


@pytest.mark.slow
def test_a_rollback_before_the_first_save_restarts_from_init_from(tmp_path, capsys):
    # A fine-tuning run that diverges before its first save must roll back to the weights it
    # started from, not to a random init (which would silently train from scratch).
    source = tmp_path / "source"
    train(tiny_config(num_steps=30, optim={"lr": 3e-3}, checkpoint={"every_steps": 30}), source)
    rows = [r for r in read_jsonl(source / "metrics.jsonl") if "loss" in r]
    random_loss, trained_loss = rows[0]["loss"], rows[-1]["loss"]
    assert random_loss - trained_loss > 1.0  # the two starts are far apart to begin with
    cfg = tiny_config(
        num_steps=4,
        optim=DIVERGE,
        nan_policy="rollback",
        checkpoint={"every_steps": 100, "init_from": str(source), "init_mode": "params"},
    )
    with pytest.raises(NonFiniteError, match="gave up after 5 rollbacks"):
        train(cfg, tmp_path / "finetune")
    out = capsys.readouterr().out
    assert out.count("rolled back to step 0") == 5
    # Step 1's loss is the starting weights' (before their update): on the first try and
    # after every rollback it is the source's trained loss (within 0.5 of it: another
    # batch), never the random init's. (The run leaves no metrics file: it failed before
    # its first checkpoint; the progress lines are what it printed.)
    firsts = [float(line.split("| loss ")[1].split()[0]) for line in out.splitlines()
              if line.startswith("step 1/4 ")]  # fmt: skip
    assert len(firsts) == 6, out
    assert all(abs(x - trained_loss) < 0.5 for x in firsts), (firsts, trained_loss, random_loss)


@pytest.mark.slow
def test_a_rollback_restores_interleaved_pipeline_layers_in_the_runs_order(tmp_path, capsys):
    # 2 stages x 2 laps keep the stacked layers stage-major in memory (bigjax/stages.py); the
    # rollback's restore must put them back in that order, not the model's. The lr warms up
    # into divergence: steps 1-2 are finite and saved, step 3's loss is huge but finite, step
    # 4 is not, so every rollback returns to step 2 and replays step 3 on the same batch.
    warmup_into_divergence = {**DIVERGE, "warmup_steps": 8}
    cfg = tiny_config(
        num_steps=8,
        mesh={"shape": (1, 2, -1, 1, 1)},
        model={"num_layers": 8, "pipeline_microbatches": 4, "pipeline_interleave": 2},
        optim=warmup_into_divergence,
        nan_policy="rollback",
        checkpoint={"every_steps": 2},
    )
    with pytest.raises(NonFiniteError, match="gave up after 5 rollbacks"):
        train(cfg, tmp_path)
    out = capsys.readouterr().out
    assert out.count("rolled back to step 2") == 5, out
    # Step 3's loss is state 2's on batch 3: the same to the last bit on the first try and
    # after every rollback (same program, inputs and devices). Layers restored in another
    # order would be another model, whose loss on that batch differs.
    replays = [line.split("| loss ")[1].split()[0] for line in out.splitlines()
               if line.startswith("step 3/8 ")]  # fmt: skip
    assert len(replays) == 6 and len(set(replays)) == 1, replays


@pytest.mark.slow
def test_init_from_params_and_full_state(tmp_path):
    source = tmp_path / "source"
    train(tiny_config(num_steps=6, checkpoint={"every_steps": 3}), source)
    # params: weights only, fresh step and optimizer (an lr of 1e-30 leaves weights as loaded)
    tiny_lr = {"name": "sgd", "lr": 1e-30, "warmup_steps": 0, "schedule": "constant"}
    finetune = tmp_path / "finetune"
    train(
        tiny_config(
            num_steps=1, optim=tiny_lr, checkpoint={"init_from": str(source), "init_mode": "params"}
        ),
        finetune,
    )
    assert _params_hash(finetune, 1) == _params_hash(source, 6)
    # full: continues from the source's step with its optimizer state
    cont = tmp_path / "continued"
    train(
        tiny_config(num_steps=8, checkpoint={"init_from": str(source), "init_mode": "full"}), cont
    )
    assert [r["step"] for r in read_jsonl(cont / "metrics.jsonl") if "loss" in r] == [7, 8]
    # precedence: the run's own checkpoint wins over init_from on relaunch
    last = train(
        tiny_config(num_steps=9, checkpoint={"init_from": str(source), "init_mode": "full"}), cont
    )
    assert last["step"] == 9 and _losses(cont)[-1][0] == 9


@pytest.mark.slow
def test_retention_keeps_latest_every_nth_and_best(tmp_path):
    cfg = tiny_config(
        num_steps=12,
        eval={"every_steps": 2},
        checkpoint={"every_steps": 2, "keep": 2, "keep_every": 4, "keep_best": 1},
    )
    train(cfg, tmp_path)
    evals = {
        r["step"]: r["eval_loss"]
        for r in read_jsonl(tmp_path / "metrics.jsonl")
        if "eval_loss" in r
    }
    best = min(evals, key=evals.get)
    kept = {int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()}
    assert kept == {10, 12} | {4, 8, 12} | {best}


def test_checkpoints_hold_no_pickles(uninterrupted):
    files = [f for f in (uninterrupted / "checkpoints").rglob("*") if f.is_file()]
    assert files
    for f in files:
        head = f.read_bytes()[:2]
        assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), f
    meta = json.loads((uninterrupted / "checkpoints" / "12" / "meta" / "metadata").read_text())
    assert meta["config"]["num_steps"] == 12 and meta["mesh"] == {
        "data": 1,
        "stage": 1,
        "fsdp": 8,
        "context": 1,
        "tensor": 1,
        "expert": 1,
    }

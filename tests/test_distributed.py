"""Multi-process JAX on localhost: 2 processes x 4 CPU devices, real coordinator, gloo."""

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_flags
from helpers import train_cmd

from bigjax.distributed import should_auto_initialize
from bigjax.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(
    workdir: Path, steps: int, processes: int, mesh: Sequence[str] = (), extra: Sequence[str] = ()
) -> list[subprocess.Popen]:
    """`processes` x (8 / processes) CPU devices train the same config on a (2, 2, 2) mesh
    (or `mesh`'s overrides); with 2 processes it is built as 2 slices (processes stand in for
    slices on CPU): the data axis over DCN, (1, 2, 2) inside each."""
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(8 // processes),
        "JAX_PLATFORMS": "cpu",
    }
    flags = lambda i: (  # noqa: E731
        ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes)]
        + ["--process_id", str(i)]
        if processes > 1
        else []
    )
    procs = [
        subprocess.Popen(
            train_cmd(
                workdir,
                f"--config.num_steps={steps}",
                "--config.data.seq_len=64",
                *(
                    mesh
                    or (
                        ["--config.mesh.shape=(1,2,2)", "--config.mesh.dcn_shape=(2,1,1)"]
                        if processes == 2
                        else ["--config.mesh.shape=(2,2,2)"]
                    )
                ),
                "--config.checkpoint.every_steps=3",
                "--config.metrics.log_every=1",
                "--config.metrics.tensorboard=false",
                "--config.eval.num_batches=1",
                *extra,
                *flags(i),
            ),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    return procs


def _launch(
    workdir: Path, steps: int, processes: int, mesh: Sequence[str] = (), extra: Sequence[str] = ()
) -> list[subprocess.CompletedProcess]:
    """`_start`, then waits: every process must exit 0."""
    return _finish(_start(workdir, steps, processes, mesh, extra))


def _finish(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=400)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    assert all(r.returncode == 0 for r in out), "\n".join(r.stderr[-2000:] for r in out)
    return out


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}


# Same global batches and mesh, so only the order of floating-point reductions differs (gloo
# across processes vs in-process all-reduce): f32 rounding, far below the 1e-2 a wrong batch
# or a lost update moves the loss.
RTOL = 1e-5


def _killed_after_step_6(run: Path, copy: Path) -> Path:
    """A copy of a finished 8-step run as it was when killed after step 6's checkpoint (the
    schedule depends on num_steps, so the runs compared must all be 8-step runs)."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "8")
    return copy


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoints_move_between_them(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(one, steps=8, processes=1)
    first = _launch(two, steps=8, processes=2)
    assert "over 8 cpu devices (process 0/2, 4 local)" in first[0].stdout
    assert "step" not in first[1].stdout  # only process 0 logs and writes metrics
    # 2 x 4 devices train exactly like 1 x 8: the data order is per global batch row
    ref, got = _losses(one), _losses(two)
    assert list(got) == list(range(1, 9))
    np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=RTOL)
    # every process takes part in the checkpoint: each saves the data state of its rows
    data = {p.name for p in (two / "checkpoints" / "6" / "data").iterdir()}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data
    # written by 2 processes, resumed by 1; and written by 1, resumed by 2
    for run, processes in ((two, 1), (one, 2)):
        resumed = _killed_after_step_6(run, tmp_path / f"{run.name}_to_{processes}")
        out = _launch(resumed, steps=8, processes=processes)
        assert "resuming from step 6" in out[0].stdout
        got = _losses(resumed)
        assert list(got) == list(range(1, 9))
        np.testing.assert_allclose([got[7], got[8]], [ref[7], ref[8]], rtol=RTOL)


@pytest.mark.slow
def test_a_corrupt_step_is_moved_aside_once_and_every_process_falls_back(tmp_path):
    # Each process judged the step and moved it aside itself: the slower one failed on the
    # step the other had moved, and the job aborted in jax's shutdown barrier.
    keep = ["--config.checkpoint.keep=3"]  # steps 3 and 6 are there when 8 is lost
    _launch(tmp_path / "full", steps=8, processes=2, extra=keep)
    ref = _losses(tmp_path / "full")
    run = _killed_after_step_6(tmp_path / "full", tmp_path / "run")
    step6 = run / "checkpoints" / "6"
    victim = max((p for p in step6.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    out = _launch(run, steps=8, processes=2, extra=keep)  # asserts both processes exit 0
    assert "resuming from step 3" in out[0].stdout  # only process 0 logs
    assert all("checkpoints/6 is unreadable or corrupt" in r.stderr for r in out)
    assert [p.name.split("-")[0] for p in (run / "checkpoints.corrupt").iterdir()] == ["6"]
    got = _losses(run)
    assert list(got) == list(range(1, 9))
    np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=RTOL)  # exact resume


@pytest.mark.slow
def test_a_stop_asked_of_one_process_stops_every_process_after_the_same_step(tmp_path):
    # A signal reaches each host by itself. Each process used to decide alone: the one asked
    # saved and waited in the save's barrier, the other in the next step's collectives, both
    # until killed (seen: both still running 120 s after the SIGTERM, nothing saved).
    run = tmp_path / "run"
    procs = _start(run, steps=16, processes=2)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or len(_losses(run)) < 2:  # past the compile
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # process 1 alone
    out = _finish(procs)  # asserts both exit 0
    stopped = int(out[0].stdout.split("received SIGTERM on process 1: saving step ")[1].split()[0])
    assert f"received SIGTERM: saving step {stopped} " in out[1].stdout  # the same step
    assert 2 <= stopped < 16 and f"done: step {stopped}, stopped by SIGTERM" in out[0].stdout
    data = {p.name for p in (run / "checkpoints" / str(stopped) / "data").iterdir()}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data  # both took part
    resumed = _launch(run, steps=16, processes=2)
    assert f"resuming from step {stopped}" in resumed[0].stdout
    assert list(_losses(run)) == list(range(1, 17))  # each step logged once


@pytest.mark.slow
def test_a_stop_during_an_eval_leaves_it_on_every_process_at_the_same_batch(tmp_path):
    # The eval's batches are collectives: a process that left the eval alone would leave the
    # other waiting in the next batch. Each batch, the processes read one vote and leave
    # together; the relaunch (process 0 reads the metrics, all hear its answer) runs the eval
    # it owes before step 4.
    run = tmp_path / "run"
    extra = ["--config.eval.every_steps=3", "--config.eval.num_batches=60",
             "--config.checkpoint.every_steps=100"]  # fmt: skip
    procs = _start(run, steps=6, processes=2, extra=extra)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or 3 not in _losses(run):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # process 1 alone, in the eval of step 3
    out = _finish(procs)  # asserts both exit 0
    assert "received SIGTERM on process 1 during the eval of step 3: left unfinished" in (
        out[0].stdout
    )
    assert "saving step 3 and stopping" in out[1].stdout
    resumed = _launch(run, steps=6, processes=2, extra=extra)
    assert resumed[0].stdout.index("eval @ 3") < resumed[0].stdout.index("step 4/6")
    rows = [(r["step"], "eval_loss" in r) for r in read_jsonl(run / "metrics.jsonl")]
    assert rows == [(1, False), (2, False), (3, False), (3, True), (4, False), (5, False),
                    (6, False), (6, True)]  # fmt: skip


@pytest.mark.slow
def test_a_held_out_split_smaller_than_one_process_share_evaluates_alike_on_two(tmp_path):
    # 5 held-out examples fill rows 0-4 of a 16-row batch: process 1 (rows 8-15) has none
    # at all, and its blank rows must still take the shape of real ones for the collective
    # eval steps; every extra batch is blank on both, so 1 and 2 processes score the same.
    import json

    from bigjax.data import examples
    from bigjax.tasks import TASKS

    rng = np.random.default_rng(0)
    path = tmp_path / "cls.jsonl"
    animals = ["cat", "dog", "bird"]
    lines = [json.dumps({"text": f"the {animals[k]} sat {i}", "label": int(k)})
             for i, k in enumerate(rng.integers(0, 3, 40))]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    held_out = len(examples.load(str(path), TASKS["classify"].examples, "validation", 0.1).records)
    assert 1 <= held_out <= 8, held_out  # all of them in process 0's rows
    extra = [f"--config.data.examples={path}", "--config.data.task=classify",
             "--config.data.packing=pad", "--config.data.eval_fraction=0.1",
             "--config.model.num_classes=3", "--config.eval.num_batches=3"]  # fmt: skip
    rows = {}
    for processes in (1, 2):
        _launch(tmp_path / str(processes), steps=1, processes=processes, extra=extra)
        rows[processes] = [r for r in read_jsonl(tmp_path / str(processes) / "metrics.jsonl")
                           if "eval_loss" in r][-1]  # fmt: skip
    for row in rows.values():
        assert row["eval_batches"] == 1  # the second batch is blank on every row
        assert abs(row["accuracy"] * held_out - round(row["accuracy"] * held_out)) < 1e-6
    assert rows[2]["accuracy"] == rows[1]["accuracy"]
    np.testing.assert_allclose(rows[2]["eval_loss"], rows[1]["eval_loss"], rtol=RTOL)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"TPU_WORKER_HOSTNAMES": "t1"}, False),
        ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, True),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ],
)
def test_auto_initialize_only_where_jax_can_find_the_coordinator(env, expected):
    assert should_auto_initialize(env) is expected


@pytest.mark.slow
def test_a_context_axis_across_processes_trains_like_one_process(tmp_path):
    # context 4 = 2 slices (processes) x 2 inside each, fsdp 2: every process holds all rows
    # but only its half of each row's (balanced) sequence, and the keys and values of a row
    # are gathered across the processes.
    one = ["--config.mesh.shape=(1,1,2,4,1)"]
    two = ["--config.mesh.shape=(1,1,2,2,1)", "--config.mesh.dcn_shape=(1,1,1,2,1)"]
    _launch(tmp_path / "one", steps=3, processes=1, mesh=one)
    _launch(tmp_path / "two", steps=3, processes=2, mesh=two)
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert list(got) == [1, 2, 3]
    np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=RTOL)


def test_a_stop_vote_is_read_a_step_later_and_names_the_process_asked():
    # the all-reduce itself, on one process's 8 devices (the two-process test above is the
    # real thing): a vote is dispatched after each step and decides the next one
    import jax

    from bigjax.signals import StopVote

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    asked: dict[str, str] = {}
    vote = StopVote(asked, mesh, together=True)
    assert [vote(), vote()] == [False, False]  # nobody asked
    asked["signal"] = "SIGHUP"
    assert vote() is False and not vote.now()  # this step's vote is in flight: the next stops
    asked.clear()  # as on a process the signal did not reach
    assert vote() is True and vote.now() and asked == {"signal": "SIGHUP on process 0"}
    alone: dict[str, str] = {}
    vote = StopVote(alone, mesh)  # one process: no vote, a stop asked is taken at once
    assert vote() is False
    alone["signal"] = "SIGTERM"  # during the step's eval, say: the loop stops before the next
    assert vote.now() and vote() is True

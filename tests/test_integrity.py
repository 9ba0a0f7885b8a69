"""Nothing corrupts a run silently: one writer per workdir, checksummed checkpoints, no
non-finite state on disk, validated restores, strict JSON, untrusted convert inputs."""

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config, xla_flags
from helpers import train_cmd

from bigjax import integrity, runlock
from bigjax.checkpoint import CheckpointError
from bigjax.metrics import read_jsonl
from bigjax.train import NonFiniteError, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--config.data.seq_len=64",
    "--config.data.batch_size=8",
    "--config.metrics.log_every=1",
    "--config.metrics.tensorboard=false",
    "--config.metrics.plot=false",
    "--config.eval.num_batches=1",
    "--config.optim.warmup_steps=2",
]


def _run(workdir: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(workdir, *SMALL, *extra),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": xla_flags()},
        timeout=timeout,
    )


def _trained(tmp_path_factory, *args: str) -> Path:
    d = tmp_path_factory.mktemp("trained") / "run"
    r = _run(d, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    return d


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """`bigjax train` of 4 steps with checkpoints 2 and 4, trained once for the tests that
    damage it: each takes its own copy (`_copy`), as if it had trained it itself."""
    return _trained(tmp_path_factory, "--config.num_steps=4", "--config.checkpoint.every_steps=2")


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """The same for 2 steps with one checkpoint, at step 2."""
    return _trained(tmp_path_factory, "--config.num_steps=2", "--config.checkpoint.every_steps=2")


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, dirs_exist_ok=True)
    return to


def _holder(workdir: Path) -> subprocess.Popen:
    """Another process holding the workdir's lock, as a live `bigjax train` does."""
    code = (
        "import sys, time; from pathlib import Path; from bigjax import runlock; "
        "runlock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_train_on_a_live_workdir_exits_2_naming_the_holder(tmp_path):
    holder = _holder(tmp_path)
    try:
        r = _run(tmp_path, "--config.num_steps=2")
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"pid {holder.pid} on " in r.stderr and "in use by another bigjax run" in r.stderr
        assert not (tmp_path / "checkpoints").exists()  # it wrote nothing
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel frees the flock
    holder.wait()
    assert not runlock.is_locked(tmp_path)
    r = _run(tmp_path, "--config.num_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"last trained by pid {holder.pid}" in r.stdout and "taking it over" in r.stdout
    assert runlock.holder(tmp_path) is None  # a clean exit leaves no record behind


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _largest_file(step_dir: Path) -> Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and "checksums" not in p.name]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.slow
def test_one_flipped_bit_is_caught_named_moved_aside_and_the_run_goes_on(tmp_path, four_steps):
    _copy(four_steps, tmp_path)
    step4 = tmp_path / "checkpoints" / "4"
    assert integrity.is_sealed(step4) and integrity.verify(step4) is None
    victim = _largest_file(step4)  # the tensor data
    _flip_bit(victim, victim.stat().st_size // 2)
    assert str(victim) in integrity.verify(step4)

    # Resumes from step 2, retrains 3-4 and saves step 4 again (no collision), then goes on.
    r = _run(tmp_path, "--config.num_steps=6", "--config.checkpoint.every_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoints/4 is unreadable or corrupt" in r.stderr
    assert str(victim.relative_to(tmp_path / "checkpoints")) in r.stderr  # names the file
    assert "resuming from step 2" in r.stdout
    corrupt = list((tmp_path / "checkpoints.corrupt").iterdir())
    assert [p.name.split("-")[0] for p in corrupt] == ["4"]  # kept for inspection
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    for step in (4, 6):
        assert integrity.verify(tmp_path / "checkpoints" / str(step)) is None
    # And the same relaunch again is a plain resume: nothing fails on every relaunch.
    r = _run(tmp_path, "--config.num_steps=6", "--config.checkpoint.every_steps=2")
    assert r.returncode == 0 and "already complete" in r.stdout


@pytest.mark.slow
def test_a_damaged_metrics_file_neither_stops_a_resume_nor_the_report(tmp_path, four_steps):
    # A flipped bit that leaves a byte no UTF-8 reader takes, a stray value and a torn line:
    # the resume rewrites the file without them (step 3's row is lost with its damage) and
    # `bigjax report` reads it; both used to stop with a UnicodeDecodeError traceback.
    from bigjax.report import ReportError, load_run, report

    _copy(four_steps, tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    third = next(i for i, line in enumerate(lines) if line.startswith(b'{"step": 3,'))
    lines[third] = lines[third].replace(b'"loss"', b'"lo\xf3s"', 1)
    metrics.write_bytes(b"".join(lines) + b"7\n" + b'{"step": 4, "lo')
    r = _run(tmp_path, "--config.num_steps=6", "--config.checkpoint.every_steps=2")
    assert r.returncode == 0 and "resuming from step 4" in r.stdout, r.stderr[-2000:]
    steps = [row["step"] for row in read_jsonl(metrics) if "loss" in row]
    assert steps == [1, 2, 4, 5, 6]
    assert metrics.read_bytes().decode("utf-8")  # the damage is gone, the file whole
    assert [step for step, _ in load_run(tmp_path).train] == [1, 2, 4, 5, 6]
    text, _ = report([tmp_path], tmp_path / "report")
    assert tmp_path.name in text
    (tmp_path / "summary.json").write_bytes(b'{"step": \xf6}')  # damaged: named, one line
    with pytest.raises(ReportError, match=r"summary.json is unreadable .*leave that run out"):
        report([tmp_path], tmp_path / "report")


def test_processes_share_the_hashing_and_one_of_them_finds_each_flip(tmp_path, four_steps):
    # every process hashed every file of the step: a pod's checkpoint read once per host;
    # each now hashes 1/n of the files, and `loading` shares the verdict
    _copy(four_steps, tmp_path)
    step4 = tmp_path / "checkpoints" / "4"
    victim = _largest_file(step4)
    _flip_bit(victim, victim.stat().st_size // 2)
    alone = integrity.verify(step4)
    assert alone is not None and str(victim) in alone
    for n in (2, 3):
        found = [integrity.verify(step4, (i, n)) for i in range(n)]
        assert sorted(f is None for f in found) == [False] + [True] * (n - 1)  # exactly one
    blind = found.index(None)  # a share that does not hash the flipped file
    (step4 / "state" / "extra").write_text("x")  # a check with no reading: every share does it
    assert "holds files the save did not write: state/extra" in integrity.verify(step4, (blind, 3))


def test_a_flipped_bit_in_the_checksums_is_blamed_on_them(tmp_path, four_steps):
    # A changed name in the list read as "a file is missing", a changed digest as "a data file
    # changed": the operator looked for damage where there was none. Any bit of the list that
    # changes what it says must name the list; one that changes nothing it says (a key's
    # spelling, the version) may pass, and nothing may ever blame another file.
    _copy(four_steps, tmp_path)
    step4 = tmp_path / "checkpoints" / "4"
    seal = step4 / integrity.CHECKSUMS
    original = seal.read_bytes()
    files = json.loads(original)["files"]
    rng = np.random.default_rng(0)
    for offset in rng.choice(len(original), size=300, replace=False):
        flipped = bytearray(original)
        flipped[offset] ^= 1 << int(rng.integers(8))
        seal.write_bytes(bytes(flipped))
        problem = integrity.verify(step4)
        try:
            same = json.loads(bytes(flipped))["files"] == files
        except (ValueError, KeyError, TypeError):
            same = False
        assert problem is None or integrity.CHECKSUMS in problem, (offset, problem)
        assert same or problem is not None, offset
    seal.write_bytes(original)
    assert integrity.verify(step4) is None


def test_the_hashing_is_shared_by_bytes_not_by_file_count():
    # by file count (every n-th name) one process could get every large file and the others
    # nothing to read; the shares cover every file once and are even in bytes
    sizes = {"big": 900, "a": 300, "b": 300, "c": 300, "tiny": 1}
    shares = [integrity._share(sizes, i, 2) for i in range(2)]
    assert shares[0] | shares[1] == set(sizes) and not shares[0] & shares[1]
    assert sorted(sum(sizes[n] for n in share) for share in shares) == [900, 901]
    assert integrity._share(sizes, 0, 1) == set(sizes)


def test_hidden_litter_is_not_damage_but_another_file_is(tmp_path, four_steps):
    # a Finder's .DS_Store or NFS's .nfsXXXX in a step made bigjax move it aside as corrupt
    _copy(four_steps, tmp_path)
    step4 = tmp_path / "checkpoints" / "4"
    for litter in (".DS_Store", "state/._manifest.ocdbt", ".nfs0000000001a2b3c4", "data/.x.swp"):
        (step4 / litter).write_text("not part of the checkpoint")
    assert integrity.verify(step4) is None
    (step4 / "notes.txt").write_text("mine")  # a visible file: the step was changed
    assert "holds files the save did not write: notes.txt" in integrity.verify(step4)


@pytest.mark.slow
def test_corrupt_final_checkpoint_does_not_fail_every_relaunch(tmp_path, four_steps):
    _copy(four_steps, tmp_path)
    for f in (tmp_path / "checkpoints" / "4").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "checksums" not in f.name:
            f.write_bytes(f.read_bytes()[:64])  # truncated, as by a bad copy
    for _ in range(2):
        r = _run(tmp_path, "--config.num_steps=4", "--config.checkpoint.every_steps=2")
        assert r.returncode == 0, r.stderr[-2000:]


def _data_state_files(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "data").glob("process_*-of-*.json"))


@pytest.mark.slow
@pytest.mark.parametrize("rows", ["null rows", "empty rows", "not a mapping"])
def test_valid_json_but_wrong_data_state_falls_back(tmp_path, rows, four_steps):
    _copy(four_steps, tmp_path)
    step4 = tmp_path / "checkpoints" / "4"
    (step4 / integrity.CHECKSUMS).unlink()  # as a checkpoint from before checksums existed
    for f in _data_state_files(step4):
        state = json.loads(f.read_text())
        if rows == "null rows":
            state["rows"] = {k: None for k in state["rows"]}
        elif rows == "empty rows":
            state["rows"] = {k: {} for k in state["rows"]}
        else:
            state = [1, 2]
        f.write_text(json.dumps(state))
    r = _run(tmp_path, "--config.num_steps=5", "--config.checkpoint.every_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoints/4 is unreadable or corrupt" in r.stderr and "MalformedDataState" in r.stderr
    assert "resuming from step 2" in r.stdout


@pytest.mark.slow
def test_unsealed_checkpoints_restore_with_a_warning(tmp_path, two_steps):
    # Written before checksums existed, or the run was killed between commit and checksums.
    _copy(two_steps, tmp_path)
    (tmp_path / "checkpoints" / "2" / integrity.CHECKSUMS).unlink()
    r = _run(tmp_path, "--config.num_steps=3", "--config.checkpoint.every_steps=2")
    assert r.returncode == 0 and "resuming from step 2" in r.stdout
    assert "no checksums" in r.stderr and "using it unverified" in r.stderr
    assert "async_save=false" in r.stderr  # says how that can have happened


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_a_step_killed_right_after_its_commit_is_sealed_and_resumes_verified(tmp_path):
    # The checksums go into Orbax's staging directory before the rename that commits a step:
    # a kill -9 the instant a step appears finds it sealed, and the relaunch verifies it.
    proc = subprocess.Popen(
        train_cmd(tmp_path, *SMALL, "--config.num_steps=40", "--config.checkpoint.every_steps=1"),
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": xla_flags()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not ((tmp_path / "checkpoints").is_dir() and _steps(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    for step in _steps(tmp_path):
        step_dir = tmp_path / "checkpoints" / str(step)
        assert integrity.is_sealed(step_dir) and integrity.verify(step_dir) is None, step
    newest = _steps(tmp_path)[-1]
    r = _run(tmp_path, f"--config.num_steps={newest + 1}", "--config.checkpoint.every_steps=1")
    assert r.returncode == 0 and f"resuming from step {newest}" in r.stdout, r.stderr[-2000:]
    assert "no checksums" not in r.stderr and "unverified" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "old, new", [(b'"adamw"', b'"adamv"'), (b'"d_model": 128', b'"d_model": 129')]
)
def test_a_flipped_bit_in_the_metadata_is_corruption_not_a_config_change(
    tmp_path, four_steps, old, new
):
    # The step's bytes are verified before its metadata (and the config in it) is read: a
    # flipped bit there must not read as "another optimizer" or "another model shape".
    _copy(four_steps, tmp_path)
    meta = tmp_path / "checkpoints" / "4" / "meta" / "metadata"
    text = meta.read_bytes()
    assert old in text
    meta.write_bytes(text.replace(old, new, 1))
    r = _run(tmp_path, "--config.num_steps=4", "--config.checkpoint.every_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "meta/metadata does not match its checksum" in r.stderr
    assert "cannot continue" not in r.stderr and "another model shape" not in r.stderr
    assert "resuming from step 2" in r.stdout
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints.corrupt").iterdir()] == ["4"]


@pytest.mark.slow
def test_set_aside_steps_refuse_every_relaunch_until_the_user_moves_them(tmp_path, four_steps):
    # Every step damaged: the first relaunch sets them all aside and refuses; an automatic
    # restarter relaunching again must get the same refusal, not a fresh start over the run.
    _copy(four_steps, tmp_path)
    for step in (2, 4):
        victim = _largest_file(tmp_path / "checkpoints" / str(step))
        _flip_bit(victim, 0)
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    aside = tmp_path / "checkpoints.corrupt"
    for attempt in range(2):  # the relaunch that sets them aside, and the one after it
        r = _run(tmp_path, "--config.num_steps=4", "--config.checkpoint.every_steps=2")
        assert r.returncode == 1, (attempt, r.stderr[-2000:])
        error = [x for x in r.stderr.splitlines() if x.startswith("bigjax: error:")]
        assert error and "refusing to start from scratch" in error[0], r.stderr[-2000:]
        assert f"delete or move away {aside}" in r.stderr and "Traceback" not in r.stderr
        assert "fresh start" not in r.stdout
        assert (tmp_path / "metrics.jsonl").read_bytes() == metrics  # nothing truncated
        assert sorted(p.name.split("-")[0] for p in aside.iterdir()) == ["2", "4"]
    shutil.rmtree(aside)  # the documented way to say "start this run afresh"
    r = _run(tmp_path, "--config.num_steps=2", "--config.checkpoint.every_steps=2")
    assert r.returncode == 0 and "fresh start" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
def test_every_loader_verifies_and_takes_the_newest_intact_step(tmp_path, four_steps, capsys):
    # eval, generate, export and init_from read another run (a distillation teacher loads
    # like eval): a flipped bit in its newest step is named, that step is
    # skipped (never moved: it is not theirs), and the step before it is what they use.
    from bigjax.cli.main import main

    run = _copy(four_steps, tmp_path / "run")
    victim = _largest_file(run / "checkpoints" / "4")
    _flip_bit(victim, victim.stat().st_size // 2)
    quiet = ["--config.eval.num_batches=1"]

    def warned(*command: str) -> str:
        with pytest.warns(
            UserWarning, match=r"checkpoints/4 is corrupt .*does not match.*trying step 2"
        ):
            assert main(list(command)) == 0
        return capsys.readouterr().out

    assert "step               2" in warned("eval", "--workdir", str(run), *quiet)
    out = warned("generate", "--workdir", str(run), "--prompt", "x", "--max-new-tokens", "2")
    assert "checkpoint step 2" in out
    warned("convert", str(run), str(tmp_path / "hf"))
    # (init_mode=full restores through the resume path, which verifies: tested above)
    init = {"init_from": str(run), "init_mode": "params"}
    with pytest.warns(UserWarning, match=r"checkpoints/4 is corrupt"):
        train(tiny_config(num_steps=1, checkpoint=init), tmp_path / "params")
    assert "its step 2" in capsys.readouterr().out  # the banner names the step it took
    assert (run / "checkpoints" / "4").is_dir() and not (run / "checkpoints.corrupt").exists()
    # and with no intact step at all, a one-line error listing each
    victim = _largest_file(run / "checkpoints" / "2")
    _flip_bit(victim, 0)
    with pytest.warns(UserWarning) as record:
        assert main(["eval", "--workdir", str(run), *quiet]) == 1
    err = capsys.readouterr().err
    assert "no intact checkpoint to load" in err and "checkpoints/2: " in err, err
    # step 4's warning names the step tried next; step 2 has none to name (it said "using an
    # older step" right before the error that there was none)
    corrupt = [str(w.message) for w in record if "is corrupt" in str(w.message)]
    assert [w.split("(")[0] for w in corrupt] == [f"checkpoint {run}/checkpoints/4 is corrupt "]


@pytest.mark.slow
def test_relaunching_a_finished_run_keeps_its_summary_true(tmp_path, two_steps):
    _copy(two_steps, tmp_path)
    before = json.loads((tmp_path / "summary.json").read_text())
    assert before["complete"] and before["eval_loss"] is not None
    (tmp_path / "summary.json").unlink()  # as if killed between its last save and summary
    r = _run(tmp_path, "--config.num_steps=2", "--config.checkpoint.every_steps=2")
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr[-2000:]
    after = json.loads((tmp_path / "summary.json").read_text())
    assert {k: v for k, v in after.items() if k != "wall_s"} == {
        k: v for k, v in before.items() if k != "wall_s"
    }


@pytest.mark.parametrize(
    "override, what",
    [
        ("--config.data.batch_size=100000000", "input pipeline"),  # rows of the pipeline
        ("--config.model.num_layers=200000", "devices"),  # a state no host can hold
    ],
)
def test_a_run_that_cannot_fit_is_refused_before_anything_is_built(tmp_path, override, what):
    # It used to print nothing and grow past 5 GB until the OOM killer came.
    import psutil

    proc = subprocess.Popen(
        train_cmd(tmp_path / "run", *SMALL, "--config.num_steps=2", override),
        cwd=ROOT, env={**os.environ, "XLA_FLAGS": xla_flags()}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
        time.sleep(0.02)
    out, err = proc.communicate()
    assert proc.returncode == 2, err[-2000:]
    (line,) = err.strip().splitlines()
    assert line.startswith("bigjax: error: memory: this config needs about") and what in line
    assert "GiB is available" in line and "Lower data.batch_size" in line
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    assert peak < 2 << 30  # JAX and the libraries loaded (~0.5-1 GiB), nothing of the run


HUGE_LR = {"lr": 1e39, "warmup_steps": 0, "schedule": "constant", "clip_norm": 1.0}


@pytest.mark.slow
def test_a_huge_learning_rate_never_saves_a_non_finite_state(tmp_path):
    # Finite loss and (clipped) gradients, but the updated parameters overflow: step 1's
    # state is all inf/nan. It must be caught at step 1 and never written.
    cfg = tiny_config(num_steps=3, optim=HUGE_LR, checkpoint={"every_steps": 1})
    with pytest.raises(NonFiniteError, match=r"at step 1 .*param_norm (inf|nan)"):
        train(cfg, tmp_path)
    # Nothing saved; and a run that failed before its first checkpoint leaves only its error.
    assert not (tmp_path / "checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bigjax.lock", "error.log"]
    assert "param_norm" in (tmp_path / "error.log").read_text()


@pytest.mark.slow
def test_restore_never_takes_a_poisoned_checkpoint(tmp_path):
    # A non-finite step 2 written behind bigjax's guard (with Orbax directly, as an older
    # bigjax could have): resume (and so `rollback`, which restores the same way) skips it.
    import jax
    import orbax.checkpoint as ocp

    from bigjax import checkpoint, loading
    from bigjax.mesh import make_mesh
    from bigjax.program import for_config
    from bigjax.sharding import placed

    cfg = tiny_config(num_steps=1, checkpoint={"every_steps": 1})
    train(cfg, tmp_path)
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        prog = for_config(cfg, mesh)
        manager = checkpoint.Checkpointer(tmp_path / "checkpoints", cfg.checkpoint).manager
        data = prog.batches("train", seed=0)
        target = placed(prog.abstract, prog.shardings)
        layout = checkpoint.param_layout(prog.abstract.params)
        state = loading.restore(manager, target, data, layout)
        nan = jax.tree.map(lambda x: x * np.nan, state.params)
        bad = state.replace(step=state.step + 1, params=nan)
        meta = json.loads((tmp_path / "checkpoints" / "1" / "meta" / "metadata").read_text())
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(bad),
            data=checkpoint.DataSave(data),
            meta=ocp.args.JsonSave(meta),
        )
        manager.save(2, args=args, force=True)
        manager.wait_until_finished()
        manager.close()
        data.close()
    with pytest.warns(UserWarning, match="checkpoints/2 is unreadable or corrupt .*not finite"):
        train(tiny_config(num_steps=3, checkpoint={"every_steps": 1}), tmp_path)
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]  # resumed from step 1, the last good one
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints.corrupt").iterdir()] == ["2"]


@pytest.mark.slow
def test_skip_warns_counts_and_writes_strict_json(tmp_path, capsys):
    cfg = tiny_config(num_steps=6, optim=HUGE_LR, nan_policy="skip")
    last = train(cfg, tmp_path)
    out = capsys.readouterr().out
    assert out.count("skipped: non-finite") == 6 and last["skipped_steps"] == 6
    summary = json.loads(
        (tmp_path / "summary.json").read_text(), parse_constant=pytest.fail
    )  # NaN/Infinity are not JSON: parse_constant is only called for them
    assert summary["skipped_steps"] == 6
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=pytest.fail)


@pytest.mark.slow
def test_mfu_is_never_above_one_with_every_step_logged(tmp_path):
    # The throughput window used to restart after the next step was already dispatched, so
    # every second logged step counted a step's work in less than its time (MFU 108 %).
    train(tiny_config(num_steps=12, metrics={"log_every": 1}), tmp_path)
    mfus = [r["mfu"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("mfu") is not None]
    assert len(mfus) >= 10 and max(mfus) < 1.0


def test_a_step_run_inside_its_call_is_timed_by_the_call(tmp_path):
    # A backend may run a step inline (inside the call that dispatches it): the step then
    # finished before the previous step's metrics were fetched, and at a save, where two
    # fetches follow each other, the fetch times bound none of its work (a window of ~0 s,
    # an MFU in the thousands). The call's own time is a floor for the window.
    from bigjax import metrics
    from bigjax.loop import StepLog

    cfg = tiny_config(num_steps=10, metrics={"log_every": 1})
    writers = metrics.Writers(tmp_path, enabled=True, tensorboard=False)
    log = StepLog(cfg, writers, flops_per_step=1e9, peak_flops=1e12, accounting=None, warn=True)
    step = {"loss": 1.0, "grad_norm": 1.0, "param_norm": 1.0, "finite": 1.0, "tokens": 512.0}
    log.finish(1, step, dispatch_s=2.0)  # compiled in the first call: not a throughput window
    log.finish(2, step, dispatch_s=0.25)  # ran inline: fetched right after the previous one
    row = log.last
    assert row["step"] == 2 and row["step_time"] >= 0.25
    assert row["mfu"] <= 1e9 / 0.25 / 1e12  # at most what 0.25 s of work allows


def test_an_impossible_mfu_is_never_logged_and_says_why(tmp_path, capsys):
    # MFU over 100 % means the peak is wrong (a CPU peak measured while other processes held
    # the cores gave 5195 %): no such number is logged, and the run says so once.
    cfg = tiny_config(num_steps=4, metrics={"log_every": 1, "peak_flops": 1e3})
    train(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["mfu"] for r in rows if "loss" in r] == [None] * 4
    assert all(r["tokens_per_sec"] for r in rows if "loss" in r and r["step"] > 1)
    out = capsys.readouterr().out
    assert out.count("is impossible, so the peak it divides by is wrong") == 1
    assert "metrics.peak_flops" in out


@pytest.mark.slow
def test_disk_full_names_the_step_the_space_and_the_fix(tmp_path):
    # A real full disk: a 6 MiB tmpfs (needs root, as in CI). Step 2 fits, step 4 does not.
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        r = _run(
            mount / "run",
            "--config.num_steps=6",
            "--config.checkpoint.every_steps=2",
            "--config.checkpoint.async_save=false",
            "--config.metrics.log_every=100",
        )
        assert r.returncode == 1
        line = [x for x in r.stderr.splitlines() if x.startswith("bigjax: error:")]
        assert len(line) == 1, r.stderr[-3000:]
        assert "no free disk space" in line[0] and "a save needs" in line[0], line
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert (mount / "run" / "checkpoints" / "2").is_dir()  # older checkpoints intact
    finally:
        subprocess.run(["umount", "-l", str(mount)])


# --------------------------------------------------------------------- untrusted convert input


def _hf_dir(tmp_path: Path, **config) -> Path:
    """A tiny Llama directory in the Hugging Face layout (random weights, real files)."""
    from bigjax import tensorfile

    d = tmp_path / "hf"
    d.mkdir()
    cfg = {
        "model_type": "llama",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 32,
        "vocab_size": 64,
        "tie_word_embeddings": True,
        **config,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (64, 16),
        "model.norm.weight": (16,),
        "model.layers.0.input_layernorm.weight": (16,),
        "model.layers.0.post_attention_layernorm.weight": (16,),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.layers.0.self_attn.k_proj.weight": (16, 16),
        "model.layers.0.self_attn.v_proj.weight": (16, 16),
        "model.layers.0.self_attn.o_proj.weight": (16, 16),
        "model.layers.0.mlp.gate_proj.weight": (32, 16),
        "model.layers.0.mlp.up_proj.weight": (32, 16),
        "model.layers.0.mlp.down_proj.weight": (16, 32),
    }
    tensors = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    tensorfile.write(d / "model.safetensors", tensors, {"format": "pt"})
    return d


def _convert(src: Path, dst: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bigjax.cli", "convert", str(src), str(dst)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_convert_imports_the_honest_directory(tmp_path):
    r = _convert(_hf_dir(tmp_path), tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]


def test_convert_refuses_a_config_that_disagrees_with_the_weights_before_allocating(tmp_path):
    src = _hf_dir(tmp_path, num_hidden_layers=1_000_000_000)
    start = time.perf_counter()
    r = _convert(src, tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "config.json implies" in r.stderr and "do not belong together" in r.stderr
    assert time.perf_counter() - start < 60  # it did not try to build a billion layers


def test_convert_refuses_a_deeply_nested_header(tmp_path):
    src = _hf_dir(tmp_path)
    blob = b"[" * 200_000 + b"]" * 200_000
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    r = _convert(src, tmp_path / "out")
    assert r.returncode == 2 and "unreadable JSON header" in r.stderr
    assert "Traceback" not in r.stderr


def _header(path: Path) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return json.loads(path.read_bytes()[8 : 8 + n]), path.read_bytes()[8 + n :]


def _write(path: Path, header: dict, body: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def _new(path: Path) -> Path:
    path.mkdir()
    return path


def test_convert_refuses_malformed_shards_in_one_line(tmp_path, capsys):
    from bigjax.cli.main import main

    def refused(src: Path, match: str) -> None:
        assert main(["convert", str(src), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    # overlapping byte ranges: the last tensor moved 64 bytes into the one before it (the
    # file shortened to match), so its first bytes are also the other's last
    src = _hf_dir(_new(tmp_path / "overlap"))
    header, body = _header(src / "model.safetensors")
    last = max(header, key=lambda k: header[k]["data_offsets"][0] if k != "__metadata__" else -1)
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start - 64, end - 64]
    _write(src / "model.safetensors", header, body[:-64])
    refused(src, "overlaps the tensor before it")
    # two indexed shards both holding a tensor: the index decides, and a duplicate is refused
    from bigjax import tensorfile

    src = _hf_dir(_new(tmp_path / "twice"))
    tensors = tensorfile.read(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = tensorfile.write_dir(src, {k: np.array(v) for k, v in tensors.items()}, 2048)
    index = json.loads((src / tensorfile.INDEX).read_text())["weight_map"]
    first, last = names[0], names[-2]  # (names[-1] is the index)
    moved = next(k for k, shard in index.items() if shard == last)
    extra = {**tensorfile.read(src / first), moved: tensors[moved]}
    tensorfile.write(src / first, {k: np.array(v) for k, v in extra.items()}, {"format": "pt"})
    refused(src, f"holds tensor {moved!r}, but {tensorfile.INDEX} names {last} for it")
    # an empty file where a shard should be
    src = _hf_dir(_new(tmp_path / "empty"))
    (src / "model.safetensors").write_bytes(b"")
    refused(src, "too short to be a safetensors file (0 bytes)")


@pytest.mark.slow
def test_convert_never_reads_files_outside_the_model_directory(tmp_path):
    src = _hf_dir(tmp_path)
    secret = tmp_path / "secret.safetensors"
    (src / "model.safetensors").rename(secret)
    index = {"weight_map": {"model.norm.weight": "../secret.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    r = _convert(src, tmp_path / "out")
    assert r.returncode == 2 and "lies outside" in r.stderr
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "/etc/passwd"}})
    )
    r = _convert(src, tmp_path / "out")
    assert r.returncode == 2 and "lies outside" in r.stderr


def test_a_non_finite_state_is_refused_by_save_itself(tmp_path):
    # The last guard, below the train loop's checks: checkpoint.save checks on device.
    import jax

    from bigjax import checkpoint
    from bigjax.config import CheckpointConfig
    from bigjax.mesh import make_mesh
    from bigjax.program import for_config

    cfg = tiny_config()
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        state = for_config(cfg, mesh).init()
    bad = state.replace(opt_state=jax.tree.map(lambda x: x * np.inf, state.opt_state))
    saves = checkpoint.Checkpointer(tmp_path, CheckpointConfig())
    with pytest.raises(CheckpointError, match="not finite; not saved"):
        saves.save(bad, None, {}, force=True)
    saves.close()


def test_a_synchronous_save_is_sealed_whatever_the_file_server_s_clock(tmp_path, monkeypatch):
    # steps this run wrote were told by their modification time; on a network file system
    # that is the server's clock, and a server 10 s behind left every synchronous save unsealed
    import time

    import jax

    from bigjax import checkpoint
    from bigjax.config import CheckpointConfig
    from bigjax.mesh import make_mesh
    from bigjax.program import for_config

    cfg = tiny_config()
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        prog = for_config(cfg, mesh)
        state, data = prog.init(), prog.batches("train", 0)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 10)  # this host 10 s ahead
    saves = checkpoint.Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    monkeypatch.setattr(time, "time", real)
    try:
        assert saves.save(state, data, {}, force=True)
        saves.wait()
    finally:
        saves.close()
        data.close()
    assert integrity.is_sealed(tmp_path / "0") and integrity.verify(tmp_path / "0") is None


@pytest.mark.slow
def test_another_optimizer_is_a_config_error_not_corruption(tmp_path, two_steps):
    # A changed config must never be taken for a corrupt checkpoint (which would be moved
    # aside): exit 2 naming the key and the way out, and the checkpoints stay where they are.
    _copy(two_steps, tmp_path)
    r = _run(tmp_path, "--config.num_steps=4", "--config.optim.name=lion")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "optim.name='adamw' in the checkpoint, 'lion' in this run" in r.stderr
    assert "checkpoint.init_from" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert not (tmp_path / "checkpoints.corrupt").exists()


@pytest.mark.slow
def test_the_tools_use_the_config_their_checkpoint_was_saved_with(tiny_run, tmp_path, capsys):
    # config.json is a plain file beside the checksummed checkpoints: a flipped digit that
    # still parses (rope_theta) used to change the model `eval`, `generate` and `serve` ran,
    # silently; a flipped byte that does not parse was a JSONDecodeError traceback.
    from bigjax.evaluate import evaluate_run

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    expected = evaluate_run(str(run), [])["eval_loss"]
    config = json.loads((run / "config.json").read_text())
    config["model"]["rope_theta"] *= 3
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert evaluate_run(str(run), [])["eval_loss"] == expected  # bitwise: the same program
    assert "differs from the config checkpoint step 2 was saved with (model.rope_theta)" in (
        capsys.readouterr().err
    )
    (run / "config.json").write_bytes(b"\xff{ damaged")
    assert evaluate_run(str(run), [])["eval_loss"] == expected
    assert "(unreadable)" in capsys.readouterr().err
    # an override is the way to change a key for a tool, and it is applied
    changed = evaluate_run(str(run), ["--config.model.rope_theta=30000.0"])["eval_loss"]
    assert changed != expected

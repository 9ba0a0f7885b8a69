"""One line, never a traceback, for what a user or their machine does to a command: broken
config files, odd run directories, damaged lock files and seals, a directory that turns
read-only mid-run, a second Ctrl-C, a TPU another process drives."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import xla_flags
from helpers import train_cmd

from bigjax import errors, integrity, platforms, runlock
from bigjax.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "lm_tiny.py")
SMALL = ["--config.data.seq_len=64", "--config.data.batch_size=8", "--config.eval.num_batches=1",
         "--config.metrics.log_every=1", "--config.metrics.tensorboard=false",
         "--config.metrics.plot=false"]  # fmt: skip


def _one_line(capsys, *argv: str, code: int = 2) -> str:
    assert main(list(argv)) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("bigjax: error: ")
    return err


def _without_root_powers(command: list[str]) -> list[str]:
    """As root (CI), permissions do not apply: drop the capabilities that bypass them."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *command]


def test_a_config_file_with_a_syntax_error_or_that_raises(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg=None)\n    return None\n")
    err = _one_line(capsys, "train", "--config", str(bad), "--workdir", str(tmp_path / "r"))
    assert f"{bad}, line 1" in err and "Fix the file" in err
    err = _one_line(capsys, "train", "--config", "configs/finetune.py", "--workdir", "x")
    assert "get_config(None) in configs/finetune.py raised ValueError (line 17)" in err
    assert "finetune.py:RUN_DIR" in err
    spec = tmp_path / "sweep.py"
    spec.write_text("def get_sweep():\n    return 1 / 0\n")
    err = _one_line(capsys, "sweep", str(spec), "--dir", str(tmp_path / "s"))
    assert "get_sweep() in" in err and "ZeroDivisionError (line 2)" in err


def test_config_files_that_are_not_configs(tmp_path, capsys):
    # a UTF-16 file said "line None"; sys.exit(3) in a config ended bigjax with code 3 and no
    # word; a get_config() returning an int was a TypeError traceback
    cases = [
        ("def get_config(arg=None):\n    return {}\n".encode("utf-16"), "null bytes. Fix"),
        (b"import sys\nsys.exit(3)\n", "raised SystemExit (line 2): 3"),
        (b"def get_config(arg=None):\n    return 5\n", "returned int; return an ml_coll"),
    ]
    for i, (source, words) in enumerate(cases):
        (tmp_path / f"c{i}.py").write_bytes(source)
        err = _one_line(capsys, "plan", "--config", str(tmp_path / f"c{i}.py"), "--devices", "8")
        assert words in err and "line None" not in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["compress", "prune", "--sparsity", "1.5"], "--sparsity 1.5: the share"),
        (["compress", "prune", "--sparsity", "nan"], "--sparsity nan: the share"),
        (["compress", "quantize", "--out", "FILE"], "is a file; pick a directory"),
        (["inspect", "--prompt", "x", "--ig-steps", "0"], "--ig-steps 0 --embed-tokens 259"),
        (["inspect", "--prompt", "x", "--embed-tokens", "-5"], "--embed-tokens -5: use"),
        (["inspect", "--prompt", "x", "--out", "FILE"], "is a file; pass a directory"),
        (["prepare", "--input", "stdlib", "--val-fraction", "2"], "--val-fraction 2.0: must"),
        (["prepare", "--input", "stdlib", "--workers", "-1"], "--workers -1: must be 0"),
        (["plan", "--config", TINY, "--topology", "v5p-9"], "v5p names count TensorCores"),
        (["plan", "--config", TINY, "--topology", "v5e-0"], "no 2-D TPU slice has 0 chips"),
        (["bench", "--config", TINY, "--steps", "0"], "--steps 0 --warmup 3: time at least"),
        # silently unused (a quantized run "pruned" to nothing asked), a NaN temperature that
        # sampled NUL bytes, a seed past int64, minus eight GPUs planned, a division by zero
        (["compress", "quantize", "--sparsity", "0.3"], "--sparsity go(es) with `compress prune`"),
        (["compress", "prune", "--bits", "4"], "--bits go(es) with `compress quantize`"),
        (["compress", "prune", "--pattern", "2:4", "--sparsity", "0.3"], "keeps 2 weights of"),
        (["generate", "--prompt", "x", "--temperature", "nan"], "need a finite temperature"),
        (["generate", "--prompt", "x", "--seed", str(2**64)], "is outside [-2**63, 2**63)"),
        (["eval", "--tasks", " , ,"], "--tasks ' , ,' names no task"),
        (["plan", "--config", TINY, "--devices", "0"], "--devices 0: give the number of GPUs"),
        (["plan", "--config", TINY, "--devices", "-8"], "--devices -8: give the number of GPUs"),
        (["plan", "--config", TINY, "--devices", "8", "--mfu", "0"], "--mfu 0.0: give the share"),
        (["plan", "--config", TINY, "--devices", "8", "--mfu", "nan"], "--mfu nan: give the"),
        (["serve", "--max-len", "-5"], "--max-len -5: give tokens per sequence"),
    ],
)
def test_out_of_range_flags_are_one_line_before_any_work(tmp_path, capsys, argv, words):
    # each was a traceback or, worse, accepted (v5p-9 planned as a v5p-8; --val-fraction 2
    # put every document in validation); all are refused before a run is opened or read
    file = tmp_path / "a.txt"
    file.write_text("x")
    argv = [str(file) if a == "FILE" else a for a in argv]
    command, out = argv[0], str(tmp_path / "out")
    if command in ("compress", "inspect"):
        argv += ["--workdir", str(tmp_path / "no_run")] + (
            [] if "--out" in argv else ["--out", out]
        )
    elif command in ("generate", "eval", "serve"):
        argv += ["--workdir", str(tmp_path / "no_run")]
    elif command == "prepare":
        argv += ["--output", out]
    assert words in _one_line(capsys, *argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["eval", "--json", "FILE/o.json"], "FILE is a file, not a directory"),
        (["eval", "--json", "DIR"], "--json DIR is a directory; give a file's path"),
        (["eval", "--json", "LINK/o.json"], "LINK is a link to"),
        (["plan", "--config", TINY, "--devices", "8", "--json", "FILE/p.json"], "FILE is a file"),
        (["bench", "--config", TINY, "--json", "FILE/b.json"], "FILE is a file, not a directory"),
        (["report", "DIR", "--out", "FILE/r"], "FILE is a file, not a directory"),
        (["report", "DIR", "--out", "FILE"], "--out FILE is a file; pass a directory"),
        (["inspect", "--prompt", "x", "--out", "FILE/x"], "FILE is a file, not a directory"),
        (["compress", "quantize", "--out", "FILE/c"], "FILE is a file, not a directory"),
        (["convert", "DIR", "FILE/h"], "DST FILE/h: FILE is a file, not a directory"),
        (["prepare", "--input", "stdlib", "--output", "FILE/d"], "cannot create it (FILE is a"),
        (["sweep", str(ROOT / "experiments/lr_sweep/sweep.py"), "--dir", "FILE/s"], "FILE is a"),
        # an empty path (an unset $OUT) is the current directory: the files went there
        (["inspect", "--prompt", "x", "--out", ""], "inspect: --out is empty; give a path"),
        (["compress", "quantize", "--out", " "], "compress: --out is empty; give a path"),
        (["train", "--config", TINY, "--workdir", ""], "train: --workdir is empty"),
    ],
)
def test_outputs_that_cannot_be_written_are_one_line_before_any_work(tmp_path, capsys, argv, words):
    # each was a traceback from mkdir or open, after the eval, compile or bench had run
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    names = {"FILE": tmp_path / "file", "DIR": tmp_path / "dir", "LINK": tmp_path / "link"}
    for name, path in names.items():
        argv = [a.replace(name, str(path)) if a.startswith(name) else a for a in argv]
        words = words.replace(name, str(path))
    if argv[0] in ("eval", "inspect", "compress"):
        argv += ["--workdir", str(tmp_path / "no_run")]  # never reached: the output is first
    assert words in _one_line(capsys, *argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file", "link"]


def test_an_output_in_a_read_only_directory_is_refused_before_the_eval(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    command = [sys.executable, "-m", "bigjax.cli", "eval", str(tmp_path / "no_run"), "--json",
               str(ro / "out.json")]  # fmt: skip
    r = subprocess.run(_without_root_powers(command), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "cannot write there (no permission, or a read-only file system)" in r.stderr


@pytest.mark.parametrize(
    ("argv", "words"),
    [  # each was a traceback (OverflowError, islice's ValueError) or ran for ever, silently
        (["eval", "--tasks", "x", "--limit", "inf"], "--limit inf: give a count"),
        (["eval", "--tasks", "x", "--limit", "2.5"], "--limit 2.5: give a count"),
        (["eval", "--tasks", "x", "--limit", "1e30"], "more documents than any task holds"),
        (["prepare", "--input", "stdlib", "--max-record-bytes", str(2**70)], "from 1 to 2**62"),
        (["prepare", "--input", "stdlib", "--num-perm", str(10**8)], "from 1 to 4096"),
        # quality thresholds: nan turned a filter off without a word; past 0..1, a fraction
        # keeps every document or none
        (["prepare", "--input", "stdlib", "--min-alpha-frac", "nan"], "nan: must be from 0 to 1"),
        (["prepare", "--input", "stdlib", "--max-dup-line-frac", "1.5"], "must be from 0 to 1"),
        (["prepare", "--input", "stdlib", "--min-chars", "-5"], "--min-chars -5: must be 0 or"),
        (["prepare", "--input", "stdlib", "--max-chars", "9"], "at least --min-chars (32)"),
        (["prepare", "--input", "stdlib", "--max-mean-word-len", "1"], "at least --min-mean"),
    ],
)
def test_huge_and_infinite_flags_are_one_line_before_any_work(tmp_path, capsys, argv, words):
    if argv[0] == "prepare":
        argv = [*argv, "--output", str(tmp_path / "ds")]
    assert words in _one_line(capsys, *argv, "--workdir", str(tmp_path)) if argv[0] == "eval" \
        else words in _one_line(capsys, *argv)  # fmt: skip


def test_shard_sizes_and_integrated_gradient_steps_out_of_range_are_one_line(tmp_path, capsys):
    # nan, inf and text were ValueError and OverflowError tracebacks; 0 exported a shard a tensor
    from bigjax import convert, hf

    for text in ("nan", "inf", "abc", "0", "-5", "1e400"):
        with pytest.raises(hf.ConvertError, match=f"--max-shard-size '{text}': use e.g. 5GB"):
            convert.parse_size(text)
    assert convert.parse_size("2GiB") == 2 << 30 and convert.parse_size("300KB") == 300_000
    argv = ["inspect", "--workdir", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")]
    err = _one_line(capsys, *argv, "--ig-steps", str(10**20))
    assert "use 1 to 4096 steps" in err


@pytest.mark.slow
def test_what_a_run_cannot_hold_is_one_line(capsys, tiny_run):
    # a KV cache of 10**9 positions was XLA's out-of-memory traceback; more few-shot
    # examples than a task holds, random.sample's ValueError from inside lm-eval
    err = _one_line(capsys, "generate", str(tiny_run), "--prompt", "x", "--max-new-tokens",
                    str(10**9))  # fmt: skip
    assert "the KV cache of 1 prompt(s) x 1,000,000,002 positions needs" in err
    assert "lower --max-new-tokens" in err
    tasks = ["--tasks", "bigjax_mc", "--include-path", str(ROOT / "configs" / "tasks")]
    assert main(["eval", str(tiny_run), *tasks, "--num-fewshot", "100000"]) == 2
    err = capsys.readouterr().err  # lm-eval's progress bar, then the error's line
    assert "Traceback" not in err and err.count("bigjax: error: ") == 1, err
    assert "--num-fewshot 100000 is more examples than a task's few-shot split holds" in err


def test_a_bench_baseline_that_is_no_bench_result_is_one_line_before_the_bench(tmp_path, capsys):
    # not JSON was a JSONDecodeError traceback
    for text, words in [("[1,2", "not JSON (Expecting"), ('{"a": 1}', "not a bench result")]:
        (tmp_path / "b.json").write_text(text)
        argv = ["bench", "--config", TINY, "--baseline", str(tmp_path / "b.json")]
        assert words in _one_line(capsys, *argv)


def test_warnings_are_one_line_and_only_bigjax_s_own(tmp_path):
    # Python's form added the file, line and source text of the warn call; a run stopped
    # before its first eval made report's plots warn from matplotlib about an empty legend
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - s, "tokens_per_step": 64, "flops_per_step": 1e6}
            for s in (1, 2)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config_history.jsonl").write_text("{cut short\n")
    command = [sys.executable, "-m", "bigjax.cli", "report", str(run), "--out", str(tmp_path / "r")]
    err = subprocess.run(command, capture_output=True, text=True, cwd=ROOT).stderr
    assert err.splitlines() == [
        f"bigjax: warning: {run / 'config_history.jsonl'}: 1 line(s) that are not config "
        "segments skipped"
    ], err
    debug = subprocess.run([*command[:3], "--debug", *command[3:]], capture_output=True,
                           text=True, cwd=ROOT).stderr  # fmt: skip
    assert "history.py:" in debug and "BigjaxWarning: " in debug  # Python's form, whole


def test_a_full_disk_is_told_from_other_errors_that_look_like_it():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert errors.exit_code(full) == errors.RUN_FAILED
    wrapped = ValueError("RESOURCE_EXHAUSTED: Failed writing ...: No space left on device")
    assert errors.disk_full(wrapped)  # Orbax and tensorstore raise their own types
    try:
        raise RuntimeError("save failed") from OSError(errno.EDQUOT, "Disk quota exceeded")
    except RuntimeError as e:
        assert errors.disk_full(e)  # through the cause
    # an accelerator out of memory is not a full disk: still a traceback (exit_code None)
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
    assert not errors.disk_full(oom) and errors.exit_code(oom) is None
    assert errors.exit_code(OSError(errno.EIO, "Input/output error")) is None
    looped = RuntimeError("x")
    looped.__cause__ = looped  # what `raise e from e` leaves: the walk must end
    assert not errors.disk_full(looped)
    full.add_note("writing data/mine")  # what a command's staging adds on the way out
    assert errors.one_line(full).startswith("no space left on the device writing data/mine;")


@pytest.mark.slow
def test_a_full_disk_under_the_tools_is_one_line_naming_the_output(tmp_path, capsys, tiny_run):
    # A real full disk: a 64 KiB tmpfs (needs root, as in CI). Each was a traceback (an
    # OSError, or Orbax's ValueError for compress); each stages its output, so nothing is left.
    # prepare reads the `email` package (0.4 MB of text: its shards pass 64 KiB), not the
    # whole standard library, whose 31 MB it cleaned first for the same error.
    import email

    text = str(Path(email.__file__).parent)
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        for argv, out in [
            (["prepare", "--input", text, "--workers", "1", "--output"], mount / "ds"),
            (["convert", str(tiny_run)], mount / "hf"),
            (["compress", "quantize", str(tiny_run), "--out"], mount / "c"),
        ]:
            assert main([*argv, str(out)]) == 1
            err = capsys.readouterr().err  # a progress bar's line, then the error's
            assert "Traceback" not in err and err.count("bigjax: error: ") == 1, err
            assert f"error: no space left on the device writing {out}; free space" in err, err
            assert not (out / "checkpoints").exists() and not (out / "config.json").exists()
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_paths_that_are_not_utf8_are_refused_before_anything_is_written(tmp_path, capsys):
    # TensorStore and ArrayRecord take UTF-8 paths only: a Latin-1 name trained every step,
    # then failed at the first save with a C++ cast error (and writing error.log raised
    # UnicodeEncodeError); prepare cleaned the whole corpus first, then failed the same way
    latin1 = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9")
    args = ["--config", TINY, *SMALL, "--config.num_steps=1"]
    err = _one_line(capsys, "train", *args, "--workdir", f"{latin1}/run")
    assert f"error: {tmp_path}/caf\\xe9/run: a name that is not UTF-8; TensorStore" in err
    err = _one_line(capsys, "prepare", "--input", "stdlib", "--output", f"{latin1}/ds")
    assert f"--output {tmp_path}/caf\\xe9/ds: a name that is not UTF-8" in err
    assert os.listdir(tmp_path) == []


def test_multi_process_flags_that_cannot_start_a_job(tmp_path, capsys):
    # each was a Python traceback from JAX (IndexError, ValueError), or, for a port past
    # 65535, a process waiting minutes for peers that could never reach it
    args = ["--config", TINY, *SMALL, "--workdir", str(tmp_path / "run")]
    for address in ("localhost", "localhost:99999", "localhost:0", ":8476", "[::1]:84x"):
        flags = ["--coordinator_address", address, "--num_processes", "2", "--process_id", "0"]
        err = _one_line(capsys, "train", *args, *flags)
        assert f"--coordinator_address {address!r}: expected HOST:PORT, the port from 1" in err
    err = _one_line(capsys, "train", *args, "--num_processes", "2")
    assert "give all of --coordinator_address HOST:PORT --num_processes N" in err
    flags = ["--coordinator_address", "localhost:8476", "--num_processes", "2", "--process_id"]
    err = _one_line(capsys, "serve", str(tmp_path / "run"), *flags, "2")
    assert "--process_id 2 of --num_processes 2: the processes are numbered 0 to N-1" in err
    assert not (tmp_path / "run").exists()


def test_run_directories_that_cannot_be_one(tmp_path, capsys):
    args = ["--config", TINY, *SMALL, "--config.num_steps=1"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    err = _one_line(capsys, "train", *args, "--workdir", str(dangling))
    assert "a symbolic link to" in err and "which does not exist" in err
    (tmp_path / "file").write_text("x")
    err = _one_line(capsys, "train", *args, "--workdir", str(tmp_path / "file"))
    assert "exists and is not a directory" in err
    run = tmp_path / "run"
    (run / runlock.LOCK_NAME).mkdir(parents=True)
    err = _one_line(capsys, "train", *args, "--workdir", str(run))
    assert "is a directory, not bigjax's lock file" in err
    # a file where the checkpoints go: refused before step 1 (it used to fail at the first save)
    other = tmp_path / "other"
    (other / "checkpoints").parent.mkdir()
    (other / "checkpoints").write_text("x")
    err = _one_line(capsys, "train", *args, "--workdir", str(other), code=1)
    assert "checkpoints is a file, not a directory of checkpoints" in err
    assert (
        not (other / "metrics.jsonl").exists()
        or "loss" not in (other / "metrics.jsonl").read_text()
    )


def test_a_path_the_system_refuses_is_one_line_in_every_command(tmp_path, capsys):
    # a name over the file system's 255 bytes: a traceback from whichever call met it first
    # (pathlib's is_symlink in train, the config read in generate, mkdir in prepare)
    long = str(tmp_path / ("a" * 300))
    for argv in (
        ["train", "--config", TINY, *SMALL, "--config.num_steps=1", "--workdir", long],
        ["prepare", "--input", "stdlib", "--output", long],
        ["generate", long, "--prompt", "x"],
        ["eval", long],
    ):
        err = _one_line(capsys, *argv)
        assert "File name too long; a name in it is longer than the file system" in err, argv
        assert long in err
    # the kinds that name a path, each with its fix; not those that say nothing of a path
    for code, words in ((errno.EROFS, "read-only"), (errno.ELOOP, "loop"),
                        (errno.EACCES, "permissions")):  # fmt: skip
        e = OSError(code, os.strerror(code), "/data/run")
        assert errors.exit_code(e) == errors.USAGE_ERROR
        assert errors.one_line(e).startswith("/data/run: ") and words in errors.one_line(e)
    assert errors.exit_code(OSError(errno.EACCES, "Permission denied")) is None  # no path


def test_a_folder_orbax_could_not_read_back_is_refused_before_a_step(tmp_path, capsys):
    # Orbax globs a checkpoint's parts with patterns built from its path: in `run[1]` the
    # brackets match `run1`, so the save worked and every restore failed, blaming the config
    from bigjax.checkpoint import UnreadablePath, check_path

    for fine in ("a b", "ü", "p%20q", "h#", "s*", "q?", "a[b", "[", "x]"):
        assert check_path(tmp_path / fine / "checkpoints") == tmp_path / fine / "checkpoints"
    for bad in ("run[1]", "[ab]", "a[!b]c"):
        with pytest.raises(UnreadablePath, match=re.escape(repr(bad))):
            check_path(tmp_path / bad / "checkpoints")
    args = ["--config", TINY, *SMALL, "--config.num_steps=1"]
    err = _one_line(capsys, "train", *args, "--workdir", str(tmp_path / "run[1]"))
    assert "could save checkpoints here but not restore them" in err and "(no [ ])" in err
    assert not (tmp_path / "run[1]" / "checkpoints").exists()
    # TensorStore restores `run\back` from run/back: saved, and the resume blamed the config
    err = _one_line(capsys, "train", *args, "--workdir", str(tmp_path / "run\\back"))
    assert "takes a backslash in a path for a separator ('run\\\\back' as 'run/back')" in err
    assert not list(tmp_path.iterdir())  # refused before anything was made


def test_damaged_lock_records_and_seals_are_read_as_damaged(tmp_path):
    lock = tmp_path / runlock.LOCK_NAME
    for junk in (b"\xff\xfe\x00garbage", b"[1, 2]", b'{"pid": 1, "started": "soon"}'):
        lock.write_bytes(junk)
        taken = runlock.take(lock)  # a dead writer's unreadable record: taken over
        assert taken.previous is None or runlock.describe(taken.previous).startswith("pid 1")
        taken.release()
    step = tmp_path / "checkpoints" / "2"
    step.mkdir(parents=True)
    (step / "data.json").write_text("{}")
    for seal in ({"files": {"data.json": 5}}, {"files": [1]}, {"files": {"../x": {}}}, b"\xff"):
        text = seal if isinstance(seal, bytes) else json.dumps(seal).encode()
        (step / integrity.CHECKSUMS).write_bytes(text)
        problem = integrity.verify(step)
        assert problem is not None and "checksums.json is" in problem, (seal, problem)


@pytest.mark.slow
def test_a_read_only_run_directory_at_start_and_mid_run(tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    r = subprocess.run(_without_root_powers(train_cmd(run, *SMALL, "--config.num_steps=2")),
                       capture_output=True, text=True, cwd=ROOT, env=env)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "cannot write the lock file" in r.stderr and "Permission denied" in r.stderr
    # mid-run: the directory and its files turn read-only while it trains
    run.chmod(0o755)
    command = train_cmd(run, *SMALL, "--config.num_steps=200", "--config.checkpoint.every_steps=2")
    proc = subprocess.Popen(
        _without_root_powers(command), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "2").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    for path in [run, *run.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    _, err = proc.communicate(timeout=300)
    lines = [x for x in err.splitlines() if x.strip()]
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, lines  # which write fails first depends on timing: either says why
    assert "no longer writable" in lines[0] or "saving a checkpoint" in lines[0], lines


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path):
    proc = subprocess.Popen(
        train_cmd(tmp_path, *SMALL, "--config.num_steps=500"), cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": xla_flags()}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().startswith("bigjax ")
    proc.send_signal(signal.SIGINT)  # the first asks for a save at the end of the step
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # the second: now
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "bigjax: interrupted" in err


def test_a_second_ctrl_c_lost_in_a_callback_still_interrupts_without_a_traceback():
    # The second Ctrl-C's KeyboardInterrupt is raised wherever the main thread is; inside a
    # callback the interpreter runs (jax's gc hook, a __del__) Python prints "Exception
    # ignored" with a traceback and goes on, and the run once saved and exited 0 (the test
    # above, ~1 in 20). Here the second signal lands in a __del__, every time; the loop must
    # still stop, and nothing but the one line may reach the terminal. Other exceptions a
    # callback swallows are still reported.
    import gc

    from bigjax import signals

    class Swallows:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside __del__

    class Fails:
        def __del__(self):
            raise ValueError("a callback's own error")

    reported: list[BaseException | None] = []
    # a run that was asked to stop leaves SIGTERM and SIGHUP ignored on its way out; this is
    # pytest's process, whose later tests start worker pools that must still die by SIGTERM
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def record(report) -> None:
        reported.append(report.exc_value)

    kept_hook, sys.unraisablehook = sys.unraisablehook, record
    try:
        with signals.stop_on_signals() as asked:
            os.kill(os.getpid(), signal.SIGINT)  # the first: save and stop after the step
            time.sleep(0.05)
            assert asked == {"signal": "SIGINT"}
            Swallows()
            gc.collect()
            assert reported == []
            Fails()
            gc.collect()
            assert [type(e) for e in reported] == [ValueError]
            with pytest.raises(KeyboardInterrupt):
                signals.interrupt_if_asked(asked)
        assert sys.unraisablehook is record  # the hook it found is back
        Fails()
        gc.collect()
        assert [type(e) for e in reported] == [ValueError, ValueError]
    finally:
        sys.unraisablehook = kept_hook
        for s, handler in kept.items():
            signal.signal(s, handler)


def test_a_tpu_another_process_drives_is_named_in_one_line(tmp_path):
    # libtpu's own failure when its lock is held (as on a TPU VM whose chips another
    # program drives), produced for real: a holder process has libtpu loaded, and a second
    # loads it with the lock enforced (on this chipless machine bigjax itself would not).
    pytest.importorskip("libtpu")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS",)}
    env.pop("ALLOW_MULTIPLE_LIBTPU_LOAD", None)
    hold = "import jax; jax.devices(); print('held', flush=True); import time; time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        if holder.pid not in platforms.lockfile_holders():
            pytest.skip("libtpu did not take its lock here")
        probe = (
            "from jax.experimental import topologies\nfrom bigjax import platforms\n"
            "try:\n    topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu')\n"
            "except Exception as e:\n    print(platforms.busy_error(e))\n"
        )
        r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                           text=True, cwd=ROOT, timeout=300)  # fmt: skip
        assert f"the TPU is in use: pid {holder.pid} holds libtpu's lock" in r.stdout, r.stderr
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", ["inspect", "compress", "convert", "eval", "report"])
def test_an_output_inside_a_runs_checkpoints_is_refused(tmp_path, capsys, command):
    # `inspect --out RUN/checkpoints` wrote its PNGs among the checkpoints; through a link too
    run = tmp_path / "run"
    (run / "checkpoints" / "5").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (tmp_path / "link").symlink_to(run / "checkpoints")
    out = {
        "inspect": ["inspect", str(run), "--prompt", "x", "--out", "OUT"],
        "compress": ["compress", "quantize", str(run), "--out", "OUT"],
        "convert": ["convert", str(run), "OUT"],
        "eval": ["eval", str(run), "--json", "OUT/e.json"],
        "report": ["report", str(run), "--out", "OUT"],
    }[command]
    said = ("is inside the run it compresses" if command == "compress" else
            f"is inside the checkpoints folder of the run {run}")  # fmt: skip
    for target in (run / "checkpoints", tmp_path / "link" / "plots"):
        argv = [a.replace("OUT", str(target)) for a in out]
        assert said in _one_line(capsys, *argv)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["5"]
    # a link loop on the way: one line, not resolve()'s RuntimeError
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    argv = [a.replace("OUT", str(tmp_path / "a" / "x")) for a in out]
    assert f"{tmp_path / 'a'} is a link to" in _one_line(capsys, *argv)

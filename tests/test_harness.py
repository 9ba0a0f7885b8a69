"""lm-evaluation-harness on bigjax: `bigjax eval --tasks` scores multiple-choice, perplexity and
generation tasks in process, offline, and lm-eval's own `local-completions` client against
`bigjax serve` gets the same numbers."""

import json
import shutil
import signal
import threading
from pathlib import Path

import pytest
from test_serve_api import start_server

from bigjax.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "configs" / "tasks"
TASKS = ["bigjax_mc", "bigjax_ppl", "bigjax_gen"]
pytestmark = pytest.mark.slow


@pytest.fixture
def tasks_dir(tmp_path, monkeypatch):
    # datasets writes its cache under HF_HOME: keep it inside the test
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    shutil.copytree(FIXTURES, tmp_path / "tasks")
    return tmp_path / "tasks"


def _metrics(results):
    from bigjax.evals import headline

    return headline(results)


def test_in_process_and_through_the_server_agree(tiny_run, tasks_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["eval", str(tiny_run), "--tasks", ",".join(TASKS), "--include-path", str(tasks_dir)]
    assert main([*args, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "bigjax_mc" in table and "acc" in table and "exact_match" in table
    here = _metrics(json.loads(out.read_text()))
    assert 0.0 <= here["bigjax_mc/acc"] <= 1.0 and here["bigjax_ppl/word_perplexity"] > 1.0
    assert "bigjax_gen/exact_match" in here

    import lm_eval
    from lm_eval.tasks import TaskManager

    url, proc = start_server(tiny_run)
    try:
        # lm-eval's own client, tokenizing through the server's /tokenize (remote backend);
        # max_length 127: one generated token beside each 128-token context
        model_args = {"base_url": f"{url}/v1/completions", "tokenizer_backend": "remote",
                      "tokenized_requests": True, "max_length": 127, "model": "run"}  # fmt: skip
        with pytest.MonkeyPatch.context() as m:
            m.chdir(tasks_dir)  # relative data_files, as `bigjax eval --include-path` reads them
            remote = lm_eval.simple_evaluate(
                model="local-completions", model_args=model_args, tasks=TASKS,
                task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                log_samples=False,
                bootstrap_iters=0, random_seed=1234, numpy_random_seed=1234,
                torch_random_seed=1234, fewshot_random_seed=1234,
            )  # fmt: skip
    finally:
        proc.terminate()
        proc.wait()
    there = _metrics(remote)
    assert here["bigjax_mc/acc"] == there["bigjax_mc/acc"]
    assert here["bigjax_mc/acc_norm"] == there["bigjax_mc/acc_norm"]
    assert here["bigjax_gen/exact_match"] == there["bigjax_gen/exact_match"]
    # f32 log-likelihoods of the same ids through two code paths agree to ~1e-6 per token;
    # perplexity exponentiates a sum of ~100 of them
    assert here["bigjax_ppl/word_perplexity"] == pytest.approx(
        there["bigjax_ppl/word_perplexity"], rel=1e-4
    )


def test_unknown_tasks_and_missing_directories_are_one_line(tiny_run, tmp_path, capsys):
    assert main(["eval", str(tiny_run), "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown task(s) no_such_task_xyz" in capsys.readouterr().err
    assert (
        main(["eval", str(tiny_run), "--tasks", "x", "--include-path", str(tmp_path / "no")]) == 2
    )
    assert "no such directory" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--limit", "3"]) == 2
    assert "go with --tasks" in capsys.readouterr().err


def test_a_task_yaml_that_does_not_parse_is_named_not_just_an_unknown_task(
    tiny_run, tmp_path, capsys
):
    # lm-eval's index skips such a file at debug level: "unknown task(s) mine" was all one
    # saw of a typo in mine.yaml. Tags (`!function`) are not resolved, so they are no error.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("task: mine\ndoc_to_text: [unclosed\n")
    (tmp_path / "fine.yaml").write_text("task: fine\nprocess_docs: !function utils.docs\n")
    assert main(["eval", str(tiny_run), "--tasks", "mine", "--include-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) mine" in err and "skipped 1 YAML file(s)" in err, err
    assert "sub/mine.yaml line 3: expected ',' or ']'" in err and "fine.yaml" not in err, err


def test_benchmarks_during_training_reach_metrics_tensorboard_and_the_report(tasks_dir, tmp_path):
    from conftest import tiny_config

    from bigjax.metrics import read_jsonl
    from bigjax.report import report
    from bigjax.train import train

    cfg = tiny_config(
        num_steps=2, data={"batch_size": 8, "seq_len": 128},
        metrics={"log_every": 1, "tensorboard": True, "plot": False},
        eval={"every_steps": 2, "num_batches": 1, "harness_tasks": "bigjax_mc,bigjax_gen",
              "harness_include_path": str(tasks_dir), "harness_limit": 4},
    )  # fmt: skip
    train(cfg, tmp_path / "run")
    # the generation benchmark's engine is stopped with the run: no thread outlives it
    assert not [t for t in threading.enumerate() if t.name == "bigjax-engine"]
    rows = [
        r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "harness/bigjax_mc/acc" in r
    ]
    assert [r["step"] for r in rows] == [2]
    assert (
        0.0 <= rows[0]["harness/bigjax_mc/acc"] <= 1.0
        and "harness/bigjax_gen/exact_match" in rows[0]
    )
    events = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and b"harness/bigjax_mc/acc" in b"".join(p.read_bytes() for p in events)
    text, _ = report([tmp_path / "run"], tmp_path / "report")
    assert "## Benchmarks" in text and "bigjax_mc/acc" in text


def test_a_benchmark_whose_dataset_is_not_here_is_refused_before_training(
    tasks_dir, tmp_path, capsys
):
    # offline, a Hub dataset that was never cached: one line, and a training run that asks
    # for it stops before its first step, not at its first eval
    from conftest import tiny_config

    from bigjax.config import ConfigError
    from bigjax.train import train

    yaml = (tasks_dir / "bigjax_mc.yaml").read_text()
    remote = yaml.replace("task: bigjax_mc", "task: bigjax_remote").replace(
        "dataset_path: json", "dataset_path: no-such-org/no-such-dataset"
    )
    (tasks_dir / "bigjax_remote.yaml").write_text(remote)
    cfg = tiny_config(
        num_steps=2,
        data={"batch_size": 8, "seq_len": 128},
        eval={"every_steps": 2, "harness_tasks": "bigjax_remote",
              "harness_include_path": str(tasks_dir)},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="dataset is not on this machine .*no-such-dataset"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )
    assert "step 1/2" not in capsys.readouterr().out
    run = tmp_path / "tiny"
    train(tiny_config(num_steps=1), run)
    code = main(["eval", str(run), "--tasks", "bigjax_remote", "--include-path", str(tasks_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "dataset is not on this machine" in err and "Traceback" not in err
    for flag, value in (("--limit", "-3"), ("--limit", "nan"), ("--num-fewshot", "-1")):
        assert main(["eval", str(run), "--tasks", "bigjax_mc", flag, value]) == 2
        assert f"eval: {flag} " in capsys.readouterr().err


def test_benchmark_table_means_spreads_and_deltas():
    from pathlib import Path as P

    from bigjax.report import Run, benchmark_table

    def run(group, seed, acc):
        return Run(P(group), group, seed, {}, "", [], [], 0.0, 0.0, {}, {"arc/acc": acc})

    runs = [run("base", 0, 0.5), run("base", 1, 0.6), run("wide", 0, 0.7), run("wide", 1, 0.9)]
    table = benchmark_table(runs, baseline="base").splitlines()
    assert table[0] == "| group | seeds | arc/acc |"
    assert table[2] == "| base | 2 | 0.5500 ± 0.0707 |"  # std over seeds: sqrt(0.005)
    assert table[3] == "| wide | 2 | 0.8000 ± 0.1414 (+0.2500) |"
    assert benchmark_table([]) == ""


_GENERATE_ON_ONE_PROCESS = r"""
import json, sys, threading, time
from types import SimpleNamespace

import jax

if len(sys.argv) > 2:
    jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=int(sys.argv[3]))
from flax import nnx

from bigjax import models
from bigjax.config import from_configdict
from bigjax.data.tokenizer import ByteTokenizer
from bigjax.evals import EvalStopped, make_lm
from bigjax.mesh import make_mesh
from bigjax.signals import StopVote

cfg = from_configdict({"model": {"size": "tiny"}, "mesh": {"shape": (1, -1, 1)}})
mesh = make_mesh(cfg.mesh)
graphdef, params = nnx.split(models.build(cfg.model, cfg.mesh.rules, seed=0))
mode = sys.argv[4] if len(sys.argv) > 4 else ""
asked = {}
vote = StopVote(asked, mesh)
lm = make_lm(graphdef, params, ByteTokenizer(), 64, rules=cfg.mesh.rules, mesh=mesh, slots=2,
             stop=vote)  # fmt: skip
until = {"until": ["e", " ", "\n"], "max_gen_toks": 6}
# process 1 is handed other requests than process 0: it must make process 0's calls and
# return process 0's texts, not generate its own
contexts = ["def f(x):", "import os", "class A:", "x = [1,"]
if jax.process_index() == 1:
    contexts = ["zzz"] * 7
elif mode == "fail":  # process 0's requests are malformed (a ValueError there)
    until = {**until, "max_gen_toks": "many"}
if mode == "stop":  # a pass of 16 x 40 tokens, uncut, then stopped 0.3 s in on process 0
    long = [SimpleNamespace(args=(f"def f{i}(x):", {"until": [], "max_gen_toks": 40}))
            for i in range(16)]  # fmt: skip
    start = time.perf_counter()
    lm.generate_until(long)
    uncut = time.perf_counter() - start
    if jax.process_index() == 0:
        threading.Timer(0.3, lambda: asked.update(signal="SIGTERM")).start()
    start = time.perf_counter()
    try:
        lm.generate_until(long)
    except EvalStopped:
        stopped = time.perf_counter() - start
        now = vote.now()  # the training loop's question next: stop after this step?
        print(f"STOPPED {json.dumps([asked['signal'], now, uncut, stopped])}", flush=True)
        lm.close()
        sys.exit(4)
try:
    texts = lm.generate_until([SimpleNamespace(args=(c, until)) for c in contexts])
except (ValueError, RuntimeError) as e:
    print("FAILED " + type(e).__name__, flush=True)
    lm.close()
    sys.exit(3)
lm.close()
print("TEXTS " + json.dumps(texts), flush=True)
"""


def _generate_on_two_processes(tmp_path, *extra: str) -> list[tuple[int, str, str]]:
    """The script above on 2 processes x 4 CPU devices: (exit code, stdout, stderr) each."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import xla_flags

    script = tmp_path / "generate.py"
    script.write_text(_GENERATE_ON_ONE_PROCESS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(4)}
    procs = [
        subprocess.Popen([sys.executable, str(script), "x", f"127.0.0.1:{port}", str(i), *extra],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    try:  # ~30 s; on a hang (process 1 making calls of its own) both are killed
        out = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, out, strict=True)]


def test_generation_on_two_processes_follows_process_0_and_returns_its_texts(tmp_path):
    # Several processes: process 0 schedules the engine and the others make its calls, then
    # all return its texts (each scheduling its own made the same calls only while their
    # threads' timing agreed). The (1, 8, 1) mesh has fsdp across both processes, so every
    # engine call is a collective they must make together.
    import os
    import subprocess
    import sys

    from conftest import xla_flags

    def texts(stdout: str) -> list[str]:
        return json.loads(stdout.split("TEXTS ", 1)[1])

    two = _generate_on_two_processes(tmp_path)
    assert all(code == 0 for code, _, _ in two), [e[-2000:] for _, _, e in two]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(8)}
    alone = subprocess.run([sys.executable, str(tmp_path / "generate.py")], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-2000:]
    want = texts(alone.stdout)
    assert len(want) == 4 and [texts(o) for _, o, _ in two] == [want, want]


def test_a_generation_failing_on_process_0_fails_every_process_without_a_hang(tmp_path):
    # Process 0 ends the pass and shares "no texts" whatever it raised, so the followers
    # leave `follow` and raise too instead of waiting in a broadcast for ever.
    two = _generate_on_two_processes(tmp_path, "fail")
    assert [(code, o.split()[-1]) for code, o, _ in two] == [(3, "ValueError"),
                                                              (3, "RuntimeError")]  # fmt: skip


def test_a_stop_on_process_0_during_generations_on_two_processes_stops_both(tmp_path):
    # Several processes: process 0 leads the pass and asks its own stop between the engine's
    # events (there is no batch boundary all share for a vote); it cancels, waits for the
    # engine to go idle (a call in flight must not cross the end of the pass), and shares its
    # verdict with the texts, so process 1 leaves too, naming the signal and where it came
    # from, instead of the pass running through the preemption notice.
    two = _generate_on_two_processes(tmp_path, "stop")
    assert [code for code, _, _ in two] == [4, 4], [e[-2000:] for _, _, e in two]
    got = [json.loads(o.split("STOPPED ", 1)[1]) for _, o, _ in two]
    # both then stop the training loop after this step: each records the verdict
    assert [g[:2] for g in got] == [["SIGTERM", True], ["SIGTERM on process 0", True]]
    for _, _, uncut, stopped in got:  # the stop at 0.3 s of a pass of several seconds uncut
        assert stopped < 0.5 * uncut, (uncut, stopped)


def test_a_stop_in_a_training_runs_generations_on_two_processes_saves_and_stops_both(tasks_dir):
    # The whole path on 2 processes: SIGTERM to process 0 while a benchmark generates (256
    # prompts x 63 tokens, about a minute uncut here, so a faster machine is still inside it
    # 8 s in; a slower one still in the setup is stopped by the poll there, the same way)
    # during the eval of step 2. Process 0 leaves the pass and the eval, process 1 hears its
    # verdict with the texts; both save step 2 and exit 0. Process 0 must record its own
    # verdict too: before, it trained on into step 3 while process 1 had stopped, and waited
    # there for ever.
    import time

    from test_distributed import _finish, _start

    prompts = [json.dumps({"prompt": f"def f{i}(x):\n    return", "answer": " x"})
               for i in range(256)]  # fmt: skip
    (tasks_dir / "long.jsonl").write_text("\n".join(prompts) + "\n")
    yaml = (tasks_dir / "bigjax_gen.yaml").read_text()
    for old, new in [
        ("task: bigjax_gen", "task: bigjax_long"),
        ("gen.jsonl", "long.jsonl"),
        ('until: ["\\n"]', "until: []"),
        ("max_gen_toks: 12", "max_gen_toks: 200"),
    ]:
        assert old in yaml
        yaml = yaml.replace(old, new)
    (tasks_dir / "bigjax_long.yaml").write_text(yaml)
    run = tasks_dir.parent / "run"
    extra = ["--config.eval.every_steps=2", "--config.eval.harness_tasks=bigjax_long",
             f"--config.eval.harness_include_path={tasks_dir}"]  # fmt: skip
    procs = _start(run, steps=4, processes=2, extra=extra)
    deadline = time.monotonic() + 300
    while not any(r.get("step") == 2 for r in _rows(run)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    time.sleep(8.0)  # the held-out loss and lm-eval's setup: a few seconds; then generations
    procs[0].send_signal(signal.SIGTERM)
    out = _finish(procs)  # asserts both exit 0
    assert "received SIGTERM during the eval of step 2: left unfinished" in out[0].stdout
    assert "received SIGTERM on process 0 during the eval of step 2: left unfinished" in (
        out[1].stdout
    )
    assert all("saving step 2 and stopping" in o.stdout for o in out)
    assert max(r["step"] for r in _rows(run)) == 2
    assert not any("harness/bigjax_long/exact_match" in r for r in _rows(run))


def _rows(run: Path) -> list[dict]:
    from bigjax.metrics import read_jsonl

    return read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []


def test_a_stop_during_generations_cancels_them_and_propagates():
    # One process: a stop asked while a benchmark generates (lm-eval hands over all of its
    # generations in one call) is seen between the engine's events; the sequences are
    # cancelled and their slots freed, and the run saves instead of generating on through
    # its preemption notice.
    import time
    from types import SimpleNamespace

    from flax import nnx

    from bigjax import models
    from bigjax.config import from_configdict
    from bigjax.data.tokenizer import ByteTokenizer
    from bigjax.evals import EvalStopped, make_lm
    from bigjax.mesh import make_mesh
    from bigjax.signals import StopVote

    cfg = from_configdict({"model": {"size": "tiny"}})
    graphdef, params = nnx.split(models.build(cfg.model, cfg.mesh.rules, seed=0))
    asked: dict[str, str] = {}
    lm = make_lm(graphdef, params, ByteTokenizer(), 128, rules=cfg.mesh.rules, slots=2,
                 stop=StopVote(asked, make_mesh(cfg.mesh)))  # fmt: skip
    requests = [SimpleNamespace(args=(f"def f{i}(x):", {"until": [], "max_gen_toks": 100}))
                for i in range(16)]  # fmt: skip
    assert len(lm.generate_until(requests[:1])) == 1  # compiles the engine
    engine = lm._engine
    stopper = threading.Timer(0.3, lambda: asked.update(signal="SIGTERM"))
    stopper.start()
    start = time.perf_counter()
    with pytest.raises(EvalStopped):
        lm.generate_until(requests)  # 16 x 100 tokens through 2 slots: seconds, uncut
    assert time.perf_counter() - start < 2.0  # the stop at 0.3 s, seen within a check
    deadline = time.monotonic() + 10
    while engine.counts() != {"running": 0, "waiting": 0, "slots": 2}:
        assert time.monotonic() < deadline, engine.counts()
        time.sleep(0.05)
    lm.close()

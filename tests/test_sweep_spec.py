"""Sweep specs: expansion into trials, validation, device splitting, config hashing."""

import math
import sqlite3
import time
from pathlib import Path

import pytest

from bigjax.config import ConfigError
from bigjax.sweep import (
    Choice,
    Grid,
    IntUniform,
    LogUniform,
    Sweep,
    Uniform,
    ablation,
    database,
    devices,
    ladder,
    spec,
)
from bigjax.sweep.runner import cli_overrides, config_hash

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "lm_tiny.py")


def test_grid_is_the_product_times_seeds():
    s = Sweep(
        "g",
        TINY,
        space={"optim.lr": Grid((1e-3, 3e-3)), "model.tie_embeddings": Choice(True, False)},
        seeds=(0, 1, 2),
    )
    points = s.points()
    assert len(points) == 2 * 2 * 3
    assert len({tuple(sorted(p.items())) for p in points}) == 12  # all distinct
    assert {p["seed"] for p in points} == {0, 1, 2}


def test_random_points_are_seeded_and_in_range():
    space = {"optim.lr": LogUniform(1e-4, 1e-1), "optim.b2": Uniform(0.9, 0.999)}
    space |= {"model.num_layers": IntUniform(1, 3), "optim.name": Choice("adamw", "lion")}
    s = Sweep("r", TINY, space=space, algorithm="random", budget=50, sampler_seed=7)
    points = s.points()
    assert points == s.points()  # every worker computes the same points
    assert len(points) == 50
    assert points != Sweep("r", TINY, space=space, algorithm="random", budget=50).points()
    lrs = [p["optim.lr"] for p in points]
    assert all(1e-4 <= lr <= 1e-1 for lr in lrs)
    # log-uniform: about half the draws below the geometric midpoint 10^-2.5
    assert 15 < sum(lr < 10**-2.5 for lr in lrs) < 35
    assert {p["model.num_layers"] for p in points} == {1, 2, 3}
    assert all(0.9 <= p["optim.b2"] <= 0.999 for p in points)


def test_tpe_enqueues_one_slot_per_budget_and_seed():
    s = Sweep("t", TINY, space={"optim.lr": LogUniform(1e-4, 1e-1)}, algorithm="tpe", budget=4,
              seeds=(0, 1))  # fmt: skip
    assert s.points() == [{"seed": 0}, {"seed": 1}] * 4


def test_ablation_fixes_the_data_order_and_adds_the_baseline():
    a = ablation("ab", TINY, {"layernorm": {"model.norm": "layernorm"}}, seeds=(0, 1))
    points = a.points()
    assert {p["variant"] for p in points} == {"baseline", "layernorm"}
    assert len(points) == 4
    over = a.overrides_for({"variant": "layernorm", "seed": 1})
    assert over == {"data.seed": 0, "model.norm": "layernorm", "seed": 1}
    assert a.overrides_for({"variant": "baseline", "seed": 0})["data.seed"] == 0


def test_ladder_scales_steps_with_parameters():
    sizes = {"s": {"model.d_model": 64}, "m": {"model.d_model": 128}}
    lad = ladder("lad", TINY, sizes, tokens_per_param=10, tokens_per_step=1000,
                 param_count=lambda m: m["model.d_model"] ** 2)  # fmt: skip
    assert lad.variants["s"]["num_steps"] == math.ceil(10 * 64**2 / 1000)
    assert lad.variants["m"]["num_steps"] == math.ceil(10 * 128**2 / 1000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithm": "bayes"}, "algorithm must be one of"),
        ({"space": {"optim.lr": Uniform(1e-4, 1e-2)}}, "Grid/Choice values only"),
        ({"algorithm": "random", "space": {"optim.lr": Grid((1,))}}, "budget must be > 0"),
        ({"algorithm": "random", "budget": 2, "space": {"x": LogUniform(0, 1)}}, "low > 0"),
        ({"space": {"seed": Grid((1, 2))}}, "'seed' is reserved"),
        ({"space": {"seed": Grid((1, 2))}}, r"space holds 'seed', .* give Sweep\(seeds=\(0, 1\)\)"),
        ({"space": {"variant": Grid(("a",))}}, r"'variant' is reserved: give Sweep\(variants="),
        ({"pruner": "hyperband"}, "pruner must be one of"),
        ({"baseline": "nope"}, "baseline must be a variant"),
        ({"seeds": ()}, "at least one seed"),
        # each ran one point twice (the same run directory), or failed deep inside the runner
        # or Optuna: a TypeError, an OverflowError drawing from an infinite range
        ({"seeds": (0, 0)}, r"seeds must be distinct \(got \(0, 0\)\)"),
        ({"seeds": (True,)}, "seeds must be a tuple of ints"),
        ({"seeds": 0}, "seeds must be a tuple of ints"),
        ({"space": {"optim.lr": Grid((1e-3, 1e-3))}}, "must be distinct values"),
        ({"space": {"optim.lr": Grid(([1e-3],))}}, "a tuple-valued key takes a string"),
        ({"algorithm": "random", "budget": 2, "space": {"x": Uniform(0, math.inf)}}, "finite"),
        ({"algorithm": "random", "budget": 2, "space": {"x": IntUniform(0.5, 3)}}, "int bounds"),
        ({"algorithm": "random", "budget": 2.5, "space": {"x": Uniform(0, 1)}}, "budget must be"),
        ({"space": {"x": Grid((1,))}, "overrides": {"x": 2}}, r"not both \(also in overrides"),
        ({"space": {"x": Grid((1,))}, "variants": {"v": {"x": 2}}}, r"not both \(also in v\)"),
        ({"variants": ["a", "b"]}, "variants must be a mapping"),
    ],
)
def test_bad_specs_say_what_to_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Sweep("bad", TINY, **kwargs)


def test_seeds_a_trial_could_not_train_with_are_refused_in_the_spec():
    with pytest.raises(ConfigError, match=r"seeds must be in 0 .. 2\*\*32 - 1 \(got \(0, -1\)\)"):
        Sweep("bad", TINY, seeds=(0, -1))


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        spec.load(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_sweep"):
        spec.load(tmp_path / "empty.py")
    (tmp_path / "wrong.py").write_text("def get_sweep():\n    return {}\n")
    with pytest.raises(ConfigError, match="must return a bigjax.sweep.Sweep"):
        spec.load(tmp_path / "wrong.py")


def test_device_split():
    assert devices.split([0, 1, 2, 3, 4, 5, 6, 7], 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert devices.split([0, 1], 1) == [[0, 1]]
    with pytest.raises(ValueError, match="cannot be split evenly between 3 workers"):
        devices.split(list(range(8)), 3)


def test_cpu_workers_get_disjoint_cores():
    # On any machine: each worker's cores are its own unless there are fewer cores than workers.
    import os

    cores = sorted(os.sched_getaffinity(0))
    workers = min(len(cores), 2)
    groups = [devices.trial_env(i, workers)[1] or cores for i in range(workers)]
    if workers > 1:
        assert not set(groups[0]) & set(groups[1])


def test_config_hash_follows_the_resolved_config():
    from bigjax.cli import load_config

    a = load_config(TINY, cli_overrides({"optim.lr": 1e-3}))
    b = load_config(TINY, cli_overrides({"optim.lr": 0.001, "seed": 0}))  # same values
    c = load_config(TINY, cli_overrides({"optim.lr": 3e-3}))
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert cli_overrides({"mesh.shape": (1, 8, 1), "model.scan_layers": False}) == [
        "--config.mesh.shape=1,8,1",
        "--config.model.scan_layers=false",
    ]


def _study(tmp_path, sweep, **opts):
    from bigjax.sweep import database, runner

    options = runner.Options(
        directory=tmp_path, storage=f"sqlite:///{tmp_path / 'study.db'}", **opts
    )
    storage = database.make_storage(options.storage, options.heartbeat_s)
    return runner, options, storage, runner.open_study(sweep, storage, options)


def test_tpe_slots_get_their_points_from_the_sampler(tmp_path):
    # A real Optuna study (SQLite): the TPE sweep's enqueued slots fix only the seed; the
    # sampler fills in the rest, inside the space.
    sweep = Sweep(
        "tpe",
        TINY,
        space={"optim.lr": LogUniform(1e-4, 1e-1), "optim.name": Choice("adamw", "lion")},
        algorithm="tpe",
        budget=3,
        seeds=(5, 6),
    )
    runner, options, storage, study = _study(tmp_path, sweep)
    worker = runner.Worker(sweep, study, storage, options)
    points = []
    while (trial := worker.pop()) is not None:
        points.append(runner.suggest_point(sweep, trial))
        study.tell(trial, 1.0)
    assert len(points) == 6  # budget x seeds, then the queue is empty: no extra trials
    assert sorted(p["seed"] for p in points) == [5, 5, 5, 6, 6, 6]
    assert all(1e-4 <= p["optim.lr"] <= 1e-1 for p in points)
    assert {p["optim.name"] for p in points} <= {"adamw", "lion"}
    assert len(study.get_trials()) == 6


def test_joining_needs_the_same_spec_and_an_existing_study(tmp_path):
    sweep = Sweep("s", TINY, space={"optim.lr": Grid((1e-3,))})
    runner, _, _, _ = _study(tmp_path, sweep)
    changed = Sweep("s", TINY, space={"optim.lr": Grid((1e-3, 2e-3))})
    with pytest.raises(ConfigError, match="made from a different spec"):
        _study(tmp_path, changed)
    with pytest.raises(ConfigError, match="has no study named 'other'"):
        _study(tmp_path, Sweep("other", TINY), join_only=True, wait_s=0.5)


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for p in (Path(__file__).resolve().parents[1] / "experiments").glob("*/*.py")
        if p.name in ("sweep.py", "ablation.py")
    ),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_study_spec_in_experiments_resolves(path, monkeypatch):
    # A typo in a committed study's keys must fail here, not halfway through its sweep.
    from bigjax.cli import load_config

    monkeypatch.chdir(path.parents[2])  # specs name configs relative to the repository root
    sweep = spec.load(path)
    points = [p for p in sweep.points() if p is not None]
    assert points
    for point in points:
        load_config(sweep.config, cli_overrides(sweep.overrides_for(point)))


@pytest.mark.parametrize(
    ("space", "variants", "words"),
    [
        ({"optim.lr": Grid((1e-3,)), "optim.nope": Grid((1, 2))}, {}, "unknown config key"),
        ({"optim.lr": Grid((1e-3, 3e-3, "fast"))}, {}, "optim.lr: expected float, got 'fast'"),
        ({"optim.lr": LogUniform(1e-4, 1e-2)}, {"a": {}, "b": {"model.nope": 1}}, "model.nope"),
    ],
)
def test_a_bad_key_or_value_refuses_the_sweep_before_it_starts(
    tmp_path, capsys, space, variants, words
):
    # checked once, axis by axis, in the parent: not once per trial, each a failed process
    from bigjax.cli import main
    from bigjax.sweep.runner import check_values

    algorithm = "grid" if all(isinstance(p, Grid) for p in space.values()) else "random"
    sweep = Sweep("bad", TINY, space=space, variants=variants, algorithm=algorithm, budget=2)
    with pytest.raises(ConfigError, match=words):
        check_values(sweep)
    check_values(Sweep("good", TINY, space={"optim.lr": Grid((1e-3, 3e-3))}))
    file = tmp_path / "sweep.py"
    file.write_text(f"from bigjax.sweep import *\ndef get_sweep():\n    return {sweep!r}\n")
    assert main(["sweep", str(file), "--dir", str(tmp_path / "out")]) == 2
    assert "sweep spec: the trial {" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _damaged(db: Path) -> None:
    """Flips bits all over the study database past its 100-byte header, as a bad disk
    would: SQLite then finds its schema malformed."""
    import random

    data = bytearray(db.read_bytes())
    rng = random.Random(0)
    for page in range(len(data) // 4096):
        for _ in range(40):
            i = page * 4096 + rng.randrange(100 if page == 0 else 0, 4096)
            data[i] ^= 1 << rng.randrange(8)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("storage", "words"),
    [
        ("sqlite:///{tmp}/garbage.db", "is damaged or not an SQLite file (file is not a database)"),
        ("sqlite:///{tmp}/out/study.db", "is damaged or not an SQLite file (malformed"),
        ("sqlite:///{tmp}/no/such/dir/study.db", "failed: unable to open database file"),
        ("not a url", "is not a database URL; give --storage sqlite:///PATH or postgresql://"),
        # SQLite's lock wait: a ValueError traceback from inside SQLAlchemy; -1, nan: taken
        ("sqlite:///{tmp}/s.db?timeout=abc", "has timeout='abc': give one number of seconds"),
        ("sqlite:///{tmp}/s.db?timeout=-1", "has timeout='-1': give one number of seconds"),
        ("sqlite:///{tmp}/s.db?timeout=nan", "has timeout='nan': give one number of seconds"),
        ("sqlite:///{tmp}/s.db?timeout=1&timeout=2", "has timeout=('1', '2'): give one"),
        ("nosuchdb://u@h/db", "is of a kind SQLAlchemy does not know"),
        ("oracle+cx_oracle://u:secret@127.0.0.1:1/db", "needs a Python driver that is not"),
    ],
)
def test_a_study_database_that_cannot_be_used_is_one_line_naming_it(
    tmp_path, capsys, storage, words
):
    # SQLAlchemy's errors are a page of traceback that never says which flag to change; a
    # damaged study.db is what a bad disk or a copy cut short leaves.
    from bigjax.cli import main

    sweep = Sweep("db", TINY, space={"optim.lr": Grid((1e-3,))})
    file = tmp_path / "sweep.py"
    file.write_text(f"from bigjax.sweep import *\ndef get_sweep():\n    return {sweep!r}\n")
    (tmp_path / "garbage.db").write_bytes(b"not a database at all " * 300)
    (tmp_path / "out").mkdir()
    _study(tmp_path / "out", sweep)  # a real study, then damaged
    _damaged(tmp_path / "out" / "study.db")
    capsys.readouterr()
    args = ["sweep", str(file), "--dir", str(tmp_path / "out")]
    assert main([*args, "--storage", storage.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigjax: error: sweep: the study database ") and words in err, err
    assert len(err.strip().splitlines()) == 1 and "secret" not in err  # no password shown


def test_a_study_database_locked_past_the_wait_is_one_line_saying_who_keeps_it(tmp_path, capsys):
    # Another process holds SQLite's lock (a sweep stopped with Ctrl-Z inside a write): a
    # write waits the URL's timeout (60 s overrode it), then the sweep says so (it said
    # "database is locked. Check the URL and that its directory exists and is writable").
    from bigjax.cli import main

    sweep = Sweep("locked", TINY, space={"optim.lr": Grid((1e-3,))})
    file = tmp_path / "sweep.py"
    file.write_text(f"from bigjax.sweep import *\ndef get_sweep():\n    return {sweep!r}\n")
    db = tmp_path / "study.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # what a writer holds between its write and its commit
    try:
        storage = f"sqlite:///{db}?timeout=0.2"  # the URL's wait stands (the default is 60 s)
        started = time.monotonic()
        assert main(["sweep", str(file), "--dir", str(tmp_path), "--storage", storage]) == 2
        assert time.monotonic() - started < 30
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    err = capsys.readouterr().err
    assert "is locked: another process kept its write lock past the wait" in err, err
    assert "stopped with Ctrl-Z" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--heartbeat", "0"], "--heartbeat must be a number of seconds above 0, at most"),
        (["--heartbeat", "-1"], "(a day), got -1.0"),
        (["--heartbeat", "nan"], "(a day), got nan"),
        (["--heartbeat", "inf"], "above 0, at most 86400 (a day), got inf"),
        (["--heartbeat", "1e308"], "got 1e+308"),  # 3 x it overflowed Optuna's grace period
        (["--storage", "sqlite://"], "is an in-memory SQLite database"),
        (["--storage", "sqlite:///:memory:"], "is an in-memory SQLite database"),
    ],
)
def test_sweep_flags_that_cannot_work_are_refused_in_one_line(tmp_path, capsys, flags, words):
    # each was a traceback (a division by zero, a float NaN cast to int, an empty lock-file
    # name) or a worker spinning without a pause (a heartbeat of 0 or less)
    from bigjax.cli import main

    sweep = Sweep("flags", TINY, space={"optim.lr": Grid((1e-3,))})
    file = tmp_path / "sweep.py"
    file.write_text(f"from bigjax.sweep import *\ndef get_sweep():\n    return {sweep!r}\n")
    assert main(["sweep", str(file), "--dir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigjax: error: sweep: ") and words in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything was made
    assert database.sqlite_file("sqlite:///rel/study.db") == Path("rel/study.db")
    assert database.sqlite_file("sqlite:////abs/study.db?timeout=5") == Path("/abs/study.db")
    assert database.sqlite_file("postgresql://u@h/db") is None


@pytest.mark.parametrize("stops_after", [None, 3])
def test_a_joiner_waits_while_the_creator_enqueues_not_after_it_stops(tmp_path, stops_after):
    # A large grid takes its creator a while to enqueue (one transaction a trial: 10^4 points
    # took 38 s): a worker joining then gave up after its fixed wait, although the trials were
    # still growing. It now waits while they grow, and gives up `wait_s` after the last.
    import threading

    import optuna

    from bigjax.sweep import runner

    sweep = Sweep("s", TINY, space={"optim.lr": Grid(tuple(1e-4 * (i + 1) for i in range(10)))})
    url = f"sqlite:///{tmp_path / 'study.db'}"

    created = threading.Event()

    def creator():  # as another machine's `bigjax sweep` would, slower than the joiner's wait_s
        study = optuna.create_study(storage=url, study_name="s", direction=sweep.direction)
        created.set()
        for point in sweep.points()[:stops_after]:
            study.enqueue_trial(point)
            time.sleep(0.5)
        if stops_after is None:
            study.set_user_attr("spec", runner.spec_fingerprint(sweep))
            study.set_user_attr("enqueued", len(sweep.points()))

    thread = threading.Thread(target=creator)
    thread.start()
    try:
        assert created.wait(60)  # the joiner comes once the study exists (its tables: slow)
        if stops_after is None:
            *_, study = _study(tmp_path, sweep, join_only=True, wait_s=2.5)
            assert len(study.trials) == 10  # 5 s of enqueueing, twice the joiner's wait
        else:
            with pytest.raises(ConfigError, match="never filled .its 3 trials stopped growing"):
                _study(tmp_path, sweep, join_only=True, wait_s=2.5)
    finally:
        thread.join()

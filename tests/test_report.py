"""`bigjax report` and the scaling-law fit, on run directories with known numbers."""

import json
import os
import statistics
import warnings

import numpy as np
import pytest

from bigjax import report
from bigjax.cli import main
from bigjax.errors import BigjaxWarning
from bigjax.fit import fit_power_law

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_fit_recovers_a_known_power_law():
    compute = np.geomspace(1e12, 1e17, 6)
    loss = 40.0 * compute ** (-0.08) + 1.7
    law = fit_power_law(compute, loss)
    # Exact data: the fit must land on the generating parameters (to solver precision).
    assert law.b == pytest.approx(0.08, rel=1e-3)
    assert law.c == pytest.approx(1.7, rel=1e-3)
    assert law.a == pytest.approx(40.0, rel=1e-2)  # a absorbs b's error times log C
    np.testing.assert_allclose(law(compute), loss, rtol=1e-4)


def test_fit_with_noise_stays_close():
    rng = np.random.default_rng(0)
    compute = np.geomspace(1e13, 1e18, 8)
    loss = 25.0 * compute ** (-0.07) + 2.0 + rng.normal(0, 0.002, 8)
    law = fit_power_law(compute, loss)
    # 0.2 % noise on the loss: the exponent stays within ~15 %, the offset within 0.2 nats.
    assert 0.06 < law.b < 0.08 and abs(law.c - 2.0) < 0.2
    assert law.rmse < 0.005


def test_fit_needs_three_sizes():
    with pytest.raises(ValueError, match="at least 3 distinct compute"):
        fit_power_law(np.array([1e12, 1e13]), np.array([3.0, 2.8]))


def _fake_run(root, name, *, group, seed, final, best_extra=0.1, baseline="", steps=100):
    """A run directory as `train` and `sweep` write it, with chosen losses."""
    d = root / name
    d.mkdir(parents=True)
    rows = [{"step": s, "loss": final + 1.0 / s} for s in (10, 50, 100)]
    rows += [{"step": 50, "eval_loss": final - best_extra}, {"step": steps, "eval_loss": final}]
    rows.sort(key=lambda r: r["step"])
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "config.json").write_text(
        json.dumps({"seed": seed, "data": {"batch_size": 4, "seq_len": 8}})
    )
    summary = {"step": steps, "complete": True, "eval_loss": final, "tokens": steps * 32,
               "flops": steps * 1e9 * (1 + len(group)), "wall_s": 10.0}  # fmt: skip
    (d / "summary.json").write_text(json.dumps(summary))
    trial = {"point": {"variant": group, "seed": seed}, "baseline": baseline}
    (d / "trial.json").write_text(json.dumps(trial))
    return d


def test_table_means_stds_and_paired_deltas(tmp_path):
    base = {0: 2.00, 1: 2.10, 2: 2.05}
    var = {0: 1.90, 1: 2.04, 2: 1.93}
    for s in base:
        _fake_run(tmp_path, f"b{s}", group="baseline", seed=s, final=base[s], baseline="baseline")
        _fake_run(tmp_path, f"v{s}", group="wide", seed=s, final=var[s], baseline="baseline")
    text, pngs = report.report([tmp_path], tmp_path / "out")
    wide = next(line for line in text.splitlines() if line.startswith("| wide"))
    mean, std = statistics.mean(var.values()), statistics.stdev(var.values())
    assert f"{mean:.4f} ± {std:.4f}" in wide
    diffs = [var[s] - base[s] for s in base]  # paired by seed
    assert f"{statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} (paired)" in wide
    best = [v - 0.1 for v in var.values()]
    assert f"{statistics.mean(best):.4f}" in wide
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| baseline") and "(baseline)" in lines[1]  # baseline first
    assert (tmp_path / "out" / "report.md").read_text() == text
    names = {p.name for p in pngs}
    assert {"loss_vs_step.png", "loss_vs_tokens.png", "loss_vs_flops.png"} <= names
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_unfinished_runs_are_counted_not_averaged(tmp_path):
    _fake_run(tmp_path, "a", group="g", seed=0, final=2.0)
    d = _fake_run(tmp_path, "b", group="g", seed=1, final=9.0)
    (d / "summary.json").write_text(json.dumps({"step": 50, "complete": False}))
    text, _ = report.report([tmp_path], tmp_path / "out")
    row = next(line for line in text.splitlines() if line.startswith("| g |"))
    assert "2 (1 unfinished)" in row and "| 2.0000 |" in row


def test_sweep_parameters_get_objective_plots(tmp_path):
    for i, lr in enumerate([1e-4, 1e-3, 1e-2]):
        d = _fake_run(tmp_path, f"t{i}", group="x", seed=0, final=3.0 - i * 0.1)
        (d / "trial.json").write_text(json.dumps({"point": {"optim.lr": lr, "seed": 0}}))
    text, pngs = report.report([tmp_path], tmp_path / "out")
    assert "| optim.lr=0.001 |" in text
    assert (tmp_path / "out" / "objective_vs_optim_lr.png").read_bytes()[:8] == PNG_MAGIC


def test_scaling_fit_from_runs(tmp_path):
    for i, c in enumerate([1e12, 1e13, 1e14, 1e15]):
        d = _fake_run(tmp_path, f"s{i}", group=f"size{i}", seed=0, final=10 * c**-0.05 + 1.0)
        summary = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**summary, "flops": c}))
    text, pngs = report.report([tmp_path], tmp_path / "out", fit="scaling")
    assert "C^(-0.0500)" in text and "+ 1.0000" in text
    assert (tmp_path / "out" / "scaling_fit.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err
    _fake_run(tmp_path, "a", group="g", seed=0, final=2.0)
    assert main(["report", str(tmp_path), "--baseline", "nope"]) == 2
    assert "--baseline 'nope' is not one of the groups" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--fit", "scaling"]) == 2
    assert "at least 3 sizes" in capsys.readouterr().err


def test_a_diverged_run_shows_nan_and_damaged_values_are_skipped(tmp_path):
    # bigjax writes a non-finite number as null: the report used to stop on float(None)
    d = _fake_run(tmp_path, "diverged", group="d", seed=0, final=2.0)
    with (d / "metrics.jsonl").open("a") as f:
        f.write('{"step": 100, "loss": null}\n{"step": 100, "eval_loss": null}\n')
        f.write('{"step": "x", "loss": 1.0}\n{"step": true, "loss": 1.0}\n')  # not a step
        f.write('{"step": 7.5, "loss": 1.0}\n{"step": 60, "loss": "1.0"}\n')  # nor a loss
    run = report.load_run(d)
    assert [s for s, _ in run.train] == [10, 50, 100, 100]
    assert np.isnan(run.train[-1][1]) and np.isnan(run.final)
    assert run.best == pytest.approx(1.9)  # the best finite eval
    _fake_run(tmp_path, "fine", group="f", seed=0, final=2.5)
    text, _ = report.report([tmp_path], tmp_path / "out")
    rows = [
        line for line in text.splitlines() if line.startswith("| d |") or line.startswith("| f |")
    ]
    assert rows[0].startswith("| f |") and "| nan | 1.9000 |" in rows[1]  # nan sorts last


def test_damaged_lines_are_warned_and_listed_and_odd_names_stay_in_their_cell(tmp_path):
    # bit flips in metrics.jsonl dropped rows without a word; a `|` in a run's name split its
    # table row; a run named in Chinese gave matplotlib's warning per glyph and figure
    d = _fake_run(tmp_path, "flipped", group="a|b", seed=0, final=2.0)
    lines = (d / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"loss", b"lo\xf3s")  # not UTF-8
    lines[3] = lines[3].replace(b'"step"', b'"s\x74ep')  # not JSON
    (d / "metrics.jsonl").write_bytes(b"".join(lines) + b'{"step": 101, "lo')  # + a cut line
    _fake_run(tmp_path, "运行", group="运行", seed=0, final=2.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text, _ = report.report([tmp_path], tmp_path / "out")
    said = [str(w.message) for w in caught if issubclass(w.category, BigjaxWarning)]
    assert said[0] == f"report: {d}: metrics.jsonl lines 2, 4 damaged, skipped", said
    assert len(said) == 2 and said[1].startswith("report: the plots' font has no glyph for 行运:")
    assert f"- `{d}`: a|b, seed 0; metrics.jsonl lines 2, 4 damaged, skipped" in text
    assert "\n| a\\|b | 1 |" in text and "\n| 运行 | 1 |" in text


def test_a_run_named_in_bytes_that_are_not_utf8_is_shown_escaped(tmp_path):
    # a run directory named `caf\xe9` (Latin-1 on a Linux disk), grouped by its name: its
    # lone surrogate reached matplotlib's legend, a TypeError traceback and no report
    d = _fake_run(tmp_path, os.fsdecode(b"caf\xe9"), group="", seed=0, final=2.0)
    (d / "trial.json").unlink()  # a plain run: grouped by its directory's name
    text, _ = report.report([tmp_path], tmp_path / "out")
    assert "\n| caf\\xe9 | 1 |" in text and (tmp_path / "out" / "loss_vs_step.png").is_file()
    (tmp_path / "out" / "report.md").read_text(encoding="utf-8")  # plain UTF-8 for any reader


@pytest.mark.parametrize(
    "name, damage, words",
    [
        ("summary.json", {"wall_s": "abc"}, "'wall_s' is 'abc', not a number"),
        ("summary.json", {"step": "100"}, "'step' is '100', not a JSON integer"),
        ("summary.json", {"complete": "no"}, "'complete' is 'no', not a JSON boolean"),
        ("config.json", {"seed": "abc"}, "'seed' is 'abc', not a JSON integer"),
        ("config.json", {"data": {"batch_size": 4.5}}, "'batch_size' is 4.5, not a JSON integer"),
        ("trial.json", {"point": {"seed": True}}, "'seed' is True, not a JSON integer"),
        ("trial.json", {"point": [1]}, "'point' is [1], not a JSON object"),
    ],
)
def test_a_field_of_the_wrong_type_is_named_with_its_file(tmp_path, capsys, name, damage, words):
    # A string for wall time, a "no" for complete (truthy: the run counted as finished), a
    # string seed: each used to stop with a traceback or be averaged as written
    d = _fake_run(tmp_path, "a", group="g", seed=0, final=2.0)
    if name == "config.json":
        (d / "trial.json").unlink()  # a plain run: its seed is the config's
    doc = json.loads((d / name).read_text())
    (d / name).write_text(json.dumps({**doc, **damage}))
    assert main(["report", str(d)]) == 2
    err = capsys.readouterr().err
    assert f"{d / name}: {words}; restore the file or leave that run out" in err, err


def test_every_path_must_hold_a_run(tmp_path, capsys):
    # a mistyped (or empty) directory among several used to drop out of the comparison
    # silently; a directory named metrics.jsonl is no run
    _fake_run(tmp_path / "runs", "a", group="g", seed=0, final=2.0)
    (tmp_path / "empty" / "metrics.jsonl").mkdir(parents=True)
    out = ["--out", str(tmp_path / "out")]
    assert main(["report", str(tmp_path / "runs"), str(tmp_path / "empty"), *out]) == 2
    assert f"no runs under {tmp_path / 'empty'} (a run directory" in capsys.readouterr().err


def test_a_run_whose_metrics_are_a_fifo_is_left_out_and_said(tmp_path):
    # Reading a FIFO would wait for a writer for ever; it used to drop out without a word.
    _fake_run(tmp_path / "runs", "a", group="g", seed=0, final=2.0)
    (tmp_path / "runs" / "b").mkdir()
    os.mkfifo(tmp_path / "runs" / "b" / "metrics.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text, _ = report.report([tmp_path / "runs"], tmp_path / "out")
    said = [str(w.message) for w in caught if issubclass(w.category, BigjaxWarning)]
    assert said == [f"report: {tmp_path / 'runs' / 'b' / 'metrics.jsonl'} is not a regular "
                    "file; that run is left out."]  # fmt: skip
    assert "\n| g | 1 |" in text  # run a is reported
